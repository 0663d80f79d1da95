"""Measurements beside the table: the worker's memory over a long run, and its hot-path profile.

- :func:`measure_memory`: scenario (b) at c=128 for ``plan.memory_seconds`` against the
  measured worker, sampling its RSS each second; a least-squares slope after the ramp-up says
  whether it is flat (growth under 1 MB a minute) or grows.
- :func:`profile_scenario`: the cProfile'd worker (:mod:`worker.bench.worker_proc`) warmed up,
  profiled over ``plan.profile_seconds`` of scenario load at c=8, summarised per event by
  :mod:`worker.bench.profiles`.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from worker.bench.plan import Point
from worker.bench.procstat import rss_bytes
from worker.bench.profiles import summarize_profile
from worker.bench.report import point_record
from worker.bench.stats import slope

if TYPE_CHECKING:
    from worker.bench.orchestrate import Bench

FLAT_MB_PER_MIN: Final = 1.0
PROFILE_CONCURRENCY: Final = 8


async def measure_memory(bench: Bench) -> dict[str, Any]:
    point = Point(0, "b", False, "worker", 128)
    pid = bench.targets[point.target].pid
    spec = bench.spec(point, max_requests=10**9, max_seconds=bench.plan.memory_seconds)
    samples: list[tuple[float, float]] = []

    async def sample() -> None:
        start = time.monotonic()
        while True:
            samples.append((time.monotonic() - start, rss_bytes(pid) / 2**20))
            await asyncio.sleep(1.0)

    bench.progress(f"memory: scenario (b) c=128 for {bench.plan.memory_seconds:g} s")
    sampler = asyncio.create_task(sample())
    try:
        result = await bench.run_load(point, bench.source("b", point.target), spec)
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    # The first seconds grow while 128 connections and their buffers are set up: the trend is
    # taken after them.
    settled = min(10.0, bench.plan.memory_seconds / 5)
    per_second = slope([(t, mb) for t, mb in samples if t >= settled])
    growth = None if per_second is None else per_second * 60.0
    rss = [mb for _, mb in samples]
    return {
        "scenario": "b",
        "concurrency": 128,
        "seconds": bench.plan.memory_seconds,
        "rss_mb": {"first": rss[0], "last": rss[-1], "max": max(rss)} if rss else None,
        "growth_mb_per_min": growth,
        "trend_from_s": settled,
        "flat": None if growth is None else growth < FLAT_MB_PER_MIN,
        "samples": [[round(t, 1), round(mb, 2)] for t, mb in samples],
        "load": point_record(point, result),
    }


async def profile_scenario(bench: Bench, scenario: str) -> dict[str, Any]:
    name = "worker-profile@http"
    proc = bench.targets[name]
    path = bench.run_dir / "profile.pstats"
    point = Point(0, scenario, False, "worker", PROFILE_CONCURRENCY)
    source = bench.source(scenario, name)
    warm = bench.spec(point, max_seconds=bench.plan.warmup_seconds)
    measured = bench.spec(point, warmup_requests=0, warmup_seconds=0.0,
                          max_seconds=bench.plan.profile_seconds)  # fmt: skip
    bench.progress(f"profile: scenario ({scenario}) c={PROFILE_CONCURRENCY} under cProfile")
    await bench.run_load(point, source, warm, target=name)
    await asyncio.to_thread(path.unlink, True)
    proc.process.send_signal(signal.SIGUSR1)
    await asyncio.sleep(0.05)  # let the signal land before the window opens
    result = await bench.run_load(point, source, measured, target=name)
    proc.process.send_signal(signal.SIGUSR2)
    await _wait_file(path)
    kept = path.with_name(f"profile-{scenario}.pstats")
    await asyncio.to_thread(path.replace, kept)
    summary = await asyncio.to_thread(summarize_profile, str(kept), result.completed)
    summary["throughput_under_profiler"] = point_record(point, result)["throughput"]
    return summary


async def _wait_file(path: Path, timeout: float = 30.0) -> None:  # noqa: ASYNC109
    """Poll for the file another process writes (no event can cross the process boundary)."""
    async with asyncio.timeout(timeout):
        while not await asyncio.to_thread(path.exists):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
