"""The open-loop driver: Poisson arrivals at a fixed rate, whatever the answers do.

An arrival takes a free keep-alive connection, opens one while fewer than ``concurrency`` are
open, or waits in a queue; its latency counts from the intended arrival time, so a server that
stalls is charged for the events it delayed (no coordinated omission). See :mod:`.load` for the
window and the bounds.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Mapping

from worker.bench.httpload import RequestSource
from worker.bench.load import Check, LoadResult, LoadSpec, Window, drain, exchange, reopen
from worker.bench.queue_hook import Channel, ChannelPool

EARLY = 0.001  # an arrival due within this many seconds is sent now (epoll sleeps whole ms)


async def open_loop(
    pool: ChannelPool,
    source: RequestSource,
    spec: LoadSpec,
    probes: Mapping[str, int],
    check: Check,
) -> LoadResult:
    assert spec.rate is not None and spec.rate > 0
    run = _OpenLoop(pool, source, spec, Window(spec, probes), check)
    await run.start()
    return await run.run(spec.rate)


class _OpenLoop:
    """Arrivals on a schedule; each is sent on a free connection, or queued until one frees."""

    def __init__(
        self, pool: ChannelPool, source: RequestSource, spec: LoadSpec, window: Window, check: Check
    ) -> None:
        self.pool, self.source, self.spec, self.window, self.check = (
            pool,
            source,
            spec,
            window,
            check,
        )
        self.idle: deque[Channel] = deque()
        self.live: list[Channel] = []
        self.waiting: deque[tuple[float, int]] = deque()
        self.tasks: set[asyncio.Task[None]] = set()
        self.opened = 0

    async def start(self) -> None:
        self.idle.extend(await self.pool.take(min(self.spec.concurrency, 8)))
        self.live.extend(self.idle)
        self.opened = len(self.idle)

    async def run(self, rate: float) -> LoadResult:
        spec, window = self.spec, self.window
        rng = random.Random(spec.seed)
        start = time.perf_counter()
        warm_end = start + spec.warmup_seconds
        end = warm_end + spec.max_seconds
        next_at, n = start, 0
        while next_at < end and window.issued < spec.max_requests:
            # epoll sleeps in whole milliseconds (rounded up): send what is due within EARLY
            # now, slightly early, rather than late (latency then starts at the send).
            while self._due(next_at, end):
                if next_at >= warm_end:
                    window.begin()
                    window.issued += 1
                self.arrive(next_at, n)
                n += 1
                next_at += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, next_at - time.perf_counter() - EARLY))
        window.begin()
        window.stop()
        cut = await drain(list(self.tasks), spec.drain_seconds)
        window.result.incomplete = cut + len(self.waiting)
        for connection in self.live:
            if connection not in self.idle:
                connection.close()
        self.pool.give(list(self.idle))
        return window.result

    def _due(self, next_at: float, end: float) -> bool:
        within = next_at < end and self.window.issued < self.spec.max_requests
        return within and next_at <= time.perf_counter() + EARLY

    def arrive(self, intended: float, n: int) -> None:
        if self.idle:
            self.launch(self.idle.popleft(), intended, n)
        elif self.opened < self.spec.concurrency:
            self.opened += 1
            self.launch(None, intended, n)
        else:
            self.waiting.append((intended, n))

    def launch(self, connection: Channel | None, intended: float, n: int) -> None:
        task = asyncio.create_task(self.serve(connection, intended, n))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def serve(self, connection: Channel | None, intended: float, n: int) -> None:
        """Send this arrival, then queued ones, while the connection stays usable."""
        while True:
            if connection is None:
                connection = await reopen(self.pool)
                self.live.append(connection)
            sent = time.perf_counter()
            try:
                error = await exchange(connection, self.source, self.check, n)
            except asyncio.CancelledError:
                connection.close()  # an answer may still arrive: never reuse it
                raise
            # Late: charged from the intended time (the server held a connection or the loop
            # was busy); early (see EARLY): from the send.
            self.window.record(min(sent, intended), time.perf_counter(), error, sent - intended)
            if connection.closed:
                connection = None
            if not self.waiting:
                break
            intended, n = self.waiting.popleft()
        if connection is not None:
            self.idle.append(connection)
        else:
            self.opened -= 1
