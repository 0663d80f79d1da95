"""Health that tells the truth: ``GET /healthz`` (the process is alive) and ``GET /readyz`` (it
can serve events), with details, for the HTTP adapter and the queue worker's own listener.

``/readyz`` runs every :class:`Check` at once, each bounded by ``probe_timeout``, and answers

- 200 ``{"status": "ready", "checks": {...}, "biotLastAnswer": ...}`` when all pass,
- 503 with the platform's error envelope (``code``, ``message``, ``serviceName``, ``traceId``,
  ``environment``, ``details``: the first failing check's error) plus ``"status": "not ready"``
  and the same ``checks`` and ``biotLastAnswer`` otherwise.

``checks`` maps each check's name to ``{"ok": bool, ...}``: ``publicKey`` (``ageSeconds`` of the
fetched key, or where the key comes from), ``serviceToken`` (``expiresInSeconds``, ``logins``),
``broker`` in queue mode (the redacted ``source``, ``lastReceiveAgoSeconds``); a failing one
says why in ``error``. ``biotLastAnswer`` is ``{"at": ISO-8601 UTC, "agoSeconds"}`` of the last
response BioT gave to any call (``null``: none yet). A body never holds a token, key material
or a password.

Probes are cheap: the checks read cached state and, only when none is usable, ask for it the
way an event would: the key fetch and the login are single-flight and back off after a failure,
so a probe storm costs BioT nothing more than one event would.

``/healthz`` answers 200 ``{"status": "ok", "inFlight": N}``; in queue mode also ``intake``
(``starting``, ``running``, ``draining``, ``stopped``), and 503 ``{"status": "stalled"}`` when
the intake loop has not gone round within its bound (see :class:`IntakeStatus`) or has stopped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from worker.auth import JwtVerifier
from worker.client import BiotContact
from worker.errors import LoginError, WorkerError
from worker.events import lower_headers
from worker.responses import ErrorContext, Response, error_body, json_response
from worker.tokens import ServiceTokens
from worker.tracing import TraceContext, trace_from_headers

if TYPE_CHECKING:  # the queue seam is imported only when a queue is used
    from worker.adapters.queue import IntakeStatus
    from worker.metrics import Metrics

__all__ = [
    "PROBE_PATHS",
    "BrokerCheck",
    "Check",
    "CheckResult",
    "Health",
    "Probes",
    "PublicKeyCheck",
    "ServiceTokenCheck",
    "add_health_routes",
    "health_runner",
]

InFlight = Callable[[], int]


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One check's verdict: ``detail`` are its JSON fields besides ``ok`` (never a secret);
    ``error``, when it failed, names the 503's ``code`` and ``message``."""

    detail: Mapping[str, Any] = field(default_factory=dict)
    error: WorkerError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"ok": self.ok, **self.detail}
        if self.error is not None:
            body.setdefault("error", self.error.message)
        return body


class Check(Protocol):
    """One thing the worker needs to serve events; ``probe`` never raises (but cancellation)."""

    name: str

    async def probe(self) -> CheckResult:
        """The state now, asking for it (bounded by the caller) only when none is cached."""
        ...


class NotReady(WorkerError):
    """A check failed without an error of its own (a timeout, a stopped intake)."""

    status = 503
    code = "NOT_READY"


class PublicKeyCheck:
    """BioT's public key: fetched (``ageSeconds``, ``fetches``), static, or validation off."""

    name = "publicKey"

    def __init__(self, verifier: JwtVerifier | None, contact: BiotContact) -> None:
        self._verifier = verifier
        self._contact = contact

    async def probe(self) -> CheckResult:
        verifier = self._verifier
        if verifier is None:
            return CheckResult({"validation": "off"})
        if not verifier.fetches_keys:
            return CheckResult({"source": "BIOT_PUBLIC_KEY"})
        try:
            await verifier.ready()
        except WorkerError as exc:
            return CheckResult({"fetches": self._contact.key_fetches}, exc)
        detail: dict[str, Any] = {
            "ageSeconds": _seconds(verifier.key_age()),
            "fetches": self._contact.key_fetches,
        }
        if verifier.last_error is not None:  # serving the previous key while BioT's fails
            detail["lastFetchError"] = verifier.last_error
        return CheckResult(detail)


