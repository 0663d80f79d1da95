"""From load results to figures: one record per point, rows over repetitions, ratios, targets.

A row pools the latency samples of every repetition of a point (percentiles from all samples)
and takes the median of the repetitions' throughput and CPU per event. Ratios compare rows of
the same scenario, transport and load level, so they are same-run ratios: each row to the floor
and the two baselines, and in a scenario with a ``baseline`` variant ((e): the worker over HTTP)
to that variant too. Scenario (e) rows also carry redis-server's CPU (``cpu_util["redis"]`` and
``redis_cpu_us_per_event``), which is not part of the worker's CPU per event.

The peers (:mod:`worker.bench.peers`): the worker's row is also divided by (f), the FastAPI
peer, in (a)-(d), and the worker's Redis Streams row by (g), the FastStream peer, in (e)
(``ratios["fastapi"]`` / ``ratios["faststream"]``, below 1 where the worker uses less), and
:data:`PEER_TARGETS` ask the worker to use less CPU per event than each peer at every level
and to have a lower p99 at c=32.

What observability costs (:func:`observability`): the worker row counts Prometheus metrics (the
default), ``worker-nometrics`` does not, ``worker-otel`` also exports OpenTelemetry spans to the
run's stand-in collector; its rows carry the span check (``otel_spans`` received,
``otel_expected``, ``otel_dropped``: owed but never received, the exporter's queue overflowed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from worker.bench.load import LoadResult
from worker.bench.plan import OBSERVABILITY_VARIANTS, PEER_VARIANTS, SCENARIOS, Point
from worker.bench.stats import median, per_event, ratio, summarize

REFERENCES: Final = ("floor", "docs", "sample")
Spec = tuple[str, bool, str, str, str, str]
# (name, (scenario, tls, level, numerator, denominator, figure), limit): limit > 0 means the
# ratio must be <= limit, limit < 0 that it must be >= -limit.
# Issue 12's targets (the worker's own cost against the floor, the queue path against HTTP),
# then issue 5's against BioT's styles.
TARGETS: Final[tuple[tuple[str, Spec, float], ...]] = (
    ("(a) c=1 CPU/event vs floor", ("a", False, "c=1", "worker", "floor", "cpu"), 1.35),
    ("(a) c=1 p50 vs floor", ("a", False, "c=1", "worker", "floor", "p50"), 1.25),
    ("(a) c=32 CPU/event vs floor", ("a", False, "c=32", "worker", "floor", "cpu"), 1.5),
    ("(b) c=32 throughput vs floor", ("b", False, "c=32", "worker", "floor", "throughput"),
     -0.85),
    ("(b) c=32 p99 vs floor", ("b", False, "c=32", "worker", "floor", "p99"), 2.0),
    ("(e) c=1 Redis Streams vs HTTP CPU/event",
     ("e", False, "c=1", "worker-queue", "worker", "cpu"), 1.5),
    ("(e) c=32 Redis Streams vs HTTP CPU/event",
     ("e", False, "c=32", "worker-queue", "worker", "cpu"), 1.5),
    ("(b) c=1 p50: (ii) / worker", ("b", False, "c=1", "docs", "worker", "p50"), -2.0),
    ("(b) c=1 CPU: (ii) / worker", ("b", False, "c=1", "docs", "worker", "cpu"), -3.0),
    ("(b) c=1 CPU: (iii) / worker", ("b", False, "c=1", "sample", "worker", "cpu"), -2.0),
    ("(b) HTTPS c=1 p50: (ii) / worker", ("b", True, "c=1", "docs", "worker", "p50"), -10.0),
)
COMPARED: Final = ("p50", "p99", "cpu", "throughput")
# Issue 12: the worker's row divided by the peer a team would pick instead, in the scenarios
# where both run: (f) FastAPI in (a)-(d), (g) FastStream beside the worker's queue row in (e).
PEERS: Final = (("worker", "fastapi"), ("worker-queue", "faststream"))
# (name, (worker's variant, peer, figure, level or None for every level)): the worker's figure
# must be below the peer's (ratio < 1) at each such level of every scenario both ran.
PEER_TARGETS: Final = (
    ("worker uses less CPU per event than (f) in every scenario",
     ("worker", "fastapi", "cpu", None)),
    ("worker uses less CPU per event than (g)", ("worker-queue", "faststream", "cpu", None)),
    ("worker p99 lower than (f) at c=32", ("worker", "fastapi", "p99", "c=32")),
    ("worker p99 lower than (g) at c=32", ("worker-queue", "faststream", "p99", "c=32")),
)  # fmt: skip
SATURATED: Final = 0.9
# Issue 11: metrics add at most 5 % CPU per event in (a), judged on the median over (a)'s
# closed-loop levels (one level's ratio moves by a few % between runs on these VMs).
METRICS_SCENARIO: Final = "a"
METRICS_LIMIT: Final = 1.05
METRICS_TARGET: Final = "metrics add <= 5 % CPU per event in (a)"
# The cProfile components (worker.bench.profiles) the observability section reads.
PROFILED: Final = {"metrics": "worker: metrics", "opentelemetry": "OpenTelemetry"}


def _ms(summary: Mapping[str, float | int | None]) -> dict[str, float | None]:
    return {k: (None if v is None else float(v) / 1000.0) for k, v in summary.items() if k != "n"}


def point_record(point: Point, result: LoadResult) -> dict[str, Any]:
    """The figures of one measured point (latencies in ms, CPU in µs per event)."""
    window = result.window_s
    cpu = result.cpu_s
    target_cpu = per_event(cpu.get("target", 0.0), result.completed)
    lag = summarize(result.lag_us) if result.lag_us else None
    return {
        "rep": point.rep,
        "pair": point.pair,
        "again": point.again,
        "scenario": point.scenario,
        "tls": point.tls,
        "variant": point.variant,
        "level": point.level,
        "concurrency": point.concurrency,
        "rate": point.rate,
        "n": len(result.latencies_us),
        "completed": result.completed,
        "window_s": window,
        "throughput": result.completed / window if window > 0 else 0.0,
        "latency_ms": _ms(summarize(result.latencies_us)),
        "errors": dict(result.errors),
        "errors_total": sum(result.errors.values()),
        "incomplete": result.incomplete,
        "cpu_us_per_event": None if target_cpu is None else target_cpu * 1e6,
        **_side_cpu(cpu, result.completed),
        "cpu_util": {name: (s / window if window > 0 else None) for name, s in cpu.items()},
        "lag_ms": None if lag is None else _ms(lag),
    }


def _side_cpu(cpu: Mapping[str, float], completed: int) -> dict[str, float | None]:
    """redis-server's CPU per event, when it was probed (scenario (e))."""
    if "redis" not in cpu:
        return {}
    redis = per_event(cpu["redis"], completed)
    return {"redis_cpu_us_per_event": None if redis is None else redis * 1e6}


