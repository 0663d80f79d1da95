"""What a benchmark run measures: scenarios, variants, load levels, bounds, in which order.

Points are interleaved : within each repetition, every variant of a scenario
is measured at one load level before the next level, and the variants' order rotates from one
repetition to the next, so the ratios compare runs taken seconds apart, not minutes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Final


@dataclass(frozen=True, slots=True)
class Scenario:
    key: str
    title: str
    uses_api: bool
    only: tuple[str, ...] | None = None  # the variants measured (None: every variant)
    baseline: str | None = None  # a variant every other row is also divided by


SCENARIOS: Final = {
    "a": Scenario("a", "PRE rewrite, no API call", False),
    "b": Scenario("b", "PRE + 1 API GET", True),
    "c": Scenario("c", "NOTIFICATION fanning out 3 API GETs", True),
    "d": Scenario("d", "ADAPT_ENTITY over 50 entities", False),
    # (e): the (a) event published to Redis Streams, answered on a reply stream
    # (worker.bench.queue_hook), beside the same worker answering (a) over HTTP.
    "e": Scenario(
        "e",
        "the (a) event via Redis Streams + reply, vs HTTP",
        False,
        only=("worker", "worker-queue", "faststream"),
        baseline="worker",
    ),
}


@dataclass(frozen=True, slots=True)
class Variant:
    key: str
    title: str
    # Which process serves it: worker | floor | lambda | queue (the worker over Redis) |
    # fastapi | faststream (the peers, worker.bench.peers; faststream over Redis).
    kind: str
    scenarios: tuple[str, ...] | None = None  # None: every scenario


VARIANTS: Final = {
    "floor": Variant("floor", "(i) floor, bare aiohttp", "floor"),
    "worker": Variant("worker", "biot-worker", "worker"),
    "docs": Variant("docs", "(ii) docs: login/event", "lambda"),
    "sample": Variant("sample", "(iii) sample plugin", "lambda"),
    "worker-aiolog": Variant("worker-aiolog", "biot-worker, aiologger", "worker", ("a",)),
    "worker-quiet": Variant("worker-quiet", "biot-worker, no event log", "worker", ("a", "b")),
    # What observability costs: the worker row counts Prometheus metrics (the default);
    # these turn them off, or also export OpenTelemetry spans to the run's stand-in collector.
    "worker-nometrics": Variant(
        "worker-nometrics", "biot-worker, metrics off", "worker", ("a", "b")
    ),
    "worker-otel": Variant("worker-otel", "biot-worker + OpenTelemetry", "worker", ("a", "b")),
    "worker-uvloop": Variant("worker-uvloop", "biot-worker on uvloop", "worker", ("a", "b")),
    "worker-fresh-jwt": Variant("worker-fresh-jwt", "biot-worker, new JWT/event", "worker", ("a",)),
    "worker-queue": Variant("worker-queue", "biot-worker via Redis Streams", "queue", ("e",)),
    # --candidate MODULE: the worker with MODULE imported first (A/B of a hot-path change)
    "worker-candidate": Variant("worker-candidate", "biot-worker + candidate", "worker"),
    # What a team would build instead (worker.bench.peers): FastAPI on uvicorn over HTTP, and
    # FastStream for the queue path.
    "fastapi": Variant("fastapi", "(f) FastAPI + uvicorn", "fastapi", ("a", "b", "c", "d")),
    "faststream": Variant("faststream", "(g) FastStream, Redis Streams", "faststream", ("e",)),
}
BASE_VARIANTS: Final = ("floor", "worker", "docs", "sample")
PEER_VARIANTS: Final = ("fastapi", "faststream")
# The variants measured with the API over HTTPS too (each trusts the emulator's CA).
TLS_VARIANTS: Final = (*BASE_VARIANTS, "fastapi")
OBSERVABILITY_VARIANTS: Final = ("worker-nometrics", "worker-otel")
FRESH_JWT_TOKENS: Final = 2500  # distinct tokens signed for one fresh-JWT point
# The rows each scenario's targets divide, measured again after the repetitions (in the order
# the repetitions measure them: Plan.variants' order).
TARGET_PAIRS: Final = (("a", ("floor", "worker")), ("b", ("floor", "worker")),
                       ("e", ("worker", "worker-queue")))  # fmt: skip


@dataclass(frozen=True, slots=True)
class Point:
    rep: int
    scenario: str
    tls: bool
    variant: str
    concurrency: int
    rate: float | None = None  # open loop when set
    # Which extra pair of the metrics' comparison this is (-1: none): each pair is served by
    # new worker and worker-nometrics processes (see Plan.paired_reps).
    pair: int = -1
    # A row a target reads, measured again after the repetitions (see Plan.target_reps).
    again: bool = False

    @property
    def group(self) -> tuple[str, bool]:
        return self.scenario, self.tls

    @property
    def level(self) -> str:
        return f"c={self.concurrency}" if self.rate is None else f"open {self.rate:g}/s"

    @property
    def target(self) -> str:
        """The process serving this point (the fresh-JWT variant reuses the worker)."""
        name = "worker" if self.variant == "worker-fresh-jwt" else self.variant
        return f"{name}@{'https' if self.tls else 'http'}"


@dataclass(frozen=True, slots=True)
class Plan:
    mode: str = "quick"
    scenarios: tuple[str, ...] = ("a", "b", "c", "d", "e")
    tls_scenarios: tuple[str, ...] = ("b", "c")
    variants: tuple[str, ...] = (
        *BASE_VARIANTS,
        "worker-aiolog",
        "worker-quiet",
        *OBSERVABILITY_VARIANTS,
        "worker-queue",
        *PEER_VARIANTS,
    )
    concurrency: tuple[int, ...] = (1, 32)
    rates: tuple[float, ...] = (200.0,)
    open_scenarios: tuple[str, ...] = ("b",)
    open_max_connections: int = 64
    open_headroom: float = 1.25  # open loop only for variants whose closed-loop peak is this x rate
    reps: int = 1
    warmup_requests: int = 30
    warmup_seconds: float = 0.5
    max_requests: int = 3000
    max_seconds: float = 1.0
    min_events: int = 20  # slow points measure past max_seconds until this many answers...
    slow_seconds: float = 4.0  # ...or this long
    drain_seconds: float = 3.0
    api_latency: float = 0.002
    profile_seconds: float = 1.0  # 0: no profile
    memory_seconds: float = 0.0  # 0: no memory check
    pin: bool = True
    busy_cpus: bool = False  # SCHED_IDLE spinners keep the vCPUs out of idle
    # New target processes at each repetition: one process's CPU per event can sit 15-20 %
    # off another's of the same code, and only more processes average that out.
    fresh_processes: bool = False
    # More measurements of worker and worker-nometrics in (a), after the repetitions, each pair
    # from two new processes: the metrics' cost (a few µs) is read from the medians over
    # several processes, since one process's CPU per event can sit 10-20 % off another's.
    paired_reps: int = 4
    # More measurements of the rows the targets divide (TARGET_PAIRS: the floor and the worker
    # in (a) and (b), the worker over HTTP and over Redis Streams in (e)) at each closed-loop
    # level, after the repetitions (before the metrics' pairs), the pair's order alternating:
    # a target's ratio divides two processes measured one after the other, and on these VMs
    # one process's CPU per event drifts by 15-20 % within a run, so one measurement of each
    # can move a ratio by a quarter. They count in their rows as repetitions do (medians over
    # all of them), not in the metrics' comparison (which has its own pairs).
    target_reps: int = 4
    seed: int = 1
    candidate: str | None = None  # module the worker-candidate variant preloads
    redis_url: str = "redis://127.0.0.1:6379/0"  # scenario (e)

    def with_(self, **changes: object) -> Plan:
        return replace(self, **changes)  # type: ignore[arg-type]

    def groups(self) -> list[tuple[str, bool]]:
        plain = [(s, False) for s in self.scenarios]
        return plain + [(s, True) for s in self.scenarios if s in self.tls_scenarios]

    def variants_for(self, scenario: str) -> list[str]:
        only = SCENARIOS[scenario].only
        return [
            v
            for v in self.variants
            if (VARIANTS[v].scenarios is None or scenario in (VARIANTS[v].scenarios or ()))
            and (only is None or v in only)
        ]

    def levels_for(self, scenario: str) -> list[tuple[int, float | None]]:
        closed: list[tuple[int, float | None]] = [(c, None) for c in self.concurrency]
        if scenario not in self.open_scenarios:
            return closed
        return closed + [(self.open_max_connections, rate) for rate in self.rates]

    def without(self, scenario: str) -> Plan:
        """This plan with ``scenario`` left out (e.g. (e) when Redis is not reachable)."""
        return self.with_(scenarios=tuple(s for s in self.scenarios if s != scenario))

    def points(self) -> Iterator[Point]:
        for rep in range(self.reps):
            for scenario, tls in self.groups():
                variants = self.variants_for(scenario)
                if tls:
                    variants = [v for v in variants if v in TLS_VARIANTS]
                shift = rep % len(variants) if variants else 0
                order = variants[shift:] + variants[:shift]
                for concurrency, rate in self.levels_for(scenario):
                    for variant in order:
                        yield Point(rep, scenario, tls, variant, concurrency, rate)
        yield from self._target_points()
        yield from self._paired_points()

    def _target_points(self) -> Iterator[Point]:
        pairs = [(scenario, pair) for scenario, pair in TARGET_PAIRS
                 if scenario in self.scenarios
                 and set(pair) <= set(self.variants_for(scenario))]  # fmt: skip
        for extra in range(self.target_reps):
            for scenario, pair in pairs:
                # the repetitions measure the pair in this order: the first extra goes the other
                order = pair[::-1] if extra % 2 == 0 else pair
                for concurrency, rate in self.levels_for(scenario):
                    if rate is None:
                        for variant in order:
                            yield Point(self.reps - 1, scenario, False, variant, concurrency,
                                        again=True)  # fmt: skip

    def _paired_points(self) -> Iterator[Point]:
        pair = ["worker", "worker-nometrics"]
        if "a" not in self.scenarios or not set(pair) <= set(self.variants_for("a")):
            return
        for extra in range(self.paired_reps):
            order = pair[extra % 2 :] + pair[: extra % 2]
            for concurrency, rate in self.levels_for("a"):
                if rate is None:
                    for variant in order:
                        yield Point(self.reps - 1, "a", False, variant, concurrency, None, extra)

    def targets(self) -> list[str]:
        """Every process the points need, e.g. ``worker@http``."""
        return sorted({point.target for point in self.points()})


def heading(scenario: str, tls: bool) -> str:
    """The title of a scenario's block in the table and its panel in the chart."""
    title = f"({scenario}) {SCENARIOS[scenario].title}"
    if scenario == "e":
        return title  # the worker's API is not called: no API transport to name
    return f"{title}, API over {'HTTPS' if tls else 'HTTP'}"


QUICK: Final = Plan()
FULL: Final = Plan(
    mode="full",
    variants=(
        *BASE_VARIANTS,
        "worker-aiolog",
        "worker-quiet",
        *OBSERVABILITY_VARIANTS,
        "worker-fresh-jwt",
        "worker-queue",
        *PEER_VARIANTS,
    ),
    concurrency=(1, 8, 32, 128),
    rates=(200.0, 1000.0),
    open_scenarios=("a", "b", "c", "d", "e"),
    reps=3,
    target_reps=2,
    warmup_requests=200,
    warmup_seconds=2.0,
    max_requests=20_000,
    max_seconds=5.0,
    min_events=50,
    slow_seconds=15.0,
    drain_seconds=10.0,
    profile_seconds=3.0,
    memory_seconds=60.0,
)
