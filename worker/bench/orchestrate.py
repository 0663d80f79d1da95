"""One benchmark run: start the emulators and targets, measure every point, run the extras.

CPU placement : the processes under test run on CPU0; the emulators and this
process (the load generator) on CPU1. Everything starts unpinned (faster) and is pinned once
listening, every thread included. With fewer than two CPUs, or ``--no-pin``, nothing is pinned.
Scenario (e) also uses a Redis the bench did not start (:mod:`.queue_hook`): it is not pinned,
its CPU is read from ``/proc`` when it runs here, and (e) is skipped when it cannot be reached.
The peers (:mod:`.peers`) are targets like the others: (f) listens on a port, (g) consumes a
stream of its own (:class:`~.peers.stream.PeerStream`), trimmed after each of its points.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Final

from worker.bench import procs
from worker.bench.collector import Collector, expected_spans, span_figures
from worker.bench.httpload import RequestSource, request_template
from worker.bench.load import LoadResult, LoadSpec, Pool, closed_loop
from worker.bench.openloop import open_loop
from worker.bench.payloads import (
    BUILDERS,
    INTERCEPTOR_SCOPE,
    Event,
    Fixtures,
    checker,
)
from worker.bench.peers.stream import PeerStream
from worker.bench.plan import FRESH_JWT_TOKENS, VARIANTS, Plan, Point
from worker.bench.procstat import available_cpus, cpu_seconds, pin, rss_bytes
from worker.bench.profiles import summarize_profile
from worker.bench.queue_hook import (
    ChannelPool,
    QueueRun,
    QueueUnavailable,
    RedisChannelPool,
    reach,
)
from worker.bench.redisload import envelope_template
from worker.bench.report import describe, point_record
from worker.bench.stats import slope
from worker.bench.upstream import Upstream

Progress = Callable[[str], None]


class Bench:
    def __init__(self, plan: Plan, run_dir: Path, progress: Progress) -> None:
        self.plan, self.run_dir, self.progress = plan, run_dir, progress
        self.upstreams: dict[bool, Upstream] = {}
        self.targets: dict[str, procs.Proc] = {}
        self.pools: dict[str, ChannelPool] = {}
        self.spinners: list[procs.Proc] = []
        self.queue: QueueRun | None = None
        self.peer_stream: PeerStream | None = None  # the stream peer (g) consumes
        self.collector: Collector | None = None  # the stand-in OTLP collector (worker-otel)
        self.left_out: list[dict[str, Any]] = []  # scenarios that could not run, and why
        self._sources: dict[tuple[str, str], RequestSource] = {}
        cpus = available_cpus()
        self._own_cpus = set(cpus)
        self.pinning = plan.pin and len(cpus) >= 2
        self.cpus = (cpus[0], cpus[1]) if self.pinning else None

    async def __aenter__(self) -> Bench:
        try:
            await self._start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _start(self) -> None:
        if "e" in self.plan.scenarios:
            await self._open_queue()
        needs_tls = any(tls for _, tls in self.plan.groups())
        await asyncio.gather(*(self._start_upstream(tls) for tls in {False, needs_tls}))
        names = self.plan.targets()
        if any(name.startswith("worker-otel@") for name in names):
            self.collector = await Collector.start(self.run_dir)
        if self.plan.profile_seconds > 0:
            names.append("worker-profile@http")
        self.progress(f"starting {len(names)} targets: {', '.join(names)}")
        await asyncio.gather(*(self._start_target(name) for name in names))
        self._pin_all()
        if self.cpus is not None and self.plan.busy_cpus:
            for cpu in self.cpus:
                args = ["worker.bench.spin", str(cpu)]
                self.spinners.append(await procs.launch(f"spin{cpu}", args, {}, 0, self.run_dir))

    async def _open_queue(self) -> None:
        """Reach the Redis of scenario (e), or leave (e) out of the plan with the reason."""
        queued = [v for v in self.plan.variants_for("e") if VARIANTS[v].kind in QUEUE_KINDS]
        try:
            if queued == ["faststream"]:  # (g) alone: reach() asks for the worker's variant
                self.queue = await QueueRun.open(self.plan.redis_url)
            else:
                self.queue = await reach(self.plan)
        except QueueUnavailable as exc:
            self.plan = self.plan.without("e")
            self.left_out.append({"scenario": "e", "tls": False, "variant": ",".join(queued),
                                  "level": "all", "why": f"(e) Redis Streams: {exc}"})  # fmt: skip
            self.progress(f"skipped {self.left_out[-1]['why']}")
            return
        if "faststream" in queued:
            self.peer_stream = PeerStream(self.plan.redis_url, self.queue.stream)

    async def _start_upstream(self, tls: bool) -> None:
        port = procs.free_port()
        tls_dir = self.run_dir / "tls" if tls else None
        args = procs.emulator_args(port, self.plan.api_latency, tls_dir)
        proc = await procs.spawn(
            f"emulator@{'https' if tls else 'http'}", args, {}, port, self.run_dir
        )
        ca = str(tls_dir / "ca.pem") if tls_dir else None
        upstream = Upstream(proc, f"{'https' if tls else 'http'}://127.0.0.1:{port}", ca)
        await upstream.load_fixtures()
        self.upstreams[tls] = upstream

    async def _start_target(self, name: str) -> None:
        variant, scheme = name.split("@")
        upstream = self.upstreams[scheme == "https"]
        port = procs.free_port()
        kind = _kind(name)
        source = self.queue.worker_url() if kind == "queue" and self.queue else None
        args = procs.target_args(kind, variant, port, upstream.url, source)
        if kind in PEER_KINDS:
            await self._start_peer(name, kind, args, port, upstream)
            return
        endpoint = self.collector.endpoint if self.collector else None
        env = procs.target_env(variant, port, upstream.url, upstream.identity, upstream.ca,
                               self.plan.candidate, endpoint)  # fmt: skip
        if variant == "worker-profile":
            env["BENCH_PROFILE"] = str(self.run_dir / "profile.pstats")
        if kind == "floor" and upstream.ca:
            args += ["--ca-bundle", upstream.ca]
        if kind == "lambda" and upstream.ca:
            env["REQUESTS_CA_BUNDLE"] = await asyncio.to_thread(self._seed_bundle, upstream.ca)
        if kind == "queue" and self.queue is not None:
            self.targets[name] = await self.queue.start_worker(name, args, env, self.run_dir)
            self.pools[name] = self.queue.pool()
            return
        self.targets[name] = await procs.spawn(name, args, env, port, self.run_dir)
        self.pools[name] = Pool("127.0.0.1", port)

    async def _start_peer(
        self, name: str, kind: str, args: list[str], port: int, upstream: Upstream
    ) -> None:
        env = procs.peer_env(upstream.identity, upstream.url, upstream.ca)
        if kind == "fastapi":
            self.targets[name] = await procs.spawn(name, args, env, port, self.run_dir)
            self.pools[name] = Pool("127.0.0.1", port)
            return
        stream, queue = self.peer_stream, self.queue
        assert stream is not None and queue is not None, "peer (g) needs the run's Redis"
        proc = await procs.launch(name, args, {**env, **stream.env()}, 0, self.run_dir)
        self.targets[name] = proc
        await stream.wait_consuming(proc)
        self.pools[name] = RedisChannelPool(queue.address, stream.name)

    def _seed_bundle(self, ca: str) -> str:
        """certifi's bundle plus the emulator's CA: what the seed's ``requests`` loads per
        HTTPS connection against the real BioT, and a CA that lets it reach the emulator."""
        import certifi  # comes with requests, which the baselines need anyway

        path = self.run_dir / "seed-ca-bundle.pem"
        path.write_bytes(Path(certifi.where()).read_bytes() + b"\n" + Path(ca).read_bytes())
        return str(path)

    def _pin_all(self) -> None:
        if self.cpus is None:
            return
        under_test, load_side = self.cpus
        for proc in self.targets.values():
            pin(proc.pid, {under_test})
        for upstream in self.upstreams.values():
            pin(upstream.proc.pid, {load_side})
        if self.collector is not None:
            pin(self.collector.proc.pid, {load_side})
        pin(os.getpid(), {load_side})

    async def aclose(self) -> None:
        if self.cpus is not None:
            pin(os.getpid(), self._own_cpus)  # as it was: the caller may go on running
        for pool in self.pools.values():
            pool.close()
        procs_ = [
            *self.spinners,
            *self.targets.values(),
            *(u.proc for u in self.upstreams.values()),
        ]
        await asyncio.gather(*(procs.stop(p) for p in procs_), return_exceptions=True)
        collector, self.collector = self.collector, None
        if collector is not None:  # after the targets, whose last spans go out as they stop
            await collector.aclose()
        peer_stream, self.peer_stream = self.peer_stream, None
        if peer_stream is not None:  # the run's cleanup below deletes the stream itself
            await peer_stream.aclose()
        queue, self.queue = self.queue, None
        if queue is not None:  # after the worker stopped: it would recreate a deleted stream
            await queue.close(self.progress)

    # ------------------------------------------------------------ measuring

    def source(
        self, scenario: str, target: str, events: list[Event] | None = None
    ) -> RequestSource:
        key = (scenario, target)
        if events is None and key in self._sources:
            return self._sources[key]
        if events is None:
            fixtures = self.upstreams[target.endswith("https")].fixtures
            assert fixtures is not None
            events = BUILDERS[scenario](fixtures)
        port = self.targets[target].port
        kind = _kind(target)
        if kind in QUEUE_KINDS:
            templates = [envelope_template(e.headers, e.body) for e in events]
        else:
            # Peer (f) serves BioT's one plugin URL, as the worker does (it takes any path);
            # the floor has a path per scenario.
            path = "/" if kind == "fastapi" else f"/{scenario}"
            templates = [
                request_template("127.0.0.1", port, path, e.headers, e.body) for e in events
            ]
        source = RequestSource(templates)
        if len(events) < FRESH_JWT_TOKENS:
            self._sources[key] = source
        return source

    def spec(self, point: Point, **changes: Any) -> LoadSpec:
        plan = self.plan
        values: dict[str, Any] = {
            "concurrency": point.concurrency,
            "rate": point.rate,
            "warmup_requests": max(plan.warmup_requests, 2 * point.concurrency),
            "warmup_seconds": plan.warmup_seconds,
            "max_requests": plan.max_requests,
            "max_seconds": plan.max_seconds,
            "min_completions": plan.min_events,
            "slow_seconds": max(plan.slow_seconds, plan.max_seconds),
            "drain_seconds": plan.drain_seconds,
            "seed": plan.seed + point.rep,
        }
        values.update(changes)
        return LoadSpec(**values)

    async def run_load(
        self, point: Point, source: RequestSource, spec: LoadSpec, target: str | None = None
    ) -> LoadResult:
        """Drive ``point``'s load at its target (or ``target``), probing CPU of both ends."""
        name = target or point.target
        upstream = self.upstreams[point.tls].proc
        probes = {"target": self.targets[name].pid, "emulator": upstream.pid}
        if _kind(name) in QUEUE_KINDS and self.queue is not None and self.queue.redis_pid:
            probes["redis"] = self.queue.redis_pid
        driver = closed_loop if point.rate is None else open_loop
        return await driver(self.pools[name], source, spec, probes, checker(point.scenario))

    async def measure(self, point: Point) -> tuple[dict[str, Any], list[float]]:
        spec = self.spec(point)
        if point.variant == "worker-fresh-jwt":
            source, spec = await self._fresh_tokens(point, spec)
        else:
            source = self.source(point.scenario, point.target)
        collector = self.collector if point.variant == "worker-otel" else None
        before = await collector.count() if collector else 0
        result = await self.run_load(point, source, spec)
        record = point_record(point, result)
        if point.variant == "faststream" and self.peer_stream is not None:
            await self.peer_stream.trim()
        if collector is not None:
            expected = expected_spans(point.scenario, result.answered)
            received = await collector.wait_count(before + expected) - before
            record.update(span_figures(expected, received))
        return record, result.latencies_us

    async def _fresh_tokens(self, point: Point, spec: LoadSpec) -> tuple[RequestSource, LoadSpec]:
        upstream = self.upstreams[point.tls]
        assert upstream.fixtures is not None
        tokens = await upstream.event_tokens(INTERCEPTOR_SCOPE, FRESH_JWT_TOKENS)
        events = []
        for token in tokens:
            fixtures = Fixtures(token, *_rest(upstream.fixtures))
            events.append(BUILDERS[point.scenario](fixtures)[0])
        budget = FRESH_JWT_TOKENS - spec.warmup_requests - 2 * point.concurrency
        spec = LoadSpec(**{**_fields(spec), "max_requests": min(spec.max_requests, budget)})
        return self.source(point.scenario, point.target, events), spec

    async def restart_targets(self, only: Collection[str] | None = None) -> None:
        """New processes for the targets served over HTTP (``--fresh-processes``; ``only``
        those named), so that each repetition measures other processes; the profiled worker
        and queue targets stay."""
        names = [n for n in self.targets if _kind(n) not in QUEUE_KINDS and "-profile@" not in n
                 and (only is None or n in only)]  # fmt: skip
        if not names:
            return
        self.progress(f"fresh processes for the next repetition: {', '.join(names)}")
        for name in names:
            self.pools.pop(name).close()
            self._sources = {key: s for key, s in self._sources.items() if key[1] != name}
            await procs.stop(self.targets.pop(name))
        await asyncio.gather(*(self._start_target(name) for name in names))
        self._pin_all()

    async def settle(self, limit: float = 30.0) -> float:
        """Wait until no process under test or upstream uses CPU (a 100 ms window without a
        clock tick), so a slow target's backlog does not spill into the next point."""
        pids = [p.pid for p in self.targets.values()] + [
            u.proc.pid for u in self.upstreams.values()
        ]
        start = time.monotonic()
        before = [cpu_seconds(pid) for pid in pids]
        while time.monotonic() - start < limit:
            await asyncio.sleep(0.1)
            now = [cpu_seconds(pid) for pid in pids]
            if all(b - a < 0.005 for a, b in zip(before, now, strict=True)):
                break
            before = now
        return time.monotonic() - start

    async def run(self) -> dict[str, Any]:
        points = list(self.plan.points())
        records: list[dict[str, Any]] = []
        samples: dict[str, list[float]] = {}
        skipped: list[dict[str, Any]] = list(self.left_out)
        peaks: dict[tuple[int, str, bool, str], float] = {}
        rep, pair = 0, -1
        for index, point in enumerate(points, 1):
            if self.plan.fresh_processes and point.rep != rep:
                rep = point.rep
                await self.restart_targets()
            if point.pair != pair:  # each extra pair of the metrics' comparison: new processes
                pair = point.pair
                await self.restart_targets(PAIRED_TARGETS)
            peak_key = (point.rep, point.scenario, point.tls, point.variant)
            peak = peaks.get(peak_key)
            if _unsustainable(point, peak, self.plan.open_headroom):
                skipped.append(_skip(point, peak or 0.0))
                self.progress(f"[{index}/{len(points)}] skipped: {skipped[-1]['why']}")
                continue
            await self.settle()
            record, latencies = await self.measure(point)
            records.append(record)
            samples.setdefault(_key(point), []).extend(latencies)
            if point.rate is None:
                peaks[peak_key] = max(peak or 0.0, record["throughput"])
            self.progress(f"[{index}/{len(points)}] {describe(record)}")
        extras: dict[str, Any] = {}
        if self.queue is not None:
            extras["queue"] = self.queue.describe()
        if self.plan.profile_seconds > 0:
            scenarios = [s for s in ("a", "b") if s in self.plan.scenarios]
            extras["profiles"] = {s: await profile_scenario(self, s) for s in scenarios}
        if self.plan.memory_seconds > 0:
            await self.settle()
            extras["memory"] = await measure_memory(self)
        return {"points": records, "samples": samples, "skipped": skipped, **extras}


