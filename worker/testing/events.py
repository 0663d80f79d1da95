"""Sample BioT events for tests: a signing key pair, payloads of every hook, signed events.

These are the shapes the platform sends (a notification after an entity action, the
PRE/POST/ADAPT_ENTITY interceptor payloads, a queue or Lambda envelope); the project's own tests,
the queue tools and a plugin's tests build their events here and nowhere else.

The builders :func:`notification_event`, :func:`pre_event`, :func:`post_event`,
:func:`adapt_entity_event` and :func:`nonspecific_event` return a :class:`worker.events.Event`
as an adapter would hand it to the dispatcher, signed with :func:`default_keys` (or the
``keys`` given: anything with a ``sign(scopes=...)`` method) and the platform's scope for the
hook, and carrying the sample trace :data:`TRACEPARENT`.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from worker.events import Event, event_from_http
from worker.tracing import new_trace
from worker.views import HookType

TRACE_ID: Final = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT: Final = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
PATCH_PATIENT: Final = "PATCH/organization/v1/users/patients/{id}"
#: The scope the platform puts in the JWT of each kind of call.
NOTIFICATION_SCOPE: Final = "ACTION_NOTIFICATION"
INTERCEPTION_SCOPE: Final = "PLUGIN_INTERCEPTOR"
#: Where the entity APIs BioT intercepts live, by entity name (others: ``/<name>s``).
ENTITY_PATHS: Final[Mapping[str, str]] = {
    "patient": "/organization/v1/users/patients",
    "caregiver": "/organization/v1/users/caregivers",
    "generic-entity": "/generic-entity/v1/generic-entities",
}
_VARIABLE = re.compile(r"\{([^}/]+)\}")
_DEFAULT: Any = object()  # "not given" where None is a meaningful value


class Signer(Protocol):
    """Anything that signs a platform JWT carrying ``scopes`` (a :class:`KeyPair`)."""

    def sign(self, *, scopes: list[str]) -> str:
        """An RS512 JWT with these scopes, valid for a while."""
        ...


@dataclass(frozen=True)
class KeyPair:
    """An RSA key pair that signs platform-style RS512 JWTs; ``public_b64`` is BIOT_PUBLIC_KEY."""

    private: rsa.RSAPrivateKey
    public_pem: str
    public_b64: str

    def sign(
        self,
        *,
        scopes: list[str],
        lifetime: float = 600.0,
        algorithm: str = "RS512",
        **claims: Any,
    ) -> str:
        """A JWT with the platform's claims, ``scopes``, ``exp`` in ``lifetime`` seconds."""
        payload: dict[str, Any] = {
            "serviceUserId": str(uuid.uuid4()),
            "scopes": scopes,
            "tokenType": "SERVICE_INTERNAL",
            "jti": str(uuid.uuid4()),
            "exp": int(time.time() + lifetime),
            **claims,
        }
        return jwt.encode(payload, self.private, algorithm=algorithm)


