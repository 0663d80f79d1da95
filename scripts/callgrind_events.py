"""Instructions per event of the worker and of the floor, counted by callgrind: an A/B of a
hot-path change that this shared, noisy machine cannot blur.

Usage::

    .venv/bin/python scripts/callgrind_events.py [--events N] [--warmup N]
        [--points a1,a32,b32] [--candidate PATH] [--only worker,floor,candidate]
        [--annotate N] [--keep DIR] [--json FILE]

What it does: starts one emulator (BioT in a box, natively, as ``biot-worker bench`` does),
builds the bench's events from it (:mod:`worker.bench.payloads`), then for each target in turn
starts it under ``valgrind --tool=callgrind`` and, for each point (scenario and concurrency:
``a1`` is (a) at c=1, ``b32`` is (b) at c=32), drives it with the bench's closed-loop load
generator (:mod:`worker.bench.load`, keep-alive connections kept between phases): ``--warmup``
events, then ``callgrind_control --zero``, then ``--events`` events, then, once every event's
log line is written (the worker's listener thread writes them after the loop hands them over),
``callgrind_control --dump``. The dump's total instruction count (every thread of the process:
the event loop and the log writer) divided by the events the target answered in that phase is
the figure printed. Targets:

- ``worker``: ``python -m worker run`` of this tree, as the bench's worker row (metrics on,
  stdlib log backend, ``worker.bench.scenarios`` routes);
- ``floor``: ``python -m worker.bench.floor`` of this tree (bare aiohttp, no JWT, no log);
- ``quiet``: that worker without its per-event log line (``WORKER_LOG_LEVEL=WARNING``, the
  bench's ``worker-quiet``), run only when named in ``--only``;
- ``nometrics``: that worker with ``WORKER_METRICS=false`` (the bench's ``worker-nometrics``),
  run only when named in ``--only``: what the metrics cost per event;
- ``candidate``: the worker of another tree (``--candidate PATH``, e.g. a worktree of the base
  commit: ``git worktree add /tmp/base <rev>``), run from there with that tree first on
  ``PYTHONPATH``, for the A/B of a change.

Reading the figures: instruction counts do not depend on the machine's load, so two runs of the
same code agree within about 1 % (0.5 % at c=32, 1 % at c=1, with 1000 events a point). They are
not CPU time: the kernel's share (socket reads and writes, epoll, futex wake-ups of the log
thread) is not counted, nor are cache misses; and under callgrind the target runs some 50x
slower, so work that is batched per loop iteration or per timer tick (log hand-over every 10 ms)
is batched less than in real time. Confirm a change that the counts favour with
``biot-worker bench``.

``--annotate N`` prints the top N functions (inclusive) of each worker dump with
``callgrind_annotate``: C functions only (Python code shows as the interpreter's), so use
cProfile to find which Python function costs; ``--keep DIR`` keeps the dumps and the targets'
logs there.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import orjson

ROOT: Final = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: the worker package of this tree
    sys.path.insert(0, str(ROOT))

from worker.bench import procs  # noqa: E402
from worker.bench.httpload import RequestSource, request_template  # noqa: E402
from worker.bench.load import LoadResult, LoadSpec, Pool, closed_loop  # noqa: E402
from worker.bench.payloads import BUILDERS, checker  # noqa: E402
from worker.bench.upstream import Upstream  # noqa: E402

START_TIMEOUT: Final = 300.0  # seconds for a target to listen under callgrind
LOG_TIMEOUT: Final = 120.0  # seconds for the log lines of a phase to be written
API_LATENCY: Final = 0.002  # the bench's default emulator latency
_POINT: Final = re.compile(r"^([a-d])(\d+)$")
_LINE: Final = b'"message":"event handled"'


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    args: list[str]
    env: dict[str, str]
    cwd: Path
    logs_events: bool  # writes one "event handled" line per event


@dataclass(slots=True)
class Running:
    target: Target
    proc: procs.Proc
    out_file: Path
    log_file: Path
    pool: Pool
    answered: int = 0  # events answered so far (all phases)


def parse_points(text: str) -> list[tuple[str, int]]:
    points = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = _POINT.match(part)
        if match is None:
            raise argparse.ArgumentTypeError(f"bad point {part!r}: write e.g. a1, a32, b32")
        points.append((match.group(1), int(match.group(2))))
    return points


def targets(upstream: Upstream, port: int, candidate: Path | None) -> dict[str, Target]:
    env = procs.target_env("worker", port, upstream.url, upstream.identity, None)
    env["PYTHONHASHSEED"] = "0"  # the same dict and set layouts in every run
    made = {
        "worker": Target("worker", ["worker", "run"], procs.child_env(env), ROOT, True),
        "floor": Target(
            "floor",
            procs.target_args("floor", "floor", port, upstream.url),
            procs.child_env(env),
            ROOT,
            False,
        ),
    }
    quiet = procs.child_env({**env, "WORKER_LOG_LEVEL": "WARNING"})
    made["quiet"] = Target("quiet", ["worker", "run"], quiet, ROOT, False)
    nometrics = procs.child_env({**env, "WORKER_METRICS": "false"})
    made["nometrics"] = Target("nometrics", ["worker", "run"], nometrics, ROOT, False)
    if candidate is not None:
        cand_env = procs.child_env(env)
        cand_env["PYTHONPATH"] = str(candidate)
        made["candidate"] = Target("candidate", ["worker", "run"], cand_env, candidate, True)
    return made


async def start(target: Target, port: int, work: Path) -> Running:
    out_file = work / f"{target.name}.callgrind"
    log_file = work / f"{target.name}.log"
    command = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}",
        sys.executable, "-m", *target.args,
    ]  # fmt: skip
    with log_file.open("wb") as out, (work / f"{target.name}.stderr").open("wb") as err:
        process = await asyncio.create_subprocess_exec(
            *command, env=target.env, cwd=target.cwd,
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err,
        )  # fmt: skip
    proc = procs.Proc(target.name, process, port, work / f"{target.name}.stderr")
    try:
        await procs.wait_listening(proc, START_TIMEOUT)
    except BaseException:
        await procs.stop(proc)
        raise
    return Running(target, proc, out_file, log_file, Pool("127.0.0.1", port))


async def control(running: Running, command: str) -> None:
    """``callgrind_control --zero`` or ``--dump`` (vgdb interrupts a target blocked in epoll)."""
    process = await asyncio.create_subprocess_exec(
        "callgrind_control", command, str(running.proc.pid),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await process.communicate()
    if process.returncode != 0 or b"OK" not in output:
        raise RuntimeError(f"callgrind_control {command} failed: {output.decode().strip()}")


async def load(running: Running, scenario: str, concurrency: int, events: int) -> LoadResult:
    source = sources[(running.target.name, scenario)]
    spec = LoadSpec(
        concurrency=concurrency,
        warmup_requests=0,
        warmup_seconds=3600.0,
        max_requests=max(0, events - concurrency),
        max_seconds=3600.0,
        slow_seconds=3600.0,
        drain_seconds=600.0,
    )
    result = await closed_loop(running.pool, source, spec, {}, checker(scenario))
    if result.errors or result.incomplete:
        raise RuntimeError(f"{running.target.name} ({scenario}): errors {dict(result.errors)}, "
                           f"incomplete {result.incomplete}")  # fmt: skip
    running.answered += result.answered
    return result


async def logged(running: Running) -> None:
    """Wait (bounded) until the target's log holds a line for every event answered so far."""
    if not running.target.logs_events:
        return
    deadline = time.monotonic() + LOG_TIMEOUT
    while await asyncio.to_thread(_count_lines, running.log_file) < running.answered:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{running.target.name}: log lines missing after {LOG_TIMEOUT}s")
        await asyncio.sleep(0.2)


