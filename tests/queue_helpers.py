"""What the queue tests share: broker checks, bounded waits, a fake log, a scripted handle.

Tests talk to the real brokers on loopback (Redis 127.0.0.1:6379, RabbitMQ 127.0.0.1:5672,
guest/guest). When one is down, its tests skip with the reason, except under ``CI=true``, where
they fail. Every test uses its own stream or queue (a uuid) and removes it afterwards, in a
fixture, so also when it fails.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from config.settings import Settings
from tests.conftest import settings_for
from worker.adapters.queue import Refuse, Source, consume
from worker.dispatch import Outcome
from worker.errors import AuthError, TransientApiError, WorkerError
from worker.events import Event
from worker.logs import Log
from worker.responses import Response
from worker.tracing import current_trace_id

Handle = Callable[[Event], Awaitable[Outcome]]
REDIS = ("127.0.0.1", 6379)
RABBIT = ("127.0.0.1", 5672)
RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/"
WAIT = 15.0  # the longest any condition in these tests may take


def require_broker(name: str, address: tuple[str, int]) -> None:
    """Skip (fail under ``CI=true``) unless ``name`` accepts connections at ``address``."""
    try:
        socket.create_connection(address, timeout=1.0).close()
    except OSError as exc:
        reason = f"{name} is not reachable at {address[0]}:{address[1]} ({exc})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must run the queue tests against a real broker")
        pytest.skip(reason)


async def eventually(check: Callable[[], Awaitable[bool]], what: str, limit: float = WAIT) -> None:
    """Poll ``check`` every 10 ms until it is true; fail naming ``what`` after ``limit`` s."""
    try:
        async with asyncio.timeout(limit):
            for _ in range(int(limit / 0.01) + 1):
                if await check():
                    return
                await asyncio.sleep(0.01)
    except TimeoutError:
        pass
    raise AssertionError(f"timed out after {limit} s waiting for {what}")


class FakeLog:
    """A :class:`~worker.logs.Log` keeping ``(level, message, fields)``, and in ``traced`` each
    line's ``(message, traceId)`` as a real log would stamp it."""

    def __init__(self, records: list[tuple[str, str, dict[str, Any]]] | None = None) -> None:
        self.records = records if records is not None else []
        self.traced: list[tuple[str, str | None]] = []

    def _add(self, level: str, message: str, fields: dict[str, Any]) -> None:
        self.records.append((level, message, fields))
        self.traced.append((message, current_trace_id()))

    def debug(self, message: str, /, **fields: Any) -> None:
        self._add("DEBUG", message, fields)

    def info(self, message: str, /, **fields: Any) -> None:
        self._add("INFO", message, fields)

    def warning(self, message: str, /, **fields: Any) -> None:
        self._add("WARN", message, fields)

    def error(self, message: str, /, **fields: Any) -> None:
        self._add("ERROR", message, fields)

    def exception(self, message: str, /, **fields: Any) -> None:
        self._add("ERROR", message, fields)

    def bind(self, **fields: Any) -> FakeLog:
        return self

    def find(self, message: str) -> list[dict[str, Any]]:
        return [fields for _, m, fields in self.records if m == message]


# ---------------------------------------------------------------- a scripted dispatcher


def queue_settings(**env: str) -> Settings:
    return settings_for(**{"WORKER_SHUTDOWN_GRACE": "5", **env})


def message(key: str, **behaviour: Any) -> bytes:
    """An envelope whose body tells :class:`ScriptedHandle` what to do."""
    body = {"key": key, **behaviour}
    return orjson.dumps({"headers": {"hooktype": "NONSPECIFIC"}, "body": body})


@dataclass
class Call:
    key: str
    attempt: int
    at: float
    event: Event


@dataclass
class ScriptedHandle:
    """Stands in for ``Dispatcher.handle``. Body keys: ``transient: n`` fails the first ``n``
    attempts transiently; ``permanent: true`` fails with a JWT error; ``block: true`` waits for
    :meth:`release`. Every call is recorded; :meth:`wait_calls` waits for a count."""

    calls: list[Call] = field(default_factory=list)
    running: int = 0
    most_running: int = 0
    _released: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, event: Event) -> Outcome:
        body = orjson.loads(event.body)
        attempt = event.attempt
        self.calls.append(Call(body["key"], attempt, asyncio.get_running_loop().time(), event))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        self._changed.set()
        try:
            if body.get("block"):
                await self._released.wait()
            return _outcome(body, attempt)
        finally:
            self.running -= 1
            self._changed.set()

    def release(self) -> None:
        self._released.set()

    def keys(self) -> list[str]:
        return [call.key for call in self.calls]

    async def wait_calls(self, count: int, *, running: int | None = None) -> None:
        async with asyncio.timeout(WAIT):
            while len(self.calls) < count or (running is not None and self.running < running):
                self._changed.clear()
                await self._changed.wait()


def _outcome(body: dict[str, Any], attempt: int) -> Outcome:
    error: WorkerError | None = None
    if attempt <= int(body.get("transient", 0)):
        error = TransientApiError("BioT answered 503", status=503)
    elif body.get("permanent"):
        error = AuthError("the event carries no JWT")
    if error is None:
        return Outcome(Response(200, orjson.dumps({"key": body["key"]})))
    payload = {"code": error.code, "message": error.message}
    return Outcome(Response(error.status, orjson.dumps(payload)), error)


@asynccontextmanager
async def serving(
    source: Source,
    handle: Handle,
    settings: Settings | None = None,
    log: Log | None = None,
    refuse: Refuse | None = None,
) -> AsyncIterator[asyncio.Event]:
    """``source`` entered and consumed in a task (with ``settings``, default
    :func:`queue_settings`, logging to ``log``, messages that never became events answered by
    ``refuse``); leaving sets ``stop`` and waits (bounded) for the drain, then closes the
    source."""
    stop = asyncio.Event()
    settings = settings or queue_settings()
    async with source:
        task = asyncio.create_task(
            consume(
                source, handle, settings=settings, stop=stop, log=log or FakeLog(), refuse=refuse
            )
        )
        try:
            yield stop
        finally:
            stop.set()
            done, _ = await asyncio.wait([task], timeout=WAIT)
            if not done:  # never leave the consumer running past the test
                task.cancel()
                await asyncio.wait([task])
                raise AssertionError(f"the source did not drain within {WAIT} s")
            await task
