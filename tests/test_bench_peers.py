"""The benchmark's peers (``worker.bench.peers``), each started as a real process against the
emulator: (f) FastAPI on uvicorn answers every HTTP scenario as the worker does, (g) FastStream
answers the (a) event on the reply stream as the worker's queue path does; both refuse a bad JWT
or scope as the worker does, carry the event's trace on their API calls, log one JSON line per
event, log in once (again after a 401). Then their registration in the plans, the processes'
command lines, the missing-package gating, and their ratios and targets in the report. No
timing is asserted; the tests that need Redis skip when it is down (fail under ``CI=true``)."""

from __future__ import annotations

import asyncio
import importlib.util
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import orjson
import pytest
import redis
import redis.asyncio as aioredis
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import settings_for
from tests.queue_helpers import REDIS, require_broker
from worker.app import WorkerApp
from worker.bench import payloads, procs
from worker.bench.cli import _installed, bench_main
from worker.bench.httpload import Reply
from worker.bench.peers.plugin import ServiceAuth
from worker.bench.peers.stream import PeerStream
from worker.bench.plan import FULL, QUICK, SCENARIOS, VARIANTS
from worker.bench.redisload import RedisAddress, RedisChannel, connect
from worker.bench.report import aggregate, point_record, targets
from worker.bench.scenarios import build_routes
from worker.bench.table import render
from worker.cli import build_parser
from worker.events import event_from_http
from worker.logs import CapturingLog
from worker.responses import Response
from worker.testing.emulator import Emulator, EmulatorConfig, EmulatorServer
from worker.testing.emulator.entities import PATIENT
from worker.testing.emulator.keys import cycling_factory, generate_key

REDIS_URL = f"redis://{REDIS[0]}:{REDIS[1]}/0"
WAIT = 15.0  # the longest any condition here may take
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def traceparent(n: int) -> str:
    return f"00-{TRACE_ID[:-4]}{n:04x}-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def keys() -> list[rsa.RSAPrivateKey]:
    return [generate_key()]


@pytest.fixture
async def server(keys: list[rsa.RSAPrivateKey]) -> AsyncIterator[EmulatorServer]:
    emulator = Emulator(EmulatorConfig(seed_patients=12), key_factory=cycling_factory(keys))
    async with EmulatorServer(emulator) as srv:
        yield srv


def identity(emulator: Emulator) -> dict[str, Any]:
    return {
        "serviceUserId": emulator.service_user_id,
        "serviceUserSecretKey": emulator.service_user_secret,
    }


def fixtures_of(emulator: Emulator, interceptor_token: str | None = None) -> payloads.Fixtures:
    return payloads.Fixtures(
        interceptor_token=interceptor_token or emulator.sign_token(scopes=["PLUGIN_INTERCEPTOR"]),
        notification_token=emulator.sign_token(scopes=["ACTION_NOTIFICATION"]),
        user_token=emulator.user_token(),
        patients=emulator.store.all(PATIENT),
        organization_id=emulator.config.organization_id,
    )


def event_of(scenario: str, fixtures: payloads.Fixtures, index: int = 0) -> payloads.Event:
    return payloads.BUILDERS[scenario](fixtures)[index]


def as_sent(events: list[payloads.Event]) -> list[dict[str, Any]]:
    """The events as sent, the n-th with ``traceparent(n)``."""
    return [
        {"headers": {**event.headers, "traceparent": traceparent(n)}, "body": event.body}
        for n, event in enumerate(events)
    ]


async def worker_answers(server: EmulatorServer, events: list[dict[str, Any]]) -> list[Response]:
    """What the worker (its scenario routes, dispatched in-process) answers each event."""
    emulator = server.emulator
    settings = settings_for(
        BIOT_BASE_URL=server.url,
        BIOT_SERVICE_USER_ID=emulator.service_user_id,
        BIOT_SERVICE_USER_SECRET_KEY=emulator.service_user_secret,
    )
    answers = []
    async with WorkerApp(settings, build_routes(), log=CapturingLog()) as app:
        for event in events:
            received = asyncio.get_running_loop().time()
            http_event = event_from_http(event["headers"], event["body"], received_at=received)
            answers.append(await app.dispatcher.dispatch(http_event))
    return answers


