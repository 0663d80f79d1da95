"""Redis Streams source (redis-py asyncio): a consumer group, ack after the outcome, retries,
dead letters, and reclaim of a crashed consumer's entries.

URL: ``redis://[:PASSWORD@]HOST[:PORT][/DB]?stream=biot-events`` plus, optional, ``group``
(``biot-worker``), ``consumer`` (``HOSTNAME-PID``), ``dead_letter`` (``STREAM:dead``),
``dead_letter_maxlen`` (100000: the dead-letter stream is trimmed to about that many entries,
``MAXLEN ~``), ``claim_idle`` (60 s), ``max_attempts`` (5), ``retry_delay`` (1 s, doubling),
``retry_max_delay`` (60 s). ``rediss://`` for TLS; other parameters go to redis-py.

Entry fields: ``envelope`` (required), ``reply_to`` (a stream), ``correlation_id``, ``attempt``
(1 when absent). Settling is one Lua script, all or nothing: it first checks that every key it
writes is of its type or absent (else it fails, writing nothing), then adds the reply
(``XADD reply_to {correlation_id, response}``, expiring after an hour), for a retry the entry
with ``attempt + 1`` and ``last_error`` into the sorted set ``STREAM:retry`` (due time as score;
another script moves due entries back), for a dead letter an ``XADD`` to the dead-letter stream
adding ``reason``, ``attempts``, ``status``, ``source_id``, ``consumer``, ``dead_at`` (ms), and
only then ``XACK`` + ``XDEL``. Either carries the decision's ``envelope``, when it has one, in
place of the entry's. A settle that fails (a wrong-typed key, Redis gone) leaves the entry
pending: it is delivered again, and each delivery counts as an attempt.

Faults: every command is bounded by socket timeouts derived from ``WORKER_BROKER_TIMEOUT``; a
failed command drops its connection and the next one reconnects. After any failure (a receive or
a settle) the source re-reads its own pending entries (``XREADGROUP`` from ``0``, as at start):
right after a failed receive, after a short backoff (0.25 s doubling to 4 s while settles keep
failing) after a failed settle, so entries whose settle was lost come back within seconds, not
after ``claim_idle``. A missing consumer group (Redis restarted without its data) is created
again. A wrong-typed retry set is logged (at most once a second) and new entries are read anyway.

A dead consumer's pending entries are taken over with ``XAUTOCLAIM`` once idle ``claim_idle``
seconds (keep it above the longest handler deadline, or a slow event is handled twice); each
redelivery counts as an attempt, so an entry that keeps killing consumers ends dead-lettered.
One consumer group per stream (settled entries are deleted); a single Redis node.

Observability (:class:`~worker.adapters.queue.Observable`): ``info`` is
``QueueInfo("redis", STREAM, GROUP)``; :meth:`RedisStreamSource.lag` is the group's ``lag`` in
``XINFO GROUPS`` (entries never delivered to the group). A delivery is ``redelivered`` when it
was delivered before and not settled: one of this consumer's own pending entries read again, or
one taken over by ``XAUTOCLAIM``; an entry read with ``>`` is not, and neither is a retry moved
back from the retry set (a new entry: the retry was settled).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from config.settings import Settings
from worker.adapters.queue import (
    RETRY_PARAMS,
    Decision,
    Delivery,
    QueueInfo,
    SourceUnavailable,
    Verdict,
    positive,
    redact_url,
    retry_policy,
    split_url,
)
from worker.logs import Log, Throttle, describe

PARAMS = (
    "stream", "group", "consumer", "dead_letter", "dead_letter_maxlen", "claim_idle",
    *RETRY_PARAMS,
)  # fmt: skip
REPLY_MAXLEN = 10_000
REPLY_TTL = 3600
DEAD_LETTER_MAXLEN = 100_000
_POLL_MS = 250  # longest XREADGROUP block, so the intake loop sees ``stop`` promptly
_MOVE_EVERY = 0.05  # seconds between runs of the retry mover (retry timing resolution)
_RECOVER_BACKOFF = (0.25, 4.0)  # first and largest wait before re-reading after a failed settle

# Splits a string of netstrings (len:bytes, ...) into a table of its strings.
_SPLIT = """
local function split(packed)
  local out, i = {}, 1
  while i <= #packed do
    local colon = string.find(packed, ':', i, true)
    local size = tonumber(string.sub(packed, i, colon - 1))
    out[#out + 1] = string.sub(packed, colon + 1, colon + size)
    i = colon + size + 1
  end
  return out
end
"""

# KEYS: retry set, stream. ARGV: now (ms), limit. Members are netstrings of field, value, ...
_MOVE_DUE = _SPLIT + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', unpack(split(member)))
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""

# KEYS: stream, reply stream, retry set, dead-letter stream. ARGV: group, entry id, reply fields,
# retry member, retry due (ms), dead-letter fields, dead-letter maxlen, reply maxlen, reply ttl.
# Fields are netstrings; '' writes nothing. Every key written is checked before the first write
# (Redis does not undo a script that fails half-way), and XACK + XDEL come last, so an error
# anywhere leaves the entry pending. Returns what XACK returned (0: the group lost the entry).
_SETTLE = _SPLIT + """
local function wrong(key, wanted, used)
  if not used then return nil end
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'none' and kind ~= wanted then
    return 'WRONGTYPE ' .. key .. ' holds a ' .. kind .. ', not a ' .. wanted
  end
end
local problem = wrong(KEYS[1], 'stream', true) or wrong(KEYS[2], 'stream', ARGV[3] ~= '')
  or wrong(KEYS[3], 'zset', ARGV[4] ~= '') or wrong(KEYS[4], 'stream', ARGV[6] ~= '')
if problem then return redis.error_reply(problem) end
if ARGV[3] ~= '' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', unpack(split(ARGV[3])))
  redis.call('EXPIRE', KEYS[2], ARGV[9])
end
if ARGV[4] ~= '' then redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4]) end
if ARGV[6] ~= '' then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[7], '*', unpack(split(ARGV[6])))
end
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return acked
"""


@dataclass(frozen=True, slots=True)
class RedisOptions:
    url: str  # for redis-py, without our parameters
    stream: str
    group: str
    consumer: str
    dead_letter: str
    claim_idle: float
    dead_letter_maxlen: int = DEAD_LETTER_MAXLEN

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
            dead_letter_maxlen=positive_int(params, "dead_letter_maxlen", DEAD_LETTER_MAXLEN),
        )
        return options, params


def positive_int(params: dict[str, str], name: str, default: int) -> int:
    """Parameter ``name`` as a whole number above 0; ``ValueError`` naming it otherwise."""
    raw = params.get(name, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a positive whole number, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be a positive whole number, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class Entry:
    id: bytes
    fields: dict[bytes, bytes]


Named = list[tuple[bytes, dict[bytes, bytes] | None]]  # entries a reply names; None: deleted


def connect(url: str, max_connections: int, timeout: float = 10.0) -> aioredis.Redis:
    """A client whose every command is bounded: ``timeout`` seconds to connect, to wait for a
    pooled connection and for a reply (never less than XREADGROUP's block plus a second).

    redis-py drops a connection whose command failed or timed out. A command that fails with a
    connection error is sent once more on a new connection at once: a pooled connection that
    Redis reset while it restarted fails only there (while Redis is down, the second try is
    refused too, and the error reaches the caller)."""
    reply = max(timeout, _POLL_MS / 1000 + 1.0)
    once = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout, socket_timeout=reply,
        socket_connect_timeout=timeout, retry=once,
    )  # fmt: skip
    return aioredis.Redis(connection_pool=pool)


async def ensure_group(client: aioredis.Redis, stream: str, group: str) -> bool:
    """Create ``group`` on ``stream`` (and the stream), reading from its first entry; whether
    it had to (``False``: it existed)."""
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
        return False
    return True


def no_group(exc: BaseException) -> bool:
    """Whether Redis answered that the stream or its consumer group does not exist."""
    return isinstance(exc, ResponseError) and str(exc).startswith("NOGROUP")


class RedisStreamSource:
    """A :class:`~worker.adapters.queue.Source` on a Redis stream (see the module's doc)."""

    def __init__(self, url: str, *, settings: Settings, log: Log) -> None:
        self.options, params = RedisOptions.parse(url)
        self.policy = retry_policy(params)
        self.info = QueueInfo("redis", self.options.stream, self.options.group)
        self._settings = settings
        self._timeout = settings.worker.broker_timeout
        self._log = log
        self._throttle = Throttle(log)
        self._display = redact_url(url)
        self._client: aioredis.Redis | None = None

    @property
    def _redis(self) -> aioredis.Redis:
        assert self._client is not None, "enter the source first"
        return self._client

    async def __aenter__(self) -> RedisStreamSource:
        o = self.options
        self._client = connect(o.url, self._settings.worker.max_in_flight + 4, self._timeout)
        try:
            await self._redis.ping()
            await ensure_group(self._redis, o.stream, o.group)
        except (RedisError, OSError) as exc:
            await self.__aexit__()
            raise SourceUnavailable(f"{self._display}: {exc}") from exc
        self._move_due = self._redis.register_script(_MOVE_DUE)
        self._settle = self._redis.register_script(_SETTLE)
        self._next_move = self._next_claim = 0.0
        self._claim_cursor = b"0-0"
        self._regroup = False  # a settle found the group without its entry: check the group
        # Re-reading our own pending entries: due at ``_recover_at`` (now: those of a previous
        # life), under way from ``_recover_from``; ``_recover_delay`` is the settle backoff.
        self._recover_at: float | None = 0.0
        self._recover_from: bytes | None = None
        self._recover_delay, self._settle_failed_at = _RECOVER_BACKOFF[0], 0.0
        self._in_flight: set[bytes] = set()
        self._settled_meanwhile: set[bytes] = set()  # settled since this receive began
        self._warn_about_claim_idle()
        return self

    async def __aexit__(self, *exc: object) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            await self._leave(client)
        finally:
            try:
                async with asyncio.timeout(self._timeout):
                    await client.aclose(close_connection_pool=True)
            except TimeoutError:
                self._log.warning("closing the Redis connections timed out", timeout=self._timeout)

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
        self._settled_meanwhile.clear()  # see _track
        try:
            return await self._receive(limit)
        except BaseException as exc:
            if no_group(exc):  # Redis lost the group (and our pending entries with it)
                await self._recreate_group()
                return []
            self._recover_soon(0.0)  # whatever we were handed meanwhile is pending: re-read it
            raise

    async def settle(self, delivery: Delivery, decision: Decision) -> None:
        entry = delivery.message
        assert isinstance(entry, Entry)
        try:
            keys, args = self._settle_keys(delivery), self._settle_args(entry, delivery, decision)
            acked = await self._settle(keys=keys, args=args)
        except BaseException:
            self._recover_after_failed_settle()
            raise
        finally:
            self._in_flight.discard(entry.id)
            self._settled_meanwhile.add(entry.id)
        if not acked:
            self._regroup = True

    async def halt(self) -> None:
        return None  # nothing was fetched ahead: XREADGROUP asks for free slots only

    async def lag(self) -> int | None:
        """Entries of the stream not yet delivered to the group: its ``lag`` in ``XINFO
        GROUPS`` (Redis 7+). ``None`` when Redis cannot compute it (an entry the group has not
        read was deleted, or the stream was trimmed past it), when the stream or the group is
        gone, or when the source is not entered. Entries waiting in the retry set are not
        counted: they are not due, and each counts once moved back to the stream; nor are
        pending ones (delivered, not settled). Bounded like every command (the client's socket
        timeouts); raises when Redis fails."""
        if self._client is None:
            return None
        o = self.options
        try:
            groups: Any = await self._client.xinfo_groups(o.stream)
        except ResponseError as exc:
            if "no such key" in str(exc):
                return None
            raise
        group = o.group.encode()
        lag = next((g.get("lag") for g in groups if g.get("name") == group), None)
        return None if lag is None else int(lag)

    async def _leave(self, client: aioredis.Redis) -> None:
        """Remove this consumer from the group when it holds no pending entry (bounded)."""
        o = self.options
        try:
            async with asyncio.timeout(self._timeout):
                mine = await client.xpending_range(o.stream, o.group, "-", "+", 1, o.consumer)
                if not mine:
                    await client.xgroup_delconsumer(o.stream, o.group, o.consumer)
        except (RedisError, OSError) as exc:  # TimeoutError is an OSError
            self._log.warning("could not leave the consumer group", error=describe(exc))

    # ------------------------------------------------------------ receiving

    async def _receive(self, limit: int) -> list[Delivery]:
        now = time.monotonic()
        if self._regroup:
            await self._recreate_group()
            self._regroup = False
        if now >= self._next_move:
            self._next_move = now + _MOVE_EVERY
            await self._move_retries(limit)
        if self._recover_from is None and self._recover_at is not None and now >= self._recover_at:
            self._recover_from, self._recover_at = b"0", None
        if self._recover_from is not None:
            return self._track(await self._recover(limit))
        batch: list[Delivery] = []
        if now >= self._next_claim:
            self._next_claim = now + min(self.options.claim_idle / 2, 5.0)
            batch = await self._reclaim(limit)
        if len(batch) < limit:
            block = None if batch else _POLL_MS
            fresh = await self._read(b">", limit - len(batch), block)
            batch += [delivery_of(Entry(i, f)) for i, f in fresh if f is not None]
        return self._track(batch)  # only now: a read that fails leaves nothing marked in flight

    async def _move_retries(self, limit: int) -> None:
        """Move due retries back to the stream; a refusal (a wrong-typed retry set) is logged
        and intake goes on: the retries wait there until the key is fixed."""
        o = self.options
        try:
            await self._move_due(keys=[o.retry_key, o.stream], args=[_ms(), limit])
        except ResponseError as exc:
            error = describe(exc)
            self._throttle.error("moving due retries back to the stream failed",
                                 key=error, error=error, retry_key=o.retry_key)  # fmt: skip

    async def _recreate_group(self) -> None:
        o = self.options
        if not await ensure_group(self._redis, o.stream, o.group):
            return
        self._claim_cursor = b"0-0"
        self._throttle.warning("the consumer group was missing; created it again",
                               key=o.group, stream=o.stream, group=o.group)  # fmt: skip

    async def _read(self, start: bytes, count: int, block: int | None) -> Named:
        """XREADGROUP at ``start``: each entry's id and fields (``None``: deleted meanwhile)."""
        o = self.options
        reply: Any = await self._redis.xreadgroup(
            o.group, o.consumer, {o.stream: start}, count=count, block=block
        )
        return [(i, f) for _, entries in reply or [] for i, f in entries]

    async def _recover(self, limit: int) -> list[Delivery]:
        """The next of our own pending entries (not in flight here); ends the pass when none
        is left."""
        assert self._recover_from is not None
        named = await self._read(self._recover_from, limit, None)
        if not named:
            self._recover_from = None
            return []
        self._recover_from = named[-1][0]
        entries = [Entry(i, f) for i, f in named if f is not None and i not in self._in_flight]
        if not entries:
            return []
        self._throttle.warning("delivering this consumer's pending entries again",
                               key="recover", count=len(entries))  # fmt: skip
        return await self._redelivered(entries)

    def _recover_soon(self, delay: float) -> None:
        """Start a pass over our own pending entries in ``delay`` seconds (or earlier, if one
        is already due earlier)."""
        at = time.monotonic() + delay
        if self._recover_at is None or at < self._recover_at:
            self._recover_at = at

    def _recover_after_failed_settle(self) -> None:
        """Re-read own pending entries after a backoff that doubles while settles keep failing
        (a wrong-typed key), so a stuck entry is not a hot loop."""
        now = time.monotonic()
        if self._recover_at is not None:
            return  # a pass is due already
        if now - self._settle_failed_at > 2 * _RECOVER_BACKOFF[1]:
            self._recover_delay = _RECOVER_BACKOFF[0]  # a new incident, not the same one
        self._settle_failed_at = now
        self._recover_soon(self._recover_delay)
        self._recover_delay = min(_RECOVER_BACKOFF[1], self._recover_delay * 2)

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
        """Entries that were delivered before (a consumer died, a settle failed): each delivery
        is an attempt (``times_delivered``, read in one XPENDING over their range)."""
        o = self.options
        count = len(entries) + len(self._in_flight)  # ours in that range: these, and in flight
        rows = await self._redis.xpending_range(
            o.stream, o.group, entries[0].id, entries[-1].id, count, o.consumer
        )
        times = {row["message_id"]: int(row["times_delivered"]) for row in rows}
        return [delivery_of(entry, times.get(entry.id, 1) - 1, again=True) for entry in entries]

    def _track(self, batch: list[Delivery]) -> list[Delivery]:
        """``batch`` without what is in flight here already, which is now in flight. Nor what
        was settled while this receive ran: Redis may have answered the read before the ack,
        whose reply came first."""
        held = self._in_flight | self._settled_meanwhile
        batch = [delivery for delivery in batch if delivery.message.id not in held]
        self._in_flight.update(delivery.message.id for delivery in batch)
        return batch

    # ------------------------------------------------------------ settling

    def _settle_keys(self, delivery: Delivery) -> list[str]:
        o = self.options
        return [o.stream, delivery.reply_to or "", o.retry_key, o.dead_letter]

    def _settle_args(self, entry: Entry, delivery: Delivery, decision: Decision) -> list[Any]:
        o, reply, member, due, dead = self.options, b"", b"", 0, b""
        if decision.reply is not None and delivery.reply_to:
            fields: dict[bytes, bytes] = {b"response": decision.reply}
            if delivery.correlation_id is not None:
                fields[b"correlation_id"] = delivery.correlation_id.encode()
            reply = netstrings(fields)
        if decision.verdict is Verdict.RETRY:
            member = netstrings(self._retry_fields(entry, delivery, decision),
                                retried_from=entry.id)  # fmt: skip
            due = _ms() + round(decision.delay * 1000)
        elif decision.verdict is Verdict.DEAD:
            dead = netstrings(self._dead_fields(entry, delivery, decision))
        return [o.group, entry.id, reply, member, due, dead, o.dead_letter_maxlen,
                REPLY_MAXLEN, REPLY_TTL]  # fmt: skip

    @staticmethod
    def _retry_fields(entry: Entry, delivery: Delivery, decision: Decision) -> dict[bytes, bytes]:
        fields = {**entry.fields, b"attempt": b"%d" % (delivery.attempt + 1)}
        if decision.envelope is not None:
            fields[b"envelope"] = decision.envelope
        fields[b"last_error"] = decision.reason.encode()
        return fields

    def _dead_fields(
        self, entry: Entry, delivery: Delivery, decision: Decision
    ) -> dict[bytes, bytes]:
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


def delivery_of(entry: Entry, redelivered: int = 0, *, again: bool = False) -> Delivery:
    """``entry`` as a delivery: its ``attempt`` field plus ``redelivered`` deliveries that were
    never settled; ``again``: Redis delivered this entry before (see the module's doc)."""
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
        redelivered=again,
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
