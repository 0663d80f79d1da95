"""RabbitMQ specifics, on the real broker: the durable topology with its dead-letter exchange and
per-delay retry queues, a retry parked in the queue of its delay, a redelivery after a consumer
died counted as an attempt (a crash loop ends in the dead letters). Faults through a
:class:`~tests.tcp_proxy.TcpProxy`: a cut connection comes back and what it held is handled again
without counting as an attempt; settling and closing on a silent connection are bounded; a refused
reconnect is one clear error. Without a broker: a batch keeps what it took when counting a
redelivery fails or the receive is cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import orjson
import pytest
from aio_pika.exceptions import ChannelPreconditionFailed

from tests.queue_harness import RabbitHarness, cleanup_all, make_harness, serve
from tests.queue_helpers import (
    RABBIT,
    RABBIT_URL,
    WAIT,
    FakeLog,
    ScriptedHandle,
    eventually,
    message,
    queue_settings,
    serving,
)
from tests.tcp_proxy import TcpProxy
from worker.adapters.queue import Decision, Delivery, SourceUnavailable, Verdict
from worker.adapters.rabbitmq import LinkLost, RabbitSource, _Link

pytestmark = pytest.mark.broker


@pytest.fixture
async def made() -> AsyncIterator[list[RabbitHarness]]:
    harnesses: list[RabbitHarness] = []
    try:
        yield harnesses
    finally:
        await cleanup_all(harnesses)


def rabbit_harness(made: list[RabbitHarness], **params: str) -> RabbitHarness:
    harness = make_harness("rabbitmq", **params)
    assert isinstance(harness, RabbitHarness)
    made.append(harness)
    return harness


async def declare_raw(name: str, *, durable: bool, arguments: dict[str, Any]) -> int:
    """Declare ``name`` on a fresh connection (a refused declaration closes its channel)."""
    connection = await aio_pika.connect(RABBIT_URL)
    async with connection:
        channel = await (await connection.channel()).get_underlay_channel()
        declared = await channel.queue_declare(name, durable=durable, arguments=arguments)
        return declared.message_count or 0


async def test_the_topology_is_durable_with_a_dead_letter_exchange(
    made: list[RabbitHarness],
) -> None:
    harness = rabbit_harness(made, retry_delay="0.25", max_attempts="4")
    source = harness.source(queue_settings(), FakeLog())
    assert isinstance(source, RabbitSource)
    assert source.retry_delays_ms == [250, 500, 1000]
    q = harness.queue
    async with source:
        # Same declarations again are accepted: durable, with these arguments.
        await declare_raw(q, durable=True, arguments={"x-dead-letter-exchange": f"{q}.dlx"})
        retry = {"x-message-ttl": 500, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": q}
        await declare_raw(f"{q}.retry.500ms", durable=True, arguments=retry)
        with pytest.raises(ChannelPreconditionFailed):
            await declare_raw(q, durable=False, arguments={"x-dead-letter-exchange": f"{q}.dlx"})
        with pytest.raises(ChannelPreconditionFailed):
            await declare_raw(f"{q}.retry.500ms", durable=True, arguments={})
    # The dead-letter exchange routes to the dead-letter queue.
    channel = await harness._open()
    exchange = await channel.get_exchange(f"{q}.dlx")
    await exchange.publish(aio_pika.Message(b"x", headers={"x-biot-reason": "r"}), q)
    await eventually(_dead(harness), "the message in the dead-letter queue")


async def test_a_retry_waits_in_the_queue_of_its_delay(made: list[RabbitHarness]) -> None:
    harness, handle = rabbit_harness(made, retry_delay="0.5"), ScriptedHandle()
    retry_queue = f"{harness.queue}.retry.500ms"
    async with serve(harness, handle, queue_settings()):
        await harness.publish(message("flaky", transient=1))
        await handle.wait_calls(1)

        async def parked() -> bool:
            return await harness.ready(retry_queue) == 1

        await eventually(parked, "the message in the 500 ms retry queue")
        await handle.wait_calls(2)
    assert [c.attempt for c in handle.calls] == [1, 2]
    assert handle.calls[1].at - handle.calls[0].at >= 0.5 - 0.02
    assert await harness.ready(retry_queue) == 0
    assert await harness.dead_letters() == []


async def consume_and_die(harness: RabbitHarness) -> None:
    """Take one message without acknowledging it, then drop the connection (a crash)."""
    connection = await aio_pika.connect(RABBIT_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(harness.queue)
        got = await queue.get(no_ack=False, fail=True)
        assert got is not None and not got.redelivered


async def test_a_redelivery_after_a_crash_counts_as_an_attempt(made: list[RabbitHarness]) -> None:
    harness, handle = rabbit_harness(made, max_attempts="2"), ScriptedHandle()
    async with harness.source(queue_settings(), FakeLog()):
        pass  # declare the topology
    await harness.publish(message("survivor"))
    await consume_and_die(harness)
    async with serve(harness, handle, queue_settings()):
        await handle.wait_calls(1)
    assert [(c.key, c.attempt) for c in handle.calls] == [("survivor", 2)]


async def test_a_message_that_keeps_killing_its_consumer_is_dead_lettered(
    made: list[RabbitHarness],
) -> None:
    harness, handle = rabbit_harness(made, max_attempts="1"), ScriptedHandle()
    async with harness.source(queue_settings(), FakeLog()):
        pass
    body = message("poison")
    await harness.publish(body)
    await consume_and_die(harness)
    async with serve(harness, handle, queue_settings()):
        await eventually(_dead(harness), "the dead letter")
    [letter] = await harness.dead_letters()
    assert letter.reason == "REDELIVERY_LIMIT: delivered 2 times without being settled"
    assert (letter.body, letter.attempts) == (body, 2)
    assert handle.calls == []


def _dead(harness: RabbitHarness) -> Any:
    async def check() -> bool:
        return len(await harness.dead_letters()) == 1

    return check


# ---------------------------------------------------------------- faults, in process


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    async with TcpProxy(RABBIT) as made:
        yield made


def through(proxy: TcpProxy, harness: RabbitHarness) -> str:
    """The harness's source URL, through ``proxy``."""
    return harness.url.replace(f"{RABBIT[0]}:{RABBIT[1]}", f"127.0.0.1:{proxy.port}", 1)


