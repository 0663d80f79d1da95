"""The queue seam: one :class:`Source` Protocol, what a message becomes, and the intake loop.

A :class:`Source` is a broker's side of the worker, an async context manager (enter connects and
declares, exit closes) with three methods: :meth:`~Source.receive` up to ``limit`` messages as
:class:`Delivery` objects, :meth:`~Source.settle` one of them per a :class:`Decision`, and
:meth:`~Source.halt` taking more. Everything else is shared and lives here:

- :class:`Processor` turns one delivery into a decision: it parses the queue envelope
  ``{"headers": {...}, "body": ...}`` (the shape of a Lambda Function URL event, so a captured
  call replays unchanged) into an :class:`~worker.events.Event`, hands it to the dispatcher and
  judges the :class:`~worker.dispatch.Outcome`;
- :func:`pump` is the one intake loop: at most ``max_in_flight`` messages at once, each settled
  only after its outcome is known; on ``stop`` it takes no more, gives in-flight ones ``grace``
  seconds, settles them, and cancels the rest, which stay unacknowledged and come back.
  Delivery is therefore **at least once**: a crash between handling and settling means a
  duplicate;
- :func:`consume` (serve a source until ``stop``) is what the runner calls, with a source from
  :func:`worker.adapters.open_source` (a URL to a source; it imports the broker's module, which
  imports this one, so it lives where no broker imports it).

Decisions (:class:`Verdict`):

- **ack**: handled. This includes an interceptor's :class:`~worker.errors.Block`, which is its
  answer, not a failure.
- **retry**: a transient failure (timeout, 5xx from BioT, login outage) before the last attempt;
  the source re-queues the message (``envelope`` when set, see below) after ``delay`` with
  ``attempt + 1``.
- **dead**: a permanent failure (bad JWT, malformed or oversized envelope, a handler's bug), the
  last attempt of a transient one, or a message delivered more than ``max_attempts`` times
  without being settled (a consumer crashing on it). ``reason`` says why.

A delivery with ``reply_to`` gets the response (success or error) as a reply with a final
decision; nothing is sent for a retry. The reply is a Function URL response
``{"statusCode", "headers", "body"}`` with ``body`` the response's JSON text.

One message, one trace: a message that parses carries its trace in ``event.trace`` (read once,
where the event is built), and every log line about it (the dispatcher's, a retry, a dead
letter, a failed settle) and its reply carry that trace; a message that does not parse gets one
trace, used for its error reply and its log lines alike. A retry keeps the trace: when the
envelope names none (no usable ``traceparent``, ``x-b3-traceid`` or ``trace-id``), the one made
up for it is added to the re-queued envelope (:func:`retry_envelope`), and taken out again of
its dead letter, which holds the envelope as published (:func:`published_envelope`).
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson

from config.settings import Settings
from worker.dispatch import Outcome
from worker.errors import Block, EventError, PayloadTooLarge, WorkerError
from worker.events import Event, HookType, event_from_envelope, hook_from_header, lower_headers
from worker.logs import Log, Throttle, describe
from worker.responses import ErrorContext, Response, error_response
from worker.tracing import TraceContext, current_span_id, current_trace, trace_from_headers

if TYPE_CHECKING:  # prometheus-client is imported only when metrics are on
    from worker.metrics import Metrics, QueueMetrics

#: What the dispatcher offers a source: ``Dispatcher.handle``.
Handle = Callable[[Event], Awaitable[Outcome]]


class Refuse(Protocol):
    """``Dispatcher.refuse``: the answer to a message that never became an event."""

    def __call__(
        self,
        hook: HookType,
        trace: TraceContext,
        error: WorkerError,
        received_at: float,
        transport: Mapping[str, Any] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        log: bool = True,
    ) -> Outcome: ...

HOOKS = tuple(hook.value for hook in HookType)
RETRY_PARAMS = ("max_attempts", "retry_delay", "retry_max_delay")
# An envelope is JSON text around the body (escaping can double it): refuse to parse beyond this.
_ENVELOPE_SLACK = 65_536
_RECEIVE_BACKOFF = (0.1, 2.0)  # first and largest pause after the broker failed a receive
_T = TypeVar("_T")


class SourceUnavailable(Exception):
    """The broker cannot be reached or refused the source's setup (message names the broker)."""