def same_answer(peer: Reply, worker: Response) -> None:
    """Status and body as the worker's: the whole body for a success, the error's code."""
    assert peer.status == worker.status
    if worker.status >= 400:
        assert orjson.loads(peer.body)["code"] == worker.json()["code"]
    else:
        assert (orjson.loads(peer.body) if peer.body else None) == worker.json()


async def calls_of(server: EmulatorServer, trace_id: str) -> list[dict[str, Any]]:
    """The API calls the emulator received in ``trace_id`` (its call log, over HTTP)."""
    query = {"trace_id": trace_id, "direction": "in"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{server.url}/_emulator/calls", params=query) as response,
    ):
        calls: list[dict[str, Any]] = (await response.json())["calls"]
    return [c for c in calls if c["path"].startswith("/organization/")]


def event_lines(log: Path) -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in log.read_bytes().splitlines() if line.strip()]
    return [line for line in lines if line["message"].startswith("event ")]


# ---------------------------------------------------------------- (f) FastAPI on uvicorn


@pytest.fixture
async def fastapi_peer(server: EmulatorServer, tmp_path: Path) -> AsyncIterator[str]:
    port = procs.free_port()
    args = procs.target_args("fastapi", "fastapi", port, server.url)
    env = procs.peer_env(identity(server.emulator), server.url, None)
    proc = await procs.spawn("fastapi@http", args, env, port, tmp_path)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        await procs.stop(proc)


async def post(url: str, event: payloads.Event, trace: str) -> tuple[Reply, str | None]:
    """One event as BioT sends it; the answer and its ``traceparent`` header."""
    headers = {**event.headers, "traceparent": trace}
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, data=event.body, headers=headers) as response,
    ):
        reply = Reply(response.status, await response.read(), False)
        return reply, response.headers.get("traceparent")


