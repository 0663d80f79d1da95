"""What a queue source tells about itself (:class:`~worker.adapters.queue.Observable`): its
``info``, the broker's consumer lag, and which deliveries are redeliveries, on the real Redis and
RabbitMQ (the in-memory source without a broker).

Lag: N after N published and none delivered, 0 once all are delivered; ``None`` where the broker
cannot tell (a Redis group or stream gone, an unread entry deleted; no live RabbitMQ link, its
queue deleted). A RabbitMQ caller that gives up waiting leaves the link alone. Redelivered:
never on a first delivery, always on an entry or message delivered before and not settled (a
Redis consumer's own pending entry, one XAUTOCLAIM took over; a RabbitMQ message left unacked
or nacked, whether excused or counted as an attempt), never on a retry coming back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import orjson
import pytest

from tests.queue_harness import RabbitHarness, RedisHarness, cleanup_all, make_harness
from tests.queue_helpers import (
    RABBIT,
    RABBIT_URL,
    WAIT,
    FakeLog,
    eventually,
    message,
    queue_settings,
)
from tests.tcp_proxy import TcpProxy
from worker.adapters.memory import MemorySource
from worker.adapters.queue import Decision, Delivery, Observable, QueueInfo, Verdict
from worker.adapters.rabbitmq import RabbitSource
from worker.adapters.redis_streams import RedisStreamSource, ensure_group

GROUP = "biot-worker"
ACK = Decision(Verdict.ACK)


def observable(source: Observable) -> Observable:
    """``source`` as the protocol (mypy checks that each source satisfies it)."""
    return source


async def take(source: Any, count: int) -> list[Delivery]:
    """Receive until ``count`` deliveries came (bounded); fails on more."""
    got: list[Delivery] = []
    async with asyncio.timeout(WAIT):
        while len(got) < count:
            got += await source.receive(count - len(got))
    assert len(got) == count
    return got


def keys(deliveries: list[Delivery]) -> list[tuple[str, int, bool]]:
    """Each delivery's scripted key, attempt and redelivered flag."""
    return [(orjson.loads(d.body)["body"]["key"], d.attempt, d.redelivered) for d in deliveries]


# ---------------------------------------------------------------- memory (no broker)


async def test_memory_tells_its_info_and_ready_count() -> None:
    source = MemorySource(log=FakeLog())
    assert observable(source).info == QueueInfo("memory", "memory")
    async with source:
        assert await source.lag() == 0
        for key in ("a", "b", "c"):
            await source.publish(message(key))
        assert await source.lag() == 3
        taken = await take(source, 2)
        assert await source.lag() == 1
        for delivery in taken:
            await source.settle(delivery, ACK)
        assert await source.lag() == 1


async def test_memory_marks_what_it_gives_back_and_not_a_retry() -> None:
    source = MemorySource(log=FakeLog())
    for key in ("a", "b"):
        await source.publish(message(key))
    async with source:
        first = await take(source, 1)
    assert keys(first) == [("a", 1, False)]
    async with source:  # "a" was never settled: given back when the source closed
        again = await take(source, 2)
        assert keys(again) == [("a", 2, True), ("b", 1, False)]
        await source.settle(again[0], Decision(Verdict.RETRY, delay=0.0))
        await source.settle(again[1], ACK)
        [retried] = await take(source, 1)
        assert keys([retried]) == [("a", 3, False)]
        await source.settle(retried, ACK)
    assert source.unsettled == 0


# ---------------------------------------------------------------- Redis


@pytest.fixture
async def redis_made() -> AsyncIterator[list[RedisHarness]]:
    harnesses: list[RedisHarness] = []
    try:
        yield harnesses
    finally:
        await cleanup_all(harnesses)


def redis_harness(made: list[RedisHarness], **params: str) -> RedisHarness:
    harness = make_harness("redis", **params)
    assert isinstance(harness, RedisHarness)
    made.append(harness)
    return harness


def redis_source(harness: RedisHarness) -> RedisStreamSource:
    return RedisStreamSource(harness.url, settings=queue_settings(), log=FakeLog())


@pytest.mark.broker
async def test_redis_info_names_the_stream_and_group(redis_made: list[RedisHarness]) -> None:
    harness = redis_harness(redis_made, group="readers")
    source = redis_source(harness)
    assert observable(source).info == QueueInfo("redis", harness.stream, "readers")
    assert await source.lag() is None  # not entered: nothing to ask