def _count_lines(path: Path) -> int:
    return path.read_bytes().count(_LINE)


def total(dump: Path) -> int:
    for line in dump.read_text().splitlines():
        if line.startswith(("totals:", "summary:")) and int(line.split()[1]) > 0:
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


async def measure(
    running: Running, scenario: str, concurrency: int, events: int, warmup: int
) -> tuple[float, Path]:
    await load(running, scenario, concurrency, warmup)
    await logged(running)
    await control(running, "--zero")
    result = await load(running, scenario, concurrency, events)
    await logged(running)
    before = set(running.out_file.parent.glob(running.out_file.name + ".*"))
    await control(running, "--dump")
    dumps = set(running.out_file.parent.glob(running.out_file.name + ".*")) - before
    dump = max(dumps, key=lambda p: int(p.suffix[1:]))
    return total(dump) / result.answered, dump


def annotate(dump: Path, top: int) -> str:
    import subprocess

    output = subprocess.run(  # noqa: S603
        ["callgrind_annotate", "--inclusive=yes", str(dump)],  # noqa: S607
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    lines = [line for line in output.splitlines() if re.match(r"^\s*[\d,]+ ", line)]
    return "\n".join(lines[: top + 1])


sources: dict[tuple[str, str], RequestSource] = {}


async def run(args: argparse.Namespace, work: Path) -> dict[str, dict[str, float]]:
    port = procs.free_port()
    emulator = await procs.spawn(
        "emulator", procs.emulator_args(port, API_LATENCY, None), {}, port, work
    )
    results: dict[str, dict[str, float]] = {}
    try:
        upstream = Upstream(emulator, f"http://127.0.0.1:{port}", None)
        await upstream.load_fixtures()
        names = args.only or ["worker", "floor", "candidate"]
        for name in names:
            if name == "candidate" and args.candidate is None:
                continue
            await run_target(args, upstream, name, work, results)
    finally:
        await procs.stop(emulator)
    return results


async def run_target(
    args: argparse.Namespace,
    upstream: Upstream,
    name: str,
    work: Path,
    results: dict[str, dict[str, float]],
) -> None:
    """Start target ``name`` under callgrind and measure every point on it."""
    assert upstream.fixtures is not None
    port = procs.free_port()
    candidate = await asyncio.to_thread(_resolved, args.candidate)
    target = targets(upstream, port, candidate)[name]
    _say(f"{name}: starting under callgrind")
    running = await start(target, port, work)
    try:
        for scenario in {s for s, _ in args.points}:
            events = BUILDERS[scenario](upstream.fixtures)
            templates = [
                request_template("127.0.0.1", port, f"/{scenario}", e.headers, e.body)
                for e in events
            ]
            sources[(name, scenario)] = RequestSource(templates)
        for scenario, concurrency in args.points:
            per_event, dump = await measure(
                running, scenario, concurrency, args.events, args.warmup
            )
            results.setdefault(f"{scenario}{concurrency}", {})[name] = per_event
            _say(f"{name} ({scenario}) c={concurrency}: {per_event:,.0f} instructions/event")
            if args.annotate and name != "floor":
                _say(annotate(dump, args.annotate))
    finally:
        running.pool.close()
        await procs.stop(running.proc, timeout=120.0)


def _resolved(path: str | None) -> Path | None:
    return Path(path).resolve() if path else None


def table(results: dict[str, dict[str, float]]) -> str:
    """Instructions per event of each target, each divided by the floor's, and the worker's
    divided by the candidate's (the A/B)."""
    names = [n for n in ("floor", "worker", "quiet", "nometrics", "candidate")
             if any(n in figures for figures in results.values())]  # fmt: skip
    head = ["point  "] + [f"{n:>11}" for n in names]
    head += [f"{n + '/floor':>16}" for n in names if n != "floor"]
    if "candidate" in names and "worker" in names:
        head.append(f"{'worker/candidate':>17}")
    rows = [" ".join(head)]
    for key, figures in results.items():
        floor = figures.get("floor")
        cells = [f"{key:<7}"] + [_n(figures.get(n)) for n in names]
        cells += [f"{_r(figures.get(n), floor):>16}" for n in names if n != "floor"]
        if "candidate" in names and "worker" in names:
            cells.append(f"{_r(figures.get('worker'), figures.get('candidate')):>17}")
        rows.append(" ".join(cells))
    return "\n".join(rows)


def _n(value: float | None) -> str:
    return f"{value:>11,.0f}" if value is not None else f"{'-':>11}"


def _r(value: float | None, base: float | None) -> str:
    return f"{value / base:.3f}x" if value is not None and base else "-"


def _say(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/callgrind_events.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--events", type=int, default=2000, help="events measured per point")
    parser.add_argument("--warmup", type=int, default=300, help="events before each point")
    parser.add_argument("--points", type=parse_points, default=parse_points("a1,a32,b32"))
    parser.add_argument("--candidate", help="another tree whose worker is measured too")
    parser.add_argument("--only", type=lambda t: [p.strip() for p in t.split(",") if p.strip()],
                        help="targets to run: worker,floor,candidate,quiet,nometrics")  # fmt: skip
    parser.add_argument("--annotate", type=int, default=0, help="top N functions per dump")
    parser.add_argument("--keep", help="keep the dumps and logs in this directory")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        parser.error("valgrind (with callgrind_control) is not installed")
    if args.keep:
        work = Path(args.keep).resolve()
        work.mkdir(parents=True, exist_ok=True)
        results = asyncio.run(run(args, work))
    else:
        with tempfile.TemporaryDirectory(prefix="callgrind-events-") as tmp:
            results = asyncio.run(run(args, Path(tmp)))
    sys.stdout.write(table(results) + "\n")
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
