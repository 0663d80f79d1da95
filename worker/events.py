"""Events: what the platform sends, as every adapter hands it to the dispatcher.

An :class:`Event` is the transport-neutral form (headers with lower-case keys, the raw body
bytes, when it arrived, its trace), built from a direct HTTP call or a Lambda/queue envelope.
:func:`decode_payload` reads its JSON, :func:`event_token` finds the platform's JWT, and
:func:`view_for` builds the hook's typed view (:mod:`worker.views`, re-exported here). Bad input
raises :class:`~worker.errors.EventError` (``NO_EVENT``, ``NO_DATA``, ``NO_METADATA``) or
:class:`~worker.errors.AuthError`, and nothing else.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from worker.errors import AuthError, EventError, PayloadTooLarge
from worker.tracing import TraceContext, new_trace, trace_from_headers
from worker.views import (
    AdaptEntityInterception,
    HookType,
    InterceptedRequest,
    Interception,
    NonSpecific,
    Notification,
    PostInterception,
    PreInterception,
    StatusCode,
    View,
    interception_view,
    notification_view,
    require_object,
)

# The views are re-exported: handlers import everything event-shaped from here.
__all__ = [
    "AdaptEntityInterception",
    "Event",
    "HookType",
    "InterceptedRequest",
    "Interception",
    "NonSpecific",
    "Notification",
    "PostInterception",
    "PreInterception",
    "StatusCode",
    "View",
    "bearer_token",
    "decode_payload",
    "event_from_envelope",
    "event_from_http",
    "event_token",
    "hook_from_header",
    "lower_headers",
    "require_object",
    "view_for",
]


_HOOKS_BY_NAME = {hook.value: hook for hook in HookType}


def hook_from_header(value: str | None) -> tuple[HookType, bool]:
    """The hook named by a ``hooktype`` header (any case) and whether the value was known.

    Missing or unknown values mean NONSPECIFIC, as the platform's own sample plugins do.
    """
    if value is None:
        return HookType.NONSPECIFIC, False
    hook = _HOOKS_BY_NAME.get(value) or _HOOKS_BY_NAME.get(value.strip().upper())
    if hook is None:
        return HookType.NONSPECIFIC, False
    return hook, True


@dataclass(slots=True)
class Event:
    """One call from the platform, whatever carried it."""

    hook: HookType
    headers: Mapping[str, str]
    body: bytes = field(repr=False)
    received_at: float
    hook_known: bool = True
    # An absolute loop-time deadline imposed by the carrier (e.g. Lambda's remaining time).
    deadline: float | None = None
    # Read once from the headers where the event is built: every log line, outgoing call and
    # answer of this event carries this trace, whichever adapter it came through.
    trace: TraceContext = field(default_factory=new_trace)
    # Which delivery of the event this is (a queue may deliver one again after a failure).
    attempt: int = 1
    # The carrier's span attributes (a queue's messaging.*), for the event's exported span.
    transport: Mapping[str, Any] | None = None


def lower_headers(headers: Mapping[str, Any]) -> dict[str, str]:
    """Names lower-cased, values as strings, ``None`` values left out (a repeated name: the
    last value)."""
    # The usual (JSON, a dict of strings) in one pass; anything else (a None or a number, a name
    # that is not a string, a name repeated in another case) the general way, with the same result.
    lowered = {k.lower(): v for k, v in headers.items() if type(v) is str and type(k) is str}
    if len(lowered) == len(headers):
        return lowered
    return {str(k).lower(): str(v) for k, v in headers.items() if v is not None}


class _LowerCased(Mapping[str, str]):
    """An HTTP request's headers (aiohttp's multidict, names in any case) read as the dict
    :func:`lower_headers` makes of them (lower-case names, a repeated name's last value), without
    making it unless they are iterated: an event reads two or three of them, and copying every
    header per event cost more than the rest of building the event. Names are looked up without
    regard to case."""

    __slots__ = ("_copy", "_headers")

    def __init__(self, headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> None:
        self._headers = headers
        self._copy: dict[str, str] | None = None

    def get(self, key: str, default: Any = None) -> Any:
        values = self._headers.getall(key, None)
        return default if values is None else values[-1]

    def __getitem__(self, key: str) -> str:
        values = self._headers.getall(key, None)
        if values is None:
            raise KeyError(key)
        return values[-1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._lowered())

    def __len__(self) -> int:
        return len(self._lowered())

    def __repr__(self) -> str:
        return repr(self._lowered())

    def _lowered(self) -> dict[str, str]:
        if self._copy is None:
            self._copy = lower_headers(self._headers)
        return self._copy


def event_from_http(
    headers: Mapping[str, str], body: bytes, *, received_at: float, deadline: float | None = None
) -> Event:
    """An event from a direct HTTP call: headers (any case) and the raw body."""
    normalized: Mapping[str, str]
    if isinstance(headers, CIMultiDictProxy | CIMultiDict):
        normalized = _LowerCased(headers)
    else:
        normalized = lower_headers(headers)
    return _event(normalized, body, received_at, deadline)


def _event(
    normalized: Mapping[str, str], body: bytes, received_at: float, deadline: float | None
) -> Event:
    """An event from headers already lower-cased."""
    hook, known = hook_from_header(normalized.get("hooktype"))
    trace = trace_from_headers(normalized)
    return Event(hook, normalized, body, received_at, known, deadline, trace)


def event_from_envelope(
    envelope: Any, *, received_at: float, max_body_bytes: int, deadline: float | None = None
) -> Event:
    """An event from a Lambda Function URL event or a queue message ``{"headers", "body"}``.

    ``body`` may be a string (base64 when ``isBase64Encoded``), an already-parsed JSON value, or
    absent (a scheduler event has neither headers nor body).
    """
    if type(envelope) is not dict and not isinstance(envelope, Mapping):
        raise EventError("event envelope must be a JSON object", code="NO_EVENT")
    raw_headers = envelope.get("headers") or {}
    if type(raw_headers) is not dict and not isinstance(raw_headers, Mapping):
        raise EventError("envelope headers must be an object", code="NO_EVENT")
    body = _envelope_body(envelope.get("body"), bool(envelope.get("isBase64Encoded")))
    if len(body) > max_body_bytes:
        raise PayloadTooLarge(f"event body of {len(body)} bytes exceeds {max_body_bytes}")
    return _event(lower_headers(raw_headers), body, received_at, deadline)


def _envelope_body(body: Any, is_base64: bool) -> bytes:
    if body is None:
        return b""
    if isinstance(body, str):
        if not is_base64:
            return body.encode("utf-8", "surrogatepass")
        try:
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise EventError("body is not valid base64", code="NO_EVENT") from None
    return orjson.dumps(body)


# ---------------------------------------------------------------- payload decoding


def decode_payload(event: Event) -> Any:
    """The JSON body of the event; ``None`` when the body is empty. Bad JSON is ``NO_EVENT``."""
    body = event.body
    if not body or body.isspace():  # no copy of the body, as strip() would make
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise EventError(f"body is not valid JSON: {exc.msg}", code="NO_EVENT") from None


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an ``authorization: Bearer <jwt>`` header, if any."""
    value = headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("authorization header is not a Bearer token", reason="malformed")
    if not token.isascii():  # a JWT is base64url and dots; this also stops undecodable bytes
        raise AuthError("the Bearer token is not ASCII", reason="malformed")
    return token.strip()


def event_token(hook: HookType, headers: Mapping[str, str], payload: Any) -> str | None:
    """Where the platform puts its JWT: ``body.jwt`` for notifications, the header otherwise."""
    if hook is HookType.NOTIFICATION:
        token = payload.get("jwt") if isinstance(payload, dict) else None
        if token is not None and not isinstance(token, str):
            raise AuthError("jwt must be a string", reason="malformed")
        return token or None
    token = bearer_token(headers)
    if token is None and hook is HookType.NONSPECIFIC and isinstance(payload, dict):
        body_token = payload.get("jwt")
        return body_token if isinstance(body_token, str) and body_token else None
    return token


def view_for(event: Event, payload: Any) -> View:
    """The typed view of ``payload`` for the event's hook."""
    if event.hook is HookType.NOTIFICATION:
        return notification_view(payload)
    if event.hook.is_interceptor:
        return interception_view(event.hook, payload)
    # The platform's JWT (a header, or a body's "jwt") stays with the dispatcher: handlers
    # never see it.
    headers = {k: v for k, v in event.headers.items() if k != "authorization"}
    if isinstance(payload, dict) and "jwt" in payload:
        payload = {k: v for k, v in payload.items() if k != "jwt"}
    return NonSpecific(payload, headers)