async def test_fastapi_peer_answers_every_scenario_as_the_worker_does(
    server: EmulatorServer, fastapi_peer: str
) -> None:
    fixtures = fixtures_of(server.emulator)
    scenarios = ("a", "b", "c", "d", "a", "b")
    events = [event_of(scenario, fixtures, n // 4) for n, scenario in enumerate(scenarios)]
    replies = []
    for n, (scenario, event) in enumerate(zip(scenarios, events, strict=True)):
        reply, echoed = await post(fastapi_peer, event, traceparent(n))
        assert echoed == traceparent(n)  # the answer carries the event's trace, as the worker's
        assert payloads.checker(scenario)(reply, True) is None
        replies.append(reply)
    assert server.emulator.logins == 1  # once at start, then the cached token
    for peer, worker in zip(replies, await worker_answers(server, as_sent(events)), strict=True):
        same_answer(peer, worker)


async def test_fastapi_peer_carries_the_events_trace_on_each_api_call(
    server: EmulatorServer, fastapi_peer: str
) -> None:
    fixtures = fixtures_of(server.emulator)
    reply, _ = await post(fastapi_peer, event_of("c", fixtures), traceparent(7))
    assert reply.status == 200
    calls = await calls_of(server, traceparent(7).split("-")[1])
    assert len(calls) == 3  # (c) fans out three GETs, each in the event's trace...
    spans = {call["span_id"] for call in calls}
    assert len(spans) == 3 and "00f067aa0ba902b7" not in spans  # ...with a span of its own


async def test_fastapi_peer_refuses_a_bad_jwt_or_scope_as_the_worker_does(
    server: EmulatorServer, fastapi_peer: str
) -> None:
    emulator = server.emulator
    notification_token = emulator.sign_token(scopes=["ACTION_NOTIFICATION"])
    forged = emulator.sign_token(scopes=["PLUGIN_INTERCEPTOR"])[:-4] + "AAAA"
    unsigned = event_of("b", fixtures_of(emulator))
    no_token = {k: v for k, v in unsigned.headers.items() if k != "authorization"}
    bad = [
        event_of("a", fixtures_of(emulator, forged)),  # 400: signature
        event_of("a", fixtures_of(emulator, notification_token)),  # 403: scope
        payloads.Event(no_token, unsigned.body),  # 400: no token at all
    ]
    replies = [(await post(fastapi_peer, event, traceparent(n)))[0] for n, event in enumerate(bad)]
    assert [r.status for r in replies] == [400, 403, 400]
    for n, reply in enumerate(replies):
        body = orjson.loads(reply.body)
        assert body["code"] == "JWT_ERROR"
        assert body["traceId"] == traceparent(n).split("-")[1]
        assert set(body) == {"code", "message", "serviceName", "traceId", "environment", "details"}
    for peer, worker in zip(replies, await worker_answers(server, as_sent(bad)), strict=True):
        same_answer(peer, worker)
    assert await calls_of(server, traceparent(2).split("-")[1]) == []  # refused before any call


async def test_fastapi_peer_logs_one_json_line_per_event(
    server: EmulatorServer, tmp_path: Path
) -> None:
    port = procs.free_port()
    args = procs.target_args("fastapi", "fastapi", port, server.url)
    env = procs.peer_env(identity(server.emulator), server.url, None)
    proc = await procs.spawn("fastapi@http", args, env, port, tmp_path)
    try:
        fixtures = fixtures_of(server.emulator)
        forged = fixtures_of(server.emulator, "x.y.z")
        events = [event_of("a", fixtures), event_of("b", fixtures), event_of("a", forged)]
        for n, event in enumerate(events):
            await post(f"http://127.0.0.1:{port}/", event, traceparent(n))
    finally:
        await procs.stop(proc)  # uvicorn exits by re-raising the SIGTERM it handled: -15
    lines = event_lines(tmp_path / "fastapi-http.log")
    assert [(line["message"], line["status"]) for line in lines] == [
        ("event handled", 200), ("event handled", 200), ("event refused", 400),
    ]  # fmt: skip
    for n, line in enumerate(lines):
        assert line["traceId"] == traceparent(n).split("-")[1]
        assert line["hook"] == "INTERCEPTOR_PRE" and line["appName"] == "biot-bench"
        assert line["level"] == ("INFO" if n < 2 else "WARN")
        assert line["@timestamp"].endswith("Z") and line["duration_ms"] >= 0
    assert "x.y.z" not in (tmp_path / "fastapi-http.log").read_text()  # no token in the log


async def test_fastapi_peer_logs_in_again_after_a_401(
    server: EmulatorServer, fastapi_peer: str
) -> None:
    server.emulator.faults.update(
        {"errors": [{"route": "GET /organization/*", "status": 401, "count": 1}]}
    )
    reply, _ = await post(fastapi_peer, event_of("b", fixtures_of(server.emulator)), traceparent(1))
    assert payloads.checker("b")(reply, True) is None  # the retry with a new token answered
    assert server.emulator.logins == 2
    assert len(await calls_of(server, traceparent(1).split("-")[1])) == 2


# ---------------------------------------------------------------- the service token, in memory

def login_answer(token: str, lifetime: float = 600.0) -> httpx2.Response:
    from datetime import UTC, datetime, timedelta

    expires = datetime.now(UTC) + timedelta(seconds=lifetime)
    return httpx2.Response(200, json={"accessToken": token,
                                     "accessTokenExpiration": expires.isoformat()})  # fmt: skip


class FakeBiot:
    """BioT's login and one API path, counting logins; the API refuses other tokens."""

    def __init__(self) -> None:
        self.logins = 0
        self.refuse_next = False

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.path == "/ums/v2/services/accessToken":
            self.logins += 1
            return login_answer(f"token-{self.logins}")
        if self.refuse_next:
            self.refuse_next = False
            return httpx2.Response(401)
        return httpx2.Response(200, json={"auth": request.headers["authorization"]})


@pytest.fixture
def clock() -> list[float]:
    return [1000.0]


async def test_service_auth_logs_in_once_for_concurrent_calls_and_again_before_expiry(
    clock: list[float],
) -> None:
    biot = FakeBiot()
    auth = ServiceAuth("http://biot", "svc", "secret", clock=lambda: clock[0])
    async with httpx2.AsyncClient(
        base_url="http://biot", auth=auth, transport=httpx2.MockTransport(biot)
    ) as client:
        answers = await asyncio.gather(*(client.get("/api") for _ in range(10)))
        assert {a.json()["auth"] for a in answers} == {"Bearer token-1"} and biot.logins == 1
        clock[0] += 600 - 60 - 1  # one second before the refresh point (60 s before expiry)
        assert (await client.get("/api")).json()["auth"] == "Bearer token-1"
        clock[0] += 2  # past it: the next call logs in first
        assert (await client.get("/api")).json()["auth"] == "Bearer token-2"
        assert biot.logins == 2


async def test_service_auth_answers_a_401_with_one_login_and_one_retry(
    clock: list[float],
) -> None:
    biot = FakeBiot()
    auth = ServiceAuth("http://biot", "svc", "secret", clock=lambda: clock[0])
    async with httpx2.AsyncClient(
        base_url="http://biot", auth=auth, transport=httpx2.MockTransport(biot)
    ) as client:
        await client.get("/api")
        biot.refuse_next = True
        answer = await client.get("/api")
    assert (answer.status_code, answer.json()["auth"]) == (200, "Bearer token-2")
    assert biot.logins == 2


# ---------------------------------------------------------------- (g) FastStream, Redis Streams


@pytest.fixture
async def faststream_peer(
    server: EmulatorServer, tmp_path: Path
) -> AsyncIterator[tuple[PeerStream, procs.Proc]]:
    require_broker("Redis", REDIS)
    stream = PeerStream(REDIS_URL, f"biot-test-{uuid.uuid4().hex}")
    proc: procs.Proc | None = None
    try:
        env = {**procs.peer_env(identity(server.emulator), server.url, None), **stream.env(8)}
        args = procs.target_args("faststream", "faststream", 0, server.url)
        proc = await procs.launch("faststream@http", args, env, 0, tmp_path)
        await stream.wait_consuming(proc)
        yield stream, proc
    finally:
        if proc is not None:
            await procs.stop(proc)
        await stream.aclose()
        await delete_keys(stream.name)


async def delete_keys(prefix: str) -> None:
    client = aioredis.Redis(host=REDIS[0], port=REDIS[1])
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def envelope(event: payloads.Event, trace: str) -> bytes:
    headers = {**event.headers, "traceparent": trace}
    return orjson.dumps({"headers": headers, "body": event.body.decode()})


async def pending(stream: PeerStream) -> int:
    client = aioredis.Redis(host=REDIS[0], port=REDIS[1])
    try:
        [group] = await client.xinfo_groups(stream.name)
        return int(group["pending"])
    finally:
        await client.aclose()


async def test_faststream_peer_replies_on_the_reply_stream_as_the_worker_does(
    server: EmulatorServer, faststream_peer: tuple[PeerStream, procs.Proc], tmp_path: Path
) -> None:
    stream, proc = faststream_peer
    emulator = server.emulator
    fixtures = fixtures_of(emulator)
    events = [
        event_of("a", fixtures),  # scenario (e): the (a) event
        event_of("b", fixtures),  # an API call: its trace
        event_of("a", fixtures_of(emulator, emulator.sign_token(scopes=["ACTION_NOTIFICATION"]))),
        event_of("a", fixtures_of(emulator, "x.y.z")),
    ]
    channel: RedisChannel = await connect(
        RedisAddress.parse(REDIS_URL), stream.name, f"{stream.name}:reply:1"
    )
    try:
        replies = [await channel.send(envelope(e, traceparent(n))) for n, e in enumerate(events)]
    finally:
        channel.close()
    assert [r.status for r in replies] == [200, 200, 403, 400]
    assert payloads.checker("e")(replies[0], True) is None
    [call] = await calls_of(server, traceparent(1).split("-")[1])
    assert call["span_id"] not in (None, "00f067aa0ba902b7")
    for peer, worker in zip(replies, await worker_answers(server, as_sent(events)), strict=True):
        same_answer(peer, worker)
    async with asyncio.timeout(WAIT):  # FastStream acks once the handler has returned
        while await pending(stream):  # noqa: ASYNC110 - another process acks
            await asyncio.sleep(0.02)
    await stream.trim()
    assert await stream_length(stream.name) == 0
    assert await procs.stop(proc) == 0
    lines = event_lines(tmp_path / "faststream-http.log")
    assert [(line["status"], line["traceId"]) for line in lines] == [
        (status, traceparent(n).split("-")[1]) for n, status in enumerate((200, 200, 403, 400))
    ]


async def stream_length(name: str) -> int:
    client = aioredis.Redis(host=REDIS[0], port=REDIS[1])
    try:
        return int(await client.xlen(name))
    finally:
        await client.aclose()


# ---------------------------------------------------------------- registration


def test_the_peers_run_in_both_plans_in_their_scenarios() -> None:
    for plan in (QUICK, FULL):
        fastapi = {(p.scenario, p.tls) for p in plan.points() if p.variant == "fastapi"}
        assert fastapi == {("a", False), ("b", False), ("c", False), ("d", False),
                           ("b", True), ("c", True)}  # fmt: skip
        faststream = {(p.scenario, p.level) for p in plan.points() if p.variant == "faststream"}
        assert {scenario for scenario, _ in faststream} == {"e"}
        assert {level for _, level in faststream} >= {f"c={c}" for c in plan.concurrency}
        assert {"fastapi@http", "fastapi@https", "faststream@http"} <= set(plan.targets())
    assert VARIANTS["fastapi"].title == "(f) FastAPI + uvicorn"
    assert VARIANTS["faststream"].title == "(g) FastStream, Redis Streams"
    assert "faststream" in (SCENARIOS["e"].only or ())


def test_the_peers_command_lines_and_environment() -> None:
    args = procs.target_args("fastapi", "fastapi", 8123, "http://x")
    assert args == ["uvicorn", "worker.bench.peers.fastapi_app:app", "--host", "127.0.0.1",
                    "--port", "8123", "--no-access-log"]  # fmt: skip
    assert procs.target_args("faststream", "faststream", 0, "http://x") == [
        "worker.bench.peers.faststream_app"
    ]
    env = procs.peer_env({"serviceUserId": "svc", "serviceUserSecretKey": "s"}, "https://x", "/ca")
    assert env == {"BIOT_BASE_URL": "https://x", "BIOT_SERVICE_USER_ID": "svc",
                   "BIOT_SERVICE_USER_SECRET_KEY": "s", "BIOT_APP_NAME": "biot-bench",
                   "SSL_CERT_FILE": "/ca"}  # fmt: skip


def test_a_peer_whose_packages_are_missing_is_left_out_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "faststream" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    variants = _installed(["worker", "worker-queue", "fastapi", "faststream"])
    assert variants == ["worker", "worker-queue", "fastapi"]
    [line] = capsys.readouterr().err.splitlines()
    assert "faststream rows are left out" in line and "biot-worker[bench]" in line


# ---------------------------------------------------------------- the report


def rows_of(figures: dict[tuple[str, str, int], tuple[float, float]]) -> list[dict[str, Any]]:
    """Rows from (scenario, variant, concurrency) -> (p99 ms, cpu s over 1000 events)."""
    from collections import Counter

    from worker.bench.load import LoadResult
    from worker.bench.plan import Point

    records, samples = [], {}
    for (scenario, variant, concurrency), (p99, cpu) in figures.items():
        point = Point(0, scenario, False, variant, concurrency)
        result = LoadResult(latencies_us=[p99 * 1000], completed=1000, window_s=1.0,
                            errors=Counter(), cpu_s={"target": cpu, "emulator": 0.1,
                                                     "loadgen": 0.1})  # fmt: skip
        records.append(point_record(point, result))
        samples[f"{scenario}|False|{variant}|{point.level}"] = [p99 * 1000]
    return aggregate(records, samples)


def test_the_report_divides_the_worker_by_each_peer_and_checks_the_peer_targets() -> None:
    rows = rows_of({
        ("a", "worker", 1): (1.0, 0.20), ("a", "fastapi", 1): (2.0, 0.40),
        ("a", "worker", 32): (4.0, 0.15), ("a", "fastapi", 32): (5.0, 0.30),
        ("b", "worker", 32): (9.0, 0.35), ("b", "fastapi", 32): (6.0, 0.25),
        ("e", "worker", 32): (4.0, 0.15), ("e", "worker-queue", 32): (8.0, 0.30),
        ("e", "faststream", 32): (10.0, 0.60),
    })  # fmt: skip
    index = {(r["scenario"], r["variant"], r["level"]): r for r in rows}
    assert index[("a", "worker", "c=1")]["ratios"]["fastapi"]["cpu"] == pytest.approx(0.5)
    queue = index[("e", "worker-queue", "c=32")]["ratios"]
    assert set(queue) == {"worker", "faststream"}
    assert queue["faststream"]["cpu"] == pytest.approx(0.5)
    assert queue["faststream"]["p99"] == pytest.approx(0.8)
    assert "fastapi" not in index[("a", "fastapi", "c=1")]["ratios"]
    by_name = {t["target"]: t for t in targets(rows, None)}
    cpu_f = by_name["worker uses less CPU per event than (f) in every scenario"]
    assert (cpu_f["met"], cpu_f["at"], cpu_f["points"]) == (False, "(b) c=32", 3)
    assert cpu_f["measured"] == pytest.approx(0.35 / 0.25)
    p99_f = by_name["worker p99 lower than (f) at c=32"]
    assert (p99_f["met"], p99_f["at"], p99_f["points"]) == (False, "(b) c=32", 2)
    assert by_name["worker uses less CPU per event than (g)"]["met"] is True
    assert by_name["worker p99 lower than (g) at c=32"]["measured"] == pytest.approx(0.8)
    assert by_name["no errors (peer rows)"]["met"] is True
    table = render({
        "meta": {"mode": "quick", "api_latency_ms": 2.0, "pinning": "off"},
        "rows": rows, "targets": targets(rows, None),
    })  # fmt: skip
    assert "(f) FastAPI + uvicorn" in table and "(g) FastStream, Redis Streams" in table
    assert "worker ÷floor" not in table  # no floor row measured here
    assert "worker ÷(f): p50 0.50 p99 0.50 cpu 0.50" in table
    assert "worker-queue ÷HTTP: " in table and "| ÷(g): p50 0.80" in table
    assert "(highest at (b) c=32, of 3)" in table


def test_peer_targets_are_not_measured_without_the_peers() -> None:
    rows = rows_of({("a", "worker", 1): (1.0, 0.2), ("a", "floor", 1): (1.0, 0.1)})
    by_name = {t["target"]: t for t in targets(rows, None)}
    for name in ("worker uses less CPU per event than (f) in every scenario",
                 "worker p99 lower than (g) at c=32", "no errors (peer rows)"):  # fmt: skip
        assert by_name[name]["met"] is None


# ---------------------------------------------------------------- in a run


def test_a_tiny_run_measures_the_peers_beside_the_worker_and_cleans_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_broker("Redis", REDIS)
    args = build_parser().parse_args([
        "bench", "--quick", "--scenarios", "a,e", "--concurrency", "2",
        "--variants", "worker,fastapi,worker-queue,faststream",
        "--requests", "30", "--warmup", "10", "--rates", "none", "--target-reps", "1",
        "--no-tls", "--no-profile", "--no-pin", "--no-chart", "--output", str(tmp_path),
    ])  # fmt: skip
    assert bench_main(args) == 0

    table = capsys.readouterr().out
    assert "worker ÷(f): p50" in table and "÷(g): p50" in table
    result = orjson.loads((tmp_path / "bench-quick.json").read_bytes())
    rows = {(row["scenario"], row["variant"]): row for row in result["rows"]}
    assert set(rows) == {("a", "worker"), ("a", "fastapi"), ("e", "worker"),
                         ("e", "worker-queue"), ("e", "faststream")}  # fmt: skip
    for key, row in rows.items():  # (e)'s two rows measured once more (--target-reps 1)
        reps = 2 if key in (("e", "worker"), ("e", "worker-queue")) else 1
        assert (row["reps"], row["n"], row["errors"], row["incomplete"]) == (reps, 30 * reps, 0, 0)
    assert result["plan"]["target_reps"] == 1
    assert set(rows[("a", "worker")]["ratios"]) == {"fastapi"}
    assert set(rows[("e", "worker-queue")]["ratios"]) == {"worker", "faststream"}
    assert set(rows[("e", "faststream")]["ratios"]) == {"worker"}  # ÷ the worker over HTTP
    names = {t["target"]: t for t in result["targets"]}
    assert names["no errors (peer rows)"]["met"] is True
    assert names["worker uses less CPU per event than (g)"]["measured"] is not None
    leftovers = redis.Redis(host=REDIS[0], port=REDIS[1])
    try:  # the run's stream, the peer's stream beside it and every reply stream: gone
        assert list(leftovers.scan_iter(match=f"{result['queue']['stream']}*")) == []
    finally:
        leftovers.close()
