"""``biot-worker publish``: put events on a queue (samples of each hook, or captured envelopes),
and optionally wait for the replies.

Samples are envelopes as BioT would send them. They carry a JWT only with ``--emulator URL``: the
token then comes from that emulator's ``/_emulator/user-token`` and passes a worker whose
``BIOT_BASE_URL`` is that emulator. Without it they are unsigned, for a worker running with
``BIOT_SHOULD_VALIDATE_JWT=false``; a worker that validates dead-letters them (``JWT_ERROR``).
``--file`` publishes each line of a JSONL file unchanged (captured Lambda Function URL events or
envelopes, already signed). With ``--wait-replies`` every message names a reply box and each
reply is printed as one JSON line; the exit status is 1 when some did not come in time.

The broker clients (the ``queues`` extra) are imported when a publisher opens, not with this
module: the CLI builds its ``publish`` arguments without them.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import orjson

from config.settings import SettingsError
from worker.adapters.queue import HOOKS, SourceUnavailable, redact_url
from worker.testing.events import sample_envelope

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

_CONCURRENCY = 64  # publishes awaiting their broker's confirmation at once


class Publisher(Protocol):
    async def __aenter__(self) -> Publisher: ...
    async def __aexit__(self, *exc: object) -> None: ...

    async def publish(
        self, body: bytes, *, reply_to: str | None = None, correlation_id: str | None = None
    ) -> None: ...

    async def reply_box(self) -> str:
        """A new name to send replies to, removed when the publisher closes."""
        ...

    async def next_reply(self) -> tuple[str | None, bytes]:
        """The next reply in the box: its correlation id and body. Waits; bound it by a timeout."""
        ...


def open_publisher(url: str) -> Publisher:
    """The (not yet entered) publisher for ``url``; ``ValueError`` for a scheme that is not a
    broker's, :class:`SettingsError` when the ``queues`` extra is missing."""
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("redis", "rediss", "amqp", "amqps"):
        raise ValueError(f"publish needs a broker URL (redis:// or amqp://), not {scheme!r}")
    try:
        return RedisPublisher(url) if scheme.startswith("redis") else RabbitPublisher(url)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in ("redis", "aio_pika", "aiormq", "pamqp"):
            raise
        extra = "pip install 'biot-worker[queues]'"
        raise SettingsError([f"--source: {scheme}:// needs the queues extra: {extra}"]) from None


async def publish_all(
    publisher: Publisher, bodies: Sequence[bytes], reply_to: str | None = None
) -> list[str]:
    """Publish ``bodies`` (bounded concurrency); their correlation ids, in order."""
    ids = [uuid.uuid4().hex for _ in bodies]
    gate = asyncio.Semaphore(_CONCURRENCY)

    async def one(body: bytes, correlation_id: str) -> None:
        async with gate:
            await publisher.publish(body, reply_to=reply_to, correlation_id=correlation_id)

    async with asyncio.TaskGroup() as group:
        for body, correlation_id in zip(bodies, ids, strict=True):
            group.create_task(one(body, correlation_id))
    return ids


class RedisPublisher:
    """Adds entries to the stream of a source URL; replies come back on a stream of its own."""

    def __init__(self, url: str) -> None:
        from worker.adapters.redis_streams import RedisOptions

        self.options, _ = RedisOptions.parse(url)
        self._display = redact_url(url)
        self._box: str | None = None
        self._last = b"0"
        self._replies: deque[tuple[str | None, bytes]] = deque()

    async def __aenter__(self) -> RedisPublisher:
        from redis.exceptions import RedisError

        from worker.adapters.redis_streams import connect

        self._redis: aioredis.Redis = connect(self.options.url, 16)
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            await self._redis.aclose(close_connection_pool=True)
            raise SourceUnavailable(f"{self._display}: {exc}") from exc
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._box is not None:
            await self._redis.delete(self._box)
        await self._redis.aclose(close_connection_pool=True)

    async def publish(
        self, body: bytes, *, reply_to: str | None = None, correlation_id: str | None = None
    ) -> None:
        fields = {b"envelope": body}
        if reply_to is not None:
            fields[b"reply_to"] = reply_to.encode()
        if correlation_id is not None:
            fields[b"correlation_id"] = correlation_id.encode()
        await self._redis.xadd(self.options.stream, fields)  # type: ignore[arg-type]

    async def reply_box(self) -> str:
        self._box = f"{self.options.stream}:replies:{uuid.uuid4().hex}"
        return self._box

    async def next_reply(self) -> tuple[str | None, bytes]:
        from worker.adapters.redis_streams import stream_entries

        assert self._box is not None, "call reply_box() first"
        while not self._replies:
            answer = await self._redis.xread({self._box: self._last}, count=100, block=250)
            for entry in stream_entries(answer):
                self._last = entry.id
                correlation = entry.fields.get(b"correlation_id")
                response = entry.fields.get(b"response", b"")
                self._replies.append((correlation.decode() if correlation else None, response))
        return self._replies.popleft()