#: The processes the metrics' extra pairs are measured on (see Plan.paired_reps).
PAIRED_TARGETS: Final = ("worker@http", "worker-nometrics@http")
#: The kinds of target fed through Redis Streams (scenario (e)), and the peers' kinds.
QUEUE_KINDS: Final = frozenset({"queue", "faststream"})
PEER_KINDS: Final = frozenset({"fastapi", "faststream"})


def _kind(target: str) -> str:
    """Which kind of process serves ``target`` (``worker@http`` -> ``worker``)."""
    variant = target.split("@")[0]
    return "worker" if variant == "worker-profile" else VARIANTS[variant].kind


def _unsustainable(point: Point, peak: float | None, headroom: float) -> bool:
    """An open-loop point a variant cannot carry: it would only pile up a backlog."""
    return point.rate is not None and peak is not None and peak < point.rate * headroom


def _skip(point: Point, peak: float) -> dict[str, Any]:
    why = (
        f"({point.scenario}{' https' if point.tls else ''}) {point.level} {point.variant}: "
        f"its closed-loop peak, {peak:.0f} ev/s, cannot carry {point.rate:g} ev/s"
    )
    return {"scenario": point.scenario, "tls": point.tls, "variant": point.variant,
            "level": point.level, "why": why}  # fmt: skip


