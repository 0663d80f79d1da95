"""The event's trace and deadline: W3C trace context (parse, format, child spans), the
per-event context variables holding each, and timeouts that share a timer
(:class:`QueuedTimeout`).

The trace is bound once at the edge (the dispatcher) and read from :data:`current_trace` by the
logger and the BioT client, so every log line and every outgoing call of an event carries the
same trace id without being passed around by hand.
"""

from __future__ import annotations

import asyncio
import enum
import os
import re
import time
from collections import deque
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Protocol

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_HEX = re.compile(r"^[0-9a-f]{1,32}$")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


@dataclass(frozen=True, slots=True)
class TraceContext:
    """A W3C trace context: the event's ``trace_id`` (in every log line and outgoing call)."""

    trace_id: str
    span_id: str
    flags: str = "01"
    #: Whether ``span_id`` is a caller's span (a ``traceparent`` came), or one made up here
    #: (none came, or only a bare trace id): then an exported span has no parent to name.
    inherited: bool = field(default=True, compare=False)

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def child(self) -> TraceContext:
        """Same trace, a new span id: one per outgoing call."""
        return _trace(self.trace_id, _new_span_id(), self.flags, True)


# The frozen dataclass's __init__ sets each field through object.__setattr__; the slots' own
# setters do the same in 60 % of the time, and every event makes one or two of these.
_new_object = object.__new__
_SET_TRACE_ID, _SET_SPAN_ID, _SET_FLAGS, _SET_INHERITED = (
    getattr(TraceContext, name).__set__ for name in ("trace_id", "span_id", "flags", "inherited")
)


def _trace(trace_id: str, span_id: str, flags: str, inherited: bool) -> TraceContext:
    """``TraceContext(trace_id, span_id, flags, inherited)``, made faster."""
    trace: TraceContext = _new_object(TraceContext)
    _SET_TRACE_ID(trace, trace_id)
    _SET_SPAN_ID(trace, span_id)
    _SET_FLAGS(trace, flags)
    _SET_INHERITED(trace, inherited)
    return trace


def _new_span_id() -> str:
    return os.urandom(8).hex()


def new_trace() -> TraceContext:
    return _trace(os.urandom(16).hex(), _new_span_id(), "01", False)


def parse_traceparent(value: str | None) -> TraceContext | None:
    """Parse a W3C ``traceparent``; ``None`` when absent or malformed (all-zero ids are invalid)."""
    if not value:
        return None
    match = _TRACEPARENT.match(value)  # as BioT sends it; else trimmed and lower-cased
    if match is None:
        match = _TRACEPARENT.match(value.strip().lower())
        if match is None:
            return None
    version, trace_id, span_id, flags = match.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return _trace(trace_id, span_id, flags, True)


def _from_bare_id(value: str | None) -> TraceContext | None:
    # x-b3-traceid is 16 or 32 hex; a 64-bit id is left-padded as W3C advises.
    if not value:
        return None
    candidate = value.strip().lower()
    if not _HEX.match(candidate):
        return None
    trace_id = candidate.rjust(32, "0")
    if trace_id == _ZERO_TRACE:
        return None
    return _trace(trace_id, _new_span_id(), "01", False)


def trace_from_headers(headers: Mapping[str, str]) -> TraceContext:
    """The event's trace: ``traceparent``, then ``x-b3-traceid``, then ``trace-id``, else new.

    ``headers`` must have lower-case keys (events normalise them).
    """
    return (
        parse_traceparent(headers.get("traceparent"))
        or _from_bare_id(headers.get("x-b3-traceid"))
        or _from_bare_id(headers.get("trace-id"))
        or new_trace()
    )


current_trace: ContextVar[TraceContext | None] = ContextVar("biot_trace", default=None)
#: The span id log lines carry as ``spanId``: the event's own span, bound only when spans are
#: exported (without them, the trace's span id is BioT's, not ours, and lines stay as they were).
current_span_id: ContextVar[str | None] = ContextVar("biot_span_id", default=None)


