"""The HTTP adapter: BioT (or anything playing it) POSTs events; we answer with the dispatcher's
response.

Routes: ``POST /`` (any path, so a subscription endpoint may carry one) for events,
``GET /healthz`` (the process is alive), ``GET /readyz`` (the public key and a service token
can be obtained, and which is not: see :mod:`worker.adapters.health`) and ``GET /metrics``;
``HEAD`` answers as ``GET`` without the body, another method 405 (``Allow`` names the ones that
would do). More than ``max_in_flight`` events at once answer 503 with ``Retry-After`` instead
of queueing without bound; a body over ``max_body_bytes`` answers 413; a header value that is not
UTF-8 answers 400. Malformed HTTP, which the parser refuses, answers 400 in the platform's error
envelope too (``BAD_REQUEST``, naming the problem, never echoing the bytes).
Nothing reaches the caller as a traceback.

The connections are this module's own protocol (:class:`_Connection`) on aiohttp's HTTP/1.1
parser (llhttp, in C): aiohttp's web server built a request object, a response object, a task and
a stream writer for every event, and ran its router and middleware chain, which cost more CPU
than the rest of an event. The wire is aiohttp's (status line, headers and their order,
``Date``, ``Server``, keep-alive, ``Expect: 100-continue``, pipelining, lingering over an unread
body); a response of a shape this module does not write itself (a plugin's own status or
headers) is written by aiohttp's response machinery.

Hostile clients (:func:`serve`, :func:`app_runner`):

- an event takes an in-flight slot only once its body is read, and reading it is bounded by
  ``body_timeout`` (slower answers 408 and the connection is closed);
- a request's headers must be complete ``header_timeout`` seconds after their first byte, or the
  connection is closed (slowloris); a connection that sends nothing is closed after
  ``keepalive_timeout``, when it opened as after each response;
- at most ``max_connections`` connections are open (fewer when the file descriptor limit
  cannot hold that many, see :func:`connection_cap`): one more closes another (one that never
  completed a request first, then one trickling a request, then an idle keep-alive connection
  that has served events; the longest idle first), never one whose event is being handled or
  answered; when every one is, the newcomer is closed;
- running out of file descriptors pauses accepting for a second, logged once a second at most,
  and the connections already open keep being served.

Shutdown (:func:`serve`): the listening socket closes first, in-flight events get up to the
grace period to finish, then the caller closes what the dispatcher uses.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import re
import resource
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.helpers import EMPTY_BODY_STATUS_CODES, ceil_timeout, rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion, HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.http_parser import HttpRequestParser, RawRequestMessage
from aiohttp.http_writer import StreamWriter
from aiohttp.log import server_logger
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.tcp_helpers import tcp_keepalive
from aiohttp.web_protocol import MAX_MSG_QUEUE_SIZE, RequestPayloadError
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from worker.adapters.health import PROBE_PATHS, Health, Probes
from worker.dispatch import Dispatcher
from worker.errors import EventError, Overloaded, PayloadTooLarge, WorkerError
from worker.events import event_from_http, hook_from_header, lower_headers
from worker.logs import Log, Throttle, describe
from worker.responses import ErrorContext, Response, error_response
from worker.tracing import TraceContext, trace_from_headers

if TYPE_CHECKING:  # prometheus-client is imported only when metrics are on
    from worker.metrics import Metrics

#: Descriptors kept for the process's own files (log, event loop, modules, the listening socket)
#: when the descriptor limit lowers the connection cap, besides the BioT client's pool.
FD_RESERVE: Final = 64
#: Connections accepted per wake-up of the listening socket: bounds the descriptors taken before
#: the cap closes any (each one accepted above the cap closes another on its first turn).
ACCEPT_BURST: Final = 16
ACCEPT_PAUSE: Final = 1.0  # seconds without accepting after the descriptors ran out
_OUT_OF_DESCRIPTORS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# aiohttp's parser messages quote the offending bytes after a colon or in a repr: cut there.
_ECHO = re.compile(r":\s*\n.*|:?\s*b?['\"].*", re.DOTALL)

# The parser's limits, as aiohttp's server sets them.
_READ_BUFSIZE: Final = 2**16
_MAX_LINE: Final = 8190
_MAX_HEADERS: Final = 128
#: Parsed, unanswered pipelined requests held per connection before reading pauses (aiohttp's).
_MAX_QUEUED: Final = MAX_MSG_QUEUE_SIZE
_TEXT: Final = "text/plain; charset=utf-8"
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Answer(NamedTuple):
    """A response and whether the connection closes after it (a refusal that cannot wait)."""

    response: Response
    close: bool = False


class HttpAdapter:
    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        max_in_flight: int,
        max_body_bytes: int,
        health: Health,
        log: Log,
        body_timeout: float = 10.0,
        metrics: Metrics | None = None,
        traced: bool = False,
    ) -> None:
        """``metrics`` are served at ``GET /metrics`` and count the events refused here;
        ``traced`` (spans are exported) gives each event its HTTP span attributes."""
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._traced = traced
        self._max_in_flight = max_in_flight
        self._max_body = max_body_bytes
        self._body_timeout = body_timeout
        self._health = health
        self._probes = Probes(health, lambda: self.in_flight, metrics)
        self._log = log
        self.in_flight = 0

    def answer(
        self, connection: _Connection, request: RawRequestMessage, payload: StreamReader
    ) -> Awaitable[_Answer]:
        """The answer to one request: an event (``POST``, any path), a probe, or 404/405 as
        aiohttp's router answered them (every path is an event's, so 404 only for a target that
        is not a path, such as ``OPTIONS *``)."""
        if request.method == "POST" and (
            request.path.startswith("/") or request.url.path_safe.startswith("/")
        ):  # the path as written (nearly always), else an absolute URL's
            return self._event(connection, request, payload)
        return self._not_an_event(request)

    async def _not_an_event(self, request: RawRequestMessage) -> _Answer:
        method, path = request.method, request.url.path_safe
        if path in PROBE_PATHS and method in ("GET", "HEAD"):
            return _Answer(await self._probes.answer(path, request.headers))
        if not path.startswith("/"):
            return _Answer(_text(404, "404: Not Found"))
        allowed = "GET,HEAD,POST" if path in PROBE_PATHS else "POST"
        return _Answer(_text(405, "405: Method Not Allowed", {"Allow": allowed}))

    async def _event(
        self, connection: _Connection, request: RawRequestMessage, payload: StreamReader
    ) -> _Answer:
        received_at = asyncio.get_running_loop().time()
        headers = request.headers
        if not "".join(headers.values()).isascii():  # O(1) per value: the common case
            bad = _undecodable_header(headers)
            if bad is not None:
                return self._refuse(connection, request, _not_utf8(bad), received_at)
        length = headers.get("Content-Length")
        if length is not None and int(length) > self._max_body:
            return self._refuse(connection, request, _too_large(int(length), self._max_body),
                                received_at)  # fmt: skip
        try:
            if payload.is_eof():  # the whole body came with the headers: no timer
                body = payload.read_nowait(-1)
                if len(body) > self._max_body:
                    raise _BodyTooLarge
            else:
                body = await self._read_slow_body(connection, payload)
        except _BodyTooLarge:
            return self._refuse(connection, request, _too_large(None, self._max_body), received_at)
        except TimeoutError:
            refused = self._refuse(connection, request, _body_too_slow(self._body_timeout),
                                   received_at)  # fmt: skip
            # The rest of the body may still come: do not wait for it.
            return _Answer(refused.response, close=True)
        # The slot is taken only now: a client sending its body slowly holds none.
        if self.in_flight >= self._max_in_flight:
            overloaded = Overloaded("too many events in flight")
            return self._refuse(connection, request, overloaded, received_at, retry=True)
        self.in_flight += 1
        try:
            event = event_from_http(headers, body, received_at=received_at)
            if self._traced:
                event.transport = _span_attributes(connection, request)
            return _Answer(await self._dispatcher.dispatch(event))
        finally:
            self.in_flight -= 1

    async def _read_slow_body(self, connection: _Connection, payload: StreamReader) -> bytes:
        """The body, within ``body_timeout``; meanwhile the connection may be closed by the
        connection cap, as an idle one would. Over ``max_body_bytes`` raises _BodyTooLarge."""
        connection.reading_body = True
        body = bytearray()
        try:
            async with asyncio.timeout(self._body_timeout):
                while chunk := await payload.readany():
                    body += chunk
                    if len(body) > self._max_body:
                        raise _BodyTooLarge
        finally:
            connection.reading_body = False
        return bytes(body)

    def _refuse(
        self,
        connection: _Connection,
        request: RawRequestMessage,
        error: WorkerError,
        received_at: float,
        *,
        retry: bool = False,
    ) -> _Answer:
        """An event answered here, before dispatch: counted, traced and logged as one."""
        headers = request.headers
        hook = hook_from_header(headers.get("hooktype"))[0]
        transport = _span_attributes(connection, request) if self._traced else None
        outcome = self._dispatcher.refuse(
            hook, _trace_of(headers), error, received_at, transport,
            headers={"retry-after": "1"} if retry else None,
        )  # fmt: skip
        if self._metrics is not None and isinstance(error, Overloaded):
            self._metrics.overloaded(hook.value)
        return _Answer(outcome.response)


class _BodyTooLarge(Exception):
    """A body read past ``max_body_bytes``."""


def _text(status: int, text: str, headers: Mapping[str, str] | None = None) -> Response:
    """aiohttp's plain-text answer (its 404, 405 and 417)."""
    return Response(status, text.encode(), {"Content-Type": _TEXT, **(headers or {})})


