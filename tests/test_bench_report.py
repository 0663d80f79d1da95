"""From load results to the report: records, rows over repetitions, ratios, targets, the table,
the profile summary and the plan's interleaving."""

from __future__ import annotations

import cProfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from worker.bench.load import LoadResult
from worker.bench.plan import FULL, QUICK, Plan, Point
from worker.bench.profiles import IDLE, component, summarize_profile
from worker.bench.report import aggregate, bound, log_backends, point_record, targets
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


def records_for(variant: str, p50s: list[float], cpu: float) -> list[dict[str, Any]]:
    return [
        point_record(Point(rep, "a", False, variant, 1), result([p50], 1000, cpu))
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
    rows = aggregate(records_for("floor", [1.0], 0.2) + records_for("worker", [1.4], 0.4), {
        "a|False|floor|c=1": [1000.0], "a|False|worker|c=1": [1400.0],
    })  # fmt: skip
    by_name = {t["target"]: t for t in targets(rows, memory=None)}
    assert by_name["(a) c=1 p50 vs floor"]["met"] is True
    assert by_name["(a) c=1 p50 vs floor"]["measured"] == pytest.approx(1.4)
    assert by_name["(a) c=1 CPU/event vs floor"]["met"] is False  # 2.0 > 1.6
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
    assert https_variants == {"floor", "worker", "docs", "sample"}
    e_points = {(p.variant, p.level) for p in QUICK.points() if p.scenario == "e"}
    assert e_points == {(v, lv) for v in ("worker", "worker-queue") for lv in ("c=1", "c=32")}
    assert {p.target for p in QUICK.points() if p.scenario == "e"} == {
        "worker@http", "worker-queue@http",
    }  # fmt: skip
    assert QUICK.without("e").scenarios == ("a", "b", "c", "d")


def test_full_plan_runs_e_at_every_concurrency_level() -> None:
    levels = {p.level for p in FULL.points() if p.scenario == "e" and p.variant == "worker-queue"}
    assert levels >= {"c=1", "c=8", "c=32", "c=128"}


@pytest.mark.parametrize(
    ("filename", "function", "expected"),
    [
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
