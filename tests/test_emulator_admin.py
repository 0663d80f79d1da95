"""``POST /_emulator/event-token``: tokens signed as BioT signs its calls to plugins."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from worker.testing.emulator import Emulator, EmulatorConfig, EmulatorServer
from worker.testing.emulator.keys import cycling_factory, generate_key
from worker.testing.emulator.testing import ManualClock

URL = "/_emulator/event-token"


@pytest.fixture(scope="module")
def keys() -> list[rsa.RSAPrivateKey]:
    return [generate_key(), generate_key()]


@pytest.fixture
async def server(keys: list[rsa.RSAPrivateKey]) -> AsyncIterator[EmulatorServer]:
    emulator = Emulator(EmulatorConfig(), clock=ManualClock(), key_factory=cycling_factory(keys))
    async with EmulatorServer(emulator) as srv:
        yield srv


async def post(url: str, body: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as response:
        return response.status, await response.json()


def claims_of(token: str, emulator: Emulator) -> dict[str, Any]:
    key = load_der_public_key(base64.b64decode(emulator.public_key_b64))
    assert isinstance(key, rsa.RSAPublicKey)
    decoded: dict[str, Any] = jwt.decode(
        token, key, algorithms=["RS512"], options={"verify_exp": False}
    )
    return decoded


async def test_event_token_is_signed_with_the_current_key(server: EmulatorServer) -> None:
    emulator = server.emulator
    status, body = await post(server.url + URL, {"scopes": ["PLUGIN_INTERCEPTOR"], "lifetime": 60})
    assert status == 200
    assert body["tokens"] == [body["token"]]
    claims = claims_of(body["token"], emulator)
    assert claims["scopes"] == ["PLUGIN_INTERCEPTOR"]
    assert claims["tokenType"] == "SERVICE_INTERNAL"
    assert claims["exp"] == int(emulator.clock() + 60)
    assert jwt.get_unverified_header(body["token"])["alg"] == "RS512"

    await emulator.rotate_keys_async()
    _, after = await post(server.url + URL, {"scopes": ["ACTION_NOTIFICATION"]})
    assert claims_of(after["token"], emulator)["scopes"] == ["ACTION_NOTIFICATION"]


async def test_event_token_batch_gives_distinct_tokens(server: EmulatorServer) -> None:
    status, body = await post(server.url + URL, {"scopes": ["PLUGIN_INTERCEPTOR"], "count": 3})
    assert status == 200
    assert len(set(body["tokens"])) == 3
    assert body["token"] == body["tokens"][0]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"scopes": []},
        {"scopes": "PLUGIN_INTERCEPTOR"},
        {"scopes": ["A"], "lifetime": 0},
        {"scopes": ["A"], "lifetime": True},
        {"scopes": ["A"], "count": 0},
        {"scopes": ["A"], "count": 10_001},
        ["A"],
    ],
)
async def test_event_token_rejects_bad_requests(server: EmulatorServer, body: Any) -> None:
    status, answer = await post(server.url + URL, body)
    assert status == 400
    assert answer["code"] == "BAD_REQUEST"
