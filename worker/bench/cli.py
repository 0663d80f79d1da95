"""``biot-worker bench``: interceptor latency of the worker, side by side with the floor and
BioT's two Lambda styles, measured over loopback HTTP against the emulator; scenario (e) puts
the (a) event through Redis Streams with a reply (``--redis``), beside the worker over HTTP.

``biot-worker bench --quick`` (about 5 minutes on 2 cores: every scenario at c=1 and c=32,
one open-loop rate, the rows the targets divide measured 5 times) or ``biot-worker bench``
(the full run: c=1/8/32/128, two open-loop rates, 3 interleaved repetitions and 2 more of the
rows the targets divide, fresh-JWT, memory and profile).
Both print the table and write the JSON and, with matplotlib installed, the PNG chart.
Performance is reported, never asserted: the exit code is 0 whatever the figures, 1 only when
the run itself failed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

# Only the plan (plain data) is imported here, so that building the CLI's parser loads no load
# client, broker client or chart library; the rest is imported when a benchmark runs.
from worker.bench.plan import FULL, QUICK, SCENARIOS, VARIANTS, Plan


def _csv(kind: type, choices: Any = None) -> Any:
    def parse(text: str) -> tuple[Any, ...]:
        if text.strip().lower() == "none":
            return ()
        values = tuple(kind(part.strip()) for part in text.split(",") if part.strip())
        bad = [v for v in values if choices is not None and v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {sorted(choices)}")
        return values

    return parse


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--quick", action="store_true", help="a short run (about 5 minutes on 2 cores)")
    add("--scenarios", type=_csv(str, SCENARIOS), help="subset of a,b,c,d,e")
    add("--variants", type=_csv(str, VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    add("--concurrency", type=_csv(int), help="closed-loop levels, e.g. 1,8,32,128")
    add("--rates", type=_csv(float), help="open-loop events/s, e.g. 200,1000 (none: no open loop)")
    add("--open-scenarios", type=_csv(str, SCENARIOS), help="scenarios also run open-loop")
    add("--no-tls", action="store_true", help="skip (b) and (c) with the API over HTTPS")
    add(
        "--redis",
        metavar="URL",
        help="the Redis of scenario (e), redis://HOST:PORT/DB [redis://127.0.0.1:6379/0]; "
        "(e) is reported as skipped when it cannot be reached",
    )
    add("--reps", type=int, help="interleaved repetitions")
    add(
        "--paired-reps",
        type=int,
        help="extra adjacent measurements of worker and worker-nometrics in (a) at each "
        "closed-loop level, after the repetitions, for the metrics' cost [4]",
    )
    add(
        "--target-reps",
        type=int,
        help="extra measurements of the rows the targets divide (floor and worker in (a) and "
        "(b), worker and worker-queue in (e)) at each closed-loop level, after the repetitions, "
        "alternating which goes first; they count in those rows [quick: 4, full: 2]",
    )
    add("--requests", type=int, help="most events measured per point")
    add("--seconds", type=float, help="most seconds measured per point")
    add("--warmup", type=int, help="events excluded at the start of each point (at least 2c)")
    add("--api-latency", type=float, help="seconds the emulator adds to each API call [0.002]")
    add("--no-profile", action="store_true", help="skip the cProfile summary of (a) and (b)")
    add("--memory-seconds", type=float, help="RSS check length at c=128 (0: skip) [full: 60]")
    add("--uvloop", action="store_true", help="also run the worker on uvloop (if installed)")
    add(
        "--candidate",
        metavar="MODULE",
        help="also run the worker with MODULE imported first (A/B a hot-path change; "
        "MODULE must be importable, e.g. via PYTHONPATH)",
    )
    add("--no-pin", action="store_true", help="do not pin processes to CPUs")
    add(
        "--fresh-processes",
        action="store_true",
        help="start new target processes (HTTP) at each repetition: two processes of the same "
        "code were seen 15-20 %% apart in CPU per event here, so a small difference (what "
        "metrics cost) needs several processes per variant (with --reps)",
    )
    add(
        "--busy-cpus",
        action="store_true",
        help="keep both vCPUs out of idle with SCHED_IDLE spinners, removing this VM's 2-5 ms "
        "wake-up stalls from low-load tails (perf-limits' c=1s rows); off by default: with "
        "other load on the machine the spinners were seen to cost the targets throughput",
    )
    add("--output", default="bench-results", help="directory for the JSON and PNG")
    add("--no-chart", action="store_true", help="do not draw the PNG")
    add("--samples", action="store_true", help="also write every latency sample to the JSON")
    add("--keep-logs", action="store_true", help="keep the processes' logs (path printed)")
    add(
        "--check",
        action="store_true",
        help="the regression guard (about a minute): a short subset whose ratios to the floor "
        "are compared with the stored limits (worker/bench/check_limits.json); exit 1 when one "
        "is worse",
    )
    add(
        "--store",
        action="store_true",
        help="with --check: measure and store the ratios (plus the margin) as the new limits",
    )


def plan_from(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else FULL
    changes: dict[str, Any] = {}
    for name, field in (
        ("scenarios", "scenarios"), ("concurrency", "concurrency"), ("rates", "rates"),
        ("open_scenarios", "open_scenarios"), ("reps", "reps"), ("requests", "max_requests"),
        ("seconds", "max_seconds"), ("warmup", "warmup_requests"),
        ("api_latency", "api_latency"), ("memory_seconds", "memory_seconds"),
        ("redis", "redis_url"), ("paired_reps", "paired_reps"), ("target_reps", "target_reps"),
    ):  # fmt: skip
        if getattr(args, name, None) is not None:
            changes[field] = getattr(args, name)
    variants = list(args.variants or plan.variants)
    if args.uvloop and importlib.util.find_spec("uvloop") and "worker-uvloop" not in variants:
        variants.append("worker-uvloop")
    variants = _installed(variants)
    if args.candidate:
        changes["candidate"] = args.candidate
        if "worker-candidate" not in variants:
            variants.append("worker-candidate")
    elif "worker-candidate" in variants:
        variants.remove("worker-candidate")
    changes["variants"] = tuple(variants)
    if args.no_tls:
        changes["tls_scenarios"] = ()
    if args.no_profile:
        changes["profile_seconds"] = 0.0
    if args.no_pin:
        changes["pin"] = False
    if args.busy_cpus:
        changes["busy_cpus"] = True
    if args.fresh_processes:
        changes["fresh_processes"] = True
    return plan.with_(**changes)


def _installed(variants: list[str]) -> list[str]:
    """``variants`` without those whose optional extra is missing (said on stderr)."""
    if importlib.util.find_spec("requests") is None and {"docs", "sample"} & set(variants):
        sys.stderr.write("biot-worker bench: requests is not installed, so the baselines (ii) "
                         "and (iii) are left out (pip install 'biot-worker[bench]')\n")  # fmt: skip
        variants = [v for v in variants if v not in ("docs", "sample")]
    if "worker-otel" in variants and not _otel_installed():
        sys.stderr.write("biot-worker bench: OpenTelemetry is not installed, so the worker-otel "
                         "rows are left out (pip install 'biot-worker[otel]')\n")  # fmt: skip
        variants = [v for v in variants if v != "worker-otel"]
    for peer, names in PEER_PACKAGES.items():
        missing = [name for name in names if importlib.util.find_spec(name) is None]
        if peer in variants and missing:
            sys.stderr.write(
                f"biot-worker bench: {', '.join(missing)} not installed, so "
                f"the {peer} rows are left out (pip install 'biot-worker[bench]')\n"
            )
            variants = [v for v in variants if v != peer]
    return variants


#: The packages each peer (worker.bench.peers) imports.
PEER_PACKAGES = {
    "fastapi": ("fastapi", "uvicorn", "httpx2", "pydantic_settings"),
    "faststream": ("faststream", "redis", "httpx2", "pydantic_settings"),
}


def _otel_installed() -> bool:
    """The otel extra: the SDK the worker exports with, and the protobuf messages the stand-in
    collector reads."""
    names = ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http", "opentelemetry.proto")
    try:
        return all(importlib.util.find_spec(name) is not None for name in names)
    except ModuleNotFoundError:  # a parent package is missing
        return False


def bench_main(args: argparse.Namespace) -> int:
    if getattr(args, "check", False):
        return check_main(args)
    if getattr(args, "store", False):
        sys.stderr.write("biot-worker bench: --store goes with --check\n")
        return 2
    plan = plan_from(args)
    started = time.monotonic()
    progress = _progress(started)

    from worker.bench.table import render

    measured = _measure_in_new_dir(plan, progress)
    if measured is None:
        return 1
    raw, pinning, run_dir = measured
    result = build_result(plan, raw, pinning, time.monotonic() - started)
    sys.stdout.write(render(result) + "\n")
    write_outputs(result, raw, args, progress)
    if args.keep_logs:
        progress(f"process logs kept in {run_dir}")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


def check_main(args: argparse.Namespace) -> int:
    """``--check``: measure the guard's subset, then judge it against the stored limits (or,
    with ``--store``, write them); see :mod:`worker.bench.check`."""
    from worker.bench import check
    from worker.bench.report import aggregate

    limits: dict[str, float] = {}
    if not args.store:
        try:  # an unreadable file is said before a minute is spent measuring
            limits = check.load_limits()
        except ValueError as exc:
            sys.stderr.write(f"biot-worker bench --check: {exc}\n")
            return 2
    plan = check.check_plan(plan_from(args))
    started = time.monotonic()
    measured = _measure_in_new_dir(plan, _progress(started))
    if measured is None:
        return 2
    raw, pinning, run_dir = measured
    shutil.rmtree(run_dir, ignore_errors=True)
    rows = aggregate(raw["points"], raw["samples"])
    failures = sum(r["errors"] + r["incomplete"] for r in rows)
    ratios = check.measured(rows)
    elapsed = round(time.monotonic() - started, 1)
    if args.store:
        run = {"finished": datetime.now(UTC).isoformat(timespec="seconds"),
               "elapsed_s": elapsed, "pinning": pinning}  # fmt: skip
        stored = check.store_limits(ratios, run)
        lines = [f"  {name}: measured {ratios[name]:.2f}, limit {limit:.2f}"
                 for name, limit in stored.items()]  # fmt: skip
        sys.stdout.write(f"stored {len(stored)} limits in {check.LIMITS_FILE}:\n"
                         + "\n".join(lines) + "\n")  # fmt: skip
        return 0 if failures == 0 else 1
    verdicts = check.judge(ratios, limits)
    status = check.exit_status(verdicts)
    lines = [v.line() for v in verdicts]
    if failures:
        lines.append(f"  [FAIL] errors + incomplete events: {failures}")
        status = 1
    verdict = "passed" if status == 0 else "FAILED"
    sys.stdout.write(f"bench --check {verdict} ({elapsed:.0f} s, pinning {pinning}):\n"
                     + "\n".join(lines) + "\n")  # fmt: skip
    return status


def _progress(started: float) -> Callable[[str], None]:
    """A progress line on stderr, stamped with the seconds since ``started``."""

    def progress(line: str) -> None:
        sys.stderr.write(f"[{time.monotonic() - started:6.1f}s] {line}\n")
        sys.stderr.flush()

    return progress


def _measure_in_new_dir(
    plan: Plan, progress: Callable[[str], None]
) -> tuple[dict[str, Any], str, Path] | None:
    """The plan measured with its process logs in a new directory: the raw results, the
    pinning and that directory; ``None`` (said on ``progress``, the logs kept) when it failed."""
    run_dir = Path(tempfile.mkdtemp(prefix="biot-bench-"))
    try:
        raw, pinning = asyncio.run(_measure(plan, run_dir, progress))
    except (RuntimeError, OSError) as exc:
        progress(f"bench failed: {exc} (process logs kept in {run_dir})")
        return None
    return raw, pinning, run_dir


async def _measure(plan: Plan, run_dir: Path, progress: Any) -> tuple[dict[str, Any], str]:
    from worker.bench.orchestrate import Bench

    async with Bench(plan, run_dir, progress) as bench:
        pinning = "targets CPU0, emulators + load CPU1" if bench.cpus else "off"
        if bench.spinners:
            pinning += ", vCPUs kept busy (SCHED_IDLE)"
        return await bench.run(), pinning


def build_result(plan: Plan, raw: dict[str, Any], pinning: str, elapsed: float) -> dict[str, Any]:
    from worker.bench.report import aggregate, log_backends, metrics_rows, targets

    rows = aggregate(raw["points"], raw["samples"])
    paired = metrics_rows(raw["points"], raw["samples"])
    memory = raw.get("memory")
    return {
        "meta": {
            "mode": plan.mode,
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "elapsed_s": round(elapsed, 1),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "api_latency_ms": plan.api_latency * 1000,
            "pinning": pinning,
            "load_client": "raw asyncio HTTP/1.1 keep-alive (worker.bench.httpload)",
            "cpu_source": "the process CPU-time clock (clock_gettime, ns)",
            "uvloop": _uvloop_state(plan),
            "otel": "worker-otel rows export to a stand-in OTLP/HTTP collector on loopback "
            "(worker.testing.otlp, counting spans), OpenTelemetry's default batch settings",
        },
        "plan": {k: getattr(plan, k) for k in plan.__dataclass_fields__},
        "rows": rows,
        "targets": targets(rows, memory, paired),
        "log_backends": log_backends(rows),
        "observability": _observability(plan, rows, raw.get("profiles"), paired),
        "memory": memory,
        "profiles": raw.get("profiles"),
        "queue": raw.get("queue"),
        "skipped": raw.get("skipped", []),
        "points": raw["points"],
    }


def _observability(
    plan: Plan,
    rows: list[dict[str, Any]],
    profiles: dict[str, Any] | None,
    metrics: list[dict[str, Any]],
) -> dict[str, Any] | None:
    from worker.bench.report import observability

    section = observability(rows, profiles, metrics)
    if section is not None:  # how many processes each variant's figures come from
        section["processes_per_variant"] = plan.reps if plan.fresh_processes else 1
        paired = [p for p in plan.points() if p.pair >= 0]
        # The metrics' pair in (a): the main repetitions' processes plus one per extra pair.
        pairs = len({p.pair for p in paired})
        section["metrics_processes"] = section["processes_per_variant"] + pairs
    return section


def _uvloop_state(plan: Plan) -> str:
    if "worker-uvloop" in plan.variants:
        return "measured (worker-uvloop rows)"
    if importlib.util.find_spec("uvloop") is None:
        return "not installed: not measured (pip install 'biot-worker[uvloop]', then --uvloop)"
    return "installed, not asked for (--uvloop)"


def write_outputs(
    result: dict[str, Any], raw: dict[str, Any], args: argparse.Namespace, progress: Any
) -> None:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench-{result['meta']['mode']}"
    body = {**result, "samples_us": raw["samples"]} if args.samples else result
    json_path = stem.with_suffix(".json")
    json_path.write_bytes(orjson.dumps(body, option=orjson.OPT_INDENT_2))
    progress(f"wrote {json_path}")
    if args.no_chart:
        return
    from worker.bench import chart

    if not chart.available():
        progress("no chart: matplotlib is not installed (pip install 'biot-worker[bench]')")
        return
    png_path = stem.with_suffix(".png")
    chart.draw(result["rows"], str(png_path))
    progress(f"wrote {png_path}")
