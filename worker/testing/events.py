"""Sample BioT events for tests: a signing key pair, payloads of every hook, signed events.

These are the shapes the platform sends (a notification after an entity action, the
PRE/POST/ADAPT_ENTITY interceptor payloads, a queue or Lambda envelope); the project's own tests,
the queue tools and a plugin's tests build their events here and nowhere else.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from worker.events import Event, event_from_http
from worker.tracing import new_trace
from worker.views import HookType

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
PATCH_PATIENT = "PATCH/organization/v1/users/patients/{id}"
#: The scope the platform puts in the JWT of each kind of call.
NOTIFICATION_SCOPE = "ACTION_NOTIFICATION"
INTERCEPTION_SCOPE = "PLUGIN_INTERCEPTOR"


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


# ---------------------------------------------------------------- sample events


def entity(first: str = "Ada", **extra: Any) -> dict[str, Any]:
    return {
        "_id": str(uuid.uuid4()),
        "_name": {"firstName": first, "lastName": "Lovelace"},
        "_template": {"id": "t1", "name": "Patient", "displayName": "Patient"},
        "_ownerOrganization": {"id": "org-1"},
        **extra,
    }


def notification_body(
    token: str | None, *, entity_type: str = "patient", action: str = "_create"
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {
            "entityTypeName": entity_type,
            "actionName": action,
            "status": "SUCCESS",
            "initiator": {"subject": {"id": "user-1"}},
        },
        "data": {"entity": entity(), "additionalData": {"oldEntity": entity("Old")}},
    }
    if token is not None:
        body["jwt"] = token
    return body


def interceptor_body(
    hook: str,
    *,
    api_id: str = PATCH_PATIENT,
    entity_name: str = "patient",
    status: str = "200 OK",
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "initiatorData": {"subjectId": "user-1", "tokenType": "USER"},
        "method": api_id.split("/", 1)[0],
        "entityName": entity_name,
        "apiId": api_id,
        "request": {
            "path": "/organization/v1/users/patients/p-1",
            "queryParameters": {"a": ["1"]},
            "headers": {"authorization": "Bearer user-token-not-ours"},
            "body": {"_name": {"firstName": "Ada", "lastName": "Lovelace"}},
            "pathVariables": [{"name": "id", "value": "p-1"}],
        },
    }
    if hook == "INTERCEPTOR_POST":
        body["response"] = {"body": entity(), "httpStatusCode": status}
    if hook == "INTERCEPTOR_POST_ENTITY":
        body["response"] = {"entities": [entity(), entity("Bob")], "httpStatusCode": status}
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


def make_event(
    hook: str | None,
    body: Any,
    *,
    token: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Event:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return event_from_http(
        headers if headers is not None else headers_for(hook, token),
        raw,
        received_at=asyncio.get_running_loop().time(),
    )


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
