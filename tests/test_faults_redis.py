"""Redis faults against a real worker process (``biot-worker run --source redis://...``), each on a
``redis-server`` of the test's own (:mod:`tests.redis_server`), never the shared one:

a. Redis killed (SIGKILL) mid-stream and started again empty: the worker creates its group again
   and handles every event published after the restart, within seconds;
b. the same with AOF (``appendfsync always``): nothing is lost, and the entries whose settle
   failed come back within seconds (``claim_idle`` stays 60 s: the worker re-reads its own
   pending entries after the failure), duplicates bounded by what was in flight;
c. a wrong-typed dead-letter key: the bad events stay pending (none lost) while good ones are
   handled; once the key is deleted they end in the dead-letter stream with their reason;
d. a wrong-typed retry key: good events keep being handled.

Each also checks (e) that the worker's open descriptors and RSS are back near where they were
before the fault, and that it exits 0 on SIGTERM within its grace. Each prints one line of
measurements (run with ``-s`` to see them).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from tests.fixture_plugin import PATIENTS
from tests.queue_helpers import eventually
from tests.queue_workers import (
    QueueWorker,
    Workers,
    emulator,
    handled,
    signed_notifications,
    workers,
)
from tests.redis_server import RedisServer
from worker.testing.emulator import Emulator
from worker.testing.publish import RedisPublisher, publish_all

__all__ = ["emulator", "workers"]  # the shared fixtures, imported for pytest

pytestmark = pytest.mark.broker
GRACE = 5.0
ENV = {"WORKER_MAX_IN_FLIGHT": "16", "WORKER_SHUTDOWN_GRACE": str(GRACE)}
RESUME_BOUND = 10.0  # seconds from Redis being back to the work being done (black box: 15 s)
FD_SLACK, RSS_SLACK_KB = 16, 40_000  # generous: pools refill lazily, allocators keep pages


@dataclass
class Usage:
    fds: int
    rss_kb: int

    @classmethod
    def of(cls, worker: QueueWorker) -> Usage:
        pid = worker.process.pid
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            rss = next(line for line in status if line.startswith("VmRSS:"))
        return cls(len(os.listdir(f"/proc/{pid}/fd")), int(rss.split()[1]))


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():
        sys.stdout.write(f"\n  {line}\n")


async def publish(url: str, bodies: list[bytes]) -> None:
    async with RedisPublisher(url) as publisher:
        await publish_all(publisher, bodies)


async def wait_handled(emu: Emulator, traces: set[str], what: str, limit: float = 30.0) -> float:
    """Wait until every event of ``traces`` was handled; the seconds it took."""
    started = time.monotonic()

    async def done() -> bool:
        return traces <= set(handled(emu))

    await eventually(done, what, limit)
    return time.monotonic() - started


def traces_of(bodies: list[bytes]) -> set[str]:
    return {orjson.loads(body)["headers"]["traceparent"].split("-")[1] for body in bodies}


async def warm_up(emu: Emulator, url: str, worker: QueueWorker) -> Usage:
    """Handle a first batch so pools and caches exist; the worker's usage then."""
    bodies = signed_notifications(emu, 50)
    await publish(url, bodies)
    await wait_handled(emu, traces_of(bodies), "the warm-up batch")
    return Usage.of(worker)


async def back_and_stopped(
    worker: QueueWorker, before: Usage, server: RedisServer, stream: str
) -> tuple[Usage, float]:
    """Wait until every entry of ``stream`` is settled (none left, none pending); assert usage
    is back near ``before`` and SIGTERM stops the worker cleanly in its grace; the usage after
    and the seconds the exit took."""

    async def all_settled() -> bool:
        return await settled(server, stream) == {"length": 0, "pending": 0}

    await eventually(all_settled, "every entry settled", 15.0)
    after = Usage.of(worker)
    assert after.fds <= before.fds + FD_SLACK, (before, after)
    assert after.rss_kb <= before.rss_kb + RSS_SLACK_KB, (before, after)
    signalled = time.monotonic()
    worker.process.send_signal(signal.SIGTERM)
    assert await worker.exit_code(GRACE + 5.0) == 0
    took = time.monotonic() - signalled
    assert took < GRACE
    assert worker.messages()[-1] == "worker stopped; closing resources"
    return after, took


