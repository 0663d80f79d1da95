"""What the hostile-client tests share: a real ``biot-worker run`` process (optionally under a
lowered file descriptor limit), raw attacking sockets, genuine signed events timed while an
attack runs, and the worker's descriptors and RSS read from ``/proc``.

Every worker started here dies with the test process (``PR_SET_PDEATHSIG``) and is killed and
reaped when its test ends; every socket is closed on the way out, failed or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import resource
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from tests.fixture_plugin import REFERENCE
from tests.test_worker_process import WorkerProcess, kill, signed
from worker.testing.emulator import Emulator
from worker.testing.events import interceptor_body

START_TIMEOUT = 30.0
Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def _child_setup(nofile: int | None) -> Callable[[], None]:
    def setup() -> None:  # runs in the child between fork and exec
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return setup


@contextlib.asynccontextmanager
async def running_worker(
    emu: Emulator, base_url: str, env: dict[str, str], *, nofile: int | None = None
) -> AsyncIterator[WorkerProcess]:
    """``biot-worker run`` with ``env`` on top, serving the test plugin, once listening (under
    a soft and hard descriptor limit of ``nofile`` when given); killed on the way out."""
    environment = {
        **os.environ,
        "WORKER_ROUTES": REFERENCE,
        "BIOT_BASE_URL": base_url,
        "BIOT_SERVICE_USER_ID": emu.service_user_id,
        "BIOT_SERVICE_USER_SECRET_KEY": emu.service_user_secret,
        "BIOT_APP_NAME": "hostile-test",
        "WORKER_PORT": "0",
        **env,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "run", env=environment,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        preexec_fn=_child_setup(nofile),
    )  # fmt: skip
    worker: WorkerProcess | None = None
    try:
        assert process.stdout is not None
        lines: list[bytes] = []
        async with asyncio.timeout(START_TIMEOUT):
            async for line in process.stdout:
                lines.append(line)
                record = orjson.loads(line)
                if record["message"] == "worker listening":
                    worker = WorkerProcess(process, str(record["url"]), lines)
                    break
        assert worker is not None, "the worker ended before listening"
        worker._reader = asyncio.create_task(worker.read_rest())
        yield worker
    finally:
        await kill(process)
        if worker is not None and worker._reader is not None:
            worker._reader.cancel()
            await asyncio.gather(worker._reader, return_exceptions=True)


def port_of(worker: WorkerProcess) -> int:
    return int(worker.url.rsplit(":", 1)[1])


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1])


def logged(worker: WorkerProcess, message: str) -> list[dict[str, Any]]:
    return [r for r in worker.records() if r["message"] == message]


@dataclass
class Attack:
    """Raw connections to the worker; :meth:`close` closes every one of them."""

    port: int
    streams: list[Stream] = field(default_factory=list)

    async def open(self, count: int, first: bytes = b"") -> None:
        """``count`` more connections, each sending ``first`` (nothing when empty)."""
        for _ in range(count):
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.streams.append((reader, writer))
            if first:
                writer.write(first)
        await asyncio.gather(*(writer.drain() for _, writer in self.streams))

    async def send_all(self, data: bytes) -> None:
        """``data`` on every connection still open (a trickle)."""
        for _, writer in self.streams:
            if not writer.is_closing():
                with contextlib.suppress(ConnectionError):
                    writer.write(data)

    async def until_closed(self, limit: float) -> list[bytes]:
        """What each connection received until the worker closed it; fails after ``limit`` s."""
        async with asyncio.timeout(limit):
            return await asyncio.gather(*(_read_to_end(reader) for reader, _ in self.streams))

    async def close(self) -> None:
        for _, writer in self.streams:
            writer.close()
        for _, writer in self.streams:
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        self.streams.clear()


async def _read_to_end(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read()
    except ConnectionError:
        return b""


@dataclass
class Genuine:
    """Signed PRE interceptor events, one after another, each timed (ms)."""

    emu: Emulator
    url: str
    statuses: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    async def send(self, http: aiohttp.ClientSession, count: int) -> None:
        for _ in range(count):
            headers, body = signed(self.emu, "INTERCEPTOR_PRE", interceptor_body("INTERCEPTOR_PRE"))
            started = time.perf_counter()
            async with http.post(self.url, data=body, headers=headers) as response:
                await response.read()
                self.statuses.append(response.status)
            self.latencies.append((time.perf_counter() - started) * 1000)

    def percentiles(self) -> dict[str, float]:
        ordered = sorted(self.latencies)
        p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
        return {"p50_ms": round(statistics.median(ordered), 2), "p99_ms": round(p99, 2)}


def report(name: str, **figures: Any) -> None:
    """Append the figures of one attack to ``$HOSTILE_REPORT`` (a JSON line), when set."""
    path = os.environ.get("HOSTILE_REPORT")
    if path:
        with open(path, "ab") as out:
            out.write(orjson.dumps({"attack": name, **figures}) + b"\n")


async def eventually(check: Callable[[], bool], what: str, limit: float) -> None:
    """Poll ``check`` every 20 ms until true; fail naming ``what`` after ``limit`` s."""
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit} s waiting for {what}")
        await asyncio.sleep(0.02)