class ServiceTokenCheck:
    """The service user's token: ``expiresInSeconds`` of the cached one, ``logins`` tried."""

    name = "serviceToken"

    def __init__(self, tokens: ServiceTokens) -> None:
        self._tokens = tokens

    async def probe(self) -> CheckResult:
        tokens = self._tokens
        try:
            await tokens.get()
        except WorkerError as exc:
            return CheckResult({"logins": tokens.logins}, exc)
        except Exception as exc:  # translated at this boundary, by type only: no secret leaks
            error = LoginError(f"service token not obtainable: {type(exc).__name__}")
            return CheckResult({"logins": tokens.logins}, error)
        return CheckResult({"expiresInSeconds": _seconds(tokens.expires_in()),
                            "logins": tokens.logins})  # fmt: skip


class BrokerCheck:
    """The queue: ok while the intake loop's last receive succeeded (each is bounded by
    ``WORKER_BROKER_TIMEOUT``, so a hung broker turns this false within that time)."""

    name = "broker"

    def __init__(self, status: IntakeStatus, source: str) -> None:
        """``source`` is the queue URL as shown (its password already hidden)."""
        self._status = status
        self._source = source

    async def probe(self) -> CheckResult:
        status, now = self._status, asyncio.get_running_loop().time()
        detail: dict[str, Any] = {
            "source": self._source,
            "intake": status.state,
            "lastReceiveAgoSeconds": _ago(status.last_ok_at, now),
        }
        if status.failures:
            detail["failures"] = status.failures
            detail["failingForSeconds"] = _ago(status.failing_since, now)
            message = f"the broker failed the last receive: {status.last_error}"
            return CheckResult(detail, NotReady(message, code="BROKER_UNAVAILABLE"))
        if status.state not in ("starting", "running"):
            return CheckResult(detail, NotReady(f"the intake loop is {status.state}"))
        return CheckResult(detail)


