"""The HTTP adapter over real loopback HTTP: contract, limits, load shedding, health."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from tests.conftest import TRACE_ID, KeyPair, headers_for, interceptor_body
from tests.fixture_plugin import PRE_MARK
from tests.test_dispatch import interceptor_token, make_dispatcher
from worker.adapters.http import HttpAdapter
from worker.errors import LoginError
from worker.events import PreInterception
from worker.routing import Context, Router

Serve = Callable[..., Awaitable[TestServer]]


async def _ready() -> None:
    return None


@pytest.fixture
async def serve(keys: KeyPair) -> AsyncIterator[Serve]:
    servers: list[TestServer] = []

    async def start(
        routes: Router | None = None,
        *,
        max_in_flight: int = 16,
        max_body_bytes: int = 64 * 1024,
        ready: Callable[[], Awaitable[None]] = _ready,
        body_timeout: float = 10.0,
        keepalive_timeout: float = 75.0,
    ) -> TestServer:
        dispatcher, log = make_dispatcher(keys, routes)
        adapter = HttpAdapter(
            dispatcher,
            max_in_flight=max_in_flight,
            max_body_bytes=max_body_bytes,
            ready=ready,
            log=log,
            body_timeout=body_timeout,
        )
        server = TestServer(adapter.application(), host="127.0.0.1")
        await server.start_server(keepalive_timeout=keepalive_timeout)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


async def test_signed_interceptor_over_http(serve: Serve, keys: KeyPair) -> None:
    server = await serve()
    body = orjson.dumps(interceptor_body("INTERCEPTOR_PRE"))
    headers = headers_for("INTERCEPTOR_PRE", interceptor_token(keys))
    async with (
        ClientSession() as http,
        http.post(server.make_url("/"), data=body, headers=headers) as response,
    ):
        assert response.status == 200
        assert response.headers["content-type"].startswith("application/json")
        assert TRACE_ID in response.headers["traceparent"]
        payload = await response.json()
    assert payload["request"]["body"]["_name"]["firstName"] == "Ada" + PRE_MARK


async def test_any_path_is_an_event_endpoint(serve: Serve) -> None:
    server = await serve()
    async with (
        ClientSession() as http,
        http.post(server.make_url("/plugin/hooks"), data=b"{}") as response,
    ):
        assert response.status == 200  # NONSPECIFIC without token, the fixture plugin's handler
        assert (await response.json())["patients"] == 3


async def test_oversized_body_is_413_in_biot_shape(serve: Serve) -> None:
    server = await serve(max_body_bytes=1000)
    async with (
        ClientSession() as http,
        http.post(server.make_url("/"), data=b"x" * 5000) as response,
    ):
        assert response.status == 413
        payload = await response.json()
    assert payload["code"] == "PAYLOAD_TOO_LARGE"
    assert set(payload) == {"code", "message", "serviceName", "traceId", "environment", "details"}


async def test_oversized_chunked_body_is_413(serve: Serve) -> None:
    server = await serve(max_body_bytes=1000)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 500

    async with ClientSession() as http, http.post(server.make_url("/"), data=chunks()) as response:
        assert response.status == 413


async def _raw_exchange(server: TestServer, request: bytes, *, eof: bool = True) -> bytes:
    """Send raw bytes, optionally half-close, and read until the server closes."""
    assert server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request)
    await writer.drain()
    if eof:
        writer.write_eof()
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    return answer


async def test_truncated_body_never_yields_500(serve: Serve) -> None:
    server = await serve()
    request = (
        b"POST / HTTP/1.1\r\nHost: x\r\nhooktype: NOTIFICATION\r\n"
        b'Content-Length: 500\r\n\r\n{"metadata": {'
    )
    answer = await _raw_exchange(server, request)
    assert not answer.startswith(b"HTTP/1.1 5")


async def test_malformed_http_is_400(serve: Serve) -> None:
    server = await serve()
    request = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"
    answer = await _raw_exchange(server, request, eof=False)
    assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")


async def test_overload_answers_503_with_retry_after(serve: Serve, keys: KeyPair) -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(view: PreInterception, ctx: Context) -> None:
        entered.set()
        await release.wait()

    server = await serve(Router().pre(slow, entity="patient"), max_in_flight=1)
    body = orjson.dumps(interceptor_body("INTERCEPTOR_PRE"))
    headers = headers_for("INTERCEPTOR_PRE", interceptor_token(keys))
    async with ClientSession() as http:
        first = asyncio.create_task(http.post(server.make_url("/"), data=body, headers=headers))
        await entered.wait()
        async with http.post(server.make_url("/"), data=body, headers=headers) as response:
            assert response.status == 503
            assert response.headers["retry-after"] == "1"
            assert (await response.json())["code"] == "OVERLOADED"
        release.set()
        async with await first as response:
            assert response.status == 200


async def test_health_and_readiness(serve: Serve) -> None:
    async def not_ready() -> None:
        raise LoginError("login failed: 503")

    healthy = await serve()
    failing = await serve(ready=not_ready)
    async with ClientSession() as http:
        async with http.get(healthy.make_url("/healthz")) as response:
            assert response.status == 200
        async with http.get(healthy.make_url("/readyz")) as response:
            assert response.status == 200
        async with http.get(failing.make_url("/healthz")) as response:
            assert response.status == 200
        async with http.get(failing.make_url("/readyz")) as response:
            assert response.status == 503
            assert (await response.json())["code"] == "LOGIN_FAILED"


async def _read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One response: its head and its body (by Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head, await reader.readexactly(length)


SLOW_BODY = (
    b"POST /plugin/hooks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b'Content-Length: 200\r\n\r\n{"patients": '
)


async def test_slow_bodies_hold_no_slot_and_get_408(serve: Serve) -> None:
    """More slow-body connections than slots: genuine events still answer 2xx while the slow
    ones stall; each slow one then gets 408 in BioT's shape and its connection is closed."""
    body_timeout = 1.5
    server = await serve(max_in_flight=4, body_timeout=body_timeout)
    assert server.port is not None
    streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    answers: list[asyncio.Task[tuple[bytes, bytes]]] = []
    try:
        async with asyncio.timeout(15), ClientSession() as http:
            for round_ in range(3):
                for _ in range(4):  # 12 slow connections in all, three times the slots
                    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                    streams.append((reader, writer))
                    writer.write(SLOW_BODY)
                    await writer.drain()
                    answers.append(asyncio.create_task(_read_response(reader)))
                for _ in range(3):  # genuine events interleaved with the stalled ones
                    async with http.post(server.make_url("/plugin/hooks"), data=b"{}") as resp:
                        assert resp.status == 200, round_
                        assert (await resp.json())["patients"] == 3
            assert not any(answer.done() for answer in answers), "a slow body was answered early"
            async with http.get(server.make_url("/healthz")) as resp:
                assert (await resp.json())["inFlight"] == 0
            for answer in answers:
                head, payload = await answer
                assert head.startswith(b"HTTP/1.1 408 "), head
                assert b"\r\nconnection: close" in head.lower()
                error = orjson.loads(payload)
                assert error["code"] == "REQUEST_TIMEOUT"
                assert set(error) == {
                    "code",
                    "message",
                    "serviceName",
                    "traceId",
                    "environment",
                    "details",
                }
    finally:
        for answer in answers:
            answer.cancel()
        for _, writer in streams:
            writer.close()
        await asyncio.gather(*answers, return_exceptions=True)


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(b"", id="silent"),
        pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nhooktype: NOTI", id="slowloris-headers"),
        pytest.param(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", id="idle-after-a-request"),
    ],
)
async def test_idle_connection_is_closed_after_keepalive_timeout(serve: Serve, sent: bytes) -> None:
    server = await serve(keepalive_timeout=0.5)
    assert server.port is not None
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        opened = loop.time()
        writer.write(sent)
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read()  # returns once the server closes the connection
        assert loop.time() - opened >= 0.4
        if sent.endswith(b"\r\n\r\n"):
            assert answer.startswith(b"HTTP/1.1 200 ")
        else:
            assert answer == b""
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@pytest.mark.parametrize(
    ("header", "code"),
    [
        pytest.param(b"authorization: Bearer \xff\xfe.\xc3(.x", "JWT_ERROR", id="bearer-bad-utf8"),
        pytest.param(b"authorization: Bearer ab\x01cd.ef.gh", "JWT_ERROR", id="bearer-control"),
        pytest.param(b"authorization: Bearer \xc3\xa9t\xc3\xa9.a.b", "JWT_ERROR", id="bearer-utf8"),
        pytest.param(b"hooktype: INTERCEPTOR_\xff\xfePRE", None, id="hooktype-bad-utf8"),
        pytest.param(b"hooktype: NOTIF\x01ICATION", None, id="hooktype-control"),
    ],
)
async def test_bad_bytes_in_headers_answer_4xx_in_biot_shape(
    serve: Serve, header: bytes, code: str | None
) -> None:
    server = await serve()
    body = b'{"metadata": {}}'
    request = (
        b"POST / HTTP/1.1\r\nHost: x\r\nhooktype: INTERCEPTOR_PRE\r\n" + header + b"\r\n"
        if header.startswith(b"authorization")
        else b"POST / HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n"
    )
    request += b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
    async with asyncio.timeout(10):
        answer = await _raw_exchange(server, request, eof=False)
    head, _, payload = answer.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b"\x01" in header:  # aiohttp's parser refuses control characters: its plain 400
        assert status.endswith(b" 400 Bad Request"), head
        return
    if code is None:  # an unknown hook type is handled as NONSPECIFIC
        assert not status.startswith(b"HTTP/1.1 5"), head
        return
    assert status.startswith(b"HTTP/1.1 400 "), head
    error = orjson.loads(payload)
    assert error["code"] == code
    assert set(error) == {"code", "message", "serviceName", "traceId", "environment", "details"}