def make_key_pair() -> KeyPair:
    """A fresh 2048-bit key pair (about 50 ms: share one per test session)."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    body = "".join(line for line in pem.splitlines() if "-----" not in line)
    return KeyPair(private, pem, body)


@functools.cache
def default_keys() -> KeyPair:
    """The process-wide key pair the builders sign with and ``run_event`` trusts by default."""
    return make_key_pair()


# ---------------------------------------------------------------- sample payloads


def entity(first: str = "Ada", *, template: str = "Patient", **extra: Any) -> dict[str, Any]:
    """An entity as BioT stores it (``_id``, ``_name``, ``_template``, ...) plus ``extra``."""
    return {
        "_id": str(uuid.uuid4()),
        "_name": {"firstName": first, "lastName": "Lovelace"},
        "_template": {"id": "t1", "name": template, "displayName": template},
        "_ownerOrganization": {"id": "org-1"},
        **extra,
    }


def notification_body(
    token: str | None,
    *,
    entity_type: str = "patient",
    action: str = "_create",
    entity_data: Mapping[str, Any] | None = None,
    old_entity: Mapping[str, Any] | None = _DEFAULT,
) -> dict[str, Any]:
    """A NOTIFICATION payload; ``token`` goes in ``body.jwt`` (``None``: no JWT)."""
    old = entity("Old") if old_entity is _DEFAULT else old_entity
    additional = {"oldEntity": dict(old)} if old is not None else {}
    body: dict[str, Any] = {
        "metadata": {
            "entityTypeName": entity_type,
            "actionName": action,
            "status": "SUCCESS",
            "initiator": {"subject": {"id": "user-1"}},
        },
        "data": {
            "entity": dict(entity_data) if entity_data is not None else entity(),
            "additionalData": additional,
        },
    }
    if token is not None:
        body["jwt"] = token
    return body


def api_id_for(entity_name: str, method: str = "PATCH") -> str:
    """The ``apiId`` of ``METHOD`` on one entity, e.g. ``PATCH/organization/.../patients/{id}``."""
    base = ENTITY_PATHS.get(entity_name, f"/{entity_name}s")
    return f"{method.upper()}{base}/{{id}}"


def interceptor_body(
    hook: str,
    *,
    api_id: str = PATCH_PATIENT,
    entity_name: str = "patient",
    status: str = "200 OK",
    request_body: Any = _DEFAULT,
    response_body: Any = _DEFAULT,
    entities: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """A PRE/POST/ADAPT_ENTITY payload for ``api_id``; its path fills each ``{var}`` with
    ``p-1``. POST carries ``response_body`` (default an entity), ADAPT_ENTITY ``entities``
    (default two), both with ``status`` as ``httpStatusCode``."""
    method, _, template = api_id.partition("/")
    names = _VARIABLE.findall(template)
    body: dict[str, Any] = {
        "initiatorData": {"subjectId": "user-1", "tokenType": "USER"},
        "method": method,
        "entityName": entity_name,
        "apiId": api_id,
        "request": {
            "path": "/" + _VARIABLE.sub("p-1", template),
            "queryParameters": {"a": ["1"]},
            "headers": {"authorization": "Bearer user-token-not-ours"},
            "body": (
                {"_name": {"firstName": "Ada", "lastName": "Lovelace"}}
                if request_body is _DEFAULT
                else request_body
            ),
            "pathVariables": [{"name": name, "value": "p-1"} for name in names],
        },
    }
    if hook == HookType.INTERCEPTOR_POST:
        answer = entity() if response_body is _DEFAULT else response_body
        body["response"] = {"body": answer, "httpStatusCode": status}
    if hook == HookType.INTERCEPTOR_POST_ENTITY:
        listed = [entity(), entity("Bob")] if entities is None else list(entities)
        body["response"] = {"entities": listed, "httpStatusCode": status}
    return body


def headers_for(
    hook: str | None, token: str | None = None, traceparent: str | None = TRACEPARENT
) -> dict[str, str]:
    """The HTTP headers BioT sends with a call of ``hook`` (``None``: no hooktype header)."""
    headers = {"content-type": "application/json"}
    if traceparent is not None:
        headers["traceparent"] = traceparent
    if hook is not None:
        headers["hooktype"] = hook
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    return headers


def _now() -> float:
    """The loop's clock, or the monotonic clock it reads when no loop runs (asyncio's default)."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


