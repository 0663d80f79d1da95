"""The BioT client against a real loopback aiohttp server that records what it received."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDictProxy, MultiMapping

from worker.client import (
    DEFAULT_USER_AGENT,
    BiotApi,
    BiotClient,
    create_session,
    fan_out,
    fetch_public_key_texts,
    make_ssl_context,
    open_session,
    parse_retry_after,
    service_login,
)
from worker.errors import ApiAuthError, ApiError, LoginError, TransientApiError
from worker.tracing import TraceContext, current_deadline, current_trace, parse_traceparent

TRACE = TraceContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "01")
SECRET = "s3cr3t-service-key"


# ---------------------------------------------------------------- the loopback upstream


@dataclass
class Seen:
    method: str
    path: str
    query: MultiMapping[str]
    headers: CIMultiDictProxy[str]
    body: bytes


Reply = Callable[[Seen], Awaitable[web.StreamResponse]]


def answer(status: int = 200, body: Any = None, headers: dict[str, str] | None = None) -> Reply:
    async def reply(seen: Seen) -> web.StreamResponse:
        raw = b"" if body is None else body if isinstance(body, bytes) else orjson.dumps(body)
        return web.Response(status=status, body=raw, headers=headers,
                            content_type="application/json")

    return reply


async def echo(seen: Seen) -> web.StreamResponse:
    return web.Response(body=seen.body, content_type="application/json")


@dataclass
class Upstream:
    """Records every request; answers from ``replies`` in order, then 200 ``{"ok": true}``."""

    seen: list[Seen] = field(default_factory=list)
    replies: list[Reply] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        seen = Seen(request.method, request.path, request.query, request.headers,
                    await request.read())
        self.seen.append(seen)
        reply = self.replies.pop(0) if self.replies else answer(200, {"ok": True})
        return await reply(seen)

    async def hang(self, seen: Seen) -> web.StreamResponse:
        await self.release.wait()
        return web.json_response({})

    def header(self, name: str) -> list[str | None]:
        return [seen.headers.get(name) for seen in self.seen]


@dataclass
class FakeTokens:
    issued: int = 1
    invalidated: list[str] = field(default_factory=list)

    async def get(self) -> str:
        return f"token-{self.issued}"

    def invalidate(self, token: str) -> None:
        self.invalidated.append(token)
        self.issued += 1


@dataclass
class FakeSleep:
    delays: list[float] = field(default_factory=list)

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", up.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    up.url = str(server.make_url("")).rstrip("/")
    try:
        yield up
    finally:
        up.release.set()
        await server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    s = create_session(max_connections=10)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def tokens() -> FakeTokens:
    return FakeTokens()


@pytest.fixture
def sleep() -> FakeSleep:
    return FakeSleep()


@pytest.fixture
def client(
    session: aiohttp.ClientSession, upstream: Upstream, tokens: FakeTokens, sleep: FakeSleep
) -> BiotClient:
    return BiotClient(session, upstream.url, tokens, retries=3, sleep=sleep, random=lambda: 1.0)


@pytest.fixture
def bound_trace() -> Iterator[TraceContext]:
    reset = current_trace.set(TRACE)
    yield TRACE
    current_trace.reset(reset)


@pytest.fixture
def closed_port() -> int:
    # Bound then closed: nothing listens there, so a connect is refused at once.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# ---------------------------------------------------------------- the handler's view


def test_biot_client_is_the_biot_api_handlers_see(client: BiotClient) -> None:
    api: BiotApi = client  # structural: mypy checks every method's signature here
    public = {name for name in dir(BiotClient) if not name.startswith("_")}
    assert public == {name for name in dir(BiotApi) if not name.startswith("_")}
    assert api is client


# ---------------------------------------------------------------- headers and bodies


@pytest.mark.usefixtures("bound_trace")
async def test_every_call_carries_token_trace_and_standard_headers(
    client: BiotClient, upstream: Upstream
) -> None:
    await client.get("/organization/v1/users/patients")
    await client.post("/organization/v1/users/patients", json={"a": 1}, allow_interception=True)

    assert upstream.header("Authorization") == ["Bearer token-1", "Bearer token-1"]
    assert upstream.header("User-Agent") == [DEFAULT_USER_AGENT] * 2
    assert upstream.header("Accept") == ["application/json"] * 2
    assert upstream.header("Content-Type") == [None, "application/json; charset=utf-8"]
    assert upstream.header("allow-interception") == [None, "1"]
    spans = [parse_traceparent(value) for value in upstream.header("traceparent")]
    assert [span.trace_id if span else None for span in spans] == [TRACE.trace_id] * 2
    span_ids = {span.span_id for span in spans if span}
    assert len(span_ids) == 2
    assert TRACE.span_id not in span_ids


async def test_without_a_bound_trace_a_fresh_valid_one_is_sent(
    client: BiotClient, upstream: Upstream
) -> None:
    await client.get("/x")
    assert parse_traceparent(upstream.header("traceparent")[0]) is not None


async def test_caller_headers_go_on_top_but_authorization_stays_ours(
    client: BiotClient, upstream: Upstream
) -> None:
    await client.get("/x", headers={"authorization": "Bearer evil", "x-execution-mode": "sync",
                                    "accept": "text/plain"})
    headers = upstream.seen[0].headers
    assert headers.getall("Authorization") == ["Bearer token-1"]
    assert headers["x-execution-mode"] == "sync"
    assert headers.getall("Accept") == ["text/plain"]


async def test_json_body_round_trips_through_orjson(
    client: BiotClient, upstream: Upstream
) -> None:
    payload = {"_name": {"firstName": "Zoë"}, "tags": [1, 2.5, None, True], "nested": {}}
    upstream.replies.append(echo)
    assert await client.put("/generic-entity/v1/generic-entities/1", json=payload) == payload
    assert orjson.loads(upstream.seen[0].body) == payload


@pytest.mark.parametrize("reply", [answer(204), answer(200, b"")])
async def test_no_content_decodes_to_none(
    client: BiotClient, upstream: Upstream, reply: Reply
) -> None:
    upstream.replies.append(reply)
    assert await client.delete("/organization/v1/users/patients/1") is None


async def test_a_2xx_body_that_is_not_json_is_an_api_error(
    client: BiotClient, upstream: Upstream
) -> None:
    upstream.replies.append(answer(200, b"<html>proxy</html>"))
    with pytest.raises(ApiError, match="not JSON") as caught:
        await client.get("/x")
    assert caught.value.upstream_status == 200
    assert caught.value.body == "<html>proxy</html>"


async def test_params_repeat_lists_and_json_encode_dicts(
    client: BiotClient, upstream: Upstream
) -> None:
    search = {"filter": {"_gender": {"eq": "FEMALE"}}, "page": 0}
    params = {"searchRequest": search, "ids": ["a", "b"], "n": 3, "on": True, "gone": None}
    await client.get("/organization/v1/users/patients", params=params)
    query = upstream.seen[0].query
    assert orjson.loads(query["searchRequest"]) == search
    assert query.getall("ids") == ["a", "b"]
    assert (query["n"], query["on"]) == ("3", "true")
    assert "gone" not in query


async def test_a_full_url_is_accepted_on_the_same_origin_only(
    client: BiotClient, upstream: Upstream
) -> None:
    await client.get(upstream.url + "/file/v1/files/1/download")
    assert upstream.seen[0].path == "/file/v1/files/1/download"
    with pytest.raises(ValueError, match="refusing"):
        await client.get("https://elsewhere.example/steal")
    assert len(upstream.seen) == 1


# ---------------------------------------------------------------- retries


async def test_get_retries_503_then_succeeds_with_bounded_jitter(
    session: aiohttp.ClientSession, upstream: Upstream, tokens: FakeTokens, sleep: FakeSleep
) -> None:
    jitter = iter([0.0, 1.0])
    client = BiotClient(session, upstream.url, tokens, retries=3, backoff_base=0.1,
                        backoff_max=0.15, sleep=sleep, random=lambda: next(jitter))
    upstream.replies += [answer(503), answer(502), answer(200, {"id": "p1"})]
    assert await client.get("/organization/v1/users/patients/p1") == {"id": "p1"}
    assert len(upstream.seen) == 3
    # attempt 0: 0.1 * (0.5 + 0/2); attempt 1: min(0.15, 0.2) * (0.5 + 1/2)
    assert sleep.delays == pytest.approx([0.05, 0.15])
    spans = [parse_traceparent(value) for value in upstream.header("traceparent")]
    assert len({span.trace_id for span in spans if span}) == 1
    assert len({span.span_id for span in spans if span}) == 3


async def test_real_jitter_stays_within_half_to_full_backoff(
    session: aiohttp.ClientSession, upstream: Upstream, tokens: FakeTokens, sleep: FakeSleep
) -> None:
    client = BiotClient(session, upstream.url, tokens, retries=4, backoff_base=0.1,
                        backoff_max=0.3, sleep=sleep)
    upstream.replies += [answer(504)] * 5
    with pytest.raises(TransientApiError):
        await client.get("/x")
    assert len(upstream.seen) == 5
    for delay, cap in zip(sleep.delays, [0.1, 0.2, 0.3, 0.3], strict=True):
        assert cap / 2 <= delay <= cap


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_non_idempotent_calls_are_not_retried(
    client: BiotClient, upstream: Upstream, sleep: FakeSleep, method: str
) -> None:
    upstream.replies.append(answer(503, {"code": "SERVICE_UNAVAILABLE"}))
    with pytest.raises(TransientApiError) as caught:
        await client.request(method, "/organization/v1/users/patients", json={})
    assert len(upstream.seen) == 1
    assert sleep.delays == []
    assert caught.value.upstream_status == 503
    assert caught.value.transient


async def test_retry_after_seconds_is_honoured(
    client: BiotClient, upstream: Upstream, sleep: FakeSleep
) -> None:
    upstream.replies += [answer(429, headers={"Retry-After": "2"}), answer(200, {})]
    assert await client.get("/x") == {}
    assert sleep.delays == [2.0]


async def test_retry_after_beyond_the_deadline_is_not_waited_for(
    client: BiotClient, upstream: Upstream, sleep: FakeSleep
) -> None:
    upstream.replies.append(answer(503, headers={"Retry-After": "30"}))
    reset = current_deadline.set(asyncio.get_running_loop().time() + 5)
    try:
        with pytest.raises(TransientApiError) as caught:
            await client.get("/x")
    finally:
        current_deadline.reset(reset)
    assert len(upstream.seen) == 1
    assert sleep.delays == []
    assert caught.value.details["retryAfter"] == 30.0


def test_retry_after_parses_seconds_and_http_dates() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("-1") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    in_ten = parse_retry_after(formatdate(time.time() + 10, usegmt=True))
    assert in_ten is not None
    assert 8.0 <= in_ten <= 10.0


async def test_connection_refused_raises_transient_after_retries(
    session: aiohttp.ClientSession, tokens: FakeTokens, sleep: FakeSleep, closed_port: int
) -> None:
    client = BiotClient(session, f"http://127.0.0.1:{closed_port}", tokens, retries=2,
                        sleep=sleep)
    with pytest.raises(TransientApiError, match="connection failed") as caught:
        await client.get("/x", params={"searchRequest": {"secret": "q"}})
    assert len(sleep.delays) == 2
    assert caught.value.url == f"http://127.0.0.1:{closed_port}/x"
    assert isinstance(caught.value.__cause__, aiohttp.ClientError)


async def test_a_500_is_a_permanent_api_error_without_retry(
    client: BiotClient, upstream: Upstream, sleep: FakeSleep
) -> None:
    upstream.replies.append(answer(500, b"upstream exploded " * 100))
    with pytest.raises(ApiError) as caught:
        await client.get("/x")
    assert type(caught.value) is ApiError
    assert not caught.value.transient
    assert len(upstream.seen) == 1
    assert sleep.delays == []
    assert isinstance(caught.value.body, str)
    assert len(caught.value.body) <= 500


# ---------------------------------------------------------------- auth


async def test_401_invalidates_and_retries_once_with_a_fresh_token(
    client: BiotClient, upstream: Upstream, tokens: FakeTokens
) -> None:
    upstream.replies += [answer(401, {"code": "UNAUTHORIZED"}), answer(201, {"id": "a1"})]
    result = await client.post("/organization/v1/users/patients/p/alerts", json={"x": 1})
    assert result == {"id": "a1"}
    assert upstream.header("Authorization") == ["Bearer token-1", "Bearer token-2"]
    assert tokens.invalidated == ["token-1"]


async def test_401_twice_raises_api_auth_error(
    client: BiotClient, upstream: Upstream, tokens: FakeTokens
) -> None:
    upstream.replies += [answer(401, {"code": "UNAUTHORIZED"})] * 2
    with pytest.raises(ApiAuthError) as caught:
        await client.get("/x")
    assert caught.value.upstream_status == 401
    assert len(upstream.seen) == 2
    assert tokens.invalidated == ["token-1"]
    assert "token-" not in str(caught.value)


async def test_403_is_an_auth_error_without_refresh(
    client: BiotClient, upstream: Upstream, tokens: FakeTokens
) -> None:
    upstream.replies.append(answer(403, {"code": "ACCESS_DENIED"}))
    with pytest.raises(ApiAuthError):
        await client.get("/x")
    assert tokens.invalidated == []
    assert len(upstream.seen) == 1


async def test_404_carries_status_code_and_body_but_no_query(
    client: BiotClient, upstream: Upstream
) -> None:
    error_body = {"code": "ENTITY_NOT_FOUND", "message": "no patient", "traceId": "a07a7e53"}
    upstream.replies.append(answer(404, error_body))
    with pytest.raises(ApiError) as caught:
        await client.get("/organization/v1/users/patients/p9", params={"q": "hidden-term"})
    error = caught.value
    assert type(error) is ApiError
    assert (error.upstream_status, error.method, error.body) == (404, "GET", error_body)
    assert error.details["upstreamCode"] == "ENTITY_NOT_FOUND"
    assert error.url == upstream.url + "/organization/v1/users/patients/p9"
    assert "hidden-term" not in str(error)
    assert "ENTITY_NOT_FOUND" in str(error)


# ---------------------------------------------------------------- deadlines


async def test_a_hanging_server_fails_within_the_event_deadline(
    client: BiotClient, upstream: Upstream, sleep: FakeSleep
) -> None:
    upstream.replies.append(upstream.hang)
    loop = asyncio.get_running_loop()
    started = loop.time()
    # Long enough for the request to reach the server on a loaded machine (it must be seen
    # once); the bound only proves the call did not wait for the hanging server.
    reset = current_deadline.set(started + 0.3)
    try:
        with pytest.raises(TransientApiError):
            await client.get("/x")
    finally:
        current_deadline.reset(reset)
    assert loop.time() - started < 5
    assert sleep.delays == []  # no time left for a retry
    assert len(upstream.seen) == 1


async def test_a_deadline_already_passed_sends_nothing(
    client: BiotClient, upstream: Upstream
) -> None:
    reset = current_deadline.set(asyncio.get_running_loop().time() - 0.01)
    try:
        with pytest.raises(TransientApiError, match="deadline exceeded before call"):
            await client.get("/x")
    finally:
        current_deadline.reset(reset)
    assert upstream.seen == []


async def test_the_per_call_timeout_bounds_an_attempt(
    client: BiotClient, upstream: Upstream, sleep: FakeSleep
) -> None:
    upstream.replies.append(upstream.hang)
    with pytest.raises(TransientApiError, match="no answer within"):
        await client.post("/x", json={}, timeout=0.05)
    assert sleep.delays == []


async def test_computed_timeouts_share_a_bounded_number_of_timer_queues(
    client: BiotClient, upstream: Upstream
) -> None:
    """A plugin that computes its timeouts (one per input size, say) does not grow the client:
    past the first few values each call's timeout has a timer of its own, which still bounds
    it, and leaves nothing on the loop once the call is over."""
    for n in range(40):
        await client.get("/x", timeout=5.0 + n / 1000)
    assert len(client._fixed_timeouts) <= 16
    upstream.replies.append(upstream.hang)
    with pytest.raises(TransientApiError, match="no answer within"):
        await client.post("/x", json={}, timeout=0.05 + 1e-6)  # past the shared ones
    upstream.release.set()
    assert len(client._fixed_timeouts) <= 16


# ---------------------------------------------------------------- search


async def test_search_sends_biot_search_request(client: BiotClient, upstream: Upstream) -> None:
    page = {"data": [{"_id": "1"}], "metadata": {"page": {"totalResults": 1}}}
    upstream.replies.append(answer(200, page))
    result = await client.search(
        "/organization/v1/users/patients", filter={"_gender": {"eq": "FEMALE"}},
        sort=[{"prop": "_creationTime", "order": "DESC"}], page=2, limit=10, free_text="ann",
    )
    assert result == page
    assert orjson.loads(upstream.seen[0].query["searchRequest"]) == {
        "filter": {"_gender": {"eq": "FEMALE"}},
        "sort": [{"prop": "_creationTime", "order": "DESC"}],
        "page": 2,
        "limit": 10,
        "freeTextSearch": "ann",
    }


async def test_search_rejects_an_answer_that_is_not_an_object(
    client: BiotClient, upstream: Upstream
) -> None:
    upstream.replies.append(answer(200, [1, 2]))
    with pytest.raises(ApiError, match="not a JSON object"):
        await client.search("/x")


def paged(total: int, claimed_total: int | None = None) -> Reply:
    """Answers searches from ``total`` entities, paging by the searchRequest it receives."""

    async def reply(seen: Seen) -> web.StreamResponse:
        request = orjson.loads(seen.query["searchRequest"])
        start = request["page"] * request["limit"]
        ids = range(start, min(start + request["limit"], total))
        shown = total if claimed_total is None else claimed_total
        meta = {"page": {"totalResults": shown, "page": request["page"], "limit": request["limit"]}}
        return web.json_response({"data": [{"_id": str(i)} for i in ids], "metadata": meta})

    return reply


async def collect(client: BiotClient, **kw: Any) -> list[str]:
    return [entity["_id"] async for entity in client.iter_search("/patients", **kw)]


async def test_iter_search_walks_every_page(client: BiotClient, upstream: Upstream) -> None:
    upstream.replies += [paged(7)] * 5
    assert await collect(client, limit=3) == [str(i) for i in range(7)]
    pages = [orjson.loads(s.query["searchRequest"])["page"] for s in upstream.seen]
    assert pages == [0, 1, 2]


async def test_iter_search_stops_at_max_pages(client: BiotClient, upstream: Upstream) -> None:
    upstream.replies += [paged(7)] * 5
    assert await collect(client, limit=3, max_pages=2) == [str(i) for i in range(6)]
    assert len(upstream.seen) == 2


async def test_iter_search_stops_at_an_empty_page(client: BiotClient, upstream: Upstream) -> None:
    upstream.replies += [paged(3, claimed_total=100)] * 5
    assert await collect(client, limit=3) == ["0", "1", "2"]
    assert len(upstream.seen) == 2


async def test_iter_search_sends_free_text_and_caller_params_on_every_page(
    client: BiotClient, upstream: Upstream
) -> None:
    upstream.replies += [paged(4)] * 3
    assert await collect(client, limit=2, free_text="ann", params={"x": "1"}) == list("0123")
    requests = [orjson.loads(s.query["searchRequest"]) for s in upstream.seen]
    assert [r["freeTextSearch"] for r in requests] == ["ann", "ann"]
    assert [s.query["x"] for s in upstream.seen] == ["1", "1"]


# ---------------------------------------------------------------- fan-out


async def test_fan_out_keeps_input_order() -> None:
    def call(index: int) -> Callable[[], Awaitable[int]]:
        async def run() -> int:
            for _ in range(10 - index):  # earlier calls finish later
                await asyncio.sleep(0)
            return index

        return run

    assert await fan_out([call(i) for i in range(10)], limit=10) == list(range(10))


async def test_fan_out_bounds_concurrency() -> None:
    running = peak = 0

    async def run() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        for _ in range(3):
            await asyncio.sleep(0)
        running -= 1

    await fan_out([run] * 10, limit=3)
    assert peak == 3


async def test_fan_out_failure_cancels_siblings_and_raises_itself() -> None:
    never = asyncio.Event()
    cancelled: list[int] = []

    def waiting(index: int) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            try:
                await never.wait()
            except asyncio.CancelledError:
                cancelled.append(index)
                raise

        return run

    async def failing() -> None:
        await asyncio.sleep(0)
        raise ApiError("boom", status=500)

    with pytest.raises(ApiError, match="boom"):
        await fan_out([waiting(0), failing, waiting(2)], limit=5)
    assert sorted(cancelled) == [0, 2]


async def test_fan_out_with_several_failures_raises_the_first_in_input_order() -> None:
    async def slow_fail() -> None:
        await asyncio.sleep(0)
        raise ApiError("first")

    async def fast_fail() -> None:
        raise TransientApiError("second")

    with pytest.raises(ApiError, match="first") as caught:
        await fan_out([slow_fail, fast_fail])
    assert type(caught.value) is ApiError
    assert any("1 other" in note for note in caught.value.__notes__)


async def test_fan_out_edge_cases() -> None:
    assert await fan_out([]) == []
    with pytest.raises(ValueError, match="limit"):
        await fan_out([], limit=0)


# ---------------------------------------------------------------- login and public key


@pytest.mark.usefixtures("bound_trace")
async def test_service_login_posts_credentials_and_returns_token_and_expiry(
    session: aiohttp.ClientSession, upstream: Upstream
) -> None:
    upstream.replies.append(
        answer(200, {"accessToken": "jwt-a", "accessTokenExpiration": "2025-11-24T09:23:14.945Z"})
    )
    result = await service_login(session, upstream.url, "user-1", SECRET)
    assert result == ("jwt-a", "2025-11-24T09:23:14.945Z")
    seen = upstream.seen[0]
    assert (seen.method, seen.path) == ("POST", "/ums/v2/services/accessToken")
    assert orjson.loads(seen.body) == {"id": "user-1", "secretKey": SECRET}
    assert "Authorization" not in seen.headers
    trace = parse_traceparent(seen.headers["traceparent"])
    assert trace is not None
    assert trace.trace_id == TRACE.trace_id


async def test_service_login_refusal_never_shows_the_secret(
    session: aiohttp.ClientSession, upstream: Upstream
) -> None:
    body = {"code": "UNAUTHORIZED", "message": f"bad secretKey {SECRET}"}
    upstream.replies.append(answer(401, body))
    with pytest.raises(LoginError) as caught:
        await service_login(session, upstream.url, "user-1", SECRET)
    error = caught.value
    assert (error.upstream_status, error.details["upstreamCode"]) == (401, "UNAUTHORIZED")
    assert not error.transient
    for text in (str(error), repr(error), repr(error.details), repr(error.body)):
        assert SECRET not in text


async def test_service_login_outage_is_a_transient_login_error(
    session: aiohttp.ClientSession, closed_port: int
) -> None:
    with pytest.raises(LoginError) as caught:
        await service_login(session, f"http://127.0.0.1:{closed_port}", "user-1", SECRET)
    assert caught.value.transient
    assert SECRET not in str(caught.value)


async def test_service_login_malformed_answer_does_not_keep_the_body(
    session: aiohttp.ClientSession, upstream: Upstream
) -> None:
    upstream.replies.append(answer(200, {"accessToken": "jwt-leak"}))
    with pytest.raises(LoginError, match="lacks accessToken") as caught:
        await service_login(session, upstream.url, "user-1", SECRET)
    assert caught.value.body is None
    assert "jwt-leak" not in str(caught.value)


@pytest.mark.usefixtures("bound_trace")
async def test_public_key_fetch_sends_no_authorization_or_trace(
    session: aiohttp.ClientSession, upstream: Upstream
) -> None:
    upstream.replies.append(answer(200, {"publicKey": "MIIB-now", "previousPublicKey": "MIIB-old"}))
    assert await fetch_public_key_texts(session, upstream.url) == ("MIIB-now", "MIIB-old")
    seen = upstream.seen[0]
    assert (seen.method, seen.path) == ("GET", "/ums/v1/security/public-key")
    assert "Authorization" not in seen.headers
    assert "traceparent" not in seen.headers


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (answer(200, {"publicKey": "MIIB-now"}), ("MIIB-now", None)),
        (answer(200, {"publicKey": "MIIB-now", "previousPublicKey": ""}), ("MIIB-now", None)),
    ],
)
async def test_public_key_without_a_previous_one(
    session: aiohttp.ClientSession, upstream: Upstream, reply: Reply, expected: tuple[str, None]
) -> None:
    upstream.replies.append(reply)
    assert await fetch_public_key_texts(session, upstream.url) == expected


@pytest.mark.parametrize(
    ("reply", "error"),
    [(answer(503), TransientApiError), (answer(200, {"other": 1}), ApiError)],
)
async def test_public_key_failures_are_typed(
    session: aiohttp.ClientSession, upstream: Upstream, reply: Reply, error: type[ApiError]
) -> None:
    upstream.replies.append(reply)
    with pytest.raises(error) as caught:
        await fetch_public_key_texts(session, upstream.url)
    assert type(caught.value) is error


# ---------------------------------------------------------------- session


def test_ssl_context_always_verifies() -> None:
    context = make_ssl_context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname


async def test_create_session_rejects_a_missing_ca_bundle(tmp_path: Any) -> None:
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(ValueError, match="cannot load CA bundle") as caught:
        create_session(ca_bundle=missing)
    assert missing in str(caught.value)


async def test_open_session_rejects_a_bundle_that_is_not_pem(tmp_path: Any) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ValueError, match="cannot load CA bundle"):
        await open_session(ca_bundle=str(junk))


async def test_open_session_builds_a_pooled_orjson_session() -> None:
    s = await open_session(max_connections=7, user_agent="ua/1")
    try:
        assert isinstance(s.connector, aiohttp.TCPConnector)
        assert s.connector.limit == 7
        assert s.json_serialize({"a": 1}) == '{"a":1}'
        assert s.headers["User-Agent"] == "ua/1"
    finally:
        await s.close()


def test_create_session_needs_a_running_loop() -> None:
    with pytest.raises(RuntimeError):
        create_session()
