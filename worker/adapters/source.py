"""The queue source seam: :class:`Source`, the shared intake loop, and ``run --source URL``.

A :class:`Source` is an async context manager (connect, declare, close) with one method,
``serve(handle, stop=...)``: it feeds each message through ``handle`` (the dispatcher's
:meth:`~worker.dispatch.Dispatcher.handle`) until ``stop`` is set, with at most
``max_in_flight`` events at once, and settles each message only after its outcome is known
(see :mod:`worker.adapters.envelope`). On ``stop`` it takes no more messages, gives in-flight ones
``shutdown_grace`` seconds to finish and settles them; whatever is still running then is
cancelled and left unacknowledged, so the broker delivers it again. Delivery is therefore
**at least once**: a crash between handling and acknowledging means a duplicate.

Sources by URL scheme: ``redis://``/``rediss://`` (:mod:`worker.adapters.redis_streams`),
``amqp://``/``amqps://`` (:mod:`worker.adapters.rabbitmq`), ``memory://`` (in-process,
:mod:`worker.adapters.memory`). Each broker module implements the narrow :class:`Inbox`
(``receive``/``settle``) and runs :func:`pump`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from config.settings import Settings
from worker.adapters.envelope import Decision, Delivery, Handle, Processor, RetryPolicy, Verdict
from worker.logs import Log
from worker.responses import ErrorContext

M = TypeVar("M")
_RECEIVE_BACKOFF = (0.1, 5.0)  # first and largest pause after the broker failed a receive


class SourceUnavailable(Exception):
    """The broker cannot be reached or refused the source's setup (message names the broker)."""


class Source(Protocol):
    async def __aenter__(self) -> Source: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None: ...

    async def serve(self, handle: Handle, *, stop: asyncio.Event) -> None:
        """Feed messages through ``handle`` until ``stop`` is set, then drain and return."""
        ...


class Inbox(Protocol[M]):
    """A broker's side of :func:`pump`."""

    async def receive(self, limit: int) -> Sequence[tuple[M, Delivery]]:
        """Up to ``limit`` messages, waiting at most a short poll interval; ``[]`` if none."""
        ...

    async def settle(self, message: M, delivery: Delivery, decision: Decision) -> None:
        """Reply, then ack, re-queue for a retry, or dead-letter ``message`` per ``decision``."""
        ...

    async def halt(self) -> None:
        """Stop taking messages from the broker (on ``stop``, before in-flight ones drain)."""
        ...


# ---------------------------------------------------------------- the intake loop


class _Pump(Generic[M]):
    def __init__(
        self, inbox: Inbox[M], process: Callable[[Delivery], Awaitable[Decision]], log: Log
    ) -> None:
        self._inbox = inbox
        self._process = process
        self._log = log
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()

    async def run(self, *, stop: asyncio.Event, max_in_flight: int, grace: float) -> None:
        watcher = asyncio.create_task(self._wake_on(stop))
        try:
            async with asyncio.TaskGroup() as group:
                await self._intake(group, stop, max_in_flight)
                await self._drain(grace)
        finally:
            watcher.cancel()
            await asyncio.wait([watcher])

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    async def _intake(self, group: asyncio.TaskGroup, stop: asyncio.Event, limit: int) -> None:
        pause = _RECEIVE_BACKOFF[0]
        while not stop.is_set():
            free = limit - len(self._tasks)
            if free <= 0:  # done-callbacks run on this loop, so no wake-up can slip in between
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                batch = await self._inbox.receive(free)
            except Exception as exc:  # broker trouble: keep the worker alive and try again
                self._log.warning("receiving from the queue failed", error=repr(exc)[:300])
                await wait_or_stop(stop, pause)
                pause = min(_RECEIVE_BACKOFF[1], pause * 2)
                continue
            pause = _RECEIVE_BACKOFF[0]
            if not batch:
                await asyncio.sleep(0)  # a receive that never suspends must not starve the loop
            for message, delivery in batch:
                task = group.create_task(self._one(message, delivery))
                self._tasks.add(task)
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._wake.set()

    async def _one(self, message: M, delivery: Delivery) -> None:
        try:
            decision = await self._process(delivery)
        except Exception as exc:  # a bug of ours: keep the message, in the dead letters
            self._log.exception("processing a queue message failed")
            decision = Decision(Verdict.DEAD, reason=f"WORKER_ERROR: {type(exc).__name__}")
        try:
            await self._inbox.settle(message, delivery, decision)
        except Exception as exc:
            self._log.error(
                "settling a queue message failed; the broker will deliver it again",
                verdict=decision.verdict.value,
                error=repr(exc)[:300],
            )

    async def _drain(self, grace: float) -> None:
        tasks = set(self._tasks)
        self._log.info("stopping intake; waiting for in-flight events", in_flight=len(tasks))
        deadline = asyncio.get_running_loop().time() + grace
        await self._inbox.halt()
        if not tasks:
            return
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        _, pending = await asyncio.wait(tasks, timeout=remaining)
        if pending:
            self._log.warning(
                "in-flight events did not finish within the grace period; "
                "they stay unacknowledged and will be delivered again",
                unfinished=len(pending),
                grace=grace,
            )
            for task in pending:
                task.cancel()


