"""Real worker processes (``python -m worker run --source URL``) for the queue process tests.

Each worker talks to an in-process emulator over loopback HTTP and runs the project's test plugin
(:mod:`tests.fixture_plugin`, through ``WORKER_ROUTES``), not the example one: its notification
handler searches patients, so the emulator's call log says which events were handled, and how
many times each (the trace id is unique per event).

A worker is started through :class:`Workers`, which kills every worker it started when the test
ends, failed or not. A worker also dies with the test process (``PR_SET_PDEATHSIG``), so one
interrupted by ``kill -9`` leaves none behind either.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest

from tests.fixture_plugin import PATIENTS, REFERENCE
from worker.testing.emulator import Emulator, EmulatorConfig, EmulatorServer
from worker.testing.events import notification_body
from worker.tracing import new_trace

START_TIMEOUT = 30.0
# Runs the worker's CLI after asking Linux to SIGKILL it when its parent (the test) dies; it exits
# at once if the parent is already gone.
_LAUNCH = (
    "import ctypes, os, runpy, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
    "if os.getppid() != int(os.environ['QUEUE_TEST_PARENT']): sys.exit(3)\n"
    "sys.argv[0] = 'worker'\n"
    "runpy.run_module('worker', run_name='__main__', alter_sys=True)\n"
)


@dataclass
class QueueWorker:
    process: asyncio.subprocess.Process
    lines: list[bytes] = field(default_factory=list)
    stderr: list[bytes] = field(default_factory=list)
    _readers: list[asyncio.Task[None]] = field(default_factory=list)

    def records(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.lines]

    def messages(self) -> list[str]:
        return [str(record["message"]) for record in self.records()]

    async def in_flight(self) -> int:
        """The events it has in hand (received and not yet settled), from its ``/healthz``."""
        start = next(r for r in self.records() if r["message"] == "worker consuming")
        url = f"{start['health']}/healthz"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return int((await response.json())["inFlight"])

    async def exit_code(self, limit: float = START_TIMEOUT) -> int:
        async with asyncio.timeout(limit):
            code = await self.process.wait()
            await asyncio.gather(*self._readers)
        return code

    async def kill(self) -> None:
        """SIGKILL it if it still runs, and reap it and its readers."""
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


async def _read(stream: asyncio.StreamReader | None, into: list[bytes]) -> None:
    assert stream is not None
    async for line in stream:
        into.append(line)


class Workers:
    """Starts workers; :meth:`close` kills those still running (use it in a fixture)."""

    def __init__(self) -> None:
        self.started: list[QueueWorker] = []

    async def start(self, emu: Emulator, source_url: str, **env: str) -> QueueWorker:
        """Start a worker on ``source_url``; returns once it logged ``worker consuming``."""
        environment = {
            **os.environ,
            "BIOT_BASE_URL": str(emu.base_url),
            "BIOT_SERVICE_USER_ID": emu.service_user_id,
            "BIOT_SERVICE_USER_SECRET_KEY": emu.service_user_secret,
            "BIOT_APP_NAME": "queue-process-test",
            "WORKER_ROUTES": REFERENCE,
            "QUEUE_TEST_PARENT": str(os.getpid()),
            "WORKER_HEALTH_PORT": "0",  # its /healthz and /readyz on a free port
            **env,
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _LAUNCH, "run", "--source", source_url,
            env=environment, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        worker = QueueWorker(process)
        self.started.append(worker)
        await _until_consuming(worker)
        return worker

    async def close(self) -> None:
        for worker in self.started:
            await worker.kill()


async def _until_consuming(worker: QueueWorker) -> None:
    process = worker.process
    assert process.stdout is not None
    try:
        async with asyncio.timeout(START_TIMEOUT):
            async for line in process.stdout:
                worker.lines.append(line)
                if orjson.loads(line)["message"] == "worker consuming":
                    break
    finally:
        worker._readers = [
            asyncio.create_task(_read(process.stdout, worker.lines)),
            asyncio.create_task(_read(process.stderr, worker.stderr)),
        ]
    if process.returncode is not None or "worker consuming" not in worker.messages():
        await worker.kill()
        raise AssertionError(f"worker did not start: {b''.join(worker.stderr)[-2000:]!r}")


async def stop_queue_worker(worker: QueueWorker, sig: int = signal.SIGTERM) -> int:
    if worker.process.returncode is None:
        worker.process.send_signal(sig)
    return await worker.exit_code()


def signed_notifications(emu: Emulator, count: int) -> list[bytes]:
    """``count`` signed notification envelopes, each with its own trace id."""
    token = emu.sign_token(scopes=["ACTION_NOTIFICATION"])
    body = orjson.dumps(notification_body(token)).decode()
    return [
        orjson.dumps({"headers": {"hooktype": "NOTIFICATION",
                                  "traceparent": new_trace().traceparent}, "body": body})
        for _ in range(count)
    ]  # fmt: skip


def handled(emu: Emulator) -> Counter[str]:
    """How many times the worker handled each event (its successful patient searches)."""
    return Counter(
        record.trace_id
        for record in emu.calls.records(direction="in")
        if (record.method, record.path, record.status) == ("GET", PATIENTS, 200)
    )


# ---------------------------------------------------------------- fixtures the process tests share
# Import them into a test module (and name them in its ``__all__``) to use them.


@pytest.fixture
async def workers() -> AsyncIterator[Workers]:
    started = Workers()
    try:
        yield started
    finally:
        await started.close()


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    """An emulator on loopback whose call log holds a whole load's calls."""
    emu = Emulator(EmulatorConfig(call_log_size=50_000))
    async with EmulatorServer(emu):
        yield emu
