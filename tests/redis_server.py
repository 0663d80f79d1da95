"""A test's own ``redis-server`` on a free loopback port, to kill and restart at will.

The shared Redis (6379) is never stopped; fault tests start one of these instead::

    async with RedisServer(persist=True) as server:   # appendonly yes, appendfsync always
        ...  # server.url(stream="s") for a worker
        await server.kill()      # SIGKILL, as a crash
        await server.start()     # the same port and directory: AOF data comes back

Leaving the block kills the server (if it runs) and removes its directory, also when the test
failed. The server also dies with the test process (``PR_SET_PDEATHSIG``), so an interrupted
run leaves none behind. Tests using it skip (fail under ``CI=true``) when ``redis-server`` is
not installed.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import signal
import socket
import tempfile
from types import TracebackType
from urllib.parse import urlencode

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

START_TIMEOUT = 10.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    """A loopback TCP port nothing listens on (now)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def require_redis_server() -> str:
    """The ``redis-server`` binary; skip (fail under ``CI=true``) when there is none."""
    binary = shutil.which("redis-server")
    if binary is None:
        reason = "redis-server is not installed; the Redis fault tests need their own server"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return binary


class RedisServer:
    """One ``redis-server`` on 127.0.0.1:``port`` with its own directory (see the module doc)."""

    def __init__(self, *, persist: bool = False) -> None:
        self.binary = require_redis_server()
        self.persist = persist
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="biot-redis-")
        self.process: asyncio.subprocess.Process | None = None

    def url(self, **params: str) -> str:
        query = f"?{urlencode(params)}" if params else ""
        return f"redis://127.0.0.1:{self.port}/0{query}"

    def client(self) -> aioredis.Redis:
        """A client of this server (the caller closes it)."""
        return aioredis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5.0)

    async def __aenter__(self) -> RedisServer:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Start the server (on the same port and directory as before); returns once it answers
        PING, or raises with the end of its log."""
        assert self.process is None or self.process.returncode is not None, "already running"
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persist else [
            "--appendonly", "no"]  # fmt: skip
        self.process = await asyncio.create_subprocess_exec(
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
            "--save", "", *persistence, "--logfile", "redis.log", "--daemonize", "no",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        await self._until_answering()

    async def _until_answering(self) -> None:
        client = self.client()
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while True:
                    assert self.process is not None
                    if self.process.returncode is not None:
                        break
                    try:
                        if await client.ping():
                            return
                    except (RedisError, OSError):
                        await asyncio.sleep(0.02)
        except TimeoutError:
            pass
        finally:
            await client.aclose()
        raise AssertionError(f"redis-server did not start on {self.port}: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log"), encoding="utf-8") as log:
                return log.read()[-2000:]
        except OSError as exc:
            return f"(no log: {exc})"

    async def kill(self) -> None:
        """SIGKILL the server (a crash: nothing is flushed beyond what AOF already has)."""
        await self._signal(signal.SIGKILL)

    async def stop(self) -> None:
        """SIGTERM the server (a clean shutdown) and wait for it."""
        await self._signal(signal.SIGTERM)

    async def _signal(self, sig: int) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(sig)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()

    async def close(self) -> None:
        """Kill the server if it runs and remove its directory; harmless twice."""
        try:
            await self.kill()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
