"""The Lambda adapter: Function URL envelopes in, Function URL responses out, warm reuse.

Lambda calls the handler synchronously, so these tests are plain functions; the emulator plays
BioT on its own loop in a background thread.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from config.settings import Settings
from tests.conftest import TRACE_ID, TRACEPARENT, interceptor_body, settings_for
from tests.fixture_plugin import PRE_MARK
from worker.adapters import lambda_
from worker.events import PreInterception
from worker.routing import Context, RouteError, Router
from worker.testing.emulator import Emulator, EmulatorConfig, EmulatorServer


@dataclass
class BackgroundEmulator:
    emulator: Emulator
    url: str


@pytest.fixture(scope="module")
def biot() -> Iterator[BackgroundEmulator]:
    emulator = Emulator(EmulatorConfig())
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    urls: list[str] = []

    async def serve() -> None:
        async with EmulatorServer(emulator) as server:
            urls.append(server.url)
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(30), "emulator did not start"
    yield BackgroundEmulator(emulator, urls[0])
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)
    loop.close()


class FakeContext:
    def __init__(self, remaining_ms: int = 3000) -> None:
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


def settings_against(biot: BackgroundEmulator, **env: str) -> Settings:
    """Test settings pointed at ``biot``, with ``env`` on top."""
    return settings_for(
        BIOT_BASE_URL=biot.url,
        BIOT_SERVICE_USER_ID=biot.emulator.service_user_id,
        BIOT_SERVICE_USER_SECRET_KEY=biot.emulator.service_user_secret,
        **env,
    )


@pytest.fixture
def runtime(biot: BackgroundEmulator) -> Iterator[lambda_.LambdaRuntime]:
    settings = settings_against(biot, WORKER_LOG_LEVEL="WARNING")
    yield lambda_.configure(settings)
    lambda_.shutdown()


def envelope(hook: str | None, body: Any, token: str | None = None, **extra: Any) -> dict[str, Any]:
    headers = {"traceparent": TRACEPARENT, "content-type": "application/json"}
    if hook is not None:
        headers["hooktype"] = hook
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    return {
        "version": "2.0",
        "routeKey": "$default",
        "headers": headers,
        "body": body if isinstance(body, str) else orjson.dumps(body).decode(),
        "isBase64Encoded": False,
        **extra,
    }


def test_pre_interceptor_envelope(biot: BackgroundEmulator, runtime: lambda_.LambdaRuntime) -> None:
    token = biot.emulator.sign_token(scopes=["PLUGIN_INTERCEPTOR"])
    answer = lambda_.handler(
        envelope("INTERCEPTOR_PRE", interceptor_body("INTERCEPTOR_PRE"), token), FakeContext()
    )
    assert answer["statusCode"] == 200
    assert TRACE_ID in answer["headers"]["traceparent"]
    body = orjson.loads(answer["body"])
    assert body["request"]["body"]["_name"]["firstName"] == "Ada" + PRE_MARK


def test_warm_invocations_reuse_loop_session_and_token(
    biot: BackgroundEmulator, runtime: lambda_.LambdaRuntime
) -> None:
    before = biot.emulator.logins
    session = runtime.app.api
    for _ in range(5):
        answer = lambda_.handler(envelope("NONSPECIFIC", {}), FakeContext())
        assert answer["statusCode"] == 200
        assert orjson.loads(answer["body"])["patients"] == 3
    assert lambda_._runtime is runtime and runtime.app.api is session
    assert biot.emulator.logins - before == 1


def test_base64_body(biot: BackgroundEmulator, runtime: lambda_.LambdaRuntime) -> None:
    raw = base64.b64encode(b'{"x": 1}').decode()
    answer = lambda_.handler(envelope(None, raw, isBase64Encoded=True), FakeContext())
    assert answer["statusCode"] == 200


def test_scheduler_event_is_nonspecific(runtime: lambda_.LambdaRuntime) -> None:
    scheduled = {"version": "0", "detail-type": "Scheduled Event", "source": "aws.events"}
    answer = lambda_.handler(scheduled, FakeContext())
    assert answer["statusCode"] == 200
    assert "patients" in orjson.loads(answer["body"])


@pytest.mark.parametrize("event", [[1, 2], {"headers": "x", "body": "{}"}])
def test_bad_envelopes_answer_400(runtime: lambda_.LambdaRuntime, event: Any) -> None:
    answer = lambda_.handler(event, FakeContext())
    assert answer["statusCode"] == 400
    assert orjson.loads(answer["body"])["code"] == "NO_EVENT"


def test_lambda_remaining_time_bounds_the_handler(
    biot: BackgroundEmulator,
) -> None:
    async def slow(view: PreInterception, ctx: Context) -> None:
        await asyncio.Event().wait()

    settings = settings_against(biot, WORKER_LOG_LEVEL="ERROR")
    lambda_.configure(settings, Router().pre(slow, entity="patient"))
    try:
        token = biot.emulator.sign_token(scopes=["PLUGIN_INTERCEPTOR"])
        event = envelope("INTERCEPTOR_PRE", interceptor_body("INTERCEPTOR_PRE"), token)
        answer = lambda_.handler(event, FakeContext(remaining_ms=100))
    finally:
        lambda_.shutdown()
    assert answer["statusCode"] == 504
    assert orjson.loads(answer["body"])["code"] == "DEADLINE_EXCEEDED"


def test_log_lines_are_written_before_the_invocation_returns(biot: BackgroundEmulator) -> None:
    # A frozen container runs no timer: the event's line must be out when handler() returns.
    settings = settings_against(biot)
    stream = io.BytesIO()
    lambda_.configure(settings, stream=stream)
    try:
        answer = lambda_.handler(envelope("NONSPECIFIC", {}), FakeContext())
        written = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        lambda_.shutdown()
    assert answer["statusCode"] == 200
    handled = [r for r in written if r["message"] == "event handled"]
    assert handled and handled[0]["traceId"] == TRACE_ID


def test_routes_come_from_worker_routes(biot: BackgroundEmulator) -> None:
    settings = settings_against(
        biot, WORKER_LOG_LEVEL="WARNING", WORKER_ROUTES="tests.other_plugin:build_routes"
    )
    runtime = lambda_.configure(settings)
    try:
        described = sorted(route.describe() for route in runtime.app.routes)
    finally:
        lambda_.shutdown()
    assert "NOTIFICATION device/_create" in described
    assert "ADAPT_ENTITY entity=caregiver order=5" in described


def test_a_bad_worker_routes_is_a_one_line_route_error() -> None:
    settings = settings_for(
        BIOT_BASE_URL="http://127.0.0.1:9",
        BIOT_SERVICE_USER_ID="id",
        BIOT_SERVICE_USER_SECRET_KEY="secret",
        WORKER_ROUTES="no_such_plugin:build_routes",
    )
    with pytest.raises(RouteError, match="no module named 'no_such_plugin'"):
        lambda_.configure(settings)


def test_a_scheduler_event_is_not_warned_about_as_a_missing_hooktype(
    biot: BackgroundEmulator,
) -> None:
    settings = settings_against(biot)
    stream = io.BytesIO()
    lambda_.configure(settings, stream=stream)
    try:
        scheduled = {"version": "0", "detail-type": "Scheduled Event", "source": "aws.events"}
        assert lambda_.handler(scheduled, FakeContext())["statusCode"] == 200
        messages = [orjson.loads(line)["message"] for line in stream.getvalue().splitlines()]
    finally:
        lambda_.shutdown()
    assert "event handled" in messages
    assert not [m for m in messages if "hooktype" in m]


def test_a_runtime_that_fails_to_start_closes_its_loop(tmp_path: Any) -> None:
    settings = settings_for(WORKER_CA_BUNDLE=str(tmp_path / "missing.pem"))
    loops: list[asyncio.AbstractEventLoop] = []
    real_new_event_loop = asyncio.new_event_loop

    def recording() -> asyncio.AbstractEventLoop:
        loops.append(real_new_event_loop())
        return loops[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(asyncio, "new_event_loop", recording)
        with pytest.raises(Exception, match="CA bundle"):
            lambda_.LambdaRuntime(settings, Router())
    assert len(loops) == 1 and loops[0].is_closed()
