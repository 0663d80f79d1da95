"""Redis Streams specifics, on the real Redis: consumer groups, XAUTOCLAIM of a crashed consumer's
entries after the idle time, a crash loop dead-lettered, retries parked in a sorted set, settled
entries deleted, a stopped consumer leaving its group; and under faults: a settle is all or
nothing (a wrong-typed key: nothing written, the entry pending and delivered again within
seconds), a lost consumer group is created again, a wrong-typed retry set does not stop intake.
(Restarts of Redis itself are in test_faults_redis.py, on a server of the test's own.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import pytest
from redis.exceptions import ResponseError

from tests.queue_harness import RedisHarness, cleanup_all, make_harness, serve
from tests.queue_helpers import (
    FakeLog,
    ScriptedHandle,
    eventually,
    message,
    queue_settings,
    serving,
)
from worker.adapters.queue import Decision, Verdict
from worker.adapters.redis_streams import RedisOptions, RedisStreamSource, ensure_group

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


# ---------------------------------------------------------------- faults


async def pending_ids(harness: RedisHarness) -> list[bytes]:
    rows: Any = await harness.redis.xpending_range(harness.stream, GROUP, "-", "+", 100)
    return [bytes(row["message_id"]) for row in rows]


@pytest.mark.parametrize(
    ("wrong_key", "verdict"), [(":dead", Verdict.DEAD), (":retry", Verdict.RETRY), (":box", None)]
)
async def test_a_settle_with_a_wrong_typed_key_writes_nothing_and_keeps_the_entry(
    made: list[RedisHarness], wrong_key: str, verdict: Verdict | None
) -> None:
    harness = redis_harness(made)
    box = harness.stream + ":box"
    await harness.redis.set(harness.stream + wrong_key, "not what the source writes")
    source = RedisStreamSource(harness.url, settings=queue_settings(), log=FakeLog())
    async with source:
        await harness.publish(message("m"), reply_to=box, correlation_id="c1")

        async def received() -> bool:
            got.extend(await source.receive(5))
            return bool(got)

        got: list[Any] = []
        await eventually(received, "the entry")
        decision = Decision(verdict or Verdict.ACK, b'{"statusCode":500}', "JWT_ERROR: bad",
                            delay=0.1, status=500)  # fmt: skip
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await source.settle(got[0], decision)
        assert await pending_ids(harness) == [got[0].message.id]  # not acknowledged
        assert await harness.redis.xlen(harness.stream) == 1  # nor deleted
        for key in (":dead", ":retry", ":box"):  # and nothing written anywhere
            if key != wrong_key:
                assert await harness.redis.exists(harness.stream + key) == 0


async def test_an_entry_whose_settle_failed_comes_back_within_seconds_while_others_flow(
    made: list[RedisHarness],
) -> None:
    # claim_idle stays 60 s: the entries come back through the source's own pending re-read.
    harness, handle, log = redis_harness(made, max_attempts="3"), ScriptedHandle(), FakeLog()
    dead_key = f"{harness.stream}:dead"
    await harness.redis.set(dead_key, "a string")
    async with serve(harness, handle, queue_settings(), log):
        for n in range(3):
            await harness.publish(message(f"bad{n}", permanent=True))
            await harness.publish(message(f"good{n}"))

        async def stuck() -> bool:  # each bad one delivered again, up to the redelivery limit
            return sorted(c.key for c in handle.calls if c.attempt == 3) == ["bad0", "bad1", "bad2"]

        await eventually(stuck, "the bad entries delivered three times", 10.0)
        assert sorted(c.key for c in handle.calls if c.key.startswith("good")) == [
            "good0", "good1", "good2"]  # fmt: skip
        assert len(await pending_ids(harness)) == 3  # the bad ones: pending, none lost
        await harness.redis.delete(dead_key)

        async def dead() -> bool:
            return len(await harness.dead_letters()) == 3

        await eventually(dead, "the three dead letters once the key is fixed", 10.0)
    reasons = {letter.reason.split(":")[0] for letter in await harness.dead_letters()}
    assert reasons <= {"JWT_ERROR", "REDELIVERY_LIMIT"}
    assert await harness.backlog() == 0
    assert await harness.redis.xlen(harness.stream) == 0
    assert log.find("delivering this consumer's pending entries again")


async def test_a_lost_consumer_group_is_created_again(made: list[RedisHarness]) -> None:
    # claim_idle 0.2: XAUTOCLAIM runs before nearly every read, and answers NOGROUP first.
    harness, handle, log = redis_harness(made, claim_idle="0.2"), ScriptedHandle(), FakeLog()
    async with serve(harness, handle, queue_settings(), log):
        await harness.publish(message("before"))
        await handle.wait_calls(1)
        await harness.redis.delete(harness.stream)  # as a Redis restarted without its data
        await harness.publish(message("after"))
        await handle.wait_calls(2)
    assert handle.keys() == ["before", "after"]
    assert log.find("the consumer group was missing; created it again")
    assert await harness.backlog() == 0


async def test_a_wrong_typed_retry_set_does_not_stop_intake(made: list[RedisHarness]) -> None:
    harness, handle, log = redis_harness(made, retry_delay="0.1"), ScriptedHandle(), FakeLog()
    retry_key = f"{harness.stream}:retry"
    await harness.redis.set(retry_key, "a string")
    async with serve(harness, handle, queue_settings(), log):
        await harness.publish(message("flaky", transient=1))
        for n in range(3):
            await harness.publish(message(f"good{n}"))
        await handle.wait_calls(4)

        async def back() -> bool:  # its retry could not be parked: it is delivered again
            return [c.attempt for c in handle.calls if c.key == "flaky"][-1] >= 2

        await eventually(back, "the flaky entry delivered again", 10.0)
        assert await harness.redis.type(retry_key) == b"string"  # nothing written into it
        await harness.redis.delete(retry_key)

        async def retried() -> bool:
            return await harness.backlog() == 0 and not await pending_ids(harness)

        await eventually(retried, "the flaky entry retried and settled", 10.0)
    [failure, *_] = log.find("moving due retries back to the stream failed")
    assert failure["error"].startswith("ResponseError: WRONGTYPE")
    assert {"good0", "good1", "good2"} <= set(handle.keys())


@pytest.mark.parametrize("value", ["0", "-3", "1.5", "many"])
def test_dead_letter_maxlen_must_be_a_positive_whole_number(value: str) -> None:
    with pytest.raises(ValueError, match=r"^dead_letter_maxlen must be a positive whole number"):
        RedisOptions.parse(f"redis://127.0.0.1/0?dead_letter_maxlen={value}")
    options, _ = RedisOptions.parse("redis://127.0.0.1/0?dead_letter_maxlen=500")
    assert options.dead_letter_maxlen == 500
    assert RedisOptions.parse("redis://127.0.0.1/0")[0].dead_letter_maxlen == 100_000
