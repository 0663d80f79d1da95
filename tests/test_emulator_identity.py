"""The emulator's UMS: service-user login, tokens, the public key and its rotation, auth checks."""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from worker.testing.emulator import Emulator, EmulatorConfig, EmulatorServer
from worker.testing.emulator.keys import cycling_factory, generate_key
from worker.testing.emulator.testing import ManualClock, RecordingSleep
from worker.testing.emulator.wire import iso_ms

PATIENTS = "/organization/v1/users/patients"
LOGIN = "/ums/v2/services/accessToken"
ERROR_KEYS = {"code", "message", "serviceName", "traceId", "environment", "details"}
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def keys() -> list[rsa.RSAPrivateKey]:
    return [generate_key() for _ in range(4)]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def sleep() -> RecordingSleep:
    return RecordingSleep()


@pytest.fixture
def config() -> EmulatorConfig:
    return EmulatorConfig(token_lifetime=60.0)


@pytest.fixture
def emulator(
    config: EmulatorConfig,
    keys: list[rsa.RSAPrivateKey],
    clock: ManualClock,
    sleep: RecordingSleep,
) -> Emulator:
    # keys[3] is never used by the emulator: it signs forged tokens.
    return Emulator(config, clock=clock, key_factory=cycling_factory(keys[:3]), sleep=sleep)


@pytest.fixture
async def url(emulator: Emulator) -> AsyncIterator[str]:
    async with EmulatorServer(emulator) as server:
        yield server.url


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def login(http: aiohttp.ClientSession, url: str, emulator: Emulator) -> dict[str, Any]:
    credentials = {"id": emulator.service_user_id, "secretKey": emulator.service_user_secret}
    async with http.post(url + LOGIN, json=credentials) as response:
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body


async def get_status(http: aiohttp.ClientSession, url: str, token: str | None) -> int:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    async with http.get(url + PATIENTS, headers=headers) as response:
        return response.status


def public_key(b64: str) -> Any:
    return load_der_public_key(base64.b64decode(b64))


async def test_login_issues_rs512_token_verifiable_with_published_key(
    http: aiohttp.ClientSession, url: str, emulator: Emulator, clock: ManualClock
) -> None:
    body = await login(http, url, emulator)

    async with http.get(url + "/ums/v1/security/public-key") as response:
        keys = await response.json()
    claims = jwt.decode(body["accessToken"], public_key(keys["publicKey"]), algorithms=["RS512"])
    assert jwt.get_unverified_header(body["accessToken"])["alg"] == "RS512"
    assert claims["serviceUserId"] == emulator.service_user_id
    assert claims["tokenType"] == "SERVICE_EXTERNAL"
    assert "DISPATCHER_SUBSCRIPTIONS_SUBSCRIBE" in claims["scopes"]
    assert claims["jti"]
    assert claims["exp"] == int(clock.now + 60)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", body["accessTokenExpiration"])
    assert body["accessTokenExpiration"] == iso_ms(clock.now + 60)
    assert emulator.logins == 1


async def test_login_with_wrong_secret_is_refused_with_error_response(
    http: aiohttp.ClientSession, url: str, emulator: Emulator
) -> None:
    credentials = {"id": emulator.service_user_id, "secretKey": "wrong"}
    async with http.post(url + LOGIN, json=credentials, headers={"traceparent": TRACEPARENT}) as r:
        body = await r.json()
        assert r.status == 403
    assert set(body) == ERROR_KEYS
    assert body["code"] == "LOGIN_FAILED"
    assert body["serviceName"] == "ums"
    assert body["environment"] == "emulator"
    assert body["traceId"] == TRACEPARENT.split("-")[1]
    assert emulator.logins == 0


@pytest.mark.parametrize("payload", [b"{}", b'{"id": "x"}', b"not json", b"[]", b""])
async def test_login_with_malformed_body_is_400(
    http: aiohttp.ClientSession, url: str, payload: bytes
) -> None:
    async with http.post(url + LOGIN, data=payload) as response:
        body = await response.json()
        assert response.status == 400
    assert set(body) == ERROR_KEYS


async def test_slow_and_failing_login_through_admin_api(
    http: aiohttp.ClientSession, url: str, emulator: Emulator, sleep: RecordingSleep
) -> None:
    async with http.put(url + "/_emulator/faults", json={"loginDelay": 0.25}) as response:
        assert response.status == 200
    await login(http, url, emulator)
    assert sleep.calls == [0.25]

    async with http.put(url + "/_emulator/faults", json={"loginFails": True}) as response:
        assert (await response.json())["loginFails"] is True
    credentials = {"id": emulator.service_user_id, "secretKey": emulator.service_user_secret}
    async with http.post(url + LOGIN, json=credentials) as response:
        body = await response.json()
        assert response.status == 503
        assert response.headers["Retry-After"] == "1"
    assert body["code"] == "SERVICE_UNAVAILABLE"

    async with http.delete(url + "/_emulator/faults") as response:
        assert (await response.json())["loginFails"] is False
    await login(http, url, emulator)
    assert emulator.logins == 2


@pytest.mark.parametrize("config", [EmulatorConfig(login_fails=True)])
async def test_login_outage_set_at_start(
    http: aiohttp.ClientSession, url: str, emulator: Emulator
) -> None:
    credentials = {"id": emulator.service_user_id, "secretKey": emulator.service_user_secret}
    async with http.post(url + LOGIN, json=credentials) as response:
        assert response.status == 503
    assert emulator.logins == 0


