"""From load results to the report: records, rows over repetitions, ratios, targets, the table,
the profile summary and the plan's interleaving."""

from __future__ import annotations

import cProfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from worker.bench.collector import expected_spans, span_figures
from worker.bench.load import LoadResult
from worker.bench.plan import FULL, QUICK, Plan, Point
from worker.bench.profiles import IDLE, component, summarize_profile
from worker.bench.report import (
    METRICS_TARGET,
    aggregate,
    bound,
    find,
    log_backends,
    metrics_rows,
    observability,
    point_record,
    targets,
)
from worker.bench.table import render


def result(latencies_ms: list[float], completed: int, cpu_target: float) -> LoadResult:
    return LoadResult(
        latencies_us=[v * 1000 for v in latencies_ms],
        completed=completed,
        window_s=2.0,
        errors=Counter(),
        cpu_s={"target": cpu_target, "emulator": 0.2, "loadgen": 0.4},
    )


def test_point_record_turns_a_window_into_figures() -> None:
    point = Point(0, "a", False, "worker", 1)
    record = point_record(point, result([1.0, 2.0, 3.0], completed=1000, cpu_target=0.3))
    assert record["throughput"] == 500.0
    assert record["cpu_us_per_event"] == pytest.approx(300.0)
    assert record["latency_ms"]["p50"] == pytest.approx(2.0)
    assert record["cpu_util"] == {"target": 0.15, "emulator": 0.1, "loadgen": 0.2}
    assert record["level"] == "c=1"
    assert record["errors_total"] == 0


def records_for(
    variant: str, p50s: list[float], cpu: float, scenario: str = "a", concurrency: int = 1
) -> list[dict[str, Any]]:
    return [
        point_record(Point(rep, scenario, False, variant, concurrency), result([p50], 1000, cpu))
        for rep, p50 in enumerate(p50s)
    ]


def test_aggregate_pools_samples_and_takes_medians() -> None:
    records = records_for("floor", [1.0, 3.0], 0.2) + records_for("worker", [2.0, 4.0], 0.4)
    samples = {
        "a|False|floor|c=1": [1000.0, 3000.0],
        "a|False|worker|c=1": [2000.0, 4000.0, 6000.0],
    }
    rows = aggregate(records, samples)
    floor, worker = rows
    assert (floor["reps"], floor["n"]) == (2, 2)
    assert worker["latency_ms"]["p50"] == pytest.approx(4.0)  # pooled: 2, 4, 6
    assert worker["cpu_us_per_event"] == pytest.approx(400.0)
    assert "ratios" not in floor
    assert worker["ratios"]["floor"]["p50"] == pytest.approx(2.0)
    assert worker["ratios"]["floor"]["cpu"] == pytest.approx(2.0)
    assert worker["ratios"]["floor"]["throughput"] == pytest.approx(1.0)
    assert set(worker["ratios"]) == {"floor"}


def test_targets_say_met_not_met_or_not_measured() -> None:
    rows = aggregate(records_for("floor", [1.0], 0.2) + records_for("worker", [1.2], 0.4), {
        "a|False|floor|c=1": [1000.0], "a|False|worker|c=1": [1200.0],
    })  # fmt: skip
    by_name = {t["target"]: t for t in targets(rows, memory=None)}
    assert by_name["(a) c=1 p50 vs floor"]["met"] is True  # 1.2 <= 1.25
    assert by_name["(a) c=1 p50 vs floor"]["measured"] == pytest.approx(1.2)
    assert by_name["(a) c=1 CPU/event vs floor"]["met"] is False  # 2.0 > 1.35
    assert by_name["(e) c=32 Redis Streams vs HTTP CPU/event"]["met"] is None
    assert by_name["(b) c=32 throughput vs floor"]["met"] is None
    assert by_name["no errors (worker rows)"]["met"] is True
    assert by_name["worker RSS flat over 60 s at c=128"]["met"] is None


def test_bound_names_the_saturated_side() -> None:
    assert bound({"target": 0.95, "emulator": 0.5, "loadgen": 0.4}) == "target"
    assert bound({"target": 0.5, "emulator": 0.7, "loadgen": 0.25}) == "load side"
    assert bound({"target": 0.5, "emulator": None, "loadgen": 0.1}) is None


