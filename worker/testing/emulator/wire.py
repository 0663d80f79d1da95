"""Wire formats shared by the emulator's APIs: JSON bodies, BioT timestamps, status strings and
the ``ErrorResponse`` envelope, plus the two exceptions handlers raise to answer with an error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web

Clock = Callable[[], float]

# First path segment -> the BioT service that would have answered.
_SERVICES = {
    "ums": "ums",
    "organization": "organization",
    "generic-entity": "generic-entity",
    "dispatcher": "dispatcher",
    "settings": "settings",
}


class ApiFailure(Exception):
    """Answer the current call with BioT's ``ErrorResponse`` (``status``/``code``/``message``)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details: dict[str, Any] = dict(details or {})
        self.headers: dict[str, str] = dict(headers or {})


class PassThrough(Exception):
    """Answer the current call with a plugin's own error status and body, unchanged."""

    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        super().__init__(f"plugin answered {status}")
        self.status = status
        self.body = body
        self.content_type = content_type


def iso_ms(timestamp: float) -> str:
    """``2025-11-24T09:23:14.945Z``: ISO-8601 UTC with milliseconds, as BioT writes times."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def loads(raw: bytes | str) -> Any:
    """Parse JSON; raises ``ValueError`` (orjson's decode error) on malformed input."""
    return orjson.loads(raw)


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON response; 204 and 304 carry no body whatever ``body`` is."""
    if status in (204, 304):
        return web.Response(status=status, headers=headers)
    return web.Response(
        body=dumps(body), status=status, content_type="application/json", headers=headers
    )


async def read_json(request: web.Request) -> Any:
    """The request's JSON body (``None`` when empty); 400 ``INVALID_REQUEST_BODY`` when bad."""
    raw = await request.read()
    if not raw.strip():
        return None
    try:
        return loads(raw)
    except ValueError as exc:
        raise ApiFailure(400, "INVALID_REQUEST_BODY", "the request body is not JSON") from exc


def status_text(status: int) -> str:
    """Spring's ``HttpStatus`` form, e.g. ``"200 OK"``, ``"204 NO_CONTENT"``."""
    try:
        return f"{status} {HTTPStatus(status).name}"
    except ValueError:
        return str(status)


def parse_status(value: Any) -> int | None:
    """Read ``"200 OK"``, ``"OK"``, ``"200"`` or ``200``; ``None`` when it is none of these."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 100 <= value <= 599 else None
    if not isinstance(value, str) or not value.strip():
        return None
    head = value.strip().split(" ", 1)[0]
    if head.isdigit():
        number = int(head)
        return number if 100 <= number <= 599 else None
    try:
        return int(HTTPStatus[head.upper()])
    except KeyError:
        return None


def service_name(path: str) -> str:
    """The BioT service owning ``path`` (its first segment), or ``"emulator"``."""
    first = path.lstrip("/").split("/", 1)[0]
    return _SERVICES.get(first, "emulator")


def error_body(
    code: str,
    message: str,
    *,
    path: str,
    trace_id: str,
    environment: str,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """BioT's ``ErrorResponse``: ``{code, message, serviceName, traceId, environment, details}``."""
    return {
        "code": code,
        "message": message,
        "serviceName": service_name(path),
        "traceId": trace_id,
        "environment": environment,
        "details": dict(details or {}),
    }
