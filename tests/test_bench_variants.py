"""Every variant the bench compares answers each scenario's contract, against a real emulator:
the worker's scenario routes, the bare-aiohttp floor, and the two Lambda-style baselines."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import settings_for
from worker.app import WorkerApp
from worker.bench import payloads
from worker.bench.floor import Floor
from worker.bench.httpload import Reply
from worker.bench.lambda_style import make_server
from worker.bench.procs import child_env, target_args, target_env
from worker.bench.scenarios import build_routes
from worker.events import event_from_http
from worker.logs import CapturingLog
from worker.testing.emulator import Emulator, EmulatorConfig, EmulatorServer
from worker.testing.emulator.entities import PATIENT
from worker.testing.emulator.keys import cycling_factory, generate_key

SCENARIOS = ("a", "b", "c", "d")


@pytest.fixture(scope="module")
def keys() -> list[rsa.RSAPrivateKey]:
    return [generate_key()]


@pytest.fixture
async def server(keys: list[rsa.RSAPrivateKey]) -> AsyncIterator[EmulatorServer]:
    emulator = Emulator(EmulatorConfig(seed_patients=12), key_factory=cycling_factory(keys))
    async with EmulatorServer(emulator) as srv:
        yield srv


def fixtures_of(emulator: Emulator, interceptor_token: str | None = None) -> payloads.Fixtures:
    return payloads.Fixtures(
        interceptor_token=interceptor_token or emulator.sign_token(scopes=["PLUGIN_INTERCEPTOR"]),
        notification_token=emulator.sign_token(scopes=["ACTION_NOTIFICATION"]),
        user_token=emulator.user_token(),
        patients=emulator.store.all(PATIENT),
        organization_id=emulator.config.organization_id,
    )


async def post_all(url: str, scenario: str, events: list[payloads.Event]) -> list[Reply]:
    replies = []
    async with aiohttp.ClientSession() as http:
        for event in events[:3]:
            headers = {**event.headers, "traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"}
            async with http.post(f"{url}/{scenario}", data=event.body, headers=headers) as r:
                replies.append(Reply(r.status, await r.read(), False))
    return replies


def assert_contract(scenario: str, replies: list[Reply]) -> None:
    check = payloads.checker(scenario)
    assert replies
    assert [check(reply, True) for reply in replies] == [None] * len(replies)


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_worker_scenario_routes_answer_the_contract(
    server: EmulatorServer, scenario: str
) -> None:
    emulator = server.emulator
    settings = settings_for(
        BIOT_BASE_URL=server.url,
        BIOT_SERVICE_USER_ID=emulator.service_user_id,
        BIOT_SERVICE_USER_SECRET_KEY=emulator.service_user_secret,
    )
    log = CapturingLog()
    async with WorkerApp(settings, build_routes(), log=log) as app:
        for event in payloads.BUILDERS[scenario](fixtures_of(emulator))[:3]:
            received = asyncio.get_running_loop().time()
            response = await app.dispatcher.dispatch(
                event_from_http(event.headers, event.body, received_at=received)
            )
            assert (
                payloads.checker(scenario)(Reply(response.status, response.body, False), True)
                is None
            )
    api_calls = [c for c in emulator.calls.records(direction="in") if c.path.startswith("/organ")]
    assert len(api_calls) == {"a": 0, "b": 3, "c": 9, "d": 0}[scenario]


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_floor_answers_the_contract(server: EmulatorServer, scenario: str) -> None:
    emulator = server.emulator
    floor = Floor(server.url, emulator.service_user_id, emulator.service_user_secret, None)
    runner = web.AppRunner(floor.application(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        events = payloads.BUILDERS[scenario](fixtures_of(emulator))
        assert_contract(scenario, await post_all(url, scenario, events))
    finally:
        await runner.cleanup()
    assert emulator.logins == 1  # once at start, then the cached token


@pytest.fixture
def lambda_server(request: pytest.FixtureRequest, server: EmulatorServer) -> Iterator[str]:
    emulator = server.emulator
    style = request.param
    http = make_server(style, 0, server.url, emulator.service_user_id, emulator.service_user_secret)
    thread = threading.Thread(target=http.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{http.server_address[1]}"
    finally:
        http.shutdown()
        http.server_close()
        thread.join()


@pytest.mark.parametrize("lambda_server", ["docs", "sample"], indirect=True)
@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_lambda_styles_answer_the_contract(
    server: EmulatorServer, lambda_server: str, scenario: str
) -> None:
    events = payloads.BUILDERS[scenario](fixtures_of(server.emulator))
    assert_contract(scenario, await post_all(lambda_server, scenario, events))


@pytest.mark.parametrize(
    ("lambda_server", "logins"), [("docs", 3), ("sample", 1)], indirect=["lambda_server"]
)
async def test_docs_style_logs_in_per_event_and_sample_style_once(
    server: EmulatorServer, lambda_server: str, logins: int
) -> None:
    events = payloads.events_a(fixtures_of(server.emulator))
    await post_all(lambda_server, "a", events)  # three events on one connection
    assert server.emulator.logins == logins


@pytest.mark.parametrize("lambda_server", ["sample"], indirect=True)
async def test_lambda_style_refuses_a_bad_jwt_as_the_seed_does(
    server: EmulatorServer, lambda_server: str
) -> None:
    forged = server.emulator.sign_token(scopes=["PLUGIN_INTERCEPTOR"]) + "x"
    events = payloads.events_a(fixtures_of(server.emulator, forged))
    (reply, *_) = await post_all(lambda_server, "a", events)
    assert reply.status == 400
    assert b"JWT_ERROR" in reply.body


IDENTITY = {"serviceUserId": "svc", "serviceUserSecretKey": "secret"}


def env_of(variant: str, endpoint: str | None = None) -> dict[str, str]:
    return target_env(variant, 8080, "http://127.0.0.1:1", IDENTITY, None, None, endpoint)


def test_target_env_turns_metrics_off_or_exports_spans_to_the_stand_in_collector() -> None:
    plain = env_of("worker")
    assert "WORKER_METRICS" not in plain  # the worker row is the default: metrics on
    assert not any(name.startswith("OTEL_") for name in plain)
    off = env_of("worker-nometrics")
    assert off["WORKER_METRICS"] == "false"
    assert not any(name.startswith("OTEL_") for name in off)
    otel = env_of("worker-otel", "http://127.0.0.1:4999")
    assert otel["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:4999"
    assert otel["OTEL_SERVICE_NAME"] == "biot-bench"
    assert "WORKER_METRICS" not in otel  # metrics on, as in the worker row it is divided by
    assert not any(name.startswith("OTEL_BSP_") for name in otel)  # default batch settings
    assert {k: v for k, v in otel.items() if not k.startswith("OTEL_")} == plain
    with pytest.raises(ValueError, match="collector"):
        env_of("worker-otel")


def test_no_target_inherits_the_callers_opentelemetry_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector.example:4318")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    env = child_env(env_of("worker"))
    assert not any(name.startswith("OTEL_") for name in env)
    env = child_env(env_of("worker-otel", "http://127.0.0.1:4999"))
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:4999"
    assert "OTEL_TRACES_EXPORTER" not in env


def test_the_observability_variants_start_as_the_worker_row_does() -> None:
    assert target_args("worker", "worker", 1, "http://x") == ["worker", "run"]
    for variant in ("worker-nometrics", "worker-otel"):
        assert target_args("worker", variant, 1, "http://x") == ["worker", "run"]
    for variant in ("worker-quiet", "worker-uvloop", "worker-candidate"):  # bench-only switches
        assert target_args("worker", variant, 1, "http://x") == ["worker.bench.worker_proc", "run"]
