"""The HTTP adapter over real loopback HTTP, served by the runner ``biot-worker run`` uses
(:func:`worker.adapters.http.app_runner`): contract, limits, load shedding, health, timeouts,
the connection cap, malformed HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import orjson
import pytest
from aiohttp import ClientSession, web
from yarl import URL

from tests.conftest import TRACE_ID, KeyPair, headers_for, interceptor_body
from tests.fixture_plugin import PRE_MARK
from tests.queue_helpers import eventually
from tests.test_dispatch import interceptor_token, make_dispatcher
from worker.adapters.health import CheckResult, Health
from worker.adapters.http import HttpAdapter, app_runner
from worker.errors import LoginError, WorkerError
from worker.events import NonSpecific, PreInterception
from worker.logs import CapturingLog
from worker.routing import Context, Router

ENVELOPE = {"code", "message", "serviceName", "traceId", "environment", "details"}


@dataclass
class Served:
    """A running adapter: where it listens and what it logged."""

    port: int
    log: CapturingLog
    runner: web.BaseRunner

    def make_url(self, path: str) -> URL:
        return URL(f"http://127.0.0.1:{self.port}{path}")


Serve = Callable[..., Awaitable[Served]]


class _Ready:
    """A readiness check that passes, or fails with ``error``."""

    name = "serviceToken"

    def __init__(self, error: WorkerError | None = None) -> None:
        self.error = error

    async def probe(self) -> CheckResult:
        return CheckResult({}, self.error)


@pytest.fixture
async def serve(keys: KeyPair) -> AsyncIterator[Serve]:
    runners: list[web.BaseRunner] = []

    async def start(
        routes: Router | None = None,
        *,
        max_in_flight: int = 16,
        max_body_bytes: int = 64 * 1024,
        ready: _Ready | None = None,
        body_timeout: float = 10.0,
        keepalive_timeout: float = 75.0,
        header_timeout: float = 10.0,
        max_connections: int = 1000,
    ) -> Served:
        dispatcher, log = make_dispatcher(keys, routes)
        adapter = HttpAdapter(
            dispatcher,
            max_in_flight=max_in_flight,
            max_body_bytes=max_body_bytes,
            health=Health([ready or _Ready()], errors=dispatcher.error_context),
            log=log,
            body_timeout=body_timeout,
        )
        runner = app_runner(
            adapter,
            grace=1.0,
            keepalive_timeout=keepalive_timeout,
            header_timeout=header_timeout,
            max_connections=max_connections,
        )
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return Served(runner.addresses[0][1], log, runner)

    yield start
    for runner in runners:
        await runner.cleanup()


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


async def _raw_exchange(server: Served, request: bytes, *, eof: bool = True) -> bytes:
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


def _error_of(answer: bytes) -> tuple[bytes, dict[str, object]]:
    """The status line and the error envelope of a raw answer."""
    head, _, payload = answer.partition(b"\r\n\r\n")
    error = orjson.loads(payload)
    assert set(error) == ENVELOPE
    return head.split(b"\r\n", 1)[0], error


@pytest.mark.parametrize(
    ("request_bytes", "problem"),
    [
        pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
                     "Invalid character in Content-Length", id="content-length"),
        pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nx-odd: a\x01b\r\n\r\n",
                     "Invalid header value char", id="control-in-value"),
        pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nx-odd: a\x7fb\r\n\r\n",
                     "Invalid header value char", id="del-in-value"),
        pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nx-\xff: b\r\n\r\n",
                     "Invalid header token", id="bad-utf8-name"),
        pytest.param(b"POST /a\x00b HTTP/1.1\r\nHost: x\r\n\r\n",
                     "Invalid char in url path", id="nul-in-path"),
        pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nx-long: " + b"a" * 9000 + b"\r\n\r\n",
                     "a line is longer than 8190 bytes", id="line-too-long"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
                     "Received HTTPS traffic on an HTTP port", id="tls-hello"),
    ],
)  # fmt: skip
async def test_malformed_http_is_400_in_biot_shape_without_the_bytes(
    serve: Serve, request_bytes: bytes, problem: str
) -> None:
    server = await serve()
    status, error = _error_of(await _raw_exchange(server, request_bytes, eof=False))
    assert status.endswith(b" 400 Bad Request")
    assert error["code"] == "BAD_REQUEST"
    assert error["message"] == f"malformed HTTP request: {problem}"
    [line] = server.log.find("malformed HTTP request refused")
    assert line["error"] == error["message"]


async def test_malformed_http_is_logged_once_a_second(serve: Serve) -> None:
    server = await serve()
    request = b"POST / HTTP/1.1\r\nHost: x\r\nx-odd: \x01\r\n\r\n"
    for _ in range(5):
        answer = await _raw_exchange(server, request, eof=False)
        assert answer.startswith(b"HTTP/1.0 400 ")
    assert len(server.log.find("malformed HTTP request refused")) == 1


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
    healthy = await serve()
    failing = await serve(ready=_Ready(LoginError("login failed: 503")))
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
        pytest.param(b"authorization: Bearer ab\x01cd.ef.gh", "BAD_REQUEST", id="bearer-control"),
        pytest.param(b"authorization: Bearer \xc3\xa9t\xc3\xa9.a.b", "JWT_ERROR", id="bearer-utf8"),
        pytest.param(b"hooktype: NOTIFICATION\r\nauthorization: Bearer \xff\xfe.a.b", "BAD_REQUEST",
                     id="notification-bearer-bad-utf8"),  # its token is in the body
        pytest.param(b"hooktype: INTERCEPTOR_\xff\xfePRE", "BAD_REQUEST", id="hooktype-bad-utf8"),
        pytest.param(b"hooktype: NOTIF\x01ICATION", "BAD_REQUEST", id="hooktype-control"),
        pytest.param(b"x-odd: caf\xe9", "BAD_REQUEST", id="other-header-obs-text"),
        pytest.param(b"traceparent: 00-\xff-\x80", "BAD_REQUEST", id="traceparent-bad-utf8"),
        pytest.param(b"x-odd: caf\xc3\xa9", None, id="other-header-utf8"),
    ],
)
async def test_bad_bytes_in_headers_answer_4xx_in_biot_shape(
    serve: Serve, header: bytes, code: str | None
) -> None:
    """Control characters (the parser) and bytes that are not UTF-8 (the adapter) in any header
    answer 400 in the platform's envelope; valid UTF-8 is fine."""
    server = await serve()
    body = b"{}"
    request = (
        b"POST / HTTP/1.1\r\nHost: x\r\nhooktype: INTERCEPTOR_PRE\r\n" + header + b"\r\n"
        if header.startswith(b"authorization")
        else b"POST / HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n"
    )
    request += b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
    async with asyncio.timeout(10):
        answer = await _raw_exchange(server, request, eof=False)
    if code is None:  # NONSPECIFIC, the fixture plugin's handler
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        return
    status, error = _error_of(answer)
    assert status.split(b" ")[1] == b"400", status
    assert error["code"] == code
    if code == "BAD_REQUEST" and b"\x01" not in header:  # the adapter names the header
        name = header.split(b"\r\n")[-1].split(b":")[0].decode()
        assert str(error["message"]).lower() == f"header {name!r} is not valid UTF-8".lower()