async def test_a_cut_connection_comes_back_and_its_messages_are_no_new_attempt(
    made: list[RabbitHarness], proxy: TcpProxy
) -> None:
    # max_attempts=1: a redelivery counted as an attempt would dead-letter the message.
    harness, handle, log = rabbit_harness(made, max_attempts="1"), ScriptedHandle(), FakeLog()
    settings = queue_settings()
    source = RabbitSource(through(proxy, harness), settings=settings, log=log)
    async with serving(source, handle, settings, log):
        for key in ("a", "b", "c"):
            await harness.publish(message(key, block=True))
        await handle.wait_calls(3, running=3)
        await proxy.cut()  # three in flight, their channel gone
        await handle.wait_calls(6, running=6)  # redelivered on a new connection, handled again
        handle.release()

        async def settled() -> bool:
            return await harness.backlog() == 0 and handle.running == 0

        await eventually(settled, "every message settled")
    assert sorted(handle.keys()) == ["a", "a", "b", "b", "c", "c"]
    assert {call.attempt for call in handle.calls} == {1}
    assert await harness.dead_letters() == []
    assert len(log.find("the connection to RabbitMQ was lost; reconnecting")) == 1
    [resumed] = log.find("consuming again after the connection was lost")
    assert 0 <= resumed["down_s"] < 5
    failed = log.find("settling a queue message failed; the broker will deliver it again")
    assert failed and all(f["error"].startswith("LinkLost:") for f in failed)


async def test_settling_and_closing_on_a_silent_connection_are_bounded(
    made: list[RabbitHarness], proxy: TcpProxy
) -> None:
    harness, log = rabbit_harness(made), FakeLog()
    settings = queue_settings(WORKER_BROKER_TIMEOUT="0.5")
    source = RabbitSource(through(proxy, harness), settings=settings, log=log)
    await harness.publish(message("silent"))
    loop = asyncio.get_running_loop()
    async with source:
        [delivery] = await receive_some(source)
        proxy.freeze()  # the broker's confirm never comes back
        started = loop.time()
        with pytest.raises(TimeoutError):
            await source.settle(delivery, Decision(Verdict.DEAD, reason="test"))
        assert loop.time() - started < 2.0
        with pytest.raises(LinkLost):  # the link was given up: no second wait
            await source.settle(delivery, Decision(Verdict.ACK))
        started = loop.time()
    assert loop.time() - started < 2.0  # closing did not wait on the silent socket for ever
    proxy.thaw()
    await proxy.cut()

    async def requeued() -> bool:
        return await harness.ready(harness.queue) == 1

    await eventually(requeued, "the message back in the queue")
    assert await harness.dead_letters() == []