def test_log_backends_compare_aiologger_with_stdlib() -> None:
    records = records_for("worker", [1.0], 0.2) + records_for("worker-aiolog", [1.0], 0.3)
    section = log_backends(aggregate(records, {}))
    assert section is not None
    assert section["levels"]["c=1"]["aiologger/stdlib cpu"] == pytest.approx(1.5)
    assert section["verdict"] == "stdlib uses less CPU per event by 50%"
    assert log_backends(aggregate(records_for("worker", [1.0], 0.2), {})) is None


def test_render_prints_every_row_ratio_and_target() -> None:
    rows = aggregate(records_for("floor", [1.0], 0.2) + records_for("worker", [2.0], 0.4), {})
    text = render({
        "meta": {"mode": "quick", "api_latency_ms": 2.0, "pinning": "off"},
        "rows": rows, "targets": targets(rows, None),
        "skipped": [{"scenario": "e", "why": "(e) Redis Streams: Redis is not reachable"}],
    })  # fmt: skip
    assert "(a) PRE rewrite, no API call, API over HTTP" in text
    assert "(i) floor, bare aiohttp" in text and "biot-worker" in text
    assert "worker ÷floor: p50" in text
    assert "[NOT MET] (a) c=1 CPU/event vs floor" in text
    assert "skipped (e) Redis Streams: Redis is not reachable" in text


def test_scenario_e_divides_the_queue_row_by_the_worker_over_http_and_shows_redis_cpu() -> None:
    http = point_record(Point(0, "e", False, "worker", 1), result([1.0], 1000, 0.2))
    queue_result = result([2.0], 1000, 0.5)
    queue_result.cpu_s["redis"] = 0.1
    queue = point_record(Point(0, "e", False, "worker-queue", 1), queue_result)
    assert queue["redis_cpu_us_per_event"] == pytest.approx(100.0)
    rows = aggregate([http, queue], {"e|False|worker|c=1": [1000.0],
                                     "e|False|worker-queue|c=1": [2000.0]})  # fmt: skip
    http_row, queue_row = rows
    assert not http_row.get("ratios")  # the reference of (e)
    assert set(queue_row["ratios"]) == {"worker"}
    assert queue_row["ratios"]["worker"]["p50"] == pytest.approx(2.0)
    assert queue_row["ratios"]["worker"]["cpu"] == pytest.approx(2.5)
    assert queue_row["cpu_util"]["redis"] == pytest.approx(0.05)
    assert "redis" not in http_row["cpu_util"] and "redis_cpu_us_per_event" not in http_row
    text = render({"meta": {"mode": "quick", "api_latency_ms": 2.0, "pinning": "off"},
                   "rows": rows, "targets": [], "skipped": []})  # fmt: skip
    assert "(e) the (a) event via Redis Streams + reply, vs HTTP\n" in text
    assert "worker-queue ÷HTTP: p50 2.00 p99 2.00 cpu 2.50 ev/s 1.00" in text
    assert "R 0.05 (100 µs/ev)" in text


def test_plan_interleaves_variants_and_rotates_them_per_repetition() -> None:
    plan = Plan(scenarios=("a",), variants=("floor", "worker", "docs"), concurrency=(1, 8),
                rates=(), reps=2)  # fmt: skip
    points = list(plan.points())
    assert [(p.rep, p.concurrency, p.variant) for p in points[:6]] == [
        (0, 1, "floor"), (0, 1, "worker"), (0, 1, "docs"),
        (0, 8, "floor"), (0, 8, "worker"), (0, 8, "docs"),
    ]  # fmt: skip
    assert [p.variant for p in points[6:9]] == ["worker", "docs", "floor"]
    assert plan.targets() == ["docs@http", "floor@http", "worker@http"]


