"""The pump with a source that settles and receives by callback (:class:`SettlesSoon`,
:class:`ReceivesSoon`, as the Redis source does).

Settling: an event's slot is held from the end of its task until the source says how its
settle went, a settle the source never answers is given up after the broker timeout (its slot
back, the failure said once), one the source fails or refuses counts as failed, and on stop the
drain waits for settles under way within the grace period, then gives them up.

Receiving: each batch's tasks start where the source hands it over, and the next receive is
asked for only once they had their first turn; a receive the source cannot do by callback goes
through ``receive()``; one that fails is retried after the backoff, one never answered is given
up after the broker timeout, and one under way when the pump is cancelled is given up."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import pytest

from tests.queue_helpers import FakeLog, eventually
from worker.adapters.queue import (
    Decision,
    Delivery,
    IntakeStatus,
    RetryPolicy,
    Verdict,
    pump,
)

Then = Callable[[Sequence[Delivery] | BaseException], None]

Done = Callable[[BaseException | None], None]
UNSETTLED = "settling a queue message failed; the broker will deliver it again"


def acking_and_stopping(stop: asyncio.Event) -> Callable[[Delivery], Awaitable[Decision]]:
    """A process that acknowledges each message, and sets ``stop`` at the first."""

    async def process(delivery: Delivery) -> Decision:
        stop.set()
        return Decision(Verdict.ACK)

    return process


class Pending:
    """One settle the test answers (or not) itself."""

    def __init__(self, delivery: Delivery, decision: Decision, done: Done) -> None:
        self.delivery, self.decision, self.done = delivery, decision, done
        self.given_up = False

    def give_up(self) -> None:
        self.given_up = True


class CallbackSource:
    """Settles only by callback; the test answers each settle through ``pending``."""

    policy = RetryPolicy()

    def __init__(self, messages: list[bytes], refuse: bool = False) -> None:
        self.messages = messages
        self.refuse = refuse  # settle_soon raises (a bug of the source's)
        self.pending: list[Pending] = []
        self.asked = asyncio.Event()  # a settle was asked for
        self.received: list[bytes] = []

    async def __aenter__(self) -> CallbackSource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def receive(self, limit: int) -> list[Delivery]:
        batch, self.messages = self.messages[:limit], self.messages[limit:]
        self.received += batch
        await asyncio.sleep(0)
        return [Delivery(body, ref=body.decode()) for body in batch]

    async def settle(self, delivery: Delivery, decision: Decision) -> None:
        raise AssertionError("a SettlesSoon source is settled by settle_soon")

    def settle_soon(self, delivery: Delivery, decision: Decision, done: Done) -> Pending:
        if self.refuse:
            raise RuntimeError("a bug in the source")
        pending = Pending(delivery, decision, done)
        self.pending.append(pending)
        self.asked.set()
        return pending

    async def halt(self) -> None:
        return None

    async def next_settle(self) -> Pending:
        while not self.pending:
            self.asked.clear()
            await self.asked.wait()
        return self.pending.pop(0)


async def test_a_slot_is_held_until_the_source_says_the_settle_is_done() -> None:
    source, log, stop = CallbackSource([b"a", b"b", b"c"]), FakeLog(), asyncio.Event()
    status = IntakeStatus()

    async def process(delivery: Delivery) -> Decision:
        if delivery.body == b"c":
            stop.set()
            return Decision(Verdict.DEAD, reason="NO_EVENT: not an envelope")
        return Decision(Verdict.ACK)

    async with asyncio.timeout(10):
        pumping = asyncio.create_task(pump(source, process, stop=stop, max_in_flight=1,
                                           grace=5.0, log=log, status=status))  # fmt: skip
        first = await source.next_settle()
        assert source.received == [b"a"]  # b waits for a's slot, held past a's task
        assert status.in_flight == 1
        first.done(None)
        second = await source.next_settle()
        assert source.received == [b"a", b"b"]
        second.done(ConnectionError("the broker went away"))  # failed: the message comes back
        third = await source.next_settle()
        third.done(None)
        await pumping
    assert [p.delivery.body for p in (first, second, third)] == [b"a", b"b", b"c"]
    assert log.find(UNSETTLED) == [
        {"error": "ConnectionError: the broker went away", "ref": "b", "verdict": "ack"}
    ]
    assert log.find("event dead-lettered") == [
        {"reason": "NO_EVENT: not an envelope", "attempts": 1, "ref": "c"}
    ]  # written once the source said the dead letter was stored
    assert not any(p.given_up for p in (first, second, third))
    assert status.in_flight == 0


async def test_a_settle_never_answered_is_given_up_after_the_broker_timeout() -> None:
    source, log, stop = CallbackSource([b"a", b"b"]), FakeLog(), asyncio.Event()

    async def process(delivery: Delivery) -> Decision:
        if delivery.body == b"b":
            stop.set()
        return Decision(Verdict.ACK)

    async with asyncio.timeout(10):  # one slot: b needs a's back, which nobody answers
        pumping = asyncio.create_task(pump(source, process, stop=stop, max_in_flight=1,
                                           grace=5.0, log=log, op_timeout=0.05))  # fmt: skip
        stuck = await source.next_settle()
        last = await source.next_settle()
        assert stuck.given_up  # the source was told: it must not send it any more
        stuck.done(None)  # an answer after that is ignored: no second release of the slot
        last.done(None)
        await pumping
    assert log.find(UNSETTLED) == [{"error": "TimeoutError", "ref": "a", "verdict": "ack"}]
    assert not last.given_up


async def test_a_source_failing_to_start_a_settle_loses_no_slot() -> None:
    source, log, stop = CallbackSource([b"a", b"b"], refuse=True), FakeLog(), asyncio.Event()
    seen: list[bytes] = []

    async def process(delivery: Delivery) -> Decision:
        seen.append(delivery.body)
        if delivery.body == b"b":
            stop.set()
        return Decision(Verdict.ACK)

    async with asyncio.timeout(10):
        await pump(source, process, stop=stop, max_in_flight=1, grace=1.0, log=log)
    assert seen == [b"a", b"b"]
    assert log.find(UNSETTLED) == [
        {"error": "RuntimeError: a bug in the source", "ref": "a", "verdict": "ack"}
    ]


@pytest.mark.parametrize("answered", [True, False])
async def test_the_drain_waits_for_settles_under_way_within_the_grace(answered: bool) -> None:
    source, log, stop = CallbackSource([b"a"]), FakeLog(), asyncio.Event()

    process = acking_and_stopping(stop)
    async with asyncio.timeout(10):
        pumping = asyncio.create_task(pump(source, process, stop=stop, max_in_flight=4,
                                           grace=0.2, log=log, op_timeout=30.0))  # fmt: skip
        pending = await source.next_settle()

        async def draining() -> bool:
            return bool(log.find("stopping intake; waiting for in-flight events"))

        await eventually(draining, "the drain")
        assert not pumping.done()  # draining: the settle under way holds it
        if answered:
            pending.done(None)
        await pumping
    unfinished = log.find(
        "in-flight events did not finish within the grace period; "
        "they stay unacknowledged and will be delivered again"
    )
    if answered:
        assert unfinished == [] and not pending.given_up
    else:  # the grace passed: given up, its message comes back
        assert unfinished == [{"unfinished": 1, "grace": 0.2}] and pending.given_up
    assert log.find("stopping intake; waiting for in-flight events") == [{"in_flight": 1}]


class Receiving:
    """One receive by callback the test answers (or not) itself."""

    def __init__(self, limit: int, then: Then) -> None:
        self.limit, self.then = limit, then
        self.given_up = False

    def give_up(self) -> None:
        self.given_up = True
        # as the Redis source does: the broken connection fails the read at once
        self.then(ConnectionError("the connection was given up"))


class ReceivingSource(CallbackSource):
    """Receives by callback (each answered by the test through ``reads``) unless ``slow``
    says the next one needs ``receive()``; records the order of what happens in ``trail``."""

    def __init__(self, messages: list[bytes]) -> None:
        super().__init__(messages)
        self.reads: list[Receiving] = []
        self.read_asked = asyncio.Event()
        self.slow = 0  # receives to refuse by callback
        self.trail: list[str] = []

    async def receive(self, limit: int) -> list[Delivery]:
        self.trail.append("receive()")
        return await super().receive(limit)

    def receive_soon(self, limit: int, then: Then) -> Receiving | None:
        if self.slow:
            self.slow -= 1
            return None
        self.trail.append("receive_soon")
        reading = Receiving(limit, then)
        self.reads.append(reading)
        self.read_asked.set()
        return reading

    def settle_soon(self, delivery: Delivery, decision: Decision, done: Done) -> Pending:
        self.trail.append(f"settle {delivery.ref}")
        done(None)  # at once: settled
        return Pending(delivery, decision, done)

    async def next_read(self) -> Receiving:
        while not self.reads:
            self.read_asked.clear()
            await self.read_asked.wait()
        return self.reads.pop(0)

    def hand(self, reading: Receiving, *bodies: bytes) -> None:
        reading.then([Delivery(body, ref=body.decode()) for body in bodies])


async def test_a_batch_handed_over_by_callback_starts_before_the_next_receive() -> None:
    source, log, stop = ReceivingSource([]), FakeLog(), asyncio.Event()

    async def process(delivery: Delivery) -> Decision:
        source.trail.append(f"process {delivery.ref}")
        if delivery.ref == "c":
            stop.set()
        return Decision(Verdict.ACK)

    async with asyncio.timeout(10):
        pumping = asyncio.create_task(pump(source, process, stop=stop, max_in_flight=8,
                                           grace=5.0, log=log))  # fmt: skip
        first = await source.next_read()
        assert first.limit == 8
        source.hand(first, b"a", b"b")
        second = await source.next_read()
        assert second.limit == 8  # a and b settled: their slots are back
        source.slow = 1  # the next one needs receive(): its entries come that way
        source.messages = [b"c"]
        source.hand(second)  # nothing this time: the next receive at once
        await pumping
    assert source.trail == [
        "receive_soon", "process a", "settle a", "process b", "settle b", "receive_soon",
        "receive()", "process c", "settle c",  # stopped: no receive after c's turn
    ]
    assert log.find("receiving from the queue failed; trying again") == []


async def test_a_receive_by_callback_that_fails_is_tried_again_after_the_backoff() -> None:
    source, log, stop = ReceivingSource([]), FakeLog(), asyncio.Event()
    status = IntakeStatus()

    process = acking_and_stopping(stop)
    async with asyncio.timeout(10):
        pumping = asyncio.create_task(pump(source, process, stop=stop, max_in_flight=4,
                                           grace=5.0, log=log, status=status))  # fmt: skip
        failing = await source.next_read()
        failing.then(ConnectionError("the broker went away"))
        again = await source.next_read()  # after the backoff
        assert status.failures == 1 and status.last_error == (
            "ConnectionError: the broker went away")  # fmt: skip
        source.hand(again, b"a")
        await pumping
    assert log.find("receiving from the queue failed; trying again") == [
        {"error": "ConnectionError: the broker went away", "retry_in": 0.1}
    ]
    assert status.failures == 0  # the next one succeeded


async def test_a_receive_by_callback_never_answered_is_given_up_after_the_broker_timeout() -> (
    None
):
    source, log, stop = ReceivingSource([]), FakeLog(), asyncio.Event()

    process = acking_and_stopping(stop)
    async with asyncio.timeout(10):
        pumping = asyncio.create_task(pump(source, process, stop=stop, max_in_flight=4,
                                           grace=5.0, log=log, op_timeout=0.05))  # fmt: skip
        stuck = await source.next_read()
        again = await source.next_read()  # after the timeout and the backoff
        assert stuck.given_up
        source.hand(stuck, b"late")  # an answer after that is ignored
        source.hand(again, b"a")
        await pumping
    assert "process late" not in source.trail and "settle a" in source.trail
    assert log.find("receiving from the queue failed; trying again") == [
        {"error": "TimeoutError", "retry_in": 0.1}
    ]


async def test_a_receive_by_callback_under_way_when_the_pump_is_cancelled_is_given_up() -> None:
    source, log = ReceivingSource([]), FakeLog()

    async def process(delivery: Delivery) -> Decision:
        raise AssertionError("nothing was handed over")

    async with asyncio.timeout(10):
        pumping = asyncio.create_task(pump(source, process, stop=asyncio.Event(),
                                           max_in_flight=4, grace=5.0, log=log))  # fmt: skip
        reading = await source.next_read()
        pumping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pumping
    assert reading.given_up
    source.hand(reading, b"late")  # ignored: no task starts after the pump ended
    assert "process late" not in source.trail