# ---------------------------------------------------------------- messages and decisions


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message as a broker handed it over.

    ``message`` is the broker's own handle (a stream entry, an AMQP message), given back to
    :meth:`Source.settle`; nothing else reads it. ``ref`` names the message in log lines (a
    stream entry id, a delivery tag).
    """

    body: bytes
    attempt: int = 1
    reply_to: str | None = None
    correlation_id: str | None = None
    message: Any = field(default=None, compare=False, repr=False)
    ref: str = field(default="", compare=False)
    #: The broker delivered it before and it was not settled (a consumer died, a link was cut,
    #: a settle failed): counted in ``biot_worker_queue_messages_redelivered_total``.
    redelivered: bool = field(default=False, compare=False)


class Verdict(StrEnum):
    ACK = "ack"
    RETRY = "retry"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class Decision:
    """What becomes of a delivery; the source carries it out in :meth:`Source.settle`."""

    verdict: Verdict
    reply: bytes | None = None  # send to the delivery's reply_to before settling
    reason: str = ""  # why it was dead-lettered (or retried)
    delay: float = 0.0  # seconds before the retry
    status: int | None = None  # the response status, when there was one
    trace: TraceContext | None = field(default=None, compare=False)  # the message's, for logs
    span_id: str | None = field(default=None, compare=False)  # its event's span's, for logs
    # What to re-queue (retry) or dead-letter (dead) in place of the delivered body; None: the
    # delivered body. Set only off the success path: a retry's envelope with the message's
    # trace added, a dead letter's envelope as published (see :func:`retry_envelope`).
    envelope: bytes | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``max_attempts`` deliveries at most; retry ``n`` waits ``delay * 2**(n-1)``, capped."""

    max_attempts: int = 5
    delay: float = 1.0
    max_delay: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be 1 or more, got {self.max_attempts}")
        if self.delay < 0 or self.max_delay < self.delay:
            raise ValueError("retry delays must satisfy 0 <= retry_delay <= retry_max_delay")

    def delay_for(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based)."""
        return min(self.max_delay, self.delay * 2.0 ** (attempt - 1))


# ---------------------------------------------------------------- the seam


class Source(Protocol):
    """A broker's side of the worker. Enter connects and declares (raising
    :class:`SourceUnavailable` when the broker cannot be reached); exit closes, and whatever was
    received and not settled goes back to the broker. Closing twice is harmless."""

    @property
    def policy(self) -> RetryPolicy:
        """The retry policy named by the source's URL."""
        ...

    async def __aenter__(self) -> Source: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None: ...

    async def receive(self, limit: int) -> Sequence[Delivery]:
        """Up to ``limit`` messages, waiting at most a short poll interval; ``[]`` if none.

        Raises when the broker fails; the next call reconnects (and recreates what the source
        needs) by itself, so the caller only waits a bounded backoff and calls again."""
        ...

    async def settle(self, delivery: Delivery, decision: Decision) -> None:
        """Reply, then ack, re-queue for a retry, or dead-letter the delivery per ``decision``;
        acknowledged only once the outcome is durable. Raises when that could not be done: the
        message is then not acknowledged and the broker delivers it again."""
        ...

    async def halt(self) -> None:
        """Stop taking messages from the broker (on ``stop``, before in-flight ones drain)."""
        ...


@dataclass(frozen=True, slots=True)
class QueueInfo:
    """What a source tells about itself, for metrics and traces: ``system`` is OpenTelemetry's
    ``messaging.system`` (``redis``, ``rabbitmq``, ``memory``), ``destination`` the stream or
    queue it consumes (the ``queue`` label of the metrics), ``group`` its consumer group,
    ``ref_attribute`` what a delivery's ``ref`` is in a span."""

    system: str
    destination: str
    group: str | None = None
    #: The span attribute a delivery's ``ref`` is (a message id, or RabbitMQ's delivery tag).
    ref_attribute: str = "messaging.message.id"


class Observable(Protocol):
    """Optional for a :class:`Source`: what it is, and the broker's count of what waits."""

    @property
    def info(self) -> QueueInfo:
        """Fixed once the source is built."""
        ...

    async def lag(self) -> int | None:
        """Messages in the queue not yet delivered to this consumer (group), as the broker
        tells it; ``None`` when it cannot. Raises when the broker fails (bounded by the
        caller)."""
        ...


class Settling(Protocol):
    """A settle under way by callback (see :class:`SettlesSoon`)."""

    def give_up(self) -> None:
        """Stop waiting for it: it is not sent if it has not gone yet, ``done`` is not called,
        and the source counts it as failed (the message comes back)."""
        ...


class SettlesSoon(Protocol):
    """Optional for a :class:`Source`: settling without a task waiting for it (a task resumed
    for each settle's reply costs a turn of the event loop per event). The pump then holds the
    event's slot until ``done`` is called, and still bounds the wait (``op_timeout``, then
    :meth:`Settling.give_up`)."""

    def settle_soon(
        self, delivery: Delivery, decision: Decision, done: Callable[[BaseException | None], None]
    ) -> Settling:
        """Start what :meth:`Source.settle` does; ``done(None)`` once the outcome is durable,
        ``done(error)`` when it could not be done, called once, from the event loop (possibly
        before this returns)."""
        ...


class ReceivesSoon(Protocol):
    """Optional for a :class:`Source`: receiving without a task waiting for it (the intake
    task resumed for each read's reply costs a turn of the event loop per batch). The pump
    starts each batch's tasks from ``then`` and asks for the next batch once they had their
    first turn (so that a source may send their settles with that read)."""

    def receive_soon(
        self, limit: int, then: Callable[[Sequence[Delivery] | BaseException], None]
    ) -> Settling | None:
        """Start what :meth:`Source.receive` does, its result or error to ``then``, called
        once from the event loop, never before this returns; what gives the receive up. ``None``
        (nothing started) when this receive needs :meth:`Source.receive` (reconnecting,
        recovering, or anything else it does as a coroutine)."""
        ...


# ---------------------------------------------------------------- envelopes and replies


def encode_reply(response: Response) -> bytes:
    return orjson.dumps(
        {
            "statusCode": response.status,
            "headers": dict(response.headers),
            "body": response.body.decode("utf-8", "replace"),
        }
    )


def decode_reply(raw: bytes) -> dict[str, Any]:
    """A reply as a dict (``statusCode``, ``headers``, ``body``); ``ValueError`` if it is not."""
    try:
        reply = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"reply is not JSON: {exc.msg}") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("statusCode"), int):
        raise ValueError("reply is not a {statusCode, headers, body} object")
    return reply