async def settled(server: RedisServer, stream: str) -> dict[str, Any]:
    client = server.client()
    try:
        pending = (await client.xpending(stream, "biot-worker"))["pending"]
        return {"length": await client.xlen(stream), "pending": pending}
    finally:
        await client.aclose()


async def test_a_restart_without_data_then_every_new_event_is_handled(
    emulator: Emulator, workers: Workers, capsys: pytest.CaptureFixture[str]
) -> None:
    emulator.faults.update({"latency": {f"GET {PATIENTS}": 0.02}})
    async with RedisServer(persist=False) as server:
        stream = f"faults-{uuid.uuid4().hex}"
        url = server.url(stream=stream)
        worker = await workers.start(emulator, url, **ENV)
        before = await warm_up(emulator, url, worker)
        await publish(url, signed_notifications(emulator, 500))
        await eventually(_handled_at_least(emulator, 150), "events handled before the kill")
        await server.kill()
        at_kill = len(handled(emulator))
        await server.start()
        back = time.monotonic()
        after_restart = signed_notifications(emulator, 200)
        await publish(url, after_restart)
        await _first_handled(emulator, traces_of(after_restart))
        resumed = time.monotonic() - back
        await wait_handled(emulator, traces_of(after_restart), "the events after the restart")
        all_done = time.monotonic() - back
        counts = handled(emulator)
        usage, exit_took = await back_and_stopped(worker, before, server, stream)
    new = sum(counts[trace] for trace in traces_of(after_restart))
    report(capsys, f"Redis restart without data: 750 published (200 after the restart), "
                   f"{at_kill} handled before the kill, {new - 200} duplicates after it, "
                   f"first after {resumed:.2f} s, all after {all_done:.2f} s; fds "
                   f"{before.fds}->{usage.fds}, RSS {before.rss_kb // 1024}->"
                   f"{usage.rss_kb // 1024} MB; SIGTERM exit {exit_took:.2f} s")  # fmt: skip
    assert new - 200 <= int(ENV["WORKER_MAX_IN_FLIGHT"])  # all handled, duplicates bounded
    assert resumed < RESUME_BOUND
    assert "the consumer group was missing; created it again" in worker.messages()


async def test_a_restart_with_aof_loses_nothing_and_duplicates_come_back_in_seconds(
    emulator: Emulator, workers: Workers, capsys: pytest.CaptureFixture[str]
) -> None:
    events = 500
    emulator.faults.update({"latency": {f"GET {PATIENTS}": 0.05}})
    async with RedisServer(persist=True) as server:
        stream = f"faults-{uuid.uuid4().hex}"
        url = server.url(stream=stream)  # claim_idle stays at its 60 s default
        worker = await workers.start(emulator, url, **ENV)
        before = await warm_up(emulator, url, worker)
        bodies = signed_notifications(emulator, events)
        await publish(url, bodies)
        await eventually(_handled_at_least(emulator, 50 + 100), "events handled before the kill")
        await server.kill()
        at_kill = len(handled(emulator)) - 50
        await server.start()
        took = await wait_handled(emulator, traces_of(bodies), "every event after the restart")
        counts = handled(emulator)
        usage, exit_took = await back_and_stopped(worker, before, server, stream)
    duplicates = sum(counts[trace] for trace in traces_of(bodies)) - events
    report(capsys, f"Redis restart with AOF: {events} published, {at_kill} handled before the "
                   f"kill, {events} handled, {duplicates} duplicates, all within {took:.2f} s "
                   f"of the restart; fds {before.fds}->{usage.fds}, RSS "
                   f"{before.rss_kb // 1024}->{usage.rss_kb // 1024} MB; SIGTERM exit "
                   f"{exit_took:.2f} s")  # fmt: skip
    assert 0 < at_kill < events, "the kill did not land mid-stream"
    assert took < RESUME_BOUND  # not claim_idle (60 s): the worker re-read its own entries
    assert duplicates <= 2 * int(ENV["WORKER_MAX_IN_FLIGHT"])  # only what was in flight


