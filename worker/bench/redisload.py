"""A lean Redis client for the load generator of scenario (e) (raw RESP2 over ``asyncio.Protocol``).

Why not redis-py: its asyncio client costs more CPU a command than the worker spends on an
event, so the load generator would measure itself (the reason :mod:`.httpload` exists for
HTTP). This client sends both commands of an event in one
write and parses only RESP2 replies (simple strings, errors, integers, bulk strings, arrays).

One :class:`RedisChannel` is one sender with one event in flight, as one keep-alive HTTP
connection is: :meth:`RedisChannel.send` writes ``XADD STREAM * envelope E reply_to R
correlation_id C`` and ``XREAD COUNT 1 BLOCK 0 STREAMS R LAST`` together (Redis runs them in
order, so the read blocks until the worker's reply is on the channel's own reply stream ``R``),
checks the correlation id, and returns the Function URL response as a :class:`Reply`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import count
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import orjson

from worker.adapters.queue import decode_reply
from worker.bench.httpload import Reply, ReplyProtocol, RequestTemplate, ResponseError

_CRLF: Final = b"\r\n"
_TRACE_SLOT: Final = "TRACE-IDS-GO-HERE"  # no JSON escaping, not in any event


class RespError(str):
    """An error reply of Redis (``-ERR ...``), kept as a value while parsing."""

    __slots__ = ()


def command(*args: bytes) -> bytes:
    """One command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    parts += [b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args]
    return b"".join(parts)


def parse_value(buffer: bytes | bytearray, pos: int = 0) -> tuple[Any, int] | None:
    """The RESP2 value at ``pos`` and the position after it, or ``None`` while it is partial.

    Nil bulk strings and arrays are ``None``; errors are :class:`RespError`. Raises
    :class:`ResponseError` on bytes that are not RESP.
    """
    end = buffer.find(_CRLF, pos)
    if end < 0:
        return None
    kind, line, after = buffer[pos : pos + 1], bytes(buffer[pos + 1 : end]), end + 2
    if kind == b"+":
        return line, after
    if kind == b"-":
        return RespError(line.decode("utf-8", "replace")), after
    size = _int(line)
    if kind == b":":
        return size, after
    if kind == b"$":
        if size < 0:
            return None, after
        if len(buffer) < after + size + 2:
            return None
        return bytes(buffer[after : after + size]), after + size + 2
    if kind == b"*":
        return _array(buffer, size, after)
    raise ResponseError(f"not a RESP reply: {bytes(buffer[pos : pos + 40])!r}")


def _int(line: bytes) -> int:
    try:
        return int(line)
    except ValueError:
        raise ResponseError(f"bad RESP length or integer: {line[:40]!r}") from None


def _array(buffer: bytes | bytearray, size: int, pos: int) -> tuple[Any, int] | None:
    if size < 0:
        return None, pos
    items = []
    for _ in range(size):
        parsed = parse_value(buffer, pos)
        if parsed is None:
            return None
        item, pos = parsed
        items.append(item)
    return items, pos


@dataclass(frozen=True, slots=True)
class RedisAddress:
    host: str
    port: int
    db: int
    password: str | None

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        """``redis://[:PASSWORD@]HOST[:PORT][/DB]`` (no TLS: the bench runs on loopback)."""
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise ValueError(f"the bench needs a redis:// URL, not {url!r}")
        db = parts.path.strip("/") or "0"
        password = unquote(parts.password) if parts.password is not None else None
        return cls(parts.hostname or "127.0.0.1", parts.port or 6379, int(db), password)

    def setup(self) -> list[bytes]:
        """The commands a new connection sends before its first event."""
        commands = [] if self.password is None else [command(b"AUTH", self.password.encode())]
        return commands + ([command(b"SELECT", b"%d" % self.db)] if self.db else [])


class RedisChannel(ReplyProtocol[list[Any]]):
    """One connection publishing to ``stream`` and reading its replies from ``reply_to``."""

    _lost_by = "closed by Redis"

    def __init__(self, stream: str, reply_to: str) -> None:
        super().__init__()
        self._xadd = (b"XADD", stream.encode(), b"*", b"envelope")
        self._reply_to = reply_to.encode()
        self._last = b"0-0"
        self._ids = count(1)
        self._values: list[Any] = []
        self._expected = 0

    def _complete(self) -> list[Any] | None:
        pos = 0
        while len(self._values) < self._expected:
            parsed = parse_value(self._buffer, pos)
            if parsed is None:
                break
            value, pos = parsed
            self._values.append(value)
        del self._buffer[:pos]
        if len(self._values) < self._expected:
            return None
        values, self._values = self._values, []
        return values

    async def call(self, payload: bytes, replies: int) -> list[Any]:
        """Write ``payload`` (``replies`` commands) and wait for all their replies."""
        self._expected, self._values = replies, []
        return await self._exchange(payload)

    async def send(self, envelope: bytes) -> Reply:
        """Publish one envelope and wait for its reply; :class:`ResponseError` on failure."""
        correlation = b"%x" % next(self._ids)
        xadd = command(*self._xadd, envelope, b"reply_to", self._reply_to,
                       b"correlation_id", correlation)  # fmt: skip
        xread = command(b"XREAD", b"COUNT", b"1", b"BLOCK", b"0", b"STREAMS",
                        self._reply_to, self._last)  # fmt: skip
        added, read = await self.call(xadd + xread, 2)
        for value in (added, read):
            if isinstance(value, RespError):
                self.close()
                raise ResponseError(f"Redis refused: {value}")
        entry_id, fields = _single_entry(read)
        self._last = entry_id
        if fields.get(b"correlation_id") != correlation:
            self.close()  # a stale reply: this channel's stream is out of step
            raise ResponseError("reply with another correlation id")
        return reply_of(fields.get(b"response", b""))

def _single_entry(read: Any) -> tuple[bytes, dict[bytes, bytes]]:
    try:
        [[_, [[entry_id, flat]]]] = read
        return entry_id, dict(zip(flat[::2], flat[1::2], strict=True))
    except (TypeError, ValueError):
        raise ResponseError(f"unexpected XREAD reply: {str(read)[:200]}") from None


def reply_of(response: bytes) -> Reply:
    """The worker's Function URL response (``{"statusCode", "headers", "body"}``) as a Reply."""
    try:
        reply = decode_reply(response)
    except ValueError as exc:
        raise ResponseError(str(exc)) from None
    body = reply.get("body")
    return Reply(reply["statusCode"], body.encode() if isinstance(body, str) else b"", False)


async def connect(address: RedisAddress, stream: str, reply_to: str) -> RedisChannel:
    loop = asyncio.get_running_loop()
    _, channel = await loop.create_connection(
        lambda: RedisChannel(stream, reply_to), address.host, address.port
    )
    setup = address.setup()
    if setup:
        answers = await channel.call(b"".join(setup), len(setup))
        refused = [a for a in answers if isinstance(a, RespError)]
        if refused:
            channel.close()
            raise ResponseError(f"Redis refused the connection setup: {refused[0]}")
    return channel


def envelope_template(headers: Mapping[str, str], body: bytes) -> RequestTemplate:
    """The queue envelope ``{"headers": {...}, "body": "<JSON text>"}`` of one event, split
    around its ``traceparent`` value so that :class:`~worker.bench.httpload.RequestSource` gives
    each message a fresh trace, as it does for HTTP requests."""
    envelope = {
        "headers": {**headers, "traceparent": f"00-{_TRACE_SLOT}-01"},
        "body": body.decode(),
    }
    before, after = orjson.dumps(envelope).split(_TRACE_SLOT.encode())
    return RequestTemplate(before, after)
