"""ServiceTokens: single-flight login, refresh ahead of expiry, failures and backoff, invalidate,
the background refresher. Time is a fake clock the tests move; nothing really sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest

from worker import logs
from worker.errors import LoginError
from worker.tokens import AccessToken, ServiceTokens, parse_expiration

T = TypeVar("T")
T0 = 1_700_000_000.0
LIFETIME = 1800.0  # BioT's 30 minutes; margin 60 s -> refresh point at 1740 s


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeLogin:
    """The login endpoint: tokens ``token-1``, ``token-2``, ...; may fail or wait on ``gate``."""

    def __init__(self, clock: Clock, lifetime: float = LIFETIME) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.calls = 0
        self.error: Exception | None = None
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()

    async def __call__(self) -> AccessToken:
        self.calls += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return AccessToken(f"token-{self.calls}", self.clock() + self.lifetime)

    def hold(self) -> asyncio.Event:
        """Make the next logins wait until the returned event is set."""
        self.started = asyncio.Event()
        self.gate = asyncio.Event()
        return self.gate


class CapturingLog(logs.CapturingLog):
    """The project's capturing log, plus events that let a test wait for a background
    login's outcome (``refreshed`` on an info line, ``failed`` on a warning)."""

    def __init__(self) -> None:
        super().__init__()
        self.refreshed = asyncio.Event()
        self.failed = asyncio.Event()

    def info(self, message: str, /, **fields: Any) -> None:
        super().info(message, **fields)
        self.refreshed.set()

    def warning(self, message: str, /, **fields: Any) -> None:
        super().warning(message, **fields)
        self.failed.set()

    def warnings(self) -> list[tuple[str, dict[str, Any]]]:
        return [(r["message"], r) for r in self.records if r["level"] == "WARN"]


