"""Real worker processes (``python -m worker run --source amqp://...``) whose connections to the
shared RabbitMQ go through a :class:`~tests.tcp_proxy.TcpProxy` the test owns: cut while events
are in flight, cut then SIGTERM, the broker unreachable for seconds. Issue 9 points 1, 2 and 5.

The emulator's injected latency goes through a :class:`Gate`: closed, it holds every handler's
BioT call, so a test knows exactly when ``max_in_flight`` events are in flight before it cuts.
The gate is closed *before* the events to hold are published: closed after, it races the
worker, which drains a few hundred events in well under a second, and finds nothing left to
hold (the cause of this file's old flaky failures; see :func:`publish_held`).
Queues run with ``max_attempts=1``: a redelivery counted as an attempt would dead-letter the
message (``REDELIVERY_LIMIT``), so "no dead letter" proves cuts are not counted.

Each test prints one line of measurements (events, handled, duplicates, dead letters, seconds).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator

import pytest

from tests.fixture_plugin import HANDLED, PATIENTS
from tests.queue_harness import RabbitHarness, make_harness
from tests.queue_helpers import RABBIT, WAIT, eventually
from tests.queue_workers import QueueWorker, Workers, handled, signed_notifications, workers
from tests.tcp_proxy import TcpProxy
from worker.testing.emulator import Emulator, EmulatorConfig, EmulatorServer
from worker.testing.publish import publish_all

__all__ = ["workers"]  # the shared fixtures, imported for pytest

pytestmark = pytest.mark.broker
MAX_IN_FLIGHT = 16
RESUMED = b"consuming again after the connection was lost"
RECEIVE_FAILED = b"receiving from the queue failed; trying again"


class Gate:
    """The emulator's sleep: open, it sleeps; closed, every call waits (counted) until opened,
    for ``WAIT`` seconds at most (a BioT call held longer than the client's 10 s timeout is
    abandoned and sent again: the two would count twice, so a test never holds one that long)."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self.waiting = 0

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    async def __call__(self, seconds: float) -> None:
        if self._open.is_set():
            await asyncio.sleep(seconds)
            return
        self.waiting += 1
        try:
            async with asyncio.timeout(WAIT):
                await self._open.wait()
        finally:
            self.waiting -= 1


@pytest.fixture
async def harness() -> AsyncIterator[RabbitHarness]:
    made = make_harness("rabbitmq", max_attempts="1")
    assert isinstance(made, RabbitHarness)
    try:
        yield made
    finally:
        await made.cleanup()


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    async with TcpProxy(RABBIT) as made:
        yield made


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
async def emulator(gate: Gate) -> AsyncIterator[Emulator]:
    emu = Emulator(EmulatorConfig(call_log_size=50_000), sleep=gate)
    emu.faults.update({"latency": {f"GET {PATIENTS}": 0.001}})
    async with EmulatorServer(emu):
        try:
            yield emu
        finally:
            gate.open()  # nothing waits past the test


def through(proxy: TcpProxy, harness: RabbitHarness) -> str:
    return harness.url.replace(f"{RABBIT[0]}:{RABBIT[1]}", f"127.0.0.1:{proxy.port}", 1)


async def publish(harness: RabbitHarness, bodies: list[bytes]) -> None:
    await harness.publish(bodies[0])  # opens the harness's publisher
    await publish_all(harness._publisher, bodies[1:])


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():
        sys.stdout.write(f"\n  {line}\n")


def runs(*processes: QueueWorker) -> int:
    """Handler runs in ``processes`` (the test plugin logs one per event handled; the emulator's
    count of patient searches would add the BioT client's own retries)."""
    return sum(lines_with(worker, HANDLED.encode()) for worker in processes)


def lines_with(worker: QueueWorker, text: bytes) -> int:
    return sum(text in line for line in worker.lines)


def usage(worker: QueueWorker) -> tuple[int, int]:
    """The worker's open descriptors and resident memory (kB)."""
    pid = worker.process.pid
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return fds, rss


async def wait_handled(emu: Emulator, count: int, limit: float = 60.0) -> None:
    async def enough() -> bool:
        return len(handled(emu)) >= count

    await eventually(enough, f"{count} events handled", limit)


async def publish_held(harness: RabbitHarness, gate: Gate, bodies: list[bytes]) -> None:
    """Close the gate, publish ``bodies`` (more than ``MAX_IN_FLIGHT``) and wait until exactly
    ``MAX_IN_FLIGHT`` of them are held in their handlers, the rest waiting in the queue.

    The gate closes before publishing: a gate closed after a publish could find the queue
    already drained, and fewer events than that to hold (the old flake)."""
    assert len(bodies) > MAX_IN_FLIGHT
    gate.close()
    await publish(harness, bodies)

    async def held() -> bool:
        return gate.waiting >= MAX_IN_FLIGHT

    await eventually(held, f"{MAX_IN_FLIGHT} events in flight")
    assert gate.waiting == MAX_IN_FLIGHT  # never more at once than WORKER_MAX_IN_FLIGHT


