"""Redis Streams specifics, on the real Redis: consumer groups, XAUTOCLAIM of a crashed consumer's
entries after the idle time, a crash loop dead-lettered, retries parked in a sorted set, settled
entries deleted, a stopped consumer leaving its group."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.queue_harness import RedisHarness, cleanup_all, make_harness, serve
from tests.queue_helpers import (
    FakeLog,
    ScriptedHandle,
    eventually,
    message,
    queue_settings,
    serving,
)
from worker.adapters.redis_streams import RedisStreamSource, ensure_group

pytestmark = pytest.mark.broker
GROUP = "biot-worker"


@pytest.fixture
async def made() -> AsyncIterator[list[RedisHarness]]:
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


async def test_a_crashed_consumers_entries_are_reclaimed_after_the_idle_time(
    made: list[RedisHarness],
) -> None:
    harness, handle, log = redis_harness(made, claim_idle="0.4"), ScriptedHandle(), FakeLog()
    for n in range(3):
        await harness.publish(message(f"orphan{n}"))
    await ensure_group(harness.redis, harness.stream, GROUP)
    await harness.redis.xreadgroup(GROUP, "crashed", {harness.stream: ">"}, count=3)
    crashed_at = asyncio.get_running_loop().time()
    async with serve(harness, handle, queue_settings(), log):
        await handle.wait_calls(3)
        idle = await harness.redis.xpending_range(harness.stream, GROUP, "-", "+", 3)
    assert handle.calls[0].at - crashed_at >= 0.4 - 0.05  # not before 0.4 s of idleness
    assert sorted(handle.keys()) == ["orphan0", "orphan1", "orphan2"]
    assert [call.attempt for call in handle.calls] == [2, 2, 2]  # the crash counts
    assert log.find("reclaimed entries of a stalled consumer") == [{"count": 3}]
    assert all(row["consumer"] != b"crashed" for row in idle)
    assert await harness.redis.xlen(harness.stream) == 0
    assert await harness.redis.xpending(harness.stream, GROUP) == {
        "pending": 0, "min": None, "max": None, "consumers": []
    }  # fmt: skip


async def test_entries_are_not_reclaimed_before_the_idle_time(made: list[RedisHarness]) -> None:
    harness, handle = redis_harness(made, claim_idle="30"), ScriptedHandle()
    await harness.publish(message("held"))
    await ensure_group(harness.redis, harness.stream, GROUP)
    await harness.redis.xreadgroup(GROUP, "alive", {harness.stream: ">"}, count=1)
    async with serve(harness, handle, queue_settings()):
        await harness.publish(message("fresh"))
        await handle.wait_calls(1)
    assert handle.keys() == ["fresh"]  # "held" still belongs to the live consumer
    rows = await harness.redis.xpending_range(harness.stream, GROUP, "-", "+", 5)
    assert [row["consumer"] for row in rows] == [b"alive"]


async def test_an_entry_that_keeps_killing_its_consumer_is_dead_lettered(
    made: list[RedisHarness],
) -> None:
    harness = redis_harness(made, claim_idle="0.2", max_attempts="3")
    handle = ScriptedHandle()
    await harness.publish(message("poison"))
    await ensure_group(harness.redis, harness.stream, GROUP)
    reply: Any = await harness.redis.xreadgroup(GROUP, "crashed", {harness.stream: ">"}, count=1)
    [[_, [(entry_id, _)]]] = reply
    # Two more consumers took it and died: three deliveries so far.
    await harness.redis.xclaim(harness.stream, GROUP, "crashed", 0, [entry_id], retrycount=3)
    async with serve(harness, handle, queue_settings()):

        async def dead() -> bool:
            return len(await harness.dead_letters()) == 1

        await eventually(dead, "the dead letter")
    [letter] = await harness.dead_letters()
    assert letter.reason == "REDELIVERY_LIMIT: delivered 4 times without being settled"
    assert letter.attempts == 4
    assert handle.calls == []  # never handed to a handler again
    rows: Any = await harness.redis.xrange(f"{harness.stream}:dead")
    [(_, fields)] = rows
    assert fields[b"source_id"] == entry_id
    assert fields[b"consumer"] == harness.params["consumer"].encode()


async def test_a_retry_waits_in_the_sorted_set_then_comes_back(made: list[RedisHarness]) -> None:
    harness, handle = redis_harness(made, retry_delay="0.5"), ScriptedHandle()
    retry_key = f"{harness.stream}:retry"
    async with serve(harness, handle, queue_settings()):
        await harness.publish(message("flaky", transient=1))
        await handle.wait_calls(1)

        async def parked() -> bool:
            return int(await harness.redis.zcard(retry_key)) == 1

        await eventually(parked, "the entry in the retry set")
        [member] = await harness.redis.zrange(retry_key, 0, -1)
        assert await harness.redis.xlen(harness.stream) == 0
        await handle.wait_calls(2)
    assert b"7:attempt1:2" in member  # the fields as netstrings, attempt counted up
    assert b"10:last_error" in member
    assert b"CALL_TO_API_FAILED: BioT answered 503" in member
    assert [c.attempt for c in handle.calls] == [1, 2]
    # The envelope had no trace: the parked one carries the trace its first delivery had.
    traceparent = handle.calls[0].event.trace.traceparent
    assert b'"traceparent":"%s"' % traceparent.encode() in member
    assert handle.calls[1].event.headers["traceparent"] == traceparent
    assert await harness.redis.zcard(retry_key) == 0


async def test_two_consumers_of_one_group_share_the_entries(made: list[RedisHarness]) -> None:
    harness = redis_harness(made)
    settings = queue_settings(WORKER_MAX_IN_FLIGHT="2")
    other_url = harness.url.replace(
        urlencode({"consumer": harness.params["consumer"]}), urlencode({"consumer": "other"})
    )
    first, second = ScriptedHandle(), ScriptedHandle()
    other = RedisStreamSource(other_url, settings=settings, log=FakeLog())
    async with serve(harness, first, settings), serving(other, second, settings):
        for n in range(4):
            await harness.publish(message(f"s{n}", block=True))
        await first.wait_calls(2, running=2)
        await second.wait_calls(2, running=2)
        first.release()
        second.release()
    assert sorted(first.keys() + second.keys()) == ["s0", "s1", "s2", "s3"]
    consumers = await harness.redis.xinfo_consumers(harness.stream, GROUP)
    assert consumers == []  # both left the group when they stopped with nothing pending
    assert await harness.redis.xlen(harness.stream) == 0
