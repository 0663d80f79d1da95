"""Scenario (e), not measured yet: the (a) event through Redis Streams with a reply.

The queue adapters (``worker/adapters/``) are being built; until they land, ``--scenarios e``
is reported as skipped (:data:`worker.bench.plan.PENDING_SCENARIOS`). The load drivers of
:mod:`worker.bench.load` only need the two seams below, which :class:`worker.bench.load.Pool`
and :class:`worker.bench.httpload.Connection` already satisfy for HTTP, so (e) plugs in as:

1. a :class:`Channel` whose ``send`` XADDs the event as the queue envelope
   ``{"headers": {...}, "body": "..."}`` (the Lambda Function URL shape) with a ``reply_to``
   stream and a correlation id, then awaits the reply there and returns it as a ``Reply``
   (status and body taken from the reply message);
2. a :class:`ChannelPool` handing out one channel per concurrent sender;
3. a target kind ``worker-queue`` in :mod:`worker.bench.procs` started as
   ``biot-worker run --source redis://127.0.0.1:6379/0?stream=...``, with ``e`` moved from
   ``PENDING_SCENARIOS`` to ``SCENARIOS`` and its events built by ``payloads.events_a``.

Latency is then publish-to-reply, comparable with (a) over HTTP in the same run.
"""

from __future__ import annotations

from typing import Protocol

from worker.bench.httpload import Reply


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