async def receive_some(source: RabbitSource) -> Sequence[Delivery]:
    async with asyncio.timeout(WAIT):
        while not (got := await source.receive(10)):
            pass
    return got


async def test_a_refused_reconnect_raises_and_a_later_one_resumes(
    made: list[RabbitHarness], proxy: TcpProxy
) -> None:
    harness, log = rabbit_harness(made), FakeLog()
    source = RabbitSource(through(proxy, harness), settings=queue_settings(), log=log)
    async with source:
        assert await source.receive(10) == []  # consuming
        await proxy.refuse()
        await proxy.cut()
        assert await source.receive(10) == []  # sees the loss
        refused = r"guest:\*\*\*@127\.0\.0\.1:\d+/.*: AMQPConnectionError: .*Connect call failed"
        with pytest.raises(SourceUnavailable, match=refused):
            await source.receive(10)
        assert "guest:guest" not in str(log.records)
        await proxy.accept()
        await harness.publish(message("after"))
        [delivery] = await receive_some(source)
        assert (orjson.loads(delivery.body)["body"]["key"], delivery.attempt) == ("after", 1)
        await source.settle(delivery, Decision(Verdict.ACK))
    assert len(log.find("consuming again after the connection was lost")) == 1


# ---------------------------------------------------------------- a batch is never dropped


@dataclass
class FakeMessage:
    body: bytes
    redelivered: bool = False
    message_id: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    delivery_tag: int = 1
    reply_to: str | None = None
    correlation_id: str | None = None
    nacked: bool = False

    async def nack(self, requeue: bool = True) -> None:
        self.nacked = True


class Open:
    is_closed = False

    async def cancel(self, tag: str) -> None:
        return None


def fake_link(source: RabbitSource, *messages: FakeMessage) -> Any:
    """A consuming link on no broker, ``messages`` in its buffer, as ``source``'s own."""
    link = _Link(Open(), Open(), Open(), None)  # type: ignore[arg-type]
    link.tag = "consuming"
    link.buffer.extend(messages)  # type: ignore[arg-type]
    source._link = link
    return link


async def test_a_redelivery_that_cannot_be_counted_stays_and_the_batch_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = FakeLog()
    source = RabbitSource("amqp://h/?queue=q", settings=queue_settings(), log=log)
    a, b, c = FakeMessage(b"a"), FakeMessage(b"b", redelivered=True), FakeMessage(b"c")
    link = fake_link(source, a, b, c)
    counted: list[bytes] = []

    async def broken(message: FakeMessage, *_: object) -> None:
        raise RuntimeError("publish refused")

    monkeypatch.setattr(source, "_count", broken)
    assert [d.body for d in await source.receive(10)] == [b"a"]  # a is not lost with b
    assert list(link.buffer) == [b, c]  # b waits, first
    [warned] = log.find("counting a redelivered message failed; trying again")
    assert warned["error"] == "RuntimeError: publish refused"
    with pytest.raises(RuntimeError):  # nothing taken: the failure is the receive's
        await source.receive(10)

    async def works(message: FakeMessage, *_: object) -> None:
        counted.append(message.body)

    monkeypatch.setattr(source, "_count", works)
    assert [d.body for d in await source.receive(10)] == [b"c"]
    assert counted == [b"b"] and not link.buffer


async def test_a_receive_cancelled_mid_batch_keeps_what_it_admitted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = RabbitSource("amqp://h/?queue=q", settings=queue_settings(), log=FakeLog())
    a, b = FakeMessage(b"a"), FakeMessage(b"b", redelivered=True)
    link = fake_link(source, a, b)
    hang = asyncio.Event()

    async def stuck(message: FakeMessage, *_: object) -> None:
        await hang.wait()

    monkeypatch.setattr(source, "_count", stuck)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await source.receive(10)
    [ready] = await source.receive(1)  # admitted before the cancel: handed out now
    assert ready.body == b"a" and list(link.buffer) == [b]
    await source.halt()
    assert b.nacked  # halting hands back what was never started
