"""The whole orchestrator end to end in a tiny mode: real emulator, worker and floor processes,
the load generator, the table and the JSON. Only the output's shape is checked: performance is
reported by ``biot-worker bench``, never asserted in tests."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from worker.__main__ import build_parser
from worker.bench.cli import bench_main


def test_tiny_bench_run_writes_the_table_and_the_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args([
        "bench", "--quick", "--scenarios", "a", "--variants", "floor,worker",
        "--concurrency", "1", "--requests", "50", "--warmup", "10", "--rates", "none",
        "--no-tls", "--no-profile", "--no-pin", "--no-chart",
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
        assert row["n"] == 50
        assert set(row["latency_ms"]) == {"p50", "p90", "p99", "p99.9", "mean", "max"}
        assert row["throughput"] > 0
        assert set(row["cpu_util"]) == {"target", "emulator", "loadgen"}
    assert set(rows["worker"]["ratios"]["floor"]) == {"p50", "p99", "cpu", "throughput"}
    assert {t["target"] for t in result["targets"]} >= {"(a) c=1 p50 vs floor"}
