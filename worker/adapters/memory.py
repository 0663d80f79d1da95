"""The in-memory source: a bounded queue inside the process, for tests and for embedding.

It keeps the brokers' contract (ack after the outcome, retries with backoff and an attempt
count, dead letters with their reason, replies to ``reply_to``), and nothing survives the
process. Everything is bounded: :meth:`MemorySource.publish` waits while ``capacity`` messages
are unsettled (published, retrying or in flight), and only the last ``capacity`` dead letters and
the last ``capacity`` replies of each of the last ``capacity`` ``reply_to`` names are kept.

::

    source = MemorySource(log=app.log)
    async with source:
        await source.publish({"headers": {...}, "body": {...}}, reply_to="me", correlation_id="1")
        serving = asyncio.create_task(
            consume(source, app.dispatcher.handle, settings=settings, stop=stop, log=app.log)
        )
        async with asyncio.timeout(5):
            reply = await source.next_reply("me")

URL form (for :func:`~worker.adapters.open_source`):
``memory://?capacity=1024&max_attempts=5&retry_delay=1&retry_max_delay=60``.

Observability (:class:`~worker.adapters.queue.Observable`): ``info`` is
``QueueInfo("memory", "memory")``, :meth:`MemorySource.lag` the messages ready and not taken. A
message taken and not settled when the source closed is delivered again with ``redelivered``
set (and its attempt counted up); a retry coming back is not a redelivery.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from config.settings import Settings
from worker.adapters.queue import (
    RETRY_PARAMS,
    Decision,
    Delivery,
    QueueInfo,
    RetryPolicy,
    Verdict,
    positive,
    retry_policy,
    split_url,
)
from worker.logs import Log

_POLL = 0.25  # longest wait of one receive, so the intake loop sees ``stop`` promptly


@dataclass(frozen=True, slots=True)
class DeadLetter:
    body: bytes
    reason: str
    attempts: int
    status: int | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    correlation_id: str | None
    body: bytes


@dataclass(slots=True, eq=False)
class _Message:
    body: bytes
    reply_to: str | None
    correlation_id: str | None
    attempt: int = 1
    redelivered: bool = False  # taken before and not settled


class MemorySource:
    """A :class:`~worker.adapters.queue.Source` inside the process (see the module's doc)."""

    def __init__(
        self,
        *,
        log: Log,
        policy: RetryPolicy | None = None,
        capacity: int = 1024,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be 1 or more, got {capacity}")
        self._log = log
        self.policy = policy or RetryPolicy()
        self.info = QueueInfo("memory", "memory")
        self.capacity = capacity
        self._slots = asyncio.Semaphore(capacity)
        self._ready: deque[_Message] = deque()
        self._delayed: list[tuple[float, int, _Message]] = []
        self._order = itertools.count()
        self._taken: set[_Message] = set()
        self._changed = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._unsettled = 0
        self.dead_letters: deque[DeadLetter] = deque(maxlen=capacity)
        self._replies: OrderedDict[str, deque[Reply]] = OrderedDict()
        self._reply_ready = asyncio.Event()

    @classmethod
    def from_url(cls, url: str, *, log: Log) -> MemorySource:
        _, params = split_url(url, (*RETRY_PARAMS, "capacity"))
        capacity = int(positive(params, "capacity", 1024))
        return cls(log=log, policy=retry_policy(params), capacity=capacity)

    async def __aenter__(self) -> MemorySource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        # What was taken and never settled (cancelled in flight) is delivered again, as a broker
        # does when its consumer goes away; it can be entered again later.
        for message in self._taken:
            message.attempt += 1
            message.redelivered = True
            self._ready.appendleft(message)
        self._taken.clear()

    # ------------------------------------------------------------ the producer's side

    async def publish(
        self, envelope: Any, *, reply_to: str | None = None, correlation_id: str | None = None
    ) -> None:
        """Queue ``envelope`` (bytes as they are, anything else as JSON); waits while full."""
        body = envelope if isinstance(envelope, bytes) else orjson.dumps(envelope)
        await self._slots.acquire()
        self._unsettled += 1
        self._idle.clear()
        self._ready.append(_Message(body, reply_to, correlation_id))
        self._changed.set()

    @property
    def unsettled(self) -> int:
        """Messages published and not yet acknowledged or dead-lettered."""
        return self._unsettled

    @property
    def backlog(self) -> int:
        """Messages waiting to be delivered (ready or waiting for their retry)."""
        return len(self._ready) + len(self._delayed)

    async def settled(self) -> None:
        """Wait until every published message is acknowledged or dead-lettered."""
        await self._idle.wait()

    async def next_reply(self, reply_to: str) -> Reply:
        """The oldest unread reply sent to ``reply_to``; waits (bound it with a timeout)."""
        while not self._replies.get(reply_to):
            self._reply_ready.clear()
            await self._reply_ready.wait()
        return self._replies[reply_to].popleft()

    # ------------------------------------------------------------ the source

    async def receive(self, limit: int) -> Sequence[Delivery]:
        self._promote()
        if not self._ready:
            self._changed.clear()
            wait = _POLL
            if self._delayed:
                wait = min(wait, max(0.0, self._delayed[0][0] - _now()))
            try:
                async with asyncio.timeout(wait):
                    await self._changed.wait()
            except TimeoutError:
                pass
            self._promote()
        batch: list[Delivery] = []
        while self._ready and len(batch) < limit:
            message = self._ready.popleft()
            self._taken.add(message)
            batch.append(
                Delivery(
                    message.body,
                    message.attempt,
                    message.reply_to,
                    message.correlation_id,
                    message,
                    redelivered=message.redelivered,
                )
            )
        return batch

    async def halt(self) -> None:
        return None

    async def lag(self) -> int | None:
        """Messages ready and not taken (retries still waiting for their time not counted)."""
        return len(self._ready)

    async def settle(self, delivery: Delivery, decision: Decision) -> None:
        message: _Message = delivery.message
        self._taken.discard(message)
        if decision.reply is not None and delivery.reply_to:
            self._reply(delivery.reply_to, Reply(delivery.correlation_id, decision.reply))
        if decision.verdict is Verdict.RETRY:
            message.attempt = delivery.attempt + 1
            message.redelivered = False  # settled: it comes back as a retry
            if decision.envelope is not None:
                message.body = decision.envelope
            due = _now() + decision.delay
            heapq.heappush(self._delayed, (due, next(self._order), message))
            return
        if decision.verdict is Verdict.DEAD:
            if len(self.dead_letters) == self.dead_letters.maxlen:
                self._log.warning("memory dead letters full; dropping the oldest")
            body = message.body if decision.envelope is None else decision.envelope
            self.dead_letters.append(
                DeadLetter(body, decision.reason, delivery.attempt, decision.status)
            )
        self._release()

    # ------------------------------------------------------------ internals

    def _promote(self) -> None:
        now = _now()
        while self._delayed and self._delayed[0][0] <= now:
            self._ready.append(heapq.heappop(self._delayed)[2])

    def _release(self) -> None:
        self._unsettled -= 1
        self._slots.release()
        if self._unsettled == 0:
            self._idle.set()

    def _reply(self, name: str, reply: Reply) -> None:
        box = self._replies.get(name)
        if box is None:
            if len(self._replies) >= self.capacity:
                self._replies.popitem(last=False)
            box = self._replies[name] = deque(maxlen=self.capacity)
        box.append(reply)
        self._reply_ready.set()


def _now() -> float:
    return asyncio.get_running_loop().time()


def source_from_url(url: str, *, settings: Settings, log: Log) -> MemorySource:
    """The source ``memory://?...`` names (``settings`` are the consumer's business)."""
    return MemorySource.from_url(url, log=log)