@pytest.mark.broker
async def test_redis_lag_counts_what_the_group_has_not_read(
    redis_made: list[RedisHarness],
) -> None:
    harness = redis_harness(redis_made)
    async with redis_source(harness) as source:
        assert await source.lag() == 0
        for n in range(3):
            await harness.publish(message(f"k{n}"))
        assert await source.lag() == 3
        deliveries = await take(source, 3)
        assert await source.lag() == 0  # delivered, not yet settled: no lag
        for delivery in deliveries:
            await source.settle(delivery, ACK)  # settled entries are deleted
        assert await source.lag() == 0
        await harness.publish(message("k3"))
        assert await source.lag() == 1  # deleted entries behind the group do not confuse it


@pytest.mark.broker
async def test_redis_lag_is_none_when_the_group_or_stream_is_gone(
    redis_made: list[RedisHarness],
) -> None:
    harness = redis_harness(redis_made)
    async with redis_source(harness) as source:
        await harness.publish(message("k"))
        assert await source.lag() == 1
        await harness.redis.xgroup_destroy(harness.stream, GROUP)
        assert await source.lag() is None
        await harness.redis.delete(harness.stream)
        assert await source.lag() is None


@pytest.mark.broker
async def test_redis_lag_is_none_when_redis_cannot_compute_it(
    redis_made: list[RedisHarness],
) -> None:
    harness = redis_harness(redis_made)
    async with redis_source(harness) as source:
        for n in range(3):
            await harness.publish(message(f"k{n}"))
        entries: Any = await harness.redis.xrange(harness.stream)
        await harness.redis.xdel(harness.stream, entries[1][0])  # unread, ahead of the group
        assert await source.lag() is None


@pytest.mark.broker
async def test_redis_first_deliveries_are_not_redelivered(redis_made: list[RedisHarness]) -> None:
    harness = redis_harness(redis_made)
    async with redis_source(harness) as source:
        await harness.publish(message("fresh"))
        [delivery] = await take(source, 1)
        assert keys([delivery]) == [("fresh", 1, False)]
        await source.settle(delivery, ACK)


@pytest.mark.broker
async def test_redis_own_pending_entries_come_back_redelivered_and_a_retry_does_not(
    redis_made: list[RedisHarness],
) -> None:
    harness = redis_harness(redis_made)
    await harness.publish(message("left"))
    async with redis_source(harness) as first:
        assert keys(await take(first, 1)) == [("left", 1, False)]  # never settled
    async with redis_source(harness) as second:  # same consumer name: its pending entries
        [again] = await take(second, 1)
        assert keys([again]) == [("left", 2, True)]
        await second.settle(again, Decision(Verdict.RETRY, delay=0.0))
        [retried] = await take(second, 1)  # moved back from the retry set: a new entry
        assert keys([retried]) == [("left", 3, False)]
        await second.settle(retried, ACK)
    assert await harness.redis.xlen(harness.stream) == 0


@pytest.mark.broker
async def test_redis_entries_claimed_from_a_dead_consumer_are_redelivered(
    redis_made: list[RedisHarness],
) -> None:
    harness = redis_harness(redis_made, claim_idle="0.2")
    await harness.publish(message("orphan"))
    await ensure_group(harness.redis, harness.stream, GROUP)
    await harness.redis.xreadgroup(GROUP, "crashed", {harness.stream: ">"}, count=1)
    async with redis_source(harness) as source:
        [claimed] = await take(source, 1)
        assert keys([claimed]) == [("orphan", 2, True)]
        await source.settle(claimed, ACK)
    rows = await harness.redis.xpending_range(harness.stream, GROUP, "-", "+", 5)
    assert rows == []


# ---------------------------------------------------------------- RabbitMQ


@pytest.fixture
async def rabbit_made() -> AsyncIterator[list[RabbitHarness]]:
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


def rabbit_source(harness: RabbitHarness, url: str | None = None) -> RabbitSource:
    return RabbitSource(url or harness.url, settings=queue_settings(), log=FakeLog())


async def lag_is(source: RabbitSource, count: int) -> None:
    async def check() -> bool:
        return await source.lag() == count

    await eventually(check, f"a lag of {count}")


@pytest.mark.broker
async def test_rabbit_info_names_the_queue_and_lag_needs_a_live_link(
    rabbit_made: list[RabbitHarness],
) -> None:
    harness = rabbit_harness(rabbit_made)
    source = rabbit_source(harness)
    assert observable(source).info == QueueInfo(
        "rabbitmq", harness.queue, ref_attribute="messaging.rabbitmq.message.delivery_tag"
    )
    assert await source.lag() is None  # no link: nothing is opened for it
    async with source:
        assert await source.lag() == 0
    assert await source.lag() is None


