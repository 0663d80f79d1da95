"""Prometheus metrics: what the worker counts, and the text ``GET /metrics`` answers.

One :class:`Metrics` per :class:`~worker.app.WorkerApp`, in its own registry (never the client's
global one, so several apps in one process, as in tests, count apart). The recording methods
are called on the hot path: each costs a dictionary lookup and a few locked additions
(``prometheus-client``'s children are looked up once per label set and kept).

Every label value comes from a small fixed set: a hook type, an HTTP status code, a status
class, an HTTP method, an outcome, a refusal reason, a queue's configured name. Never an entity
id, a path, a trace id or anything a caller chooses.

Names (all under ``biot_worker_``), base units, ``_total`` for counters:

- ``events_total{hook,status}``: events answered, by hook type and status (those refused
  before dispatch too: by the HTTP adapter, or a queue message that never became an event)
- ``event_duration_seconds{hook}``: histogram, receipt to answer
- ``events_in_flight``: events being handled now
- ``events_overloaded_total{hook}``: refused with 503 for too many in flight
- ``api_requests_total{method,status_class}``: BioT API attempts (``2xx``..``5xx``, ``error``)
- ``api_request_duration_seconds{method}``: histogram of one attempt
- ``api_retries_total{method}``: attempts made again after a transient failure
- ``service_logins_total{outcome}``: ``success``, ``refused`` (4xx), ``failed``
- ``service_token_expires_in_seconds``: seconds left on the cached token (0: none)
- ``jwt_refusals_total{reason}``: events whose JWT was refused, by reason
- ``public_key_fetches_total{outcome}``: ``success`` or ``failed``
- ``queue_messages_received_total{queue}``: messages taken from the broker
- ``queue_messages_redelivered_total{queue}``: of them, delivered again by the broker
- ``queue_messages_acknowledged_total{queue}``: settled as done (the reply sent, if asked)
- ``queue_messages_retried_total{queue}``: re-queued for a later attempt
- ``queue_messages_dead_lettered_total{queue}``: moved to the dead letters
- ``queue_settle_failures_total{queue}``: settles that failed (the message comes back)
- ``queue_receive_failures_total{queue}``: receives that failed (the broker is away)
- ``queue_consumer_lag_messages{queue}``: messages not yet delivered, where told
- ``build_info{version}``: 1

plus the client's ``process_*`` metrics (CPU seconds, resident memory, open descriptors).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from worker.version import __version__

__all__ = [
    "API_BUCKETS",
    "EVENT_BUCKETS",
    "HOOKS",
    "JWT_REASONS",
    "Metrics",
    "status_class",
]

PREFIX: Final = "biot_worker_"
#: Hook label values (``worker.events.HookType``'s values; not imported, to stay a leaf).
HOOKS: Final = (
    "NOTIFICATION",
    "INTERCEPTOR_PRE",
    "INTERCEPTOR_POST",
    "INTERCEPTOR_POST_ENTITY",
    "NONSPECIFIC",
)
#: Interceptors live in the sub-millisecond to 3 s range (BioT waits 3 s); notifications longer.
EVENT_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 2.5, 3.0, 5.0,
    10.0, 30.0, 60.0,
)  # fmt: skip
API_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: The series made at start (at 0), so that ``rate()`` and ``increase()`` see their first
#: increments: Prometheus cannot tell the step of a series that appears already at 1.
_STATUSES: Final = (200, 400, 403, 500, 502, 503, 504)  # the worker's own answers
_CALLED: Final = ("GET", "POST", "PUT", "PATCH", "DELETE")  # what a handler calls BioT with
_CLASSES: Final = ("2xx", "3xx", "4xx", "5xx", "error")
#: Reasons of ``jwt_refusals_total`` (``worker.errors.AuthError.reason``).
JWT_REASONS: Final = (
    "missing", "malformed", "signature", "expired", "not_yet_valid", "algorithm", "claims",
    "scope", "key_unavailable", "invalid",
)  # fmt: skip
_LAG_REFRESH: Final = 1.0  # seconds a lag reading is reused across scrapes
_LAG_TIMEOUT: Final = 2.0  # seconds a scrape waits for the broker's answer

Lag = Callable[[], Awaitable[int | None]]


def status_class(status: int | None) -> str:
    """``2xx`` .. ``5xx`` for an answer, ``error`` when none came (timeout, connection)."""
    if status is None or not 100 <= status <= 599:
        return "error"
    return f"{status // 100}xx"


class Metrics:
    """The worker's metrics; see the module docstring for the names.

    ``token_expires_in`` is read at each scrape (seconds left on the cached service token, or
    ``None`` with none); queue sources are added with :meth:`watch_queue`.
    """

    def __init__(self, *, token_expires_in: Callable[[], float | None] | None = None) -> None:
        # No ``_created`` series beside each counter: half the text, and nothing reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=registry)
        Gauge(PREFIX + "build_info", "The running biot-worker's version.", ["version"],
              registry=registry).labels(__version__).set(1)  # fmt: skip
        # The per-event series are plain numbers this loop adds to (no lock, no lookup of a
        # child), turned into metric families at scrape time by the same thread.
        self._hot = _HotCollector(registry)
        self._overloaded = Counter(
            PREFIX + "events_overloaded", "Events refused (503) because too many were in flight.",
            ["hook"], registry=registry,
        )  # fmt: skip
        self._retries = Counter(
            PREFIX + "api_retries", "BioT API attempts made again after a transient failure.",
            ["method"], registry=registry,
        )  # fmt: skip
        self._logins = Counter(
            PREFIX + "service_logins",
            "Service-user logins, by outcome (success, refused: 4xx, failed: other).",
            ["outcome"], registry=registry,
        )  # fmt: skip
        expiry = Gauge(
            PREFIX + "service_token_expires_in_seconds",
            "Seconds until the cached service token expires (0: none).", registry=registry,
        )  # fmt: skip
        if token_expires_in is not None:
            expiry.set_function(lambda: max(0.0, token_expires_in() or 0.0))
        self._jwt = Counter(
            PREFIX + "jwt_refusals", "Events whose platform JWT was refused, by reason.",
            ["reason"], registry=registry,
        )  # fmt: skip
        self._key_fetches = Counter(
            PREFIX + "public_key_fetches", "Fetches of BioT's public key, by outcome.",
            ["outcome"], registry=registry,
        )  # fmt: skip
        self._queues = _QueueCollector(registry)
        self._lag_gauge = Gauge(
            PREFIX + "queue_consumer_lag_messages",
            "Messages in the queue not yet delivered to this consumer group, as the broker "
            "tells it.", ["queue"], registry=registry,
        )  # fmt: skip
        self._lags: list[tuple[str, Lag]] = []
        self._lag_read_at = -_LAG_REFRESH
        self._start_at_zero()

    def _start_at_zero(self) -> None:
        """Make the bounded series exist from the start (see :data:`_STATUSES`)."""
        hot = self._hot
        for hook in HOOKS:
            self._overloaded.labels(hook)
            for status in _STATUSES:
                hot.events[hook, status] = 0
        for method in _CALLED:
            self._retries.labels(method)
            for klass in _CLASSES:
                hot.api[method, klass] = 0
            hot.api_durations[method] = _Buckets(API_BUCKETS)
        for outcome in ("success", "refused", "failed"):
            self._logins.labels(outcome)
        for outcome in ("success", "failed"):
            self._key_fetches.labels(outcome)
        for reason in JWT_REASONS:
            self._jwt.labels(reason)

    # ------------------------------------------------------------ events

    def event_started(self) -> None:
        self._hot.in_flight += 1

    def event_finished(self, hook: str, status: int, seconds: float) -> None:
        """An event the dispatcher answered (after :meth:`event_started`)."""
        self._hot.in_flight -= 1
        self.event_answered(hook, status, seconds)

    def event_abandoned(self) -> None:
        """An event that will not be answered (cancelled by a shutdown)."""
        self._hot.in_flight -= 1

    def event_answered(self, hook: str, status: int, seconds: float) -> None:
        """An event answered (an adapter's refusal before dispatch counts here alone)."""
        hot = self._hot
        key = (hook, status)
        hot.events[key] = hot.events.get(key, 0) + 1
        hot.event_durations[hook].observe(seconds)

    def overloaded(self, hook: str) -> None:
        self._overloaded.labels(hook).inc()

    # ------------------------------------------------------------ BioT

    def api_request(self, method: str, status: int | None, seconds: float) -> None:
        """One attempt of an API call; ``status`` ``None`` when no answer came."""
        hot = self._hot
        label = method if method in _METHODS else "OTHER"
        key = (label, "error" if status is None else _CLASS_OF.get(status, "error"))
        hot.api[key] = hot.api.get(key, 0) + 1
        buckets = hot.api_durations.get(label)
        if buckets is None:
            buckets = hot.api_durations[label] = _Buckets(API_BUCKETS)
        buckets.observe(seconds)

    def api_retry(self, method: str) -> None:
        self._retries.labels(method if method in _METHODS else "OTHER").inc()

    def login(self, outcome: str) -> None:
        """``success``, ``refused`` (BioT said no: a 4xx other than 429) or ``failed``."""
        self._logins.labels(outcome).inc()

    def jwt_refused(self, reason: str) -> None:
        self._jwt.labels(reason if reason in JWT_REASONS else "invalid").inc()

    def key_fetch(self, ok: bool) -> None:
        self._key_fetches.labels("success" if ok else "failed").inc()

    # ------------------------------------------------------------ queues

    def watch_queue(self, queue: str, lag: Lag | None = None) -> QueueMetrics:
        """The counters of one queue (its configured name, never a message's); ``lag``, when
        the broker can tell it, is read at scrape time, at most once a second."""
        if lag is not None:
            self._lags.append((queue, lag))
        return self._queues.watch(queue)

    # ------------------------------------------------------------ exposition

    async def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition text for an ``Accept`` header, and its content type."""
        await self._read_lags()
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    async def _read_lags(self) -> None:
        loop = asyncio.get_running_loop()
        if not self._lags or loop.time() - self._lag_read_at < _LAG_REFRESH:
            return
        self._lag_read_at = loop.time()
        readings = await asyncio.gather(*(_bounded(lag) for _, lag in self._lags))
        for (queue, _), value in zip(self._lags, readings, strict=True):
            if value is None:  # no reading: no series, rather than a stale one
                with contextlib.suppress(KeyError):
                    self._lag_gauge.remove(queue)
            else:
                self._lag_gauge.labels(queue).set(value)


_CLASS_OF: Final = {status: status_class(status) for status in range(100, 600)}


class _Buckets:
    """One histogram's series: a count per bucket (not cumulative), their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: the first bound >= value
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        running, pairs = 0, []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            pairs.append((_bound_text(bound), float(running)))
        return pairs


def _bound_text(bound: float) -> str:
    """A bucket's ``le`` as the client writes it (``0.005``, ``1.0``, ``+Inf``)."""
    text: str = floatToGoString(bound)  # type: ignore[no-untyped-call]
    return text


class _HotCollector(Collector):
    """The series every event and every API attempt adds to, as plain numbers. Written and
    read on the event loop's thread only (the scrape runs there too), so nothing is locked."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events: dict[tuple[str, int], int] = {}
        self.event_durations = {hook: _Buckets(EVENT_BUCKETS) for hook in HOOKS}
        self.in_flight = 0
        self.api: dict[tuple[str, str], int] = {}
        self.api_durations: dict[str, _Buckets] = {}
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        events = CounterMetricFamily(
            PREFIX + "events", "Events answered, by hook type and response status.",
            labels=["hook", "status"],
        )  # fmt: skip
        for (hook, status), count in list(self.events.items()):
            events.add_metric([hook, str(status)], count)
        yield events
        yield _histogram(
            "event_duration_seconds", "Seconds from an event's receipt to its answer, by hook "
            "type.", "hook", self.event_durations,
        )  # fmt: skip
        yield GaugeMetricFamily(
            PREFIX + "events_in_flight", "Events being handled now.", value=self.in_flight
        )
        api = CounterMetricFamily(
            PREFIX + "api_requests",
            "BioT API attempts, by method and status class (error: no answer).",
            labels=["method", "status_class"],
        )  # fmt: skip
        for (method, klass), count in list(self.api.items()):
            api.add_metric([method, klass], count)
        yield api
        yield _histogram(
            "api_request_duration_seconds", "Seconds one BioT API attempt took.", "method",
            self.api_durations,
        )  # fmt: skip


def _histogram(
    name: str, text: str, label: str, series: Mapping[str, _Buckets]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(PREFIX + name, text, labels=[label])
    for value, buckets in list(series.items()):
        family.add_metric([value], buckets.cumulative(), buckets.total)
    return family


_QUEUE_COUNTERS: Final = {
    "messages_received": "Messages taken from the broker.",
    "messages_redelivered": "Messages the broker delivered again (not settled before).",
    "messages_acknowledged": "Messages settled as done (their reply sent when asked for).",
    "messages_retried": "Messages re-queued for a later attempt.",
    "messages_dead_lettered": "Messages moved to the dead letters.",
    "settle_failures": "Settles that failed; the broker delivers the message again.",
    "receive_failures": "Receives from the broker that failed.",
}


class Count:
    """One queue counter's value: a plain number the event loop adds to (the scrape reads it on
    the same thread), not a prometheus-client child, whose ``inc`` takes a lock."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class QueueMetrics:
    """One queue's counters, as :meth:`Metrics.watch_queue` gives them."""

    __slots__ = (
        "acknowledged", "dead_lettered", "receive_failures", "received", "redelivered",
        "retried", "settle_failures",
    )  # fmt: skip

    def __init__(self) -> None:
        self.received, self.redelivered, self.acknowledged = Count(), Count(), Count()
        self.retried, self.dead_lettered = Count(), Count()
        self.settle_failures, self.receive_failures = Count(), Count()

    def counts(self) -> tuple[Count, ...]:
        """In the order of :data:`_QUEUE_COUNTERS`."""
        return (
            self.received, self.redelivered, self.acknowledged, self.retried,
            self.dead_lettered, self.settle_failures, self.receive_failures,
        )  # fmt: skip


class _QueueCollector(Collector):
    """The queue counters of every watched queue, turned into metric families at scrape time.
    A queue watched twice (a source made again) keeps counting from where it was."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._queues: dict[str, QueueMetrics] = {}
        registry.register(self)

    def watch(self, queue: str) -> QueueMetrics:
        metrics = self._queues.get(queue)
        if metrics is None:
            metrics = self._queues[queue] = QueueMetrics()
        return metrics

    def collect(self) -> Iterator[Metric]:
        queues = list(self._queues.items())
        for n, (verb, text) in enumerate(_QUEUE_COUNTERS.items()):
            family = CounterMetricFamily(PREFIX + f"queue_{verb}", text, labels=["queue"])
            for queue, metrics in queues:
                family.add_metric([queue], metrics.counts()[n].value)
            yield family


async def _bounded(lag: Lag) -> int | None:
    try:
        async with asyncio.timeout(_LAG_TIMEOUT):
            return await lag()
    except Exception:  # the broker is away: no reading, the health check says why
        return None