async def test_token_expires_with_the_emulator_clock(
    http: aiohttp.ClientSession, url: str, emulator: Emulator, clock: ManualClock
) -> None:
    token = (await login(http, url, emulator))["accessToken"]
    assert await get_status(http, url, token) == 200

    clock.advance(59)
    assert await get_status(http, url, token) == 200
    clock.advance(2)
    headers = {"authorization": f"Bearer {token}"}
    async with http.get(url + PATIENTS, headers=headers) as response:
        body = await response.json()
        assert response.status == 401
    assert body["code"] == "TOKEN_NOT_VALID"
    assert "expired" in body["message"]


async def test_token_lifetime_changes_at_run_time(
    http: aiohttp.ClientSession, url: str, emulator: Emulator, clock: ManualClock
) -> None:
    async with http.put(url + "/_emulator/faults", json={"tokenLifetime": 5}) as response:
        assert response.status == 200
    body = await login(http, url, emulator)
    assert body["accessTokenExpiration"] == iso_ms(clock.now + 5)
    clock.advance(6)
    assert await get_status(http, url, body["accessToken"]) == 401


def forged(key: rsa.RSAPrivateKey, emulator: Emulator, clock: ManualClock) -> str:
    claims = {"serviceUserId": emulator.service_user_id, "scopes": [], "exp": clock.now + 60}
    return jwt.encode(claims | {"tokenType": "SERVICE_EXTERNAL"}, key, algorithm="RS512")


@pytest.mark.parametrize(
    ("header", "kind"),
    [
        (None, "none"),
        ("Basic dXNlcjpwYXNz", "invalid"),
        ("Bearer not-a-jwt", "invalid"),
        ("forged", "invalid"),
        ("hs512", "invalid"),
    ],
)
async def test_entity_api_refuses_missing_and_bad_tokens(
    http: aiohttp.ClientSession,
    url: str,
    emulator: Emulator,
    clock: ManualClock,
    keys: list[rsa.RSAPrivateKey],
    header: str | None,
    kind: str,
) -> None:
    if header == "forged":
        header = "Bearer " + forged(keys[3], emulator, clock)
    elif header == "hs512":
        claims = {"scopes": [], "exp": clock.now + 60, "tokenType": "USER"}
        header = "Bearer " + jwt.encode(claims, "x" * 64, algorithm="HS512")
    headers = {"authorization": header} if header else {}
    async with http.get(url + PATIENTS, headers=headers) as response:
        body = await response.json()
        assert response.status == 401
    assert set(body) == ERROR_KEYS
    assert body["code"] == "TOKEN_NOT_VALID"
    assert emulator.call_log[-1].token == kind


async def test_public_key_rotation_keeps_previous_key(
    http: aiohttp.ClientSession, url: str, emulator: Emulator
) -> None:
    async with http.get(url + "/ums/v1/security/public-key") as response:
        first = await response.json()
    assert first["publicKey"] == emulator.public_key_b64
    assert first["previousPublicKey"] == first["publicKey"]
    old_token = (await login(http, url, emulator))["accessToken"]

    async with http.post(url + "/_emulator/rotate-keys") as response:
        rotated = await response.json()
    async with http.get(url + "/ums/v1/security/public-key") as response:
        second = await response.json()
    assert second == rotated
    assert second["publicKey"] != first["publicKey"]
    assert second["previousPublicKey"] == first["publicKey"]
    new_token = (await login(http, url, emulator))["accessToken"]
    jwt.decode(new_token, public_key(second["publicKey"]), algorithms=["RS512"])
    assert await get_status(http, url, old_token) == 200  # signed by the previous key

    emulator.rotate_keys()
    assert await get_status(http, url, old_token) == 401  # its key is now two rotations old
    assert await get_status(http, url, new_token) == 200


async def test_health_check_answers_with_the_callers_trace(
    http: aiohttp.ClientSession, url: str
) -> None:
    async with http.get(
        url + "/ums/system/healthCheck", headers={"traceparent": TRACEPARENT}
    ) as response:
        body = await response.json()
        echoed = response.headers["traceparent"]
    assert set(body) == {"version", "springVersion", "traceId"}
    assert body["traceId"] == TRACEPARENT.split("-")[1]
    assert echoed.split("-")[1] == body["traceId"]
    async with http.get(url + "/ums/system/healthCheck") as response:
        assert re.fullmatch(r"[0-9a-f]{32}", (await response.json())["traceId"])


def test_sign_token_is_verifiable_with_the_public_key(emulator: Emulator) -> None:
    token = emulator.sign_token(scopes=["ACTION_NOTIFICATION"], custom="yes")
    claims = jwt.decode(token, public_key(emulator.public_key_b64), algorithms=["RS512"])
    assert claims["scopes"] == ["ACTION_NOTIFICATION"]
    assert claims["tokenType"] == "SERVICE_INTERNAL"
    assert claims["custom"] == "yes"


def test_user_token_is_a_user_token(emulator: Emulator) -> None:
    token = emulator.user_token("subject-1", scopes=["A"])
    claims = jwt.decode(token, public_key(emulator.public_key_b64), algorithms=["RS512"])
    assert claims["tokenType"] == "USER"
    assert claims["sub"] == "subject-1"
    assert claims["scopes"] == ["A"]