async def cut_in_flight(
    proxy: TcpProxy,
    gate: Gate,
    worker: QueueWorker,
    harness: RabbitHarness,
    bodies: list[bytes],
    cuts_so_far: int,
) -> float:
    """Publish ``bodies`` and cut while ``MAX_IN_FLIGHT`` of them are in flight (the rest queued),
    let those finish (their settle meets a dead channel), and return the seconds until the
    worker consumes again."""
    await publish_held(harness, gate, bodies)
    cut_at = time.monotonic()
    await proxy.cut()
    gate.open()

    async def resumed() -> bool:
        return lines_with(worker, RESUMED) > cuts_so_far

    await eventually(resumed, "the worker consuming again")
    return time.monotonic() - cut_at


async def settled(worker: QueueWorker, proxy: TcpProxy) -> None:
    """Wait until the worker has settled everything it received and the proxy passed its acks
    on (an ack needs no answer: only this says it reached the broker before a cut)."""

    async def quiet() -> bool:
        return await worker.in_flight() == 0 and proxy.in_transit() == 0

    await eventually(quiet, "every settle passed on to the broker")


async def no_backlog(harness: RabbitHarness) -> None:
    async def empty() -> bool:
        return await harness.backlog() == 0

    await eventually(empty, "every message acknowledged")


async def stop_within(worker: QueueWorker, limit: float) -> tuple[int, float]:
    signalled = time.monotonic()
    worker.process.send_signal(signal.SIGTERM)
    code = await worker.exit_code(limit)
    return code, time.monotonic() - signalled


