"""One harness per broker (memory, real Redis, real RabbitMQ) for the shared queue tests.

A harness owns a fresh stream or queue (a uuid), publishes to it, reads its replies, dead
letters and backlog the broker's own way, and removes everything named after it in
:meth:`cleanup` (fixtures call it after the test, failed or not; :func:`cleanup_all` cleans
every harness even when one cleanup fails).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, suppress
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlencode

import aio_pika
import redis.asyncio as aioredis

from config.settings import Settings
from tests.queue_helpers import (
    RABBIT,
    RABBIT_URL,
    REDIS,
    FakeLog,
    Handle,
    queue_settings,
    require_broker,
    serving,
)
from worker.adapters import open_source
from worker.adapters.memory import DeadLetter, MemorySource
from worker.adapters.queue import Source, retry_policy
from worker.adapters.rabbitmq import RabbitSource, retry_delays_ms
from worker.testing.publish import RabbitPublisher, RedisPublisher


class Harness(Protocol):
    name: str

    def source(self, settings: Settings, log: FakeLog) -> Source: ...
    async def publish(
        self, body: bytes, *, reply_to: str | None = None, correlation_id: str | None = None
    ) -> None: ...
    async def reply_box(self) -> str: ...
    async def next_reply(self, box: str) -> tuple[str | None, bytes]: ...
    async def dead_letters(self) -> list[DeadLetter]: ...
    async def backlog(self) -> int: ...
    async def cleanup(self) -> None: ...


@dataclass
class MemoryHarness:
    params: dict[str, str]
    name: str = "memory"
    _source: MemorySource | None = None

    def source(self, settings: Settings, log: FakeLog) -> Source:
        if self._source is None:
            self._source = MemorySource.from_url("memory://?" + urlencode(self.params), log=log)
        return self._source

    @property
    def memory(self) -> MemorySource:
        assert self._source is not None, "make the source first"
        return self._source

    async def publish(
        self, body: bytes, *, reply_to: str | None = None, correlation_id: str | None = None
    ) -> None:
        await self.memory.publish(body, reply_to=reply_to, correlation_id=correlation_id)

    async def reply_box(self) -> str:
        return f"box-{uuid.uuid4().hex}"

    async def next_reply(self, box: str) -> tuple[str | None, bytes]:
        reply = await self.memory.next_reply(box)
        return reply.correlation_id, reply.body

    async def dead_letters(self) -> list[DeadLetter]:
        return list(self.memory.dead_letters)

    async def backlog(self) -> int:
        return self.memory.backlog

    async def cleanup(self) -> None:
        return None


@dataclass
class RedisHarness:
    params: dict[str, str]
    name: str = "redis"
    stream: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex}")

    def __post_init__(self) -> None:
        self.redis = aioredis.Redis(host=REDIS[0], port=REDIS[1])
        self.params = {"stream": self.stream, "consumer": "c-" + self.stream, **self.params}
        self.url = f"redis://{REDIS[0]}:{REDIS[1]}/0?" + urlencode(self.params)
        self._publisher = RedisPublisher(self.url)
        self._opened = False

    def source(self, settings: Settings, log: FakeLog) -> Source:
        return open_source(self.url, settings, log)

    async def publish(
        self, body: bytes, *, reply_to: str | None = None, correlation_id: str | None = None
    ) -> None:
        if not self._opened:
            await self._publisher.__aenter__()
            self._opened = True
        await self._publisher.publish(body, reply_to=reply_to, correlation_id=correlation_id)

    async def reply_box(self) -> str:
        return f"{self.stream}:box:{uuid.uuid4().hex}"

    async def next_reply(self, box: str) -> tuple[str | None, bytes]:
        while True:
            reply: Any = await self.redis.xread({box: "0"}, count=1, block=100)
            if reply:
                entry_id, fields = reply[0][1][0]
                await self.redis.xdel(box, entry_id)
                correlation = fields.get(b"correlation_id")
                return (correlation.decode() if correlation else None), fields[b"response"]

    async def dead_letters(self) -> list[DeadLetter]:
        entries: Any = await self.redis.xrange(f"{self.stream}:dead")
        return [
            DeadLetter(
                f.get(b"envelope", b""),
                f[b"reason"].decode(),
                int(f[b"attempts"]),
                int(f[b"status"]) if f.get(b"status") else None,
            )
            for _, f in entries
        ]

    async def backlog(self) -> int:
        length = await self.redis.xlen(self.stream)
        pending = (await self.redis.xpending(self.stream, "biot-worker"))["pending"]
        return int(length) - int(pending) + int(await self.redis.zcard(f"{self.stream}:retry"))

    async def cleanup(self) -> None:
        try:
            if self._opened:
                await self._publisher.__aexit__()
        finally:
            keys = [key async for key in self.redis.scan_iter(match=f"{self.stream}*")]
            if keys:
                await self.redis.delete(*keys)
            await self.redis.aclose()


@dataclass
class RabbitHarness:
    params: dict[str, str]
    name: str = "rabbitmq"
    queue: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex}")

    def __post_init__(self) -> None:
        self.params = {"queue": self.queue, **self.params}
        self.url = RABBIT_URL + "?" + urlencode(self.params)
        self._publisher = RabbitPublisher(self.url)
        self._opened = False
        self._dead: list[DeadLetter] = []
        self._boxes: dict[str, asyncio.Queue[aio_pika.abc.AbstractIncomingMessage]] = {}
        policy = retry_policy(dict(self.params))
        self._retry_queues = [f"{self.queue}.retry.{ms}ms" for ms in retry_delays_ms(policy)]

    def source(self, settings: Settings, log: FakeLog) -> Source:
        return RabbitSource(self.url, settings=settings, log=log)

    async def _open(self) -> aio_pika.abc.AbstractChannel:
        if not self._opened:
            await self._publisher.__aenter__()
            self._opened = True
        return self._publisher._channel

    async def publish(
        self, body: bytes, *, reply_to: str | None = None, correlation_id: str | None = None
    ) -> None:
        await self._open()
        await self._publisher.publish(body, reply_to=reply_to, correlation_id=correlation_id)

    async def reply_box(self) -> str:
        channel = await self._open()
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        box: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue(maxsize=100)
        await queue.consume(box.put, no_ack=True)
        self._boxes[queue.name] = box
        return queue.name

    async def next_reply(self, box: str) -> tuple[str | None, bytes]:
        reply = await self._boxes[box].get()
        return reply.correlation_id, reply.body

    async def dead_letters(self) -> list[DeadLetter]:
        channel = await self._open()
        queue = await channel.declare_queue(f"{self.queue}.dead", durable=True)
        while (got := await queue.get(no_ack=True, fail=False)) is not None:
            headers: dict[str, Any] = dict(got.headers or {})
            status = headers.get("x-biot-status")
            reason = headers.get("x-biot-reason", "")
            self._dead.append(
                DeadLetter(
                    got.body,
                    reason.decode() if isinstance(reason, bytes) else str(reason),
                    int(headers.get("x-biot-attempts", 0)),
                    None if status is None else int(status),
                )
            )
        return list(self._dead)

    async def ready(self, name: str) -> int:
        """Messages ready in queue ``name`` (delivered, unacknowledged ones not counted)."""
        # Not the robust channel: its passive declare answers from a cache.
        channel = await (await self._open()).get_underlay_channel()
        declared = await channel.queue_declare(name, passive=True)
        return declared.message_count or 0

    async def backlog(self) -> int:
        return sum([await self.ready(name) for name in [self.queue, *self._retry_queues]])

    async def cleanup(self) -> None:
        # A fresh connection: the publisher's channel may be closed by what the test did.
        connection = await aio_pika.connect(RABBIT_URL)
        async with connection:
            for name in [self.queue, f"{self.queue}.dead", *self._retry_queues]:
                channel = await connection.channel()  # a failed delete closes its channel
                with suppress(aio_pika.exceptions.AMQPError):
                    await channel.queue_delete(name)
            channel = await connection.channel()
            with suppress(aio_pika.exceptions.AMQPError):
                await channel.exchange_delete(f"{self.queue}.dlx")
        if self._opened:
            await self._publisher.__aexit__()


def serve(
    harness: Harness, handle: Handle, settings: Settings | None = None, log: FakeLog | None = None
) -> AbstractAsyncContextManager[asyncio.Event]:
    """A new source of ``harness`` consumed through ``handle`` (see :func:`serving`)."""
    settings, log = settings or queue_settings(), log or FakeLog()
    return serving(harness.source(settings, log), handle, settings, log)


async def cleanup_all(harnesses: Iterable[Harness]) -> None:
    """Clean up every harness; a cleanup that fails does not stop the others."""
    async with AsyncExitStack() as stack:
        for harness in harnesses:
            stack.push_async_callback(harness.cleanup)


def make_harness(kind: str, **params: str) -> Harness:
    if kind == "memory":
        return MemoryHarness(params)
    if kind == "redis":
        require_broker("Redis", REDIS)
        return RedisHarness(params)
    require_broker("RabbitMQ", RABBIT)
    return RabbitHarness(params)
