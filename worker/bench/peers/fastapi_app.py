"""Peer (f): the plugin as a FastAPI app on uvicorn, as its docs build a service.

Run: ``python -m uvicorn worker.bench.peers.fastapi_app:app --host 127.0.0.1 --port P
--no-access-log`` (uvicorn's defaults otherwise: with ``fastapi[standard]`` that is uvloop and
httptools; no access log, since the worker writes none either). BioT calls one URL per plugin,
so one path operation, ``POST /``, takes every hook and routes by the ``hooktype`` header and
the payload's ``apiId`` / entity, as the worker does.

The FastAPI way throughout: a lifespan that opens the pooled ``httpx2.AsyncClient``, fetches
BioT's key and logs in once (its state reaches requests as ``request.state``); dependencies
(``Depends``) for the event's trace, its payload (a Pydantic model per hook, parsed by
Pydantic's JSON parser) and the JWT check (``HTTPBearer`` for the header); a response model
serialised by Pydantic straight to JSON bytes (FastAPI's fast path when a path operation has a
response model, which replaced ``ORJSONResponse``); exception handlers answering BioT's error
body. The ``traceparent`` goes back as a response header, as the worker's answers carry it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from worker.bench.peers.plugin import (
    AdaptEntityAnswer,
    Answer,
    Payload,
    Peer,
    PluginError,
    PostAnswer,
    PreAnswer,
    Trace,
    event_token,
    hook_of,
    load_settings,
    open_peer,
    parse_payload,
)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    async with open_peer(load_settings()) as peer:
        yield {"peer": peer}


app = FastAPI(title="BioT plugin (bench peer)", lifespan=lifespan)
bearer = HTTPBearer(auto_error=False)  # a missing token is BioT's 400 JWT_ERROR, not a 403


@dataclass(frozen=True, slots=True)
class Incoming:
    """What the event's headers say, and when it arrived (for the log line's duration)."""

    hook: str
    trace: Trace
    started: float


async def get_peer(request: Request) -> Peer:
    peer: Peer = request.state.peer
    return peer


async def incoming(
    request: Request,
    hooktype: Annotated[str | None, Header()] = None,
    traceparent: Annotated[str | None, Header()] = None,
) -> Incoming:
    event = Incoming(hook_of(hooktype), Trace.from_traceparent(traceparent), time.perf_counter())
    request.state.incoming = event  # for the exception handlers
    return event


async def payload(request: Request, event: Annotated[Incoming, Depends(incoming)]) -> Payload:
    return parse_payload(event.hook, await request.body())


async def claims(
    event: Annotated[Incoming, Depends(incoming)],
    body: Annotated[Payload, Depends(payload)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    peer: Annotated[Peer, Depends(get_peer)],
) -> dict[str, Any]:
    header_token = credentials.credentials if credentials is not None else None
    return peer.verify(event_token(body, header_token), event.hook)


@app.post("/", response_model=PreAnswer | PostAnswer | AdaptEntityAnswer)
async def handle_event(
    event: Annotated[Incoming, Depends(incoming)],
    body: Annotated[Payload, Depends(payload)],
    verified: Annotated[dict[str, Any], Depends(claims)],
    peer: Annotated[Peer, Depends(get_peer)],
    response: Response,
) -> Answer | Response:
    answer = await peer.answer(body, event.trace)
    peer.log_event(event.hook, event.trace, event.started)
    if answer is None:  # a notification: 200, no body
        return Response(status_code=200, headers={"traceparent": event.trace.traceparent})
    response.headers["traceparent"] = event.trace.traceparent
    return answer


@app.exception_handler(PluginError)
async def plugin_error(request: Request, exc: PluginError) -> JSONResponse:
    event: Incoming = request.state.incoming
    peer: Peer = request.state.peer
    peer.log_event(event.hook, event.trace, event.started, exc)
    headers = {"traceparent": event.trace.traceparent}
    return JSONResponse(peer.error_body(exc, event.trace), exc.status, headers)


@app.exception_handler(Exception)
async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    """A handler's bug: BioT's 500 body, the traceback in the log (never in the answer)."""
    event: Incoming = request.state.incoming
    peer: Peer = request.state.peer
    trace = {"traceId": event.trace.trace_id}
    peer.log.exception("handler raised an unexpected error", extra=trace)
    return await plugin_error(request, PluginError(500, "INTERNAL_SERVER_ERROR", "internal error"))
