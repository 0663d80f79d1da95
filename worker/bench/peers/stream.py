"""The bench's side of peer (g): its stream, when it consumes, and the stream's trimming.

Peer (g) reads a stream of its own, ``<run stream>-faststream`` (so the run's cleanup, which
deletes every key named after the run's stream, takes it and its reply streams too), in its own
consumer group: the worker's stream has the worker's group, and two groups on one stream would
each get every event. FastStream acks an entry without deleting it, so :meth:`PeerStream.trim`
empties the stream after each of the peer's points (outside the measured window): without it a
full run would leave some hundred thousand handled entries in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Final

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from worker.bench import procs

GROUP: Final = "biot-plugin"


class PeerStream:
    def __init__(self, url: str, run_stream: str) -> None:
        self.url = url
        self.name = f"{run_stream}-faststream"
        self.group = GROUP
        self.consumer = f"peer-{uuid.uuid4().hex[:8]}"
        self._redis = aioredis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=5.0)

    def env(self, max_workers: int | None = None) -> dict[str, str]:
        """The peer's settings for this stream (:class:`~.faststream_app.StreamSettings`)."""
        env = {
            "PEER_REDIS_URL": self.url,
            "PEER_STREAM": self.name,
            "PEER_GROUP": self.group,
            "PEER_CONSUMER": self.consumer,
        }
        if max_workers is not None:
            env["PEER_MAX_WORKERS"] = str(max_workers)
        return env

    async def wait_consuming(self, proc: procs.Proc, timeout: float = procs.START_TIMEOUT) -> None:  # noqa: ASYNC109
        """Poll until the peer's group exists: FastStream creates it once the plugin's resources
        are open, right before its first read (Redis lists a consumer only once it has read an
        entry, so the group is the sign); ``RuntimeError`` if the process dies first."""
        async with asyncio.timeout(timeout):
            while not await self._grouped():
                if proc.process.returncode is not None:
                    raise RuntimeError(f"{proc.name} exited at start: {await procs.tail(proc)}")
                await asyncio.sleep(0.05)

    async def _grouped(self) -> bool:
        try:
            groups = await self._redis.xinfo_groups(self.name)
        except ResponseError:
            return False  # no stream yet
        return any(g.get("name") == self.group.encode() for g in groups)

    async def trim(self) -> None:
        """Drop the handled entries (all of them: the point's events were all answered)."""
        await self._redis.xtrim(self.name, maxlen=0)

    async def aclose(self) -> None:
        with contextlib.suppress(RedisError):
            await self._redis.aclose()