def test_quick_plan_covers_every_scenario_and_both_transports() -> None:
    groups = {(p.scenario, p.tls) for p in QUICK.points()}
    assert groups == {("a", False), ("b", False), ("c", False), ("d", False), ("e", False),
                      ("b", True), ("c", True)}  # fmt: skip
    https_variants = {p.variant for p in QUICK.points() if p.tls}
    assert https_variants == {"floor", "worker", "docs", "sample", "fastapi"}
    e_points = {(p.variant, p.level) for p in QUICK.points() if p.scenario == "e"}
    assert e_points == {(v, lv) for v in ("worker", "worker-queue", "faststream")
                        for lv in ("c=1", "c=32")}  # fmt: skip
    assert {p.target for p in QUICK.points() if p.scenario == "e"} == {
        "worker@http", "worker-queue@http", "faststream@http",
    }  # fmt: skip
    assert QUICK.without("e").scenarios == ("a", "b", "c", "d")


def test_full_plan_runs_e_at_every_concurrency_level() -> None:
    levels = {p.level for p in FULL.points() if p.scenario == "e" and p.variant == "worker-queue"}
    assert levels >= {"c=1", "c=8", "c=32", "c=128"}


@pytest.mark.parametrize(
    ("filename", "function", "expected"),
    [
        ("/work/main/worker/metrics.py", "observe", "worker: metrics"),
        ("/x/site-packages/prometheus_client/metrics.py", "inc", "worker: metrics"),
        ("/x/site-packages/opentelemetry/sdk/trace/__init__.py", "end", "OpenTelemetry"),
        ("/work/main/worker/otel.py", "finish", "OpenTelemetry"),
        ("~", "<method 'poll' of 'select.epoll' objects>", IDLE),
        ("~", "<built-in method orjson.loads>", "JSON (orjson)"),
        ("/x/site-packages/aiohttp/web_protocol.py", "data_received", "aiohttp server (HTTP in)"),
        ("/x/site-packages/aiohttp/client.py", "_request", "aiohttp client (HTTP out)"),
        ("/work/main/worker/log_stdlib.py", "_write_record", "worker: log"),
        ("/work/main/worker/dispatch.py", "_handle", "worker: dispatch, events, responses"),
        ("/usr/lib/python3.11/asyncio/base_events.py", "_run_once", "asyncio event loop"),
    ],
)
def test_profile_components(filename: str, function: str, expected: str) -> None:
    assert component(filename, function) == expected


def test_summarize_profile_gives_microseconds_per_event(tmp_path: Path) -> None:
    profile = cProfile.Profile()
    profile.enable()
    sum(i * i for i in range(20_000))
    profile.disable()
    path = tmp_path / "p.pstats"
    profile.dump_stats(str(path))
    summary = summarize_profile(str(path), events=10)
    assert summary["events"] == 10
    assert summary["profiled_us_per_event"] > 0
    assert sum(c["share"] for c in summary["components"]) == pytest.approx(1.0)
    assert summary["top"][0]["own_us_per_event"] > 0


# ---------------------------------------------------------------- what observability costs


def test_plans_measure_metrics_off_and_opentelemetry_in_a_and_b_interleaved() -> None:
    for plan in (QUICK, FULL):
        measured = {(p.scenario, p.tls) for p in plan.points()
                    if p.variant in ("worker-nometrics", "worker-otel")}  # fmt: skip
        assert measured == {("a", False), ("b", False)}
        assert {"worker-nometrics@http", "worker-otel@http", "worker@http"} <= set(plan.targets())
    plan = QUICK.with_(scenarios=("a",), concurrency=(1,), reps=3, paired_reps=0)
    orders = [[p.variant for p in plan.points() if p.rep == rep and not p.again]
              for rep in range(3)]  # fmt: skip
    assert all(set(order) >= {"worker", "worker-nometrics", "worker-otel"} for order in orders)
    assert orders[0] != orders[1] != orders[2]  # the same variants, rotated per repetition
    assert sorted(orders[0]) == sorted(orders[1]) == sorted(orders[2])