def _too_large(raw: bytes, max_body_bytes: int) -> bool:
    return len(raw) > 2 * max_body_bytes + _ENVELOPE_SLACK


def parse_envelope(delivery: Delivery, *, received_at: float, max_body_bytes: int) -> Event:
    """The event a delivery carries, its ``attempt`` the delivery's; :class:`EventError` when it
    is not a valid envelope."""
    if _too_large(delivery.body, max_body_bytes):
        raise PayloadTooLarge(f"queue message of {len(delivery.body)} bytes is too large")
    if not delivery.body or delivery.body.isspace():  # no copy, as strip() would make
        raise EventError("queue message is empty")
    try:
        envelope = orjson.loads(delivery.body)
    except orjson.JSONDecodeError as exc:
        raise EventError(f"queue message is not JSON: {exc.msg}") from None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("headers"), dict):
        raise EventError("queue message is not an envelope with a headers object")
    event = event_from_envelope(envelope, received_at=received_at, max_body_bytes=max_body_bytes)
    event.attempt = delivery.attempt
    return event


def _headers_of(raw: bytes) -> Mapping[str, str]:
    """Best-effort headers of a message that failed to parse (for its error's trace id)."""
    try:
        headers = orjson.loads(raw).get("headers")
        return lower_headers(headers) if isinstance(headers, Mapping) else {}
    except Exception:  # anything unparseable simply has no headers
        return {}


# ---------------------------------------------------------------- one trace across retries
# A message without a usable trace header gets a trace made up where its event is built. So
# that its next delivery is handled under that trace, not another made-up one, the envelope
# re-queued for a retry is the delivered one, byte for byte, with ``"traceparent":"..."`` added
# as the last member of its headers object and the marker ``"x-biot-added":"traceparent"`` as
# the top-level member right after that object (an event ignores it). A dead letter drops both
# again, so it holds the envelope as published. Both are found in the raw bytes (never by
# re-serialising the JSON), and only on the retry and dead-letter paths.

_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]:]', re.DOTALL)  # strings, {}[]:
_ADDED_MARK = b',"x-biot-added":"traceparent"'
_ADDED_HEADER = re.compile(rb'(,?)"traceparent":"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}"\Z')
_OPEN, _QUOTE, _COLON = b"{[", ord('"'), ord(":")


def _headers_span(raw: bytes) -> tuple[int, int] | None:
    """The offsets of the ``{`` and ``}`` of the envelope's headers object in ``raw`` (a JSON
    object): the last top-level ``headers`` member's, the one a JSON parser keeps."""
    depth, start, key_at, keyed = 0, -1, -1, False
    found: tuple[int, int] | None = None
    for token in _TOKENS.finditer(raw):
        at = token.start()
        kind = raw[at]
        if kind == _QUOTE:
            if depth == 1:
                key_at, keyed = at, False  # a key, or a value (then no colon follows)
        elif kind == _COLON:
            if depth == 1:
                keyed = _is_headers_key(raw, key_at, at)
        elif kind in _OPEN:
            depth += 1
            if depth == 2:
                start = at if keyed and kind == _OPEN[0] else -1
                keyed = False
        else:
            if depth == 2 and start >= 0:
                found, start = (start, at), -1
            depth -= 1
    return found


def _is_headers_key(raw: bytes, at: int, colon: int) -> bool:
    key = raw[at:colon].rstrip()  # a short slice: a key, then whitespace before the colon
    if key == b'"headers"':
        return True
    if b"\\" not in key or len(key) > 64:
        return False
    try:
        return bool(orjson.loads(key) == "headers")  # written with escapes
    except orjson.JSONDecodeError:
        return False


def retry_envelope(
    raw: bytes, trace: TraceContext, headers: Mapping[str, str] | None
) -> bytes | None:
    """The envelope to re-queue for a retry of ``raw``, whose event has ``headers`` (lower-case)
    and ``trace``: ``raw`` with ``trace`` added as its ``traceparent``, when its headers carry
    no usable trace; ``None`` (re-queue ``raw`` as it is) when they do or ``raw`` has no
    headers object."""
    if headers is None or trace_from_headers(headers).trace_id == trace.trace_id:
        return None  # the headers name the trace: the next delivery finds the same one
    span = _headers_span(raw)
    if span is None:
        return None
    start, end = span
    comma = b"," if raw[start + 1 : end].strip() else b""
    member = b'"traceparent":"%s"' % trace.traceparent.encode()
    return b"".join((raw[:end], comma, member, b"}", _ADDED_MARK, raw[end + 1 :]))


def published_envelope(delivery: Delivery) -> bytes | None:
    """The envelope of ``delivery`` as published, when a retry added a trace to it (see
    :func:`retry_envelope`); ``None`` when the delivered body is the published one."""
    raw = delivery.body
    if delivery.attempt < 2 or _ADDED_MARK not in raw:
        return None
    span = _headers_span(raw)
    if span is None:
        return None
    start, end = span
    added = _ADDED_HEADER.search(raw, start + 1, end)
    if added is None or not raw.startswith(_ADDED_MARK, end + 1):
        return None
    if not added.group(1) and raw[start + 1 : added.start()].strip():
        return None  # not what retry_envelope writes
    return b"".join((raw[: added.start()], b"}", raw[end + 1 + len(_ADDED_MARK) :]))


