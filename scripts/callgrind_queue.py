"""Instructions per event of the worker on the queue path, beside the same worker over HTTP.

Scenario (e) of ``biot-worker bench`` compares the CPU per event of a worker consuming Redis
Streams (the (a) event, answered on a reply stream) with the same worker answering (a) over
HTTP. On these shared VMs a timed run moves by 10-20 % between processes; callgrind's instruction
counts do not depend on the machine's noise, so an A/B of a change to the queue path reads them:

    .venv/bin/python scripts/callgrind_queue.py                 # both paths, c=1 and c=32
    .venv/bin/python scripts/callgrind_queue.py --modes queue --levels 32 --events 3000
    .venv/bin/python scripts/callgrind_queue.py --tool cprofile  # where the time goes (pstats)
    .venv/bin/python scripts/callgrind_queue.py --tool none      # CPU µs/event, no valgrind

One emulator (BioT in a box, for the JWT key) and, per mode, one worker process
(``python -m worker run``, with ``--source redis://...`` for the queue mode) under the tool; at
each concurrency level ``--warmup`` events, then the counters are zeroed
(``callgrind_control -z``), ``--events`` events are sent (``c`` senders, one event in flight
each: the bench's closed loop), and the counters are dumped (``callgrind_control -d``).
Instructions per event = the dump's total / events. Under valgrind the worker runs ~50x slower
while Redis and the load generator do not, so at c=32 its reads find fuller batches than in a
timed run; read c=32 as the saturated case. The stream (and every key named after it) is
deleted at the end, the processes stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.bench import procs, procstat
from worker.bench.httpload import RequestSource, request_template
from worker.bench.load import Pool
from worker.bench.payloads import checker, events_a
from worker.bench.queue_hook import ChannelPool, QueueRun
from worker.bench.redisload import envelope_template
from worker.bench.upstream import Upstream

_REPLY_WAIT = 120.0  # seconds for one reply, even under valgrind
_TOTALS = re.compile(rb"^(?:summary|totals):\s*(\d+)", re.MULTILINE)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="queue,http", help="queue,http [both]")
    parser.add_argument("--levels", default="1,32", help="concurrency levels [1,32]")
    parser.add_argument("--events", type=int, default=2000, help="events measured per level")
    parser.add_argument("--warmup", type=int, default=300, help="events before each level")
    parser.add_argument("--tool", choices=("callgrind", "cprofile", "none"), default="callgrind")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--out", default="", help="keep dumps/profiles here [a temp dir]")
    parser.add_argument("--preload", default="", help="a module the targets import first "
                        "(e.g. one replacing the dispatcher, to measure an adapter alone)")
    return parser


class Target:
    """One worker process under the tool, and how to send it events."""

    def __init__(
        self, mode: str, proc: procs.Proc, pool: Pool | ChannelPool, redis_pid: int | None = None
    ) -> None:
        self.mode, self.proc, self.pool, self.redis_pid = mode, proc, pool, redis_pid
        self.dumps = 0

    async def control(self, tool: str, *flags: str) -> None:
        """``callgrind_control FLAGS PID`` (it waits until the process answered)."""
        if tool != "callgrind":
            return
        child = await asyncio.create_subprocess_exec(
            "callgrind_control", *flags, str(self.proc.pid),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"callgrind_control {flags} failed: {err.decode()[-500:]}")


def _command(tool: str, out: Path, mode: str, args: list[str], preload: str) -> list[str]:
    """The ``python -m`` argument list of a target under ``tool`` (procs.launch adds python)."""
    here = ["scripts.callgrind_queue", "--preload-then", preload] if preload else []
    if tool == "cprofile":  # CPU time, not wall time: waiting in epoll costs nothing
        return ["scripts.callgrind_queue", "--profile-to", str(out / f"{mode}.pstats"),
                *here, *args]  # fmt: skip
    return [*here, *args] if here else args


def _profile(path: str, args: list[str]) -> None:
    """Run ``python -m ARGS`` under cProfile on the process's CPU clock; stats to ``path``."""
    import cProfile

    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    try:
        _run_module(args)
    finally:
        profiler.disable()
        profiler.dump_stats(path)


def _run_module(args: list[str]) -> None:
    """``python -m ARGS`` in this process (``--preload-then MODULE`` imports MODULE first)."""
    import importlib
    import runpy

    if args[:1] == ["scripts.callgrind_queue"] and args[1:2] == ["--preload-then"]:
        importlib.import_module(args[2])
        args = args[3:]
    sys.argv = [args[0], *args[1:]]
    runpy.run_module(args[0], run_name="__main__", alter_sys=True)


async def _launch(
    tool: str, out: Path, mode: str, args: list[str], env: dict[str, str], preload: str
) -> procs.Proc:
    """``python -m ARGS`` under ``tool``: valgrind wraps the interpreter itself."""
    command = _command(tool, out, mode, args, preload)
    if tool != "callgrind":
        return await procs.launch(mode, command, env, 0, out)
    valgrind = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no",
        f"--callgrind-out-file={out / f'{mode}.callgrind'}", sys.executable, "-m", *command,
    ]  # fmt: skip
    stdout, stderr = (out / f"{mode}.log").open("wb"), (out / f"{mode}.stderr").open("wb")
    try:
        process = await asyncio.create_subprocess_exec(
            *valgrind, env=procs.child_env(env), cwd=procs.REPO_ROOT,
            stdin=asyncio.subprocess.DEVNULL, stdout=stdout, stderr=stderr,
        )  # fmt: skip
    finally:
        stdout.close()
        stderr.close()
    return procs.Proc(mode, process, 0, out / f"{mode}.stderr")


