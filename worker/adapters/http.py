"""The HTTP adapter: BioT (or anything playing it) POSTs events; we answer with the dispatcher's
response.

Routes: ``POST /`` (any path, so a subscription endpoint may carry one) for events,
``GET /healthz`` (the process is alive) and ``GET /readyz`` (the public key and a service token
can be obtained). More than ``max_in_flight`` events at once answer 503 with ``Retry-After``
instead of queueing without bound; a body over ``max_body_bytes`` answers 413; aiohttp's own
parser answers malformed HTTP with a plain 400. Nothing reaches the caller as a traceback.

Hostile clients: an event takes an in-flight slot only once its body is read, and reading it is
bounded by ``body_timeout`` (slower answers 408 and the connection is closed), so slow bodies
cannot hold the slots genuine events need. :func:`serve` closes a connection idle for
``keepalive_timeout``; aiohttp arms that timer when a connection opens and after each response
and data does not reset it, so it also bounds how long a client may take to send its headers.

Shutdown (:func:`serve`): the listening socket closes first, in-flight events get up to the
grace period to finish, then the caller closes what the dispatcher uses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from worker.dispatch import Dispatcher
from worker.errors import EventError, Overloaded, PayloadTooLarge, WorkerError
from worker.events import event_from_http, lower_headers
from worker.logs import Log
from worker.responses import Response, error_response, json_response
from worker.tracing import trace_from_headers

ReadyCheck = Callable[[], Awaitable[None]]


class HttpAdapter:
    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        max_in_flight: int,
        max_body_bytes: int,
        ready: ReadyCheck,
        log: Log,
        body_timeout: float = 10.0,
    ) -> None:
        self._dispatcher = dispatcher
        self._max_in_flight = max_in_flight
        self._max_body = max_body_bytes
        self._body_timeout = body_timeout
        self._ready = ready
        self._log = log
        self.in_flight = 0

    def application(self) -> web.Application:
        # client_max_size bounds what aiohttp buffers; we check Content-Length before reading.
        app = web.Application(client_max_size=self._max_body)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_post("/{tail:.*}", self._event)
        return app

    async def _event(self, request: web.Request) -> web.StreamResponse:
        received_at = asyncio.get_running_loop().time()
        length = request.content_length
        if length is not None and length > self._max_body:
            return self._refuse(request, _too_large(length, self._max_body))
        try:
            if request.content.is_eof():  # the whole body came with the headers: no timer
                body = await request.read()
            else:
                async with asyncio.timeout(self._body_timeout):
                    body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._refuse(request, _too_large(None, self._max_body))
        except TimeoutError:
            response = self._refuse(request, _body_too_slow(self._body_timeout))
            response.force_close()  # the rest of the body may still come: do not wait for it
            return response
        # The slot is taken only now: a client sending its body slowly holds none.
        if self.in_flight >= self._max_in_flight:
            return self._refuse(request, Overloaded("too many events in flight"), retry=True)
        self.in_flight += 1
        try:
            event = event_from_http(request.headers, body, received_at=received_at)
            return _to_web(await self._dispatcher.dispatch(event))
        finally:
            self.in_flight -= 1

    def _refuse(
        self, request: web.Request, error: WorkerError, *, retry: bool = False
    ) -> web.Response:
        trace = trace_from_headers(lower_headers(request.headers))
        headers = {"retry-after": "1"} if retry else None
        response = error_response(error, trace, self._dispatcher.error_context, headers)
        self._log.warning("event refused", status=error.status, code=error.code)
        return _to_web(response)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "inFlight": self.in_flight})

    async def _readyz(self, request: web.Request) -> web.Response:
        trace = trace_from_headers(lower_headers(request.headers))
        try:
            await self._ready()
        except WorkerError as exc:
            response = error_response(exc, trace, self._dispatcher.error_context)
            return _to_web(Response(503, response.body, response.headers))
        return _to_web(json_response({"status": "ready"}, trace))


def _too_large(length: int | None, limit: int) -> PayloadTooLarge:
    size = f"{length} bytes" if length is not None else "the body"
    return PayloadTooLarge(f"{size} exceeds the limit of {limit} bytes")


def _body_too_slow(timeout: float) -> EventError:
    return EventError(
        f"the body did not arrive within {timeout:g} seconds", status=408, code="REQUEST_TIMEOUT"
    )


def _to_web(response: Response) -> web.Response:
    return web.Response(status=response.status, body=response.body, headers=response.headers)


def app_runner(adapter: HttpAdapter, *, grace: float, keepalive_timeout: float) -> web.AppRunner:
    """aiohttp's runner of ``adapter`` (not set up): in-flight events get ``grace`` seconds at
    cleanup, a connection idle (or still sending its headers) for ``keepalive_timeout`` closes."""
    return web.AppRunner(
        adapter.application(),
        shutdown_timeout=grace,
        access_log=None,
        handle_signals=False,
        keepalive_timeout=keepalive_timeout,
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
) -> None:
    """Serve until ``stop`` is set, then drain in-flight events for up to ``grace`` seconds.

    A connection idle (or still sending its headers) for ``keepalive_timeout`` is closed."""
    runner = app_runner(adapter, grace=grace, keepalive_timeout=keepalive_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        if started is not None:
            started(_bound_port(runner, port))
        await stop.wait()
    finally:
        await runner.cleanup()


def _bound_port(runner: web.AppRunner, default: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return default
