"""Scenario (e)'s load side: the RESP parser, the envelope template, and the Redis channel against
the real Redis (publish, a tiny in-test consumer replies, the channel returns the reply). Tests
that need Redis skip when it is down, and fail under ``CI=true``. No timing is asserted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from tests.queue_helpers import REDIS, require_broker
from worker.adapters.queue import Delivery, encode_reply, parse_envelope
from worker.bench.httpload import RequestSource, ResponseError
from worker.bench.load import LoadSpec, closed_loop
from worker.bench.queue_hook import QueueRun, QueueUnavailable
from worker.bench.redisload import (
    RedisAddress,
    RespError,
    command,
    envelope_template,
    parse_value,
    reply_of,
)
from worker.responses import Response
from worker.tracing import parse_traceparent

REDIS_URL = f"redis://{REDIS[0]}:{REDIS[1]}/0"

# ---------------------------------------------------------------- without Redis


def test_command_is_a_resp_array_of_bulk_strings() -> None:
    assert command(b"XADD", b"s", b"*") == b"*3\r\n$4\r\nXADD\r\n$1\r\ns\r\n$1\r\n*\r\n"


def test_parse_value_reads_every_resp2_type_and_waits_for_partial_ones() -> None:
    raw = b"*3\r\n$2\r\nid\r\n*2\r\n:7\r\n$-1\r\n+OK\r\n-ERR nope\r\n"
    parsed = parse_value(raw)
    assert parsed is not None
    value, used = parsed
    assert value == [b"id", [7, None], b"OK"]
    error = parse_value(raw, used)
    assert error is not None and isinstance(error[0], RespError) and error[0] == "ERR nope"
    assert error[1] == len(raw)
    for cut in (1, 5, 12, 20, used - 1):
        assert parse_value(raw[:cut]) is None  # partial: wait for more bytes


def test_parse_value_refuses_what_is_not_resp() -> None:
    with pytest.raises(ResponseError):
        parse_value(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(ResponseError):
        parse_value(b"$x\r\n")


def test_envelope_template_gives_each_message_a_fresh_trace_and_the_event_body() -> None:
    body = orjson.dumps({"request": {"body": {"_name": {"firstName": 'A "quoted" name'}}}})
    source = RequestSource([envelope_template({"hooktype": "INTERCEPTOR_PRE"}, body)])
    first, second = source.next(), source.next()
    envelopes = [orjson.loads(raw) for raw in (first, second)]
    assert envelopes[0]["body"] == body.decode()
    assert envelopes[0]["headers"]["hooktype"] == "INTERCEPTOR_PRE"
    traces = [parse_traceparent(e["headers"]["traceparent"]) for e in envelopes]
    assert traces[0] is not None and traces[1] is not None
    assert traces[0].trace_id != traces[1].trace_id
    event = parse_envelope(Delivery(first), received_at=0.0, max_body_bytes=1 << 20)
    assert event.body == body  # the worker reads back exactly the event


def test_reply_of_decodes_the_function_url_response() -> None:
    raw = encode_reply(Response(200, b'{"request": {}}', {"content-type": "application/json"}))
    reply = reply_of(raw)
    assert (reply.status, reply.body, reply.close) == (200, b'{"request": {}}', False)
    with pytest.raises(ResponseError):
        reply_of(b"not json")


def test_redis_address_and_its_connection_setup() -> None:
    plain = RedisAddress.parse("redis://127.0.0.1:6380")
    assert (plain.host, plain.port, plain.db, plain.password, plain.setup()) == (
        "127.0.0.1", 6380, 0, None, [],
    )  # fmt: skip
    secured = RedisAddress.parse("redis://:p%40ss@localhost/2")
    assert secured.setup() == [command(b"AUTH", b"p@ss"), command(b"SELECT", b"2")]
    with pytest.raises(ValueError, match="redis://"):
        RedisAddress.parse("rediss://127.0.0.1")


async def test_an_unreachable_redis_is_a_reason_not_a_crash() -> None:
    with pytest.raises(QueueUnavailable, match=r"not reachable at redis://127\.0\.0\.1:1/0"):
        await QueueRun.open("redis://127.0.0.1:1/0")
    with pytest.raises(QueueUnavailable, match="redis://"):
        await QueueRun.open("amqp://127.0.0.1/")


# ---------------------------------------------------------------- against the real Redis

Answer = Callable[[dict[bytes, bytes]], Awaitable[dict[bytes, bytes] | None]]


@pytest.fixture
async def run() -> AsyncIterator[QueueRun]:
    require_broker("Redis", REDIS)
    queue = await QueueRun.open(REDIS_URL)
    yield queue
    await queue.cleanup()


async def consume(client: aioredis.Redis, stream: str, answer: Answer, stop: asyncio.Event) -> None:
    """A tiny consumer: each entry's ``answer`` fields go to its ``reply_to`` stream; it stops
    between reads (a redis-py command cancelled midway leaks its socket)."""
    last = b"0-0"
    while not stop.is_set():
        reply: Any = await client.xread({stream: last}, count=10, block=100)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                last = entry_id
                out = await answer(fields)
                if out is not None:
                    await client.xadd(fields[b"reply_to"].decode(), out)  # type: ignore[arg-type]


async def echo_name(fields: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """Answer 200 with the envelope's body, 503 for a body saying so."""
    body = orjson.loads(fields[b"envelope"])["body"]
    status = 503 if body == "fail" else 200
    response = encode_reply(Response(status, body.encode()))
    return {b"response": response, b"correlation_id": fields[b"correlation_id"]}


