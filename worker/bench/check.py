"""``biot-worker bench --check``: the regression guard to run before a change to the hot path.

A short subset of the benchmark (the floor and the worker in (a) and (b) at c=1 and c=32, and
the worker over Redis Streams beside it in (e) when Redis answers; five interleaved
repetitions, each on new processes), whose ratios to the floor are compared with
the limits stored in ``check_limits.json`` beside this module. Exit status 0 when every measured
ratio is within its limit, 1 when one is worse (each check is printed with its figure and its
limit), 2 when the run itself failed.

The limits are regression thresholds, not the issue's targets: each is the ratio measured when
it was stored, plus the margin these noisy 2-vCPU machines need (two processes of the same code
measure 10-20 % apart, and each repetition is a new pair), so that a real regression of a few
tens of µs per event fails and noise does not; a throughput ratio above 1 is stored as 1.
``--check --store`` measures and writes the limits anew (after a change that is meant to move
them, with its A/B in the commit). It runs in about a minute
(five repetitions of twelve short points).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from worker.bench.plan import QUICK, Plan
from worker.bench.report import figure, find
from worker.bench.stats import ratio

LIMITS_FILE: Final = Path(__file__).with_name("check_limits.json")
#: How much worse than the stored ratio a run may measure before it fails (see the docstring).
MARGIN: Final = 0.30

#: The subset measured: short points, three repetitions, the worker on new processes each time.
CHECK_PLAN: Final = QUICK.with_(
    mode="check",
    scenarios=("a", "b", "e"),
    tls_scenarios=(),
    variants=("floor", "worker", "worker-queue"),
    concurrency=(1, 32),
    rates=(),
    open_scenarios=(),
    reps=5,
    paired_reps=0,
    target_reps=0,
    fresh_processes=True,
    max_requests=2000,
    max_seconds=0.8,
    profile_seconds=0.0,
    memory_seconds=0.0,
)


@dataclass(frozen=True, slots=True)
class Check:
    """One ratio: ``top / bottom`` of ``figure`` in ``scenario`` at ``level``; ``higher`` when
    a larger ratio is better (throughput), so the limit is a floor rather than a ceiling."""

    name: str
    scenario: str
    level: str
    top: str
    bottom: str
    figure: str
    higher: bool = False


CHECKS: Final = (
    Check("(a) c=1 CPU/event vs floor", "a", "c=1", "worker", "floor", "cpu"),
    Check("(a) c=1 p50 vs floor", "a", "c=1", "worker", "floor", "p50"),
    Check("(a) c=32 CPU/event vs floor", "a", "c=32", "worker", "floor", "cpu"),
    Check("(b) c=32 CPU/event vs floor", "b", "c=32", "worker", "floor", "cpu"),
    Check("(b) c=32 throughput vs floor", "b", "c=32", "worker", "floor", "throughput", True),
    Check("(e) c=32 Redis Streams vs HTTP CPU/event", "e", "c=32", "worker-queue", "worker",
          "cpu"),
)  # fmt: skip


def measured(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Each check's ratio in ``rows`` (``None``: a row is missing, e.g. (e) without Redis)."""
    found: dict[str, float | None] = {}
    for check in CHECKS:
        top = find(list(rows), check.scenario, False, check.level, check.top)
        bottom = find(list(rows), check.scenario, False, check.level, check.bottom)
        found[check.name] = (
            ratio(figure(top, check.figure), figure(bottom, check.figure))
            if top and bottom
            else None
        )
    return found


def load_limits(path: Path = LIMITS_FILE) -> dict[str, float]:
    """The stored limits; ``ValueError`` (one line) when the file is missing or malformed."""
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(
            f"no stored limits at {path}: run 'biot-worker bench --check --store'"
        ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    limits = stored.get("limits") if isinstance(stored, dict) else None
    if not isinstance(limits, dict) or not all(
        isinstance(v, int | float) for v in limits.values()
    ):
        raise ValueError(f"{path} has no 'limits' object of numbers")
    return {str(k): float(v) for k, v in limits.items()}


def limits_from(ratios: Mapping[str, float | None], margin: float = MARGIN) -> dict[str, float]:
    """The limits to store for ``ratios`` just measured: each widened by ``margin``."""
    limits = {}
    for check in CHECKS:
        value = ratios.get(check.name)
        if value is None:
            continue
        if check.higher:  # beating the floor's throughput is the floor's bad luck: not a bar
            limits[check.name] = round(min(value, 1.0) * (1 - margin), 2)
        else:
            limits[check.name] = round(value * (1 + margin), 2)
    return limits


def store_limits(
    ratios: Mapping[str, float | None], run: Mapping[str, Any], path: Path = LIMITS_FILE
) -> dict[str, float]:
    limits = limits_from(ratios)
    document = {
        "about": "biot-worker bench --check: ratio limits (measured + margin); "
        "rewrite with 'biot-worker bench --check --store'",
        "margin": MARGIN,
        "measured": {k: None if v is None else round(v, 3) for k, v in ratios.items()},
        "run": dict(run),
        "limits": limits,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    return limits


@dataclass(frozen=True, slots=True)
class Verdict:
    name: str
    value: float | None
    limit: float | None
    higher: bool

    @property
    def ok(self) -> bool | None:
        """True within the limit, False past it, None when not measured or no limit stored."""
        if self.value is None or self.limit is None:
            return None
        return self.value >= self.limit if self.higher else self.value <= self.limit

    def line(self) -> str:
        state = {True: "ok  ", False: "FAIL", None: "n/a "}[self.ok]
        sign = ">=" if self.higher else "<="
        value = "-" if self.value is None else f"{self.value:.2f}"
        limit = "(no limit stored)" if self.limit is None else f"{sign} {self.limit:.2f}"
        return f"  [{state}] {self.name}: {value} {limit}"


def judge(ratios: Mapping[str, float | None], limits: Mapping[str, float]) -> list[Verdict]:
    return [
        Verdict(c.name, ratios.get(c.name), limits.get(c.name), c.higher) for c in CHECKS
    ]


def exit_status(verdicts: Sequence[Verdict]) -> int:
    """1 when a measured ratio is past its limit, else 0 (a check not measured is said, not
    failed: (e) needs Redis)."""
    return 1 if any(v.ok is False for v in verdicts) else 0


def check_plan(plan: Plan | None = None) -> Plan:
    """The plan ``--check`` runs (``plan``'s Redis URL and API latency kept)."""
    if plan is None:
        return CHECK_PLAN
    return CHECK_PLAN.with_(redis_url=plan.redis_url, api_latency=plan.api_latency)
