"""The dispatcher's event deadlines: ``asyncio.timeout_at``'s behaviour (cancel at the deadline,
``TimeoutError`` on exit, a foreign cancellation left alone) with one timer per hook shared by
its events, which start, and so fall due, in order."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import KeyPair, interceptor_body, make_event, settings_for
from tests.test_dispatch import interceptor_token, make_dispatcher
from worker.events import PreInterception
from worker.routing import Context, Router
from worker.tracing import QueuedTimeout as _Deadline
from worker.tracing import TimeoutQueue as _Deadlines


def _in(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


async def test_a_block_past_its_deadline_is_cancelled_and_raises_timeout_error() -> None:
    queue = _Deadlines()
    deadline = _Deadline(_in(0.02), queue)
    cancelled: list[bool] = []

    async def block() -> None:
        async with deadline:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

    with pytest.raises(TimeoutError):
        await block()
    assert cancelled
    assert deadline.expired()
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # the cancellation was taken back


async def test_blocks_done_in_time_leave_nothing_queued() -> None:
    queue = _Deadlines()
    for _ in range(1000):
        deadline = _Deadline(_in(30.0), queue)
        async with deadline:
            await asyncio.sleep(0)
        assert not deadline.expired()
        assert not queue._entries  # the finished one left the queue at once


async def test_an_earlier_deadline_after_a_later_one_still_falls_due() -> None:
    queue = _Deadlines()
    late, early = _Deadline(_in(30.0), queue), _Deadline(_in(0.02), queue)
    late_entered, release = asyncio.Event(), asyncio.Event()

    async def long_block() -> None:
        async with late:
            late_entered.set()
            await release.wait()

    waiting = asyncio.create_task(long_block())
    await late_entered.wait()
    with pytest.raises(TimeoutError):
        async with early:  # out of order: a timer of its own
            await asyncio.Event().wait()
    assert early.expired() and not late.expired()
    release.set()
    await waiting
    assert not late.expired()
    assert not queue._entries


async def test_deadlines_falling_together_expire_in_order_and_the_rest_goes_on() -> None:
    queue = _Deadlines()
    first, second, third = (_Deadline(_in(d), queue) for d in (0.02, 0.03, 30.0))
    done = asyncio.Event()
    outcomes: list[str] = []

    async def block(deadline: _Deadline, name: str, wait: asyncio.Event) -> None:
        try:
            async with deadline:
                await wait.wait()
            outcomes.append(f"{name} done")
        except TimeoutError:
            outcomes.append(f"{name} expired")

    never = asyncio.Event()
    tasks = [
        asyncio.create_task(block(first, "first", never)),
        asyncio.create_task(block(second, "second", never)),
        asyncio.create_task(block(third, "third", done)),
    ]
    await asyncio.gather(tasks[0], tasks[1])
    done.set()
    await tasks[2]
    assert outcomes == ["first expired", "second expired", "third done"]


async def test_a_foreign_cancellation_is_not_a_timeout() -> None:
    queue = _Deadlines()
    deadline = _Deadline(_in(30.0), queue)
    entered = asyncio.Event()

    async def block() -> None:
        async with deadline:
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(block())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not deadline.expired()


async def test_a_cancellation_on_top_of_the_deadline_stays_a_cancellation() -> None:
    queue = _Deadlines()
    deadline = _Deadline(_in(0.01), queue)
    entered = asyncio.Event()

    async def block() -> None:
        async with deadline:
            entered.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                asyncio.current_task().cancel()  # type: ignore[union-attr]  # a shutdown, too
                raise

    task = asyncio.create_task(block())
    await entered.wait()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert deadline.expired()


async def test_a_deadline_already_past_expires_at_the_first_wait() -> None:
    queue = _Deadlines()
    deadline = _Deadline(_in(-1.0), queue)
    reached: list[bool] = []

    async def block() -> None:
        async with deadline:
            reached.append(True)  # the block starts, as with asyncio.timeout_at
            await asyncio.sleep(0)
            await asyncio.Event().wait()

    with pytest.raises(TimeoutError):
        await block()
    assert reached


def test_the_queue_starts_anew_on_another_loop() -> None:
    queue = _Deadlines()

    async def expire() -> bool:
        deadline = _Deadline(_in(0.01), queue)
        try:
            async with deadline:
                await asyncio.Event().wait()
        except TimeoutError:
            return True
        return False

    async def leave_one_queued() -> None:
        deadline = _Deadline(_in(30.0), queue)
        await deadline.__aenter__()  # never left: its loop ends with it still queued

    asyncio.run(leave_one_queued())
    assert asyncio.run(expire())  # a timer on the new loop, not the stale one's


async def test_the_dispatcher_answers_504_for_events_past_their_deadline_in_a_burst(
    keys: KeyPair,
) -> None:
    """Slow and quick events of one hook mixed: only the slow ones answer 504."""

    async def handler(view: PreInterception, ctx: Context) -> None:
        if view.request.body.get("slow"):
            await asyncio.Event().wait()

    settings = settings_for(WORKER_DEADLINE_INTERCEPTOR="0.05")
    dispatcher, _ = make_dispatcher(keys, Router().pre(handler, entity="patient"), settings)
    hook = "INTERCEPTOR_PRE"
    token = interceptor_token(keys)
    events = []
    for n in range(20):
        body = interceptor_body(hook)
        body["request"]["body"] = {"slow": n % 2 == 0}
        events.append(make_event(hook, body, token=token))
    answers = await asyncio.gather(*(dispatcher.dispatch(event) for event in events))
    assert [a.status for a in answers] == [504, 200] * 10


async def test_an_earlier_deadline_after_the_queue_emptied_still_falls_due() -> None:
    """A late deadline leaves (its block ended) and the queue is empty, its timer still set for
    that late time; an earlier deadline queued next is cut off at its own time, not then."""
    queue = _Deadlines()
    async with _Deadline(_in(30.0), queue):
        await asyncio.sleep(0)
    assert not queue._entries
    early = _Deadline(_in(0.02), queue)

    async def block() -> None:
        async with early:
            await asyncio.Event().wait()

    task = asyncio.create_task(block())
    done, _ = await asyncio.wait({task}, timeout=10.0)  # not 30 s later
    assert done, "the earlier deadline waited for the timer of the one that left"
    assert isinstance(task.exception(), TimeoutError)
    assert early.expired()