@pytest.fixture
async def consumer(run: QueueRun) -> AsyncIterator[aioredis.Redis]:
    client, stop = aioredis.Redis(host=REDIS[0], port=REDIS[1]), asyncio.Event()
    task = asyncio.create_task(consume(client, run.stream, echo_name, stop))
    yield client
    stop.set()
    await task
    await client.aclose()


def envelope(body: str) -> bytes:
    return orjson.dumps({"headers": {"hooktype": "INTERCEPTOR_PRE"}, "body": body})


async def test_a_channel_publishes_and_returns_the_reply(
    run: QueueRun, consumer: aioredis.Redis
) -> None:
    pool = run.pool()
    [channel] = await pool.take(1)
    try:
        async with asyncio.timeout(10):
            first = await channel.send(envelope('{"n": 1}'))
            second = await channel.send(envelope('{"n": 2}'))
            failed = await channel.send(envelope("fail"))
    finally:
        pool.give([channel])
        pool.close()
    assert (first.status, first.body) == (200, b'{"n": 1}')
    assert (second.status, second.body) == (200, b'{"n": 2}')
    assert failed.status == 503
    entries: Any = await consumer.xrange(f"{run.stream}:reply:1")
    assert [fields[b"correlation_id"] for _, fields in entries] == [b"1", b"2", b"3"]


async def test_a_reply_for_another_event_is_an_error_and_closes_the_channel(
    run: QueueRun,
) -> None:
    client, stop = aioredis.Redis(host=REDIS[0], port=REDIS[1]), asyncio.Event()

    async def wrong(fields: dict[bytes, bytes]) -> dict[bytes, bytes]:
        return {b"response": encode_reply(Response(200, b"{}")), b"correlation_id": b"other"}

    task = asyncio.create_task(consume(client, run.stream, wrong, stop))
    pool = run.pool()
    channel = await pool.open()
    try:
        async with asyncio.timeout(10):
            with pytest.raises(ResponseError, match="another correlation id"):
                await channel.send(envelope("{}"))
    finally:
        stop.set()
        await task
        await client.aclose()
    assert channel.closed
    pool.give([channel])
    [fresh] = await pool.take(1)  # a closed channel is never handed out again
    fresh.close()
    assert fresh is not channel


async def test_the_closed_loop_drives_redis_channels_and_counts_every_answer(
    run: QueueRun, consumer: aioredis.Redis
) -> None:
    source = RequestSource([envelope_template({"hooktype": "INTERCEPTOR_PRE"}, b'{"k": 1}')])
    spec = LoadSpec(concurrency=4, warmup_requests=8, max_requests=40, max_seconds=10.0)

    def check(reply: Any, inspect: bool) -> str | None:
        return None if reply.status == 200 and reply.body == b'{"k": 1}' else "wrong"

    pool = run.pool()
    result = await closed_loop(pool, source, spec, {}, check)
    pool.close()
    assert len(result.latencies_us) == 40  # every event started in the window, none lost
    assert (sum(result.errors.values()), result.incomplete) == (0, 0)
    assert 0 < result.completed <= 40


async def test_cleanup_deletes_the_stream_and_everything_named_after_it() -> None:
    require_broker("Redis", REDIS)
    queue = await QueueRun.open(REDIS_URL)
    assert queue.redis_pid is None or queue.redis_pid > 0
    assert f"stream={queue.stream}" in queue.worker_url()
    client = aioredis.Redis(host=REDIS[0], port=REDIS[1])
    try:
        names = [queue.stream, f"{queue.stream}:dead", f"{queue.stream}:reply:1"]
        for name in names:
            await client.xadd(name, {b"k": b"v"})
        await client.zadd(f"{queue.stream}:retry", {b"m": 1.0})
        assert await queue.cleanup() == 4
        assert await client.exists(*names, f"{queue.stream}:retry") == 0
    finally:
        await client.aclose()