def row_key(record: Mapping[str, Any]) -> tuple[str, bool, str, str]:
    return record["scenario"], record["tls"], record["level"], record["variant"]


def aggregate(
    records: Iterable[Mapping[str, Any]], samples: Mapping[str, list[float]]
) -> list[dict[str, Any]]:
    """One row per (scenario, transport, level, variant), in first-measured order, from the
    plan's repetitions. The metrics' extra pairs (``pair`` >= 0, see ``Plan.paired_reps``) are
    left out: they measure the worker on processes started later in the run, beside no floor,
    so they would tilt its ratios to the floor; :func:`metrics_rows` reads them."""
    grouped: dict[tuple[str, bool, str, str], list[Mapping[str, Any]]] = {}
    for record in records:
        if record.get("pair", -1) < 0:
            grouped.setdefault(row_key(record), []).append(record)
    rows = [_row(key, reps, samples) for key, reps in grouped.items()]
    _add_ratios(rows)
    return rows


def metrics_rows(
    records: Iterable[Mapping[str, Any]], samples: Mapping[str, list[float]]
) -> list[dict[str, Any]]:
    """The rows the metrics' cost is read from: ``worker`` and ``worker-nometrics`` in
    (:data:`METRICS_SCENARIO`) over the plan's repetitions and the extra pairs, each pair
    measured on new processes (CPU per event: the median over every process measured)."""
    grouped: dict[tuple[str, bool, str, str], list[Mapping[str, Any]]] = {}
    for record in records:
        key = row_key(record)
        if record.get("again"):  # a target's extra measurement, with no nometrics beside it
            continue
        if key[:2] == (METRICS_SCENARIO, False) and key[3] in ("worker", "worker-nometrics"):
            grouped.setdefault(key, []).append(record)
    return [_row(key, reps, samples) for key, reps in grouped.items()]