async def _start(
    mode: str, tool: str, out: Path, upstream: Upstream, queue: QueueRun | None, preload: str
) -> Target:
    port = procs.free_port()
    kind = "queue" if mode == "queue" else "worker"
    source = queue.worker_url() if queue is not None else None
    args = procs.target_args(kind, "worker-queue" if queue else "worker", port, upstream.url,
                             source)  # fmt: skip
    env = procs.target_env("worker", port, upstream.url, upstream.identity, None)
    proc = await _launch(tool, out, mode, args, env, preload)
    proc.port = port
    if queue is not None:
        await queue.wait_consuming(proc, timeout=600.0)
        return Target(mode, proc, queue.pool(), queue.redis_pid)
    await procs.wait_listening(proc, timeout=600.0)
    return Target(mode, proc, Pool("127.0.0.1", port))


async def _send(target: Target, source: RequestSource, concurrency: int, events: int) -> None:
    check = checker("a")
    channels = await target.pool.take(concurrency)
    counts = [events // concurrency + (i < events % concurrency) for i in range(concurrency)]

    async def one(channel: Any, n: int) -> None:
        for i in range(n):
            async with asyncio.timeout(_REPLY_WAIT):  # a message that gets no reply stops it
                reply = await channel.send(source.next())
            problem = check(reply, i == 0)
            if problem:
                raise RuntimeError(f"{target.mode}: {problem}")

    try:
        async with asyncio.TaskGroup() as group:
            for channel, n in zip(channels, counts, strict=True):
                group.create_task(one(channel, n))
    finally:
        target.pool.give(channels)


def _user_system(pid: int) -> tuple[int, int]:
    """The process's user and system CPU so far, in clock ticks (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]), int(fields[12])


def _dump_total(path: Path) -> int:
    match = _TOTALS.search(path.read_bytes())
    if match is None:
        raise RuntimeError(f"no totals in {path}")
    return int(match.group(1))


async def _measure(
    target: Target, tool: str, out: Path, source: RequestSource, level: int, n: int, warm: int
) -> str:
    await _send(target, source, level, warm)
    await target.control(tool, "-z")
    redis = target.redis_pid
    ticks = _user_system(target.proc.pid)
    before = procstat.cpu_seconds(target.proc.pid)
    redis_before = procstat.cpu_seconds(redis) if redis else 0.0
    started = time.perf_counter()
    await _send(target, source, level, n)
    wall = time.perf_counter() - started
    cpu = procstat.cpu_seconds(target.proc.pid) - before
    user, system = (b - a for a, b in zip(ticks, _user_system(target.proc.pid), strict=True))
    redis_cpu = procstat.cpu_seconds(redis) - redis_before if redis else None
    await target.control(tool, "-d")
    figure = f"{target.mode:5} c={level:<3} {n} events in {wall:.1f} s"
    if redis_cpu is not None:  # the shared server: other clients' commands count too
        figure += f"  redis-server {redis_cpu / n * 1e6:.0f} µs/event"
    if tool != "callgrind":
        share = f"{100 * system / (user + system):.0f} % in the kernel" if user + system else ""
        return f"{figure}  cpu {cpu / n * 1e6:.0f} µs/event ({share})"
    target.dumps += 1
    total = _dump_total(out / f"{target.mode}.callgrind.{target.dumps}")
    return f"{figure}  {total / n:,.0f} instructions/event"


async def _serve(
    mode: str, options: argparse.Namespace, out: Path, upstream: Upstream, levels: Sequence[int]
) -> list[str]:
    assert upstream.fixtures is not None
    events = events_a(upstream.fixtures)
    queue = await QueueRun.open(options.redis) if mode == "queue" else None
    lines: list[str] = []
    try:
        target = await _start(mode, options.tool, out, upstream, queue, options.preload)
        try:
            if mode == "queue":
                templates = [envelope_template(e.headers, e.body) for e in events]
            else:
                port = target.proc.port
                templates = [request_template("127.0.0.1", port, "/a", e.headers, e.body)
                             for e in events]  # fmt: skip
            source = RequestSource(templates)
            await target.control(options.tool, "-i", "on")
            for level in levels:
                lines.append(await _measure(target, options.tool, out, source, level,
                                            options.events, options.warmup))  # fmt: skip
                print(lines[-1], flush=True)  # noqa: T201
        finally:
            target.pool.close()
            await procs.stop(target.proc, timeout=120.0)
    finally:
        if queue is not None:
            await queue.cleanup()
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--profile-to"]:  # the target side of --tool cprofile
        _profile(argv[1], argv[2:])
        return 0
    if argv[:1] == ["--preload-then"]:  # the target side of --preload
        _run_module(["scripts.callgrind_queue", *argv])
        return 0
    options = _parser().parse_args(argv)
    if options.tool == "callgrind" and shutil.which("callgrind_control") is None:
        sys.stderr.write("valgrind (callgrind_control) is not installed\n")
        return 2
    out = Path(options.out or tempfile.mkdtemp(prefix="callgrind-queue-"))
    out.mkdir(parents=True, exist_ok=True)
    return asyncio.run(_run(options, out))


async def _run(options: argparse.Namespace, out: Path) -> int:
    levels = [int(level) for level in options.levels.split(",") if level]
    port = procs.free_port()
    emulator = await procs.spawn("emulator", procs.emulator_args(port, 0.0, None), {}, port, out)
    try:
        upstream = Upstream(emulator, f"http://127.0.0.1:{port}", None)
        await upstream.load_fixtures()
        for mode in (m for m in options.modes.split(",") if m):
            await _serve(mode, options, out, upstream, levels)
    finally:
        await procs.stop(emulator)
    print(f"output in {out}", flush=True)  # noqa: T201
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