class FakeSleep:
    """The refresher's sleep: each call is queued with its delay; the test wakes it,
    moving the clock by that delay."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.requests: asyncio.Queue[tuple[float, asyncio.Future[None]]] = asyncio.Queue()

    async def __call__(self, delay: float) -> None:
        woken = asyncio.get_running_loop().create_future()
        await self.requests.put((delay, woken))
        await woken

    async def next(self) -> tuple[float, asyncio.Future[None]]:
        return await self.requests.get()

    def wake(self, delay: float, woken: asyncio.Future[None]) -> None:
        self.clock.now += delay
        woken.set_result(None)

    async def pass_time(self) -> float:
        """Wait for the refresher to ask for a sleep, let that time pass, return the delay."""
        delay, woken = await self.next()
        self.wake(delay, woken)
        return delay


class Harness:
    def __init__(self, lifetime: float = LIFETIME, **kwargs: Any) -> None:
        self.clock = Clock()
        self.login = FakeLogin(self.clock, lifetime)
        self.log = CapturingLog()
        self.sleep = FakeSleep(self.clock)
        self.tokens = ServiceTokens(
            self.login, clock=self.clock, sleep=self.sleep, log=self.log, **kwargs
        )

    async def prime(self) -> str:
        token = await self.tokens.get()
        self.log.refreshed.clear()
        return token


def open_when_started(login: FakeLogin, gate: asyncio.Event) -> asyncio.Task[None]:
    async def opener() -> None:
        await soon(login.started.wait())
        gate.set()

    return asyncio.get_running_loop().create_task(opener())


async def soon(awaitable: Awaitable[T]) -> T:
    """Await something the code under test must bring about; fail instead of hanging if it
    never comes (a guard only: nothing waits for time to pass)."""
    return await asyncio.wait_for(awaitable, timeout=5)


def no_other_tasks() -> bool:
    return asyncio.all_tasks() == {asyncio.current_task()}


# ---------------------------------------------------------------- parse_expiration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-11-24T09:23:14.945Z", 1763976194.945),
        ("2025-11-24T09:23:14Z", 1763976194.0),
        ("2025-11-24T09:23:14.945+00:00", 1763976194.945),
        ("2025-11-24T09:23:14+00:00", 1763976194.0),
        (" 2025-11-24T11:23:14.5+02:00\n", 1763976194.5),
        ("2025-11-24T09:23:14.945123456Z", 1763976194.945123),
    ],
)
def test_parse_expiration(text: str, expected: float) -> None:
    assert parse_expiration(text) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "soon",
        "2025-11-24",
        "2025-11-24T09:23:14",
        "2025-11-24 09:23:14Z",
        "2025-02-30T09:23:14Z",
        "1763976194",
        "2025-11-24T09:23:14.Z",
    ],
)
def test_parse_expiration_refuses_garbage_with_value_error(text: str) -> None:
    with pytest.raises(ValueError, match="accessTokenExpiration"):
        parse_expiration(text)


def test_access_token_repr_hides_the_value() -> None:
    assert "s3cr3t" not in repr(AccessToken("s3cr3t", T0))


def test_backoff_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="retry_backoff"):
        ServiceTokens(FakeLogin(Clock()), retry_backoff=0)


# ---------------------------------------------------------------- get()


async def test_cold_start_200_callers_share_one_login() -> None:
    h = Harness()
    opener = open_when_started(h.login, h.login.hold())
    results = await asyncio.gather(*(h.tokens.get() for _ in range(200)))
    await opener
    assert set(results) == {"token-1"}
    assert (h.login.calls, h.tokens.logins) == (1, 1)


async def test_cached_token_is_reused_within_lifetime() -> None:
    h = Harness()
    await h.prime()
    h.clock.now += 1739.5
    assert await h.tokens.get() == "token-1"
    assert h.login.calls == 1
    assert no_other_tasks()  # before the refresh point nothing starts in the background


async def test_refresh_point_serves_old_token_and_refreshes_once_in_background() -> None:
    h = Harness()
    await h.prime()
    gate = h.login.hold()
    h.clock.now += 1740.0
    # The login is held, yet both callers are served at once with the still-valid token.
    assert [await h.tokens.get(), await h.tokens.get()] == ["token-1", "token-1"]
    await soon(h.login.started.wait())
    gate.set()
    await soon(h.log.refreshed.wait())
    assert await h.tokens.get() == "token-2"
    assert h.login.calls == 2


async def test_expired_token_waits_for_one_login() -> None:
    h = Harness()
    await h.prime()
    gate = h.login.hold()
    h.clock.now += LIFETIME
    waiting = asyncio.get_running_loop().create_task(h.tokens.get())
    await soon(h.login.started.wait())
    assert not waiting.done()
    gate.set()
    assert await soon(waiting) == "token-2"
    assert h.login.calls == 2


async def test_burst_across_expiry_refreshes_exactly_once() -> None:
    h = Harness()
    await h.prime()
    h.clock.now += LIFETIME + 1
    opener = open_when_started(h.login, h.login.hold())
    results = await asyncio.gather(*(h.tokens.get() for _ in range(100)))
    await opener
    assert set(results) == {"token-2"}
    assert h.login.calls == 2
    assert h.log.warnings() == []


async def test_margin_is_a_fifth_of_a_short_lifetime() -> None:
    h = Harness(lifetime=2.0)
    await h.prime()
    h.clock.now += 1.5
    assert await h.tokens.get() == "token-1"
    assert no_other_tasks()
    h.clock.now += 0.125  # 1.625 s: past the refresh point at 2 - 0.4 = 1.6 s
    assert await h.tokens.get() == "token-1"
    await soon(h.log.refreshed.wait())
    assert h.login.calls == 2


async def test_caller_cancellation_does_not_cancel_the_shared_login() -> None:
    h = Harness()
    gate = h.login.hold()
    first = asyncio.get_running_loop().create_task(h.tokens.get())
    second = asyncio.get_running_loop().create_task(h.tokens.get())
    await soon(h.login.started.wait())
    first.cancel()
    gate.set()
    assert await soon(second) == "token-1"
    assert first.cancelled()
    assert h.login.calls == 1


# ---------------------------------------------------------------- failures


async def test_login_failure_without_token_raises_for_every_waiter() -> None:
    h = Harness()
    h.login.error = LoginError("login answered 503", status=503)
    opener = open_when_started(h.login, h.login.hold())
    outcomes = await asyncio.gather(*(h.tokens.get() for _ in range(10)), return_exceptions=True)
    await opener
    assert all(isinstance(o, LoginError) and o.message == "login answered 503" for o in outcomes)
    assert h.login.calls == 1
    assert [m for m, _ in h.log.warnings()] == ["service-user login failed"]


async def test_foreign_exception_becomes_login_error_without_its_message() -> None:
    h = Harness()
    h.login.error = OSError("POST body secretKey=hunter2")
    with pytest.raises(LoginError) as info:
        await h.tokens.get()
    assert info.value.message == "service-user login failed: OSError"
    assert "hunter2" not in repr(h.log.records)


async def test_expired_token_from_login_is_a_failure() -> None:
    h = Harness(lifetime=0.0)
    with pytest.raises(LoginError, match="empty or expired token"):
        await h.tokens.get()


async def test_failure_with_valid_token_keeps_serving_it_and_backs_off() -> None:
    h = Harness(retry_backoff=1.0)
    await h.prime()
    h.clock.now += 1750.0
    h.login.error = LoginError("login answered 504", status=504)
    assert await h.tokens.get() == "token-1"
    await soon(h.log.failed.wait())
    [(message, fields)] = h.log.warnings()
    assert (message, fields["serving_cached_token"], fields["retry_in"]) == (
        "service-user login failed",
        True,
        1.0,
    )
    assert "token-1" not in repr(fields)
    h.clock.now += 0.5  # within the backoff: served, no new attempt
    assert await h.tokens.get() == "token-1"
    assert no_other_tasks()
    assert h.tokens.logins == 2
    h.login.error = None
    h.clock.now += 0.5
    assert await h.tokens.get() == "token-1"
    await soon(h.log.refreshed.wait())
    assert await h.tokens.get() == "token-3"


async def test_backoff_without_token_fails_fast_then_retries() -> None:
    h = Harness(retry_backoff=1.0, max_backoff=4.0)
    h.login.error = LoginError("login answered 500", status=500)
    for expected_calls, wait in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 4.0)):
        with pytest.raises(LoginError, match="login answered 500"):
            await h.tokens.get()
        with pytest.raises(LoginError, match="retrying after backoff"):
            await h.tokens.get()
        assert h.login.calls == expected_calls
        h.clock.now += wait - 0.5
        with pytest.raises(LoginError, match="retrying after backoff"):
            await h.tokens.get()
        h.clock.now += 0.5
    h.login.error = None
    assert await h.tokens.get() == "token-5"


# ---------------------------------------------------------------- invalidate


async def test_invalidate_current_token_forces_a_new_login() -> None:
    h = Harness()
    token = await h.prime()
    h.tokens.invalidate(token)
    assert await h.tokens.get() == "token-2"
    assert h.login.calls == 2


async def test_invalidate_stale_token_keeps_the_newer_one() -> None:
    h = Harness()
    old = await h.prime()
    h.tokens.invalidate(old)
    assert await h.tokens.get() == "token-2"
    h.tokens.invalidate(old)  # a late 401 for the old token
    assert await h.tokens.get() == "token-2"
    assert h.login.calls == 2


# ---------------------------------------------------------------- background refresher


async def test_refresher_logs_in_at_start_then_before_each_expiry() -> None:
    h = Harness()
    async with h.tokens:
        assert await soon(h.sleep.pass_time()) == 0.0  # cold: log in right away
        delay, woken = await soon(h.sleep.next())
        assert (delay, h.login.calls) == (1740.0, 1)
        h.sleep.wake(delay, woken)
        delay, _ = await soon(h.sleep.next())  # asleep again after the refresh at 1740 s
        assert (delay, h.login.calls) == (1740.0, 2)
        # Callers never wait: the token is fresh whenever they come.
        assert await h.tokens.get() == "token-2"
        assert h.login.calls == 2
    assert no_other_tasks()


async def test_refresher_refreshes_a_short_token_once_per_lifetime() -> None:
    h = Harness(lifetime=2.0)
    await h.tokens.start()
    assert await soon(h.sleep.pass_time()) == 0.0
    delays = [await soon(h.sleep.pass_time()) for _ in range(3)]
    delays.append((await soon(h.sleep.next()))[0])
    assert delays == pytest.approx([1.6, 1.6, 1.6, 1.6])
    assert h.login.calls == 4
    await h.tokens.aclose()


async def test_refresher_retries_with_backoff_while_old_token_is_valid() -> None:
    h = Harness(retry_backoff=1.0)
    await h.prime()
    await h.tokens.start()
    h.login.error = LoginError("login answered 503", status=503)
    assert await soon(h.sleep.pass_time()) == 1740.0
    assert await soon(h.sleep.pass_time()) == 1.0
    delay, woken = await soon(h.sleep.next())  # asleep after the second failure
    assert (delay, h.login.calls) == (2.0, 3)
    assert await h.tokens.get() == "token-1"  # still valid; backing off, so no new attempt
    assert len(asyncio.all_tasks()) == 2  # this test and the sleeping refresher: no login
    h.login.error = None
    h.sleep.wake(delay, woken)
    await soon(h.log.refreshed.wait())
    assert await h.tokens.get() == "token-4"
    await h.tokens.aclose()


async def test_invalidate_during_refresher_sleep_is_served_by_get() -> None:
    h = Harness()
    await h.tokens.start()
    await soon(h.sleep.pass_time())
    await soon(h.sleep.next())  # the refresher now sleeps until the refresh point
    h.tokens.invalidate("token-1")
    assert await h.tokens.get() == "token-2"
    await h.tokens.aclose()


async def test_aclose_cancels_refresher_and_login_and_is_idempotent() -> None:
    h = Harness()
    await h.tokens.start()
    await h.tokens.start()  # idempotent: still one refresher
    assert len(asyncio.all_tasks()) == 2
    gate = h.login.hold()
    assert await soon(h.sleep.pass_time()) == 0.0
    waiter = asyncio.get_running_loop().create_task(h.tokens.get())
    await soon(h.login.started.wait())  # the refresher's login is in flight, held; waiter joined it
    await soon(h.tokens.aclose())
    with pytest.raises(LoginError, match="cancelled"):
        await soon(waiter)
    assert no_other_tasks()
    await h.tokens.aclose()
    assert not gate.is_set()
    assert h.login.calls == 1


async def test_aclose_without_start_is_harmless() -> None:
    h = Harness()
    await h.tokens.aclose()
    assert await h.tokens.get() == "token-1"
    await h.tokens.aclose()
    assert no_other_tasks()