def _row(
    key: tuple[str, bool, str, str],
    reps: list[Mapping[str, Any]],
    samples: Mapping[str, list[float]],
) -> dict[str, Any]:
    scenario, tls, level, variant = key
    pooled = samples.get(f"{scenario}|{tls}|{variant}|{level}", [])
    first = reps[0]
    names = ("target", "emulator", "loadgen") + (("redis",) if "redis" in first["cpu_util"] else ())
    util = {name: median(r["cpu_util"].get(name) for r in reps) for name in names}
    side = {"redis_cpu_us_per_event": median(r.get("redis_cpu_us_per_event") for r in reps)}
    return {
        "scenario": scenario,
        "tls": tls,
        "level": level,
        "concurrency": first["concurrency"],
        "rate": first["rate"],
        "variant": variant,
        "reps": len(reps),
        "n": sum(r["n"] for r in reps),
        "errors": sum(r["errors_total"] for r in reps),
        "incomplete": sum(r["incomplete"] for r in reps),
        "throughput": median(r["throughput"] for r in reps),
        "throughput_range": [
            min(r["throughput"] for r in reps),
            max(r["throughput"] for r in reps),
        ],
        "cpu_us_per_event": median(r["cpu_us_per_event"] for r in reps),
        **(side if "redis" in util else {}),
        "cpu_util": util,
        "bound": bound(util),
        "few_events": any(r["completed"] < max(10, 2 * r["concurrency"]) for r in reps),
        "latency_ms": _ms(summarize(pooled)),
        **_span_check(reps),
    }


def _span_check(reps: list[Mapping[str, Any]]) -> dict[str, int]:
    """A ``worker-otel`` row's spans, summed over its repetitions, and in how many of them
    spans were dropped; nothing for a row that exports none."""
    checked = [r for r in reps if "otel_spans" in r]
    if not checked:
        return {}
    return {
        "otel_spans": sum(r["otel_spans"] for r in checked),
        "otel_expected": sum(r["otel_expected"] for r in checked),
        "otel_dropped": sum(r["otel_dropped"] for r in checked),
        "otel_dropped_points": sum(1 for r in checked if r["otel_dropped"] > 0),
    }


def bound(util: Mapping[str, float | None]) -> str | None:
    """Which side ran out of CPU: ``target`` (CPU0) or ``load side`` (emulator + load
    generator on CPU1), when either used 90 % of a core; ``None`` when neither did."""
    if (util.get("target") or 0.0) >= SATURATED:
        return "target"
    if (util.get("emulator") or 0.0) + (util.get("loadgen") or 0.0) >= SATURATED:
        return "load side"
    return None


def figure(row: Mapping[str, Any], name: str) -> float | None:
    """``p50``/``p99``/... (ms), ``cpu`` (µs per event) or ``throughput`` (events/s) of a row."""
    if name == "cpu":
        return row["cpu_us_per_event"]  # type: ignore[no-any-return]
    if name == "throughput":
        return row["throughput"]  # type: ignore[no-any-return]
    return row["latency_ms"].get(name)  # type: ignore[no-any-return]


