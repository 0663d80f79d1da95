"""Processes for the end-to-end deployment test (:mod:`tests.test_e2e_deploy`).

The ``biot-worker`` CLI and ``biot-worker run`` run as real processes from a plugin team's folder
(their working directory, so ``WORKER_ROUTES`` names a module there), with the environment given
and nothing else of the test's ``BIOT_*``/``WORKER_*`` variables. Each one dies with the test
process (``PR_SET_PDEATHSIG``) and is killed and reaped when its test ends, failed or not; every
wait on one is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

PROCESS_TIMEOUT = 60.0
_PARENT = "E2E_DEPLOY_TEST_PARENT"
# Runs the worker's CLI after asking Linux to SIGKILL it when its parent (the test) dies; it exits
# at once if the parent is already gone. ``-c`` puts the working directory first on the path.
_LAUNCH = (
    "import ctypes, os, runpy, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
    f"if os.getppid() != int(os.environ.pop('{_PARENT}')): sys.exit(3)\n"
    "sys.argv[0] = 'biot-worker'\n"
    "runpy.run_module('worker', run_name='__main__', alter_sys=True)\n"
)


@dataclass(frozen=True)
class Done:
    """A finished CLI run."""

    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def environment(extra: Mapping[str, str]) -> dict[str, str]:
    """The test's environment without its BioT and worker settings, plus ``extra``."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith(("BIOT_", "WORKER_"))}
    return {**kept, **extra, _PARENT: str(os.getpid())}


async def _spawn(argv: tuple[str, ...], cwd: Path, env: Mapping[str, str]) -> Any:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _LAUNCH,
        *argv,
        cwd=cwd,
        env=environment(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def kill(process: asyncio.subprocess.Process) -> None:
    """Kill and reap ``process`` unless it has ended."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def cli(*argv: str, cwd: Path, env: Mapping[str, str]) -> Done:
    """``biot-worker ARGV`` run to its end (killed past :data:`PROCESS_TIMEOUT`)."""
    process = await _spawn(argv, cwd, env)
    try:
        async with asyncio.timeout(PROCESS_TIMEOUT):
            stdout, stderr = await process.communicate()
    finally:
        await kill(process)
    assert process.returncode is not None
    return Done(process.returncode, stdout.decode(), stderr.decode())


@dataclass
class Worker:
    """A running ``biot-worker run``: its URL and the JSON lines it has logged so far."""

    process: asyncio.subprocess.Process
    url: str = ""
    lines: list[bytes] = field(default_factory=list)
    stderr: bytearray = field(default_factory=bytearray)

    def records(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.lines]


@contextlib.asynccontextmanager
async def running_worker(cwd: Path, env: Mapping[str, str]) -> AsyncIterator[Worker]:
    """``biot-worker run`` once listening (its URL from the ``worker listening`` line); stopped by
    SIGTERM after the block (killed if the block failed or it does not end in time), its output
    read to the end."""
    process = await _spawn(("run",), cwd, env)
    worker = Worker(process)
    listening = asyncio.Event()
    readers = [
        asyncio.create_task(_read_lines(worker, listening)),
        asyncio.create_task(_read_stderr(worker)),
    ]
    waiting = asyncio.create_task(listening.wait())
    try:
        async with asyncio.timeout(PROCESS_TIMEOUT):
            await asyncio.wait([waiting, readers[0]], return_when=asyncio.FIRST_COMPLETED)
        assert worker.url, f"the worker did not start: {worker.stderr.decode()[-2000:]}"
        yield worker
        process.send_signal(signal.SIGTERM)  # a graceful stop: every line is written
        async with asyncio.timeout(PROCESS_TIMEOUT):
            await process.wait()
    finally:
        waiting.cancel()
        await kill(process)
        async with asyncio.timeout(PROCESS_TIMEOUT):
            await asyncio.gather(*readers, return_exceptions=True)


async def _read_lines(worker: Worker, listening: asyncio.Event) -> None:
    assert worker.process.stdout is not None
    async for line in worker.process.stdout:
        worker.lines.append(line)
        record = orjson.loads(line)
        if record.get("message") == "worker listening":
            worker.url = str(record["url"])
            listening.set()


async def _read_stderr(worker: Worker) -> None:
    assert worker.process.stderr is not None
    while chunk := await worker.process.stderr.read(65536):
        worker.stderr += chunk
