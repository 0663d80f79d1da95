"""Queue sources in front of the real dispatcher, against BioT in a box, on every source.

Signed events are answered per the hook contract (an interceptor's reply, a Block answered and
acknowledged), an unsigned one is dead-lettered at once with ``JWT_ERROR``, and a BioT outage is
retried until it passes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from tests.conftest import interceptor_body, notification_body
from tests.fixture_plugin import PRE_MARK, build_routes
from tests.queue_harness import Harness, make_harness
from tests.queue_helpers import FakeLog, eventually, queue_settings, serving
from worker.app import WorkerApp
from worker.testing.emulator import Emulator, EmulatorConfig, EmulatorServer
from worker.tracing import new_trace

pytestmark = pytest.mark.broker
PATIENTS = "/organization/v1/users/patients"


@pytest.fixture(params=["memory", "redis", "rabbitmq"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    made = make_harness(request.param, retry_delay="0.05")
    yield made
    await made.cleanup()


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    emu = Emulator(EmulatorConfig())
    async with EmulatorServer(emu):
        yield emu


@pytest.fixture
async def app(emulator: Emulator) -> AsyncIterator[WorkerApp]:
    settings = queue_settings(
        BIOT_BASE_URL=str(emulator.base_url),
        BIOT_SERVICE_USER_ID=emulator.service_user_id,
        BIOT_SERVICE_USER_SECRET_KEY=emulator.service_user_secret,
        WORKER_API_RETRIES="0",
    )
    async with WorkerApp(settings, build_routes(), log=FakeLog()) as worker_app:
        yield worker_app


def envelope(emu: Emulator | None, hook: str, body: dict[str, Any]) -> tuple[bytes, str]:
    """A (signed, unless ``emu`` is None) envelope and its trace id."""
    trace = new_trace()
    headers = {"hooktype": hook, "traceparent": trace.traceparent}
    if emu is not None and hook == "NOTIFICATION":
        body = {**body, "jwt": emu.sign_token(scopes=["ACTION_NOTIFICATION"])}
    elif emu is not None:
        headers["authorization"] = "Bearer " + emu.sign_token(scopes=["PLUGIN_INTERCEPTOR"])
    return orjson.dumps({"headers": headers, "body": orjson.dumps(body).decode()}), trace.trace_id


def searches(emu: Emulator, trace_id: str) -> list[int | None]:
    """Statuses of the patient searches the worker made for one event."""
    calls = emu.calls.records(trace_id=trace_id, direction="in")
    return [c.status for c in calls if (c.method, c.path) == ("GET", PATIENTS)]


async def test_signed_events_are_answered_per_hook_contract(
    harness: Harness, emulator: Emulator, app: WorkerApp
) -> None:
    box = await harness.reply_box()
    pre, _ = envelope(emulator, "INTERCEPTOR_PRE", interceptor_body("INTERCEPTOR_PRE"))
    blocked_body = interceptor_body("INTERCEPTOR_PRE")
    blocked_body["request"]["body"]["_name"]["firstName"] = "FORBIDDEN"
    blocked, _ = envelope(emulator, "INTERCEPTOR_PRE", blocked_body)
    note, note_trace = envelope(emulator, "NOTIFICATION", notification_body(None))
    async with serving(harness.source(app.settings, FakeLog()), app.dispatcher.handle):
        await harness.publish(pre, reply_to=box, correlation_id="pre")
        await harness.publish(blocked, reply_to=box, correlation_id="blocked")
        await harness.publish(note)
        replies = dict([await harness.next_reply(box) for _ in range(2)])

        async def searched() -> bool:
            return searches(emulator, note_trace) == [200]

        await eventually(searched, "the notification handler's search")
    answer = orjson.loads(replies["pre"])
    assert answer["statusCode"] == 200
    request = orjson.loads(answer["body"])["request"]
    assert request["body"]["_name"]["firstName"] == "Ada" + PRE_MARK
    refusal = orjson.loads(replies["blocked"])
    assert refusal["statusCode"] == 403
    assert orjson.loads(refusal["body"])["code"] == "MODIFICATION_FORBIDDEN"
    assert await harness.dead_letters() == []  # a Block is an answer, not a failure
    assert await harness.backlog() == 0


async def test_an_unsigned_event_is_dead_lettered_at_once(
    harness: Harness, emulator: Emulator, app: WorkerApp
) -> None:
    note, trace_id = envelope(None, "NOTIFICATION", notification_body(None))
    async with serving(harness.source(app.settings, FakeLog()), app.dispatcher.handle):
        await harness.publish(note)

        async def dead() -> bool:
            return len(await harness.dead_letters()) == 1

        await eventually(dead, "the dead letter")
    [letter] = await harness.dead_letters()
    assert (letter.reason, letter.attempts, letter.status) == (
        "JWT_ERROR: the event carries no JWT",
        1,
        400,
    )
    assert letter.body == note
    assert searches(emulator, trace_id) == []


async def test_a_biot_outage_is_retried_until_it_passes(
    harness: Harness, emulator: Emulator, app: WorkerApp
) -> None:
    emulator.faults.update({"errors": [{"route": f"GET {PATIENTS}", "status": 503, "count": 2}]})
    note, trace_id = envelope(emulator, "NOTIFICATION", notification_body(None))
    async with serving(harness.source(app.settings, FakeLog()), app.dispatcher.handle):
        await harness.publish(note)

        async def passed() -> bool:
            return searches(emulator, trace_id) == [503, 503, 200]

        await eventually(passed, "two failed searches, then one that passes")
    assert await harness.dead_letters() == []
    assert await harness.backlog() == 0