async def test_cuts_under_load_lose_nothing_count_no_attempt_and_leak_nothing(
    harness: RabbitHarness,
    proxy: TcpProxy,
    gate: Gate,
    emulator: Emulator,
    workers: Workers,
    capsys: pytest.CaptureFixture[str],
) -> None:
    warm, events, cuts = 2 * MAX_IN_FLIGHT, 500, 3
    env = {"WORKER_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT)}
    worker = await workers.start(emulator, through(proxy, harness), **env)
    # A first load with every slot taken at once, so that the worker's pool of connections to
    # BioT is at its largest already when "before" is measured.
    await publish_held(harness, gate, signed_notifications(emulator, warm))
    gate.open()
    await wait_handled(emulator, warm)
    await no_backlog(harness)
    before = usage(worker)  # idle, after a first load
    load = signed_notifications(emulator, events)
    resumes = []
    for cut in range(cuts):  # each cut with its share of the load in flight or queued
        resumes.append(await cut_in_flight(proxy, gate, worker, harness, load[cut::cuts], cut))
        await wait_handled(emulator, len(handled(emulator)) + 2 * MAX_IN_FLIGHT)
    await wait_handled(emulator, warm + events)
    # Every slot is free again: max_in_flight new events are all held at once (a slot leaked
    # by a settle hanging on a dead channel would keep one of them waiting in the queue).
    await publish_held(harness, gate, signed_notifications(emulator, 2 * MAX_IN_FLIGHT))
    gate.open()
    total = warm + events + 2 * MAX_IN_FLIGHT
    await wait_handled(emulator, total)
    await no_backlog(harness)
    after = usage(worker)
    connections = proxy.open_connections
    code, took = await stop_within(worker, 5.0)
    counts = handled(emulator)
    duplicates = runs(worker) - total
    dead = await harness.dead_letters()
    report(capsys, f"RabbitMQ cuts: {total} published, {len(counts)} handled, {duplicates} "
                   f"duplicates, {len(dead)} dead-lettered, {cuts} cuts with {MAX_IN_FLIGHT} in "
                   f"flight, consuming again after {', '.join(f'{s:.2f}' for s in resumes)} s, "
                   f"fds {before[0]} -> {after[0]}, RSS {before[1] // 1024} -> "
                   f"{after[1] // 1024} MB, exit {code} after {took:.2f} s")  # fmt: skip
    assert len(counts) == total  # every event handled at least once
    # What was in flight at a cut runs twice (its handler finishes after the cut, its ack cannot
    # reach the broker), and nothing else does: not a message only prefetched at the cut.
    assert duplicates == cuts * MAX_IN_FLIGHT
    assert dead == []  # max_attempts=1: no cut counted as an attempt
    assert max(resumes) < 5.0
    assert connections == 1  # the worker's connections to the broker: none left behind
    assert after[0] <= before[0] + 10  # the HTTP pool to the emulator varies by a few
    assert after[1] - before[1] < 30 * 1024
    assert (code, took < 5.0) == (0, True)
    assert lines_with(worker, b"the connection to RabbitMQ was lost") <= cuts


async def test_sigterm_after_cuts_exits_in_time_and_loses_nothing(
    harness: RabbitHarness,
    proxy: TcpProxy,
    gate: Gate,
    emulator: Emulator,
    workers: Workers,
    capsys: pytest.CaptureFixture[str],
) -> None:
    events, cuts, grace = 300, 3, 20.0
    env = {"WORKER_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT), "WORKER_SHUTDOWN_GRACE": str(grace)}
    worker = await workers.start(emulator, through(proxy, harness), **env)
    load = signed_notifications(emulator, events)
    for cut in range(cuts):  # a quarter of the load for each cut, the last for the stop
        await cut_in_flight(proxy, gate, worker, harness, load[cut :: cuts + 1], cut)
    await publish_held(harness, gate, load[cuts :: cuts + 1])
    await proxy.cut()  # SIGTERM right after a cut, with events in flight
    signalled = time.monotonic()
    worker.process.send_signal(signal.SIGTERM)
    gate.open()
    code = await worker.exit_code(grace)
    took = time.monotonic() - signalled
    at_stop = len(handled(emulator))
    rest = await workers.start(emulator, harness.url, **env)  # straight to the broker
    await wait_handled(emulator, events)
    await no_backlog(harness)
    code_rest, _ = await stop_within(rest, 5.0)
    counts = handled(emulator)
    duplicates = runs(worker, rest) - events
    dead = await harness.dead_letters()
    report(capsys, f"RabbitMQ cuts then SIGTERM: {events} published, {at_stop} handled before "
                   f"the stop, exit {code} after {took:.2f} s (grace {grace:.0f} s), "
                   f"{len(counts)} handled in all, {duplicates} duplicates, "
                   f"{len(dead)} dead-lettered")  # fmt: skip
    assert (code, code_rest) == (0, 0)
    assert took < 5.0  # not the grace period: no settle hangs on the dead connection
    assert not any(b"did not finish" in line for line in worker.lines)
    assert len(counts) == events
    assert duplicates <= (cuts + 1) * MAX_IN_FLIGHT
    # The second worker is a fresh process: what the first held when it stopped comes back
    # redelivered and counts once; with max_attempts=1 that is a dead letter, but only for a
    # message the first worker had taken and not settled, never for more.
    assert all(letter.reason.startswith("REDELIVERY_LIMIT") for letter in dead)
    assert len(dead) <= 2 * MAX_IN_FLIGHT


async def test_an_unreachable_broker_is_survived_quietly_and_consuming_resumes(
    harness: RabbitHarness,
    proxy: TcpProxy,
    emulator: Emulator,
    workers: Workers,
    capsys: pytest.CaptureFixture[str],
) -> None:
    worker = await workers.start(emulator, through(proxy, harness))
    first = signed_notifications(emulator, 20)
    await publish(harness, first)
    await wait_handled(emulator, len(first))
    await settled(worker, proxy)  # handled is not acked: the cut must find nothing in flight
    await proxy.refuse()
    await proxy.cut()
    down_at = time.monotonic()
    during = signed_notifications(emulator, 50)
    await publish(harness, during)  # straight to the broker, while the worker cannot reach it

    async def backed_off() -> bool:  # the backoff reached its 2 s cap: a few seconds down
        return any(b'"retry_in":2.0' in line for line in worker.lines)

    await eventually(backed_off, "the receive backoff at its cap")
    assert worker.process.returncode is None
    down = time.monotonic() - down_at
    failures = lines_with(worker, RECEIVE_FAILED)
    await proxy.accept()
    up_at = time.monotonic()

    async def resumed() -> bool:
        return lines_with(worker, RESUMED) == 1

    await eventually(resumed, "the worker consuming again")
    resume = time.monotonic() - up_at
    total = len(first) + len(during)
    await wait_handled(emulator, total)
    await no_backlog(harness)
    code, _ = await stop_within(worker, 5.0)
    counts = handled(emulator)
    duplicates = runs(worker) - total
    report(capsys, f"RabbitMQ unreachable {down:.1f} s: {failures} 'receiving failed' lines, "
                   f"consuming again {resume:.2f} s after it came back, {total} published, "
                   f"{len(counts)} handled, {duplicates} duplicates")  # fmt: skip
    assert 1 <= failures <= down + 2  # at most about one line a second, not a flood
    assert resume < 5.0
    assert len(counts) == total
    assert duplicates == 0  # nothing was in flight at the cut
    assert await harness.dead_letters() == []
    assert code == 0