async def pump(
    inbox: Inbox[M],
    process: Callable[[Delivery], Awaitable[Decision]],
    *,
    stop: asyncio.Event,
    max_in_flight: int,
    grace: float,
    log: Log,
) -> None:
    """Receive from ``inbox``, process at most ``max_in_flight`` at once, settle each; drain on
    ``stop`` (``grace`` seconds, then cancel the rest, which stays unsettled)."""
    await _Pump(inbox, process, log).run(stop=stop, max_in_flight=max_in_flight, grace=grace)


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Wait ``seconds``, or less if ``stop`` is set meanwhile."""
    try:
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        pass


async def serve_inbox(
    inbox: Inbox[M],
    handle: Handle,
    *,
    settings: Settings,
    policy: RetryPolicy,
    stop: asyncio.Event,
    log: Log,
) -> None:
    """:func:`pump` with the worker's settings, each delivery through a :class:`Processor`."""
    biot, worker = settings.biot, settings.worker
    process = Processor(
        handle,
        errors=ErrorContext(biot.app_name, biot.environment),
        policy=policy,
        max_body_bytes=worker.max_body_bytes,
        log=log,
    )
    await pump(
        inbox,
        process,
        stop=stop,
        max_in_flight=worker.max_in_flight,
        grace=worker.shutdown_grace,
        log=log,
    )


# ---------------------------------------------------------------- URLs


def split_url(url: str, names: Sequence[str]) -> tuple[str, dict[str, str]]:
    """``url`` without the query parameters in ``names``, and those parameters.

    Other parameters stay on the URL for the broker's client library.
    """
    parts = urlsplit(url)
    ours: dict[str, str] = {}
    theirs: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in names:
            ours[key] = value
        else:
            theirs.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(theirs))), ours


RETRY_PARAMS = ("max_attempts", "retry_delay", "retry_max_delay")


def retry_policy(params: dict[str, str]) -> RetryPolicy:
    """The retry policy named by ``max_attempts``, ``retry_delay``, ``retry_max_delay``."""
    default = RetryPolicy()
    try:
        delay = float(params.get("retry_delay", default.delay))
        return RetryPolicy(
            max_attempts=int(params.get("max_attempts", default.max_attempts)),
            delay=delay,
            max_delay=float(params.get("retry_max_delay", max(default.max_delay, delay))),
        )
    except ValueError as exc:
        raise ValueError(f"bad retry parameter: {exc}") from None


def positive(params: dict[str, str], name: str, default: float) -> float:
    try:
        value = float(params.get(name, default))
    except ValueError:
        raise ValueError(f"{name} must be a number, got {params[name]!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be greater than 0, got {value}")
    return value


def redact_url(url: str) -> str:
    """``url`` with its password replaced, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def open_source(url: str, settings: Settings, log: Log) -> Source:
    """The (not yet entered) source for ``url``; ``ValueError`` for an unknown scheme or bad
    parameter."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("redis", "rediss"):
        from worker.adapters.redis_streams import RedisStreamSource

        return RedisStreamSource(url, settings=settings, log=log)
    if scheme in ("amqp", "amqps"):
        from worker.adapters.rabbitmq import RabbitSource

        return RabbitSource(url, settings=settings, log=log)
    if scheme == "memory":
        from worker.adapters.memory import MemorySource

        return MemorySource.from_url(url, settings=settings, log=log)
    raise ValueError(f"unknown queue URL scheme {scheme!r} (redis://, amqp:// or memory://)")
