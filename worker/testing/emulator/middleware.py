"""The emulator's edge: trace binding, caller identification, call log, faults, error envelope.

Order, outermost first: :func:`observe` (trace, caller, call log, ``traceparent`` on the answer),
:func:`errors` (every failure becomes BioT's ``ErrorResponse``), :func:`faults` (added latency
and injected statuses). Admin calls under ``/_emulator/`` skip faults and the call log, and so do
calls of deployed plugins' functions under ``/_lambda/`` (plugins, not BioT's APIs: the call log
has them as the hook calls the emulator makes).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from worker.testing.emulator.calllog import CallLog
from worker.testing.emulator.faults import Faults
from worker.testing.emulator.identity import Caller, Rejected, TokenService
from worker.testing.emulator.wire import ApiFailure, PassThrough, error_body, json_response
from worker.tracing import TraceContext, parse_traceparent, trace_from_headers

Sleep = Callable[[float], Awaitable[None]]

ADMIN_PREFIX: Final = "/_emulator/"
LAMBDA_PREFIX: Final = "/_lambda/"
TRACE: Final = web.RequestKey("trace", TraceContext)
AUTH: Final[web.RequestKey[Caller | Rejected]] = web.RequestKey("auth")
_INJECTED: Final = {
    429: ("TOO_MANY_REQUESTS", "Rate exceeded (injected fault)"),
    500: ("INTERNAL_SERVER_ERROR", "Internal server error (injected fault)"),
    503: ("SERVICE_UNAVAILABLE", "Service unavailable (injected fault)"),
}
_log = logging.getLogger(__name__)


def request_trace(request: web.Request) -> TraceContext:
    return request[TRACE]


def require_caller(request: web.Request, scope: str | None = None) -> Caller:
    """The verified caller; 401 ``TOKEN_NOT_VALID`` without a valid token, 403 without ``scope``."""
    auth = request[AUTH]
    if isinstance(auth, Rejected):
        raise auth.failure()
    if scope is not None and scope not in auth.scopes:
        raise ApiFailure(403, "ACCESS_DENIED", f"this API requires {scope} permission")
    return auth


def is_admin(path: str) -> bool:
    """An emulator call that is not BioT's: its control API or a deployed plugin's function."""
    return path.startswith((ADMIN_PREFIX, LAMBDA_PREFIX)) or path == ADMIN_PREFIX.rstrip("/")


def observe(tokens: TokenService, call_log: CallLog) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        headers = {k.lower(): v for k, v in request.headers.items()}
        trace = trace_from_headers(headers)
        request[TRACE] = trace
        auth = tokens.caller(request.headers.get("Authorization"))
        request[AUTH] = auth
        response = await handler(request)
        if not response.prepared:
            response.headers["traceparent"] = trace.child().traceparent
        if not is_admin(request.path):
            sent = parse_traceparent(headers.get("traceparent"))
            call_log.add("in", request.method, request.path, response.status, trace.trace_id,
                         auth.kind, span_id=None if sent is None else sent.span_id)  # fmt: skip
        return response

    return middleware


def errors(environment: str) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiFailure as exc:
            failure = exc
        except PassThrough as exc:
            return web.Response(status=exc.status, body=exc.body, content_type=exc.content_type)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = exc.reason.upper().replace(" ", "_")
            failure = ApiFailure(exc.status, code, f"{exc.reason}: {request.method} {request.path}")
        except Exception as exc:
            _log.exception("emulator handler failed", extra={"traceId": request[TRACE].trace_id})
            failure = ApiFailure(500, "INTERNAL_SERVER_ERROR", f"emulator error: {exc!r}")
        body = error_body(
            failure.code,
            failure.message,
            path=request.path,
            trace_id=request[TRACE].trace_id,
            environment=environment,
            details=failure.details,
        )
        return json_response(body, failure.status, failure.headers)

    return middleware


def faults(settings: Faults, sleep: Sleep) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if is_admin(request.path):
            return await handler(request)
        delay = settings.delay_for(request.method, request.path)
        if delay > 0:
            await sleep(delay)
        status = settings.error_for(request.method, request.path)
        if status is not None:
            raise injected_failure(status)
        return await handler(request)

    return middleware


def injected_failure(status: int) -> ApiFailure:
    code, message = _INJECTED.get(status, ("INJECTED_FAULT", f"Injected fault {status}"))
    headers = {"Retry-After": "1"} if status in (429, 503) else {}
    return ApiFailure(status, code, message, {"injected": True}, headers)
