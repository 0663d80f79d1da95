"""The service user's access token: cached, refreshed ahead of expiry, one login
in flight however many events ask.

Contract of :class:`ServiceTokens`:

- ``get()`` returns a token at once while it is valid. Past its refresh point
  (``expires_at - min(refresh_margin, 0.2 * lifetime)``, lifetime measured when the login
  returned) it still returns the valid token at once and starts a background login. Only a
  caller with no valid token waits, and all such callers share the one login in flight.
- A failed login raises :class:`LoginError` in the callers waiting for it and is logged as a
  warning (message only, never the token or the secret); a still-valid token keeps being served.
- Backoff: after a failure no login starts for ``retry_backoff`` seconds, doubling with each
  consecutive failure up to ``max_backoff``. Meanwhile a caller with no valid token gets a
  :class:`LoginError` at once, so a login outage does not become a login storm.
- ``invalidate(token)`` (the client's answer to a 401) drops the cached token only if it is still
  that token, so a late 401 for an old token does not throw away a newer one.
- ``start()``/``aclose()`` (or ``async with``) run a background refresher that sleeps until the
  refresh point and logs in, so that in steady state no event waits for a login.

``log`` is anything with ``info``/``warning(message, /, **fields)`` (``worker.logs.Log`` fits);
without one, the stdlib logger ``worker.tokens`` is used.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

from worker.errors import LoginError
from worker.logs import Log, LoggerLog

if TYPE_CHECKING:  # prometheus-client is imported only when metrics are on
    from worker.metrics import Metrics

__all__ = ["AccessToken", "LoginFn", "ServiceTokens", "parse_expiration"]

_ISO_DATETIME: Final = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|[+-]\d{2}:\d{2})"
)
# A margin never larger than this share of the token's lifetime, so a short-lived token is
# refreshed once per lifetime rather than continuously.
_MAX_MARGIN_SHARE: Final = 0.2


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A service-user token; ``expires_at`` is wall-clock epoch seconds. ``repr`` hides it."""

    value: str = field(repr=False)
    expires_at: float


LoginFn = Callable[[], Awaitable[AccessToken]]


def parse_expiration(text: str) -> float:
    """Epoch seconds of BioT's ``accessTokenExpiration`` (``2025-11-24T09:23:14.945Z``).

    Accepts an ISO-8601 date-time with or without a fraction, with ``Z`` or a numeric offset.
    Raises ``ValueError`` otherwise (also for an impossible date); the client, which parses the
    login response, turns it into a :class:`LoginError`.
    """
    candidate = text.strip() if isinstance(text, str) else ""
    try:
        if _ISO_DATETIME.fullmatch(candidate):
            return datetime.fromisoformat(candidate).timestamp()
    except ValueError:
        pass  # an impossible date: reported below like any other malformed value
    raise ValueError(f"accessTokenExpiration is not an ISO-8601 date-time: {text!r:.60}")


def _copy(error: LoginError, message: str | None = None) -> LoginError:
    # Each waiter raises its own instance: re-raising one shared instance grows its traceback.
    return LoginError(
        message or error.message,
        status=error.upstream_status,
        method=error.method,
        url=error.url,
        body=error.body,
    )


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _reap(task: asyncio.Task[Any]) -> None:
    """Await a task we cancelled, without swallowing a cancellation aimed at ourselves."""
    try:
        await task
    except asyncio.CancelledError:
        if _being_cancelled():
            raise