class RabbitPublisher:
    """Publishes to the queue of a source URL; replies come back on an exclusive queue."""

    def __init__(self, url: str) -> None:
        from worker.adapters.rabbitmq import RabbitOptions

        self.options, _ = RabbitOptions.parse(url)
        self._display = redact_url(url)
        self._replies: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue(maxsize=10_000)

    async def __aenter__(self) -> RabbitPublisher:
        from aio_pika.exceptions import AMQPError

        from worker.adapters.rabbitmq import connect, declare

        self._connection: AbstractRobustConnection = await connect(self.options.url, self._display)
        try:
            self._channel: AbstractChannel = await self._connection.channel()
            await declare(self._channel, self.options)
        except AMQPError as exc:
            await self._connection.close()
            raise SourceUnavailable(f"{self._display}: {exc!r}") from exc
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._connection.close()

    async def publish(
        self, body: bytes, *, reply_to: str | None = None, correlation_id: str | None = None
    ) -> None:
        from worker.adapters.rabbitmq import envelope_message

        message = envelope_message(body, reply_to=reply_to, correlation_id=correlation_id)
        await self._channel.default_exchange.publish(message, routing_key=self.options.queue)

    async def reply_box(self) -> str:
        queue = await self._channel.declare_queue("", exclusive=True, auto_delete=True)
        await queue.consume(self._replies.put, no_ack=True)
        return queue.name

    async def next_reply(self) -> tuple[str | None, bytes]:
        message = await self._replies.get()
        return message.correlation_id, message.body


# ---------------------------------------------------------------- the command


async def emulator_token(emulator_url: str) -> str:
    """A token signed by the emulator at ``emulator_url``, with both hook scopes, for an hour."""
    url = emulator_url.rstrip("/") + "/_emulator/user-token"
    payload = {"scopes": ["ACTION_NOTIFICATION", "PLUGIN_INTERCEPTOR"], "lifetime": 3600}
    async with aiohttp.ClientSession() as http, http.post(url, json=payload) as response:
        response.raise_for_status()
        return str((await response.json())["accessToken"])


def read_envelopes(path: Path) -> list[bytes]:
    """Each non-blank line of a JSONL file, unchanged; ``ValueError`` naming a bad line."""
    bodies = []
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON: {exc.msg}") from None
        if not isinstance(value, dict):
            raise ValueError(f"{path}:{number}: not a JSON object")
        bodies.append(line)
    return bodies


async def publish_main(args: argparse.Namespace) -> int:
    try:
        publisher = open_publisher(args.source)
        bodies = await _bodies(args)
    except SettingsError as exc:
        sys.stderr.write(f"biot-worker publish: {exc.problems[0]}\n")
        return 2
    except (ValueError, OSError, aiohttp.ClientError) as exc:
        sys.stderr.write(f"biot-worker publish: {exc}\n")
        return 2
    try:
        async with publisher:
            return await _publish(publisher, bodies, args)
    except SourceUnavailable as exc:
        sys.stderr.write(f"biot-worker publish: cannot reach the queue: {exc}\n")
        return 1


async def _bodies(args: argparse.Namespace) -> list[bytes]:
    if args.file is not None:
        return read_envelopes(args.file)
    if args.count < 1:
        raise ValueError("--count must be 1 or more")
    hooks = HOOKS if "all" in (args.hook or []) else tuple(args.hook or ["NOTIFICATION"])
    token = await emulator_token(args.emulator) if args.emulator else None
    return [orjson.dumps(sample_envelope(h, token)) for h in hooks for _ in range(args.count)]


async def _publish(publisher: Publisher, bodies: list[bytes], args: argparse.Namespace) -> int:
    box = await publisher.reply_box() if args.wait_replies else None
    ids = await publish_all(publisher, bodies, box)
    _out({"published": len(ids), "source": redact_url(args.source)})
    if box is None:
        return 0
    waiting = set(ids)
    try:
        async with asyncio.timeout(args.timeout):
            while waiting:
                correlation_id, reply = await publisher.next_reply()
                waiting.discard(correlation_id or "")
                _out({"correlationId": correlation_id, "reply": orjson.loads(reply)})
    except TimeoutError:
        sys.stderr.write(f"biot-worker publish: {len(waiting)} replies did not come in time\n")
        return 1
    return 0


def _out(record: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(record).decode() + "\n")
    sys.stdout.flush()