async def _open(server: Served) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def _closed_by_server(reader: asyncio.StreamReader, limit: float = 10.0) -> bytes:
    async with asyncio.timeout(limit):
        try:
            return await reader.read()
        except ConnectionError:
            return b""


async def test_headers_not_complete_in_time_close_the_connection(serve: Serve) -> None:
    """Headers trickling in close the connection header_timeout after their first byte, though
    the keep-alive timeout is long; headers split in two pieces that arrive in time are fine,
    and the timer does not close the connection later."""
    server = await serve(keepalive_timeout=30.0, header_timeout=0.5)
    loop = asyncio.get_running_loop()
    slow_reader, slow = await _open(server)
    split_reader, split = await _open(server)
    try:
        slow.write(b"POST / HTTP/1.1\r\nHost: x\r\nhooktype: NOTI")
        split.write(b"POST / HTTP/1.1\r\nHost: x\r\nCont")
        started = loop.time()
        split.write(b"ent-Length: 2\r\n\r\n{}")
        head, _ = await _read_response(split_reader)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert await _closed_by_server(slow_reader) == b""
        assert 0.4 <= loop.time() - started < 5.0
        split.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        head, _ = await _read_response(split_reader)  # still open past the header timeout
        assert head.startswith(b"HTTP/1.1 200 ")
    finally:
        for writer in (slow, split):
            writer.close()
    [line] = server.log.find("connection closed: headers not complete in time")
    assert line["header_timeout"] == 0.5


async def test_the_cap_closes_the_longest_idle_connection(serve: Serve) -> None:
    server = await serve(max_connections=3)
    opened = [await _open(server) for _ in range(3)]
    try:
        opened[0][1].write(b"POST / HTTP/1.1\r\nHost: x\r\nhoo")  # still sending headers
        await opened[0][1].drain()
        async with ClientSession() as http:  # the fourth connection: the first one goes
            async with http.post(server.make_url("/"), data=b"{}") as response:
                assert response.status == 200
            assert await _closed_by_server(opened[0][0]) == b""
            [line] = server.log.find("connection closed: too many open connections")
            assert (line["cap"], line["newcomer"]) == (3, False)
    finally:
        for _, writer in opened:
            writer.close()


