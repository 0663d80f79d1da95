"""Worker processes on the real brokers: SIGKILL mid-batch loses nothing, SIGTERM under load
drains and acknowledges, two workers share one queue, and ``biot-worker publish`` end to end.

Each run prints one line of measurements (events, handled, duplicates, seconds).
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest

from tests.fixture_plugin import PATIENTS
from tests.queue_harness import Harness, make_harness
from tests.queue_helpers import eventually
from tests.queue_workers import (
    Workers,
    emulator,
    handled,
    signed_notifications,
    stop_queue_worker,
    workers,
)
from worker.testing.emulator import Emulator
from worker.testing.publish import publish_all

__all__ = ["emulator", "workers"]  # the shared fixtures, imported for pytest

pytestmark = pytest.mark.broker
BATCH = 1000
MAX_IN_FLIGHT = 32


@pytest.fixture(params=["redis", "rabbitmq"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    # claim_idle only matters to Redis: a killed consumer's entries come back after 1 s.
    made = make_harness(request.param, claim_idle="1", retry_delay="0.1")
    try:
        yield made
    finally:
        await made.cleanup()


def url(harness: Harness) -> str:
    return str(getattr(harness, "url"))  # noqa: B009 - Redis and RabbitMQ harnesses have one


async def publish(harness: Harness, bodies: list[bytes]) -> None:
    await harness.publish(bodies[0])  # opens the harness's publisher
    await publish_all(harness._publisher, bodies[1:])  # type: ignore[attr-defined]


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():
        sys.stdout.write(f"\n  {line}\n")


async def wait_handled(emu: Emulator, count: int) -> None:
    async def enough() -> bool:
        return len(handled(emu)) >= count

    await eventually(enough, f"{count} events handled", 60.0)


async def test_sigkill_mid_batch_then_restart_loses_nothing(
    harness: Harness, emulator: Emulator, workers: Workers, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    await publish(harness, signed_notifications(emulator, BATCH))
    env = {"WORKER_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT)}
    first = await workers.start(emulator, url(harness), **env)
    await wait_handled(emulator, BATCH // 3)
    assert await stop_queue_worker(first, signal.SIGKILL) == -signal.SIGKILL
    at_kill = len(handled(emulator))
    assert at_kill < BATCH, "the worker finished before it could be killed mid-batch"
    second = await workers.start(emulator, url(harness), **env)
    await wait_handled(emulator, BATCH)
    assert await stop_queue_worker(second) == 0
    counts = handled(emulator)
    duplicates = sum(counts.values()) - BATCH
    report(capsys, f"SIGKILL [{harness.name}]: {BATCH} events, killed after {at_kill}, "
                   f"{len(counts)} handled, {duplicates} duplicates, "
                   f"{time.monotonic() - started:.1f} s")  # fmt: skip
    assert len(counts) == BATCH  # every event handled at least once
    assert duplicates <= MAX_IN_FLIGHT  # only what was in flight at the kill runs twice
    assert await harness.backlog() == 0  # and everything was acknowledged
    assert await harness.dead_letters() == []


async def test_sigterm_under_load_drains_acknowledges_and_exits_in_time(
    harness: Harness, emulator: Emulator, workers: Workers, capsys: pytest.CaptureFixture[str]
) -> None:
    events, grace = 200, 10.0
    emulator.faults.update({"latency": {f"GET {PATIENTS}": 0.2}})
    env = {"WORKER_MAX_IN_FLIGHT": "16", "WORKER_SHUTDOWN_GRACE": str(grace)}
    worker = await workers.start(emulator, url(harness), **env)
    await publish(harness, signed_notifications(emulator, events))
    await wait_handled(emulator, 20)
    signalled = time.monotonic()
    assert await stop_queue_worker(worker) == 0
    took = time.monotonic() - signalled
    done = handled(emulator)
    drain = [r for r in worker.records() if r["message"].startswith("stopping intake")]
    report(capsys, f"SIGTERM [{harness.name}]: {drain[0]['in_flight']} in flight, "
                   f"{len(done)} handled, exit after {took:.2f} s")  # fmt: skip
    assert drain[0]["in_flight"] > 0
    assert took < grace
    assert not any("did not finish" in m for m in worker.messages())
    assert worker.messages()[-1] == "worker stopped; closing resources"
    assert worker.messages().count("event handled") == len(done)
    assert sum(done.values()) == len(done)  # no event handled twice
    # Every in-flight event was acknowledged: only the never-started ones are left.
    assert await harness.backlog() == events - len(done)
    rest = await workers.start(emulator, url(harness))
    await wait_handled(emulator, events)
    assert await stop_queue_worker(rest) == 0
    assert sum(handled(emulator).values()) == events


async def test_two_workers_share_one_queue(
    harness: Harness, emulator: Emulator, workers: Workers, capsys: pytest.CaptureFixture[str]
) -> None:
    events = 200
    emulator.faults.update({"latency": {f"GET {PATIENTS}": 0.02}})
    env = {"WORKER_MAX_IN_FLIGHT": "8"}
    pair = [await workers.start(emulator, url(harness), **env) for _ in range(2)]
    await publish(harness, signed_notifications(emulator, events))
    await wait_handled(emulator, events)
    assert [await stop_queue_worker(w) for w in pair] == [0, 0]
    shares = [w.messages().count("event handled") for w in pair]
    report(capsys, f"two workers [{harness.name}]: shares {shares}")
    assert sum(shares) == events
    assert all(share > 0 for share in shares)
    assert sum(handled(emulator).values()) == events


async def test_publish_command_samples_replies_and_a_poison_message(
    harness: Harness, emulator: Emulator, workers: Workers
) -> None:
    worker = await workers.start(emulator, url(harness))
    signed = await run_publish(url(harness), "--hook", "all", "--count", "2",
                               "--emulator", str(emulator.base_url), "--wait-replies",
                               "--timeout", "20")  # fmt: skip
    unsigned = await run_publish(url(harness), "--hook", "NOTIFICATION")
    await eventually(_one_dead(harness), "the unsigned sample in the dead letters")
    assert await stop_queue_worker(worker) == 0
    code, lines = signed
    assert code == 0
    assert lines[0]["published"] == 10
    assert "guest:guest" not in str(lines[0]["source"])
    replies = [line["reply"] for line in lines[1:]]
    assert len(replies) == 10
    assert all(reply["statusCode"] == 200 for reply in replies)
    assert unsigned == (0, [{"published": 1, "source": lines[0]["source"]}])
    [letter] = await harness.dead_letters()
    assert letter.reason == "JWT_ERROR: the event carries no JWT"
    assert letter.attempts == 1


def _one_dead(harness: Harness) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(await harness.dead_letters()) == 1

    return check


async def run_publish(source: str, *args: str) -> tuple[int, list[dict[str, Any]]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "publish", "--source", source, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(60):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:  # timed out or interrupted: leave no process behind
            process.kill()
            await process.wait()
    assert process.returncode is not None
    lines = [orjson.loads(line) for line in out.splitlines()]
    assert process.returncode == 0 or not err, err.decode()[-2000:]
    return process.returncode, lines
