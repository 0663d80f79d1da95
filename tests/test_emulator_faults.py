"""Faults, latency, the call log and the admin API; CLI flags; serving rules."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from worker.testing.emulator import (
    Emulator,
    EmulatorConfig,
    EmulatorServer,
    ErrorRule,
    add_cli_arguments,
    config_from_args,
    serve_forever,
)
from worker.testing.emulator.entities import PATIENT
from worker.testing.emulator.faults import Faults, route_matches
from worker.testing.emulator.keys import cycling_factory, generate_key
from worker.testing.emulator.testing import ManualClock, RecordingSleep

PATIENTS = "/organization/v1/users/patients"
LOGIN = "/ums/v2/services/accessToken"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


@pytest.fixture(scope="module")
def keys() -> list[rsa.RSAPrivateKey]:
    return [generate_key()]


@pytest.fixture
def sleep() -> RecordingSleep:
    return RecordingSleep()


@pytest.fixture
def config() -> EmulatorConfig:
    return EmulatorConfig()


@pytest.fixture
def emulator(
    config: EmulatorConfig, keys: list[rsa.RSAPrivateKey], sleep: RecordingSleep
) -> Emulator:
    return Emulator(config, clock=ManualClock(), key_factory=cycling_factory(keys), sleep=sleep)


@pytest.fixture
async def server(emulator: Emulator) -> AsyncIterator[EmulatorServer]:
    async with EmulatorServer(emulator) as srv:
        yield srv


@pytest.fixture
async def http(emulator: Emulator) -> AsyncIterator[aiohttp.ClientSession]:
    token = emulator.sign_token(scopes=[], token_type="SERVICE_EXTERNAL")
    async with aiohttp.ClientSession(headers={"authorization": f"Bearer {token}"}) as session:
        yield session


async def status_of(http: aiohttp.ClientSession, method: str, url: str) -> int:
    async with http.request(method, url) as response:
        return response.status


async def put_faults(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with http.put(url + "/_emulator/faults", json=body) as response:
        return response.status, await response.json()


async def test_fail_next_n_calls_on_one_route(
    http: aiohttp.ClientSession, server: EmulatorServer, emulator: Emulator
) -> None:
    pid = emulator.store.all(PATIENT)[0]["_id"]
    rule = {"route": f"GET {PATIENTS}/*", "status": 503, "count": 2}
    status, snapshot = await put_faults(http, server.url, {"errors": [rule]})
    assert (status, snapshot["errors"]) == (200, [rule])

    assert await status_of(http, "GET", server.url + PATIENTS) == 200  # another route
    assert await status_of(http, "PATCH", f"{server.url}{PATIENTS}/{pid}") == 400  # another verb
    async with http.get(f"{server.url}{PATIENTS}/{pid}") as response:
        body = await response.json()
        assert response.status == 503
        assert response.headers["Retry-After"] == "1"
    assert body["code"] == "SERVICE_UNAVAILABLE"
    assert body["details"] == {"injected": True}
    assert await status_of(http, "GET", f"{server.url}{PATIENTS}/{pid}") == 503
    assert await status_of(http, "GET", f"{server.url}{PATIENTS}/{pid}") == 200
    async with http.get(server.url + "/_emulator/faults") as response:
        assert (await response.json())["errors"] == []


@pytest.mark.parametrize(
    "config", [EmulatorConfig(errors=(ErrorRule(route="POST /ums/*", status=429, count=1),))]
)
async def test_faults_set_at_start(
    http: aiohttp.ClientSession, server: EmulatorServer, emulator: Emulator
) -> None:
    credentials = {"id": emulator.service_user_id, "secretKey": emulator.service_user_secret}
    async with http.post(server.url + LOGIN, json=credentials) as response:
        assert response.status == 429
        assert (await response.json())["code"] == "TOO_MANY_REQUESTS"
    async with http.post(server.url + LOGIN, json=credentials) as response:
        assert response.status == 200


def test_rate_faults_are_seeded_and_bounded() -> None:
    def outcomes(seed: int) -> list[int | None]:
        faults = Faults(EmulatorConfig(random_seed=seed, errors=(ErrorRule(rate=0.5),)))
        return [faults.error_for("GET", "/x") for _ in range(40)]

    first = outcomes(7)
    assert first == outcomes(7)
    assert first != outcomes(8)
    assert set(first) == {None, 503}
    always = Faults(EmulatorConfig(errors=(ErrorRule(rate=1.0, status=500),)))
    never = Faults(EmulatorConfig(errors=(ErrorRule(rate=0.0),)))
    assert [always.error_for("GET", "/x") for _ in range(5)] == [500] * 5
    assert [never.error_for("GET", "/x") for _ in range(5)] == [None] * 5


@pytest.mark.parametrize(
    ("pattern", "method", "path", "expected"),
    [
        ("*", "GET", "/a", True),
        ("/a/*", "POST", "/a/b/c", True),
        ("/a/*", "POST", "/a", False),
        ("GET /a/*", "get", "/a/b", True),
        ("GET /a/*", "PATCH", "/a/b", False),
        ("* /a", "DELETE", "/a", True),
    ],
)
def test_route_patterns(pattern: str, method: str, path: str, expected: bool) -> None:
    assert route_matches(pattern, method, path) is expected


async def test_latency_per_route_adds_up(
    http: aiohttp.ClientSession, server: EmulatorServer, sleep: RecordingSleep
) -> None:
    latency = {"GET /organization/*": 0.5, "*": 0.25}
    assert (await put_faults(http, server.url, {"latency": latency}))[0] == 200
    assert await status_of(http, "GET", server.url + PATIENTS) == 200
    assert sleep.calls == [0.75]
    assert await status_of(http, "GET", server.url + "/ums/system/healthCheck") == 200
    assert sleep.calls == [0.75, 0.25]
    assert await status_of(http, "GET", server.url + "/_emulator/info") == 200
    assert sleep.calls == [0.75, 0.25]  # the admin API is never slowed down


@pytest.mark.parametrize(
    "body",
    [
        {"latency": {"*": -1}},
        {"errors": [{"route": "*", "status": 200}]},
        {"errors": [{"route": "*", "status": 503, "bogus": 1}]},
        {"errors": {"route": "*"}},
        {"loginFails": "yes"},
        {"tokenLifetime": 0},
        {"unknown": 1},
        [],
    ],
)
async def test_bad_fault_settings_are_refused_and_change_nothing(
    http: aiohttp.ClientSession, server: EmulatorServer, emulator: Emulator, body: Any
) -> None:
    before = emulator.faults.snapshot()
    if isinstance(body, dict):
        body = body | {"loginDelay": 3}  # valid, but must not apply when another key is bad
    status, error = await put_faults(http, server.url, body)
    assert status == 400
    assert error["code"] == "BAD_REQUEST"
    assert emulator.faults.snapshot() == before


async def test_call_log_through_admin_api(
    http: aiohttp.ClientSession, server: EmulatorServer, emulator: Emulator
) -> None:
    traceparent = f"00-{TRACE_ID}-b7ad6b7169203331-01"
    assert await status_of(http, "GET", server.url + PATIENTS) == 200
    async with http.get(server.url + PATIENTS + "/missing", headers={"traceparent": traceparent}):
        pass
    async with aiohttp.ClientSession() as anonymous:
        assert await status_of(anonymous, "GET", server.url + PATIENTS) == 401

    async with http.get(server.url + "/_emulator/calls", params={"trace_id": TRACE_ID}) as r:
        traced = (await r.json())["calls"]
    assert [(c["method"], c["path"], c["status"], c["token"]) for c in traced] == [
        ("GET", PATIENTS + "/missing", 404, "service")
    ]
    assert traced[0]["direction"] == "in"
    assert traced[0]["timestamp"].endswith("Z")
    async with http.get(server.url + "/_emulator/calls") as response:
        every = (await response.json())["calls"]
    assert [c["token"] for c in every] == ["service", "service", "none"]

    async with http.delete(server.url + "/_emulator/calls") as response:
        assert response.status == 204
    assert emulator.call_log == []


async def test_info_and_user_token_admin_endpoints(
    http: aiohttp.ClientSession, server: EmulatorServer, emulator: Emulator
) -> None:
    async with http.get(server.url + "/_emulator/info") as response:
        info = await response.json()
    assert info["url"] == server.url
    assert info["serviceUserId"] == emulator.service_user_id
    assert info["serviceUserSecretKey"] == emulator.service_user_secret
    assert info["publicKey"] == emulator.public_key_b64

    async with http.post(server.url + "/_emulator/user-token", json={"subjectId": "u1"}) as r:
        token = (await r.json())["accessToken"]
    async with aiohttp.ClientSession() as session:
        headers = {"authorization": f"Bearer {token}"}
        async with session.get(server.url + PATIENTS, headers=headers) as response:
            assert response.status == 200
    assert emulator.call_log[-1].token == "user"
    async with http.post(server.url + "/_emulator/user-token", json={"scopes": "A"}) as r:
        assert r.status == 400


def parse(argv: list[str]) -> EmulatorConfig:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_cli_flags_build_the_config() -> None:
    config = parse(
        [
            "--latency", "0.2", "--latency", "GET /x/*=0.5",
            "--fail", "GET /x/*=503:2", "--fail", "*=500@0.25",
            "--tls", "--tls-dir", "/tmp/certs", "--token-lifetime", "2",
            "--login-delay", "1.5", "--login-fails", "--random-seed", "3",
            "--plugin-timeout", "0.5", "--seed-patients", "0",
        ]
    )  # fmt: skip
    assert config.latency == {"*": 0.2, "GET /x/*": 0.5}
    assert config.errors == (
        ErrorRule(route="GET /x/*", status=503, count=2),
        ErrorRule(route="*", status=500, rate=0.25),
    )
    assert (config.tls, config.tls_dir, config.token_lifetime) == (True, "/tmp/certs", 2.0)
    assert (config.login_delay, config.login_fails, config.random_seed) == (1.5, True, 3)
    assert (config.plugin_timeout, config.seed_patients) == (0.5, 0)
    assert parse([]) == EmulatorConfig()


@pytest.mark.parametrize(
    "argv",
    [["--latency", "x=y"], ["--fail", "*=200:1"], ["--fail", "*=503:z"], ["--token-lifetime", "0"]],
)
def test_cli_refuses_bad_flags(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(argv)
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "example.com", "::"])  # noqa: S104
def test_server_refuses_non_loopback_hosts(emulator: Emulator, host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        EmulatorServer(emulator, host=host)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="token_lifetime"):
        EmulatorConfig(token_lifetime=0)
    with pytest.raises(ValueError, match="latency"):
        EmulatorConfig(latency={"*": -0.1})
    with pytest.raises(ValueError, match="status"):
        ErrorRule(status=302)


async def test_serve_forever_until_stopped() -> None:
    stop, started = asyncio.Event(), asyncio.Event()
    servers: list[EmulatorServer] = []

    def ready(server: EmulatorServer) -> None:
        servers.append(server)
        started.set()

    config = EmulatorConfig(seed_patients=0)
    serving = serve_forever(config, host="127.0.0.1", port=0, ready=ready, stop=stop)
    task = asyncio.create_task(serving)
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait({task, waiter}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    assert len(servers) == 1, task
    async with aiohttp.ClientSession() as session:
        assert await status_of(session, "GET", servers[0].url + "/ums/system/healthCheck") == 200
    stop.set()
    await asyncio.wait_for(task, 5)
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as session:
            await session.get(servers[0].url + "/ums/system/healthCheck")