async def test_a_wrong_typed_dead_letter_key_loses_nothing(
    emulator: Emulator, workers: Workers, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = [b'{"headers": "not an object %d"}' % n for n in range(10)]
    good = signed_notifications(emulator, 20)
    async with RedisServer() as server:
        stream = f"faults-{uuid.uuid4().hex}"
        url = server.url(stream=stream)
        client = server.client()
        try:
            await client.set(f"{stream}:dead", "a string, not a stream")
            worker = await workers.start(emulator, url, **ENV)
            before = await warm_up(emulator, url, worker)
            await publish(url, interleaved(good, bad))
            await wait_handled(emulator, traces_of(good), "the good events")

            async def bad_ones_pending() -> bool:
                return (await settled(server, stream)) == {"length": 10, "pending": 10}

            await eventually(bad_ones_pending, "the bad events pending, the good ones settled")
            fixed = time.monotonic()
            await client.delete(f"{stream}:dead")

            async def dead_lettered() -> bool:
                return int(await client.xlen(f"{stream}:dead")) == 10

            await eventually(dead_lettered, "the bad events in the dead letters", 15.0)
            to_dead = time.monotonic() - fixed
            letters: Any = await client.xrange(f"{stream}:dead")
        finally:
            await client.aclose()
        usage, exit_took = await back_and_stopped(worker, before, server, stream)
    reasons = sorted({fields[b"reason"].decode().split(":")[0] for _, fields in letters})
    envelopes = sorted(fields[b"envelope"] for _, fields in letters)
    report(capsys, f"wrong-typed dead-letter key: 30 published (10 bad), 20 good handled, "
                   f"10 bad pending until the key was fixed, then dead-lettered within "
                   f"{to_dead:.2f} s ({', '.join(reasons)}); fds {before.fds}->{usage.fds}, RSS "
                   f"{before.rss_kb // 1024}->{usage.rss_kb // 1024} MB; SIGTERM exit "
                   f"{exit_took:.2f} s")  # fmt: skip
    assert envelopes == sorted(bad)
    assert set(reasons) <= {"NO_EVENT", "REDELIVERY_LIMIT"}
    assert sum(handled(emulator).values()) == 70  # warm-up and good ones, once each
    failures = [r for r in worker.records() if r["message"].startswith("settling a queue")]
    assert failures and len(failures) < 40  # logged, throttled
    assert all("WRONGTYPE" in r["error"] and r["ref"] for r in failures)


async def test_a_wrong_typed_retry_key_does_not_stop_intake(
    emulator: Emulator, workers: Workers, capsys: pytest.CaptureFixture[str]
) -> None:
    async with RedisServer() as server:
        stream = f"faults-{uuid.uuid4().hex}"
        url = server.url(stream=stream)
        client = server.client()
        try:
            await client.set(f"{stream}:retry", "a string, not a sorted set")
            worker = await workers.start(emulator, url, **ENV)
            before = await warm_up(emulator, url, worker)
            bodies = signed_notifications(emulator, 200)
            await publish(url, bodies)
            took = await wait_handled(emulator, traces_of(bodies), "the events", 15.0)
        finally:
            await client.aclose()
        usage, exit_took = await back_and_stopped(worker, before, server, stream)
    failures = worker.messages().count("moving due retries back to the stream failed")
    report(capsys, f"wrong-typed retry key: 250 published, {len(handled(emulator))} handled in "
                   f"{took:.2f} s, {failures} throttled log lines; fds {before.fds}->"
                   f"{usage.fds}, RSS {before.rss_kb // 1024}->{usage.rss_kb // 1024} MB; "
                   f"SIGTERM exit {exit_took:.2f} s")  # fmt: skip
    assert sum(handled(emulator).values()) == 250
    assert 1 <= failures <= 30  # at most one a second


def interleaved(good: list[bytes], bad: list[bytes]) -> list[bytes]:
    """``good`` with one of ``bad`` after every other one (``bad`` half as long)."""
    out: list[bytes] = []
    for n, body in enumerate(good):
        out += [body, bad[n // 2]] if n % 2 == 0 else [body]
    return out


def _handled_at_least(emu: Emulator, count: int) -> Any:
    async def check() -> bool:
        return len(handled(emu)) >= count

    return check


async def _first_handled(emu: Emulator, traces: set[str]) -> None:
    """Wait until the first event of ``traces`` is handled."""

    async def any_handled() -> bool:
        return bool(traces & set(handled(emu)))

    await eventually(any_handled, "the first event after the restart", 30.0)
