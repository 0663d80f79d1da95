"""The contract every queue source keeps, run against memory, real Redis and real RabbitMQ.

Delivery, ack only after the outcome, redelivery of what was interrupted, graceful drain,
bounded in-flight, retries with backoff and an attempt count, dead letters with their reason,
bad messages dead-lettered while the worker keeps going, replies with the correlation id.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import orjson
import pytest

from tests.queue_harness import Harness, cleanup_all, make_harness, serve
from tests.queue_helpers import FakeLog, ScriptedHandle, eventually, message, queue_settings
from worker.events import HookType

Make = Callable[..., Harness]
pytestmark = pytest.mark.broker


@pytest.fixture(params=["memory", "redis", "rabbitmq"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Make]:
    made: list[Harness] = []

    def factory(**params: str) -> Harness:
        made.append(make_harness(request.param, **params))
        return made[-1]

    try:
        yield factory
    finally:
        await cleanup_all(made)


async def test_each_message_is_handled_once_then_acknowledged(make: Make) -> None:
    harness, handle = make(), ScriptedHandle()
    async with serve(harness, handle):
        for n in range(5):
            await harness.publish(message(f"m{n}"))
        await handle.wait_calls(5)
    assert sorted(handle.keys()) == [f"m{n}" for n in range(5)]
    event = handle.calls[0].event
    assert event.hook is HookType.NONSPECIFIC
    assert event.attempt == 1
    assert orjson.loads(event.body)["key"].startswith("m")
    # Closed: anything unacknowledged would be back in the queue now.
    assert await harness.backlog() == 0
    assert await harness.dead_letters() == []


async def test_an_event_interrupted_in_flight_is_delivered_again(make: Make) -> None:
    harness, log = make(), FakeLog()
    settings = queue_settings(WORKER_SHUTDOWN_GRACE="0.2")
    first = ScriptedHandle()
    async with serve(harness, first, settings, log):
        await harness.publish(message("slow", block=True))
        await first.wait_calls(1)
        assert await harness.backlog() == 0  # delivered, but not acknowledged
    assert log.find("in-flight events did not finish within the grace period; "
                    "they stay unacknowledged and will be delivered again")  # fmt: skip
    second = ScriptedHandle()
    second.release()
    async with serve(harness, second, settings):
        await second.wait_calls(1)
    assert [(c.key, c.attempt) for c in second.calls] == [("slow", 2)]
    assert await harness.backlog() == 0
    assert await harness.dead_letters() == []


async def test_stop_lets_in_flight_events_finish_and_acknowledges_them(make: Make) -> None:
    harness, handle, log = make(), ScriptedHandle(), FakeLog()
    settings = queue_settings(WORKER_MAX_IN_FLIGHT="2", WORKER_SHUTDOWN_GRACE="10")
    async with serve(harness, handle, settings, log) as stop:
        for n in range(2):
            await harness.publish(message(f"busy{n}", block=True))
        await handle.wait_calls(2, running=2)
        for n in range(3):
            await harness.publish(message(f"later{n}"))
        stop.set()

        async def draining() -> bool:
            return bool(log.find("stopping intake; waiting for in-flight events"))

        await eventually(draining, "the source to stop its intake")
        handle.release()
    assert log.find("stopping intake; waiting for in-flight events") == [{"in_flight": 2}]
    assert sorted(handle.keys()) == ["busy0", "busy1"]
    assert await harness.backlog() == 3  # the rest waits in the queue, nothing lost
    rest = ScriptedHandle()
    async with serve(harness, rest, settings):
        await rest.wait_calls(3)
    assert sorted(rest.keys()) == ["later0", "later1", "later2"]
    assert await harness.backlog() == 0


async def test_no_more_than_max_in_flight_are_taken_at_once(make: Make) -> None:
    harness, handle = make(), ScriptedHandle()
    settings = queue_settings(WORKER_MAX_IN_FLIGHT="3")
    async with serve(harness, handle, settings):
        for n in range(8):
            await harness.publish(message(f"b{n}", block=True))
        await handle.wait_calls(3, running=3)

        async def five_waiting() -> bool:
            return await harness.backlog() == 5

        await eventually(five_waiting, "5 messages left with the broker")
        assert handle.running == 3
        handle.release()
        await handle.wait_calls(8)
    assert handle.most_running == 3
    assert sorted(handle.keys()) == sorted(f"b{n}" for n in range(8))


async def test_transient_failures_are_retried_with_backoff_and_attempt_count(make: Make) -> None:
    harness, handle, log = make(retry_delay="0.2", max_attempts="4"), ScriptedHandle(), FakeLog()
    async with serve(harness, handle, queue_settings(), log):
        await harness.publish(message("flaky", transient=2))
        await handle.wait_calls(3)
    assert [c.attempt for c in handle.calls] == [1, 2, 3]
    first, second, third = (c.at for c in handle.calls)
    assert second - first >= 0.2 - 0.02
    assert third - second >= 0.4 - 0.02  # the delay doubles
    assert [r["attempt"] for r in log.find("event will be retried")] == [1, 2]
    assert await harness.backlog() == 0
    assert await harness.dead_letters() == []


async def test_the_last_failed_attempt_is_dead_lettered_with_reason(make: Make) -> None:
    harness, handle = make(retry_delay="0.05", max_attempts="3"), ScriptedHandle()
    body = message("doomed", transient=99)
    async with serve(harness, handle, queue_settings()):
        await harness.publish(body)
        await handle.wait_calls(3)

        async def dead() -> bool:
            return len(await harness.dead_letters()) == 1

        await eventually(dead, "the dead letter")
    [letter] = await harness.dead_letters()
    assert letter.body == body
    assert letter.attempts == 3
    assert letter.reason == "CALL_TO_API_FAILED: BioT answered 503 (gave up after 3 attempts)"
    assert letter.status == 502
    assert [c.attempt for c in handle.calls] == [1, 2, 3]
    assert await harness.backlog() == 0


async def test_a_permanent_failure_is_dead_lettered_at_once(make: Make) -> None:
    harness, handle = make(retry_delay="0.05"), ScriptedHandle()
    async with serve(harness, handle, queue_settings()):
        await harness.publish(message("forged", permanent=True))
        await harness.publish(message("fine"))
        await handle.wait_calls(2)

        async def dead() -> bool:
            return len(await harness.dead_letters()) == 1

        await eventually(dead, "the dead letter")
    [letter] = await harness.dead_letters()
    assert (letter.reason, letter.attempts, letter.status) == (
        "JWT_ERROR: the event carries no JWT",
        1,
        400,
    )
    assert sorted(handle.keys()) == ["fine", "forged"]


async def test_bad_messages_are_dead_lettered_and_the_worker_keeps_going(make: Make) -> None:
    harness, handle = make(), ScriptedHandle()
    settings = queue_settings(WORKER_MAX_BODY_BYTES="1000")
    box = await harness.reply_box()
    bad = {
        b"not json {": "NO_EVENT: queue message is not JSON",
        b"": "NO_EVENT: queue message is empty",
        orjson.dumps({"body": "no headers"}): "NO_EVENT: queue message is not an envelope",
        orjson.dumps({"headers": {}, "body": "x" * 1001}): "PAYLOAD_TOO_LARGE: event body of",
        b"y" * 70_000: "PAYLOAD_TOO_LARGE: queue message of 70000 bytes",
    }
    async with serve(harness, handle, settings):
        for body in bad:
            await harness.publish(body, reply_to=box, correlation_id="bad")
        await harness.publish(message("after"))
        await handle.wait_calls(1)

        async def all_dead() -> bool:
            return len(await harness.dead_letters()) == len(bad)

        await eventually(all_dead, "every bad message in the dead letters")
        replies = [await harness.next_reply(box) for _ in bad]
    assert handle.keys() == ["after"]
    reasons = {letter.body: letter.reason for letter in await harness.dead_letters()}
    for body, reason in bad.items():
        assert reasons[body].startswith(reason), reasons[body]
    assert all(letter.attempts == 1 for letter in await harness.dead_letters())
    statuses = sorted(orjson.loads(reply)["statusCode"] for _, reply in replies)
    assert statuses == [400, 400, 400, 413, 413]
    assert {correlation for correlation, _ in replies} == {"bad"}


async def test_replies_go_to_reply_to_with_the_correlation_id(make: Make) -> None:
    harness, handle = make(retry_delay="0.05"), ScriptedHandle()
    box = await harness.reply_box()
    async with serve(harness, handle, queue_settings()):
        await harness.publish(message("rpc"), reply_to=box, correlation_id="c-1")
        refused = message("refused", permanent=True)
        await harness.publish(refused, reply_to=box, correlation_id="c-2")
        await harness.publish(message("flaky", transient=1), reply_to=box, correlation_id="c-3")
        replies = dict([await harness.next_reply(box) for _ in range(3)])
    decoded = {k: orjson.loads(v) for k, v in replies.items() if k is not None}
    assert decoded["c-1"]["statusCode"] == 200
    assert orjson.loads(decoded["c-1"]["body"]) == {"key": "rpc"}
    assert decoded["c-2"]["statusCode"] == 400
    assert orjson.loads(decoded["c-2"]["body"])["code"] == "JWT_ERROR"
    # A retried event answers once, with the outcome of its last attempt.
    assert decoded["c-3"]["statusCode"] == 200
    assert [c.attempt for c in handle.calls if c.key == "flaky"] == [1, 2]


async def test_a_retried_message_keeps_one_trace_and_dead_letters_as_published(make: Make) -> None:
    """A message without a trace header gets one trace when first parsed; its retries carry it
    (a ``traceparent`` added to the re-queued envelope), so every line about it, over all its
    deliveries, has one trace id; the dead letter is the envelope as it was published."""
    harness, log = make(retry_delay="0.05", max_attempts="3"), FakeLog()
    handle, body = ScriptedHandle(), message("untraced", transient=99)
    assert orjson.loads(body)["headers"] == {"hooktype": "NONSPECIFIC"}  # no trace header
    async with serve(harness, handle, queue_settings(), log):
        await harness.publish(body)
        await handle.wait_calls(3)

        async def dead() -> bool:
            return len(await harness.dead_letters()) == 1

        await eventually(dead, "the dead letter")
    [letter] = await harness.dead_letters()
    assert letter.body == body  # byte for byte: nothing added shows in the dead letter
    assert letter.reason.endswith("(gave up after 3 attempts)")
    [trace_id] = {call.event.trace.trace_id for call in handle.calls}
    assert [c.attempt for c in handle.calls] == [1, 2, 3]
    assert "traceparent" not in handle.calls[0].event.headers
    assert [orjson.loads(c.event.body) for c in handle.calls] == [orjson.loads(body)["body"]] * 3
    about = [(m, t) for m, t in log.traced if m in ("event will be retried", "event dead-lettered")]
    assert about == [("event will be retried", trace_id)] * 2 + [("event dead-lettered", trace_id)]
    assert {t for _, t in log.traced if t is not None} == {trace_id}
