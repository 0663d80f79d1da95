"""The plugin code both peers share, written the way a Python team writes it once for FastAPI
and FastStream alike: Pydantic models of BioT's payloads, PyJWT verification with the public key
loaded once, an ``httpx2.Auth`` that caches the service token, the W3C trace, a JSON log
formatter for stdlib ``logging``, and the scenario handlers (:mod:`worker.bench.logic`) routed
by hook type and ``apiId`` / entity. Nothing here imports the worker's runtime: the peers are
what a team would build *instead* of it.

Settings come from the environment with the platform's names (``BIOT_BASE_URL``,
``BIOT_SERVICE_USER_ID``, ``BIOT_SERVICE_USER_SECRET_KEY``, ``BIOT_APP_NAME``,
``BIOT_SERVICE_ENVIRONMENT``, ``BIOT_JWT_PERMISSION_NOTIFICATION``,
``BIOT_JWT_PERMISSION_INTERCEPTION``), read by pydantic-settings when a peer starts, never at
import. HTTPS trust comes from ``SSL_CERT_FILE``, which httpx2 reads.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import httpx2
import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_der_public_key
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError
from pydantic.alias_generators import to_camel
from pydantic_settings import BaseSettings

from worker.bench import logic

LOGIN_PATH: Final = "/ums/v2/services/accessToken"
PUBLIC_KEY_PATH: Final = "/ums/v1/security/public-key"
NOTIFICATION: Final = "NOTIFICATION"
PRE: Final = "INTERCEPTOR_PRE"
POST: Final = "INTERCEPTOR_POST"
ADAPT_ENTITY: Final = "INTERCEPTOR_POST_ENTITY"
NONSPECIFIC: Final = "NONSPECIFIC"
HOOKS: Final = frozenset({NOTIFICATION, PRE, POST, ADAPT_ENTITY})
JWT_LEEWAY: Final = 5.0  # seconds of clock skew allowed on exp, as the worker's default
REFRESH_MARGIN: Final = 60.0  # log in again this long before the token expires
API_TIMEOUT: Final = 10.0  # seconds per BioT call, as WORKER_API_TIMEOUT's default
# As the worker's pool (WORKER_API_MAX_CONNECTIONS): httpx2 keeps only 20 idle connections by
# default, which at c=32 would open a new connection for every call past the twentieth.
POOL: Final = httpx2.Limits(max_connections=100, max_keepalive_connections=100)


class PeerSettings(BaseSettings):
    """The platform's variables (pydantic-settings maps each field to its upper-case name)."""

    biot_base_url: str
    biot_service_user_id: str
    biot_service_user_secret_key: SecretStr
    biot_app_name: str = "biot-plugin"
    biot_service_environment: str = "Not specified"
    biot_jwt_permission_notification: str = "ACTION_NOTIFICATION"
    biot_jwt_permission_interception: str = "PLUGIN_INTERCEPTOR"

    def scope(self, hook: str) -> str:
        """The scope the platform's JWT must carry for ``hook``."""
        if hook == NOTIFICATION:
            return self.biot_jwt_permission_notification
        return self.biot_jwt_permission_interception


def load_settings() -> PeerSettings:
    return PeerSettings()  # type: ignore[call-arg]  # the values come from the environment


# ---------------------------------------------------------------- BioT's payloads


class Camel(BaseModel):
    """BioT's JSON is camelCase; the models are snake_case."""

    model_config = ConfigDict(alias_generator=to_camel)


class NewInterceptedRequest(Camel):
    """What a PRE interceptor answers (BioT's ``NewInterceptedRequest``)."""

    path: str
    query_parameters: dict[str, list[str]] = {}
    headers: dict[str, str] = {}
    body: Any = None


class InterceptedRequest(NewInterceptedRequest):
    path_variables: list[dict[str, Any]] = []


class InterceptorEvent(Camel):
    """A PRE interception (and the part every interceptor payload shares)."""

    method: str
    api_id: str
    entity_name: str | None = None
    initiator_data: dict[str, Any] = {}
    request: InterceptedRequest


class PostResponse(Camel):
    body: Any = None
    http_status_code: str | int = "200 OK"


class PostEvent(InterceptorEvent):
    response: PostResponse


class AdaptEntityResponse(Camel):
    entities: list[dict[str, Any]]
    http_status_code: str | int = "200 OK"


class AdaptEntityEvent(InterceptorEvent):
    response: AdaptEntityResponse


class NotificationData(Camel):
    entity: dict[str, Any]
    additional_data: dict[str, Any] | None = None


