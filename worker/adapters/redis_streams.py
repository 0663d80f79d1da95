"""Redis Streams source (redis-py asyncio): a consumer group, ack after the outcome, retries,
dead letters, and reclaim of a crashed consumer's entries.

URL: ``redis://[:PASSWORD@]HOST[:PORT][/DB]?stream=biot-events`` plus, optional, ``group``
(``biot-worker``), ``consumer`` (``HOSTNAME-PID``), ``dead_letter`` (``STREAM:dead``),
``dead_letter_maxlen`` (100000: the dead-letter stream is trimmed to about that many entries,
``MAXLEN ~``), ``claim_idle`` (60 s), ``max_attempts`` (5), ``retry_delay`` (1 s, doubling),
``retry_max_delay`` (60 s). ``rediss://`` for TLS; other parameters go to redis-py.

Entry fields: ``envelope`` (required), ``reply_to`` (a stream), ``correlation_id``, ``attempt``
(1 when absent). Settling is a Lua script, all or nothing per entry: it first checks that every
key the entry writes is of its type or absent (else that entry fails, writing nothing), then adds
the reply
(``XADD reply_to {correlation_id, response}``, expiring after an hour), for a retry the entry
with ``attempt + 1`` and ``last_error`` into the sorted set ``STREAM:retry`` (due time as score;
another script moves due entries back), for a dead letter an ``XADD`` to the dead-letter stream
adding ``reason``, ``attempts``, ``status``, ``source_id``, ``consumer``, ``dead_at`` (ms), and
only then ``XACK`` + ``XDEL``. Either carries the decision's ``envelope``, when it has one, in
place of the entry's. One settle call is under way at a time; the settles asked for meanwhile
go together in the next (:class:`Settler`), each entry with its own result. A settle that
fails (a wrong-typed key, Redis gone) leaves the entry pending: it is delivered again, and each
delivery counts as an attempt.

Connections: the commands every message needs (XREADGROUP, the settle script) and the retry
mover go over two connections of the source's own (:class:`Link`: RESP2, commands packed once
and pipelined, replies parsed from whole chunks), since redis-py's asyncio client costs more CPU
per command than the worker spends on an event; redis-py resolves the URL (host, TLS,
credentials, database) and runs the rest (group creation, XAUTOCLAIM, XPENDING, XINFO).

Faults: every command is bounded by ``WORKER_BROKER_TIMEOUT`` (a read by at least its block plus
a second); a failed or timed-out command drops its connection and the next one reconnects (a
settle call that fails this way fails the settles it carried). After any failure (a receive or
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
import hashlib
import importlib
import os
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple, Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from config.settings import Settings
from worker.adapters.queue import (
    RETRY_PARAMS,
    Decision,
    Delivery,
    QueueInfo,
    Settling,
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

# Settles a batch of entries, each all or nothing. KEYS: stream, retry set, dead-letter stream,
# then each entry's reply stream ('' when none). ARGV: group, dead-letter maxlen, reply maxlen,
# reply ttl, then five per entry: its id, reply fields, retry member, retry due (ms), dead-letter
# fields. Fields are netstrings; '' writes nothing. Every key an entry writes is checked before
# its first write (Redis does not undo a script that fails half-way; the types seen are kept for
# the batch), and its XACK + XDEL come last, so an error anywhere leaves that entry pending and
# the next entries are settled still. Returns per entry what XACK returned (0: the group lost
# it) or the error (a string).
_SETTLE = _SPLIT + """
local kinds = {}
local function wrong(key, wanted)
  local kind = kinds[key]
  if kind == nil then
    kind = redis.call('TYPE', key)['ok']
    kinds[key] = kind
  end
  if kind ~= 'none' and kind ~= wanted then
    return 'WRONGTYPE ' .. key .. ' holds a ' .. kind .. ', not a ' .. wanted
  end
end
local function settle(reply_key, id, reply, member, due, dead)
  local problem = wrong(KEYS[1], 'stream') or (reply ~= '' and wrong(reply_key, 'stream'))
    or (member ~= '' and wrong(KEYS[2], 'zset')) or (dead ~= '' and wrong(KEYS[3], 'stream'))
  if problem then return problem end
  if reply ~= '' then
    redis.call('XADD', reply_key, 'MAXLEN', '~', ARGV[3], '*', unpack(split(reply)))
    redis.call('EXPIRE', reply_key, ARGV[4])
    kinds[reply_key] = 'stream'
  end
  if member ~= '' then
    redis.call('ZADD', KEYS[2], due, member)
    kinds[KEYS[2]] = 'zset'
  end
  if dead ~= '' then
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', unpack(split(dead)))
    kinds[KEYS[3]] = 'stream'
  end
  local acked = redis.call('XACK', KEYS[1], ARGV[1], id)
  redis.call('XDEL', KEYS[1], id)
  return acked
end
local out = {}
for i = 1, #KEYS - 3 do
  local at = 5 * i
  local ok, result = pcall(settle, KEYS[3 + i], ARGV[at], ARGV[at + 1], ARGV[at + 2],
    ARGV[at + 3], ARGV[at + 4])
  if not ok and type(result) == 'table' then result = result.err or 'ERR settle failed' end
  out[i] = ok and result or tostring(result)
end
return out
"""
_SETTLE_BATCH = 128  # entries per script call at most: Redis runs nothing else meanwhile


_COLD_CONNECTIONS = 4  # redis-py's pool: group upkeep, XAUTOCLAIM, XPENDING, lag, leaving


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


class Entry(NamedTuple):  # a tuple: made once per message, cheaper than a frozen dataclass
    id: bytes
    fields: dict[bytes, bytes]


Named = list[tuple[bytes, dict[bytes, bytes] | None]]  # entries a reply names; None: deleted


def _reply_timeout(timeout: float) -> float:
    """How long a reply may take: ``timeout``, never less than XREADGROUP's block plus 1 s."""
    return max(timeout, _POLL_MS / 1000 + 1.0)