def references(scenario: str) -> tuple[str, ...]:
    """The variants a scenario's other rows are divided by."""
    baseline = SCENARIOS[scenario].baseline
    return REFERENCES if baseline is None else (*REFERENCES, baseline)


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each non-reference row gets ``ratios[ref][figure]`` = its figure / the reference's; the
    worker's rows also ``ratios[peer]`` (:data:`PEERS`)."""
    index = {row_key(row): row for row in rows}
    for row in rows:
        refs = references(row["scenario"])
        if row["variant"] in refs:
            continue
        ratios: dict[str, dict[str, float | None]] = {}
        peers = [peer for mine, peer in PEERS if mine == row["variant"]]
        for ref in (*refs, *peers):
            other = index.get((row["scenario"], row["tls"], row["level"], ref))
            if other is not None:
                ratios[ref] = {f: ratio(figure(row, f), figure(other, f)) for f in COMPARED}
        row["ratios"] = ratios


def find(
    rows: Iterable[Mapping[str, Any]], scenario: str, tls: bool, level: str, variant: str
) -> Mapping[str, Any] | None:
    for row in rows:
        if row_key(row) == (scenario, tls, level, variant):
            return row
    return None


def _target(name: str, wanted: str, value: float | None, ok: bool | None) -> dict[str, Any]:
    return {"target": name, "wanted": wanted, "measured": value, "met": ok}


def _check(rows: list[dict[str, Any]], name: str, spec: Spec, limit: float) -> dict[str, Any]:
    scenario, tls, level, top, bottom, fig = spec
    a, b = find(rows, scenario, tls, level, top), find(rows, scenario, tls, level, bottom)
    value = ratio(figure(a, fig), figure(b, fig)) if a and b else None
    wanted = f"{top}/{bottom} {fig} {'<=' if limit > 0 else '>='} {abs(limit):g}"
    ok = None if value is None else (value <= limit if limit > 0 else value >= -limit)
    return _target(name, wanted, value, ok)


