"""The HTTP adapter: BioT (or anything playing it) POSTs events; we answer with the dispatcher's
response.

Routes: ``POST /`` (any path, so a subscription endpoint may carry one) for events,
``GET /healthz`` (the process is alive) and ``GET /readyz`` (the public key and a service token
can be obtained, and which is not: see :mod:`worker.adapters.health`). More than
``max_in_flight`` events at once answer 503 with ``Retry-After`` instead of queueing without
bound; a body over ``max_body_bytes`` answers 413; a header value that is not UTF-8 answers 400.
Malformed HTTP, which aiohttp's parser refuses, answers 400 in the platform's error envelope too
(``BAD_REQUEST``, naming the problem, never echoing the bytes).
Nothing reaches the caller as a traceback.

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
import errno
import re
import resource
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from worker.adapters.health import Health, add_health_routes, to_web, trace_of
from worker.dispatch import Dispatcher
from worker.errors import EventError, Overloaded, PayloadTooLarge, WorkerError
from worker.events import event_from_http, hook_from_header
from worker.logs import Log, Throttle, describe
from worker.responses import ErrorContext, error_response

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
        self._log = log
        self.in_flight = 0

    def application(self) -> web.Application:
        # client_max_size bounds what aiohttp buffers; we check Content-Length before reading.
        app = web.Application(client_max_size=self._max_body)
        add_health_routes(app, self._health, lambda: self.in_flight, self._metrics)
        app.router.add_post("/{tail:.*}", self._event)
        return app

    async def _event(self, request: web.Request) -> web.StreamResponse:
        received_at = asyncio.get_running_loop().time()
        if not "".join(request.headers.values()).isascii():  # O(1) per value: the common case
            bad = _undecodable_header(request)
            if bad is not None:
                return self._refuse(request, _not_utf8(bad), received_at)
        length = request.content_length
        if length is not None and length > self._max_body:
            return self._refuse(request, _too_large(length, self._max_body), received_at)
        try:
            if request.content.is_eof():  # the whole body came with the headers: no timer
                body = await request.read()
            else:
                body = await self._read_slow_body(request)
        except web.HTTPRequestEntityTooLarge:
            return self._refuse(request, _too_large(None, self._max_body), received_at)
        except TimeoutError:
            response = self._refuse(request, _body_too_slow(self._body_timeout), received_at)
            response.force_close()  # the rest of the body may still come: do not wait for it
            return response
        # The slot is taken only now: a client sending its body slowly holds none.
        if self.in_flight >= self._max_in_flight:
            overloaded = Overloaded("too many events in flight")
            return self._refuse(request, overloaded, received_at, retry=True)
        self.in_flight += 1
        try:
            event = event_from_http(request.headers, body, received_at=received_at)
            if self._traced:
                event.transport = _span_attributes(request)
            return to_web(await self._dispatcher.dispatch(event))
        finally:
            self.in_flight -= 1

    async def _read_slow_body(self, request: web.Request) -> bytes:
        """The body, within ``body_timeout``; meanwhile the connection may be closed by the
        connection cap, as an idle one would."""
        connection = request.protocol
        if isinstance(connection, _Connection):
            connection.reading_body = True
        try:
            async with asyncio.timeout(self._body_timeout):
                return await request.read()
        finally:
            if isinstance(connection, _Connection):
                connection.reading_body = False

    def _refuse(
        self, request: web.Request, error: WorkerError, received_at: float, *, retry: bool = False
    ) -> web.Response:
        """An event answered here, before dispatch: counted, traced and logged as one."""
        hook = hook_from_header(request.headers.get("hooktype"))[0]
        transport = _span_attributes(request) if self._traced else None
        outcome = self._dispatcher.refuse(
            hook, trace_of(request), error, received_at, transport,
            headers={"retry-after": "1"} if retry else None,
        )  # fmt: skip
        if self._metrics is not None and isinstance(error, Overloaded):
            self._metrics.overloaded(hook.value)
        return to_web(outcome.response)


def _span_attributes(request: web.Request) -> dict[str, Any]:
    """The HTTP server span's attributes (OpenTelemetry's semantic conventions)."""
    host, _, port = (request.host or "").rpartition(":")
    attributes: dict[str, Any] = {
        "http.request.method": request.method,
        "url.path": request.path,
        "url.scheme": request.scheme,
        "network.protocol.version": f"{request.version.major}.{request.version.minor}",
    }
    if host and port.isdigit():
        attributes["server.address"], attributes["server.port"] = host, int(port)
    elif request.host:
        attributes["server.address"] = request.host
    if request.remote:
        attributes["client.address"] = request.remote
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


def _undecodable_header(request: web.Request) -> str | None:
    """The name of the first header whose value is not UTF-8 (aiohttp keeps such bytes as lone
    surrogates), or None. Names are HTTP tokens, which the parser checked: ASCII. The token of
    an interceptor or NONSPECIFIC call is the dispatcher's to refuse (400 ``JWT_ERROR``, as in a
    queue message or a Lambda event); a notification carries its token in its body and ignores
    the header, so bad bytes there are refused here like any other header's."""
    for name, value in request.headers.items():
        try:
            value.encode()
        except UnicodeEncodeError:
            if name.lower() != "authorization" or _notification(request):
                return name  # a notification's token is in its body: nothing else refuses it
    return None