class Health:
    """Answers the probes (see the module docstring) from ``checks``; ``intake`` is the queue's
    intake loop (queue mode), ``contact`` says when BioT last answered.

    ``clock`` is monotonic (``contact.answered_at``'s), ``wall_clock`` dates it in the body.
    """

    def __init__(
        self,
        checks: Sequence[Check],
        *,
        errors: ErrorContext,
        contact: BiotContact | None = None,
        intake: IntakeStatus | None = None,
        probe_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._checks = tuple(checks)
        self._errors = errors
        self._contact = contact
        self._intake = intake
        self._timeout = probe_timeout
        self._clock = clock
        self._wall = wall_clock

    async def readiness(self, trace: TraceContext) -> Response:
        """200 or 503 with every check's result; takes ``probe_timeout`` seconds at most."""
        results = await asyncio.gather(*(self._bounded(check) for check in self._checks))
        checks = zip(self._checks, results, strict=True)
        body: dict[str, Any] = {
            "status": "ready",
            "checks": {check.name: result.to_json() for check, result in checks},
            "biotLastAnswer": self._last_answer(),
        }
        failed = next((r.error for r in results if r.error is not None), None)
        if failed is None:
            return json_response(body, trace)
        envelope = error_body(failed.code, failed.message, trace, self._errors, failed.details)
        return json_response({**envelope, **body, "status": "not ready"}, trace, 503)

    def liveness(self, in_flight: int, trace: TraceContext) -> Response:
        """200 while the process serves (and, in queue mode, its intake loop goes round)."""
        body: dict[str, Any] = {"status": "ok", "inFlight": in_flight}
        intake = self._intake
        if intake is None:
            return json_response(body, trace)
        body["intake"] = intake.state
        now = asyncio.get_running_loop().time()
        if intake.state == "stopped" or intake.stalled(now):
            body["status"] = "stalled"
            body["lastLoopAgoSeconds"] = _ago(intake.beat_at, now)
            return json_response(body, trace, 503)
        return json_response(body, trace)

    async def _bounded(self, check: Check) -> CheckResult:
        try:
            async with asyncio.timeout(self._timeout):
                return await check.probe()
        except TimeoutError:
            return CheckResult(error=NotReady(f"no answer within {self._timeout:g} s"))

    def _last_answer(self) -> dict[str, Any] | None:
        answered = None if self._contact is None else self._contact.answered_at
        if answered is None:
            return None
        ago = max(0.0, self._clock() - answered)
        at = datetime.fromtimestamp(self._wall() - ago, UTC)
        return {
            "at": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "agoSeconds": _seconds(ago),
        }


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _ago(then: float | None, now: float) -> float | None:
    return None if then is None else _seconds(max(0.0, now - then))


# ---------------------------------------------------------------- HTTP


#: The paths of the probes (``GET`` and ``HEAD``).
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_TEXT = "text/plain; charset=utf-8"


class Probes:
    """The answers of ``GET /healthz``, ``/readyz`` and ``/metrics`` as
    :class:`~worker.responses.Response` objects: what the HTTP adapter serves, and (through
    :func:`add_health_routes`) the queue worker's own listener.

    ``in_flight()`` is the events in hand; ``/metrics`` serves ``metrics`` (Prometheus' text
    format, or OpenMetrics when the scraper asks for it), or answers 404 without them."""

    def __init__(self, health: Health, in_flight: InFlight, metrics: Metrics | None = None) -> None:
        self._health = health
        self._in_flight = in_flight
        self._metrics = metrics

    async def answer(self, path: str, headers: Mapping[str, str]) -> Response:
        """The answer of the probe at ``path`` (one of :data:`PROBE_PATHS`); ``headers`` are the
        request's (any case): its ``traceparent`` and ``Accept``."""
        if path == "/healthz":
            return self._health.liveness(self._in_flight(), trace_from_headers(
                lower_headers(headers)))  # fmt: skip
        if path == "/readyz":
            return await self._health.readiness(trace_from_headers(lower_headers(headers)))
        return await self._metrics_answer(headers.get("Accept"))

    async def _metrics_answer(self, accept: str | None) -> Response:
        if self._metrics is None:  # a 404 that says why (the HTTP adapter would answer 405)
            return Response(404, b"metrics are off (WORKER_METRICS=false)\n",
                            {"Content-Type": _TEXT})  # fmt: skip
        body, content_type = await self._metrics.render(accept)
        return Response(200, body, {"Content-Type": content_type})


def add_health_routes(
    app: web.Application, health: Health, in_flight: InFlight, metrics: Metrics | None = None
) -> None:
    """``GET /healthz``, ``GET /readyz`` and ``GET /metrics`` on ``app`` (see :class:`Probes`)."""
    probes = Probes(health, in_flight, metrics)

    async def probe(request: web.Request) -> web.Response:
        return to_web(await probes.answer(request.path, request.headers))

    for path in sorted(PROBE_PATHS):
        app.router.add_get(path, probe)


def health_runner(
    health: Health, in_flight: InFlight, *, idle_timeout: float, metrics: Metrics | None = None
) -> web.AppRunner:
    """aiohttp's runner (not set up) of a listener with only the two probes and, with
    ``metrics``, ``/metrics`` (anything else is 404, another method 405, a body is never read);
    a connection idle or still sending its headers for ``idle_timeout`` seconds is closed."""
    app = web.Application(client_max_size=1024)
    add_health_routes(app, health, in_flight, metrics)
    return web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        keepalive_timeout=idle_timeout,
        shutdown_timeout=1.0,
    )


def to_web(response: Response) -> web.Response:
    """A :class:`~worker.responses.Response` as aiohttp's (this listener's and the HTTP
    adapter's)."""
    return web.Response(status=response.status, body=response.body, headers=response.headers)
