"""Health that tells the truth (issue 9 point 4): ``/readyz`` names what is missing (the public
key, the service token, the broker) and when BioT last answered; a queue worker serves both
probes on its own port; ``config`` hides the password of a ``--source``.

HTTP-mode probes run in process against the emulator (faults injected on its key and login
endpoints); the queue probes run once in process over a source the test takes down and brings
back, and once in a real ``run --source`` process on the shared Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.queue_harness import Harness, make_harness
from tests.queue_helpers import FakeLog, eventually, message, queue_settings
from tests.queue_workers import Workers
from worker.adapters.health import CheckResult, Health, add_health_routes, health_runner
from worker.adapters.memory import MemorySource
from worker.adapters.queue import Decision, Delivery, IntakeStatus, RetryPolicy, consume
from worker.client import BiotContact
from worker.errors import ApiError
from worker.responses import ErrorContext
from worker.routing import Router
from worker.runner import app_health
from worker.testing.biot import EmulatedBiot, emulated_biot
from worker.testing.emulator import Emulator, EmulatorConfig, EmulatorServer
from worker.testing.emulator.config import ErrorRule
from worker.tracing import new_trace

KEY_ROUTE = "GET /ums/v1/security/public-key"
LIMIT = 10.0  # the longest any health condition here may take to show
ROUTES = "tests.fixture_plugin:build_routes"
ERRORS = ErrorContext("test-plugin", "test")
TRACE = new_trace()
KIT = {  # a worker against a BioT nobody answers for: enough to start and to fail at the port
    "BIOT_BASE_URL": "http://127.0.0.1:9",
    "BIOT_SERVICE_USER_ID": "service-user",
    "BIOT_SERVICE_USER_SECRET_KEY": "s3cr3t-service-key",
    "WORKER_ROUTES": ROUTES,
}


async def worker_command(*argv: str, **env: str) -> tuple[int, str, str]:
    """``python -m worker *argv`` with :data:`KIT` and ``env``: status, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", *argv, env={**os.environ, **KIT, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(30.0):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


# ---------------------------------------------------------------- probing


