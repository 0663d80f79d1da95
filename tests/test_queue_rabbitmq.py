"""RabbitMQ specifics, on the real broker: the durable topology with its dead-letter exchange and
per-delay retry queues, a retry parked in the queue of its delay, a redelivery after a consumer
died counted as an attempt (a crash loop ends in the dead letters)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from aio_pika.exceptions import ChannelPreconditionFailed

from tests.queue_harness import RabbitHarness, cleanup_all, make_harness, serve
from tests.queue_helpers import (
    RABBIT_URL,
    FakeLog,
    ScriptedHandle,
    eventually,
    message,
    queue_settings,
)
from worker.adapters.rabbitmq import RabbitSource

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
