"""``/metrics`` counts exactly what happened (issue 11, point 5).

Black box: a real ``biot-worker run`` process against the emulator on loopback serves the
metrics plugin (:mod:`tests.metrics_plugin`); the test scrapes ``/metrics``, sends a known mix
of events (good, refused JWTs, failing, timed out, too large, overloaded, retried), scrapes
again and checks that every counter and histogram count moved by exactly those events, per hook
and status, and that no label carries an id. The queue worker's listener is checked in
``tests/test_metrics_queue.py``; the unit tests of :mod:`worker.metrics` are at the end.
Every worker process is killed and reaped if its test fails.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, Final

import aiohttp
import orjson
import pytest
from prometheus_client.openmetrics import parser as openmetrics
from prometheus_client.parser import text_string_to_metric_families

from tests.metrics_plugin import ABSENT_ID, CAREGIVERS, PATCH_PATIENT, PATIENTS, REFERENCE
from tests.queue_helpers import eventually
from tests.test_worker_process import WorkerProcess, start_worker, stop_worker
from worker.metrics import API_BUCKETS, EVENT_BUCKETS, HOOKS, JWT_REASONS, Metrics, status_class
from worker.testing.emulator import Emulator, EmulatorConfig, EmulatorServer
from worker.testing.events import default_keys, entity, interceptor_body, notification_body
from worker.tracing import new_trace
from worker.version import __version__

LIMIT: Final = 30.0  # the longest any wait in these tests may take
PREFIX: Final = "biot_worker_"
DEADLINE: Final = "3"  # WORKER_DEADLINE_INTERCEPTOR: a hanging PRE answers 504 after it
MAX_BODY: Final = 16_384

#: Every label name the worker's own metrics may carry, and the values each may take (``queue``
#: is checked against the queue's configured name; ``status`` is three digits).
BOUNDED: Final[Mapping[str, frozenset[str]]] = {
    "hook": frozenset(HOOKS),
    "method": frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "OTHER"}),
    "status_class": frozenset({"1xx", "2xx", "3xx", "4xx", "5xx", "error"}),
    "outcome": frozenset({"success", "refused", "failed"}),
    "reason": frozenset(JWT_REASONS),
    "version": frozenset({__version__}),
}
BUCKETS: Final = frozenset((*EVENT_BUCKETS, *API_BUCKETS))
STATUS = re.compile(r"[1-5][0-9][0-9]")

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]


# ---------------------------------------------------------------- scraping


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, by name and sorted labels."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"{key} twice"
            samples[key] = sample.value
    return samples


async def scrape(http: aiohttp.ClientSession, url: str) -> Samples:
    async with http.get(url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(await response.text())


def moved(before: Samples, after: Samples, name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """How much each series of ``name`` moved between two scrapes (only those that did), by
    the values of ``labels``; a series with other label names fails the test."""
    changes: dict[tuple[str, ...], float] = {}
    for (sample, pairs), value in after.items():
        if sample != name:
            continue
        assert [key for key, _ in pairs] == sorted(labels), (name, pairs)
        change = value - before.get((sample, pairs), 0.0)
        if change:
            values = dict(pairs)
            changes[tuple(values[label] for label in labels)] = change
    return changes


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def assert_labels_bounded(
    samples: Samples, sent: Iterable[str], queues: Iterable[str] = ()
) -> None:
    """Each label value of the worker's metrics is from a known bounded set (the queue label
    one of ``queues``), and none contains anything from ``sent`` (ids, trace ids, paths)."""
    allowed = {**BOUNDED, "queue": frozenset(queues)}
    secrets = [item for item in sent if item]
    for name, pairs in samples:
        if not pairs:
            continue
        assert name.startswith(PREFIX), f"{name} carries labels: {pairs}"
        for label, text in pairs:
            if label == "status":
                assert STATUS.fullmatch(text), (name, label, text)
            elif label == "le":  # a histogram's bucket bound
                assert text == "+Inf" or float(text) in BUCKETS, (name, label, text)
            else:
                assert label in allowed, f"{name} has an unexpected label {label}"
                assert text in allowed[label], (name, label, text)
            assert not any(item in text for item in secrets), (name, label, text)


# ---------------------------------------------------------------- the worker and its emulator


class Gate:
    """The emulator's ``sleep`` for injected latency: a call with latency on its route waits
    until :meth:`open` (at most :data:`LIMIT` seconds), whatever the latency says."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self.waiting = 0

    async def sleep(self, seconds: float) -> None:
        self.waiting += 1
        try:
            async with asyncio.timeout(LIMIT):
                await self._open.wait()
        finally:
            self.waiting -= 1

    def open(self) -> None:
        self._open.set()

    async def holding(self) -> bool:
        return self.waiting > 0


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
async def emulator(gate: Gate) -> AsyncIterator[tuple[Emulator, str]]:
    emu = Emulator(EmulatorConfig(), sleep=gate.sleep)
    async with EmulatorServer(emu) as server:
        yield emu, server.url


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=LIMIT)) as session:
        yield session