def _trace_of(headers: Mapping[str, str]) -> TraceContext:
    """The trace a request names (or a new one): what its answer and log lines carry."""
    return trace_from_headers(lower_headers(headers))


def _span_attributes(connection: _Connection, request: RawRequestMessage) -> dict[str, Any]:
    """The HTTP server span's attributes (OpenTelemetry's semantic conventions), read as
    aiohttp's request object reads them (host from ``Host``, else this machine's name)."""
    url = request.url
    host_header = url.host if url.absolute else request.headers.get("Host")
    hostname = host_header if host_header is not None else socket.getfqdn()
    attributes: dict[str, Any] = {
        "http.request.method": request.method,
        "url.path": url.path,
        "url.scheme": "http",
        "network.protocol.version": f"{request.version.major}.{request.version.minor}",
    }
    host, _, port = (hostname or "").rpartition(":")
    if host and port.isdigit():
        attributes["server.address"], attributes["server.port"] = host, int(port)
    elif hostname:
        attributes["server.address"] = hostname
    remote = connection.remote
    if remote:
        attributes["client.address"] = remote
    agent = request.headers.get("User-Agent")
    if agent:
        attributes["user_agent.original"] = agent
    return attributes


def _too_large(length: int | None, limit: int) -> PayloadTooLarge:
    size = f"{length} bytes" if length is not None else "the body"
    return PayloadTooLarge(f"{size} exceeds the limit of {limit} bytes")