class Processor:
    """Decode, dispatch and judge one delivery; never raises (except ``CancelledError``).

    The pump logs each retry and dead letter under the message's one trace once the source has
    settled it (not before: a failed settle means the message comes back).
    """

    def __init__(
        self,
        handle: Handle,
        *,
        errors: ErrorContext,
        policy: RetryPolicy,
        max_body_bytes: int,
        log: Log,
        info: QueueInfo | None = None,
        refuse: Refuse | None = None,
        traced: bool = True,
    ) -> None:
        """``info`` names the source in each event's span attributes (``messaging.*``, made
        only when ``traced``: spans are exported); ``refuse`` (``Dispatcher.refuse``) answers a
        message refused before it became an event, counted and traced as an event, as the
        HTTP adapter's refusals are."""
        self._handle = handle
        self._refuse = refuse
        self._traced = traced
        self._transport = _span_attributes(info)
        self._ref_attribute = "messaging.message.id" if info is None else info.ref_attribute
        self._errors = errors
        self._policy = policy
        self._max_body = max_body_bytes
        self._log = log

    async def __call__(self, delivery: Delivery) -> Decision:
        received_at = asyncio.get_running_loop().time()
        try:
            if delivery.attempt > self._policy.max_attempts:
                raise EventError(
                    f"delivered {delivery.attempt} times without being settled",
                    code="REDELIVERY_LIMIT",
                )
            event = parse_envelope(delivery, received_at=received_at, max_body_bytes=self._max_body)
        except WorkerError as exc:
            return self._refusal(delivery, exc, received_at)
        if self._traced:
            event.transport = self._attributes(delivery)
        outcome = await self._handle(event)
        return self._judge(delivery, outcome, event.trace, event.headers)

    def _attributes(self, delivery: Delivery) -> dict[str, Any]:
        return {**self._transport, self._ref_attribute: delivery.ref}

    def _refusal(self, delivery: Delivery, exc: WorkerError, received_at: float) -> Decision:
        """The decision on a message that never became an event, under its one trace."""
        too_large = _too_large(delivery.body, self._max_body)
        headers = {} if too_large else _headers_of(delivery.body)
        trace = trace_from_headers(headers)
        if self._refuse is None:
            outcome = Outcome(error_response(exc, trace, self._errors), exc)
        else:
            hook = hook_from_header(headers.get("hooktype"))[0]
            outcome = self._refuse(
                hook, trace, exc, received_at, self._attributes(delivery), log=False
            )
        return self._judge(delivery, outcome, trace)

    def _judge(
        self,
        delivery: Delivery,
        outcome: Outcome,
        trace: TraceContext,
        headers: Mapping[str, str] | None = None,
    ) -> Decision:
        attempt = delivery.attempt
        response, error = outcome.response, outcome.error
        reply = encode_reply(response) if delivery.reply_to else None
        span_id = outcome.span_id
        if error is None or isinstance(error, Block):
            return Decision(Verdict.ACK, reply, status=response.status, trace=trace,
                            span_id=span_id)  # fmt: skip
        reason = f"{error.code}: {error.message}"
        if outcome.transient and attempt < self._policy.max_attempts:
            delay = self._policy.delay_for(attempt)
            body = retry_envelope(delivery.body, trace, headers)
            return Decision(Verdict.RETRY, None, reason, delay, response.status, trace, span_id,
                            body)  # fmt: skip
        if outcome.transient:
            reason += f" (gave up after {attempt} attempts)"
        return Decision(Verdict.DEAD, reply, reason, status=response.status, trace=trace,
                        span_id=span_id, envelope=published_envelope(delivery))  # fmt: skip


def _span_attributes(info: QueueInfo | None) -> dict[str, Any]:
    """A consumer span's attributes (OpenTelemetry's messaging conventions)."""
    if info is None:
        return {"messaging.system": "unknown", "messaging.operation.type": "process"}
    attributes: dict[str, Any] = {
        "messaging.system": info.system,
        "messaging.destination.name": info.destination,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
    }
    if info.group is not None:
        attributes["messaging.consumer.group.name"] = info.group
    return attributes


# ---------------------------------------------------------------- the intake loop


@dataclass(slots=True)
class IntakeStatus:
    """What the intake loop last saw, for health probes: :func:`pump` writes it, a health
    listener reads it. Times are the loop's clock (``loop.time()``).

    ``state`` is ``starting`` until the loop runs, then ``running``, ``draining`` once ``stop``
    is set, ``stopped`` at the end. ``last_ok_at`` is when a receive last succeeded (``None``:
    none yet); ``failures`` counts the receives failed since (``last_error`` the latest's
    ``Type: message``, ``failing_since`` when the first of them failed). ``beat_at`` is when the
    loop last went round, ``waiting`` whether it waits for a free slot (then no beat is due);
    ``beat_bound`` is how long one round may take (a receive's bound plus the longest backoff).
    """

    state: str = "starting"
    in_flight: int = 0
    last_ok_at: float | None = None
    failures: int = 0
    last_error: str | None = None
    failing_since: float | None = None
    beat_at: float | None = None
    waiting: bool = False
    beat_bound: float = 12.0

    def received(self, now: float) -> None:
        self.last_ok_at, self.failures, self.last_error, self.failing_since = now, 0, None, None

    def failed(self, error: str, now: float) -> None:
        if self.failures == 0:
            self.failing_since = now
        self.failures += 1
        self.last_error = error

    def stalled(self, now: float) -> bool:
        """The loop runs but has not gone round within ``beat_bound`` (nor waits for a slot)."""
        late = self.beat_at is not None and now - self.beat_at > self.beat_bound
        return self.state == "running" and not self.waiting and late


