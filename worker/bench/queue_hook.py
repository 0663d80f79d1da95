"""Scenario (e): the (a) event through Redis Streams with a reply, beside (a) over HTTP.

The load drivers of :mod:`worker.bench.load` and :mod:`worker.bench.openloop` need only the two
seams below; :class:`worker.bench.load.Pool` / :class:`worker.bench.httpload.Connection` satisfy
them for HTTP, :class:`RedisChannelPool` / :class:`worker.bench.redisload.RedisChannel` for
Redis Streams:

- a :class:`Channel` is one sender with one event in flight: for Redis, its ``send`` XADDs the
  queue envelope ``{"headers", "body"}`` (the Lambda Function URL shape, with a fresh
  ``traceparent``) with ``reply_to`` (the channel's own reply stream) and a correlation id, and
  returns the worker's ``{"statusCode", "headers", "body"}`` reply as a ``Reply``. Latency is
  publish-to-reply, measured by the same drivers as HTTP's request-to-response;
- a :class:`ChannelPool` keeps channels between points (each with its reply stream).

:class:`QueueRun` is one run's use of a Redis: a unique stream (``biot-bench-<uuid>``) that the
``worker-queue`` target consumes (``biot-worker run --source redis://...?stream=...``), the PID of
``redis-server`` when it runs on this machine (its CPU is then read from ``/proc`` like the
emulator's; it is not pinned, since the bench did not start it), and :meth:`QueueRun.cleanup`,
which deletes the stream and everything named after it (retry set, dead letters, reply streams).
When Redis cannot be reached, :meth:`QueueRun.open` raises :class:`QueueUnavailable` and the
orchestrator reports (e) as skipped.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Final, Protocol
from urllib.parse import urlencode

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from worker.bench import procs
from worker.bench.httpload import Reply
from worker.bench.plan import Plan
from worker.bench.redisload import RedisAddress, RedisChannel, connect

GROUP: Final = "biot-worker"  # the source's default consumer group
DEFAULT_REDIS: Final = "redis://127.0.0.1:6379/0"


class Channel(Protocol):
    """One sender: one event in flight at a time."""

    closed: bool

    async def send(self, request: bytes) -> Reply: ...

    def close(self) -> None: ...


class ChannelPool(Protocol):
    """Channels kept between points."""

    async def take(self, n: int) -> list[Channel]: ...

    async def open(self) -> Channel: ...

    def give(self, channels: list[Channel]) -> None: ...

    def close(self) -> None: ...


class QueueUnavailable(Exception):
    """Redis cannot be used for scenario (e); the message says why, for the report."""


async def reach(plan: Plan) -> QueueRun:
    """The Redis of the plan's scenario (e); :class:`QueueUnavailable` says why (e) cannot run."""
    if "worker-queue" not in plan.variants_for("e"):
        raise QueueUnavailable("left out, the worker-queue variant is not among --variants")
    return await QueueRun.open(plan.redis_url)


class RedisChannelPool:
    """Channels publishing to one stream, each reading replies from a reply stream of its own."""

    def __init__(self, address: RedisAddress, stream: str) -> None:
        self.address, self.stream = address, stream
        self._idle: list[Channel] = []
        self._opened = 0

    async def take(self, n: int) -> list[Channel]:
        self._idle = [c for c in self._idle if not c.closed]
        taken, self._idle = self._idle[:n], self._idle[n:]
        fresh = await asyncio.gather(*(self.open() for _ in range(n - len(taken))))
        return taken + list(fresh)

    async def open(self) -> RedisChannel:
        self._opened += 1
        return await connect(self.address, self.stream, f"{self.stream}:reply:{self._opened}")

    def give(self, channels: list[Channel]) -> None:
        self._idle.extend(c for c in channels if not c.closed)

    def close(self) -> None:
        for channel in self._idle:
            channel.close()
        self._idle.clear()


class QueueRun:
    """One run's stream on one Redis: the worker's URL, readiness, the server's PID, cleanup."""

    def __init__(self, url: str, client: aioredis.Redis, redis_pid: int | None) -> None:
        self.url, self._redis, self.redis_pid = url, client, redis_pid
        self.address = RedisAddress.parse(url)
        self.stream = f"biot-bench-{uuid.uuid4().hex}"
        self.consumer = f"bench-{uuid.uuid4().hex[:8]}"

    @classmethod
    async def open(cls, url: str) -> QueueRun:
        """Connect and look around; :class:`QueueUnavailable` when Redis cannot be used."""
        try:
            RedisAddress.parse(url)
        except ValueError as exc:
            raise QueueUnavailable(str(exc)) from None
        client = aioredis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=5.0)
        try:
            info = await client.info("server")
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise QueueUnavailable(f"Redis is not reachable at {url} ({exc})") from None
        pid = info.get("process_id")
        local = isinstance(pid, int) and await asyncio.to_thread(_is_redis_server, pid)
        return cls(url, client, pid if local else None)

    def pool(self) -> RedisChannelPool:
        return RedisChannelPool(self.address, self.stream)

    def worker_url(self) -> str:
        """The ``--source`` URL of the worker under test."""
        query = urlencode({"stream": self.stream, "consumer": self.consumer})
        return f"{self.url}{'&' if '?' in self.url else '?'}{query}"

    async def start_worker(
        self, name: str, args: list[str], env: dict[str, str], run_dir: Path
    ) -> procs.Proc:
        """Start the worker under test on this run's stream and wait until it consumes."""
        proc = await procs.launch(name, args, env, 0, run_dir)
        await self.wait_consuming(proc)
        return proc

    async def wait_consuming(self, proc: procs.Proc, timeout: float = procs.START_TIMEOUT) -> None:  # noqa: ASYNC109
        """Poll until the worker reads the stream in its group (it has no port to probe);
        ``RuntimeError`` if the process dies first."""
        async with asyncio.timeout(timeout):
            while not await self._consuming():
                if proc.process.returncode is not None:
                    raise RuntimeError(f"{proc.name} exited at start: {await procs.tail(proc)}")
                await asyncio.sleep(0.05)

    async def _consuming(self) -> bool:
        try:
            consumers = await self._redis.xinfo_consumers(self.stream, GROUP)
        except ResponseError:
            return False  # no stream or group yet
        return any(c.get("name") == self.consumer.encode() for c in consumers)

    async def cleanup(self) -> int:
        """Delete the stream, its retry set, dead letters and reply streams (once the worker
        has stopped: it recreates a deleted stream); how many keys went."""
        try:
            keys = [key async for key in self._redis.scan_iter(match=f"{self.stream}*", count=500)]
            if keys:
                await self._redis.delete(*keys)
            return len(keys)
        finally:
            await self._redis.aclose()

    async def close(self, progress: Callable[[str], None]) -> None:
        """:meth:`cleanup`, reporting instead of raising when Redis went away meanwhile."""
        try:
            await self.cleanup()
        except (RedisError, OSError) as exc:
            progress(f"could not delete the bench's Redis keys {self.stream}*: {exc}")

    def describe(self) -> dict[str, object]:
        return {
            "redis": self.url,
            "stream": self.stream,
            "redis_server_pid": self.redis_pid,
            "redis_cpu": "from /proc (not pinned: the bench did not start it)"
            if self.redis_pid is not None
            else "not measured (redis-server is not a process of this machine)",
            "load_client": "raw RESP2, XADD + XREAD BLOCK in one write (worker.bench.redisload)",
        }


def _is_redis_server(pid: int) -> bool:
    """Whether ``pid`` here is a redis-server (not another namespace's number for it)."""
    try:
        return "redis" in Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        return False