def make_event(
    hook: str | None,
    body: Any,
    *,
    token: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Event:
    """An :class:`Event` of ``body`` (bytes as they are, else JSON) received now over HTTP."""
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return event_from_http(
        headers if headers is not None else headers_for(hook, token), raw, received_at=_now()
    )


# ---------------------------------------------------------------- signed events of each hook


def notification_event(
    entity: str = "patient",
    action: str = "_create",
    *,
    entity_data: Mapping[str, Any] | None = None,
    old_entity: Mapping[str, Any] | None = None,
    template: str | None = None,
    keys: Signer | None = None,
    signed: bool = True,
    traceparent: str | None = TRACEPARENT,
) -> Event:
    """A NOTIFICATION that ``action`` succeeded on an ``entity``, with its JWT in ``body.jwt``.

    ``entity_data`` defaults to a sample entity whose template is ``template`` (default the
    entity type's name); ``signed=False`` sends no JWT.
    """
    data = dict(entity_data) if entity_data is not None else _sample(entity, template)
    if template is not None and entity_data is not None:
        data["_template"] = {**data.get("_template", {}), "name": template}
    token = _sign(keys, NOTIFICATION_SCOPE) if signed else None
    body = notification_body(
        token, entity_type=entity, action=action, entity_data=data, old_entity=old_entity
    )
    return make_event(None, body, headers=headers_for(HookType.NOTIFICATION, None, traceparent))


def pre_event(
    api_id: str | None = None,
    entity: str = "patient",
    *,
    body: Any = _DEFAULT,
    keys: Signer | None = None,
    signed: bool = True,
    traceparent: str | None = TRACEPARENT,
) -> Event:
    """A PRE interceptor call of ``api_id`` (default ``api_id_for(entity)``) whose request
    body is ``body``, signed in the ``authorization`` header."""
    payload = interceptor_body(
        HookType.INTERCEPTOR_PRE, api_id=api_id or api_id_for(entity), entity_name=entity,
        request_body=body,
    )  # fmt: skip
    return _interceptor_event(HookType.INTERCEPTOR_PRE, payload, keys, signed, traceparent)


def post_event(
    api_id: str | None = None,
    entity: str = "patient",
    *,
    body: Any = _DEFAULT,
    status: str = "200 OK",
    request_body: Any = _DEFAULT,
    keys: Signer | None = None,
    signed: bool = True,
    traceparent: str | None = TRACEPARENT,
) -> Event:
    """A POST interceptor call: BioT answered ``api_id`` with ``body`` and ``status``."""
    payload = interceptor_body(
        HookType.INTERCEPTOR_POST, api_id=api_id or api_id_for(entity), entity_name=entity,
        status=status, request_body=request_body, response_body=body,
    )  # fmt: skip
    return _interceptor_event(HookType.INTERCEPTOR_POST, payload, keys, signed, traceparent)


def adapt_entity_event(
    api_id: str | None = None,
    entity: str = "patient",
    *,
    entities: Sequence[Any] | None = None,
    status: str = "200 OK",
    keys: Signer | None = None,
    signed: bool = True,
    traceparent: str | None = TRACEPARENT,
) -> Event:
    """An ADAPT_ENTITY call: BioT is about to return ``entities`` (default two samples of
    ``entity``) from ``api_id`` (default ``api_id_for(entity, "GET")``)."""
    hook = HookType.INTERCEPTOR_POST_ENTITY
    listed = [_sample(entity), _sample(entity, first="Bob")] if entities is None else entities
    payload = interceptor_body(
        hook, api_id=api_id or api_id_for(entity, "GET"), entity_name=entity, status=status,
        entities=listed,
    )  # fmt: skip
    return _interceptor_event(hook, payload, keys, signed, traceparent)


def nonspecific_event(
    body: Any = None,
    *,
    keys: Signer | None = None,
    signed: bool = False,
    headers: Mapping[str, str] | None = None,
    traceparent: str | None = TRACEPARENT,
) -> Event:
    """A NONSPECIFIC call (a direct or scheduled one) with JSON ``body`` and extra ``headers``;
    unsigned unless ``signed`` (the JWT then goes in the ``authorization`` header)."""
    token = _sign(keys, None) if signed else None
    sent = {**headers_for(HookType.NONSPECIFIC, token, traceparent), **(headers or {})}
    return make_event(None, b"" if body is None else body, headers=sent)


def _interceptor_event(
    hook: HookType,
    payload: dict[str, Any],
    keys: Signer | None,
    signed: bool,
    traceparent: str | None,
) -> Event:
    token = _sign(keys, INTERCEPTION_SCOPE) if signed else None
    return make_event(None, payload, headers=headers_for(hook, token, traceparent))


def _sign(keys: Signer | None, scope: str | None) -> str:
    signer = keys if keys is not None else default_keys()
    return signer.sign(scopes=[scope] if scope else [])


def _sample(entity_type: str, template: str | None = None, first: str = "Ada") -> dict[str, Any]:
    """A sample of ``entity_type`` whose template is ``template`` (default: the type's name)."""
    name = template or ("Patient" if entity_type == "patient" else entity_type)
    return entity(first, template=name)


# ---------------------------------------------------------------- queue and Lambda envelopes


def sample_envelope(hook: str, token: str | None = None) -> dict[str, Any]:
    """A queue/Lambda envelope ``{"headers", "body"}`` of ``hook``, with its own trace id."""
    headers = headers_for(None, traceparent=new_trace().traceparent)
    body: dict[str, Any] = {}
    if hook != HookType.NONSPECIFIC:
        headers["hooktype"] = hook
    if hook == HookType.NOTIFICATION:
        body = notification_body(token)
    elif hook != HookType.NONSPECIFIC:
        body = interceptor_body(hook)
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
    return {"headers": headers, "body": orjson.dumps(body).decode()}