def _fields(flat: list[bytes] | None) -> dict[bytes, bytes] | None:
    """An entry's ``[field, value, ...]`` as a dict (``None``: the entry was deleted)."""
    return None if flat is None else dict(zip(flat[::2], flat[1::2], strict=True))


def connect(url: str, max_connections: int, timeout: float = 10.0) -> aioredis.Redis:
    """A client whose every command is bounded: ``timeout`` seconds to connect, to wait for a
    pooled connection and for a reply (never less than XREADGROUP's block plus a second).

    redis-py drops a connection whose command failed or timed out. A command that fails with a
    connection error is sent once more on a new connection at once: a pooled connection that
    Redis reset while it restarted fails only there (while Redis is down, the second try is
    refused too, and the error reaches the caller)."""
    reply = _reply_timeout(timeout)
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


# ------------------------------------------------------------ the hot path's own connections
# redis-py's asyncio client costs more CPU per command than the rest of the worker spends on an
# event (its pool checkout, packing, a task per timed write, a parser reading line by line), so
# the two commands every message needs, XREADGROUP and the settle script, go over connections
# of the source's own: RESP2, pre-packed commands, replies parsed from whole chunks. redis-py
# keeps the rest (creating the group, XAUTOCLAIM, XPENDING, XINFO, leaving the group) and
# resolves the URL: a :class:`Link` takes host, port, TLS context, credentials and database from
# a connection object of the client's pool (never connected).


class RespError(str):
    """An error reply of Redis (``-ERR ...``), kept as a value while parsing."""

    __slots__ = ()


class ReplyReader(Protocol):
    """RESP2 replies parsed from the bytes a connection receives, in chunks: :meth:`feed`
    returns the replies completed so far. Arrays are lists, nil replies ``None``, errors
    :class:`RespError`, bulk and simple strings bytes."""

    def feed(self, data: bytes) -> list[Any]:
        """The replies ``data`` completes; ``ValueError`` on bytes that are not RESP2."""
        ...


class _Short(Exception):
    """The chunk ends before the reply does (or a bulk string holds CR LF)."""


class RespReader:
    """A :class:`ReplyReader` in Python. A chunk that holds whole replies (the usual case) is
    split at its line ends once and read off the pieces; otherwise, from the reply it cannot
    finish on, the reader parses element by element and resumes a reply split across chunks
    where it stopped (the arrays begun are kept, a bulk string waits for its last byte)."""

    def __init__(self) -> None:
        self._rest = b""  # bytes received and not parsed yet (the start of an element)
        self._items: list[Any] | None = None  # the array being filled (None: at the top)
        self._want = 0  # its size
        self._stack: list[tuple[list[Any] | None, int]] = []  # the arrays around it

    def feed(self, data: bytes) -> list[Any]:
        """The replies ``data`` completes; ``ValueError`` on bytes that are not RESP2."""
        if self._rest or self._items is not None:
            return self._resume(data)
        parts = data.split(b"\r\n")
        last, at, done = len(parts) - 1, 0, []  # parts[last]: after the last CR LF
        try:
            while at < last:
                value, end = _piece(parts, at)
                if end > last:
                    raise _Short
                done.append(value)
                at = end
        except (_Short, IndexError, ValueError):  # from there on, element by element
            return done + self._resume(data[sum(map(len, parts[:at])) + 2 * at :])
        return done + self._resume(parts[last]) if parts[last] else done

    def _resume(self, data: bytes) -> list[Any]:
        buffer = self._rest + data if self._rest else data
        stack, items, want, done = self._stack, self._items, self._want, []
        pos, size, find = 0, len(buffer), buffer.find
        while True:
            end = find(b"\r\n", pos)
            if end < 0:
                break
            kind = buffer[pos]
            value: Any
            if kind == 36:  # $: bulk string
                length = int(buffer[pos + 1 : end])
                if length >= 0:
                    stop = end + 2 + length
                    if stop + 2 > size:
                        break  # the rest of it has not arrived
                    value, pos = buffer[end + 2 : stop], stop + 2
                else:
                    value, pos = None, end + 2
            elif kind == 42:  # *: array
                length, pos = int(buffer[pos + 1 : end]), end + 2
                if length > 0:
                    stack.append((items, want))
                    items, want = [], length
                    continue
                value = None if length < 0 else []
            else:
                value, pos = _line_value(kind, buffer[pos:end]), end + 2
            while items is not None:  # the value completes its array, and maybe the one above
                items.append(value)
                if len(items) < want:
                    break
                value = items
                items, want = stack.pop()
            else:
                done.append(value)
        self._rest, self._items, self._want = buffer[pos:], items, want
        return done


def _piece(parts: list[bytes], at: int) -> tuple[Any, int]:
    """The reply starting at ``parts[at]`` (a chunk split at CR LF) and the index after it;
    :class:`_Short` (or ``IndexError``) when the pieces end first or a bulk string held CR LF."""
    head = parts[at]
    kind = head[0]
    if kind == 42:  # *: array
        count, at = int(head[1:]), at + 1
        if count < 0:
            return None, at
        items: list[Any] = []
        for _ in range(count):
            head = parts[at]
            if head[0] != 36:
                value, at = _piece(parts, at)
                items.append(value)
                continue
            length = int(head[1:])  # a bulk string, the usual element: read here
            if length < 0:
                items.append(None)
                at += 1
                continue
            body = parts[at + 1]
            if len(body) != length:
                raise _Short
            items.append(body)
            at += 2
        return items, at
    if kind == 36:  # $: bulk string
        length = int(head[1:])
        if length < 0:
            return None, at + 1
        body = parts[at + 1]
        if len(body) != length:
            raise _Short
        return body, at + 2
    return _line_value(kind, head), at + 1


