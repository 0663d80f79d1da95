"""A lean HTTP/1.1 keep-alive client for the load generator (raw ``asyncio.Protocol``).

Why not aiohttp's client: it costs more CPU a request than the servers under test, so the
load generator would measure itself. This client writes pre-encoded requests and parses only
what a benchmark needs: the status line, ``Content-Length`` and ``Connection: close``. One
request at a time per connection (no pipelining), as BioT's HTTP client does. Responses without
``Content-Length`` (chunked) are refused as errors; every server measured here sends it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import count
from typing import Final, Generic, TypeVar

_HEAD_END: Final = b"\r\n\r\n"
T = TypeVar("T")


class ResponseError(Exception):
    """The server's answer could not be read (malformed, chunked, or the connection dropped)."""


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    close: bool


def parse_response(buffer: bytes | bytearray) -> tuple[Reply, int] | None:
    """A complete response at the start of ``buffer`` and its length, or ``None`` when partial.

    Raises :class:`ResponseError` for a malformed head or one without ``Content-Length``.
    """
    end = buffer.find(_HEAD_END)
    if end < 0:
        return None
    head = bytes(buffer[:end]).lower()
    if not head.startswith(b"http/1.") or len(head) < 12:
        raise ResponseError(f"not an HTTP/1.x status line: {bytes(buffer[:40])!r}")
    try:
        status = int(head[9:12])
    except ValueError:
        raise ResponseError(f"bad status line: {bytes(buffer[:40])!r}") from None
    length = _header_int(head, b"content-length")
    if length is None:
        raise ResponseError("response without Content-Length (chunked is not supported)")
    total = end + 4 + length
    if len(buffer) < total:
        return None
    close = _header_value(head, b"connection") == b"close"
    return Reply(status, bytes(buffer[end + 4 : total]), close), total


def _header_value(head: bytes, name: bytes) -> bytes | None:
    start = head.find(b"\r\n" + name + b":")
    if start < 0:
        return None
    start += len(name) + 3
    stop = head.find(b"\r\n", start)
    return head[start : stop if stop >= 0 else len(head)].strip()


def _header_int(head: bytes, name: bytes) -> int | None:
    value = _header_value(head, name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ResponseError(f"bad {name.decode()}: {value!r}") from None


class ReplyProtocol(asyncio.Protocol, Generic[T]):
    """A keep-alive connection with one exchange in flight: :meth:`_exchange` writes, then waits
    until the bytes received so far complete a reply (:meth:`_complete`, per protocol). A parse
    error or a lost connection fails the exchange with :class:`ResponseError`."""

    _lost_by = "closed by server"

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[T] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        try:
            result = self._complete()
        except ResponseError as exc:
            waiter.set_exception(exc)
            self.close()
            return
        if result is not None:
            waiter.set_result(result)

    def _complete(self) -> T | None:
        """The reply, consumed from ``self._buffer``, once it is all there; else ``None``."""
        raise NotImplementedError

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ResponseError(f"connection lost ({exc or self._lost_by})"))

    async def _exchange(self, payload: bytes) -> T:
        if self.closed or self._transport is None:
            raise ResponseError("connection is closed")
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(payload)
        return await self._waiter

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()


class Connection(ReplyProtocol[Reply]):
    """One keep-alive HTTP connection; :meth:`send` one request and await its :class:`Reply`."""

    def _complete(self) -> Reply | None:
        parsed = parse_response(self._buffer)
        if parsed is None:
            return None
        reply, used = parsed
        del self._buffer[:used]
        if reply.close:
            self.close()
        return reply

    async def send(self, request: bytes) -> Reply:
        """Write ``request`` and wait for the whole response; :class:`ResponseError` on failure."""
        return await self._exchange(request)


async def connect(host: str, port: int) -> Connection:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(Connection, host, port)
    return protocol


@dataclass(frozen=True, slots=True)
class RequestTemplate:
    """A pre-encoded POST whose only per-request part is the ``traceparent``."""

    before_trace: bytes
    after_trace: bytes


def request_template(
    host: str, port: int, path: str, headers: Mapping[str, str], body: bytes
) -> RequestTemplate:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    before = ("\r\n".join(lines) + "\r\ntraceparent: 00-").encode()
    return RequestTemplate(before, b"-01\r\n\r\n" + body)


class RequestSource:
    """Cycles through templates, giving each request a fresh W3C trace (as BioT does)."""

    def __init__(self, templates: Sequence[RequestTemplate]) -> None:
        if not templates:
            raise ValueError("a request source needs at least one template")
        self._templates = list(templates)
        self._counter = count(1)
        self._run = os.urandom(8).hex()

    def next(self) -> bytes:
        n = next(self._counter)
        template = self._templates[n % len(self._templates)]
        ids = f"{self._run}{n:016x}-{n:016x}".encode()
        return template.before_trace + ids + template.after_trace
