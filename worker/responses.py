"""What the worker answers: success shapes per hook and BioT's ``ErrorResponse`` envelope.

Every answer is JSON (a body serialised as a JSON document, ``Content-Type: application/json``)
and carries the event's ``traceparent``, whatever the hook, so an adapter only copies
``status``, ``headers`` and ``body`` onto its transport.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from worker.errors import WorkerError
from worker.events import (
    AdaptEntityInterception,
    PostInterception,
    PreInterception,
)
from worker.tracing import TraceContext

JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        """The decoded body (``None`` when empty); for tests and adapters that re-wrap it."""
        return orjson.loads(self.body) if self.body else None


@dataclass(frozen=True, slots=True)
class ErrorContext:
    """What every error body names besides the error: the plugin and its environment."""

    service_name: str
    environment: str


def _headers(trace: TraceContext, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    headers = {"content-type": JSON, "traceparent": trace.traceparent}
    if extra:
        headers.update(extra)
    return headers


def json_response(
    payload: Any, trace: TraceContext, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(status, orjson.dumps(payload), _headers(trace, headers))


def empty_response(trace: TraceContext, status: int = 200) -> Response:
    """A success with no body (notifications: BioT ignores what they answer)."""
    return Response(status, b"", {"traceparent": trace.traceparent})


def pre_response(view: PreInterception, trace: TraceContext) -> Response:
    return json_response({"request": view.request.to_contract()}, trace)


def post_response(view: PostInterception, trace: TraceContext) -> Response:
    payload = {"response": {"body": view.body, "httpStatusCode": view.status.raw}}
    return json_response(payload, trace)


def adapt_entity_response(view: AdaptEntityInterception, trace: TraceContext) -> Response:
    payload = {"response": {"entities": view.entities, "httpStatusCode": view.status.raw}}
    return json_response(payload, trace)


def error_body(
    code: str,
    message: str,
    trace: TraceContext,
    context: ErrorContext,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """BioT's ``ErrorResponse``: ``{code, message, serviceName, traceId, environment, details}``."""
    return {
        "code": code,
        "message": message,
        "serviceName": context.service_name,
        "traceId": trace.trace_id,
        "environment": context.environment,
        "details": dict(details or {}),
    }


def error_response(
    error: WorkerError,
    trace: TraceContext,
    context: ErrorContext,
    headers: Mapping[str, str] | None = None,
) -> Response:
    body = error_body(error.code, error.message, trace, context, error.details)
    return json_response(body, trace, error.status, headers)
