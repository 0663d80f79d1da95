"""The whole orchestrator end to end in a tiny mode: real emulator, worker and floor processes,
the load generator, the table and the JSON. Only the output's shape is checked: performance is
reported by ``biot-worker bench``, never asserted in tests. Scenario (e) also needs the real
Redis (skipped when it is down, failed under ``CI=true``), except to check that an unreachable
Redis makes (e) a skip with its reason."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import redis

from tests.queue_helpers import REDIS, require_broker
from worker.bench.cli import bench_main
from worker.cli import build_parser


def test_tiny_bench_run_writes_the_table_and_the_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args([
        "bench", "--quick", "--scenarios", "a", "--variants", "floor,worker",
        "--concurrency", "1", "--requests", "50", "--warmup", "10", "--rates", "none",
        "--target-reps", "1", "--no-tls", "--no-profile", "--no-pin", "--no-chart",
        "--output", str(tmp_path),
    ])  # fmt: skip
    assert bench_main(args) == 0

    table = capsys.readouterr().out
    assert "(a) PRE rewrite, no API call, API over HTTP" in table
    assert "worker ÷floor: p50" in table

    result = orjson.loads((tmp_path / "bench-quick.json").read_bytes())
    assert set(result) >= {"meta", "plan", "rows", "targets", "points", "log_backends", "skipped"}
    assert result["meta"]["mode"] == "quick"
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"floor", "worker"}
    for row in rows.values():
        assert (row["scenario"], row["level"], row["errors"], row["incomplete"]) == (
            "a",
            "c=1",
            0,
            0,
        )
        assert (row["reps"], row["n"]) == (2, 100)  # the repetition, then once more (again)
        assert set(row["latency_ms"]) == {"p50", "p90", "p99", "p99.9", "mean", "max"}
        assert row["throughput"] > 0
        assert set(row["cpu_util"]) == {"target", "emulator", "loadgen"}
    assert set(rows["worker"]["ratios"]["floor"]) == {"p50", "p99", "cpu", "throughput"}
    assert {t["target"] for t in result["targets"]} >= {"(a) c=1 p50 vs floor"}
    assert [(p["variant"], p["again"]) for p in result["points"]] == [
        ("floor", False), ("worker", False), ("worker", True), ("floor", True)]  # fmt: skip


def test_tiny_bench_run_measures_what_metrics_and_opentelemetry_cost(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args([
        "bench", "--quick", "--scenarios", "b", "--variants", "worker,worker-nometrics,worker-otel",
        "--concurrency", "1", "--requests", "30", "--warmup", "10", "--rates", "none",
        "--no-tls", "--no-profile", "--no-pin", "--no-chart", "--output", str(tmp_path),
    ])  # fmt: skip
    assert bench_main(args) == 0

    table = capsys.readouterr().out
    assert "biot-worker, metrics off" in table and "biot-worker + OpenTelemetry" in table
    assert "worker-otel otel spans" in table and "DROPPED" not in table
    assert "observability, CPU per event" in table

    result = orjson.loads((tmp_path / "bench-quick.json").read_bytes())
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"worker", "worker-nometrics", "worker-otel"}
    assert all(row["errors"] + row["incomplete"] == 0 for row in rows.values())
    otel = rows["worker-otel"]
    assert otel["otel_expected"] == 2 * (10 + 30)  # a server span and a client span per event
    assert otel["otel_spans"] >= otel["otel_expected"] and otel["otel_dropped"] == 0
    assert "otel_spans" not in rows["worker"] and "otel_spans" not in rows["worker-nometrics"]
    costs = result["observability"]["scenarios"]["b"]["c=1"]
    assert costs["metrics cpu ratio"] is not None and costs["otel cpu ratio"] is not None
    assert costs["otel spans dropped"] == 0
    assert result["observability"]["processes_per_variant"] == 1
    assert "the metrics ratio of (a) from 1 process(es) each" in table  # (b) only: no pairs
    [metrics] = [t for t in result["targets"] if t["target"].startswith("metrics add")]
    assert metrics["met"] is None  # (a) was not measured


def test_fresh_processes_serve_each_repetition_from_new_targets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args([
        "bench", "--quick", "--scenarios", "a", "--variants", "worker,worker-nometrics",
        "--concurrency", "1", "--requests", "30", "--warmup", "10", "--rates", "none",
        "--reps", "2", "--paired-reps", "0", "--fresh-processes", "--no-tls", "--no-profile",
        "--no-pin", "--no-chart",
        "--output", str(tmp_path),
    ])  # fmt: skip
    assert bench_main(args) == 0

    progress = capsys.readouterr().err
    [restart] = [line for line in progress.splitlines() if "fresh processes" in line]
    assert "worker@http" in restart and "worker-nometrics@http" in restart
    result = orjson.loads((tmp_path / "bench-quick.json").read_bytes())
    assert result["plan"]["fresh_processes"] is True
    assert result["observability"]["processes_per_variant"] == 2
    for row in result["rows"]:
        assert (row["reps"], row["n"], row["errors"], row["incomplete"]) == (2, 60, 0, 0)


def tiny_e(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "bench", "--quick", "--scenarios", "e", "--variants", "worker,worker-queue",
        "--concurrency", "1,4", "--requests", "40", "--warmup", "10", "--rates", "none",
        "--target-reps", "0",
        "--no-tls", "--no-profile", "--no-pin", "--no-chart", "--output", str(tmp_path), *extra,
    ]  # fmt: skip


def test_tiny_scenario_e_runs_through_redis_beside_http_and_cleans_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_broker("Redis", REDIS)
    assert bench_main(build_parser().parse_args(tiny_e(tmp_path))) == 0

    table = capsys.readouterr().out
    assert "(e) the (a) event via Redis Streams + reply, vs HTTP" in table
    assert "worker-queue ÷HTTP: p50" in table

    result = orjson.loads((tmp_path / "bench-quick.json").read_bytes())
    rows = {(row["variant"], row["level"]): row for row in result["rows"]}
    assert set(rows) == {(v, lv) for v in ("worker", "worker-queue") for lv in ("c=1", "c=4")}
    for row in rows.values():
        assert (row["scenario"], row["n"], row["errors"], row["incomplete"]) == ("e", 40, 0, 0)
    queue_row = rows[("worker-queue", "c=4")]
    assert set(queue_row["ratios"]) == {"worker"}  # ÷ the same worker over HTTP
    assert set(queue_row["ratios"]["worker"]) == {"p50", "p99", "cpu", "throughput"}
    assert "ratios" not in rows[("worker", "c=1")] or not rows[("worker", "c=1")]["ratios"]
    stream = result["queue"]["stream"]
    if result["queue"]["redis_server_pid"] is not None:
        assert "redis" in queue_row["cpu_util"] and "redis_cpu_us_per_event" in queue_row
    leftovers = redis.Redis(host=REDIS[0], port=REDIS[1])
    try:
        assert list(leftovers.scan_iter(match=f"{stream}*")) == []
    finally:
        leftovers.close()


def test_scenario_e_is_skipped_with_the_reason_when_redis_is_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(tiny_e(tmp_path, "--redis", "redis://127.0.0.1:1/0"))
    assert bench_main(args) == 0

    table = capsys.readouterr().out
    assert "skipped (e) Redis Streams: Redis is not reachable at redis://127.0.0.1:1/0" in table
    result = orjson.loads((tmp_path / "bench-quick.json").read_bytes())
    assert result["rows"] == []
    [skipped] = result["skipped"]
    assert skipped["scenario"] == "e" and "not reachable" in skipped["why"]