def _key(point: Point) -> str:
    """The pooled latencies' key (the metrics' extra pairs apart: see report.aggregate)."""
    pair = "|pair" if point.pair >= 0 else ""
    return f"{point.scenario}|{point.tls}|{point.variant}|{point.level}{pair}"


def _fields(spec: LoadSpec) -> dict[str, Any]:
    return {name: getattr(spec, name) for name in LoadSpec.__dataclass_fields__}


def _rest(fixtures: Fixtures) -> tuple[Any, ...]:
    return (
        fixtures.notification_token,
        fixtures.user_token,
        fixtures.patients,
        fixtures.organization_id,
    )


# ---------------------------------------------------------------- beside the table
# measure_memory: scenario (b) at c=128 for plan.memory_seconds against the measured worker,
# sampling its RSS each second; a least-squares slope after the ramp-up says whether it is flat
# (growth under 1 MB a minute) or grows. profile_scenario: the cProfile'd worker
# (worker.bench.worker_proc) warmed up, profiled over plan.profile_seconds of scenario load at
# c=8, summarised per event by worker.bench.profiles.

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
    summary["concurrency"] = PROFILE_CONCURRENCY
    return summary


async def _wait_file(path: Path, timeout: float = 30.0) -> None:  # noqa: ASYNC109
    """Poll for the file another process writes (no event can cross the process boundary)."""
    async with asyncio.timeout(timeout):
        while not await asyncio.to_thread(path.exists):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
