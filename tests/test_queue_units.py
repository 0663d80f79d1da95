"""The queue adapters' pure parts and failure paths: URLs and their parameters, the retry policy,
replies, sample envelopes, ``run --source`` and ``publish`` refusing bad input or an unreachable
broker (without leaking the password)."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from config.settings import SettingsError, load_settings
from tests.queue_helpers import REDIS, FakeLog, queue_settings, require_broker
from worker.adapters.envelope import (
    ATTEMPT_HEADER,
    HOOKS,
    Decision,
    Delivery,
    RetryPolicy,
    Verdict,
    decode_reply,
    encode_reply,
    parse_envelope,
)
from worker.adapters.memory import MemorySource
from worker.adapters.rabbitmq import RabbitOptions, RabbitSource
from worker.adapters.redis_streams import Entry, RedisOptions, delivery_of, netstrings
from worker.adapters.source import (
    open_source,
    pump,
    redact_url,
    retry_policy,
    split_url,
)
from worker.errors import EventError, PayloadTooLarge
from worker.events import HookType
from worker.responses import Response
from worker.routing import Router
from worker.runner import run_queue
from worker.testing.events import sample_envelope
from worker.testing.publish import add_publish_arguments, publish_main, read_envelopes


def test_retry_delays_double_up_to_the_cap() -> None:
    policy = RetryPolicy(max_attempts=6, delay=0.5, max_delay=3.0)
    assert [policy.delay_for(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="retry_delay <= retry_max_delay"):
        RetryPolicy(delay=5.0, max_delay=1.0)


def test_urls_keep_client_parameters_and_hide_passwords() -> None:
    url = "redis://:s3cret@127.0.0.1:6379/2?stream=s&socket_timeout=5&max_attempts=3"
    base, ours = split_url(url, ("stream", "max_attempts"))
    assert base == "redis://:s3cret@127.0.0.1:6379/2?socket_timeout=5"
    assert ours == {"stream": "s", "max_attempts": "3"}
    assert redact_url(url) == url.replace("s3cret", "***")
    assert redact_url("amqp://guest:guest@h/") == "amqp://guest:***@h/"
    assert redact_url("redis://127.0.0.1/0") == "redis://127.0.0.1/0"
    assert retry_policy({"retry_delay": "2"}) == RetryPolicy(5, 2.0, 60.0)
    with pytest.raises(ValueError, match="bad retry parameter"):
        retry_policy({"max_attempts": "many"})


def test_broker_options_and_their_defaults() -> None:
    redis, _ = RedisOptions.parse("redis://127.0.0.1:6379/0")
    assert (redis.stream, redis.group, redis.dead_letter, redis.claim_idle) == (
        "biot-events", "biot-worker", "biot-events:dead", 60.0
    )  # fmt: skip
    assert redis.consumer.endswith(f"-{os.getpid()}")
    with pytest.raises(ValueError, match="claim_idle must be greater than 0"):
        RedisOptions.parse("redis://127.0.0.1/0?claim_idle=0")
    rabbit, _ = RabbitOptions.parse("amqp://u:p@h/vh?queue=q&heartbeat=30")
    assert (rabbit.url, rabbit.queue, rabbit.exchange) == (
        "amqp://u:p@h/vh?heartbeat=30",
        "q",
        "q.dlx",
    )
    source = RabbitSource("amqp://h/?retry_delay=1&retry_max_delay=3", settings=queue_settings(),
                          log=FakeLog())  # fmt: skip
    assert source.retry_delays_ms == [1000, 2000, 3000]


def test_open_source_by_scheme() -> None:
    settings, log = queue_settings(), FakeLog()
    memory = open_source("memory://?capacity=7&max_attempts=2", settings, log)
    assert isinstance(memory, MemorySource)
    assert (memory.capacity, memory.policy.max_attempts) == (7, 2)
    with pytest.raises(ValueError, match="unknown queue URL scheme 'kafka'"):
        open_source("kafka://h/", settings, log)


def test_redis_entry_fields_round_trip() -> None:
    entry = Entry(b"1-1", {b"envelope": b"{}", b"reply_to": b"r", b"attempt": b"x"})
    assert delivery_of(entry, 2) == Delivery(b"{}", 3, "r", None)  # a bad attempt counts as 1
    assert netstrings({b"a": b"x:y"}, more=b"") == b"1:a3:x:y4:more0:"


def test_envelopes_are_checked_before_dispatch() -> None:
    event = parse_envelope(Delivery(b'{"headers": {"HookType": "NOTIFICATION"}}', 3),
                           received_at=0.0, max_body_bytes=100)  # fmt: skip
    assert event.hook is HookType.NOTIFICATION
    assert event.headers[ATTEMPT_HEADER] == "3"
    with pytest.raises(EventError, match="not an envelope"):
        parse_envelope(Delivery(b"[1]"), received_at=0.0, max_body_bytes=100)
    with pytest.raises(PayloadTooLarge):
        parse_envelope(Delivery(b" " * 65_737), received_at=0.0, max_body_bytes=100)


def test_replies_are_function_url_responses() -> None:
    reply = encode_reply(Response(201, b'{"a":1}', {"traceparent": "t"}))
    assert decode_reply(reply) == {"statusCode": 201, "headers": {"traceparent": "t"},
                                   "body": '{"a":1}'}  # fmt: skip
    for bad in (b"nope", b'{"statusCode": "200"}'):
        with pytest.raises(ValueError, match="reply"):
            decode_reply(bad)


@pytest.mark.parametrize("hook", HOOKS)
def test_sample_envelopes_are_valid_events_of_their_hook(hook: str) -> None:
    raw = orjson.dumps(sample_envelope(hook, "tok"))
    event = parse_envelope(Delivery(raw), received_at=0.0, max_body_bytes=1_000_000)
    assert event.hook.value == hook
    body = orjson.loads(event.body)
    if hook == "NOTIFICATION":
        assert body["jwt"] == "tok"
    elif hook != "NONSPECIFIC":
        assert event.headers["authorization"] == "Bearer tok"
    unsigned = sample_envelope(hook)
    assert "authorization" not in unsigned["headers"] and "jwt" not in unsigned["body"]


async def test_run_queue_refuses_memory_and_unknown_schemes() -> None:
    for url, problem in (("memory://", "in-process only"), ("kafka://h", "unknown queue URL")):
        with pytest.raises(SettingsError, match=problem):
            await run_queue(queue_settings(), Router(), url, stop=asyncio.Event())


async def test_run_queue_exits_when_the_broker_is_unreachable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for url in ("redis://:pw-not-logged@127.0.0.1:1/0", "amqp://guest:pw-not-logged@127.0.0.1:1/"):
        with pytest.raises(SystemExit) as exited:
            await run_queue(queue_settings(), Router(), url, stop=asyncio.Event())
        assert exited.value.code == 1
    out = capsys.readouterr().out
    assert out.count('"message":"cannot open the queue"') == 2
    assert "pw-not-logged" not in out


async def test_run_queue_without_base_url_uses_the_embedded_emulator(
    capsys: pytest.CaptureFixture[str],
) -> None:
    require_broker("Redis", REDIS)
    stop = asyncio.Event()
    stop.set()  # open everything, then stop at once
    url = f"redis://{REDIS[0]}:{REDIS[1]}/0?stream=test-embedded-{id(stop)}&claim_idle=60"
    await run_queue(load_settings({}), Router(), url, stop=stop)
    records = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    [consuming] = [r for r in records if r["message"] == "worker consuming"]
    assert str(consuming["emulator_url"]).startswith("http://127.0.0.1:")
    assert records[-1]["message"] == "worker stopped; closing resources"
    client = aioredis.Redis(host=REDIS[0], port=REDIS[1])
    await client.delete(url.split("stream=")[1].split("&")[0])
    await client.aclose()


def publish_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_publish_arguments(parser)
    return parser.parse_args(argv)


async def test_publish_refuses_bad_input_and_reports_an_unreachable_broker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"headers": {}}\n\n[1]\n')
    assert await publish_main(publish_args("--source", "memory://")) == 2
    assert await publish_main(publish_args("--source", "redis://h", "--count", "0")) == 2
    assert await publish_main(publish_args("--source", "redis://h", "--file", str(bad))) == 2
    unreachable = publish_args("--source", "redis://:pw-hidden@127.0.0.1:1/0")
    assert await publish_main(unreachable) == 1
    err = capsys.readouterr().err
    assert "publish needs a broker URL" in err
    assert "--count must be 1 or more" in err
    assert f"{bad}:3: not a JSON object" in err
    assert "cannot reach the queue" in err and "pw-hidden" not in err


def test_read_envelopes_skips_blank_lines_and_names_bad_ones(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_bytes(b'{"headers": {}, "body": "a"}\n\n{"headers": {"x": "1"}}\n')
    assert read_envelopes(good) == [b'{"headers": {}, "body": "a"}', b'{"headers": {"x": "1"}}']
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(b"{\n")
    with pytest.raises(ValueError, match=r"broken.jsonl:1: not JSON"):
        read_envelopes(broken)


class FlakyInbox:
    """An inbox whose broker fails once on receive and once on settle."""

    def __init__(self, messages: list[bytes]) -> None:
        self.messages = messages
        self.receive_failures = 1
        self.settle_failures = 1
        self.settled: list[tuple[bytes, Verdict]] = []
        self.halted = False

    async def receive(self, limit: int) -> list[tuple[int, Delivery]]:
        if self.receive_failures:
            self.receive_failures -= 1
            raise ConnectionError("broker went away")
        batch, self.messages = self.messages[:limit], self.messages[limit:]
        return [(n, Delivery(body)) for n, body in enumerate(batch)]

    async def settle(self, message: int, delivery: Delivery, decision: Decision) -> None:
        if self.settle_failures:
            self.settle_failures -= 1
            raise ConnectionError("broker went away")
        self.settled.append((delivery.body, decision.verdict))

    async def halt(self) -> None:
        self.halted = True


async def test_pump_survives_broker_errors_and_dead_letters_a_crashing_process() -> None:
    inbox, log, stop = FlakyInbox([b"a", b"b", b"c"]), FakeLog(), asyncio.Event()

    async def process(delivery: Delivery) -> Decision:
        if delivery.body == b"c":  # the last one
            stop.set()
            raise RuntimeError("a bug")
        return Decision(Verdict.ACK)

    async with asyncio.timeout(10):
        await pump(inbox, process, stop=stop, max_in_flight=1, grace=1.0, log=log)
    assert log.find("receiving from the queue failed") == [
        {"error": "ConnectionError('broker went away')"}
    ]
    [failed] = log.find("settling a queue message failed; the broker will deliver it again")
    assert failed["verdict"] == "ack"
    assert inbox.settled == [(b"b", Verdict.ACK), (b"c", Verdict.DEAD)]
    assert log.find("processing a queue message failed") == [{}]
    assert inbox.halted


def test_a_missing_broker_skips_outside_ci_and_fails_under_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"Nothing is not reachable at 127\.0\.0\.1:1"):
        require_broker("Nothing", ("127.0.0.1", 1))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the queue tests"):
        require_broker("Nothing", ("127.0.0.1", 1))