def current_trace_id() -> str | None:
    trace = current_trace.get()
    return trace.trace_id if trace is not None else None


# ---------------------------------------------------------------- deadline
# The dispatcher binds the event's deadline (an absolute ``loop.time()``) when it starts a
# handler; the BioT client reads it to bound each call, and its retries, by what is left.

current_deadline: ContextVar[float | None] = ContextVar("biot_deadline", default=None)


def remaining(deadline: float | None = None) -> float | None:
    """Seconds left before ``deadline`` (default: the current event's), or ``None`` if unbounded."""
    if deadline is None:
        deadline = current_deadline.get()
    if deadline is None:
        return None
    return deadline - asyncio.get_running_loop().time()


# ---------------------------------------------------------------- spans
# Exported spans are optional (OpenTelemetry, ``worker.otel``): without them ``Spans`` is None
# where it is passed and the worker makes a child span id per outgoing call itself.


class Span(Protocol):
    """One span the worker opened; :meth:`finish` ends it (once; later calls do nothing)."""

    @property
    def context(self) -> TraceContext:
        """This span: the trace's id and this span's own id (what a child's parent is, what an
        outgoing call's ``traceparent`` carries)."""
        ...

    def finish(self, status: int | None, error: BaseException | None = None) -> None:
        """End the span with the answer's status (``None``: none came) and, when it failed,
        the error (a :class:`~worker.errors.WorkerError`, a transport error, or
        ``CancelledError`` when the event's deadline or a shutdown cut it short)."""
        ...


class Spans(Protocol):
    """Makes the spans of events and of their BioT calls (see ``worker.otel``)."""

    def event(
        self, hook: str, parent: TraceContext, attributes: Mapping[str, Any] | None = None
    ) -> Span:
        """An event's span, continuing ``parent`` (BioT's ``traceparent``): a server span, or a
        consumer span when ``attributes`` name a ``messaging.system``."""
        ...

    def call(self, method: str, url: str, parent: TraceContext | None, attempt: int = 1) -> Span:
        """A client span for one attempt of a call to BioT (``url`` without its query), under
        ``parent`` (the current event's span; ``None``: a new trace)."""
        ...

    async def flush(self) -> None:
        """Export what has ended, bounded (a Lambda's process is frozen once it answers)."""
        ...


# ---------------------------------------------------------------- timeouts on a shared timer
# asyncio.timeout_at pushes a timer handle on the loop's heap and pops it off again later
# (Python-level comparisons each way) for a deadline almost never reached: 20k of the 390k
# instructions of an event, as much again per BioT call. Deadlines that fall in the order they
# are set (events of one hook: one budget, started in order; calls bounded by their event's
# deadline, or by one fixed timeout) share one timer, at the earliest: a TimeoutQueue.

_RESOLUTION: Final = time.get_clock_info("monotonic").resolution  # asyncio's timer slack


class _State(enum.Enum):  # asyncio.Timeout's
    CREATED = "created"
    ENTERED = "active"
    EXPIRING = "expiring"
    EXPIRED = "expired"
    EXITED = "finished"


_ENTERED, _EXPIRING, _EXPIRED, _EXITED = (
    _State.ENTERED, _State.EXPIRING, _State.EXPIRED, _State.EXITED
)  # fmt: skip