@contextlib.asynccontextmanager
async def probes(biot: EmulatedBiot, **health: Any) -> AsyncIterator[str]:
    """``/healthz`` and ``/readyz`` of ``biot.app`` (``health``: :func:`app_health`'s keywords)
    on a free loopback port, for the block; yields the base URL."""
    app = web.Application()
    add_health_routes(app, app_health(biot.app, **health), lambda: 0)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def get(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, orjson.loads(await response.read())


async def until_status(
    url: str, status: int, what: str, also: Callable[[dict[str, Any]], bool] = bool
) -> dict[str, Any]:
    """Poll ``url`` (bounded) until it answers ``status`` with a body for which ``also`` holds;
    that answer's body."""
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        code, seen["body"] = await get(url)
        return code == status and also(seen["body"])

    await eventually(reached, f"{what} (last body: {seen.get('body')})", LIMIT)
    return dict(seen["body"])


def secrets_of(biot: EmulatedBiot) -> list[str]:
    return [biot.emulator.service_user_secret, biot.emulator.public_key_b64]


# ---------------------------------------------------------------- HTTP mode


async def test_ready_names_the_key_the_token_and_when_biot_last_answered() -> None:
    async with emulated_biot(Router()) as biot, probes(biot) as url:
        status, body = await get(url + "/readyz")
        assert status == 200, body
        assert body["status"] == "ready"
        key, token = body["checks"]["publicKey"], body["checks"]["serviceToken"]
        assert key["ok"] is True and 0 <= key["ageSeconds"] < LIMIT and key["fetches"] == 1
        assert token["ok"] is True and token["expiresInSeconds"] > 60 and token["logins"] >= 1
        last = body["biotLastAnswer"]
        assert last["at"].endswith("Z") and 0 <= last["agoSeconds"] < LIMIT
        text = orjson.dumps(body).decode()
        assert all(secret not in text for secret in secrets_of(biot))
        assert await biot.app.tokens.get() not in text
        status, alive = await get(url + "/healthz")
        assert (status, alive) == (200, {"status": "ok", "inFlight": 0})


async def test_the_last_answer_moves_with_every_call_whatever_its_status() -> None:
    async with emulated_biot(Router()) as biot:
        contact = biot.app.contact
        await biot.app.tokens.get()
        before = contact.answered_at
        assert before is not None  # the login at start was an answer
        with pytest.raises(ApiError):
            await biot.app.api.get("/no/such/api")  # a 404 is an answer too
        assert contact.answered_at is not None and contact.answered_at > before


async def test_a_key_bioT_will_not_serve_is_not_ready_until_it_does() -> None:
    fault = ErrorRule(route=KEY_ROUTE, status=500, rate=1.0)
    config = EmulatorConfig(errors=(fault,))
    env = {"WORKER_KEY_REFETCH_COOLDOWN": "0.2"}
    async with emulated_biot(Router(), config=config, env=env) as biot, probes(biot) as url:
        status, body = await get(url + "/readyz")
        assert status == 503, body
        assert body["status"] == "not ready"
        assert body["code"] == "JWT_ERROR" and "could not fetch BioT public key" in body["message"]
        assert {"serviceName", "traceId", "environment", "details"} <= set(body)
        key = body["checks"]["publicKey"]
        assert key["ok"] is False and "500" in key["error"]
        assert body["checks"]["serviceToken"]["ok"] is True
        assert body["biotLastAnswer"] is not None  # a 500 is BioT answering
        fetches = key["fetches"]
        # Probes in a burst reuse the failure (cooldown): BioT sees no storm of fetches.
        for _ in range(20):
            await get(url + "/readyz")
        assert biot.app.contact.key_fetches <= fetches + 2
        biot.emulator.faults.update({"errors": []})
        body = await until_status(url + "/readyz", 200, "ready once BioT serves the key")
        assert body["checks"]["publicKey"]["ok"] is True


async def test_a_login_that_fails_is_not_ready_until_it_succeeds() -> None:
    config = EmulatorConfig(login_fails=True)
    async with emulated_biot(Router(), config=config) as biot, probes(biot) as url:
        status, body = await get(url + "/readyz")
        assert status == 503, body
        assert body["code"] == "LOGIN_FAILED"
        token = body["checks"]["serviceToken"]
        assert token["ok"] is False and "login failed" in token["error"]
        assert body["checks"]["publicKey"]["ok"] is True
        assert biot.emulator.service_user_secret not in orjson.dumps(body).decode()
        biot.emulator.faults.update({"loginFails": False})
        body = await until_status(url + "/readyz", 200, "ready once the login works")
        assert body["checks"]["serviceToken"]["expiresInSeconds"] > 60


async def test_without_jwt_validation_the_key_check_says_so() -> None:
    env = {"BIOT_SHOULD_VALIDATE_JWT": "false"}
    async with emulated_biot(Router(), env=env) as biot, probes(biot) as url:
        status, body = await get(url + "/readyz")
        assert status == 200, body
        assert body["checks"]["publicKey"] == {"ok": True, "validation": "off"}


class Hangs:
    """A check that never answers."""

    name = "hangs"

    async def probe(self) -> CheckResult:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_the_last_answer_is_dated_in_utc_and_null_before_any() -> None:
    contact = BiotContact()
    health = Health([], errors=ERRORS, contact=contact, clock=lambda: 102.5,
                    wall_clock=lambda: 1_700_000_000.0)  # fmt: skip
    assert (await health.readiness(TRACE)).json()["biotLastAnswer"] is None
    contact.answered_at = 100.0
    last = (await health.readiness(TRACE)).json()["biotLastAnswer"]
    assert last == {"at": "2023-11-14T22:13:17.500Z", "agoSeconds": 2.5}


async def test_a_check_that_hangs_is_not_ready_within_the_probe_timeout() -> None:
    health = Health([Hangs()], errors=ERRORS, probe_timeout=0.05)
    async with asyncio.timeout(LIMIT):
        response = await health.readiness(TRACE)
    body = response.json()
    assert response.status == 503 and body["code"] == "NOT_READY"
    assert body["checks"]["hangs"] == {"ok": False, "error": "no answer within 0.05 s"}
    assert body["traceId"] == TRACE.trace_id and body["serviceName"] == "test-plugin"


def test_an_intake_loop_that_stops_going_round_is_stalled() -> None:
    intake = IntakeStatus(state="running", beat_at=0.0, beat_bound=12.0)
    assert not intake.stalled(12.0) and intake.stalled(12.5)
    intake.waiting = True  # every slot taken: no round is due
    assert not intake.stalled(100.0)
    intake.waiting, intake.state = False, "draining"
    assert not intake.stalled(100.0)


# ---------------------------------------------------------------- queue mode, in process


class Flaky:
    """A :class:`MemorySource` whose ``receive`` fails like a lost broker while ``down``."""

    def __init__(self) -> None:
        self.inner = MemorySource(log=FakeLog())
        self.down = False

    @property
    def policy(self) -> RetryPolicy:
        return self.inner.policy

    async def __aenter__(self) -> Flaky:
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.inner.__aexit__(*exc)

    async def receive(self, limit: int) -> Sequence[Delivery]:
        if self.down:
            await asyncio.sleep(0)
            raise ConnectionError("Connection refused by the test")
        return await self.inner.receive(limit)

    async def settle(self, delivery: Delivery, decision: Decision) -> None:
        await self.inner.settle(delivery, decision)

    async def halt(self) -> None:
        await self.inner.halt()


async def test_the_broker_going_down_and_back_shows_in_readyz() -> None:
    async with emulated_biot(Router()) as biot:
        intake, source, stop = IntakeStatus(), Flaky(), asyncio.Event()
        health = app_health(biot.app, intake=intake, source="redis://:***@broker:6379/0")
        runner = health_runner(health, lambda: intake.in_flight, idle_timeout=5.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            async with source:
                task = asyncio.create_task(consume(
                    source, biot.app.dispatcher.handle, settings=queue_settings(), stop=stop,
                    log=FakeLog(), status=intake,
                ))  # fmt: skip
                try:
                    await down_and_back(url, source)
                finally:
                    stop.set()
                    await asyncio.wait_for(task, LIMIT)
            status, alive = await get(url + "/healthz")
            assert status == 503 and alive["intake"] == "stopped"
        finally:
            await runner.cleanup()


async def down_and_back(url: str, source: Flaky) -> None:
    def received(body: dict[str, Any]) -> bool:
        return body["checks"]["broker"]["lastReceiveAgoSeconds"] is not None

    body = await until_status(url + "/readyz", 200, "a first receive", received)
    broker = body["checks"]["broker"]
    assert broker["ok"] is True and broker["source"] == "redis://:***@broker:6379/0"
    assert broker["intake"] == "running" and broker["lastReceiveAgoSeconds"] < LIMIT
    source.down = True
    body = await until_status(url + "/readyz", 503, "not ready once receives fail")
    assert body["code"] == "BROKER_UNAVAILABLE"
    broker = body["checks"]["broker"]
    assert broker["ok"] is False and "ConnectionError: Connection refused" in broker["error"]
    assert broker["failures"] >= 1 and broker["failingForSeconds"] is not None
    status, alive = await get(url + "/healthz")  # alive: the loop goes round, trying again
    assert status == 200 and alive["intake"] == "running"
    source.down = False
    await until_status(url + "/readyz", 200, "ready again once the broker answers")
    await source.inner.publish(orjson.loads(message("k")))
    await asyncio.wait_for(source.inner.settled(), LIMIT)  # and events flow again
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/", data=b"{}") as response:
            assert response.status in (404, 405)  # no event route on the health listener
        async with http.post(url + "/readyz", data=b"{}") as response:
            assert response.status == 405


# ---------------------------------------------------------------- queue mode, a real process


@pytest.fixture
async def redis_harness() -> AsyncIterator[Harness]:
    made = make_harness("redis")
    try:
        yield made
    finally:
        await made.cleanup()


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    emu = Emulator(EmulatorConfig())
    async with EmulatorServer(emu):
        yield emu


@pytest.mark.broker
async def test_a_queue_worker_serves_its_probes_on_the_health_port(
    redis_harness: Harness, emulator: Emulator
) -> None:
    source = str(getattr(redis_harness, "url"))  # noqa: B009
    workers = Workers()
    try:
        started = await workers.start(emulator, source)
        [consuming] = [r for r in started.records() if r["message"] == "worker consuming"]
        assert consuming["source"] == source
        url = consuming["health"]
        body = await until_status(url + "/readyz", 200, "the queue worker ready")
        assert set(body["checks"]) == {"publicKey", "serviceToken", "broker"}
        assert body["checks"]["broker"]["source"] == consuming["source"]
        status, alive = await get(url + "/healthz")
        assert status == 200 and alive == {"status": "ok", "inFlight": 0, "intake": "running"}
    finally:
        await workers.close()


@pytest.mark.broker
async def test_a_health_port_in_use_is_one_line_and_status_2(redis_harness: Harness) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = await worker_command(
            "run", "--source", str(getattr(redis_harness, "url")),  # noqa: B009
            WORKER_HOST="127.0.0.1", WORKER_HEALTH_PORT=str(port),
        )  # fmt: skip
    assert code == 2, err
    in_use = f"cannot listen on 127.0.0.1:{port}: the port is in use"
    assert err.splitlines() == [f"biot-worker run: {in_use} (WORKER_HEALTH_PORT, --health-port)"]


# ---------------------------------------------------------------- config


async def test_config_hides_the_password_of_the_source() -> None:
    for url, shown in (
        ("amqp://guest:pa55-amqp@127.0.0.1:5672/?queue=q", "amqp://guest:***@127.0.0.1:5672/"),
        ("redis://:pa55-redis@127.0.0.1:6379/0?stream=s", "redis://:***@127.0.0.1:6379/0"),
    ):
        code, out, err = await worker_command("config", "--source", url)
        assert code == 0, err
        assert "pa55" not in out + err and f"source: {shown}" in out