class NotificationEvent(Camel):
    metadata: dict[str, Any]
    data: NotificationData
    jwt: str | None = None


class PreAnswer(Camel):
    request: NewInterceptedRequest


class PostAnswer(Camel):
    response: PostResponse


class AdaptEntityAnswer(Camel):
    response: AdaptEntityResponse


Payload = InterceptorEvent | PostEvent | AdaptEntityEvent | NotificationEvent
Answer = PreAnswer | PostAnswer | AdaptEntityAnswer
MODELS: Final[dict[str, type[Payload]]] = {
    PRE: InterceptorEvent,
    POST: PostEvent,
    ADAPT_ENTITY: AdaptEntityEvent,
    NOTIFICATION: NotificationEvent,
}


class PluginError(Exception):
    """A failure answered with BioT's error body: ``status``, ``code`` and a message that never
    quotes a token."""

    def __init__(
        self, status: int, code: str, message: str, details: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details = dict(details or {})


def hook_of(header: str | None) -> str:
    """The hook named by the ``hooktype`` header (any case); unknown or missing: NONSPECIFIC."""
    hook = (header or "").strip().upper()
    return hook if hook in HOOKS else NONSPECIFIC


def parse_payload(hook: str, body: bytes | str) -> Payload:
    """The hook's payload model from the JSON body (Pydantic's JSON parser, in Rust)."""
    model = MODELS.get(hook)
    if model is None:
        raise PluginError(404, "NO_HANDLER", "no handler for nonspecific calls")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise PluginError(400, "NO_EVENT", "body is not valid JSON") from None
        fields = [".".join(map(str, e["loc"])) for e in errors]
        raise PluginError(
            400, "NO_DATA", f"{hook} payload is invalid", {"fields": fields}
        ) from None


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header value."""
    scheme, _, token = (authorization or "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def event_token(payload: Payload, header_token: str | None) -> str | None:
    """Where the platform puts its JWT: the notification's body, else the header."""
    return payload.jwt if isinstance(payload, NotificationEvent) else header_token


# ---------------------------------------------------------------- trace

_TRACEPARENT: Final = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


@dataclass(frozen=True, slots=True)
class Trace:
    """The event's W3C trace: its id goes on every BioT call, with a new span id per call as
    the worker does, and into every log line."""

    trace_id: str
    span_id: str
    flags: str = "01"

    @classmethod
    def from_traceparent(cls, value: str | None) -> Trace:
        match = _TRACEPARENT.match(value.strip().lower()) if value else None
        if match is None:
            return cls(os.urandom(16).hex(), os.urandom(8).hex())
        return cls(*match.groups())

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def child(self) -> str:
        """The ``traceparent`` of one outgoing call: same trace, a span id of its own."""
        return f"00-{self.trace_id}-{os.urandom(8).hex()}-{self.flags}"


# ---------------------------------------------------------------- logging

_LEVELS: Final = {
    logging.DEBUG: ("DEBUG", 10000),
    logging.INFO: ("INFO", 30000),
    logging.WARNING: ("WARN", 40000),
    logging.ERROR: ("ERROR", 50000),
    logging.CRITICAL: ("ERROR", 50000),
}
EVENT_FIELDS: Final = ("hook", "status", "duration_ms", "code", "reason")


class JsonFormatter(logging.Formatter):
    """One JSON object per line in BioT's shape (``@timestamp``, ``message``, ``level``,
    ``level_value``, ``appName``, ``traceId``), plus the event's fields given as ``extra``."""

    def __init__(self, app_name: str) -> None:
        super().__init__()
        self.app_name = app_name

    def format(self, record: logging.LogRecord) -> str:
        level, value = _LEVELS.get(record.levelno, ("INFO", 30000))
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line: dict[str, Any] = {
            "@timestamp": f"{stamp}.{int(record.msecs):03d}Z",
            "message": record.getMessage(),
            "level": level,
            "level_value": value,
            "appName": self.app_name,
            "traceId": getattr(record, "traceId", None),
        }
        for name in EVENT_FIELDS:
            if hasattr(record, name):
                line[name] = getattr(record, name)
        if record.exc_info:
            line["stack_trace"] = self.formatException(record.exc_info)
        return json.dumps(line)


def plugin_logger(app_name: str) -> logging.Logger:
    """The plugin's logger: INFO and up, one JSON line each on stdout."""
    logger = logging.getLogger("biot.plugin")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonFormatter(app_name))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


# ---------------------------------------------------------------- BioT's API


