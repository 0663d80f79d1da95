"""Closed-loop and open-loop load over keep-alive connections, with a measured window.

Both drivers send through a :class:`~worker.bench.queue_hook.ChannelPool`: keep-alive HTTP
connections (:class:`Pool`) or Redis Streams channels (scenario (e)). Both run a warm-up
(excluded), then a window bounded by a request count and a time, then a bounded drain:

- **closed loop**: ``concurrency`` connections, each sending its next event as soon as the last
  one was answered (as wrk does). Latency is answer time minus send time.
- **open loop**: events arrive at ``rate`` a second (Poisson), whatever the answers do, on up to
  ``concurrency`` connections; an arrival with no free connection waits in a queue. Latency is
  answer time minus the *intended* arrival time, so a stalled server is charged for the events
  it delayed (no coordinated omission). ``lag`` is how late the generator itself sent.

The window's throughput and CPU count completions inside ``[t0, t1]``; latency samples are every
event started in the window, including those answered during the drain. Events still unanswered
when the drain ends are ``incomplete`` and their connections are closed. The open loop itself
is in :mod:`worker.bench.openloop`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from worker.bench.httpload import Reply, RequestSource, ResponseError, connect
from worker.bench.procstat import cpu_seconds
from worker.bench.queue_hook import Channel, ChannelPool

Check = Callable[[Reply, bool], str | None]  # (reply, inspect body?) -> error kind or None
BODY_CHECK_EVERY = 100


@dataclass(frozen=True, slots=True)
class LoadSpec:
    concurrency: int
    rate: float | None = None  # events a second: open loop; None: closed loop
    warmup_requests: int = 50
    warmup_seconds: float = 1.0  # cap on the warm-up
    max_requests: int = 10_000
    max_seconds: float = 5.0
    min_completions: int = 0  # closed loop: past max_seconds, wait for this many answers...
    slow_seconds: float = 0.0  # ...but measure no longer than this in all
    drain_seconds: float = 5.0
    seed: int = 1


@dataclass(slots=True)
class LoadResult:
    latencies_us: list[float] = field(default_factory=list)
    lag_us: list[float] = field(default_factory=list)
    completed: int = 0
    window_s: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)
    incomplete: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)
    # Every answer of the point, warm-up and drain included (what the target served; the
    # stand-in collector's span count is checked against it).
    answered: int = 0


class Pool:
    """Keep-alive connections to one target, kept between points (warm "containers")."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._idle: list[Channel] = []

    async def take(self, n: int) -> list[Channel]:
        self._idle = [c for c in self._idle if not c.closed]
        taken, self._idle = self._idle[:n], self._idle[n:]
        fresh = await asyncio.gather(*(self.open() for _ in range(n - len(taken))))
        return taken + list(fresh)

    async def open(self) -> Channel:
        return await connect(self.host, self.port)

    def give(self, connections: list[Channel]) -> None:
        self._idle.extend(c for c in connections if not c.closed)

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()


class Window:
    def __init__(self, spec: LoadSpec, probes: Mapping[str, int]) -> None:
        self.spec = spec
        self.probes = {**probes, "loadgen": os.getpid()}
        self.result = LoadResult()
        self.t0: float | None = None
        self.t1: float | None = None
        self.warm = 0
        self.issued = 0
        self.begun = asyncio.Event()
        self.stopped = asyncio.Event()
        self.enough = asyncio.Event()
        self._cpu0: dict[str, float] = {}

    def begin(self) -> None:
        if self.t0 is None:
            self._cpu0 = {name: cpu_seconds(pid) for name, pid in self.probes.items()}
            self.t0 = time.perf_counter()
            self.begun.set()

    def stop(self) -> None:
        if self.t0 is None or self.t1 is not None:
            return
        self.t1 = time.perf_counter()
        cpu = {name: cpu_seconds(pid) - self._cpu0[name] for name, pid in self.probes.items()}
        self.result.cpu_s = cpu
        self.result.window_s = self.t1 - self.t0
        self.stopped.set()
        self.enough.set()

    def admit(self) -> bool:
        """Whether to send one more event (closed loop); stops the window at the count."""
        if self.t1 is not None:
            return False
        if self.t0 is not None:
            if self.issued >= self.spec.max_requests:
                self.stop()
                return False
            self.issued += 1
        return True

    def record(self, started: float, ended: float, error: str | None, lag: float = 0.0) -> None:
        if error != "connection":
            self.result.answered += 1
        if self.t0 is None or started < self.t0:
            self.warm += 1
            if self.spec.rate is None and self.warm >= self.spec.warmup_requests:
                self.begin()
            return
        result = self.result
        if error is not None:
            result.errors[error] += 1
        else:
            result.latencies_us.append((ended - started) * 1e6)
        if self.t1 is None:
            result.completed += 1
            if result.completed >= self.spec.min_completions:
                self.enough.set()
        if self.spec.rate is not None:
            result.lag_us.append(lag * 1e6)


async def exchange(connection: Channel, source: RequestSource, check: Check, n: int) -> str | None:
    try:
        reply = await connection.send(source.next())
    except ResponseError:
        return "connection"
    return check(reply, n % BODY_CHECK_EVERY == 0)


async def _control(window: Window) -> None:
    try:
        async with asyncio.timeout(window.spec.warmup_seconds):
            await window.begun.wait()
    except TimeoutError:
        window.begin()
    spec, t0 = window.spec, window.t0 or time.perf_counter()
    for event, limit in ((window.stopped, spec.max_seconds), (window.enough, spec.slow_seconds)):
        left = limit - (time.perf_counter() - t0)
        try:
            async with asyncio.timeout(max(0.0, left)):
                await event.wait()
        except TimeoutError:
            pass
        if window.stopped.is_set():
            return
    window.stop()


async def closed_loop(
    pool: ChannelPool,
    source: RequestSource,
    spec: LoadSpec,
    probes: Mapping[str, int],
    check: Check,
) -> LoadResult:
    connections = await pool.take(spec.concurrency)
    window = Window(spec, probes)

    async def run(slot: int) -> None:
        n = 0
        try:
            while window.admit():
                connection = connections[slot]
                started = time.perf_counter()
                error = await exchange(connection, source, check, n)
                window.record(started, time.perf_counter(), error)
                n += 1
                if connection.closed:
                    connections[slot] = await reopen(pool)
        except asyncio.CancelledError:
            connections[slot].close()  # an answer may still arrive: never reuse it
            raise

    tasks = [asyncio.create_task(run(slot)) for slot in range(spec.concurrency)]
    await _control(window)
    window.result.incomplete = await drain(tasks, spec.drain_seconds)
    pool.give(connections)
    return window.result


async def reopen(pool: ChannelPool) -> Channel:
    while True:
        try:
            return await pool.open()
        except OSError:
            await asyncio.sleep(0.05)


async def drain(tasks: list[asyncio.Task[None]], seconds: float) -> int:
    """Wait for the tasks, cancel what is left after ``seconds``; how many were cut off."""
    if not tasks:
        return 0
    _, pending = await asyncio.wait(tasks, timeout=seconds)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return len(pending)