class QueuedTimeout:
    """``asyncio.timeout_at(when)``: an async context manager with the same states and the same
    outcome (the task cancelled at ``when``, ``TimeoutError`` raised on exit, a cancellation
    from elsewhere left as it is), its timer shared with the other timeouts of its
    :class:`TimeoutQueue`; :meth:`enter` and :meth:`leave` do the same without coroutines."""

    __slots__ = ("_cancelling", "_handle", "_queue", "_state", "_task", "when")

    def __init__(self, when: float, queue: TimeoutQueue) -> None:
        self.when = when
        self._queue = queue
        self._state = _State.CREATED
        self._handle: asyncio.Handle | None = None
        self._task: asyncio.Task[Any] | None = None

    async def __aenter__(self) -> QueuedTimeout:
        self.enter()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.leave(exc)

    def enter(self) -> None:
        """What ``__aenter__`` does, without a coroutine."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("Timeout should be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._state = _ENTERED
        self._handle = self._queue.add(self, loop)

    def leave(self, exc: BaseException | None) -> None:
        """What ``__aexit__`` does for ``exc`` (``None``: the block ended normally): raises
        ``TimeoutError`` when the deadline's cancellation is what ended it."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        task = self._task
        self._task = None  # a finished entry may wait in the queue behind a slower one
        if self._state is _EXPIRING:
            self._state = _EXPIRED
            assert task is not None  # expiring: entered, in this task
            if task.uncancel() <= self._cancelling and type(exc) is asyncio.CancelledError:
                raise TimeoutError from exc  # no other cancellation came: ours to answer
        else:
            self._state = _EXITED
            self._queue.finished()

    def expired(self) -> bool:
        return self._state is _EXPIRING or self._state is _EXPIRED

    def expire(self) -> None:
        """The deadline passed: cancel the task (once, and only while inside the block)."""
        self._handle = None
        if self._state is _ENTERED and self._task is not None:
            self._task.cancel()
            self._state = _EXPIRING


class TimeoutQueue:
    """Timeouts in the order they fall, and one loop timer at the earliest still running. A
    timeout that falls before one already queued (an event that waited for its body, a carrier's
    earlier deadline, a call made out of its event's order) or that has passed gets a timer of
    its own, as asyncio's would."""

    __slots__ = ("_entries", "_loop", "_timer")

    def __init__(self) -> None:
        self._entries: deque[QueuedTimeout] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def add(
        self, deadline: QueuedTimeout, loop: asyncio.AbstractEventLoop
    ) -> asyncio.Handle | None:
        """Queue ``deadline`` (``loop``: the running loop); or its own timer handle, which the
        caller cancels on exit."""
        entries = self._entries
        if loop is not self._loop:  # another loop (a test's, a Lambda container's): start anew
            self._loop, self._timer = loop, None
            entries.clear()
        when = deadline.when
        if when <= loop.time():
            return loop.call_soon(deadline.expire)
        if entries and when < entries[-1].when:
            return loop.call_at(when, deadline.expire)
        entries.append(deadline)
        timer = self._timer
        if timer is None:
            self._timer = loop.call_at(entries[0].when, self._fire)
        elif len(entries) == 1 and when < timer.when():
            # The queue had emptied (finished() drops entries, not the timer) and the timer is
            # still set for a later deadline that has left: move it to this one.
            timer.cancel()
            self._timer = loop.call_at(when, self._fire)
        return None

    def finished(self) -> None:
        """Drop the deadlines of finished events from the front."""
        entries = self._entries
        while entries and entries[0]._state is _EXITED:
            entries.popleft()

    def _fire(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None
        end = loop.time() + _RESOLUTION
        entries = self._entries
        while entries:
            head = entries[0]
            if head._state is _ENTERED:
                if head.when > end:
                    break
                head.expire()
            entries.popleft()
        if entries:
            self._timer = loop.call_at(entries[0].when, self._fire)


class OwnTimers(TimeoutQueue):
    """A timer of its own for every timeout, cancelled when its block ends (what
    ``asyncio.timeout`` does): for deadlines that share nothing with others."""

    __slots__ = ()

    def add(
        self, deadline: QueuedTimeout, loop: asyncio.AbstractEventLoop
    ) -> asyncio.Handle | None:
        return loop.call_at(deadline.when, deadline.expire)

    def finished(self) -> None:
        pass


#: The :class:`OwnTimers` anyone may use (it holds nothing).
OWN_TIMERS: Final = OwnTimers()