class ServiceTokens:
    """The service-user token cache; see the module docstring for the contract.

    ``clock`` is the wall clock (``expires_at`` is epoch seconds); ``sleep`` is what the
    background refresher waits with. Both are injectable so tests drive time.
    """

    def __init__(
        self,
        login: LoginFn,
        *,
        refresh_margin: float = 60.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        retry_backoff: float = 1.0,
        max_backoff: float = 30.0,
        log: Log | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """``metrics`` counts each login by outcome."""
        if retry_backoff <= 0 or max_backoff < retry_backoff:
            raise ValueError("need 0 < retry_backoff <= max_backoff")
        self._login = login
        self._margin = refresh_margin
        self._clock = clock
        self._sleep = sleep
        self._retry_backoff = retry_backoff
        self._max_backoff = max_backoff
        self._log: Log = log if log is not None else LoggerLog(__name__)
        self._metrics = metrics
        self._token: AccessToken | None = None
        self._refresh_at = 0.0
        self._inflight: asyncio.Task[AccessToken | LoginError] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._failures = 0
        self._failed_at = 0.0
        self._last_error: LoginError | None = None
        self._logins = 0

    @property
    def logins(self) -> int:
        """Login attempts so far, successful or not."""
        return self._logins

    def expires_in(self) -> float | None:
        """Seconds the cached token stays valid; ``None`` when none is (for health probes)."""
        if self._token is None:
            return None
        left = self._token.expires_at - self._clock()
        return left if left > 0 else None

    @property
    def last_error(self) -> str | None:
        """Why the last login failed, until one succeeds; ``None`` otherwise (never a secret)."""
        return None if self._last_error is None else self._last_error.message

    async def get(self) -> str:
        """A valid access token; waits for a login only when none is valid.

        Raises :class:`LoginError` when the login fails or is backing off after a failure.
        """
        token, now = self._token, self._clock()
        if token is not None and now < token.expires_at:
            if now >= self._refresh_at and self._may_attempt(now):
                self._login_task()  # in the background: this caller is served right away
            return token.value
        return await self._wait_for_login()

    def invalidate(self, token: str) -> None:
        """Forget ``token`` if it is still the cached one (BioT answered 401 to it)."""
        if self._token is not None and self._token.value == token:
            self._token = None

    async def start(self) -> None:
        """Start the background refresher (idempotent)."""
        if self._refresher is None or self._refresher.done():
            loop = asyncio.get_running_loop()
            self._refresher = loop.create_task(self._refresh_forever(), name="biot-token-refresh")

    async def aclose(self) -> None:
        """Cancel and await the refresher and any login in flight (harmless when repeated)."""
        tasks = [t for t in (self._refresher, self._inflight) if t is not None]
        self._refresher = self._inflight = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            await _reap(task)

    async def __aenter__(self) -> ServiceTokens:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ------------------------------------------------------------ the single flight

    async def _wait_for_login(self) -> str:
        if self._inflight is None and not self._may_attempt(self._clock()):
            raise self._backoff_error()
        task = self._login_task()
        try:
            result = await asyncio.shield(task)  # a cancelled caller leaves the login to others
        except asyncio.CancelledError:
            if task.cancelled() and not _being_cancelled():
                raise LoginError("service-user login was cancelled (shutting down)") from None
            raise
        if isinstance(result, LoginError):
            raise _copy(result) from result
        return result.value

    def _login_task(self) -> asyncio.Task[AccessToken | LoginError]:
        if self._inflight is None:
            loop = asyncio.get_running_loop()
            self._inflight = loop.create_task(self._run_login(), name="biot-service-login")
        return self._inflight

    async def _run_login(self) -> AccessToken | LoginError:
        """One login; the error is returned, not raised, so no task exception goes unretrieved."""
        try:
            token = await self._attempt()
        except LoginError as exc:
            self._on_failure(exc)
            return exc
        finally:
            if self._inflight is asyncio.current_task():  # aclose may have moved on already
                self._inflight = None
        self._on_success(token)
        return token

    async def _attempt(self) -> AccessToken:
        self._logins += 1
        try:
            token = await self._login()
        except LoginError:
            raise
        except Exception as exc:
            # Only the type: a foreign message might quote the request (and the secret in it).
            raise LoginError(f"service-user login failed: {type(exc).__name__}") from exc
        if not token.value or token.expires_at <= self._clock():
            raise LoginError("service-user login returned an empty or expired token")
        return token

    def _on_success(self, token: AccessToken) -> None:
        if self._metrics is not None:
            self._metrics.login("success")
        lifetime = token.expires_at - self._clock()
        self._token = token
        self._refresh_at = token.expires_at - min(self._margin, _MAX_MARGIN_SHARE * lifetime)
        self._failures, self._last_error = 0, None
        self._log.info("service-user token refreshed", expires_in=round(lifetime, 3))

    def _on_failure(self, error: LoginError) -> None:
        if self._metrics is not None:  # refused: BioT said no, and will say it again
            self._metrics.login("failed" if error.transient else "refused")
        self._failures += 1
        self._failed_at = self._clock()
        self._last_error = error
        self._log.warning(
            "service-user login failed",
            error=error.message,
            failures=self._failures,
            retry_in=self._backoff(),
            serving_cached_token=self._valid(self._failed_at),
        )

    # ------------------------------------------------------------ timing

    def _valid(self, now: float) -> bool:
        return self._token is not None and now < self._token.expires_at

    def _backoff(self) -> float:
        exponent = max(self._failures - 1, 0)
        return min(self._retry_backoff * 2.0**exponent, self._max_backoff)

    def _may_attempt(self, now: float) -> bool:
        return self._failures == 0 or now >= self._failed_at + self._backoff()

    def _backoff_error(self) -> LoginError:
        last = self._last_error or LoginError("service-user login failed")
        return _copy(last, f"service-user login failed, retrying after backoff: {last.message}")

    def _needs_refresh(self, now: float) -> bool:
        return self._token is None or now >= self._refresh_at

    def _next_delay(self) -> float:
        now = self._clock()
        due = self._refresh_at if self._token is not None else now
        if self._failures:
            due = max(due, self._failed_at + self._backoff())
        return max(0.0, due - now)

    async def _refresh_forever(self) -> None:
        while True:
            await self._sleep(self._next_delay())
            # The delay already waited out any backoff.
            if self._needs_refresh(self._clock()):
                # The outcome is already recorded and logged by the login itself.
                await asyncio.shield(self._login_task())