def _notification(request: web.Request) -> bool:
    return request.headers.get("hooktype", "").strip().upper() == "NOTIFICATION"


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


class _Connection(RequestHandler):
    """aiohttp's protocol plus a header timeout, the connection cap's bookkeeping and
    malformed HTTP answered in the platform's envelope.

    The header timer is armed only when a request's headers do not arrive whole in one read:
    a request sent in one piece costs one attribute test."""

    __slots__ = ("_connections", "_header_timer", "_headers_seen", "reading_body")

    def __init__(self, manager: web.Server, *, connections: Connections, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._connections = connections
        self._header_timer: asyncio.TimerHandle | None = None
        self._headers_seen = 0  # requests parsed when the timer was armed
        self.reading_body = False  # set by the adapter while a body trickles in

    def idle_since(self) -> float:
        """When the connection opened or last finished a response (aiohttp's keep-alive mark)."""
        return self._next_keepalive_close_time - self._keepalive_timeout

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
        return rank, self.idle_since()

    def evictable(self) -> bool:
        """Idle, still sending its headers, or still sending its body: no event in hand."""
        return not self._force_close and (self._waiter is not None or self.reading_body)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._connections.opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._connections.closed(self)
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        idle = self._waiter is not None  # waiting for a request: these bytes start its headers
        super().data_received(data)
        if self._header_timer is not None:
            if self._request_count != self._headers_seen:  # the headers are complete
                self._header_timer.cancel()
                self._header_timer = None
        elif idle and not self._messages and not self._force_close:
            self._headers_seen = self._request_count
            self._header_timer = self._loop.call_later(
                self._connections.header_timeout, self._headers_overdue
            )

    def _headers_overdue(self) -> None:
        self._header_timer = None
        if self._request_count == self._headers_seen and self._waiter is not None:
            self._connections.log.warning(
                "connection closed: headers not complete in time",
                key="headers",
                header_timeout=self._connections.header_timeout,
            )
            self._connections.close(self)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to malformed HTTP (400) or a handler that raised (500, 504): the
        platform's envelope, one throttled log line without the raw bytes, connection closed."""
        if request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)  # raises: answer begun
        error = _protocol_error(status, exc)
        if isinstance(exc, HttpProcessingError):
            self._connections.log.warning(
                "malformed HTTP request refused", key=error.message, error=error.message
            )
        elif self.transport is not None:  # else the client left (during its body, say)
            error_text = describe(exc) if exc is not None else error.message
            self._connections.log.error(
                "request failed", key=error_text, status=error.status, error=error_text
            )
        trace = trace_of(request)
        response = to_web(error_response(error, trace, self._connections.errors))
        response.force_close()
        return response


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


class _Server(web.Server):
    """aiohttp's server making :class:`_Connection` protocols."""

    def __init__(self, made: web.Server, connections: Connections) -> None:
        super().__init__(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            **made._kwargs,
        )
        self.open = connections

    def __call__(self) -> RequestHandler:
        return _Connection(self, loop=self._loop, connections=self.open, **self._kwargs)


class _Runner(web.AppRunner):
    __slots__ = ("_connections",)

    def __init__(self, app: web.Application, connections: Connections, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._connections = connections

    async def _make_server(self) -> web.Server:
        return _Server(await super()._make_server(), self._connections)


def app_runner(
    adapter: HttpAdapter,
    *,
    grace: float,
    keepalive_timeout: float,
    header_timeout: float = 10.0,
    max_connections: int = 1000,
) -> web.AppRunner:
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
        adapter.application(),
        connections,
        shutdown_timeout=grace,
        access_log=None,
        handle_signals=False,
        keepalive_timeout=keepalive_timeout,
        # After a refusal (408, 413) the unread rest of a body is drained before closing, so
        # that the answer is not lost to a reset: for body_timeout at most (aiohttp: 10 s).
        lingering_time=adapter._body_timeout,
    )


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