def targets(
    rows: list[dict[str, Any]],
    memory: Mapping[str, Any] | None,
    metrics: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The issue's targets, each measured, with ``met`` True/False (``None``: not measured);
    the metrics' cost is read from ``metrics`` (:func:`metrics_rows`) when given."""
    checks = [_check(rows, name, spec, limit) for name, spec, limit in TARGETS]
    worker_rows = [r for r in rows if r["variant"].startswith("worker")]
    failures = sum(r["errors"] + r["incomplete"] for r in worker_rows)
    checks.append(
        _target("no errors (worker rows)", "errors + incomplete == 0", failures, failures == 0)
    )
    checks += [_peer_target(rows, name, *spec) for name, spec in PEER_TARGETS]
    peer_rows = [r for r in rows if r["variant"] in PEER_VARIANTS]
    failures = sum(r["errors"] + r["incomplete"] for r in peer_rows)
    ok = failures == 0 if peer_rows else None
    checks.append(_target("no errors (peer rows)", "errors + incomplete == 0", failures, ok))
    flat = None if memory is None else memory.get("flat")
    growth = None if memory is None else memory.get("growth_mb_per_min")
    checks.append(_target("worker RSS flat over 60 s at c=128", "growth < 1 MB/min", growth, flat))
    checks.append(_metrics_target(metrics or rows))
    return checks


def _peer_target(
    rows: list[dict[str, Any]], name: str, mine: str, peer: str, fig: str, level: str | None
) -> dict[str, Any]:
    """The worker's ``fig`` divided by the peer's at every level (or ``level``) of every
    scenario and transport both were measured in; measured is the highest ratio, and where."""
    found = [
        (ratio(figure(row, fig), figure(other, fig)), where(row))
        for row in rows
        if row["variant"] == mine and (level is None or row["level"] == level)
        for other in [find(rows, row["scenario"], row["tls"], row["level"], peer)]
        if other is not None
    ]
    measured = [(value, at) for value, at in found if value is not None]
    where_ = "every level" if level is None else level
    wanted = f"{mine}/{peer} {fig} < 1 at {where_} of every scenario both ran"
    if not measured:
        return _target(name, wanted, None, None)
    worst, at = max(measured)
    return {**_target(name, wanted, worst, worst < 1), "at": at, "points": len(measured)}


def where(row: Mapping[str, Any]) -> str:
    """``(b) https c=32``: a row's scenario, transport and level."""
    return f"({row['scenario']}){' https' if row['tls'] else ''} {row['level']}"


def _metrics_target(rows: list[dict[str, Any]]) -> dict[str, Any]:
    value = median(_closed_ratios(rows, METRICS_SCENARIO, "worker", "worker-nometrics"))
    wanted = (
        f"worker/worker-nometrics cpu <= {METRICS_LIMIT:g}, median over "
        f"({METRICS_SCENARIO})'s closed-loop levels"
    )
    return _target(METRICS_TARGET, wanted, value, None if value is None else value <= METRICS_LIMIT)


def _closed_ratios(
    rows: list[dict[str, Any]], scenario: str, top: str, bottom: str
) -> list[float | None]:
    """``top``/``bottom`` CPU per event at each closed-loop level of ``scenario`` (plain HTTP)."""
    levels = [
        r["level"]
        for r in rows
        if (r["scenario"], r["tls"], r["variant"], r["rate"]) == (scenario, False, top, None)
    ]
    return [_cpu_ratio(rows, scenario, level, top, bottom) for level in levels]


def _cpu_ratio(
    rows: list[dict[str, Any]], scenario: str, level: str, top: str, bottom: str
) -> float | None:
    a, b = find(rows, scenario, False, level, top), find(rows, scenario, False, level, bottom)
    return ratio(figure(a, "cpu"), figure(b, "cpu")) if a and b else None


def _cpu_added(
    rows: list[dict[str, Any]], scenario: str, level: str, top: str, bottom: str
) -> float | None:
    """The CPU µs per event ``top`` uses beyond ``bottom`` (negative: less, i.e. noise)."""
    a, b = find(rows, scenario, False, level, top), find(rows, scenario, False, level, bottom)
    x, y = (figure(a, "cpu"), figure(b, "cpu")) if a and b else (None, None)
    return None if x is None or y is None else x - y


def observability(
    rows: list[dict[str, Any]],
    profiles: Mapping[str, Any] | None = None,
    metrics: list[dict[str, Any]] | None = None,
) -> dict[str, Any] | None:
    """What metrics and OpenTelemetry add to the worker's CPU per event, per scenario and level
    (plain HTTP API): ``metrics cpu ratio`` = worker / worker-nometrics, ``otel cpu ratio`` =
    worker-otel / worker, each with the µs per event it adds, and the span check; per scenario
    the median ratio over the closed-loop levels; under ``profiled``, the µs per event the
    cProfile'd worker (metrics on, OpenTelemetry off) spent in each. ``None`` (a figure) when
    a row is missing; ``None`` (the section) when neither variant was measured. The metrics'
    figures come from ``metrics`` (:func:`metrics_rows`) where it has the rows."""
    paired = [*(metrics or ()), *rows]  # find() takes the first match: metrics' rows first
    scenarios: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        if not row["tls"] and row["variant"] in OBSERVABILITY_VARIANTS:
            levels = scenarios.setdefault(row["scenario"], {})
            if row["level"] not in levels:
                levels[row["level"]] = _costs(rows, paired, row["scenario"], row["level"])
    if not scenarios:
        return None
    summary = {
        scenario: {
            "metrics cpu ratio": median(_closed_ratios(paired, scenario, "worker",
                                                       "worker-nometrics")),
            "otel cpu ratio": median(_closed_ratios(rows, scenario, "worker-otel", "worker")),
        }
        for scenario in scenarios
    }  # fmt: skip
    return {"scenarios": scenarios, "summary": summary, "profiled": _profiled(profiles)}


def _costs(
    rows: list[dict[str, Any]], paired: list[dict[str, Any]], scenario: str, level: str
) -> dict[str, Any]:
    otel = find(rows, scenario, False, level, "worker-otel") or {}
    return {
        "metrics cpu ratio": _cpu_ratio(paired, scenario, level, "worker", "worker-nometrics"),
        "metrics cpu µs/event": _cpu_added(paired, scenario, level, "worker", "worker-nometrics"),
        "otel cpu ratio": _cpu_ratio(rows, scenario, level, "worker-otel", "worker"),
        "otel cpu µs/event": _cpu_added(rows, scenario, level, "worker-otel", "worker"),
        "otel spans": otel.get("otel_spans"),
        "otel spans expected": otel.get("otel_expected"),
        "otel spans dropped": otel.get("otel_dropped"),
    }


def _profiled(profiles: Mapping[str, Any] | None) -> dict[str, dict[str, float]] | None:
    """Per profiled scenario, the µs per event (under cProfile, so inflated) of the metrics
    and of OpenTelemetry's code in the worker as it runs by default (0: none ran)."""
    if not profiles:
        return None
    found: dict[str, dict[str, float]] = {}
    for scenario, profile in profiles.items():
        spent = {c["component"]: c["us_per_event"] for c in profile["components"]}
        found[scenario] = {key: spent.get(name, 0.0) for key, name in PROFILED.items()}
        found[scenario]["profiled"] = profile["profiled_us_per_event"]
    return found


def log_backends(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Scenario (a), stdlib vs aiologger, per level, and which the figures favour."""
    levels = {}
    for row in rows:
        if row["scenario"] == "a" and not row["tls"] and row["variant"] == "worker-aiolog":
            stdlib = find(rows, "a", False, row["level"], "worker")
            if stdlib is not None:
                levels[row["level"]] = {
                    f"aiologger/stdlib {f}": ratio(figure(row, f), figure(stdlib, f))
                    for f in COMPARED
                }
    if not levels:
        return None
    cpu = median(level["aiologger/stdlib cpu"] for level in levels.values())
    verdict = None
    if cpu is not None:
        faster = "stdlib" if cpu >= 1 else "aiologger"
        gap = abs(cpu - 1)
        verdict = f"{faster} uses less CPU per event by {gap:.0%}" + (
            " (under 10 %: either may be the default)" if gap < 0.10 else ""
        )
    return {"levels": levels, "verdict": verdict}


def describe(record: Mapping[str, Any]) -> str:
    """One measured point as a progress line."""
    lat = record["latency_ms"]
    p50 = "-" if lat["p50"] is None else f"{lat['p50']:.2f}"
    p99 = "-" if lat["p99"] is None else f"{lat['p99']:.2f}"
    cpu = record["cpu_us_per_event"]
    return (
        f"({record['scenario']}{' https' if record['tls'] else ''}) {record['level']:<10} "
        f"{record['variant']:<16} {record['throughput']:8.0f} ev/s  p50 {p50} ms  p99 {p99} ms  "
        f"cpu {'-' if cpu is None else f'{cpu:.0f}'} µs/ev  errors {record['errors_total']}"
        + (f"  {spans_text(record)}" if "otel_spans" in record else "")
    )


def spans_text(figures: Mapping[str, Any]) -> str:
    """``otel spans 600 of 600``, and how many were dropped when some were."""
    text = f"otel spans {figures['otel_spans']} of {figures['otel_expected']}"
    dropped = figures["otel_dropped"]
    return text + (f" ({dropped} DROPPED: the exporter's queue overflowed)" if dropped else "")