class Expiring(Protocol):
    """A wait bounded by :class:`Deadlines` that is not a task's."""

    def expire(self) -> None:
        """Past its deadline: give up."""
        ...


class Deadlines:
    """Bounds on the waits of many tasks with one timer, not one each (an asyncio timeout per
    settle costs more CPU than the settle): :meth:`begin` notes that the current task starts a
    wait that must end within ``limit`` seconds, :meth:`end` that it ended; every ``limit / 4``
    (a second at most) the tasks past their deadline are cancelled, and in the
    ``CancelledError`` that follows, :meth:`expired` tells that cancellation (taken back: the
    caller raises ``TimeoutError`` instead) from any other. A wait ends after ``limit`` plus
    that period at most. A wait that is not a task's (:meth:`hold`) is told by its ``expire``."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        # No clock read per wait: a check counts one more round; a wait begun in round r has
        # lasted ``limit`` once round r + 1 + ``_rounds`` starts. The period divides ``limit``
        # whole (at most a second and a quarter of it), so that bound is ``limit + period``.
        self._rounds = math.ceil(limit / min(1.0, limit / 4) - 1e-9)
        self.period = limit / self._rounds
        self._round = 0
        # the round each began in, in order
        self._due: dict[asyncio.Task[Any] | Expiring, int] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def begin(self) -> asyncio.Task[Any]:
        """The current task, now bounded."""
        task = asyncio.current_task()
        assert task is not None, "Deadlines.begin outside a task"
        self.hold(task)
        return task

    def hold(self, wait: asyncio.Task[Any] | Expiring) -> None:
        """Bound ``wait`` from now on (a task is cancelled past its deadline; anything else is
        told by its ``expire``), until :meth:`end`."""
        self._due[wait] = self._round
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.period, self._check)

    def end(self, wait: asyncio.Task[Any] | Expiring) -> None:
        self._due.pop(wait, None)
        if self._expired:
            self._expired.discard(wait)  # a task, if there

    def expired(self, task: asyncio.Task[Any]) -> bool:
        """Whether the ``CancelledError`` ``task`` got is its deadline's, and no other
        cancellation is pending (then the cancellation is taken back)."""
        if task not in self._expired:
            return False
        self._expired.discard(task)
        return task.uncancel() == 0

    def _check(self) -> None:
        self._timer = None
        self._round += 1
        last = self._round - 1 - self._rounds  # begun in this round or before: past the limit
        late = []
        for wait, began in self._due.items():
            if began > last:
                break
            late.append(wait)
        for wait in late:
            del self._due[wait]
            if isinstance(wait, asyncio.Task):
                self._expired.add(wait)
                wait.cancel()
            else:
                wait.expire()
        if self._due:
            self._timer = asyncio.get_running_loop().call_later(self.period, self._check)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Held:
    """An event's slot, held from the end of its task until the source's callback says how
    its settle went (see :class:`SettlesSoon`), or its deadline passes."""

    __slots__ = ("_pump", "decision", "delivery", "over", "settling")

    def __init__(self, pump: _Pump, delivery: Delivery, decision: Decision) -> None:
        self._pump = pump
        self.delivery = delivery
        self.decision = decision
        self.settling: Settling | None = None
        self.over = False

    def __call__(self, failed: BaseException | None) -> None:
        """The source's ``done``."""
        if not self.over:
            self._pump._release(self, failed)

    def expire(self) -> None:
        """Past the broker timeout: the source gives it up, the settle counts as failed."""
        self.give_up()
        self._pump._release(self, TimeoutError())

    def give_up(self) -> None:
        if not self.over and self.settling is not None:
            self.settling.give_up()


class _Reading:
    """A receive under way by callback (see :class:`ReceivesSoon`)."""

    __slots__ = ("_pump", "over", "receiving")

    def __init__(self, pump: _Pump) -> None:
        self._pump = pump
        self.receiving: Settling | None = None
        self.over = False

    def __call__(self, result: Sequence[Delivery] | BaseException) -> None:
        """The source's ``then``."""
        if not self.over:
            self._pump._arrived(self, result)

    def expire(self) -> None:
        """Past the broker timeout: the source gives it up, the receive counts as failed (as
        a ``TimeoutError``, not as whatever giving it up answers)."""
        if not self.over:
            self.over = True
            if self.receiving is not None:
                self.receiving.give_up()
            self._pump._arrived(self, TimeoutError())


_SLOW = object()  # the next receive needs Source.receive