def test_the_metrics_pair_is_measured_again_side_by_side_after_the_repetitions() -> None:
    plan = QUICK.with_(scenarios=("a", "b"), concurrency=(1, 32), reps=1, paired_reps=3)
    points = list(plan.points())
    main = [p for p in points if p.rep == 0][: -3 * 2 * 2]
    extra = points[len(main) :]
    assert [(p.scenario, p.tls, p.variant, p.concurrency) for p in extra] == [
        ("a", False, variant, level)
        for pair in (("worker", "worker-nometrics"), ("worker-nometrics", "worker"),
                     ("worker", "worker-nometrics"))
        for level in (1, 32)
        for variant in pair
    ]  # fmt: skip
    assert [p.pair for p in extra] == [k for k in range(3) for _ in range(4)]  # new processes
    assert {p.pair for p in main} == {-1}
    without = QUICK.with_(variants=("floor", "worker"), paired_reps=3)
    assert not [p for p in without.points() if p.variant == "worker-nometrics"]


def test_the_rows_targets_divide_are_measured_again_alternating_after_the_repetitions() -> None:
    plan = QUICK.with_(scenarios=("a", "e"), concurrency=(1, 32), reps=1, paired_reps=1,
                       target_reps=3)  # fmt: skip
    points = list(plan.points())
    extra = [p for p in points if p.again]
    assert [(p.scenario, p.variant, p.concurrency) for p in extra] == [
        (scenario, variant, level)
        for k in range(3)
        for scenario, pair in (("a", ("floor", "worker")), ("e", ("worker", "worker-queue")))
        for level in (1, 32)
        for variant in (pair[::-1] if k % 2 == 0 else pair)
    ]  # fmt: skip
    assert {(p.rep, p.pair, p.tls, p.rate) for p in extra} == {(0, -1, False, None)}
    first = points.index(extra[0])
    assert not [p for p in points[:first] if p.again]  # the repetitions come first...
    assert points[first : first + len(extra)] == extra  # ...then these, together...
    assert points.index(extra[-1]) < min(n for n, p in enumerate(points) if p.pair >= 0)
    assert [p for p in points[first:] if not p.again] == [p for p in points if p.pair >= 0]
    records = [
        *records_for("worker", [1.0], 0.100, scenario="e"),
        *records_for("worker-queue", [1.0], 0.180, scenario="e"),  # the repetition
        *(r for cpu in (0.140, 0.150, 0.135) for r in records_for("worker-queue", [1.0], cpu,
                                                                  scenario="e")),
        *(r for cpu in (0.110, 0.090, 0.095) for r in records_for("worker", [1.0], cpu,
                                                                  scenario="e")),
    ]  # fmt: skip
    rows = {r["variant"]: r for r in aggregate(records, {})}
    assert rows["worker-queue"]["reps"] == rows["worker"]["reps"] == 4
    assert rows["worker-queue"]["cpu_us_per_event"] == pytest.approx(145.0)  # the median of 4
    assert rows["worker"]["cpu_us_per_event"] == pytest.approx(97.5)
    assert not [p for p in QUICK.with_(target_reps=0).points() if p.again]
    without_floor = QUICK.with_(scenarios=("a", "b"), variants=("worker", "worker-nometrics"))
    assert not [p for p in without_floor.points() if p.again]
    b_only = {(p.scenario, p.variant) for p in QUICK.with_(scenarios=("b",)).points() if p.again}
    assert b_only == {("b", "floor"), ("b", "worker")}


def test_a_targets_extra_measurements_stay_out_of_the_metrics_comparison() -> None:
    plain = records_for("worker", [1.0], 0.200) + records_for("worker-nometrics", [1.0], 0.190)
    again = records_for("worker", [1.0, 1.0, 1.0], 0.400)
    for record in again:
        record["again"] = True
    rows = {r["variant"]: r for r in metrics_rows([*plain, *again], {})}
    assert rows["worker"]["reps"] == 1 and rows["worker"]["cpu_us_per_event"] == pytest.approx(200)
    assert {r["variant"]: r["reps"] for r in aggregate([*plain, *again], {})} == {
        "worker": 4, "worker-nometrics": 1}  # fmt: skip


