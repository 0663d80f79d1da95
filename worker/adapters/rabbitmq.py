"""RabbitMQ source (aio-pika): a durable queue, prefetch bounded by max in flight, ack after the
outcome, delayed retries, a dead-letter exchange, RPC replies.

URL: ``amqp://USER:PASSWORD@HOST[:PORT]/[VHOST]?queue=biot-events`` plus, optional,
``max_attempts`` (5), ``retry_delay`` (1 s, doubling), ``retry_max_delay`` (60 s); ``amqps://``
for TLS; other parameters go to aio-pika (``heartbeat``, ...).

Topology, declared idempotently by the worker and by ``publish``:

- ``QUEUE``: durable, ``x-dead-letter-exchange=QUEUE.dlx``;
- ``QUEUE.dlx``: durable fanout exchange bound to ``QUEUE.dead`` (durable): the dead letters;
- ``QUEUE.retry.<ms>ms``: durable, ``x-message-ttl=<ms>``, dead-lettering back into ``QUEUE``:
  one queue per retry delay, so a message never waits behind one with a longer delay.

A message's body is the envelope; ``reply_to`` and ``correlation_id`` are its properties;
the ``x-biot-attempt`` header counts attempts (1 when absent). Settling: the reply (default
exchange, routing key ``reply_to``, same ``correlation_id``), then a copy (its body the
decision's ``envelope`` when set) to the retry queue of its delay (``attempt + 1``,
``x-biot-last-error``) or to ``QUEUE.dlx`` (``x-biot-reason``, ``x-biot-attempts``,
``x-biot-status``), each confirmed by the broker, then the ack.

Faults (every broker operation, connecting included, is bounded by ``WORKER_BROKER_TIMEOUT``):

- The source owns one connection and channel at a time (a *link*). A message can only be
  settled through the link it came on: when that link is lost (the connection cut, the channel
  closed, or an operation on it timed out, which closes it), the broker requeues everything it
  had delivered and not acknowledged. Messages still buffered are then dropped, and settling one
  that was in flight fails at once (no wait on a dead socket). The next ``receive`` reconnects,
  declares the topology again and consumes; the pump backs off between failed attempts.
- A message delivered again (``redelivered``) counts as an attempt, unless this process had
  received it on a link that was lost before it was settled: the broker's redelivery is then
  the same attempt again (the message was being handled here, or never started), so connection
  cuts never push a message towards ``REDELIVERY_LIMIT``. Deliveries still on the wire at the
  loss (or acked with the ack lost) were never seen here: up to ``prefetch`` minus what the link
  held, redeliveries not known are excused too, until the first message that was not
  redelivered arrives (the broker requeues ahead of it). Only a redelivery this process cannot
  explain (a fresh process, or one whose consumer died on it) counts: the message is
  re-published with ``attempt + 1`` (confirmed by the broker) and then acknowledged, so one that
  keeps killing its consumer ends in the dead letters. If that ack fails, the original comes
  back and is only acknowledged (its copy is queued): at most one extra copy per failed ack.
  A message is known by its ``message_id``, else by a digest of its body and headers; what this
  process remembers is bounded (the oldest entries are forgotten first).
- A receive never loses what it took from the buffer: a message whose redelivery could not be
  counted stays first in the buffer and is tried again by the next receive.
- Observability (:class:`~worker.adapters.queue.Observable`): ``info`` is
  ``QueueInfo("rabbitmq", QUEUE)``; :meth:`RabbitSource.lag` the messages ready in ``QUEUE``.
  A delivery is ``redelivered`` when the broker says so (also one excused as the same attempt),
  or when it is the copy of a counted redelivery (the ``x-biot-redelivered`` header, which a
  retry's or a dead letter's copy does not carry): a retry coming back is not a redelivery.
- Dead-letter length: no queue argument here, because re-declaring an existing queue with other
  arguments fails (``PRECONDITION_FAILED``) and would stop every worker after a change of the
  cap. Cap ``QUEUE.dead`` with a RabbitMQ policy instead (``max-length``), which can change at
  any time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    DeliveryMode,
    ExchangeType,
)
from aio_pika.exceptions import AMQPError, ChannelNotFoundEntity

from config.settings import Settings
from worker.adapters.queue import (
    RETRY_PARAMS,
    Decision,
    Delivery,
    QueueInfo,
    RetryPolicy,
    SourceUnavailable,
    Verdict,
    redact_url,
    retry_policy,
    split_url,
)
from worker.logs import Log, Throttle, describe

ATTEMPT = "x-biot-attempt"
REDELIVERED = "x-biot-redelivered"  # on the copy of a counted redelivery (see _count)
_POLL = 0.25  # longest wait of one receive, so the intake loop sees ``stop`` promptly
_REMEMBERED = 10_000  # message identities kept per kind (excused, copied); oldest go first
_T = TypeVar("_T")
_BROKER_HEADERS = ("x-death", "x-first-death-exchange", "x-first-death-queue",
                   "x-first-death-reason", "x-last-death-exchange", "x-last-death-queue",
                   "x-last-death-reason")  # fmt: skip


@dataclass(frozen=True, slots=True)
class RabbitOptions:
    url: str  # for aio-pika, without our parameters
    queue: str

    @property
    def exchange(self) -> str:
        return f"{self.queue}.dlx"

    @property
    def dead_letter(self) -> str:
        return f"{self.queue}.dead"

    def retry_queue(self, delay_ms: int) -> str:
        return f"{self.queue}.retry.{delay_ms}ms"

    @classmethod
    def parse(cls, url: str) -> tuple[RabbitOptions, dict[str, str]]:
        base, params = split_url(url, ("queue", *RETRY_PARAMS))
        return cls(base, params.get("queue") or "biot-events"), params


async def declare(
    channel: AbstractChannel, options: RabbitOptions, retry_delays_ms: Iterable[int] = ()
) -> tuple[AbstractQueue, AbstractExchange]:
    """Declare the topology; returns the main queue and the dead-letter exchange."""
    exchange = await channel.declare_exchange(options.exchange, ExchangeType.FANOUT, durable=True)
    dead = await channel.declare_queue(options.dead_letter, durable=True)
    await dead.bind(exchange)
    queue = await channel.declare_queue(
        options.queue, durable=True, arguments={"x-dead-letter-exchange": options.exchange}
    )
    for delay in retry_delays_ms:
        await channel.declare_queue(
            options.retry_queue(delay),
            durable=True,
            arguments={
                "x-message-ttl": delay,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": options.queue,
            },
        )
    return queue, exchange


def retry_delays_ms(policy: RetryPolicy) -> list[int]:
    """The distinct retry delays of ``policy`` in ms: one retry queue each."""
    return sorted({_ms(policy.delay_for(n)) for n in range(1, policy.max_attempts)} - {0})


async def connect(url: str, display: str) -> AbstractRobustConnection:
    try:
        return await aio_pika.connect_robust(url)
    except (AMQPError, OSError) as exc:
        raise SourceUnavailable(f"{display}: {exc!r}") from exc


class RabbitSource:
    """A :class:`~worker.adapters.queue.Source` on a RabbitMQ queue (see the module's doc)."""

    def __init__(self, url: str, *, settings: Settings, log: Log) -> None:
        self.options, params = RabbitOptions.parse(url)
        self.policy = retry_policy(params)
        # A delivery's ref is its delivery tag, a per-channel counter, not a message id.
        self.info = QueueInfo(
            "rabbitmq", self.options.queue, ref_attribute="messaging.rabbitmq.message.delivery_tag"
        )
        self._settings = settings
        self._timeout = settings.worker.broker_timeout
        self._log = log
        self._throttle = Throttle(log)
        self._display = redact_url(url)
        self._link: _Link | None = None
        self._arrived = asyncio.Event()  # a message came in, or a link was lost
        self._excused = _Recent()  # held on a lost link: their redelivery is no new attempt
        self._copied = _Recent()  # counted: the copy is queued, the original not yet acked
        self._unexplained = 0  # redeliveries a lost link may cause that this process never saw
        self._lost_at: float | None = None
        self._halted = False
        self._counting: asyncio.Future[int | None] | None = None  # the lag asked of the broker

    @property
    def retry_delays_ms(self) -> list[int]:
        return retry_delays_ms(self.policy)

    async def __aenter__(self) -> RabbitSource:
        self._halted = False
        self._link = await self._open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._halted = True
        link, self._link = self._link, None
        if link is not None:
            await self._halt(link)
            self._forget(link)
            await self._close(link.connection)
        counting, self._counting = self._counting, None
        if counting is not None:  # its link is closed now: it ends at once (or times out)
            await asyncio.wait([counting], timeout=self._timeout)

    async def halt(self) -> None:
        """Cancel the consumer and hand back what was delivered but never started."""
        self._halted = True
        if self._link is not None:
            await self._halt(self._link)

    async def receive(self, limit: int) -> Sequence[Delivery]:
        if self._halted:
            return []
        link = await self._live()
        if not link.buffer and not link.ready:
            await self._wait()
        if not link.alive:
            return []  # the next receive reconnects
        try:
            await self._admit(link, limit)
        except Exception as exc:  # the message stays first in the buffer for the next receive
            if not link.ready:
                raise
            self._warn("counting a redelivered message failed; trying again", exc, link.buffer)
        return [link.ready.popleft() for _ in range(min(limit, len(link.ready)))]

    async def settle(self, delivery: Delivery, decision: Decision) -> None:
        held: _Held = delivery.message
        link, message = held.link, held.message
        if not link.alive:
            self._forget(link)
            raise LinkLost("its connection was lost; the broker delivers it again")
        try:
            await self._on(link, self._send(link, message, delivery, decision))
            await self._on(link, message.ack())
        except BaseException:  # cancelled too: never leave it unacknowledged on a live link
            await self._give_back(link, message)
            raise
        finally:
            link.release(held.key)

    async def lag(self) -> int | None:
        """Messages ready in the queue (not those delivered and unacknowledged, nor those
        waiting in a retry queue), from a passive declare on the current link; ``None`` with no
        live link (nothing is opened for it) or when the queue is gone. Bounded like every
        operation on the link (a timeout gives the link up, as aiormq closes a channel whose
        call was abandoned). A caller that stops waiting does not cancel the declare, which
        would close the channel: it goes on, and the next caller waits for that one."""
        link = self._link
        if link is None or not link.alive:
            return None
        counting = self._counting
        if counting is None or counting.done():
            counting = self._counting = asyncio.ensure_future(self._on(link, self._ready(link)))
            counting.add_done_callback(_retrieve)
        return await asyncio.shield(counting)

    async def _ready(self, link: _Link) -> int | None:
        # The aiormq channel: aio-pika's passive declare may answer from its cache. When the
        # queue was deleted the broker closes the channel (its consumer is gone anyway), and
        # the next receive declares it again on a new link.
        channel = await link.channel.get_underlay_channel()
        try:
            declared = await channel.queue_declare(self.options.queue, passive=True)
        except ChannelNotFoundEntity:
            return None
        return declared.message_count or 0

    # ------------------------------------------------------------ the link

    async def _open(self) -> _Link:
        """A new link: connected, topology declared, not yet consuming."""
        try:
            connection = await aio_pika.connect(self.options.url, timeout=self._timeout)
        except (AMQPError, OSError, TimeoutError) as exc:
            raise SourceUnavailable(f"{self._display}: {describe(exc)}") from exc
        try:
            async with asyncio.timeout(self._timeout):
                channel = await connection.channel(on_return_raises=True)
                await channel.set_qos(prefetch_count=self._settings.worker.max_in_flight)
                queue, exchange = await declare(channel, self.options, self.retry_delays_ms)
        except BaseException as exc:
            await self._close(connection)
            if isinstance(exc, AMQPError | OSError | TimeoutError):
                raise SourceUnavailable(f"{self._display}: {describe(exc)}") from exc
            raise
        link = _Link(connection, channel, queue, exchange)

        def on_close(*_: object) -> None:
            if not link.gone.done():
                link.gone.set_result(None)
            self._arrived.set()  # a receive waiting for messages sees the loss at once

        connection.close_callbacks.add(on_close)
        channel.close_callbacks.add(on_close)
        return link

    async def _live(self) -> _Link:
        """The current link, consuming; a lost one is closed and replaced (raises when the
        broker cannot be reached: the pump backs off and calls again)."""
        link = self._link
        if link is not None and not link.alive:
            self._forget(link)
            self._link = None
            await self._close(link.connection)
        if self._link is None:
            self._link = await self._open()
        link = self._link
        if link.tag is None:
            async def on_message(message: AbstractIncomingMessage) -> None:
                if not link.lost:
                    link.buffer.append(message)
                    self._arrived.set()

            link.tag = await self._on(link, link.queue.consume(on_message, no_ack=False))
            self._resumed()
        return link

    def _forget(self, link: _Link) -> None:
        """Mark ``link`` lost (idempotent): what it held and buffered is the broker's again, and
        its redelivery is no new attempt."""
        if link.lost:
            return
        link.lost = True
        held = sum(link.held.values())
        self._excused.add(*link.held.elements())
        self._excused.add(*(_identity(m) for m in link.buffer if not m.redelivered))
        dropped = len(link.buffer)
        # The broker had up to ``prefetch`` unacknowledged deliveries on the link; those not
        # known here were on the wire, or acked with the ack lost: redelivered, not counted.
        prefetch = self._settings.worker.max_in_flight
        unknown = max(0, prefetch - held - dropped)
        self._unexplained = min(_REMEMBERED, self._unexplained + unknown)
        link.buffer.clear()
        link.ready.clear()
        if not self._halted and self._lost_at is None:
            self._lost_at = asyncio.get_running_loop().time()
            self._throttle.warning(
                "the connection to RabbitMQ was lost; reconnecting", key=self._display,
                source=self._display, in_flight=held, dropped=dropped,
            )  # fmt: skip

    def _resumed(self) -> None:
        if self._lost_at is not None:
            down = asyncio.get_running_loop().time() - self._lost_at
            self._lost_at = None
            self._log.info("consuming again after the connection was lost", down_s=round(down, 3))

    async def _wait(self) -> None:
        """Wait a short poll interval at most for a message (or a loss)."""
        self._arrived.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_POLL):
                await self._arrived.wait()

    async def _halt(self, link: _Link) -> None:
        tag, link.tag = link.tag, None
        try:
            if tag is not None and link.alive:
                await self._on(link, link.queue.cancel(tag))
            for message in [*(d.message.message for d in link.ready), *link.buffer]:
                await self._on(link, message.nack(requeue=True))
            link.ready.clear()
            link.buffer.clear()
        except Exception as exc:  # the channel is gone: the broker requeues unacked ones itself
            self._log.warning("stopping the consumer failed", error=describe(exc))
            self._forget(link)

    async def _close(self, connection: AbstractConnection) -> None:
        """Close ``connection``, waiting the broker timeout at most."""
        try:
            await self._bounded(connection.close())
        except Exception as exc:
            self._log.warning("closing the connection to RabbitMQ failed", error=describe(exc))

    async def _bounded(self, operation: Awaitable[_T]) -> _T:
        async with asyncio.timeout(self._timeout):
            return await operation

    async def _on(self, link: _Link, operation: Awaitable[_T]) -> _T:
        """``operation`` on ``link``, bounded; it fails at once with :class:`LinkLost` when the
        link closes meanwhile (aio-pika can wait for ever writing to a dead socket), and one
        that times out gives the link up (closing it makes the broker deliver its messages
        again)."""
        task = asyncio.ensure_future(operation)
        either: list[asyncio.Future[Any]] = [task, link.gone]
        try:
            await asyncio.wait(either, timeout=self._timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                task.add_done_callback(_retrieve)
        if task.done() and not task.cancelled():
            return task.result()
        self._forget(link)
        self._arrived.set()
        if link.gone.done():
            raise LinkLost("the connection to RabbitMQ was lost")
        raise TimeoutError(f"no answer from RabbitMQ within {self._timeout} s")

    # ------------------------------------------------------------ intake

    async def _admit(self, link: _Link, limit: int) -> None:
        """Move buffered messages to ``link.ready`` (up to ``limit``), counting redeliveries; a
        message leaves the buffer only once admitted or counted."""
        while link.buffer and len(link.ready) < limit:
            message = link.buffer[0]
            key = _identity(message)
            handle = not message.redelivered or self._excused.take(key) or self._explained()
            if not message.redelivered:  # the broker's requeued messages came before it
                self._unexplained = 0
            if not handle:
                await self._count(message, link, key)
            link.buffer.popleft()
            if handle:
                link.held[key] += 1
                link.ready.append(delivery_of(message, _Held(message, link, key)))

    def _explained(self) -> bool:
        """Whether one more unknown redelivery can be one a lost link caused (see
        :meth:`_forget`)."""
        if self._unexplained <= 0:
            return False
        self._unexplained -= 1
        return True

    async def _count(self, message: AbstractIncomingMessage, link: _Link, key: str) -> None:
        """Re-publish ``message`` with ``attempt + 1`` (confirmed), then ack it; when its copy
        is already queued (an ack failed before), only ack it."""
        if key not in self._copied:
            attempt = delivery_of(message).attempt + 1
            publish = link.channel.default_exchange.publish(
                copy(message, {ATTEMPT: attempt, REDELIVERED: True}), self.options.queue
            )
            await self._on(link, publish)
            self._copied.add(key)
        await self._on(link, message.ack())
        self._copied.take(key)

    # ------------------------------------------------------------ settling

    async def _send(
        self,
        link: _Link,
        message: AbstractIncomingMessage,
        delivery: Delivery,
        decision: Decision,
    ) -> None:
        if decision.reply is not None and delivery.reply_to:
            reply = aio_pika.Message(
                decision.reply,
                content_type="application/json",
                correlation_id=delivery.correlation_id,
            )
            await link.channel.default_exchange.publish(
                reply, routing_key=delivery.reply_to, mandatory=False
            )
        if decision.verdict is Verdict.RETRY:
            headers = {ATTEMPT: delivery.attempt + 1, "x-biot-last-error": decision.reason}
            o = self.options
            retry = o.retry_queue(_ms(decision.delay)) if decision.delay else o.queue
            body = decision.envelope
            await link.channel.default_exchange.publish(copy(message, headers, body), retry)
        elif decision.verdict is Verdict.DEAD:
            headers = {"x-biot-reason": decision.reason, "x-biot-attempts": delivery.attempt}
            if decision.status is not None:
                headers["x-biot-status"] = decision.status
            body = decision.envelope
            await link.exchange.publish(copy(message, headers, body), self.options.queue)

    async def _give_back(self, link: _Link, message: AbstractIncomingMessage) -> None:
        """Requeue ``message`` after a failed settle; when even that fails, give up the link,
        so that closing it requeues the message."""
        if not link.alive:
            self._forget(link)
            return
        try:
            await self._on(link, message.nack(requeue=True))
        except Exception as exc:
            self._warn("requeueing a message failed; reconnecting", exc, [message])
            self._forget(link)
            self._arrived.set()

    def _warn(self, what: str, exc: Exception, messages: Iterable[AbstractIncomingMessage]) -> None:
        error = describe(exc)
        ref = next((_ref(m) for m in messages), "")
        self._throttle.warning(what, key=error, error=error, ref=ref)


class LinkLost(AMQPError):
    """The connection or channel a message came on is gone: it cannot be settled any more."""


@dataclass(frozen=True, slots=True)
class _Held:
    """What :attr:`Delivery.message` holds: the message, the link it came on, its identity."""

    message: AbstractIncomingMessage
    link: _Link
    key: str


@dataclass(eq=False)
class _Link:
    """One connection, its channel and consumer. ``buffer``: delivered, not yet admitted;
    ``ready``: admitted, not yet handed out; ``held``: identities admitted and not settled."""

    connection: AbstractConnection
    channel: AbstractChannel
    queue: AbstractQueue
    exchange: AbstractExchange
    buffer: deque[AbstractIncomingMessage] = field(default_factory=deque)
    ready: deque[Delivery] = field(default_factory=deque)
    held: Counter[str] = field(default_factory=Counter)
    tag: str | None = None
    lost: bool = False
    gone: asyncio.Future[None] = field(default_factory=lambda: asyncio.Future())  # closed

    @property
    def alive(self) -> bool:
        closed = self.gone.done() or self.connection.is_closed or self.channel.is_closed
        return not (self.lost or closed)

    def release(self, key: str) -> None:
        if not self.lost:  # a lost link's holdings were excused as they were
            self.held[key] -= 1
            if self.held[key] <= 0:
                del self.held[key]


class _Recent:
    """A bounded multiset of message identities; the oldest go first past ``size``."""

    def __init__(self, size: int = _REMEMBERED) -> None:
        self._size = size
        self._counts: OrderedDict[str, int] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._counts

    def add(self, *keys: str) -> None:
        for key in keys:
            self._counts[key] = self._counts.get(key, 0) + 1
            self._counts.move_to_end(key)
        while len(self._counts) > self._size:
            self._counts.popitem(last=False)

    def take(self, key: str) -> bool:
        """Remove one ``key``; whether there was one."""
        count = self._counts.get(key, 0)
        if count <= 1:
            return self._counts.pop(key, None) is not None
        self._counts[key] = count - 1
        return True


def _identity(message: AbstractIncomingMessage) -> str:
    """``message``'s ``message_id``, else a digest of its body and (own) headers."""
    if message.message_id:
        return f"id:{message.message_id}"
    digest = hashlib.blake2b(message.body, digest_size=16)
    for name, value in sorted((message.headers or {}).items()):
        if name not in _BROKER_HEADERS:
            digest.update(repr((name, value)).encode())
    return digest.hexdigest()


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Done-callback of an abandoned operation: its outcome is not wanted (no warning)."""
    if not task.cancelled():
        task.exception()


def _ref(message: AbstractIncomingMessage) -> str:
    return f"{message.delivery_tag}" if message.delivery_tag is not None else ""


def copy(
    message: AbstractIncomingMessage, headers: dict[str, Any], body: bytes | None = None
) -> aio_pika.Message:
    """``message`` to publish again, persistent, with ``headers`` added (broker ones and
    ``REDELIVERED`` dropped), its body replaced by ``body`` when given."""
    dropped = (*_BROKER_HEADERS, REDELIVERED)
    kept = {k: v for k, v in (message.headers or {}).items() if k not in dropped}
    return aio_pika.Message(
        message.body if body is None else body,
        headers={**kept, **headers},
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=DeliveryMode.PERSISTENT,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        type=message.type,
        app_id=message.app_id,
    )


def delivery_of(message: AbstractIncomingMessage, handle: Any = None) -> Delivery:
    """``message`` as a :class:`Delivery` whose ``message`` is ``handle`` (what settling
    needs); ``redelivered`` when the broker says so or it is a counted redelivery's copy."""
    headers = message.headers or {}
    raw = headers.get(ATTEMPT, 1)
    try:
        attempt = max(1, int(raw.decode() if isinstance(raw, bytes) else raw))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        attempt = 1
    again = bool(message.redelivered) or bool(headers.get(REDELIVERED))
    return Delivery(
        message.body, attempt, message.reply_to, message.correlation_id, handle, _ref(message),
        redelivered=again,
    )  # fmt: skip


def envelope_message(
    body: bytes, *, reply_to: str | None = None, correlation_id: str | None = None
) -> aio_pika.Message:
    """A persistent message carrying ``body`` (what ``publish`` sends)."""
    return aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=DeliveryMode.PERSISTENT,
        reply_to=reply_to,
        correlation_id=correlation_id,
    )


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def source_from_url(url: str, *, settings: Settings, log: Log) -> RabbitSource:
    """The source an ``amqp://`` or ``amqps://`` URL names (see the module's doc)."""
    return RabbitSource(url, settings=settings, log=log)
