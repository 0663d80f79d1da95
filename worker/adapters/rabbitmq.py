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
A message delivered again after a consumer died (``redelivered``) is first re-published with
``attempt + 1`` and acked, so one that keeps killing its consumer ends in the dead letters.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    DeliveryMode,
    ExchangeType,
)
from aio_pika.exceptions import AMQPError

from config.settings import Settings
from worker.adapters.queue import (
    RETRY_PARAMS,
    Decision,
    Delivery,
    RetryPolicy,
    SourceUnavailable,
    Verdict,
    redact_url,
    retry_policy,
    split_url,
)
from worker.logs import Log

ATTEMPT = "x-biot-attempt"
_POLL = 0.25  # longest wait of one receive, so the intake loop sees ``stop`` promptly
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
        self._settings = settings
        self._log = log
        self._display = redact_url(url)
        self._connection: AbstractRobustConnection | None = None
        self._buffer: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._tag: str | None = None

    @property
    def retry_delays_ms(self) -> list[int]:
        return retry_delays_ms(self.policy)

    async def __aenter__(self) -> RabbitSource:
        self._connection = await connect(self.options.url, self._display)
        prefetch = self._settings.worker.max_in_flight
        try:
            self._channel = await self._connection.channel(on_return_raises=True)
            await self._channel.set_qos(prefetch_count=prefetch)
            self._queue, self._exchange = await declare(
                self._channel, self.options, self.retry_delays_ms
            )
        except AMQPError as exc:
            await self.__aexit__()
            raise SourceUnavailable(f"{self._display}: {exc!r}") from exc
        # The broker sends at most ``prefetch`` unacked messages, which bounds the buffer.
        self._buffer = asyncio.Queue(maxsize=prefetch)
        self._tag = None
        return self

    async def __aexit__(self, *exc: object) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await self.halt()
            await connection.close()

    async def halt(self) -> None:
        """Cancel the consumer and hand back what was delivered but never started."""
        tag, self._tag = self._tag, None
        try:
            if tag is not None:
                await self._queue.cancel(tag)
            while not self._buffer.empty():
                await self._buffer.get_nowait().nack(requeue=True)
        except AMQPError as exc:  # the channel is gone: the broker requeues unacked ones itself
            self._log.warning("stopping the consumer failed", error=repr(exc)[:300])

    async def receive(self, limit: int) -> Sequence[Delivery]:
        if self._tag is None:  # consume from the first receive: entering only declares
            self._tag = await self._queue.consume(self._buffer.put, no_ack=False)
        try:
            async with asyncio.timeout(_POLL):
                messages = [await self._buffer.get()]
        except TimeoutError:
            return []
        while len(messages) < limit and not self._buffer.empty():
            messages.append(self._buffer.get_nowait())
        batch = []
        for message in messages:
            if message.redelivered:
                await self._count_redelivery(message)
            else:
                batch.append(delivery_of(message))
        return batch

    async def settle(self, delivery: Delivery, decision: Decision) -> None:
        message: AbstractIncomingMessage = delivery.message
        try:
            await self._send(message, delivery, decision)
        except BaseException:
            await _nack(message)  # not settled: let the broker deliver it again
            raise
        await message.ack()

    async def _send(
        self, message: AbstractIncomingMessage, delivery: Delivery, decision: Decision
    ) -> None:
        if decision.reply is not None and delivery.reply_to:
            reply = aio_pika.Message(
                decision.reply,
                content_type="application/json",
                correlation_id=delivery.correlation_id,
            )
            await self._channel.default_exchange.publish(
                reply, routing_key=delivery.reply_to, mandatory=False
            )
        if decision.verdict is Verdict.RETRY:
            headers = {ATTEMPT: delivery.attempt + 1, "x-biot-last-error": decision.reason}
            o = self.options
            retry = o.retry_queue(_ms(decision.delay)) if decision.delay else o.queue
            body = decision.envelope
            await self._channel.default_exchange.publish(copy(message, headers, body), retry)
        elif decision.verdict is Verdict.DEAD:
            headers = {"x-biot-reason": decision.reason, "x-biot-attempts": delivery.attempt}
            if decision.status is not None:
                headers["x-biot-status"] = decision.status
            body = decision.envelope
            await self._exchange.publish(copy(message, headers, body), self.options.queue)

    async def _count_redelivery(self, message: AbstractIncomingMessage) -> None:
        attempt = delivery_of(message).attempt + 1
        try:
            await self._channel.default_exchange.publish(
                copy(message, {ATTEMPT: attempt}), self.options.queue
            )
            await message.ack()
        except AMQPError as exc:
            self._log.warning("re-publishing a redelivered message failed", error=repr(exc))
            await _nack(message)


async def _nack(message: AbstractIncomingMessage) -> None:
    with contextlib.suppress(AMQPError):  # the channel is gone: the broker requeues them
        await message.nack(requeue=True)


def copy(
    message: AbstractIncomingMessage, headers: dict[str, Any], body: bytes | None = None
) -> aio_pika.Message:
    """``message`` to publish again, persistent, with ``headers`` added (broker ones dropped),
    its body replaced by ``body`` when given."""
    kept = {k: v for k, v in (message.headers or {}).items() if k not in _BROKER_HEADERS}
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


def delivery_of(message: AbstractIncomingMessage) -> Delivery:
    raw = (message.headers or {}).get(ATTEMPT, 1)
    try:
        attempt = max(1, int(raw.decode() if isinstance(raw, bytes) else raw))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        attempt = 1
    ref = f"{message.delivery_tag}" if message.delivery_tag is not None else ""
    return Delivery(message.body, attempt, message.reply_to, message.correlation_id, message, ref)


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