def otel_record(concurrency: int, cpu: float, expected: int, received: int) -> dict[str, Any]:
    record = records_for("worker-otel", [1.0], cpu, concurrency=concurrency)[0]
    record.update(span_figures(expected, received))
    return record


def cost_rows() -> list[dict[str, Any]]:
    """(a) at c=1 and c=32 with every variant, (b) c=1 without worker-nometrics."""
    records = [
        *records_for("worker-nometrics", [1.0], 0.200),
        *records_for("worker", [1.0], 0.206),
        otel_record(1, 0.300, expected=3000, received=3000),
        *records_for("worker-nometrics", [1.0], 0.100, concurrency=32),
        *records_for("worker", [1.0], 0.110, concurrency=32),
        otel_record(32, 0.150, expected=5000, received=4000),
        *records_for("worker", [1.0], 0.500, scenario="b"),
        *records_for("worker-otel", [1.0], 0.600, scenario="b"),
    ]
    return aggregate(records, {})


def test_observability_divides_metrics_on_by_off_and_otel_by_the_worker() -> None:
    section = observability(cost_rows())
    assert section is not None
    c1, c32 = section["scenarios"]["a"]["c=1"], section["scenarios"]["a"]["c=32"]
    assert c1["metrics cpu ratio"] == pytest.approx(1.03)
    assert c1["metrics cpu µs/event"] == pytest.approx(6.0)
    assert c1["otel cpu ratio"] == pytest.approx(300 / 206)
    assert c1["otel cpu µs/event"] == pytest.approx(94.0)
    assert (c1["otel spans"], c1["otel spans expected"], c1["otel spans dropped"]) == (
        3000, 3000, 0,
    )  # fmt: skip
    assert c32["metrics cpu ratio"] == pytest.approx(1.10)
    assert c32["otel spans dropped"] == 1000
    assert section["summary"]["a"]["metrics cpu ratio"] == pytest.approx(1.065)  # median
    assert section["profiled"] is None  # no profile in this run


def test_observability_gives_none_for_a_missing_row_and_no_section_without_the_variants() -> None:
    section = observability(cost_rows())
    assert section is not None
    b1 = section["scenarios"]["b"]["c=1"]
    assert b1["metrics cpu ratio"] is None and b1["metrics cpu µs/event"] is None
    assert b1["otel cpu ratio"] == pytest.approx(1.2)
    assert b1["otel spans"] is None  # the synthetic (b) row carries no span check
    assert section["summary"]["b"]["metrics cpu ratio"] is None
    only_otel = aggregate(records_for("worker-otel", [1.0], 0.3), {})
    alone = observability(only_otel)
    assert alone is not None
    assert alone["scenarios"]["a"]["c=1"]["otel cpu ratio"] is None  # no worker row
    assert observability(aggregate(records_for("worker", [1.0], 0.2), {})) is None


def test_observability_reads_the_metrics_and_opentelemetry_components_of_the_profile() -> None:
    profiles = {"a": {"profiled_us_per_event": 400.0, "components": [
        {"component": "worker: metrics", "us_per_event": 12.0, "share": 0.03},
        {"component": "aiohttp server (HTTP in)", "us_per_event": 120.0, "share": 0.3},
    ]}}  # fmt: skip
    section = observability(cost_rows(), profiles)
    assert section is not None
    assert section["profiled"] == {"a": {"metrics": 12.0, "opentelemetry": 0.0, "profiled": 400.0}}


def test_metrics_target_is_the_median_over_the_closed_loop_levels_of_a() -> None:
    by_name = {t["target"]: t for t in targets(cost_rows(), None)}
    metrics = by_name[METRICS_TARGET]
    assert metrics["measured"] == pytest.approx(1.065)
    assert metrics["met"] is False
    assert "median over (a)'s closed-loop levels" in metrics["wanted"]
    cheap = aggregate(records_for("worker-nometrics", [1.0], 0.2)
                      + records_for("worker", [1.0], 0.204), {})  # fmt: skip
    assert {t["target"]: t for t in targets(cheap, None)}[METRICS_TARGET]["met"] is True
    unmeasured = aggregate(records_for("worker", [1.0], 0.2), {})
    assert {t["target"]: t for t in targets(unmeasured, None)}[METRICS_TARGET]["met"] is None