@pytest.mark.broker
async def test_rabbit_lag_counts_the_ready_messages(rabbit_made: list[RabbitHarness]) -> None:
    harness = rabbit_harness(rabbit_made)
    async with rabbit_source(harness) as source:
        for n in range(3):
            await harness.publish(message(f"k{n}"))
        await lag_is(source, 3)  # not consuming yet: all three wait in the queue
        deliveries = await take(source, 3)
        assert await source.lag() == 0  # delivered and unacknowledged are not ready
        for delivery in deliveries:
            await source.settle(delivery, ACK)
        assert await source.lag() == 0
    assert await harness.backlog() == 0


@pytest.mark.broker
async def test_rabbit_lag_of_a_deleted_queue_is_none_and_consuming_resumes(
    rabbit_made: list[RabbitHarness],
) -> None:
    harness = rabbit_harness(rabbit_made)
    async with rabbit_source(harness) as source:
        assert await source.lag() == 0
        connection = await aio_pika.connect(RABBIT_URL)
        async with connection:
            await (await connection.channel()).queue_delete(harness.queue)
        assert await source.lag() is None
        await harness.publish(message("after"))  # the publisher declares the queue again
        [delivery] = await take(source, 1)  # a new link, the queue declared, consuming
        assert keys([delivery]) == [("after", 1, False)]
        await source.settle(delivery, ACK)


@pytest.mark.broker
async def test_rabbit_a_caller_giving_up_on_the_lag_leaves_the_link_alone(
    rabbit_made: list[RabbitHarness],
) -> None:
    harness = rabbit_harness(rabbit_made)
    async with TcpProxy(RABBIT) as proxy:
        url = harness.url.replace(f"{RABBIT[0]}:{RABBIT[1]}", f"127.0.0.1:{proxy.port}", 1)
        async with rabbit_source(harness, url) as source:
            for n in range(2):
                await harness.publish(message(f"k{n}"))
            await lag_is(source, 2)
            link = source._link
            proxy.freeze()  # the broker's answer waits in the proxy
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await source.lag()
            proxy.thaw()
            assert await source.lag() == 2  # the same declare, answered; the channel is open
            assert source._link is link and link is not None and link.alive
            deliveries = await take(source, 2)
            for delivery in deliveries:
                await source.settle(delivery, ACK)
    assert await harness.backlog() == 0


@pytest.mark.broker
async def test_rabbit_first_deliveries_are_not_redelivered(
    rabbit_made: list[RabbitHarness],
) -> None:
    harness = rabbit_harness(rabbit_made)
    async with rabbit_source(harness) as source:
        await harness.publish(message("fresh"))
        [delivery] = await take(source, 1)
        assert keys([delivery]) == [("fresh", 1, False)]
        await source.settle(delivery, ACK)


@pytest.mark.broker
async def test_rabbit_a_message_left_unacked_comes_back_redelivered(
    rabbit_made: list[RabbitHarness],
) -> None:
    harness = rabbit_harness(rabbit_made)
    source = rabbit_source(harness)
    await harness.publish(message("left"))
    async with source:
        assert keys(await take(source, 1)) == [("left", 1, False)]  # never settled
    async with source:  # the same process: the same attempt again, still a redelivery
        [again] = await take(source, 1)
        assert keys([again]) == [("left", 1, True)]
    async with rabbit_source(harness) as fresh:  # a new process: counted as an attempt
        [counted] = await take(fresh, 1)
        assert keys([counted]) == [("left", 2, True)]
        await fresh.settle(counted, ACK)
    assert await harness.backlog() == 0


@pytest.mark.broker
async def test_rabbit_a_nacked_message_is_redelivered_and_its_retry_is_not(
    rabbit_made: list[RabbitHarness],
) -> None:
    harness = rabbit_harness(rabbit_made, retry_delay="0.1")
    async with rabbit_source(harness) as source:
        await harness.publish(message("nacked"))
        connection = await aio_pika.connect(RABBIT_URL)
        async with connection:
            queue = await (await connection.channel()).get_queue(harness.queue)
            got = await queue.get(no_ack=False, fail=True)
            assert got is not None and not got.redelivered
            await got.nack(requeue=True)
        [again] = await take(source, 1)
        assert keys([again]) == [("nacked", 2, True)]
        await source.settle(again, Decision(Verdict.RETRY, delay=0.1))  # via the retry queue
        [retried] = await take(source, 1)
        assert keys([retried]) == [("nacked", 3, False)]
        await source.settle(retried, ACK)
    assert await harness.backlog() == 0
    assert await harness.dead_letters() == []