class ServiceAuth(httpx2.Auth):
    """The service user's token, the way httpx2 documents custom auth: one login in flight
    (an ``asyncio.Lock``), the token cached until ``REFRESH_MARGIN`` before it expires (then the
    next call logs in first), a 401 answered by one new login and one retry."""

    def __init__(
        self,
        base_url: str,
        user_id: str,
        secret: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = base_url.rstrip("/") + LOGIN_PATH
        self._credentials = {"id": user_id, "secretKey": secret}
        self._clock = clock
        self._token: str | None = None
        self._refresh_at = 0.0
        self._lock = asyncio.Lock()

    def login_request(self) -> httpx2.Request:
        return httpx2.Request("POST", self._url, json=self._credentials)

    def store(self, response: httpx2.Response) -> None:
        response.raise_for_status()
        answer = response.json()
        expires = datetime.fromisoformat(answer["accessTokenExpiration"]).timestamp()
        lifetime = expires - time.time()
        self._token = answer["accessToken"]
        self._refresh_at = self._clock() + lifetime - min(REFRESH_MARGIN, 0.2 * lifetime)

    def _stale(self) -> bool:
        return self._token is None or self._clock() >= self._refresh_at

    async def async_auth_flow(
        self, request: httpx2.Request
    ) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        if self._stale():
            async with self._lock:
                if self._stale():
                    login = yield self.login_request()
                    await login.aread()  # httpx2 hands an async flow the response unread
                    self.store(login)
        token = self._token
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            async with self._lock:
                if self._token == token:
                    login = yield self.login_request()
                    await login.aread()
                    self.store(login)
            request.headers["Authorization"] = f"Bearer {self._token}"
            yield request


class BiotApi:
    """GETs on BioT's API through the one pooled client, each carrying the event's trace."""

    def __init__(self, client: httpx2.AsyncClient) -> None:
        self._client = client

    async def get(self, path: str, trace: Trace, search: dict[str, Any] | None = None) -> Any:
        params = None if search is None else {"searchRequest": json.dumps(search)}
        headers = {"traceparent": trace.child()}
        try:
            response = await self._client.get(path, params=params, headers=headers)
        except httpx2.HTTPError as exc:
            raise PluginError(502, "CALL_TO_API_FAILED", f"GET {path} failed: {exc!r}") from None
        if response.is_error:
            status = response.status_code
            raise PluginError(502, "CALL_TO_API_FAILED", f"GET {path} answered {status}",
                              {"status": status})  # fmt: skip
        return response.json()


async def fetch_public_key(client: httpx2.AsyncClient) -> RSAPublicKey:
    """BioT's current public key (a bare base64 SPKI DER body), loaded once."""
    response = await client.get(PUBLIC_KEY_PATH, auth=None)
    response.raise_for_status()
    key = load_der_public_key(base64.b64decode(response.json()["publicKey"]))
    if not isinstance(key, RSAPublicKey):
        raise RuntimeError("BioT's public key is not an RSA key")
    return key


# ---------------------------------------------------------------- the plugin's handlers

Handler = Callable[[Any, BiotApi, Trace], Awaitable[None]]


async def rewrite_request(event: InterceptorEvent, api: BiotApi, trace: Trace) -> None:
    logic.mark_name(event.request.body)


async def note_patient(event: InterceptorEvent, api: BiotApi, trace: Trace) -> None:
    patient_id = logic.path_variable(event.request.path_variables, "id") or "missing"
    patient = await api.get(logic.patient_url_path(patient_id), trace)
    logic.note_patient(event.request.headers, patient)


async def read_three(event: NotificationEvent, api: BiotApi, trace: Trace) -> None:
    calls = logic.notification_calls(str(event.data.entity.get("_id")))
    await asyncio.gather(*(api.get(path, trace, search) for path, search in calls))


async def mark_entities(event: AdaptEntityEvent, api: BiotApi, trace: Trace) -> None:
    logic.mark_entities(event.response.entities)


# The subscriptions: PRE by apiId, ADAPT_ENTITY by entity, notifications by entity and action.
PRE_HANDLERS: Final[dict[str, Handler]] = {
    logic.API_ID_A: rewrite_request,
    logic.API_ID_B: note_patient,
}
ADAPT_ENTITY_HANDLERS: Final[dict[str, Handler]] = {"patient": mark_entities}
NOTIFICATION_HANDLERS: Final[dict[tuple[str, str], Handler]] = {
    ("patient", "_update"): read_three,
}


def _handler(payload: Payload) -> Handler | None:
    if isinstance(payload, NotificationEvent):
        meta = payload.metadata
        key = (str(meta.get("entityTypeName") or ""), str(meta.get("actionName") or ""))
        return NOTIFICATION_HANDLERS.get(key)
    if isinstance(payload, AdaptEntityEvent):
        return ADAPT_ENTITY_HANDLERS.get(payload.entity_name or "")
    if isinstance(payload, PostEvent):
        return None  # no POST handler: the response passes through
    return PRE_HANDLERS.get(payload.api_id)


def _answer_of(payload: Payload) -> Answer | None:
    if isinstance(payload, NotificationEvent):
        return None  # BioT ignores what a notification answers
    if isinstance(payload, AdaptEntityEvent):
        return AdaptEntityAnswer(response=payload.response)
    if isinstance(payload, PostEvent):
        return PostAnswer(response=payload.response)
    return PreAnswer(request=payload.request)


@dataclass(slots=True)
class Peer:
    """What a peer keeps for its lifetime: settings, BioT's key, the API client, the logger."""

    settings: PeerSettings
    key: RSAPublicKey
    api: BiotApi
    log: logging.Logger = field(repr=False)

    def verify(self, token: str | None, hook: str) -> dict[str, Any]:
        """The claims of the platform's JWT (RS512, ``exp`` required), which must carry the
        hook's scope; :class:`PluginError` 400 ``JWT_ERROR`` (403 for a missing scope)."""
        if not token:
            raise PluginError(400, "JWT_ERROR", "the event carries no JWT")
        try:
            claims: dict[str, Any] = jwt.decode(
                token, self.key, algorithms=["RS512"], options={"require": ["exp"]},
                leeway=JWT_LEEWAY,
            )  # fmt: skip
        except jwt.PyJWTError as exc:
            raise PluginError(400, "JWT_ERROR", _jwt_reason(exc)) from None
        scope = self.settings.scope(hook)
        scopes = claims.get("scopes")
        if not isinstance(scopes, list) or scope not in scopes:
            raise PluginError(403, "JWT_ERROR", f"missing scope {scope}")
        return claims

    async def answer(self, payload: Payload, trace: Trace) -> Answer | None:
        """Run the subscribed handler (none: an interceptor passes the payload through) and
        build the hook's answer; ``None`` for a notification."""
        handler = _handler(payload)
        if handler is not None:
            await handler(payload, self.api, trace)
        return _answer_of(payload)

    def error_body(self, error: PluginError, trace: Trace) -> dict[str, Any]:
        """BioT's ``ErrorResponse``."""
        return {
            "code": error.code,
            "message": error.message,
            "serviceName": self.settings.biot_app_name,
            "traceId": trace.trace_id,
            "environment": self.settings.biot_service_environment,
            "details": error.details,
        }

    def log_event(
        self, hook: str, trace: Trace, started: float, error: PluginError | None = None
    ) -> None:
        """The event's one log line, with the fields of the worker's (status, duration)."""
        fields: dict[str, Any] = {
            "traceId": trace.trace_id,
            "hook": hook,
            "status": 200 if error is None else error.status,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        if error is None:
            self.log.info("event handled", extra=fields)
            return
        fields.update(code=error.code, reason=error.message)
        if error.status < 500:
            self.log.warning("event refused", extra=fields)
        else:
            self.log.error("event failed", extra=fields)


def _jwt_reason(exc: jwt.PyJWTError) -> str:
    """Our own words: PyJWT's messages may quote parts of the token."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "token expired"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "signature verification failed"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"token has no {exc.claim} claim"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "algorithm not allowed (RS512 only)"
    if isinstance(exc, jwt.DecodeError):
        return "malformed token"
    return "invalid token"


@asynccontextmanager
async def open_peer(settings: PeerSettings) -> AsyncIterator[Peer]:
    """The peer's resources for its lifetime: the pooled client, BioT's key fetched once, a
    first login (so that no event waits for one), the logger."""
    secret = settings.biot_service_user_secret_key.get_secret_value()
    auth = ServiceAuth(settings.biot_base_url, settings.biot_service_user_id, secret)
    async with httpx2.AsyncClient(
        base_url=settings.biot_base_url, auth=auth, limits=POOL, timeout=API_TIMEOUT
    ) as client:
        key = await fetch_public_key(client)
        auth.store(await client.send(auth.login_request(), auth=None))
        yield Peer(settings, key, BiotApi(client), plugin_logger(settings.biot_app_name))
