"""Shared fixtures: settings, a signing key pair, signed BioT events, a capturing log."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from config.settings import Settings, load_settings
from worker.events import Event, event_from_http

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@dataclass(frozen=True)
class KeyPair:
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
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    body = "".join(line for line in pem.splitlines() if "-----" not in line)
    return KeyPair(private, pem, body)


@pytest.fixture(scope="session")
def keys() -> KeyPair:
    return make_key_pair()


@pytest.fixture(scope="session")
def other_keys() -> KeyPair:
    return make_key_pair()


def settings_for(**env: str) -> Settings:
    base = {
        "BIOT_BASE_URL": "http://127.0.0.1:9",
        "BIOT_SERVICE_USER_ID": "service-user",
        "BIOT_SERVICE_USER_SECRET_KEY": "s3cr3t-service-key",
        "BIOT_APP_NAME": "test-plugin",
        "BIOT_SERVICE_ENVIRONMENT": "test",
    }
    base.update(env)
    return load_settings(base)


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
    api_id: str = "PATCH/organization/v1/users/patients/{id}",
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


def headers_for(hook: str | None, token: str | None = None) -> dict[str, str]:
    headers = {"content-type": "application/json", "traceparent": TRACEPARENT}
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
