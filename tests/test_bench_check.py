"""``biot-worker bench --check``: its ratios, stored limits and verdicts (the run itself is the
benchmark's, covered by the bench smoke tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.test_bench_report import records_for
from worker.bench.check import (
    CHECK_PLAN,
    CHECKS,
    MARGIN,
    check_plan,
    exit_status,
    judge,
    limits_from,
    load_limits,
    measured,
    store_limits,
)
from worker.bench.plan import QUICK
from worker.bench.report import aggregate


def rows() -> list[dict[str, Any]]:
    """(a) and (b) with the floor at 100 µs/event and the worker at 150 (c=1) or 200 (c=32)."""
    records, samples = [], {}
    for scenario in ("a", "b"):
        records += records_for("floor", [1.0], 0.100, scenario=scenario)
        records += records_for("worker", [1.5], 0.150, scenario=scenario)
        records += records_for("floor", [1.0], 0.100, scenario=scenario, concurrency=32)
        records += records_for("worker", [1.5], 0.200, scenario=scenario, concurrency=32)
        for level in ("c=1", "c=32"):  # latencies in µs, pooled per row
            samples[f"{scenario}|False|floor|{level}"] = [1000.0]
            samples[f"{scenario}|False|worker|{level}"] = [1500.0]
    return aggregate(records, samples)


def test_the_plan_is_a_short_subset_on_fresh_processes() -> None:
    plan = check_plan(QUICK.with_(redis_url="redis://127.0.0.1:6390/0"))
    points = list(plan.points())
    assert {(p.scenario, p.variant) for p in points} == {
        ("a", "floor"), ("a", "worker"), ("b", "floor"), ("b", "worker"),
        ("e", "worker"), ("e", "worker-queue"),
    }  # fmt: skip
    assert not any(p.tls or p.rate is not None for p in points)
    assert plan.fresh_processes and plan.reps == 5 and plan.profile_seconds == 0
    assert plan.redis_url == "redis://127.0.0.1:6390/0"
    assert len(points) * (CHECK_PLAN.max_seconds + CHECK_PLAN.warmup_seconds) < 100


def test_ratios_come_from_the_rows_and_a_missing_row_is_none() -> None:
    found = measured(rows())
    assert found["(a) c=1 CPU/event vs floor"] == pytest.approx(1.5)
    assert found["(a) c=32 CPU/event vs floor"] == pytest.approx(2.0)
    assert found["(a) c=1 p50 vs floor"] == pytest.approx(1.5)
    assert found["(b) c=32 throughput vs floor"] == pytest.approx(1.0)
    assert found["(e) c=32 Redis Streams vs HTTP CPU/event"] is None  # no (e) rows


def test_limits_widen_what_was_measured_in_the_direction_that_is_worse() -> None:
    limits = limits_from({"(a) c=1 CPU/event vs floor": 1.5, "(b) c=32 throughput vs floor": 0.8,
                          "(e) c=32 Redis Streams vs HTTP CPU/event": None})  # fmt: skip
    assert limits == {
        "(a) c=1 CPU/event vs floor": round(1.5 * (1 + MARGIN), 2),
        "(b) c=32 throughput vs floor": round(0.8 * (1 - MARGIN), 2),
    }
    lucky = limits_from({"(b) c=32 throughput vs floor": 1.26})  # the floor was unlucky
    assert lucky == {"(b) c=32 throughput vs floor": round(1 - MARGIN, 2)}


def test_a_ratio_past_its_limit_fails_and_one_not_measured_does_not() -> None:
    limits = {"(a) c=1 CPU/event vs floor": 1.6, "(b) c=32 throughput vs floor": 0.9}
    verdicts = judge(measured(rows()), limits)
    by_name = {v.name: v for v in verdicts}
    assert by_name["(a) c=1 CPU/event vs floor"].ok is True
    assert by_name["(b) c=32 throughput vs floor"].ok is True  # 1.0 >= 0.9
    assert by_name["(a) c=32 CPU/event vs floor"].ok is None  # no limit stored
    assert by_name["(e) c=32 Redis Streams vs HTTP CPU/event"].ok is None  # not measured
    assert exit_status(verdicts) == 0
    assert "  [ok  ] (a) c=1 CPU/event vs floor: 1.50 <= 1.60" in [v.line() for v in verdicts]

    worse = judge(measured(rows()), {**limits, "(a) c=32 CPU/event vs floor": 1.8})
    assert exit_status(worse) == 1
    [failed] = [v for v in worse if v.ok is False]
    assert failed.line() == "  [FAIL] (a) c=32 CPU/event vs floor: 2.00 <= 1.80"
    slower = judge({"(b) c=32 throughput vs floor": 0.5}, limits)
    assert exit_status(slower) == 1  # a throughput ratio fails below its limit


def test_limits_are_stored_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "limits.json"
    stored = store_limits(measured(rows()), {"finished": "now"}, path)
    assert load_limits(path) == stored
    document = json.loads(path.read_text())
    assert document["measured"]["(a) c=32 CPU/event vs floor"] == 2.0
    assert document["run"] == {"finished": "now"}
    assert set(stored) <= {c.name for c in CHECKS}


@pytest.mark.parametrize(
    ("text", "problem"),
    [(None, "no stored limits"), ("{", "is not JSON"), ('{"limits": {"x": "y"}}', "no 'limits'")],
)
def test_unreadable_limits_are_one_clear_line(
    tmp_path: Path, text: str | None, problem: str
) -> None:
    path = tmp_path / "limits.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ValueError, match=problem):
        load_limits(path)


def test_the_limits_shipped_with_the_repository_are_readable() -> None:
    limits = load_limits()
    assert set(limits) <= {c.name for c in CHECKS}
    assert limits, "no limit stored"


def test_store_goes_with_check(capsys: pytest.CaptureFixture[str]) -> None:
    from worker.bench.cli import bench_main
    from worker.cli import build_parser

    assert bench_main(build_parser().parse_args(["bench", "--store"])) == 2
    assert "--store goes with --check" in capsys.readouterr().err