class _HiredisReader:
    """A :class:`ReplyReader` on hiredis, redis-py's parser in C (a tenth of the Python one's
    CPU for a stream entry), when it is installed."""

    def __init__(self, hiredis: Any) -> None:
        self._reader = hiredis.Reader(replyError=RespError)
        self._protocol_error: type[Exception] = hiredis.ProtocolError

    def feed(self, data: bytes) -> list[Any]:
        reader, done = self._reader, []
        try:
            reader.feed(data)
            value = reader.gets()
            while value is not False:
                done.append(value)
                value = reader.gets()
        except self._protocol_error as exc:
            raise ValueError(f"not a RESP2 reply: {exc}") from None
        return done


def _hiredis() -> Any:
    try:
        return importlib.import_module("hiredis")
    except ImportError:
        return None


_HIREDIS = _hiredis()


def reply_reader() -> ReplyReader:
    """hiredis's parser when it is installed, else :class:`RespReader`."""
    return RespReader() if _HIREDIS is None else _HiredisReader(_HIREDIS)


def _line_value(kind: int, line: bytes) -> Any:
    """An integer, simple string or error reply (``line`` with its type byte)."""
    if kind == 58:  # :
        return int(line[1:])
    if kind == 43:  # +
        return bytes(line[1:])
    if kind == 45:  # -
        return RespError(line[1:].decode("utf-8", "replace"))
    raise ValueError(f"not a RESP2 reply: {bytes(line[:40])!r}")


def pack(*args: bytes) -> bytes:
    """One command as a RESP array of bulk strings."""
    return b"".join([b"*%d\r\n" % len(args), *(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)])


def bulk(arg: bytes) -> bytes:
    """One argument of a command, packed."""
    return b"$%d\r\n%b\r\n" % (len(arg), arg)


def _arg(value: bytes | str | int) -> bytes:
    if isinstance(value, bytes):
        return value
    return value.encode() if isinstance(value, str) else b"%d" % value


def reply_error(value: Any) -> ResponseError | None:
    """An error reply as redis-py's exception (so callers judge both alike), else ``None``."""
    return ResponseError(str(value)) if isinstance(value, RespError) else None


#: Called with a call's replies, or with the exception it failed with.
Answer = Callable[[list[Any] | BaseException], None]
Call = tuple[bytes, Answer]  # a command of one reply, and where its reply goes