def test_span_checks_add_up_over_repetitions_and_flag_the_drops() -> None:
    records = [otel_record(1, 0.3, 100, 100), otel_record(1, 0.3, 100, 60)]
    records[1]["rep"] = 1
    (row,) = aggregate(records, {})
    assert (row["otel_spans"], row["otel_expected"], row["otel_dropped"]) == (160, 200, 40)
    assert row["otel_dropped_points"] == 1
    (plain,) = aggregate(records_for("worker", [1.0], 0.2), {})
    assert "otel_spans" not in plain


def test_expected_spans_count_the_event_and_each_api_call() -> None:
    assert expected_spans("a", 100) == 100
    assert expected_spans("b", 100) == 200
    assert span_figures(200, 210) == {"otel_spans": 210, "otel_expected": 200, "otel_dropped": 0}
    assert span_figures(200, 150)["otel_dropped"] == 50


def test_render_prints_the_observability_rows_spans_and_summary() -> None:
    rows = cost_rows()
    text = render({
        "meta": {"mode": "quick", "api_latency_ms": 2.0, "pinning": "off"},
        "rows": rows, "targets": targets(rows, None), "observability": observability(rows),
        "skipped": [],
    })  # fmt: skip
    assert "biot-worker, metrics off" in text and "biot-worker + OpenTelemetry" in text
    assert "worker-otel otel spans 3000 of 3000\n" in text
    assert "worker-otel otel spans 4000 of 5000 (1000 DROPPED" in text
    assert "(a) c=1         metrics 1.03 (+6 µs)  otel 1.46 (+94 µs)  spans 3000/3000" in text
    assert "spans 4000/5000 (1000 DROPPED)" in text
    assert "(b) c=1         metrics - (- µs)  otel 1.20 (+100 µs)" in text
    assert "(a) median over closed-loop levels: metrics 1.06, otel 1.41" in text
    assert f"[NOT MET] {METRICS_TARGET}" in text


def test_the_metrics_extra_pairs_stay_out_of_the_rows_and_feed_the_metrics_cost() -> None:
    """The pairs run on processes started later, beside no floor: the worker's ratios to the
    floor come from the repetitions alone, the metrics' cost from every process."""
    main = [
        *records_for("floor", [1.0], 0.100),
        *records_for("worker", [1.1], 0.110),
        *records_for("worker-nometrics", [1.1], 0.110),
    ]
    pairs = [
        point_record(Point(0, "a", False, variant, 1, None, pair), result([9.0], 1000, cpu))
        for pair, (variant, cpu) in enumerate(
            [("worker", 0.200), ("worker-nometrics", 0.190), ("worker", 0.210),
             ("worker-nometrics", 0.200)]
        )
    ]  # fmt: skip
    samples = {"a|False|worker|c=1": [1100.0], "a|False|worker|c=1|pair": [9000.0, 9000.0]}
    rows = aggregate(main + pairs, samples)
    worker = find(rows, "a", False, "c=1", "worker")
    assert worker is not None
    assert (worker["reps"], worker["n"]) == (1, 1)
    assert worker["cpu_us_per_event"] == pytest.approx(110.0)
    assert worker["latency_ms"]["p50"] == pytest.approx(1.1)
    assert worker["ratios"]["floor"]["cpu"] == pytest.approx(1.1)
    paired = metrics_rows(main + pairs, samples)
    assert {r["variant"]: r["reps"] for r in paired} == {"worker": 3, "worker-nometrics": 3}
    section = observability(rows, None, paired)
    assert section is not None
    assert section["scenarios"]["a"]["c=1"]["metrics cpu ratio"] == pytest.approx(200 / 190)
    metrics = [t for t in targets(rows, None, paired) if t["target"] == METRICS_TARGET]
    assert metrics[0]["measured"] == pytest.approx(200 / 190)
    alone = [t for t in targets(rows, None) if t["target"] == METRICS_TARGET]
    assert alone[0]["measured"] == pytest.approx(1.0)  # the repetitions' rows alone