class _Pump:
    """The intake loop and the event tasks it starts. An event holds a slot (of
    ``max_in_flight``) from its receipt until its settle is done: as its task, then (with a
    :class:`SettlesSoon` source) as a :class:`_Held` until the source's callback. The tasks
    have no done-callbacks (each would cost a turn of the event loop): they give their slot
    back themselves."""

    def __init__(
        self,
        source: Source,
        process: Callable[[Delivery], Awaitable[Decision]],
        log: Log,
        op_timeout: float,
        status: IntakeStatus,
        metrics: QueueMetrics | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()  # made where it runs (in pump())
        self._source = source
        self._settle_soon: Callable[..., Settling] | None = getattr(source, "settle_soon", None)
        self._receive_soon: Callable[..., Settling | None] | None = getattr(
            source, "receive_soon", None)  # fmt: skip
        # while the intake receives by callback: what it waits for, its stop and its limit
        self._by_callback: asyncio.Future[object] | None = None
        self._stop = asyncio.Event()
        self._limit = 0
        self._reading: _Reading | None = None
        self._pause = _RECEIVE_BACKOFF[0]  # after the next failed receive, if one failed last
        self._metrics = metrics
        self._process = process
        self._log = log
        self._throttle = Throttle(log)
        self._deadlines = Deadlines(op_timeout)
        self._tasks: set[asyncio.Task[None]] = set()
        self._held: set[_Held] = set()
        self._all_settled: asyncio.Future[None] | None = None  # while draining waits for them
        self._wake = asyncio.Event()
        self._status = status
        status.beat_bound = op_timeout + self._deadlines.period + _RECEIVE_BACKOFF[1]

    async def run(self, *, stop: asyncio.Event, max_in_flight: int, grace: float) -> None:
        watcher = asyncio.create_task(self._wake_on(stop))
        self._status.state = "running"
        try:
            await self._intake(stop, max_in_flight)
            self._status.state = "draining"
            await self._drain(grace)
        finally:
            self._status.state = "stopped"
            self._deadlines.close()
            watcher.cancel()
            tasks = [watcher, *self._tasks]
            for task in tasks:
                task.cancel()
            for held in list(self._held):  # their messages stay unsettled and come back
                held.give_up()
                held.over = True
            self._held.clear()
            await asyncio.wait(tasks)

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    async def _intake(self, stop: asyncio.Event, limit: int) -> None:
        status, loop = self._status, asyncio.get_running_loop()
        slow = self._receive_soon is None  # the next receive: Source.receive
        while not stop.is_set():
            status.beat_at = loop.time()
            free = limit - len(self._tasks) - len(self._held)
            if free <= 0:  # slots are given back on this loop, so no wake-up slips in between
                self._wake.clear()
                status.waiting = True
                await self._wake.wait()
                status.waiting = False
                continue
            if not slow:
                outcome = await self._by_callbacks(stop, limit)
                if outcome is _SLOW:
                    slow = True
                elif isinstance(outcome, BaseException):
                    await self._failed(outcome, stop)
                continue  # stopped, or no slot free: looked at above
            slow = self._receive_soon is None
            batch = await self._bounded(self._source.receive(free))
            if isinstance(batch, Exception):  # broker trouble: keep the worker alive, try again
                await self._failed(batch, stop)
                continue
            status.received(loop.time())
            if not batch:
                await asyncio.sleep(0)  # a receive that never suspends must not starve the loop
                continue
            self._start(batch)

    async def _failed(self, error: BaseException, stop: asyncio.Event) -> None:
        """A receive failed: say so (throttled), and wait (until stop at most) a pause that
        doubles while receives keep failing (:meth:`IntakeStatus.received` ends the run)."""
        status = self._status
        said = describe(error)
        pause = _RECEIVE_BACKOFF[0] if status.failures == 0 else self._pause
        status.failed(said, asyncio.get_running_loop().time())
        if self._metrics is not None:
            self._metrics.receive_failures.inc()
        self._throttle.warning("receiving from the queue failed; trying again", key=said,
                               error=said, retry_in=pause)  # fmt: skip
        self._pause = min(_RECEIVE_BACKOFF[1], pause * 2)
        await wait_or_stop(stop, pause)

    def _start(self, batch: Sequence[Delivery]) -> None:
        """A task for each delivery; each holds a slot."""
        again, create, tasks = 0, self._loop.create_task, self._tasks
        for delivery in batch:
            again += delivery.redelivered
            tasks.add(create(self._one(delivery)))
        self._status.in_flight = len(tasks) + len(self._held)
        if self._metrics is not None:
            self._metrics.received.inc(len(batch))
            if again:
                self._metrics.redelivered.inc(again)

    async def _by_callbacks(self, stop: asyncio.Event, limit: int) -> object:
        """Receive by the source's callbacks (:class:`ReceivesSoon`) until one receive needs
        :meth:`Source.receive` (``_SLOW``), one fails (its error), or the intake is stopped or
        out of slots (``None``). Each batch's tasks start where its result is parsed, and the
        next receive goes once they had their first turn."""
        self._stop, self._limit = stop, limit
        loop = self._loop
        self._by_callback = waiting = loop.create_future()
        try:
            loop.call_soon(self._read_soon)  # after the first turn of tasks just started
            return await waiting
        finally:
            self._by_callback = None
            reading, self._reading = self._reading, None
            if reading is not None:  # cancelled: the entries it may bring stay pending
                reading.over = True
                self._deadlines.end(reading)
                if reading.receiving is not None:
                    reading.receiving.give_up()

    def _read_soon(self) -> None:
        waiting = self._by_callback
        if waiting is None or waiting.done():
            return
        free = self._limit - len(self._tasks) - len(self._held)
        if free <= 0 or self._stop.is_set():
            waiting.set_result(None)
            return
        self._status.beat_at = self._loop.time()
        assert self._receive_soon is not None
        reading = _Reading(self)
        try:
            receiving = self._receive_soon(free, reading)
        except Exception as exc:  # a bug of the source's: as a failed receive
            waiting.set_result(exc)
            return
        if receiving is None:
            waiting.set_result(_SLOW)
            return
        reading.receiving = receiving
        self._reading = reading
        self._deadlines.hold(reading)

    def _arrived(self, reading: _Reading, result: Sequence[Delivery] | BaseException) -> None:
        reading.over = True
        self._reading = None
        self._deadlines.end(reading)
        waiting = self._by_callback
        if waiting is None or waiting.done():
            return  # the intake stopped receiving by callback (cancelled): entries stay pending
        if isinstance(result, BaseException):
            waiting.set_result(result)
            return
        loop = self._loop
        self._status.received(loop.time())
        if result:
            self._start(result)
            loop.call_soon(self._read_soon)  # after the tasks' first turn: see ReceivesSoon
        else:
            self._read_soon()

    async def _bounded(self, operation: Awaitable[_T]) -> _T | Exception:
        """What a broker operation (a receive, a settle) returned, or what failed it
        (``TimeoutError`` when it took longer than the broker timeout: a dead connection must
        not hold the intake or a slot, whatever the source does)."""
        task = self._deadlines.begin()
        try:
            return await operation
        except asyncio.CancelledError:
            if not self._deadlines.expired(task):
                raise
            return TimeoutError()
        except Exception as exc:
            return exc
        finally:
            self._deadlines.end(task)

    def _free(self) -> None:
        """A slot was given back."""
        self._status.in_flight = len(self._tasks) + len(self._held)
        self._wake.set()

    async def _one(self, delivery: Delivery) -> None:
        task = asyncio.current_task(self._loop)
        assert task is not None
        try:
            try:
                decision = await self._process(delivery)
            except Exception as exc:  # a bug of ours: keep the message, in the dead letters
                self._log.exception("processing a queue message failed", ref=delivery.ref)
                reason = f"WORKER_ERROR: {type(exc).__name__}"
                decision = Decision(Verdict.DEAD, reason=reason,
                                    envelope=published_envelope(delivery))  # fmt: skip
            if self._settle_soon is not None:
                self._hold(task, delivery, decision)
                return
            failed = await self._bounded(self._source.settle(delivery, decision))
            self._after_settle(delivery, decision, failed)
        finally:
            if task in self._tasks:  # not when the slot passed to a _Held
                self._tasks.discard(task)
                self._free()

    def _hold(self, task: asyncio.Task[None], delivery: Delivery, decision: Decision) -> None:
        """The settle through the source's callback; the slot passes from ``task`` (the
        event's) to a :class:`_Held` until then."""
        assert self._settle_soon is not None
        held = _Held(self, delivery, decision)
        self._held.add(held)
        self._tasks.discard(task)
        self._deadlines.hold(held)
        try:
            settling = self._settle_soon(delivery, decision, held)
        except Exception as exc:  # a bug of the source's: the message comes back
            held(exc)
            return
        if not held.over:
            held.settling = settling

    def _release(self, held: _Held, failed: BaseException | None) -> None:
        held.over = True
        self._deadlines.end(held)
        self._held.discard(held)
        self._free()
        if not self._held and self._all_settled is not None and not self._all_settled.done():
            self._all_settled.set_result(None)
        self._after_settle(held.delivery, held.decision, failed)

    def _after_settle(
        self, delivery: Delivery, decision: Decision, failed: BaseException | None
    ) -> None:
        """Count the settle, and say when it failed or was a retry or a dead letter."""
        if failed is not None:
            if self._metrics is not None:
                self._metrics.settle_failures.inc()
            token, span = current_trace.set(decision.trace), current_span_id.set(decision.span_id)
            error = describe(failed)
            self._throttle.error(
                "settling a queue message failed; the broker will deliver it again",
                key=error,
                error=error,
                ref=delivery.ref,
                verdict=decision.verdict.value,
            )
            current_span_id.reset(span)
            current_trace.reset(token)
            return
        if self._metrics is not None:
            self._count_settled(decision.verdict, self._metrics)
        if decision.verdict is not Verdict.ACK:
            self._settled(delivery, decision)

    @staticmethod
    def _count_settled(verdict: Verdict, metrics: QueueMetrics) -> None:
        if verdict is Verdict.ACK:
            metrics.acknowledged.inc()
        elif verdict is Verdict.RETRY:
            metrics.retried.inc()
        else:
            metrics.dead_lettered.inc()

    def _settled(self, delivery: Delivery, decision: Decision) -> None:
        """The line saying a retry or dead letter happened, under the message's trace; written
        once it did (a failed settle says so instead, throttled, and the message comes back)."""
        token, span = current_trace.set(decision.trace), current_span_id.set(decision.span_id)
        if decision.verdict is Verdict.RETRY:
            self._log.warning("event will be retried", reason=decision.reason,
                              attempt=delivery.attempt, ref=delivery.ref)  # fmt: skip
        else:
            self._log.error("event dead-lettered", reason=decision.reason,
                            attempts=delivery.attempt, ref=delivery.ref)  # fmt: skip
        current_span_id.reset(span)
        current_trace.reset(token)

    async def _drain(self, grace: float) -> None:
        tasks = set(self._tasks)
        in_flight = len(tasks) + len(self._held)
        self._log.info("stopping intake; waiting for in-flight events", in_flight=in_flight)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await self._source.halt()
        unfinished = 0
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()))
            unfinished = len(pending)
            for task in pending:
                task.cancel()
        if self._held:  # settles under way by callback; no task adds one any more
            self._all_settled = loop.create_future()
            await asyncio.wait([self._all_settled], timeout=max(0.0, deadline - loop.time()))
            unfinished += len(self._held)
        if unfinished:
            self._log.warning(
                "in-flight events did not finish within the grace period; "
                "they stay unacknowledged and will be delivered again",
                unfinished=unfinished,
                grace=grace,
            )


