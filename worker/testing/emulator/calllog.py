"""What the emulator received and what it sent to plugins, with trace ids, for tests and people.

Incoming calls are recorded with ``direction="in"``, the kind of token they carried and the
span id of their ``traceparent``; calls the
emulator made to plugins (interceptors, notifications) with ``direction="out"``, the hook type,
and ``status=None`` plus an ``error`` when the plugin timed out or was unreachable. An incoming
call is recorded when its answer is ready, so the interceptor calls it caused come before it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Literal

from worker.testing.emulator.wire import Clock, iso_ms

Direction = Literal["in", "out"]


@dataclass(frozen=True, slots=True)
class CallRecord:
    time: float
    direction: Direction
    method: str
    path: str
    status: int | None
    trace_id: str
    token: str
    hook: str | None = None
    error: str | None = None
    #: The span id of the ``traceparent`` an incoming call carried (the caller's span for the
    #: call: with exported spans, the id of the worker's client span), ``None`` without one.
    span_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["timestamp"] = iso_ms(self.time)
        return body


class CallLog:
    """A bounded, append-only record of calls; the oldest entries fall off past ``size``."""

    def __init__(self, clock: Clock, size: int = 10_000) -> None:
        self._clock = clock
        self._records: deque[CallRecord] = deque(maxlen=size)

    def add(
        self,
        direction: Direction,
        method: str,
        path: str,
        status: int | None,
        trace_id: str,
        token: str,
        *,
        hook: str | None = None,
        error: str | None = None,
        span_id: str | None = None,
    ) -> CallRecord:
        record = CallRecord(
            self._clock(), direction, method, path, status, trace_id, token, hook, error, span_id
        )
        self._records.append(record)
        return record

    def records(
        self,
        *,
        trace_id: str | None = None,
        direction: str | None = None,
        hook: str | None = None,
    ) -> list[CallRecord]:
        """Recorded calls, oldest first, narrowed by any filter given."""
        return [
            r
            for r in self._records
            if (trace_id is None or r.trace_id == trace_id)
            and (direction is None or r.direction == direction)
            and (hook is None or r.hook == hook)
        ]

    def clear(self) -> None:
        self._records.clear()
