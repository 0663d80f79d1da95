"""A queue worker's ``/metrics`` (issue 11, point 5): real ``biot-worker run --source`` processes
on the shared Redis and RabbitMQ, each on its own stream or queue (a uuid, removed afterwards),
serving :mod:`tests.metrics_plugin` against an in-process emulator. After a known mix of
messages the health port's ``/metrics`` shows exactly what was received, acknowledged, retried
and dead-lettered under the queue's name, the events by hook and status, and the consumer lag;
a message left pending by a SIGKILLed worker counts as redelivered in the next one.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable
from typing import Final

import aiohttp
import orjson
import pytest

from tests.metrics_plugin import PATIENTS, REFERENCE
from tests.queue_harness import Harness, make_harness
from tests.queue_helpers import eventually
from tests.queue_workers import QueueWorker, Workers, emulator, stop_queue_worker, workers
from tests.test_metrics import (
    PREFIX,
    Samples,
    assert_labels_bounded,
    moved,
    parse,
    value,
)
from worker.testing.emulator import Emulator
from worker.testing.events import entity, notification_body
from worker.tracing import new_trace

__all__ = ["emulator", "workers"]  # the shared fixtures, imported for pytest

pytestmark = pytest.mark.broker
LIMIT: Final = 30.0  # the longest any wait here may take
QUEUE: Final = PREFIX + "queue_"


@pytest.fixture(params=["redis", "rabbitmq"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    # Two attempts at most, the second soon after the first.
    made = make_harness(request.param, max_attempts="2", retry_delay="0.1")
    try:
        yield made
    finally:
        await made.cleanup()


def source_of(harness: Harness) -> str:
    return str(getattr(harness, "url"))  # noqa: B009 - Redis and RabbitMQ harnesses have one


def queue_of(harness: Harness) -> str:
    """The queue label: the stream (Redis) or queue (RabbitMQ) the worker was given."""
    return str(getattr(harness, "stream", None) or getattr(harness, "queue"))  # noqa: B009


class Messages:
    """Envelopes of notifications for the metrics plugin; remembers the ids and trace ids."""

    def __init__(self, emu: Emulator) -> None:
        self.token = emu.sign_token(scopes=["ACTION_NOTIFICATION"])
        self.sent: list[str] = []

    def notification(self, mode: str, *, signed: bool = True) -> bytes:
        patient, trace = entity(mode), new_trace()
        self.sent += [patient["_id"], trace.trace_id]
        body = notification_body(self.token if signed else None, entity_data=patient)
        headers = {"hooktype": "NOTIFICATION", "traceparent": trace.traceparent}
        return orjson.dumps({"headers": headers, "body": orjson.dumps(body).decode()})


def health_url(worker: QueueWorker) -> str:
    [consuming] = [r for r in worker.records() if r["message"] == "worker consuming"]
    return str(consuming["health"])


async def scrape(worker: QueueWorker) -> Samples:
    async with aiohttp.ClientSession() as http, http.get(health_url(worker) + "/metrics") as got:
        assert got.status == 200
        assert got.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(await got.text())


async def scraped_until(
    worker: QueueWorker, check: Callable[[Samples], bool], what: str
) -> Samples:
    """Scrape until ``check`` holds for a scrape (at most :data:`LIMIT` s); that scrape."""
    last: list[Samples] = []

    async def holds() -> bool:
        last[:] = [await scrape(worker)]
        return check(last[0])

    await eventually(holds, what, LIMIT)
    return last[0]


def count(samples: Samples, verb: str, queue: str) -> float:
    return value(samples, f"{QUEUE}{verb}_total", queue=queue)


def lag(samples: Samples, queue: str) -> float | None:
    return samples.get((QUEUE + "consumer_lag_messages", (("queue", queue),)))


SETTLED: Final = ("messages_acknowledged", "messages_retried", "messages_dead_lettered")
COUNTERS: Final = (
    "messages_received",
    "messages_redelivered",
    *SETTLED,
    "settle_failures",
    "receive_failures",
)


def settled(samples: Samples, queue: str) -> float:
    return sum(count(samples, verb, queue) for verb in SETTLED)


async def test_a_known_mix_of_messages_moves_each_count_by_exactly_that(
    harness: Harness, emulator: Emulator, workers: Workers
) -> None:
    queue = queue_of(harness)
    worker = await workers.start(
        emulator, source_of(harness), WORKER_ROUTES=REFERENCE, WORKER_DEADLINE_NOTIFICATION="1"
    )
    before = await scrape(worker)
    messages = Messages(emulator)
    batch = [
        *(messages.notification("good") for _ in range(3)),
        messages.notification("raise"),  # a bug in the handler: permanent, dead-lettered
        messages.notification("hang"),  # past its deadline twice: retried, then dead-lettered
        messages.notification("good", signed=False),  # no JWT: permanent
        b"this is not an envelope",
    ]
    for body in batch:
        await harness.publish(body)
    # Each message is settled once, the hanging one twice (it is received again for its retry).
    after = await scraped_until(worker, lambda s: settled(s, queue) == 8, "8 settles")
    after = await scraped_until(worker, lambda s: lag(s, queue) == 0, "the lag read as 0")
    assert await stop_queue_worker(worker) == 0

    counts = {verb: count(after, verb, queue) - count(before, verb, queue) for verb in COUNTERS}
    assert counts == {
        "messages_received": 8,
        "messages_redelivered": 0,
        "messages_acknowledged": 3,
        "messages_retried": 1,
        "messages_dead_lettered": 4,
        "settle_failures": 0,
        "receive_failures": 0,
    }
    # The malformed message, refused before it became an event, counts as one answered
    # under the hook its headers name (none: NONSPECIFIC), as the HTTP adapter's refusals do.
    assert moved(before, after, PREFIX + "events_total", "hook", "status") == {
        ("NOTIFICATION", "200"): 3,
        ("NOTIFICATION", "400"): 1,
        ("NOTIFICATION", "500"): 1,
        ("NOTIFICATION", "504"): 2,
        ("NONSPECIFIC", "400"): 1,
    }
    assert moved(before, after, PREFIX + "event_duration_seconds_count", "hook") == {
        ("NOTIFICATION",): 7,
        ("NONSPECIFIC",): 1,
    }
    assert moved(before, after, PREFIX + "jwt_refusals_total", "reason") == {("missing",): 1}
    assert moved(before, after, PREFIX + "api_requests_total", "method", "status_class") == {
        ("GET", "2xx"): 3
    }
    assert value(after, PREFIX + "events_in_flight") == 0
    assert value(after, PREFIX + "service_logins_total", outcome="success") >= 1
    letters = await harness.dead_letters()
    assert len(letters) == 4
    assert_labels_bounded(after, [*messages.sent, PATIENTS], queues=[queue])


async def test_a_message_left_pending_by_a_killed_worker_counts_as_redelivered(
    harness: Harness, emulator: Emulator, workers: Workers
) -> None:
    """The first worker holds one message (its handler hangs on a first delivery) while three
    more wait: the lag says 3. SIGKILLed, it settles nothing; the next worker gets the held
    message again (redelivered) and handles all four."""
    queue = queue_of(harness)
    env = {"WORKER_ROUTES": REFERENCE, "WORKER_MAX_IN_FLIGHT": "1"}
    first = await workers.start(emulator, source_of(harness), **env)
    messages = Messages(emulator)
    await harness.publish(messages.notification("hang-once"))

    async def held() -> bool:
        return await first.in_flight() == 1

    await eventually(held, "the first worker to hold the message", LIMIT)
    for _ in range(3):
        await harness.publish(messages.notification("good"))
    waiting = await scraped_until(first, lambda s: lag(s, queue) == 3, "a lag of 3")
    assert count(waiting, "messages_received", queue) == 1
    assert value(waiting, PREFIX + "events_in_flight") == 1
    assert await stop_queue_worker(first, signal.SIGKILL) == -signal.SIGKILL

    second = await workers.start(emulator, source_of(harness), **env)
    after = await scraped_until(
        second, lambda s: count(s, "messages_acknowledged", queue) == 4, "4 acknowledged"
    )
    after = await scraped_until(second, lambda s: lag(s, queue) == 0, "the lag read as 0")
    assert await stop_queue_worker(second) == 0
    assert count(after, "messages_received", queue) == 4
    assert count(after, "messages_redelivered", queue) == 1
    assert count(after, "messages_retried", queue) == 0
    assert count(after, "messages_dead_lettered", queue) == 0
    assert moved({}, after, PREFIX + "events_total", "hook", "status") == {
        ("NOTIFICATION", "200"): 4
    }
    assert await harness.backlog() == 0


async def test_a_queue_worker_with_metrics_off_answers_404_at_metrics(
    emulator: Emulator, workers: Workers
) -> None:
    redis = make_harness("redis")
    try:
        worker = await workers.start(emulator, source_of(redis), WORKER_METRICS="false")
        async with aiohttp.ClientSession() as http:
            async with http.get(health_url(worker) + "/metrics") as response:
                assert response.status == 404
            async with http.get(health_url(worker) + "/healthz") as response:
                assert response.status == 200
        assert await stop_queue_worker(worker) == 0
    finally:
        await redis.cleanup()