async def running(emulator: tuple[Emulator, str], **env: str) -> WorkerProcess:
    """A ``biot-worker run`` process serving the metrics plugin (stop it with ``stopped``)."""
    emu, url = emulator
    return await start_worker(emu, url, WORKER_ROUTES=REFERENCE, **env)


async def stopped(worker: WorkerProcess) -> None:
    code = await stop_worker(worker)
    assert code == 0, code


# ---------------------------------------------------------------- events


class Sender:
    """Sends events to a worker and remembers every id, trace id and path it sent."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url
        self.sent: list[str] = []

    def headers(self, hook: str, token: str | None = None) -> dict[str, str]:
        trace = new_trace()
        self.sent.append(trace.trace_id)
        headers = {
            "hooktype": hook,
            "traceparent": trace.traceparent,
            "content-type": "application/json",
        }
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        return headers

    async def post(self, headers: Mapping[str, str], body: bytes, path: str = "") -> int:
        async with self.http.post(self.url + path, data=body, headers=headers) as response:
            await response.read()
            return response.status

    async def pre(self, mode: str, token: str) -> int:
        body = interceptor_body(
            "INTERCEPTOR_PRE", api_id=PATCH_PATIENT, request_body={"mode": mode}
        )
        return await self.post(self.headers("INTERCEPTOR_PRE", token), orjson.dumps(body))

    async def notification(self, mode: str, token: str) -> int:
        patient = entity(mode)
        self.sent.append(patient["_id"])
        body = notification_body(token, entity_data=patient)
        return await self.post(self.headers("NOTIFICATION"), orjson.dumps(body))

    async def nonspecific(self, mode: str, path: str | None = None) -> int:
        path = path if path is not None else f"/jobs/{uuid.uuid4()}"
        self.sent.append(path)
        body = orjson.dumps({"mode": mode})
        return await self.post(self.headers("NONSPECIFIC"), body, path)


def api_calls(emu: Emulator) -> Counter[tuple[str, str]]:
    """The BioT API calls the emulator answered, by method and status class (the logins and
    key fetches are counted apart, not as API requests)."""
    return Counter(
        (record.method, status_class(record.status))
        for record in emu.calls.records(direction="in")
        if not record.path.startswith("/ums/")
    )


def since(after: Counter[tuple[str, str]], before: Counter[tuple[str, str]]) -> dict[Any, float]:
    return {key: float(count) for key, count in (after - before).items()}


# ---------------------------------------------------------------- the HTTP worker


async def test_a_known_mix_of_events_moves_each_count_by_exactly_that(
    emulator: tuple[Emulator, str], http: aiohttp.ClientSession
) -> None:
    emu, _ = emulator
    worker = await running(
        emulator, WORKER_DEADLINE_INTERCEPTOR=DEADLINE, WORKER_MAX_BODY_BYTES=str(MAX_BODY)
    )
    try:
        send = Sender(http, worker.url)
        interceptor = emu.sign_token(scopes=["PLUGIN_INTERCEPTOR"])
        notifier = emu.sign_token(scopes=["ACTION_NOTIFICATION"])
        both = ["PLUGIN_INTERCEPTOR", "ACTION_NOTIFICATION"]
        forged = default_keys().sign(scopes=both)  # not the emulator's key
        expired = emu.sign_token(scopes=both, lifetime=-3600)
        unscoped = emu.sign_token(scopes=["ACTION_NOTIFICATION"])  # not for an interceptor
        calls_before = api_calls(emu)
        before = await scrape(http, worker.url)

        sends = [
            *(send.pre("good", interceptor) for _ in range(3)),
            send.pre("good", forged),
            send.notification("good", forged),
            send.pre("good", expired),
            send.notification("good", expired),
            send.pre("good", unscoped),
            send.pre("raise", interceptor),
            send.pre("missing", interceptor),
            *(send.pre("hang", interceptor) for _ in range(2)),
            *(send.notification("good", notifier) for _ in range(3)),
            send.notification("raise", notifier),
            send.nonspecific("good"),
        ]
        statuses = Counter(await asyncio.gather(*sends))
        assert statuses == {200: 7, 400: 4, 403: 1, 500: 2, 502: 1, 504: 2}
        oversized = b"{" + b" " * MAX_BODY + b"}"
        too_large = await send.post(send.headers("INTERCEPTOR_PRE", interceptor), oversized)
        assert too_large == 413

        after = await scrape(http, worker.url)
        calls = since(api_calls(emu), calls_before)
    finally:
        await stopped(worker)

    events = moved(before, after, PREFIX + "events_total", "hook", "status")
    assert events == {
        ("INTERCEPTOR_PRE", "200"): 3,
        ("INTERCEPTOR_PRE", "400"): 2,  # a forged and an expired JWT
        ("INTERCEPTOR_PRE", "403"): 1,  # no interceptor scope
        ("INTERCEPTOR_PRE", "500"): 1,  # the handler raised
        ("INTERCEPTOR_PRE", "502"): 1,  # BioT answered 404
        ("INTERCEPTOR_PRE", "504"): 2,  # past WORKER_DEADLINE_INTERCEPTOR
        ("INTERCEPTOR_PRE", "413"): 1,  # refused before dispatch
        ("NOTIFICATION", "200"): 3,
        ("NOTIFICATION", "400"): 2,
        ("NOTIFICATION", "500"): 1,
        ("NONSPECIFIC", "200"): 1,
    }
    per_hook = {"INTERCEPTOR_PRE": 11.0, "NOTIFICATION": 6.0, "NONSPECIFIC": 1.0}
    durations = PREFIX + "event_duration_seconds"
    assert moved(before, after, durations + "_count", "hook") == {
        (hook,): count for hook, count in per_hook.items()
    }
    infinite = {(hook, "+Inf"): count for hook, count in per_hook.items()}
    assert {
        key: count
        for key, count in moved(before, after, durations + "_bucket", "hook", "le").items()
        if key[1] == "+Inf"
    } == infinite
    assert moved(before, after, PREFIX + "jwt_refusals_total", "reason") == {
        ("signature",): 2,
        ("expired",): 2,
        ("scope",): 1,
    }
    # One search per good event (3 PRE, 3 notifications, 1 NONSPECIFIC), one GET answered 404.
    assert calls == {("GET", "2xx"): 7.0, ("GET", "4xx"): 1.0}
    assert moved(before, after, PREFIX + "api_requests_total", "method", "status_class") == calls
    assert moved(before, after, PREFIX + "api_request_duration_seconds_count", "method") == {
        ("GET",): 8
    }
    assert moved(before, after, PREFIX + "api_retries_total", "method") == {}
    assert moved(before, after, PREFIX + "events_overloaded_total", "hook") == {}
    assert value(after, PREFIX + "events_in_flight") == 0
    assert value(after, PREFIX + "service_logins_total", outcome="success") >= 1
    assert value(after, PREFIX + "service_logins_total", outcome="refused") == 0
    assert value(after, PREFIX + "service_token_expires_in_seconds") > 0
    assert value(after, PREFIX + "public_key_fetches_total", outcome="success") >= 1
    assert value(after, PREFIX + "public_key_fetches_total", outcome="failed") == 0
    assert value(after, PREFIX + "build_info", version=__version__) == 1
    assert value(after, "process_resident_memory_bytes") > 0

    sent = [*send.sent, ABSENT_ID, PATIENTS, CAREGIVERS, interceptor, forged]
    assert_labels_bounded(after, sent)


async def test_overload_and_retried_calls_are_counted(
    emulator: tuple[Emulator, str], gate: Gate, http: aiohttp.ClientSession
) -> None:
    """One slot, held by a call the emulator holds: the next events are refused with 503 and
    counted as overloaded; a GET BioT answers 503 once is retried and counted twice."""
    emu, _ = emulator
    worker = await running(emulator, WORKER_MAX_IN_FLIGHT="1")
    holding: asyncio.Task[int] | None = None
    try:
        send = Sender(http, worker.url)
        token = emu.sign_token(scopes=["PLUGIN_INTERCEPTOR"])
        emu.faults.update({"latency": {f"GET {CAREGIVERS}": 1.0}})  # held by the gate instead
        calls_before = api_calls(emu)
        before = await scrape(http, worker.url)

        holding = asyncio.create_task(send.nonspecific("hold"))
        await eventually(gate.holding, "the held call to reach the emulator", LIMIT)
        assert await send.pre("good", token) == 503
        notifier = emu.sign_token(scopes=["ACTION_NOTIFICATION"])
        assert await send.notification("good", notifier) == 503
        held = await scrape(http, worker.url)
        gate.open()
        assert await holding == 200

        emu.faults.update({"errors": [{"route": f"GET {PATIENTS}", "status": 503, "count": 1}]})
        assert await send.nonspecific("good") == 200  # BioT's 503, then after Retry-After a 200
        after = await scrape(http, worker.url)
        calls = since(api_calls(emu), calls_before)
    finally:
        gate.open()
        if holding is not None:
            await asyncio.gather(holding, return_exceptions=True)
        await stopped(worker)

    assert value(held, PREFIX + "events_in_flight") == 1
    assert value(after, PREFIX + "events_in_flight") == 0
    assert moved(before, after, PREFIX + "events_overloaded_total", "hook") == {
        ("INTERCEPTOR_PRE",): 1,
        ("NOTIFICATION",): 1,
    }
    assert moved(before, after, PREFIX + "events_total", "hook", "status") == {
        ("INTERCEPTOR_PRE", "503"): 1,
        ("NOTIFICATION", "503"): 1,
        ("NONSPECIFIC", "200"): 2,
    }
    assert moved(before, after, PREFIX + "event_duration_seconds_count", "hook") == {
        ("INTERCEPTOR_PRE",): 1,
        ("NOTIFICATION",): 1,
        ("NONSPECIFIC",): 2,
    }
    assert calls == {("GET", "2xx"): 2.0, ("GET", "5xx"): 1.0}
    assert moved(before, after, PREFIX + "api_requests_total", "method", "status_class") == calls
    assert moved(before, after, PREFIX + "api_retries_total", "method") == {("GET",): 1}
    assert moved(before, after, PREFIX + "jwt_refusals_total", "reason") == {}
    assert_labels_bounded(after, [*send.sent, token])


async def test_openmetrics_when_asked_prometheus_text_by_default(
    emulator: tuple[Emulator, str], http: aiohttp.ClientSession
) -> None:
    worker = await running(emulator)
    try:
        assert await Sender(http, worker.url).nonspecific("good") == 200
        accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
        async with http.get(worker.url + "/metrics", headers=accept) as response:
            assert response.status == 200
            open_type = response.headers["Content-Type"]
            open_text = await response.text()
        async with http.get(worker.url + "/metrics") as response:
            assert response.status == 200
            plain_type = response.headers["Content-Type"]
            plain_text = await response.text()
    finally:
        await stopped(worker)

    assert open_type.startswith("application/openmetrics-text; version=1.0.0")
    assert open_text.endswith("# EOF\n")
    parsed = openmetrics.text_string_to_metric_families(open_text)  # type: ignore[no-untyped-call]
    families = {family.name: family for family in parsed}
    events = families[PREFIX + "events"]
    assert events.type == "counter"
    counted = [(s.labels, s.value) for s in events.samples if s.name.endswith("_total")]
    assert [(labels, value) for labels, value in counted if value] == [
        ({"hook": "NONSPECIFIC", "status": "200"}, 1.0)
    ]
    # The worker's own answers exist at 0 from the start, so rate() sees their first step.
    assert ({"hook": "INTERCEPTOR_PRE", "status": "500"}, 0.0) in counted
    assert not [s for s in events.samples if s.name.endswith("_created")]
    assert plain_type.startswith("text/plain; version=0.0.4")
    assert "# EOF" not in plain_text
    assert value(parse(plain_text), PREFIX + "events_total", hook="NONSPECIFIC", status="200") == 1


async def test_worker_metrics_false_counts_nothing_and_still_serves_events(
    emulator: tuple[Emulator, str], http: aiohttp.ClientSession
) -> None:
    emu, _ = emulator
    worker = await running(emulator, WORKER_METRICS="false")
    try:
        send = Sender(http, worker.url)
        assert await send.pre("good", emu.sign_token(scopes=["PLUGIN_INTERCEPTOR"])) == 200
        assert await send.nonspecific("good") == 200
        async with http.get(worker.url + "/metrics") as response:
            assert response.status != 200
            assert PREFIX not in await response.text()
        async with http.get(worker.url + "/healthz") as response:
            assert response.status == 200
    finally:
        await stopped(worker)


async def test_worker_metrics_false_answers_404_at_metrics(
    emulator: tuple[Emulator, str], http: aiohttp.ClientSession
) -> None:
    worker = await running(emulator, WORKER_METRICS="false")
    try:
        async with http.get(worker.url + "/metrics") as response:
            status = response.status
    finally:
        await stopped(worker)
    assert status == 404


# ---------------------------------------------------------------- worker.metrics, in process


def rendered(text: bytes) -> Samples:
    return parse(text.decode())


async def samples_of(metrics: Metrics) -> Samples:
    body, content_type = await metrics.render(None)
    assert content_type.startswith("text/plain; version=0.0.4")
    return rendered(body)


def test_status_class_names_the_hundreds_or_error() -> None:
    assert [status_class(s) for s in (100, 200, 204, 302, 404, 429, 500, 599)] == [
        "1xx", "2xx", "2xx", "3xx", "4xx", "4xx", "5xx", "5xx",
    ]  # fmt: skip
    assert [status_class(s) for s in (None, 0, 99, 600, 999, -1)] == ["error"] * 6


async def test_an_unknown_method_is_counted_as_other() -> None:
    metrics = Metrics()
    metrics.api_request("BREW", 200, 0.01)
    metrics.api_request("GET", None, 0.5)
    metrics.api_request("get", 503, 0.01)  # the client upper-cases; anything else is OTHER
    metrics.api_retry("PROPFIND")
    metrics.api_retry("GET")
    samples = await samples_of(metrics)
    assert moved({}, samples, PREFIX + "api_requests_total", "method", "status_class") == {
        ("OTHER", "2xx"): 1,
        ("GET", "error"): 1,
        ("OTHER", "5xx"): 1,
    }
    assert moved({}, samples, PREFIX + "api_request_duration_seconds_count", "method") == {
        ("OTHER",): 2,
        ("GET",): 1,
    }
    assert moved({}, samples, PREFIX + "api_retries_total", "method") == {
        ("OTHER",): 1,
        ("GET",): 1,
    }


async def test_an_unknown_jwt_reason_is_counted_as_invalid() -> None:
    metrics = Metrics()
    for reason in ("signature", "a reason nobody listed", "", "expired", "signature"):
        metrics.jwt_refused(reason)
    samples = await samples_of(metrics)
    assert moved({}, samples, PREFIX + "jwt_refusals_total", "reason") == {
        ("signature",): 2,
        ("invalid",): 2,
        ("expired",): 1,
    }
    # Every reason's series exists from the start, at zero.
    refusals = {
        dict(labels)["reason"] for name, labels in samples if name == PREFIX + "jwt_refusals_total"
    }
    assert refusals == set(JWT_REASONS)


async def test_an_abandoned_event_is_in_flight_no_more_and_not_answered() -> None:
    metrics = Metrics()
    for _ in range(3):
        metrics.event_started()
    assert value(await samples_of(metrics), PREFIX + "events_in_flight") == 3
    metrics.event_abandoned()
    metrics.event_finished("INTERCEPTOR_PRE", 200, 0.001)
    metrics.event_abandoned()
    samples = await samples_of(metrics)
    assert value(samples, PREFIX + "events_in_flight") == 0
    assert moved({}, samples, PREFIX + "events_total", "hook", "status") == {
        ("INTERCEPTOR_PRE", "200"): 1
    }
    assert moved({}, samples, PREFIX + "event_duration_seconds_count", "hook") == {
        ("INTERCEPTOR_PRE",): 1
    }


async def test_an_adapter_refusal_is_answered_without_being_in_flight() -> None:
    metrics = Metrics()
    metrics.event_answered("NOTIFICATION", 413, 0.0001)
    metrics.overloaded("NOTIFICATION")
    samples = await samples_of(metrics)
    assert value(samples, PREFIX + "events_in_flight") == 0
    assert moved({}, samples, PREFIX + "events_total", "hook", "status") == {
        ("NOTIFICATION", "413"): 1
    }
    assert moved({}, samples, PREFIX + "events_overloaded_total", "hook") == {("NOTIFICATION",): 1}


class Lags:
    """A lag reading a test scripts: a number, ``None`` (the broker cannot tell), an error, or
    a hang (a coroutine that never finishes)."""

    def __init__(self) -> None:
        self.answer: int | BaseException | None = 0
        self.hang = False
        self.reads = 0

    async def __call__(self) -> int | None:
        self.reads += 1
        if self.hang:
            await asyncio.get_running_loop().create_future()
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


def lag_series(samples: Samples) -> dict[tuple[str, ...], float]:
    return {
        tuple(v for _, v in labels): count
        for (name, labels), count in samples.items()
        if name == PREFIX + "queue_consumer_lag_messages"
    }


@pytest.fixture
def every_scrape_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """No reuse of a lag reading across scrapes, and a short bound on a hanging one."""
    monkeypatch.setattr("worker.metrics._LAG_REFRESH", 0.0)
    monkeypatch.setattr("worker.metrics._LAG_TIMEOUT", 0.05)


@pytest.mark.usefixtures("every_scrape_reads")
async def test_a_lag_the_broker_cannot_tell_has_no_series() -> None:
    metrics = Metrics()
    lag = Lags()
    metrics.watch_queue("orders", lag)
    metrics.watch_queue("no-lag")  # a source that cannot tell at all: never a series
    lag.answer = 7
    assert lag_series(await samples_of(metrics)) == {("orders",): 7}
    lag.answer = None
    assert lag_series(await samples_of(metrics)) == {}  # not the stale 7
    lag.answer = None
    assert lag_series(await samples_of(metrics)) == {}  # removing it twice is harmless
    lag.answer = ConnectionError("the broker is away")
    assert lag_series(await samples_of(metrics)) == {}
    lag.answer = 0
    assert lag_series(await samples_of(metrics)) == {("orders",): 0}
    assert lag.reads == 5


@pytest.mark.usefixtures("every_scrape_reads")
async def test_a_hanging_lag_reading_does_not_hold_the_scrape() -> None:
    metrics = Metrics()
    lag, quick = Lags(), Lags()
    metrics.watch_queue("stuck", lag)
    metrics.watch_queue("quick", quick)
    lag.answer, quick.answer = 3, 4
    assert lag_series(await samples_of(metrics)) == {("stuck",): 3, ("quick",): 4}
    lag.hang = True
    async with asyncio.timeout(LIMIT):  # a safety net: the scrape's own bound ends it first
        samples = await samples_of(metrics)
    assert lag_series(samples) == {("quick",): 4}  # the hanging one has no reading
    assert value(samples, PREFIX + "queue_messages_received_total", queue="stuck") == 0


async def test_a_lag_reading_is_reused_within_a_second() -> None:
    metrics = Metrics()
    lag = Lags()
    lag.answer = 2
    metrics.watch_queue("orders", lag)
    first, second = await samples_of(metrics), await samples_of(metrics)
    assert lag_series(first) == lag_series(second) == {("orders",): 2}
    assert lag.reads == 1  # two scrapes in a row cost the broker one question


async def test_each_queue_counts_apart_under_its_own_name() -> None:
    metrics = Metrics()
    orders, audit = metrics.watch_queue("orders"), metrics.watch_queue("audit")
    orders.received.inc(3)
    orders.redelivered.inc()
    orders.acknowledged.inc(2)
    orders.dead_lettered.inc()
    audit.retried.inc()
    audit.settle_failures.inc()
    audit.receive_failures.inc(2)
    samples = await samples_of(metrics)
    counts = {
        (name.removeprefix(PREFIX + "queue_").removesuffix("_total"), dict(labels)["queue"]): n
        for (name, labels), n in samples.items()
        if name.startswith(PREFIX + "queue_") and name.endswith("_total") and n
    }
    assert counts == {
        ("messages_received", "orders"): 3,
        ("messages_redelivered", "orders"): 1,
        ("messages_acknowledged", "orders"): 2,
        ("messages_dead_lettered", "orders"): 1,
        ("messages_retried", "audit"): 1,
        ("settle_failures", "audit"): 1,
        ("receive_failures", "audit"): 2,
    }
    assert_labels_bounded(samples, [], queues=["orders", "audit"])


async def test_two_metrics_count_apart_and_the_token_gauge_reads_at_scrape() -> None:
    left: list[float | None] = [None]
    first, second = Metrics(token_expires_in=lambda: left[0]), Metrics()
    first.event_answered("NONSPECIFIC", 200, 0.01)
    overloaded = value(
        await samples_of(second), PREFIX + "events_overloaded_total", hook="NONSPECIFIC"
    )
    assert overloaded == 0
    assert moved({}, await samples_of(second), PREFIX + "events_total", "hook", "status") == {}
    assert value(await samples_of(first), PREFIX + "service_token_expires_in_seconds") == 0
    left[0] = 42.5
    assert value(await samples_of(first), PREFIX + "service_token_expires_in_seconds") == 42.5
    left[0] = -3.0  # expired: never negative
    assert value(await samples_of(first), PREFIX + "service_token_expires_in_seconds") == 0
    assert value(await samples_of(second), PREFIX + "service_token_expires_in_seconds") == 0


async def test_render_speaks_openmetrics_when_asked() -> None:
    metrics = Metrics()
    metrics.event_answered("NONSPECIFIC", 200, 0.01)
    body, content_type = await metrics.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    body, content_type = await metrics.render("text/html,*/*")
    assert content_type.startswith("text/plain; version=0.0.4")
    assert not body.endswith(b"# EOF\n")