async def pump(
    source: Source,
    process: Callable[[Delivery], Awaitable[Decision]],
    *,
    stop: asyncio.Event,
    max_in_flight: int,
    grace: float,
    log: Log,
    op_timeout: float = 10.0,
    status: IntakeStatus | None = None,
    metrics: QueueMetrics | None = None,
) -> None:
    """Receive from ``source``, process at most ``max_in_flight`` at once, settle each; drain on
    ``stop`` (``grace`` seconds, then cancel the rest, which stays unsettled). One receive and
    one settle may take ``op_timeout`` seconds (then it counts as failed; the bound is checked
    every ``op_timeout / 4``, a second at most, see :class:`Deadlines`). ``status``,
    when given, follows the loop for health probes (see :class:`IntakeStatus`); ``metrics``
    count what is received and how each message was settled.

    Repeated identical failures (the broker is down) are logged at most once a second each."""
    pumping = _Pump(source, process, log, op_timeout, status or IntakeStatus(), metrics)
    await pumping.run(stop=stop, max_in_flight=max_in_flight, grace=grace)


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Wait ``seconds``, or less if ``stop`` is set meanwhile."""
    try:
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        pass


async def consume(
    source: Source,
    handle: Handle,
    *,
    settings: Settings,
    stop: asyncio.Event,
    log: Log,
    status: IntakeStatus | None = None,
    metrics: Metrics | None = None,
    refuse: Refuse | None = None,
    traced: bool = True,
) -> None:
    """Serve the (entered) ``source`` through ``handle`` (``Dispatcher.handle``) until ``stop``
    is set, then drain: :func:`pump` with the worker's settings and the source's retry policy;
    ``status`` follows the intake loop for health probes; ``metrics`` count the source's
    messages under its name (and its consumer lag, when it can tell); ``refuse``
    (``Dispatcher.refuse``) answers messages that never became events; ``traced``: spans are
    exported (each event's carries the source's attributes)."""
    biot, worker = settings.biot, settings.worker
    info = source_info(source)
    process = Processor(
        handle,
        errors=ErrorContext(biot.app_name, biot.environment),
        policy=source.policy,
        max_body_bytes=worker.max_body_bytes,
        log=log,
        info=info,
        refuse=refuse,
        traced=traced,
    )
    counted = None if metrics is None else metrics.watch_queue(
        info.destination if info is not None else "unknown", _lag_of(source))  # fmt: skip
    await pump(
        source,
        process,
        stop=stop,
        max_in_flight=worker.max_in_flight,
        grace=worker.shutdown_grace,
        log=log,
        op_timeout=worker.broker_timeout,
        status=status,
        metrics=counted,
    )


def source_info(source: Source) -> QueueInfo | None:
    """What ``source`` says it is (see :class:`Observable`), if it says."""
    info = getattr(source, "info", None)
    return info if isinstance(info, QueueInfo) else None


def _lag_of(source: Source) -> Callable[[], Awaitable[int | None]] | None:
    lag = getattr(source, "lag", None)
    return lag if callable(lag) else None


# ---------------------------------------------------------------- URLs


def split_url(url: str, names: Sequence[str]) -> tuple[str, dict[str, str]]:
    """``url`` without the query parameters in ``names``, and those parameters.

    Other parameters stay on the URL for the broker's client library.
    """
    parts = urlsplit(url)
    ours: dict[str, str] = {}
    theirs: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in names:
            ours[key] = value
        else:
            theirs.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(theirs))), ours


def retry_policy(params: dict[str, str]) -> RetryPolicy:
    """The retry policy named by ``max_attempts``, ``retry_delay``, ``retry_max_delay``."""
    default = RetryPolicy()
    try:
        delay = float(params.get("retry_delay", default.delay))
        return RetryPolicy(
            max_attempts=int(params.get("max_attempts", default.max_attempts)),
            delay=delay,
            max_delay=float(params.get("retry_max_delay", max(default.max_delay, delay))),
        )
    except ValueError as exc:
        raise ValueError(f"bad retry parameter: {exc}") from None


def positive(params: dict[str, str], name: str, default: float) -> float:
    """Parameter ``name`` as a number above 0; ``ValueError`` naming it otherwise."""
    try:
        value = float(params.get(name, default))
    except ValueError:
        raise ValueError(f"{name} must be a number, got {params[name]!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be greater than 0, got {value}")
    return value


_SECRET_PARAM = re.compile(r"pass|token|secret|key|auth|credential", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for logs: the one in its user part and
    any query parameter whose name speaks of a password, token, secret, key or credential
    (redis-py takes ``password``; other URLs carry ``token`` or ``api_key``)."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if any(_SECRET_PARAM.search(k) for k, _ in pairs):
        query = [(k, "***" if _SECRET_PARAM.search(k) else v) for k, v in pairs]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return urlunsplit(parts)
