"""Redis Streams source (redis-py asyncio): a consumer group, ack after the outcome, retries,
dead letters, and reclaim of a crashed consumer's entries.

URL: ``redis://[:PASSWORD@]HOST[:PORT][/DB]?stream=biot-events`` plus, optional, ``group``
(``biot-worker``), ``consumer`` (``HOSTNAME-PID``), ``dead_letter`` (``STREAM:dead``),
``claim_idle`` (60 s), ``max_attempts`` (5), ``retry_delay`` (1 s, doubling), ``retry_max_delay``
(60 s). ``rediss://`` for TLS; other parameters go to redis-py.

Entry fields: ``envelope`` (required), ``reply_to`` (a stream), ``correlation_id``, ``attempt``
(1 when absent). Settling is one MULTI/EXEC: the reply (``XADD reply_to {correlation_id,
response}``, expiring after an hour), then ``XACK`` + ``XDEL`` and, for a retry, the entry with
``attempt + 1`` and ``last_error`` into the sorted set ``STREAM:retry`` (due time as score; a Lua
script moves due entries back), for a dead letter an ``XADD`` to the dead-letter stream adding
``reason``, ``attempts``, ``status``, ``source_id``, ``consumer``, ``dead_at`` (ms). Either
carries the decision's ``envelope``, when it has one, in place of the entry's.

A dead consumer's pending entries are taken over with ``XAUTOCLAIM`` once idle ``claim_idle``
seconds (keep it above the longest handler deadline, or a slow event is handled twice); each
redelivery counts as an attempt, so an entry that keeps killing consumers ends dead-lettered.
One consumer group per stream (settled entries are deleted); a single Redis node.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from config.settings import Settings
from worker.adapters.queue import (
    RETRY_PARAMS,
    Decision,
    Delivery,
    SourceUnavailable,
    Verdict,
    positive,
    redact_url,
    retry_policy,
    split_url,
)
from worker.logs import Log

PARAMS = ("stream", "group", "consumer", "dead_letter", "claim_idle", *RETRY_PARAMS)
REPLY_MAXLEN = 10_000
REPLY_TTL = 3600
_POLL_MS = 250  # longest XREADGROUP block, so the intake loop sees ``stop`` promptly
_MOVE_EVERY = 0.05  # seconds between runs of the retry mover (retry timing resolution)

# KEYS: retry set, stream. ARGV: now (ms), limit. Members are netstrings of field, value, ...
_MOVE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  local fields, i = {}, 1
  while i <= #member do
    local colon = string.find(member, ':', i, true)
    local size = tonumber(string.sub(member, i, colon - 1))
    fields[#fields + 1] = string.sub(member, colon + 1, colon + size)
    i = colon + size + 1
  end
  redis.call('XADD', KEYS[2], '*', unpack(fields))
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""


@dataclass(frozen=True, slots=True)
class RedisOptions:
    url: str  # for redis-py, without our parameters
    stream: str
    group: str
    consumer: str
    dead_letter: str
    claim_idle: float

    @property
    def retry_key(self) -> str:
        return f"{self.stream}:retry"

    @classmethod
    def parse(cls, url: str) -> tuple[RedisOptions, dict[str, str]]:
        base, params = split_url(url, PARAMS)
        stream = params.get("stream") or "biot-events"
        options = cls(
            url=base,
            stream=stream,
            group=params.get("group") or "biot-worker",
            consumer=params.get("consumer") or f"{socket.gethostname()}-{os.getpid()}",
            dead_letter=params.get("dead_letter") or f"{stream}:dead",
            claim_idle=positive(params, "claim_idle", 60.0),
        )
        return options, params


@dataclass(frozen=True, slots=True)
class Entry:
    id: bytes
    fields: dict[bytes, bytes]


def connect(url: str, max_connections: int) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections)
    return aioredis.Redis(connection_pool=pool)


async def ensure_group(client: aioredis.Redis, stream: str, group: str) -> None:
    """Create ``group`` on ``stream`` (and the stream), reading from its first entry."""
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class RedisStreamSource:
    """A :class:`~worker.adapters.queue.Source` on a Redis stream (see the module's doc)."""

    def __init__(self, url: str, *, settings: Settings, log: Log) -> None:
        self.options, params = RedisOptions.parse(url)
        self.policy = retry_policy(params)
        self._settings = settings
        self._log = log
        self._display = redact_url(url)
        self._client: aioredis.Redis | None = None

    @property
    def _redis(self) -> aioredis.Redis:
        assert self._client is not None, "enter the source first"
        return self._client

    async def __aenter__(self) -> RedisStreamSource:
        o = self.options
        self._client = connect(o.url, self._settings.worker.max_in_flight + 4)
        try:
            await self._redis.ping()
            await ensure_group(self._redis, o.stream, o.group)
        except (RedisError, OSError) as exc:
            await self.__aexit__()
            raise SourceUnavailable(f"{self._display}: {exc}") from exc
        self._move_due = self._redis.register_script(_MOVE_DUE)
        self._next_move = self._next_claim = 0.0
        self._claim_cursor = b"0-0"
        self._recover_from: bytes | None = b"0"  # our own pending entries from a previous life
        self._in_flight: set[bytes] = set()
        self._warn_about_claim_idle()
        return self

    async def __aexit__(self, *exc: object) -> None:
        client, self._client = self._client, None
        if client is not None:
            await self._leave(client)
            await client.aclose(close_connection_pool=True)

    def _warn_about_claim_idle(self) -> None:
        worker = self._settings.worker
        longest = max(worker.deadline_notification, worker.deadline_nonspecific)
        if self.options.claim_idle <= longest:
            self._log.warning(
                "claim_idle is not longer than the longest handler deadline; "
                "a slow event may be handled twice",
                claim_idle=self.options.claim_idle,
                deadline=longest,
            )

    async def receive(self, limit: int) -> Sequence[Delivery]:
        now = time.monotonic()
        if now >= self._next_move:
            self._next_move = now + _MOVE_EVERY
            await self._move_due(keys=[self.options.retry_key, self.options.stream],
                                 args=[_ms(), limit])  # fmt: skip
        if self._recover_from is not None:
            return await self._recover(limit)
        batch: list[Delivery] = []
        if now >= self._next_claim:
            self._next_claim = now + min(self.options.claim_idle / 2, 5.0)
            batch = await self._reclaim(limit)
        if len(batch) < limit:
            block = None if batch else _POLL_MS
            fresh = await self._read(b">", limit - len(batch), block)
            batch += self._track([delivery_of(entry) for entry in fresh])
        return batch

    async def settle(self, delivery: Delivery, decision: Decision) -> None:
        o, entry = self.options, delivery.message
        assert isinstance(entry, Entry)
        pipe = self._redis.pipeline(transaction=True)
        if decision.reply is not None and delivery.reply_to:
            reply: dict[Any, Any] = {b"response": decision.reply}
            if delivery.correlation_id is not None:
                reply[b"correlation_id"] = delivery.correlation_id.encode()
            pipe.xadd(delivery.reply_to, reply, maxlen=REPLY_MAXLEN, approximate=True)
            pipe.expire(delivery.reply_to, REPLY_TTL)
        if decision.verdict is Verdict.RETRY:
            fields = {**entry.fields, b"attempt": b"%d" % (delivery.attempt + 1)}
            if decision.envelope is not None:
                fields[b"envelope"] = decision.envelope
            fields[b"last_error"] = decision.reason.encode()
            due = _ms() + round(decision.delay * 1000)
            pipe.zadd(o.retry_key, {netstrings(fields, retried_from=entry.id): due})
        elif decision.verdict is Verdict.DEAD:
            pipe.xadd(o.dead_letter, self._dead_fields(entry, delivery, decision))
        pipe.xack(o.stream, o.group, entry.id)
        pipe.xdel(o.stream, entry.id)
        try:
            results = await pipe.execute(raise_on_error=False)
        finally:
            self._in_flight.discard(entry.id)
        failed = [repr(r)[:200] for r in results if isinstance(r, Exception)]
        if failed:
            self._log.error("part of settling a stream entry failed", errors=failed)

    async def halt(self) -> None:
        return None  # nothing was fetched ahead: XREADGROUP asks for free slots only

    async def _leave(self, client: aioredis.Redis) -> None:
        """Remove this consumer from the group when it holds no pending entry."""
        o = self.options
        try:
            mine = await client.xpending_range(o.stream, o.group, "-", "+", 1, o.consumer)
            if not mine:
                await client.xgroup_delconsumer(o.stream, o.group, o.consumer)
        except (RedisError, OSError) as exc:
            self._log.warning("could not leave the consumer group", error=str(exc))

    # ------------------------------------------------------------ internals

    async def _read(self, start: bytes, count: int, block: int | None) -> list[Entry]:
        o = self.options
        try:
            reply = await self._redis.xreadgroup(
                o.group, o.consumer, {o.stream: start}, count=count, block=block
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await ensure_group(self._redis, o.stream, o.group)  # the stream was deleted
            return []
        return stream_entries(reply)

    async def _recover(self, limit: int) -> list[Delivery]:
        assert self._recover_from is not None
        entries = await self._read(self._recover_from, limit, None)
        if not entries:
            self._recover_from = None
            return []
        self._recover_from = entries[-1].id
        return await self._redelivered(entries)

    async def _reclaim(self, limit: int) -> list[Delivery]:
        o = self.options
        idle = round(o.claim_idle * 1000)
        reply = await self._redis.xautoclaim(
            o.stream, o.group, o.consumer, idle, start_id=self._claim_cursor, count=limit
        )
        self._claim_cursor = reply[0]
        entries = [Entry(i, f) for i, f in reply[1] if f and i not in self._in_flight]
        if not entries:
            return []
        self._log.warning("reclaimed entries of a stalled consumer", count=len(entries))
        return await self._redelivered(entries)

    async def _redelivered(self, entries: list[Entry]) -> list[Delivery]:
        """Entries that were delivered before (a consumer died): each delivery is an attempt."""
        o, batch = self.options, []
        for entry in entries:
            rows = await self._redis.xpending_range(o.stream, o.group, entry.id, entry.id, 1)
            times = int(rows[0]["times_delivered"]) if rows else 1
            batch.append(delivery_of(entry, times - 1))
        return self._track(batch)

    def _track(self, batch: list[Delivery]) -> list[Delivery]:
        self._in_flight.update(delivery.message.id for delivery in batch)
        return batch

    def _dead_fields(self, entry: Entry, delivery: Delivery, decision: Decision) -> dict[Any, Any]:
        status = b"" if decision.status is None else b"%d" % decision.status
        envelope = {} if decision.envelope is None else {b"envelope": decision.envelope}
        return {
            **entry.fields,
            **envelope,
            b"reason": decision.reason.encode(),
            b"attempts": b"%d" % delivery.attempt,
            b"status": status,
            b"source_id": entry.id,
            b"consumer": self.options.consumer.encode(),
            b"dead_at": b"%d" % _ms(),
        }


def stream_entries(reply: Any) -> list[Entry]:
    """The entries of an XREAD/XREADGROUP reply (deleted ones, without fields, left out)."""
    return [Entry(i, f) for _, entries in reply or [] for i, f in entries if f is not None]


def delivery_of(entry: Entry, redelivered: int = 0) -> Delivery:
    fields = entry.fields
    try:
        attempt = max(1, int(fields.get(b"attempt", b"1")))
    except ValueError:
        attempt = 1
    reply_to = fields.get(b"reply_to")
    correlation = fields.get(b"correlation_id")
    return Delivery(
        fields.get(b"envelope", b""),
        attempt + redelivered,
        reply_to.decode("utf-8", "replace") if reply_to else None,
        correlation.decode("utf-8", "replace") if correlation is not None else None,
        entry,
        entry.id.decode(),
    )


def netstrings(fields: dict[bytes, bytes], **extra: bytes) -> bytes:
    """Fields as ``len:bytes`` pairs, binary-safe, for the Lua mover to split."""
    flat = [*((k, v) for k, v in fields.items()), *((k.encode(), v) for k, v in extra.items())]
    return b"".join(b"%d:%s%d:%s" % (len(k), k, len(v), v) for k, v in flat)


def _ms() -> int:
    return int(time.time() * 1000)


def source_from_url(url: str, *, settings: Settings, log: Log) -> RedisStreamSource:
    """The source a ``redis://`` or ``rediss://`` URL names (see the module's doc)."""
    return RedisStreamSource(url, settings=settings, log=log)
