"""Queue messages: what a source delivers, and what becomes of it once the dispatcher answered.

A message is the queue envelope of DESIGN.md, a JSON object ``{"headers": {...}, "body": ...}``
(the shape of a Lambda Function URL event, so a captured BioT call replays unchanged), plus the
broker's own ``reply_to``/correlation id and an attempt count. :class:`Processor` turns one
:class:`Delivery` into a :class:`Decision`; it never raises (except ``CancelledError``):

- **ack**: handled. This includes an interceptor's :class:`~worker.errors.Block`, which is its
  answer, not a failure.
- **retry**: a transient failure (timeout, 5xx from BioT, login outage) before the last attempt;
  the source re-queues the message after ``delay`` with ``attempt + 1``.
- **dead**: a permanent failure (bad JWT, malformed or oversized envelope, a handler's bug), the
  last attempt of a transient one, or a message delivered more than ``max_attempts`` times
  without being settled (a consumer crashing on it). ``reason`` says why.

A delivery with ``reply_to`` gets the response (success or error) as a reply with a final
decision; nothing is sent for a retry. The reply body is a Function URL response:
``{"statusCode", "headers", "body"}`` with ``body`` the response's JSON text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from worker.dispatch import Outcome
from worker.errors import Block, EventError, PayloadTooLarge, WorkerError
from worker.events import Event, HookType, event_from_envelope, lower_headers
from worker.logs import Log
from worker.responses import ErrorContext, Response, error_response
from worker.tracing import TraceContext, current_trace, trace_from_headers

Handle = Callable[[Event], Awaitable[Outcome]]

#: The header a handler reads to know which attempt this is (1 for the first delivery).
ATTEMPT_HEADER = "x-delivery-attempt"
# An envelope is JSON text around the body (escaping can double it): refuse to parse beyond this.
_ENVELOPE_SLACK = 65_536
HOOKS = tuple(hook.value for hook in HookType)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message as a broker handed it over."""

    body: bytes
    attempt: int = 1
    reply_to: str | None = None
    correlation_id: str | None = None


class Verdict(StrEnum):
    ACK = "ack"
    RETRY = "retry"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reply: bytes | None = None  # send to the delivery's reply_to before settling
    reason: str = ""  # why it was dead-lettered (or retried)
    delay: float = 0.0  # seconds before the retry
    status: int | None = None  # the response status, when there was one


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
    """The event a delivery carries; :class:`EventError` when it is not a valid envelope."""
    if _too_large(delivery.body, max_body_bytes):
        raise PayloadTooLarge(f"queue message of {len(delivery.body)} bytes is too large")
    if not delivery.body.strip():
        raise EventError("queue message is empty")
    try:
        envelope = orjson.loads(delivery.body)
    except orjson.JSONDecodeError as exc:
        raise EventError(f"queue message is not JSON: {exc.msg}") from None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("headers"), Mapping):
        raise EventError("queue message is not an envelope with a headers object")
    headers = {**lower_headers(envelope["headers"]), ATTEMPT_HEADER: str(delivery.attempt)}
    event = event_from_envelope(
        {**envelope, "headers": headers}, received_at=received_at, max_body_bytes=max_body_bytes
    )
    event.attempt = delivery.attempt
    return event


def _headers_of(raw: bytes) -> Mapping[str, str]:
    """Best-effort headers of a message that failed to parse (for its error's trace id)."""
    try:
        headers = orjson.loads(raw).get("headers")
        return lower_headers(headers) if isinstance(headers, Mapping) else {}
    except Exception:  # anything unparseable simply has no headers
        return {}


class Processor:
    """Decode, dispatch and judge one delivery. Logs every retry and dead letter."""

    def __init__(
        self,
        handle: Handle,
        *,
        errors: ErrorContext,
        policy: RetryPolicy,
        max_body_bytes: int,
        log: Log,
    ) -> None:
        self._handle = handle
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
            too_large = _too_large(delivery.body, self._max_body)
            headers = {} if too_large else _headers_of(delivery.body)
            trace = trace_from_headers(headers)
            response = error_response(exc, trace, self._errors)
            return self._judge(delivery, Outcome(response, exc), trace)
        return self._judge(delivery, await self._handle(event), event.trace)

    def _judge(self, delivery: Delivery, outcome: Outcome, trace: TraceContext) -> Decision:
        response, error = outcome.response, outcome.error
        reply = encode_reply(response) if delivery.reply_to else None
        if error is None or isinstance(error, Block):
            return Decision(Verdict.ACK, reply, status=response.status)
        reason = f"{error.code}: {error.message}"
        attempt = delivery.attempt
        token = current_trace.set(trace)
        try:
            if outcome.transient and attempt < self._policy.max_attempts:
                delay = self._policy.delay_for(attempt)
                self._log.warning("event will be retried", reason=reason, attempt=attempt)
                return Decision(Verdict.RETRY, None, reason, delay, response.status)
            if outcome.transient:
                reason += f" (gave up after {attempt} attempts)"
            self._log.error("event dead-lettered", reason=reason, attempts=attempt)
            return Decision(Verdict.DEAD, reply, reason, status=response.status)
        finally:
            current_trace.reset(token)
