"""The run's stand-in OpenTelemetry collector, and the spans a ``worker-otel`` point owes it.

One counting OTLP/HTTP receiver process per run (``python -m worker.testing.otlp``, on a free
loopback port, on the load side's CPU like the emulators), started only when the plan has
``worker-otel`` points and stopped with the other processes. The ``worker-otel`` target exports
to it with OpenTelemetry's default batch settings: a batch leaves when 512 spans are queued or
:data:`BATCH_DELAY` after the last one, and a span that finds the queue (2048) full is dropped.

Each event is one ``SERVER`` span and each attempt of a BioT call one ``CLIENT`` span, so a
point owes ``answered x (1 + API calls per event)`` spans (a login or a retry adds one more).
After the point the count is read until it reaches that, for at most the batch delay plus
:data:`MARGIN`: the last batch is in, so the export's CPU does not spill into the next point,
and what is still missing then was dropped.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Final

import aiohttp

from worker.bench import procs

#: OpenTelemetry's default ``OTEL_BSP_SCHEDULE_DELAY``, in seconds.
BATCH_DELAY: Final = 5.0
#: How much longer than the batch delay the spans of a point are waited for.
MARGIN: Final = 3.0
#: The BioT calls each event of a scenario makes (each one client span).
API_CALLS: Final = {"a": 0, "b": 1, "c": 3, "d": 0, "e": 0}
_POLL: Final = 0.1


def expected_spans(scenario: str, answered: int) -> int:
    """The spans ``answered`` events of ``scenario`` export: one per event and per API call."""
    return answered * (1 + API_CALLS[scenario])


def span_figures(expected: int, received: int) -> dict[str, Any]:
    """A point's span check: what came, what was owed, how many are missing (dropped)."""
    return {
        "otel_spans": received,
        "otel_expected": expected,
        "otel_dropped": max(0, expected - received),
    }


class Collector:
    """The stand-in collector process: ``await Collector.start(run_dir)``, then :meth:`count`,
    :meth:`wait_count`, and :meth:`aclose` (closing twice is harmless)."""

    def __init__(self, proc: procs.Proc, http: aiohttp.ClientSession) -> None:
        self.proc = proc
        self.endpoint = f"http://127.0.0.1:{proc.port}"
        self._http = http

    @classmethod
    async def start(cls, run_dir: Path) -> Collector:
        port = procs.free_port()
        args = ["worker.testing.otlp", "--port", str(port)]
        proc = await procs.launch("otlp-collector", args, {}, port, run_dir)
        try:
            await procs.wait_listening(proc)
        except BaseException:  # never leave it running (a start that timed out, Ctrl-C)
            await procs.stop(proc)
            raise
        timeout = aiohttp.ClientTimeout(total=5.0)
        return cls(proc, aiohttp.ClientSession(timeout=timeout))

    async def count(self) -> int:
        """Spans received so far; ``RuntimeError`` when the collector does not answer."""
        try:
            async with self._http.get(f"{self.endpoint}/count") as response:
                response.raise_for_status()
                body = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise RuntimeError(f"the stand-in OTLP collector did not answer: {exc!r}") from None
        return int(body["spans"])

    async def wait_count(self, at_least: int, seconds: float = BATCH_DELAY + MARGIN) -> int:
        """The count once it reaches ``at_least``, or whatever it is after ``seconds``."""
        deadline = time.monotonic() + seconds
        while True:
            count = await self.count()
            if count >= at_least or time.monotonic() >= deadline:
                return count
            await asyncio.sleep(_POLL)  # another process's export: nothing to await here

    async def __aenter__(self) -> Collector:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.close()
        await procs.stop(self.proc)