class Wire(asyncio.Protocol):
    """One connection: commands are written as they come (pipelined) and each caller waits for
    as many replies as it sent commands, which Redis sends back in order: on a future, or by
    an :data:`Answer` called as the replies are parsed (no turn of the event loop in between).
    Any failure (the connection lost, bytes that are not RESP, a caller giving up on a reply)
    breaks it: every caller waiting on it fails, and the :class:`Link` opens a new one for the
    next command."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._loop = asyncio.get_running_loop()
        self._reader = reply_reader()
        # each caller: its future or answer, how many replies, those received
        self._waiting: deque[tuple[asyncio.Future[list[Any]] | Answer, int, list[Any]]]
        self._waiting = deque()
        self._transport: asyncio.Transport | None = None
        self.broken: RedisError | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            values = self._reader.feed(data)
        except ValueError as exc:
            self.fail(RedisConnectionError(f"{self._name}: {exc}"))
            return
        waiting = self._waiting
        for value in values:
            if not waiting:
                self.fail(RedisConnectionError(f"{self._name}: a reply nobody asked for"))
                return
            waiter, count, got = waiting[0]
            got.append(value)
            if len(got) == count:
                waiting.popleft()
                if not isinstance(waiter, asyncio.Future):
                    try:
                        waiter(got)
                    except Exception as exc:  # a bug of the answer's: the replies stay in step
                        self._loop.call_exception_handler(
                            {"message": f"{self._name}: answering a reply failed",
                             "exception": exc, "protocol": self}
                        )  # fmt: skip
                elif not waiter.done():
                    waiter.set_result(got)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = "closed by the server" if exc is None else str(exc) or type(exc).__name__
        self.fail(RedisConnectionError(f"Connection to {self._name} lost: {reason}"))

    def fail(self, error: RedisError) -> None:
        """Break the connection: close it, and fail every caller still waiting on it."""
        if self.broken is None:
            self.broken = error
        if self._transport is not None:
            self._transport.abort()
        while self._waiting:
            _settle_waiter(self._waiting.popleft()[0], error)

    def send(self, payload: bytes, replies: int) -> asyncio.Future[list[Any]]:
        """Write ``payload`` (``replies`` commands); the future of their replies."""
        if self._transport is None or self.broken is not None:  # not under python -O either
            raise self.broken or RedisConnectionError("not connected")
        future = self._loop.create_future()
        self._waiting.append((future, replies, []))
        self._transport.write(payload)
        return future

    def send_then(
        self, payload: bytes, replies: int, answer: Answer, ahead: Sequence[Call] = ()
    ) -> None:
        """Write ``payload`` (``replies`` commands); their replies go to ``answer``.
        ``ahead``: commands of one reply each written first, in the same write, their replies
        to their own answers."""
        if self._transport is None or self.broken is not None:
            raise self.broken or RedisConnectionError("not connected")
        if len(ahead) == 1:  # the usual: one settle call
            command, first = ahead[0]
            self._waiting.append((first, 1, []))
            payload = command + payload
        elif ahead:
            self._waiting.extend((first, 1, []) for _, first in ahead)
            payload = b"".join((*(command for command, _ in ahead), payload))
        self._waiting.append((answer, replies, []))
        self._transport.write(payload)

    def oldest(self) -> object | None:
        """The caller Redis owes a reply first (the same object while it waits), if any."""
        return self._waiting[0] if self._waiting else None

    def expire(self, reason: str) -> None:
        """Give up on the oldest caller (``TimeoutError``), and so on the connection."""
        oldest = self._waiting.popleft()[0]
        self.fail(RedisConnectionError(f"{self._name}: {reason}"))  # first: broken for all
        _settle_waiter(oldest, TimeoutError(f"{self._name}: {reason}"))


def _settle_waiter(waiter: asyncio.Future[list[Any]] | Answer, error: BaseException) -> None:
    if not isinstance(waiter, asyncio.Future):
        waiter(error)
    elif not waiter.done():
        waiter.set_exception(error)


@dataclass(frozen=True, slots=True)
class Address:
    """Where and how to connect, as redis-py resolved it from the URL."""

    name: str  # host:port or the socket path, for error messages
    host: str = ""
    port: int = 6379
    path: str | None = None  # a Unix socket
    tls: ssl.SSLContext | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    credentials: Any = None  # redis-py's CredentialProvider, asked at each connect

    @classmethod
    def of(cls, pool: aioredis.ConnectionPool) -> Address:
        maker: Any = pool.make_connection
        conn = maker()  # only read, never connected
        context = getattr(conn, "ssl_context", None)
        path = getattr(conn, "path", None)
        name = path or f"{conn.host}:{conn.port}"
        return cls(
            name, "" if path else conn.host, 6379 if path else int(conn.port), path or None,
            None if context is None else context.get(), int(conn.db or 0), conn.username,
            conn.password, conn.credential_provider,
        )  # fmt: skip

    async def handshake(self) -> list[bytes]:
        """The commands a new connection sends first (AUTH, SELECT), as redis-py would."""
        commands = []
        if self.credentials is not None:
            credentials = await self.credentials.get_credentials_async()
            commands.append(pack(b"AUTH", *(_arg(c) for c in credentials)))
        elif self.password:
            user = [_arg(self.username)] if self.username else []
            commands.append(pack(b"AUTH", *user, _arg(self.password)))
        if self.db:
            commands.append(pack(b"SELECT", b"%d" % self.db))
        return commands


class Link:
    """A :class:`Wire` opened on first use and opened again after it broke; connecting and each
    reply bounded by ``timeout``. A call that times out or is cancelled breaks the connection
    (Redis may be gone; a blocked read's entries would reach nobody).

    Replies are not bounded by a timer each (asyncio's timers cost more than a command here):
    while commands wait, one timer looks every ``timeout / 4`` (a second at most) at the
    caller Redis owes a reply first, and gives the connection up once the same one has waited
    ``timeout`` (plus that period at most) for it."""

    def __init__(self, address: Address, timeout: float) -> None:
        self._address = address
        self._timeout = timeout
        self._period = min(1.0, timeout / 4)
        self._wire: Wire | None = None
        self._opening = asyncio.Lock()
        self._tasks: set[asyncio.Task[list[Any]]] = set()  # calls of start() connecting first
        self._watch: asyncio.TimerHandle | None = None
        self._owed: object | None = None  # the caller owed a reply first at the last look
        self._owed_since = 0.0  # when that look saw it first
        self._closed = False

    async def call(self, payload: bytes, replies: int = 1) -> list[Any]:
        """The replies to ``payload`` (``replies`` commands; error replies as values)."""
        wire = self._wire
        if wire is None or wire.broken is not None:
            if self._closed:
                raise RedisConnectionError(f"{self._address.name}: closed")
            async with asyncio.timeout(self._timeout):
                wire = await self._open()
        future = wire.send(payload, replies)
        if self._watch is None:
            self._watch = asyncio.get_running_loop().call_later(self._period, self._check)
        try:
            return await future
        except asyncio.CancelledError:
            wire.fail(RedisConnectionError(f"{self._address.name}: a reply was given up on"))
            raise

    def start(self, payload: bytes, answer: Answer) -> None:
        """:meth:`call` without a coroutine: ``answer`` gets the replies of ``payload`` (one
        command), as they are parsed while the connection is up; through a task that connects
        first when it is not."""
        wire = self._wire
        if wire is not None and wire.broken is None:
            wire.send_then(payload, 1, answer)
            if self._watch is None:
                self._watch = asyncio.get_running_loop().call_later(self._period, self._check)
            return
        if self._closed:
            answer(RedisConnectionError(f"{self._address.name}: closed"))
            return
        task = asyncio.get_running_loop().create_task(self.call(payload))
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._answered(done, answer))

    @property
    def up(self) -> bool:
        """Whether the connection is open (a command goes at once)."""
        return self._wire is not None and self._wire.broken is None

    def send_soon(
        self, payload: bytes, replies: int, ahead: Sequence[Call], answer: Answer
    ) -> None:
        """:meth:`call` by callback, on a connection that is :attr:`up`: ``answer`` gets the
        ``replies`` replies of ``payload`` as they are parsed (or the error that broke the
        connection)."""
        assert self._wire is not None
        self._wire.send_then(payload, replies, answer, ahead)
        if self._watch is None:
            self._watch = asyncio.get_running_loop().call_later(self._period, self._check)

    def give_up(self) -> None:
        """Stop waiting: break the connection, failing what waits on it."""
        wire = self._wire
        if wire is not None and wire.broken is None:
            wire.fail(RedisConnectionError(f"{self._address.name}: a reply was given up on"))

    def _answered(self, task: asyncio.Task[list[Any]], answer: Answer) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            answer(RedisConnectionError(f"{self._address.name}: closed"))
        else:
            answer(task.exception() or task.result())

    def _check(self) -> None:
        """Give the connection up when the caller owed a reply first has waited ``timeout``
        for it; look again while callers wait."""
        self._watch, wire = None, self._wire
        owed = None if wire is None or wire.broken is not None else wire.oldest()
        if wire is None or owed is None:
            self._owed = None
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if owed is not self._owed:
            self._owed, self._owed_since = owed, now
        elif now - self._owed_since >= self._timeout:
            self._owed = None
            wire.expire(f"no reply within {self._timeout:g} s")
            return
        self._watch = loop.call_later(self._period, self._check)

    async def _open(self) -> Wire:
        async with self._opening:
            wire = self._wire
            if wire is not None and wire.broken is None:
                return wire  # another caller opened it meanwhile
            wire = await self._connect()
            if self._closed:  # closed while connecting
                closed = RedisConnectionError(f"{self._address.name}: closed")
                wire.fail(closed)
                raise closed
            self._wire = wire
            return wire

    async def _connect(self) -> Wire:
        a, loop = self._address, asyncio.get_running_loop()
        try:
            if a.path is not None:
                _, wire = await loop.create_unix_connection(lambda: Wire(a.name), a.path)
            else:
                _, wire = await loop.create_connection(
                    lambda: Wire(a.name), a.host, a.port, ssl=a.tls
                )
        except OSError as exc:
            raise RedisConnectionError(f"Error connecting to {a.name}: {exc}") from exc
        try:
            setup = await a.handshake()
            answers = await wire.send(b"".join(setup), len(setup)) if setup else []
        except BaseException:  # cut short (the call's timeout): close what was opened
            wire.fail(RedisConnectionError(f"{a.name}: connecting was given up"))
            raise
        refused = next((str(x) for x in answers if isinstance(x, RespError)), None)
        if refused is not None:
            wire.fail(RedisConnectionError(f"{a.name}: {refused}"))
            raise AuthenticationError(refused)
        return wire

    def close(self) -> None:
        """Close the connection and fail what waits on it; later calls fail at once."""
        self._closed = True
        wire, self._wire = self._wire, None
        if wire is not None and wire.broken is None:
            wire.fail(RedisConnectionError(f"{self._address.name}: closed"))
        for task in self._tasks:
            task.cancel()
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None


class LuaScript:
    """A script run by its SHA1 (``EVALSHA``), sent whole (``EVAL``, which caches it again)
    when Redis answers ``NOSCRIPT`` (it restarted, or its script cache was flushed)."""

    def __init__(self, source: str) -> None:
        self._source = source.encode()
        self._sha = hashlib.sha1(self._source, usedforsecurity=False).hexdigest().encode()

    def packed(self, keys: Sequence[bytes | str], args: Sequence[Any]) -> bytes:
        """The script's ``EVALSHA`` command (to send with others; see :meth:`run`)."""
        return pack(b"EVALSHA", self._sha, b"%d" % len(keys), *map(_arg, keys), *map(_arg, args))

    async def run(self, link: Link, keys: Sequence[bytes | str], args: Sequence[Any]) -> Any:
        """The script's reply; :class:`ResponseError` when it answered an error."""
        rest = [b"%d" % len(keys), *(_arg(k) for k in keys), *(_arg(a) for a in args)]
        [reply] = await link.call(pack(b"EVALSHA", self._sha, *rest))
        if isinstance(reply, RespError) and reply.startswith("NOSCRIPT"):
            [reply] = await link.call(pack(b"EVAL", self._source, *rest))
        error = reply_error(reply)
        if error is not None:
            raise error
        return reply


_MOVE_DUE_SCRIPT = LuaScript(_MOVE_DUE)
Part = tuple[bytes, bytes]  # an entry's part of a settle call: its reply stream, its arguments
_FIVE = b"$%d\r\n%b\r\n" * 5  # an entry's five arguments, packed in one go
_ACK = b"$%d\r\n%b\r\n$%d\r\n%b\r\n$0\r\n\r\n$1\r\n0\r\n$0\r\n\r\n"  # id, reply; no more


class Settler:
    """Settles sent as calls of the settle script, one call at a time: a settle asked for while
    none is under way goes at once, the ones asked for meanwhile wait for its reply and then go
    together (:data:`_SETTLE_BATCH` entries a call at most; more go as more calls, pipelined).
    So a lone event waits for nothing, and under load a call carries what one round trip
    gathered. :meth:`add` queues an entry's :data:`Part` and returns the future of its own
    result: what XACK returned, or the error that left that entry pending (a wrong-typed key);
    cancelled, it is given up (not sent if it has not gone). :meth:`add_then` gives the result
    to a callback instead, as the reply is parsed (no turn of the event loop). A call that
    fails (the connection, no reply in time) fails every entry it carried."""

    def __init__(self, link: Link, keys: Sequence[str], args: Sequence[str]) -> None:
        self._link = link
        self._keys = b"".join(bulk(key.encode()) for key in keys)  # the batch's own, first
        self._args = b"".join(bulk(arg.encode()) for arg in args)
        self._fixed = len(keys) + len(args)
        source = _SETTLE.encode()
        sha = hashlib.sha1(source, usedforsecurity=False).hexdigest().encode()
        self._commands = (bulk(b"EVALSHA") + bulk(sha), bulk(b"EVAL") + bulk(source))
        # the queued entries: their reply streams, arguments and waiters, in order
        self._queued: tuple[list[bytes], list[bytes], list[_Waiter]] = ([], [], [])
        self._calls = 0  # calls under way
        #: Settles asked for meanwhile wait for :meth:`take` (or :meth:`unhold`).
        self.holding = False

    def add(self, part: Part) -> asyncio.Future[int]:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.add_then(part, future, None)
        return future

    def add_then(self, part: Part, wanted: Wanted, then: Then | None) -> None:
        """:meth:`add` with ``wanted`` (done once given up on: then it is not sent) and
        ``then`` (called with the result; without it, ``wanted`` is the future to get it)."""
        keys, args, waiters = self._queued
        keys.append(part[0])
        args.append(part[1])
        waiters.append((wanted, then))
        if not self._calls and not self.holding:
            self._flush()

    def take(self) -> list[Call]:
        """The settles waiting, as calls to write ahead of another command on another
        connection (:meth:`Link.send_soon`'s ``ahead``); under way from now on."""
        (keys, args, waiters), self._queued = self._queued, ([], [], [])
        if len(waiters) <= _SETTLE_BATCH:  # the usual: one call
            call = self._pack(keys, args, waiters, whole=False)
            return [] if call is None else [call]
        calls = []
        for at in range(0, len(waiters), _SETTLE_BATCH):
            end = at + _SETTLE_BATCH
            call = self._pack(keys[at:end], args[at:end], waiters[at:end], whole=False)
            if call is not None:
                calls.append(call)
        return calls

    def release(self) -> None:
        """Send the settles waiting (unless a call is under way: they go once it is answered)."""
        if self._queued[2] and not self._calls and not self.holding:
            self._flush()

    def unhold(self) -> None:
        """Stop :attr:`holding`; send what was held (see :meth:`release`)."""
        self.holding = False
        self.release()

    def _flush(self) -> None:
        for call in self.take():
            self._link.start(*call)

    def _send(
        self, keys: list[bytes], args: list[bytes], waiters: list[_Waiter], whole: bool
    ) -> None:
        call = self._pack(keys, args, waiters, whole)
        if call is not None:
            self._link.start(*call)

    def _pack(
        self, keys: list[bytes], args: list[bytes], waiters: list[_Waiter], whole: bool
    ) -> Call | None:
        """The settle call of these entries (those still wanted), counted as under way."""
        for wanted, _ in waiters:
            if wanted.done():
                # Given up on while they waited (the pump's bound passed), or before a resend
                # after NOSCRIPT: never sent, since the entry may be delivered again by now; it
                # stays pending and comes back.
                kept = [n for n, (wanted, _) in enumerate(waiters) if not wanted.done()]
                keys, args = [keys[n] for n in kept], [args[n] for n in kept]
                waiters = [waiters[n] for n in kept]
                if not waiters:
                    return None
                break
        count = len(waiters)
        head = b"*%d\r\n%b$%d\r\n%d\r\n" % (
            3 + self._fixed + 6 * count, self._commands[whole], len(b"%d" % (3 + count)),
            3 + count,
        )  # fmt: skip
        payload = b"".join((head, self._keys, *keys, self._args, *args))
        self._calls += 1
        return payload, partial(self._answer, keys, args, waiters, whole)

    def _answer(
        self, keys: list[bytes], args: list[bytes], waiters: list[_Waiter], whole: bool,
        reply: list[Any] | BaseException,
    ) -> None:  # fmt: skip
        self._calls -= 1
        try:
            value = reply if isinstance(reply, BaseException) else reply[0]
            if isinstance(value, RespError) and value.startswith("NOSCRIPT") and not whole:
                self._send(keys, args, waiters, whole=True)  # Redis restarted, or flushed
            else:
                _judge(waiters, value)
        finally:
            self.release()


#: Where an entry's result goes as it is parsed: what XACK returned, or the error.
Then = Callable[[int | BaseException], None]


class Wanted(Protocol):
    def done(self) -> bool:
        """Answered or given up on: no longer to send or answer."""
        ...


_Waiter = tuple[Wanted, Then | None]  # an entry's future (or what stands for it), its ``then``


def _judge(waiters: list[_Waiter], value: Any) -> None:
    """Each entry's result in ``value`` (the script's reply, or the exception the call
    failed with)."""
    if type(value) is list and len(value) == len(waiters):
        for (wanted, then), result in zip(waiters, value, strict=True):
            if not wanted.done():
                outcome = result if type(result) is int else ResponseError(_text(result))
                if then is not None:
                    then(outcome)
                else:
                    _tell(wanted, then, outcome)
        return
    error = value if isinstance(value, BaseException) else reply_error(value)
    if error is None:
        error = ResponseError(f"unexpected reply to the settle script: {str(value)[:200]}")
    for wanted, then in waiters:
        if not wanted.done():
            _tell(wanted, then, error)


def _tell(wanted: Wanted, then: Then | None, outcome: int | BaseException) -> None:
    if then is not None:
        then(outcome)
        return
    assert isinstance(wanted, asyncio.Future)
    if isinstance(outcome, BaseException):
        wanted.set_exception(outcome)
    else:
        wanted.set_result(outcome)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class _Settling:
    """An entry's settle under way by callback (:meth:`RedisStreamSource.settle_soon`)."""

    __slots__ = ("_done", "_id", "_over", "_source")

    def __init__(
        self, source: RedisStreamSource, entry_id: bytes,
        done: Callable[[BaseException | None], None],
    ) -> None:  # fmt: skip
        self._source = source
        self._id = entry_id
        self._done = done
        self._over = False  # answered or given up: not sent if it has not gone (see Settler)

    def done(self) -> bool:
        return self._over

    def answered(self, result: int | BaseException) -> None:
        if not self._over:
            self._over = True
            self._done(self._source._settled(self._id, result))

    def give_up(self) -> None:
        if not self._over:
            self._over = True  # its reply, if it went, is ignored
            self._source._settled(self._id, TimeoutError("settle given up"))


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
        self._client = connect(o.url, _COLD_CONNECTIONS, self._timeout)
        try:
            await self._redis.ping()
            await ensure_group(self._redis, o.stream, o.group)
            address = Address.of(self._redis.connection_pool)
        except (RedisError, OSError) as exc:
            await self.__aexit__()
            raise SourceUnavailable(f"{self._display}: {exc}") from exc
        # The intake loop's commands (reads, moving retries) one at a time on one connection;
        # settles pipelined on another, so that they never wait behind a blocked read.
        self._reads = Link(address, _reply_timeout(self._timeout))
        self._settles = Link(address, self._timeout)
        self._settler = Settler(
            self._settles, [o.stream, o.retry_key, o.dead_letter],
            [o.group, str(o.dead_letter_maxlen), str(REPLY_MAXLEN), str(REPLY_TTL)],
        )  # fmt: skip
        # A reply_to naming one of these would have the settle expire it (a reply stream lives
        # an hour): the source's stream with its pending entries, its retries, its dead letters.
        self._own_keys = frozenset((o.stream, o.retry_key, o.dead_letter))
        self._read_head = (b"XREADGROUP", b"GROUP", o.group.encode(), o.consumer.encode())
        self._new_reads: dict[tuple[int, int | None], bytes] = {}
        self._move_whole = False  # Redis lost the mover: run it on its own (sent whole)
        self._stream_key = o.stream.encode()
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
        for link in (getattr(self, "_reads", None), getattr(self, "_settles", None)):
            if link is not None:
                link.close()
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

    def receive_soon(
        self, limit: int, then: Callable[[Sequence[Delivery] | BaseException], None]
    ) -> Settling | None:
        """:meth:`receive` by callback (see :class:`~worker.adapters.queue.ReceivesSoon`),
        when it is a plain read (with the retry mover when it is due) on a connection that is
        up; ``None`` otherwise. The settles held meanwhile go ahead of the read, in its write;
        the entries it brings go to ``then`` with settles held again until the loop's next
        turn, in which the pump starts their tasks and sends the next read."""
        now = time.monotonic()
        recover_due = self._recover_at is not None and now >= self._recover_at
        move = now >= self._next_move
        if (self._regroup or self._recover_from is not None or recover_due
                or now >= self._next_claim or (move and self._move_whole)
                or not self._reads.up):  # fmt: skip
            return None
        read = self._new_reads.get((limit, _POLL_MS)) or self._pack_read(b">", limit, _POLL_MS)
        if move:
            self._next_move = now + _MOVE_EVERY
            o = self.options
            read = _MOVE_DUE_SCRIPT.packed([o.retry_key, o.stream], [_ms(), limit]) + read
        self._settled_meanwhile.clear()  # see _track
        self._reads.send_soon(read, 1 + move, self._settler.take(),
                              partial(self._read_answered, then, move))  # fmt: skip
        return self._reads

    def _read_answered(
        self, then: Callable[[Sequence[Delivery] | BaseException], None], moved: bool,
        reply: list[Any] | BaseException,
    ) -> None:  # fmt: skip
        """A read of :meth:`receive_soon` answered (with the mover's reply first if
        ``moved``), or the error that broke its connection."""
        if isinstance(reply, BaseException):
            self._recover_soon(0.0)  # whatever we were handed meanwhile is pending: re-read it
            then(reply)
            return
        if moved:
            self._moved(reply[0])
        value = reply[-1]
        if type(value) is RespError:
            error = ResponseError(value)
            if no_group(error):  # Redis lost the group: the next receive() makes it again
                self._regroup = True
                then([])
            else:
                self._recover_soon(0.0)
                then(error)
            return
        if value is None:
            then([])
            return
        batch = self._track(new_deliveries(value))
        if not batch:
            then(batch)
            return
        settler = self._settler
        settler.holding = True  # the tasks' settles wait for the next read (see receive_soon)
        then(batch)
        asyncio.get_running_loop().call_soon(settler.unhold)  # after what then() started

    async def settle(self, delivery: Delivery, decision: Decision) -> None:
        entry = delivery.message
        assert isinstance(entry, Entry)
        try:
            acked = await self._settler.add(self._settle_part(entry, delivery, decision))
        except BaseException as exc:
            self._settled(entry.id, exc)
            raise
        self._settled(entry.id, acked)

    def settle_soon(
        self, delivery: Delivery, decision: Decision, done: Callable[[BaseException | None], None]
    ) -> Settling:
        """:meth:`settle` by callback (see :class:`~worker.adapters.queue.SettlesSoon`):
        ``done`` is called as the settle call's reply is parsed."""
        entry = delivery.message
        assert isinstance(entry, Entry)
        settling = _Settling(self, entry.id, done)
        self._settler.add_then(self._settle_part(entry, delivery, decision), settling,
                               settling.answered)  # fmt: skip
        return settling

    def _settled(self, entry_id: bytes, result: int | BaseException) -> BaseException | None:
        """Note how an entry's settle went: ``result`` is what XACK returned, or the error
        that left the entry pending (returned)."""
        self._in_flight.discard(entry_id)
        self._settled_meanwhile.add(entry_id)
        if isinstance(result, BaseException):
            self._recover_after_failed_settle()
            return result
        if not result:
            self._regroup = True
        return None

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
        move = now >= self._next_move
        if move:
            self._next_move = now + _MOVE_EVERY
        if self._recover_from is None and self._recover_at is not None and now >= self._recover_at:
            self._recover_from, self._recover_at = b"0", None
        if move and (self._recover_from is not None or now >= self._next_claim or self._move_whole):
            self._move_whole = False  # on its own: the script sent whole if Redis lost it
            await self._move_retries(limit)
            move = False
        if self._recover_from is not None:
            return self._track(await self._recover(limit))
        batch: list[Delivery] = []
        if now >= self._next_claim:
            self._next_claim = now + min(self.options.claim_idle / 2, 5.0)
            batch = await self._reclaim(limit)
        if len(batch) < limit:
            block = None if batch else _POLL_MS
            batch += await self._read_new(limit - len(batch), block, limit if move else 0)
        return self._track(batch)  # only now: a read that fails leaves nothing marked in flight

    async def _read_new(self, count: int, block: int | None, move: int) -> list[Delivery]:
        """XREADGROUP ``>``: the entries as deliveries (deleted ones left out). ``move``: due
        retries (that many at most) are moved back to the stream first, in the same write."""
        read = self._new_reads.get((count, block))
        if read is None:
            read = self._pack_read(b">", count, block)
        if move:
            o = self.options
            [moved, reply] = await self._reads.call(
                _MOVE_DUE_SCRIPT.packed([o.retry_key, o.stream], [_ms(), move]) + read, 2
            )
            self._moved(moved)
        else:
            [reply] = await self._reads.call(read)
        if reply is None:
            return []
        if type(reply) is RespError:
            raise ResponseError(reply)
        return new_deliveries(reply)

    def _moved(self, reply: Any) -> None:
        """Judge the retry mover's reply (sent with a read): log a refusal (a wrong-typed retry
        set; intake goes on); when Redis lost the script, move with it sent whole next time."""
        if type(reply) is RespError:
            if reply.startswith("NOSCRIPT"):
                self._next_move, self._move_whole = 0.0, True  # the next receive: on its own
                return
            self._move_refused(ResponseError(reply))

    def _pack_read(self, start: bytes, count: int, block: int | None) -> bytes:
        args = [*self._read_head, b"COUNT", b"%d" % count]
        if block is not None:
            args += [b"BLOCK", b"%d" % block]
        payload = pack(*args, b"STREAMS", self._stream_key, start)
        if start == b">":  # the usual read: packed once per count asked for
            if len(self._new_reads) >= 1024:
                self._new_reads.clear()
            self._new_reads[(count, block)] = payload
        return payload

    async def _move_retries(self, limit: int) -> None:
        """Move due retries back to the stream; a refusal (a wrong-typed retry set) is logged
        and intake goes on: the retries wait there until the key is fixed."""
        o = self.options
        try:
            await _MOVE_DUE_SCRIPT.run(self._reads, [o.retry_key, o.stream], [_ms(), limit])
        except ResponseError as exc:
            self._move_refused(exc)

    def _move_refused(self, exc: ResponseError) -> None:
        error = describe(exc)
        self._throttle.error("moving due retries back to the stream failed",
                             key=error, error=error, retry_key=self.options.retry_key)  # fmt: skip

    async def _recreate_group(self) -> None:
        o = self.options
        if not await ensure_group(self._redis, o.stream, o.group):
            return
        self._claim_cursor = b"0-0"
        self._throttle.warning("the consumer group was missing; created it again",
                               key=o.group, stream=o.stream, group=o.group)  # fmt: skip

    async def _read(self, start: bytes, count: int, block: int | None) -> Named:
        """XREADGROUP at ``start``: each entry's id and fields (``None``: deleted meanwhile)."""
        [reply] = await self._reads.call(self._pack_read(start, count, block))
        error = reply_error(reply)
        if error is not None:
            raise error
        return [(i, _fields(f)) for _, entries in reply or [] for i, f in entries]

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
        held, settled = self._in_flight, self._settled_meanwhile
        batch = [d for d in batch if d.message.id not in held and d.message.id not in settled]
        held.update(delivery.message.id for delivery in batch)
        return batch

    # ------------------------------------------------------------ settling

    def _settle_part(self, entry: Entry, delivery: Delivery, decision: Decision) -> Part:
        """The entry's reply stream and its five arguments of the settle script, packed."""
        reply_to, reply = delivery.reply_to, b""
        if reply_to and reply_to in self._own_keys:
            self._log.warning(
                "a message's reply_to names the source's own stream, retries or dead letters: "
                "no reply written", ref=delivery.ref, reply_to=reply_to,
            )  # fmt: skip
            reply_to = None
        if decision.reply is not None and reply_to:
            reply = b"8:response%d:%b" % (len(decision.reply), decision.reply)
            if delivery.correlation_id is not None:
                correlation = delivery.correlation_id.encode()
                reply += b"14:correlation_id%d:%b" % (len(correlation), correlation)
        reply_key = bulk(reply_to.encode()) if reply_to else b"$0\r\n\r\n"
        if decision.verdict is Verdict.ACK:  # the usual settle: no retry, no dead letter
            return reply_key, _ACK % (len(entry.id), entry.id, len(reply), reply)
        member, due, dead = b"", b"0", b""
        if decision.verdict is Verdict.RETRY:
            member = netstrings(self._retry_fields(entry, delivery, decision),
                                retried_from=entry.id)  # fmt: skip
            due = b"%d" % (_ms() + round(decision.delay * 1000))
        else:
            dead = netstrings(self._dead_fields(entry, delivery, decision))
        args = _FIVE % (len(entry.id), entry.id, len(reply), reply, len(member), member,
                        len(due), due, len(dead), dead)  # fmt: skip
        return reply_key, args

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


def new_deliveries(reply: Any) -> list[Delivery]:
    """The deliveries of an XREADGROUP ``>`` reply (entries deleted meanwhile left out)."""
    return [delivery_of(Entry(i, dict(zip(f[::2], f[1::2], strict=True))))
            for _, entries in reply for i, f in entries if f is not None]  # fmt: skip


def delivery_of(entry: Entry, redelivered: int = 0, *, again: bool = False) -> Delivery:
    """``entry`` as a delivery: its ``attempt`` field plus ``redelivered`` deliveries that were
    never settled; ``again``: Redis delivered this entry before (see the module's doc)."""
    fields = entry.fields
    raw_attempt, attempt = fields.get(b"attempt"), 1
    if raw_attempt is not None:
        try:
            attempt = max(1, int(raw_attempt))
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
