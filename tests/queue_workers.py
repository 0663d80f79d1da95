"""Real worker processes (``python -m worker run --source URL``) for the queue process tests.

Each worker talks to an in-process emulator over loopback HTTP; the notification handler of the
example routes searches patients, so the emulator's call log says which events were handled, and
how many times each (the trace id is unique per event).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson

from tests.conftest import notification_body
from worker.testing.emulator import Emulator
from worker.tracing import new_trace

START_TIMEOUT = 30.0
PATIENTS = "/organization/v1/users/patients"


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

    async def exit_code(self, limit: float = START_TIMEOUT) -> int:
        async with asyncio.timeout(limit):
            code = await self.process.wait()
            await asyncio.gather(*self._readers)
        return code


async def _read(stream: asyncio.StreamReader | None, into: list[bytes]) -> None:
    assert stream is not None
    async for line in stream:
        into.append(line)


async def start_queue_worker(emu: Emulator, source_url: str, **env: str) -> QueueWorker:
    """Start a worker on ``source_url``; returns once it logged ``worker consuming``."""
    environment = {
        **os.environ,
        "BIOT_BASE_URL": str(emu.base_url),
        "BIOT_SERVICE_USER_ID": emu.service_user_id,
        "BIOT_SERVICE_USER_SECRET_KEY": emu.service_user_secret,
        "BIOT_APP_NAME": "queue-process-test",
        **env,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "run", "--source", source_url,
        env=environment, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    worker = QueueWorker(process)
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
        await worker.exit_code()
        raise AssertionError(f"worker did not start: {b''.join(worker.stderr)[-2000:]!r}")
    return worker


async def stop_queue_worker(worker: QueueWorker, sig: int = signal.SIGTERM) -> int:
    if worker.process.returncode is None:
        worker.process.send_signal(sig)
    return await worker.exit_code()


def signed_notifications(emu: Emulator, count: int) -> list[bytes]:
    """``count`` signed notification envelopes, each with its own trace id."""
    token = emu.sign_token(scopes=["ACTION_NOTIFICATION"])
    body = orjson.dumps({**notification_body(None), "jwt": token}).decode()
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