async def test_the_cap_spares_a_keep_alive_connection_that_has_served_events(
    serve: Serve,
) -> None:
    """A genuine client's idle keep-alive connection, though idle the longest, outlasts newer
    connections that never sent a whole request (an idle or slowloris flood)."""
    server = await serve(max_connections=3)
    genuine_reader, genuine = await _open(server)
    genuine.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    head, _ = await _read_response(genuine_reader)
    assert head.startswith(b"HTTP/1.1 200 ")
    silent = [await _open(server) for _ in range(2)]  # opened after the genuine one's answer
    try:
        newcomer_reader, newcomer = await _open(server)
        silent.append((newcomer_reader, newcomer))
        assert await _closed_by_server(silent[0][0]) == b""  # the oldest silent one went
        genuine.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        head, _ = await _read_response(genuine_reader)  # still open, still served
        assert head.startswith(b"HTTP/1.1 200 ")
    finally:
        for _, writer in [*silent, (genuine_reader, genuine)]:
            writer.close()


async def test_the_cap_closes_a_newcomer_when_every_connection_has_an_event(
    serve: Serve,
) -> None:
    entered, release = asyncio.Event(), asyncio.Event()
    started: list[None] = []

    async def slow(view: NonSpecific, ctx: Context) -> None:
        started.append(None)
        if len(started) == 2:
            entered.set()
        await release.wait()

    server = await serve(Router().nonspecific(slow), max_connections=2)
    busy = [await _open(server) for _ in range(2)]
    try:
        for _, writer in busy:
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        async with asyncio.timeout(10):
            await entered.wait()
        newcomer, newcomer_writer = await _open(server)
        busy.append((newcomer, newcomer_writer))
        assert await _closed_by_server(newcomer) == b""
        release.set()
        for reader, _ in busy[:2]:
            head, _ = await _read_response(reader)
            assert head.startswith(b"HTTP/1.1 200 ")
        [line] = server.log.find("connection closed: too many open connections")
        assert line["newcomer"] is True
    finally:
        release.set()
        for _, writer in busy:
            writer.close()


async def test_a_client_leaving_during_its_body_is_not_an_error(serve: Serve) -> None:
    server = await serve(body_timeout=10.0)
    assert server.runner.server is not None
    aiohttp_server = server.runner.server
    _, writer = await _open(server)
    writer.write(SLOW_BODY)
    await writer.drain()

    async def reading() -> bool:
        return any(getattr(c, "reading_body", False) for c in aiohttp_server.connections)

    await eventually(reading, "the body to be read")
    writer.close()
    await writer.wait_closed()

    async def gone() -> bool:
        return not aiohttp_server.connections

    await eventually(gone, "the connection to be gone")
    assert not [r for r in server.log.records if r["level"] == "ERROR"]
    assert not server.log.find("request failed")


_LEAKED: contextvars.ContextVar[int] = contextvars.ContextVar("_LEAKED", default=-1)


async def test_a_long_pipelined_burst_is_answered_one_at_a_time_in_order(serve: Serve) -> None:
    """More pipelined requests in one write than the parser hands over at once (it holds the
    rest and reading pauses): each still starts only after the one before it has answered, the
    answers come in request order, and no handler sees a context variable the one before it
    set."""
    count = 80
    running, most, seen = 0, 0, []

    async def handler(view: NonSpecific, ctx: Context) -> dict[str, int]:
        nonlocal running, most
        running += 1
        most = max(most, running)
        seen.append(_LEAKED.get())
        _LEAKED.set(view.body["n"])  # never reset: must not reach the next request
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        running -= 1
        return {"n": view.body["n"]}

    server = await serve(Router().nonspecific(handler))
    reader, writer = await _open(server)
    try:
        burst = b"".join(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            for body in (orjson.dumps({"n": n}) for n in range(count))
        )
        writer.write(burst)
        answered = []
        async with asyncio.timeout(20):
            for _ in range(count):
                head, body = await _read_response(reader)
                assert head.startswith(b"HTTP/1.1 200 ")
                answered.append(orjson.loads(body)["n"])
    finally:
        writer.close()
    assert answered == list(range(count))
    assert most == 1
    assert seen == [-1] * count


async def test_a_shutdown_gives_its_grace_to_an_event_whose_client_left(
    serve: Serve,
) -> None:
    """The client hangs up while its event runs: the runner's cleanup still waits (up to its
    grace, 1 s here) for the event to end instead of forgetting it with its connection."""
    entered, release = asyncio.Event(), asyncio.Event()
    ended: list[str] = []

    async def slow(view: NonSpecific, ctx: Context) -> dict[str, bool]:
        entered.set()
        try:
            await release.wait()
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise
        ended.append("finished")
        return {"done": True}

    server = await serve(Router().nonspecific(slow))
    _, writer = await _open(server)
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    async with asyncio.timeout(10):
        await entered.wait()
    writer.close()
    await writer.wait_closed()
    cleanup = asyncio.create_task(server.runner.cleanup())
    done, _ = await asyncio.wait({cleanup}, timeout=0.3)
    assert not done  # waiting for the event (without it, cleanup returned at once)
    release.set()
    async with asyncio.timeout(10):
        await cleanup
    assert ended == ["finished"]
