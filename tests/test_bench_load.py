"""The load generator: response parsing, request templates, closed and open loops (counts only;
no timing is asserted anywhere)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from worker.bench.httpload import (
    RequestSource,
    ResponseError,
    connect,
    parse_response,
    request_template,
)
from worker.bench.load import LoadSpec, Pool, closed_loop
from worker.bench.openloop import open_loop
from worker.tracing import parse_traceparent


def test_parse_response_waits_for_the_whole_body() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: x\r\nContent-Length: 5\r\n\r\nhello" + b"HTTP/1.1"
    assert parse_response(raw[:20]) is None
    assert parse_response(raw[:58]) is None  # head complete, body partial
    parsed = parse_response(raw)
    assert parsed is not None
    reply, used = parsed
    assert (reply.status, reply.body, reply.close) == (200, b"hello", False)
    assert raw[used:] == b"HTTP/1.1"


def test_parse_response_headers_are_case_insensitive_and_close_is_seen() -> None:
    raw = b"HTTP/1.0 503 Busy\r\ncontent-length: 0\r\nCONNECTION: close\r\n\r\n"
    parsed = parse_response(raw)
    assert parsed is not None
    assert (parsed[0].status, parsed[0].body, parsed[0].close) == (503, b"", True)


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n",
    ],
)
def test_parse_response_refuses_what_it_cannot_measure(raw: bytes) -> None:
    with pytest.raises(ResponseError):
        parse_response(raw)


def test_request_source_gives_each_request_a_valid_fresh_trace() -> None:
    template = request_template("127.0.0.1", 8080, "/a", {"hooktype": "X"}, b'{"k": 1}')
    source = RequestSource([template])
    first, second = source.next(), source.next()
    head, body = first.split(b"\r\n\r\n")
    assert body == b'{"k": 1}'
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /a HTTP/1.1"
    assert "Content-Length: 8" in lines and "hooktype: X" in lines
    traces = [
        parse_traceparent(r.split(b"traceparent: ")[1].split(b"\r\n")[0].decode())
        for r in (first, second)
    ]
    assert traces[0] is not None and traces[1] is not None
    assert traces[0].trace_id != traces[1].trace_id


# ---------------------------------------------------------------- the drivers


@pytest.fixture
async def echo_server() -> AsyncIterator[tuple[int, list[int]]]:
    """Answers 200 with the body; the 3rd request of all gets 500 (counted as an error)."""
    seen: list[int] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(1)
        body = await request.read()
        return web.Response(status=500 if len(seen) == 3 else 200, body=body)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield port, seen
    await runner.cleanup()


def _source(port: int) -> RequestSource:
    return RequestSource([request_template("127.0.0.1", port, "/x", {}, b"{}")])


def _check(reply: object, inspect: bool) -> str | None:
    return None if getattr(reply, "status", 0) == 200 else f"status {getattr(reply, 'status', 0)}"


async def test_closed_loop_counts_what_it_measured(echo_server: tuple[int, list[int]]) -> None:
    port, seen = echo_server
    pool = Pool("127.0.0.1", port)
    spec = LoadSpec(concurrency=4, warmup_requests=5, max_requests=40, max_seconds=30)
    result = await closed_loop(pool, _source(port), spec, {"server": os.getpid()}, _check)
    assert len(result.latencies_us) == 40  # every event started in the window, none lost
    assert result.errors == {}  # the 500 was the 3rd request: still warming up
    assert result.incomplete == 0
    assert 0 < result.completed <= 40
    assert set(result.cpu_s) == {"server", "loadgen"}
    assert len(seen) >= 45
    assert result.answered == len(seen)  # warm-up and drain too: what the server served
    again = await pool.take(4)  # the connections are kept for the next point
    assert all(not c.closed for c in again)
    pool.give(again)
    pool.close()


async def test_closed_loop_reports_error_statuses(echo_server: tuple[int, list[int]]) -> None:
    port, _ = echo_server
    pool = Pool("127.0.0.1", port)
    spec = LoadSpec(concurrency=1, warmup_requests=1, max_requests=10, max_seconds=30)
    result = await closed_loop(pool, _source(port), spec, {}, _check)
    assert result.errors == {"status 500": 1}
    assert len(result.latencies_us) == 9
    assert result.answered == 11  # an error status is an answer too
    pool.close()


async def test_open_loop_sends_on_schedule(echo_server: tuple[int, list[int]]) -> None:
    port, _ = echo_server
    pool = Pool("127.0.0.1", port)
    spec = LoadSpec(
        concurrency=4, rate=400.0, warmup_seconds=0.05, max_seconds=0.25, max_requests=50
    )
    result = await open_loop(pool, _source(port), spec, {}, _check)
    measured = len(result.latencies_us) + sum(result.errors.values())
    assert 0 < measured <= 50
    assert len(result.lag_us) == measured
    assert result.incomplete == 0
    pool.close()


async def test_connection_reports_a_closed_peer() -> None:
    async def close_at_once(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    app = web.Application()
    app.router.add_post("/{tail:.*}", close_at_once)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    connection = await connect("127.0.0.1", runner.addresses[0][1])
    with pytest.raises(ResponseError, match="connection lost"):
        await connection.send(_source(0).next())
    assert connection.closed
    await runner.cleanup()