def _body_too_slow(timeout: float) -> EventError:
    return EventError(
        f"the body did not arrive within {timeout:g} seconds", status=408, code="REQUEST_TIMEOUT"
    )


def _not_utf8(header: str) -> EventError:
    return EventError(f"header {header!r} is not valid UTF-8", code="BAD_REQUEST")


def _undecodable_header(headers: Mapping[str, str]) -> str | None:
    """The name of the first header whose value is not UTF-8 (the parser keeps such bytes as
    lone surrogates), or None. Names are HTTP tokens, which the parser checked: ASCII. The token
    of an interceptor or NONSPECIFIC call is the dispatcher's to refuse (400 ``JWT_ERROR``, as in
    a queue message or a Lambda event); a notification carries its token in its body and
    ignores the header, so bad bytes there are refused here like any other header's."""
    for name, value in headers.items():
        try:
            value.encode()
        except UnicodeEncodeError:
            if name.lower() != "authorization" or _notification(headers):
                return name  # a notification's token is in its body: nothing else refuses it
    return None


def _notification(headers: Mapping[str, str]) -> bool:
    return headers.get("hooktype", "").strip().upper() == "NOTIFICATION"


def connection_cap(max_connections: int, client_connections: int) -> int:
    """``max_connections``, lowered so that the open connections, the BioT client's pool
    (``client_connections``), a burst being accepted and the process's own files fit within the
    soft file descriptor limit; at least 1."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    room = soft - client_connections - ACCEPT_BURST - FD_RESERVE
    return max(1, min(max_connections, room))


class Connections:
    """The open connections of one server: the cap, the header timeout, the answers to
    malformed HTTP, and the throttled lines about them (at most one a second per kind)."""

    def __init__(
        self,
        *,
        cap: int,
        header_timeout: float,
        errors: ErrorContext,
        log: Log,
    ) -> None:
        self.cap = cap
        self.header_timeout = header_timeout
        self.errors = errors
        self.log = Throttle(log)
        self._open: dict[_Connection, None] = {}  # in order of opening

    def opened(self, connection: _Connection) -> None:
        """Count ``connection``; over the cap, close the one idle the longest, or this one when
        every other is handling or answering an event."""
        self._open[connection] = None
        if len(self._open) <= self.cap:
            return
        victim = min(
            (c for c in self._open if c is not connection and c.evictable()),
            key=_Connection.eviction_order,
            default=connection,
        )
        self.log.warning(
            "connection closed: too many open connections",
            key="cap",
            cap=self.cap,
            newcomer=victim is connection,
        )
        self.close(victim)

    def close(self, connection: _Connection) -> None:
        self._open.pop(connection, None)
        connection.force_close()

    def closed(self, connection: _Connection) -> None:
        self._open.pop(connection, None)


# ---------------------------------------------------------------- the wire

_REASONS: Final = {status.value: status.phrase for status in HTTPStatus}  # aiohttp's phrases
_STATUS_LINES_11: Final = {
    status: f"HTTP/1.1 {status} {reason}\r\n"
    for status, reason in _REASONS.items()
    if status not in EMPTY_BODY_STATUS_CODES
}
_SERVER_LINE: Final = f"\r\nServer: {SERVER_SOFTWARE}\r\n"
# Headers aiohttp writes itself, or whose presence changes what it writes: a response carrying
# one is written by aiohttp's response machinery (_Connection._write_with_aiohttp).
_OWN_HEADERS: Final = frozenset({"content-length", "transfer-encoding", "date", "server",
                                 "connection"})  # fmt: skip
# What aiohttp refuses in a header (header injection): it writes nothing then.
_CONTROL: Final = re.compile("[\x00-\x08\x0a-\x1f\x7f]")
# Header names seen, and whether each is Content-Type (names repeat: each is checked once).
_NAMES: dict[str, bool] = {}
_NAMES_MAX: Final = 1024


def encode_head(request: RawRequestMessage, response: Response, keep_alive: bool) -> bytes | None:
    """The status line and headers of ``response`` to ``request`` exactly as aiohttp's
    ``web.Response`` writes them (given headers, ``Content-Length``, ``Content-Type`` when a
    body has none, ``Date``, ``Server``, ``Connection`` when keep-alive differs from the
    version's default); ``None`` for a response aiohttp must write itself: a status without a
    standard phrase, one that has no body (1xx, 204, 304), a header aiohttp sets or reads, a
    header or body that is not ``str``/``bytes``, or a forbidden character."""
    version, body = request.version, response.body
    head = _status_line(version, response.status)
    if head is None or type(body) is not bytes:
        return None
    parts = [head]
    typed = _add_headers(parts, response.headers)
    if typed is None:
        return None
    length = len(body)
    if request.method == "HEAD":
        if length:
            parts += ("Content-Length: ", str(length), "\r\n")
    else:
        parts += ("Content-Length: ", str(length), "\r\n")
        if length and not typed:
            parts.append("Content-Type: application/octet-stream\r\n")
    parts += ("Date: ", rfc822_formatted_time(), _SERVER_LINE)
    if keep_alive:
        if version == HttpVersion10:
            parts.append("Connection: keep-alive\r\n")
    elif version == HttpVersion11:
        parts.append("Connection: close\r\n")
    parts.append("\r\n")
    return "".join(parts).encode()


def _status_line(version: HttpVersion, status: int) -> str | None:
    if version is HttpVersion11:
        return _STATUS_LINES_11.get(status)
    reason = _REASONS.get(status)
    if reason is None or status in EMPTY_BODY_STATUS_CODES:
        return None
    return f"HTTP/{version.major}.{version.minor} {status} {reason}\r\n"


def _add_headers(parts: list[str], headers: Mapping[str, str]) -> bool | None:
    """Append ``headers`` to ``parts``; whether one is Content-Type, ``None`` when one cannot
    be written here (see :func:`encode_head`)."""
    typed = False
    for name, value in headers.items():
        content_type = _NAMES.get(name)
        if content_type is None:
            content_type = _check_name(name)
            if content_type is None:
                return None
        # Printable text holds no control character; anything else is looked at closely.
        if type(value) is not str or not (value.isprintable() or _allowed(value)):
            return None
        typed = typed or content_type
        parts += (name, ": ", value, "\r\n")
    return typed


def _allowed(text: str) -> bool:
    """Whether aiohttp writes ``text`` in a header: no control character but tab."""
    return _CONTROL.search(text) is None


def _check_name(name: object) -> bool | None:
    """Whether header ``name`` is Content-Type; ``None`` if :func:`encode_head` may not write it
    (not a ``str``, one aiohttp writes itself, or holding a character aiohttp refuses)."""
    if type(name) is not str:
        return None
    lower = name.lower()
    if lower in _OWN_HEADERS or not _allowed(name):
        return None
    content_type = lower == "content-type"
    if len(_NAMES) < _NAMES_MAX:
        _NAMES[name] = content_type
    return content_type


@dataclass(frozen=True, slots=True)
class _ParseError:
    """A request the parser refused, in the queue in its place."""

    exc: HttpProcessingError


#: What aiohttp answers a request it could not parse as (HTTP/1.0, no headers, closing).
_UNPARSED: Final = RawRequestMessage(
    "UNKNOWN", "/", HttpVersion10, CIMultiDictProxy(CIMultiDict()), (), True, None, False, False,
    URL("/"),
)  # fmt: skip

_Queued = tuple[RawRequestMessage | _ParseError, StreamReader]


class _Connection(BaseProtocol):
    """One HTTP/1.1 connection: aiohttp's C parser in, the adapter's answers out, one request
    at a time (pipelined ones wait their turn), each in its own task (so that context variables
    never leak from one event to the next); plus a header timeout, the connection cap's
    bookkeeping and malformed HTTP answered in the platform's envelope.

    The header timer is armed only when a request's headers do not arrive whole in one read:
    a request sent in one piece costs one attribute test. The keep-alive timer is one handle per
    connection, moved on (not replaced) after each response."""

    __slots__ = (
        "_adapter", "_close", "_connections", "_context", "_force_close", "_header_timer",
        "_headers_seen", "_idle_since", "_keepalive_handle", "_keepalive_timeout",
        "_lingering_time", "_payload", "_queue", "_request_count", "_server", "_tail", "_task",
        "reading_body",
    )  # fmt: skip

    def __init__(self, server: _Server, loop: asyncio.AbstractEventLoop) -> None:
        parser = HttpRequestParser(
            self,
            loop,
            _READ_BUFSIZE,
            max_line_size=_MAX_LINE,
            max_field_size=_MAX_LINE,
            max_headers=_MAX_HEADERS,
            payload_exception=RequestPayloadError,
            max_msg_queue_size=_MAX_QUEUED,
        )
        super().__init__(loop, parser)
        self._server = server
        self._adapter = server.adapter
        self._connections = server.open
        self._keepalive_timeout = server.keepalive_timeout
        self._lingering_time = server.lingering_time
        self._queue: deque[_Queued] = deque()
        self._task: asyncio.Task[None] | None = None  # the request being handled or answered
        self._payload: StreamReader | None = None  # its body
        self._request_count = 0  # requests whose headers were parsed
        self._idle_since = loop.time()  # when it opened or last finished a response
        self._keepalive_handle: asyncio.TimerHandle | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._headers_seen = 0  # requests parsed when the header timer was armed
        self._close = False  # no request after the current one
        self._force_close = False  # closed, or closing without answering
        self._tail = b""  # what came after an upgrade request, parsed once it is answered
        self.reading_body = False  # set by the adapter while a body trickles in
        # Each request's task starts from a copy of this context, never from the previous
        # request's (a pipelined request is started from that one's task): nothing a handler
        # sets in a context variable reaches the next event.
        self._context = contextvars.copy_context()

    # ------------------------------------------------------------ the cap's view

    def eviction_order(self) -> tuple[int, float]:
        """Which evictable connection goes first: one that never completed a request's headers
        (idle since it opened, or a slowloris), then one in the middle of a request after
        serving others (headers or a body trickling), and last an idle keep-alive connection
        that has served events (a genuine client between two events); the longest idle first
        within each."""
        if not self._request_count:
            rank = 0
        elif self._header_timer is not None or self.reading_body:
            rank = 1
        else:
            rank = 2
        return rank, self._idle_since

    def evictable(self) -> bool:
        """Idle, still sending its headers, or still sending its body: no event in hand."""
        return not self._force_close and (self._waiting or self.reading_body)

    @property
    def _waiting(self) -> bool:
        """Waiting for a request (none in hand, none parsed and queued)."""
        return self._task is None and not self._queue

    @property
    def remote(self) -> str | None:
        """The client's address, as aiohttp's ``request.remote`` gives it."""
        peer = None if self.transport is None else self.transport.get_extra_info("peername")
        if peer is None:
            return None
        return str(peer[0]) if isinstance(peer, list | tuple) else str(peer)

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        tcp_keepalive(self.transport)
        self._server.connection_made(self, self.transport)  # type: ignore[arg-type]
        loop = self._loop
        # Armed at once: nothing else protects against a connection that never sends a request.
        self._idle_since = loop.time()
        if self._keepalive_timeout > 0:
            self._keepalive_handle = loop.call_at(
                self._idle_since + self._keepalive_timeout, self._keepalive_check
            )
        self._connections.opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._connections.closed(self)
        self._server.connection_lost(self, exc)
        self._force_close = True
        for handle in (self._header_timer, self._keepalive_handle):
            if handle is not None:
                handle.cancel()
        self._header_timer = self._keepalive_handle = None
        super().connection_lost(exc)
        payload = self._payload
        if payload is not None and not payload.is_eof():  # a body still being read fails
            payload.set_exception(exc or ConnectionResetError("Connection lost"))
        self._queue.clear()
        self._parser = None

    def eof_received(self) -> None:
        """The client half-closed: the transport closes (aiohttp's servers do the same)."""

    def resume_reading(self, resume_parser: bool = True) -> None:
        # A body's reader calls this after every read that leaves it under its low-water mark,
        # paused or not; re-feeding the parser an empty chunk each time cost a parse per event.
        if self._reading_paused:
            super().resume_reading(resume_parser)

    def data_received(self, data: bytes) -> None:
        if self._force_close or self._close:
            return
        idle = self._waiting  # waiting for a request: these bytes start its headers
        if self._upgraded:  # an upgrade request not answered yet: keep what follows it
            self._tail += data
            if not self._buffer_paused and len(self._tail) >= _READ_BUFSIZE:
                self._pause_reading_for_buffer()
            return
        parsed = self._parse(data)
        if self._header_timer is not None:
            if self._request_count != self._headers_seen:  # the headers are complete
                self._header_timer.cancel()
                self._header_timer = None
        elif idle and not parsed and not self._force_close:
            self._headers_seen = self._request_count
            self._header_timer = self._loop.call_later(
                self._connections.header_timeout, self._headers_overdue
            )
        if parsed and self._task is None:
            self._next()

    def _parse(self, data: bytes) -> bool:
        """Feed the parser; queue what it completed (a refusal in place of malformed HTTP)."""
        assert self._parser is not None
        try:
            messages, upgraded, tail = self._parser.feed_data(data)
        except HttpProcessingError as exc:
            self._request_count += 1
            self._queue.append((_ParseError(exc), EMPTY_PAYLOAD))
            return True
        for message in messages:
            self._request_count += 1
            self._queue.append(message)
        self._upgraded = upgraded
        if upgraded and tail:
            self._tail = tail
        if not self._buffer_paused and len(self._queue) >= _MAX_QUEUED:
            self._pause_reading_for_buffer()  # bounds what pipelining can pin
        return bool(messages)

    def _next(self) -> None:
        """Answer the next queued request, in a task of its own. The task is in place before
        reading resumes: what the parser held back is queued behind it, not started beside it."""
        request, payload = self._queue.popleft()
        assert self._parser is not None
        self._parser.message_consumed()
        self._payload = payload
        self._task = self._loop.create_task(
            self._respond(request, payload), context=self._context.copy()
        )
        if self._buffer_paused and len(self._queue) <= _MAX_QUEUED // 2:
            self._resume_reading_if_drained()

    def _resume_reading_if_drained(self) -> None:
        if self._tail and len(self._tail) >= _READ_BUFSIZE:
            return
        if not self._upgraded:
            # Parse what the parser holds while still paused, so that a refill past the limit
            # does not pause again a paused transport; resume only if the queue stayed short.
            self.data_received(b"")
            if len(self._queue) >= _MAX_QUEUED:
                return
        self._resume_reading_for_buffer()

    # ------------------------------------------------------------ one request

    async def _respond(
        self, request: RawRequestMessage | _ParseError, payload: StreamReader
    ) -> None:
        keep_alive = False
        try:
            keep_alive = await self._exchange(request, payload)
        except Exception as exc:  # an answer aiohttp refused to write (header injection)
            server_logger.exception("Unhandled exception", exc_info=exc)
            self.force_close()
        finally:
            self._task = self._payload = None
        if not (keep_alive and not self._close and not self._force_close):
            if self.transport is not None:
                self.transport.close()
            return
        self._idle_since = self._loop.time()
        if self._keepalive_handle is None and self._keepalive_timeout > 0:
            self._keepalive_handle = self._loop.call_at(
                self._idle_since + self._keepalive_timeout, self._keepalive_check
            )
        if self._upgraded and not self._queue:
            self._resume_after_upgrade()  # may start the next request itself
        if self._queue and self._task is None:
            self._next()

    async def _exchange(
        self, request: RawRequestMessage | _ParseError, payload: StreamReader
    ) -> bool:
        """Answer ``request``; then drain what is left of its body (bounded by the lingering
        time, so that the answer is not lost to a reset); whether the connection stays open."""
        if isinstance(request, _ParseError):
            answer = self._error_answer(_UNPARSED, 400, request.exc)
            return await self._write(_UNPARSED, payload, answer)
        try:
            refused = self._expect(request) if "Expect" in request.headers else None
            answer = refused or await self._adapter.answer(self, request, payload)
        except TimeoutError:
            answer = self._error_answer(request, 504, None)
        except Exception as exc:  # a body that broke off, or a bug: answered, never a traceback
            answer = self._error_answer(request, 500, exc)
        keep_alive = await self._write(request, payload, answer)
        if not payload.is_eof():
            await self._linger(payload)
        return keep_alive

    def _expect(self, request: RawRequestMessage) -> _Answer | None:
        """``Expect: 100-continue`` answered as aiohttp's applications do; 417 for another."""
        expect = request.headers.get("Expect")
        if not expect or request.version != HttpVersion11:
            return None
        if expect.lower() != "100-continue":
            return _Answer(_text(417, f"Unknown Expect: {expect}"))
        if self.transport is not None:
            self.transport.write(_CONTINUE)
        return None

    async def _write(
        self, request: RawRequestMessage, payload: StreamReader, answer: _Answer
    ) -> bool:
        """Write ``answer``; whether the connection may serve another request."""
        keep_alive = not (request.should_close or answer.close)
        response = answer.response
        head = encode_head(request, response, keep_alive)
        if head is None:
            return await self._write_with_aiohttp(request, payload, answer)
        transport = self.transport
        if transport is None or transport.is_closing():
            return False  # the client left: nothing to answer
        transport.write(head if request.method == "HEAD" else head + response.body)
        if self._paused:  # the client reads slowly: wait, as aiohttp's writer does
            try:
                await self._drain_helper()
            except ConnectionError:
                return False
        return keep_alive

    async def _write_with_aiohttp(
        self, request: RawRequestMessage, payload: StreamReader, answer: _Answer
    ) -> bool:
        """A response :func:`encode_head` does not write, written by ``web.Response``."""
        writer = StreamWriter(self, self._loop)
        task = asyncio.current_task()
        assert task is not None
        web_request = web.BaseRequest(request, payload, self, writer, task, self._loop)  # type: ignore[arg-type]
        response = answer.response
        web_response = web.Response(
            status=response.status, body=response.body, headers=response.headers
        )
        if answer.close:
            web_response.force_close()
        try:
            await web_response.prepare(web_request)
            await web_response.write_eof()
        except ConnectionError:
            return False
        return bool(web_response.keep_alive)

    async def _linger(self, payload: StreamReader) -> None:
        """Read and drop the rest of a body not read (a refusal before it), for the lingering
        time at most; the connection closes after the answer if it did not all come."""
        loop = self._loop
        now = loop.time()
        end = now + self._lingering_time
        if not self._force_close and self._lingering_time:
            try:
                while not payload.is_eof() and now < end:
                    async with ceil_timeout(end - now):
                        await payload.readany()
                    now = loop.time()
            except (asyncio.CancelledError, TimeoutError):
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
        if not payload.is_eof() and not self._force_close:
            self._close = True

    def _error_answer(
        self, request: RawRequestMessage, status: int, exc: BaseException | None
    ) -> _Answer:
        """Malformed HTTP (400) or a failure while answering (500, 504): the platform's
        envelope, one throttled log line without the raw bytes, the connection closed after."""
        error = _protocol_error(status, exc)
        log = self._connections.log
        if isinstance(exc, HttpProcessingError):
            log.warning("malformed HTTP request refused", key=error.message, error=error.message)
        elif self.transport is not None:  # else the client left (during its body, say)
            error_text = describe(exc) if exc is not None else error.message
            log.error("request failed", key=error_text, status=error.status, error=error_text)
        response = error_response(error, _trace_of(request.headers), self._connections.errors)
        return _Answer(response, close=True)

    def _resume_after_upgrade(self) -> None:
        """An upgrade request was answered like any other: parse what came after it."""
        assert self._parser is not None
        self._parser.set_upgraded(False)
        self._upgraded = False
        tail, self._tail = self._tail, b""
        if tail:
            self._parse(tail)
        if self._buffer_paused and len(self._queue) < _MAX_QUEUED:
            self._resume_reading_if_drained()

    # ------------------------------------------------------------ timers and closing

    def _keepalive_check(self) -> None:
        self._keepalive_handle = None
        if self._force_close:
            return
        now = self._loop.time()
        close_at = self._idle_since + self._keepalive_timeout
        if now < close_at:  # it served a request since: wait for its own idle time
            self._keepalive_handle = self._loop.call_at(close_at, self._keepalive_check)
        elif self._waiting:
            self.force_close()
        # else a request is in hand: the timer starts again once it is answered

    def _headers_overdue(self) -> None:
        self._header_timer = None
        if self._request_count == self._headers_seen and self._waiting:
            self._connections.log.warning(
                "connection closed: headers not complete in time",
                key="headers",
                header_timeout=self._connections.header_timeout,
            )
            self._connections.close(self)

    def force_close(self) -> None:
        """Close now, without answering what is in hand."""
        self._force_close = True
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def close(self) -> None:
        """Serve no request after the current one (at shutdown); an idle connection closes."""
        self._close = True
        if self._waiting:
            self.force_close()

    async def shutdown(self, timeout: float | None) -> None:  # noqa: ASYNC109 - aiohttp's call
        """Let the request in hand finish within ``timeout`` seconds, then close."""
        self._force_close = True
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None
        task = self._task
        if task is not None and not task.done():
            try:
                async with ceil_timeout(timeout):
                    await asyncio.shield(task)
            except (asyncio.CancelledError, TimeoutError):
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
            task.cancel()
        self.force_close()

    # aiohttp's web.BaseRequest reads these (only for responses it writes).
    @property
    def ssl_context(self) -> Any:
        return None if self.transport is None else self.transport.get_extra_info("sslcontext")

    @property
    def peername(self) -> Any:
        return None if self.transport is None else self.transport.get_extra_info("peername")

    @property
    def sockname(self) -> Any:
        return None if self.transport is None else self.transport.get_extra_info("sockname")


def _protocol_error(status: int, exc: BaseException | None) -> WorkerError:
    if isinstance(exc, LineTooLong):
        return EventError(
            f"malformed HTTP request: a line is longer than {exc.args[1]} bytes",
            code="BAD_REQUEST",
        )
    if isinstance(exc, HttpProcessingError):
        problem = _ECHO.sub("", exc.message).strip().replace("\n", " ")
        text = problem.encode("ascii", "backslashreplace").decode()[:200] or "unreadable"
        return EventError(f"malformed HTTP request: {text}", status=exc.code or 400,
                          code="BAD_REQUEST")  # fmt: skip
    if status == 504:
        return WorkerError("the handler timed out", status=504, code="DEADLINE_EXCEEDED")
    return WorkerError("internal error", status=status)


async def _no_handler(request: web.BaseRequest) -> web.StreamResponse:
    raise NotImplementedError("requests are answered by _Connection")


class _Server(web.Server):
    """aiohttp's low-level server (its runner, sites and shutdown) making :class:`_Connection`
    protocols for ``adapter``."""

    def __init__(
        self,
        adapter: HttpAdapter,
        connections: Connections,
        *,
        keepalive_timeout: float,
        lingering_time: float,
    ) -> None:
        super().__init__(_no_handler)
        self.adapter = adapter
        self.open = connections
        self.keepalive_timeout = keepalive_timeout
        self.lingering_time = lingering_time

    def __call__(self) -> _Connection:  # type: ignore[override]
        return _Connection(self, self._loop)

    def connection_lost(self, handler: Any, exc: BaseException | None = None) -> None:
        """A connection whose client went away while its event runs stays known until the event
        ends (as in aiohttp's server), so that a shutdown gives that event its grace period."""
        task = getattr(handler, "_task", None)
        if task is not None and not task.done():
            task.add_done_callback(lambda _: self._connections.pop(handler, None))
        else:
            self._connections.pop(handler, None)


def app_runner(
    adapter: HttpAdapter,
    *,
    grace: float,
    keepalive_timeout: float,
    header_timeout: float = 10.0,
    max_connections: int = 1000,
) -> web.BaseRunner:
    """aiohttp's runner of ``adapter`` (not set up): in-flight events get ``grace`` seconds at
    cleanup; a connection idle for ``keepalive_timeout``, or whose request headers are not
    complete ``header_timeout`` seconds after their first byte, closes; at most
    ``max_connections`` are open (see :class:`Connections`). A connection refused for a slow
    body closes at most ``body_timeout`` after its 408."""
    connections = Connections(
        cap=max_connections,
        header_timeout=header_timeout,
        errors=adapter._dispatcher.error_context,
        log=adapter._log,
    )
    return _Runner(
        adapter,
        connections,
        shutdown_timeout=grace,
        keepalive_timeout=keepalive_timeout,
        # After a refusal (408, 413) the unread rest of a body is drained before closing, so
        # that the answer is not lost to a reset: for body_timeout at most (aiohttp: 10 s).
        lingering_time=adapter._body_timeout,
    )


class _Runner(web.BaseRunner):
    """Sets up a :class:`_Server` on the running loop (aiohttp's ``ServerRunner`` takes one
    already made)."""

    __slots__ = ("_adapter", "_connections", "_keepalive", "_lingering")

    def __init__(
        self,
        adapter: HttpAdapter,
        connections: Connections,
        *,
        shutdown_timeout: float,
        keepalive_timeout: float,
        lingering_time: float,
    ) -> None:
        super().__init__(handle_signals=False, shutdown_timeout=shutdown_timeout)
        self._adapter = adapter
        self._connections = connections
        self._keepalive = keepalive_timeout
        self._lingering = lingering_time

    async def shutdown(self) -> None:
        pass

    async def _make_server(self) -> web.Server:
        return _Server(self._adapter, self._connections, keepalive_timeout=self._keepalive,
                       lingering_time=self._lingering)  # fmt: skip

    async def _cleanup_server(self) -> None:
        pass


async def serve(
    adapter: HttpAdapter,
    *,
    host: str,
    port: int,
    stop: asyncio.Event,
    grace: float,
    started: Callable[[int], None] | None = None,
    keepalive_timeout: float = 75.0,
    header_timeout: float = 10.0,
    max_connections: int = 1000,
    client_connections: int = 100,
) -> None:
    """Serve until ``stop`` is set, then drain in-flight events for up to ``grace`` seconds.

    Timeouts and the cap as :func:`app_runner` says; the cap is lowered (and the fact logged)
    when the file descriptor limit cannot hold ``max_connections`` besides the BioT client's
    ``client_connections``. Connections are accepted by :class:`_Acceptor`."""
    cap = connection_cap(max_connections, client_connections)
    if cap < max_connections:
        adapter._log.warning(
            "connection cap lowered to fit the file descriptor limit",
            max_connections=max_connections,
            cap=cap,
            fd_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        )
    runner = app_runner(
        adapter,
        grace=grace,
        keepalive_timeout=keepalive_timeout,
        header_timeout=header_timeout,
        max_connections=cap,
    )
    await runner.setup()
    try:
        assert runner.server is not None
        async with _Acceptor(runner.server, await _listen(host, port), adapter._log) as acceptor:
            if started is not None:
                started(acceptor.port)
            await stop.wait()
    finally:
        await runner.cleanup()


class _Acceptor:
    """Accepts connections on listening sockets and hands them to ``server``, at most
    :data:`ACCEPT_BURST` per wake-up. Out of file descriptors, it stops accepting for
    :data:`ACCEPT_PAUSE` seconds and says so once a second at most (asyncio's own accept loop
    in Python 3.11 retries the whole backlog after such an error, logging each time: tens of
    thousands of lines a minute). Closing it closes the sockets."""

    def __init__(self, server: web.Server, sockets: list[socket.socket], log: Log) -> None:
        self._server = server
        self._sockets = sockets
        self._log = Throttle(log)
        self._loop = asyncio.get_running_loop()
        self._handovers: set[asyncio.Task[Any]] = set()
        self._paused: dict[socket.socket, asyncio.TimerHandle] = {}

    @property
    def port(self) -> int:
        return int(self._sockets[0].getsockname()[1])

    async def __aenter__(self) -> _Acceptor:
        for sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for handle in self._paused.values():
            handle.cancel()
        for sock in self._sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        await asyncio.gather(*self._handovers, return_exceptions=True)

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BURST):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in _OUT_OF_DESCRIPTORS:
                    raise  # the event loop logs it and keeps serving
                self._pause(listener, exc)
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._loop.connect_accepted_socket(self._server, conn))
            self._handovers.add(task)
            task.add_done_callback(self._handovers.discard)

    def _pause(self, listener: socket.socket, exc: OSError) -> None:
        self._log.error(
            "not accepting connections: out of file descriptors",
            key=str(exc.errno),
            error=describe(exc),
            pause=ACCEPT_PAUSE,
            fd_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        )
        self._loop.remove_reader(listener.fileno())
        self._paused[listener] = self._loop.call_later(ACCEPT_PAUSE, self._resume, listener)

    def _resume(self, listener: socket.socket) -> None:
        del self._paused[listener]
        self._loop.add_reader(listener.fileno(), self._accept, listener)


async def _listen(host: str, port: int, backlog: int = 128) -> list[socket.socket]:
    """Listening sockets on every address ``host`` resolves to (as asyncio's ``create_server``
    binds them: address reuse, IPv6 only on IPv6 sockets); an address in use raises OSError."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
