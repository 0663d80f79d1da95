"""The queue seam's pure parts and failure paths: URLs and their parameters, the retry policy,
replies, sample envelopes, one trace per message, the pump surviving its broker,
``run --source`` and ``publish`` refusing bad input, a missing extra or an unreachable broker
(without leaking the password)."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import orjson
import pytest

import worker.adapters
from config.settings import SettingsError, load_settings
from tests.queue_helpers import FakeLog, queue_settings, require_broker, serving
from worker.adapters import open_source
from worker.adapters.memory import MemorySource
from worker.adapters.queue import (
    HOOKS,
    Deadlines,
    Decision,
    Delivery,
    RetryPolicy,
    Verdict,
    decode_reply,
    encode_reply,
    parse_envelope,
    published_envelope,
    pump,
    redact_url,
    retry_envelope,
    retry_policy,
    split_url,
)
from worker.adapters.rabbitmq import RabbitOptions, RabbitSource
from worker.adapters.redis_streams import Entry, RedisOptions, delivery_of, netstrings
from worker.cli import build_parser
from worker.client import BiotApi
from worker.dispatch import Dispatcher
from worker.errors import EventError, PayloadTooLarge, TransientApiError
from worker.events import HookType, NonSpecific, decode_payload
from worker.logs import Throttle, describe
from worker.responses import Response
from worker.routing import Context, Router
from worker.runner import run_queue
from worker.testing.dev import run_dev
from worker.testing.events import sample_envelope
from worker.testing.publish import publish_main, read_envelopes
from worker.tracing import new_trace, parse_traceparent


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
    assert redact_url("redis://h/0?password=p%40ss&stream=s") == "redis://h/0?password=***&stream=s"
    hidden = redact_url("https://h/v1?token=abc&api_key=k&Secret=s&stream=s")
    assert hidden == "https://h/v1?token=***&api_key=***&Secret=***&stream=s"
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
    assert event.attempt == 3
    assert dict(event.headers) == {"hooktype": "NOTIFICATION"}  # nothing added
    with pytest.raises(EventError, match="not an envelope"):
        parse_envelope(Delivery(b"[1]"), received_at=0.0, max_body_bytes=100)
    with pytest.raises(PayloadTooLarge):
        parse_envelope(Delivery(b" " * 65_737), received_at=0.0, max_body_bytes=100)
    for blank in (b"", b" \r\n\t\x0b\x0c"):
        with pytest.raises(EventError, match="queue message is empty"):
            parse_envelope(Delivery(blank), received_at=0.0, max_body_bytes=100)
    with pytest.raises(EventError, match="not an envelope"):  # headers must be an object
        parse_envelope(Delivery(b'{"headers": ["a", "b"]}'), received_at=0.0, max_body_bytes=100)
    spaced = parse_envelope(Delivery(b'{"headers": {}, "body": " \\n "}'), received_at=0.0,
                            max_body_bytes=100)  # fmt: skip
    assert decode_payload(spaced) is None  # a body of whitespace is no body
    with pytest.raises(EventError, match="body is not valid JSON"):
        decode_payload(parse_envelope(Delivery(b'{"headers": {}, "body": " x "}'),
                                      received_at=0.0, max_body_bytes=100))  # fmt: skip


UNTRACED = [
    b'{"headers":{"hooktype":"NONSPECIFIC"},"body":{"key":"a"}}',
    # Whitespace kept; a body string and a nested object that mention headers; empty headers.
    b' {\n "body" : "{\\"headers\\": {}}" ,\n "headers" : { } ,"x":[{"headers":{}}]}\n',
    # A key written with an escape, twice: the last one is the envelope's headers.
    b'{"headers":{"a":"1"},"h\\u0065aders":{"b":"2"} ,"body":"\\u00e9"}',
    # Trace headers that name no usable trace: a new one each time, unless one is added.
    b'{"headers":{"TraceParent":"garbage","x-b3-traceid":"zz"},"body":null}',
]


@pytest.mark.parametrize("raw", UNTRACED)
def test_a_retry_adds_the_trace_and_the_dead_letter_takes_it_out(raw: bytes) -> None:
    first = parse_envelope(Delivery(raw), received_at=0.0, max_body_bytes=1000)
    retried = retry_envelope(raw, first.trace, first.headers)
    assert retried is not None
    again = parse_envelope(Delivery(retried, 2), received_at=0.0, max_body_bytes=1000)
    assert again.trace.trace_id == first.trace.trace_id
    assert again.headers["traceparent"] == first.trace.traceparent
    assert {**again.headers, "traceparent": "-"} == {**first.headers, "traceparent": "-"}
    assert again.body == first.body
    # Already carrying it: re-queued as it is, and dead-lettered as published.
    assert retry_envelope(retried, again.trace, again.headers) is None
    assert published_envelope(Delivery(retried, 3)) == raw
    assert published_envelope(Delivery(raw, 3)) is None


def test_a_message_naming_its_trace_is_retried_as_it_is() -> None:
    for headers in ({"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"},
                    {"X-B3-TraceId": "c" * 16}, {"trace-id": "d" * 32}):  # fmt: skip
        raw = orjson.dumps({"headers": headers, "body": {}})
        event = parse_envelope(Delivery(raw), received_at=0.0, max_body_bytes=1000)
        assert retry_envelope(raw, event.trace, event.headers) is None
    # Not what a retry writes (the marker without the added header next to it): left alone.
    forged = b'{"headers":{"traceparent":"x"},"x-biot-added":"traceparent","body":{}}'
    assert published_envelope(Delivery(forged, 2)) is None


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


def publish_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["publish", *argv])


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


class FlakySource:
    """A source whose broker fails once on receive and once on settle."""

    policy = RetryPolicy()

    def __init__(self, messages: list[bytes]) -> None:
        self.messages = messages
        self.receive_failures = 1
        self.settle_failures = 1
        self.settled: list[tuple[bytes, Verdict]] = []
        self.halted = False

    async def __aenter__(self) -> FlakySource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def receive(self, limit: int) -> list[Delivery]:
        if self.receive_failures:
            self.receive_failures -= 1
            raise ConnectionError("broker went away")
        batch, self.messages = self.messages[:limit], self.messages[limit:]
        return [Delivery(body, ref=body.decode()) for body in batch]

    async def settle(self, delivery: Delivery, decision: Decision) -> None:
        if self.settle_failures:
            self.settle_failures -= 1
            raise ConnectionError("broker went away")
        self.settled.append((delivery.body, decision.verdict))

    async def halt(self) -> None:
        self.halted = True


async def test_pump_survives_broker_errors_and_dead_letters_a_crashing_process() -> None:
    inbox, log, stop = FlakySource([b"a", b"b", b"c"]), FakeLog(), asyncio.Event()

    traces = {body: new_trace() for body in (b"a", b"b")}

    async def process(delivery: Delivery) -> Decision:
        if delivery.body == b"c":  # the last one
            stop.set()
            raise RuntimeError("a bug")
        return Decision(Verdict.ACK, trace=traces[delivery.body])

    async with asyncio.timeout(10):
        await pump(inbox, process, stop=stop, max_in_flight=1, grace=1.0, log=log)
    assert log.find("receiving from the queue failed; trying again") == [
        {"error": "ConnectionError: broker went away", "retry_in": 0.1}
    ]
    unsettled = "settling a queue message failed; the broker will deliver it again"
    [failed] = log.find(unsettled)
    assert failed == {"error": "ConnectionError: broker went away", "ref": "a", "verdict": "ack"}
    assert (unsettled, traces[b"a"].trace_id) in log.traced  # under the message's trace
    assert inbox.settled == [(b"b", Verdict.ACK), (b"c", Verdict.DEAD)]
    assert log.find("processing a queue message failed") == [{"ref": "c"}]
    assert inbox.halted


class StuckSource(FlakySource):
    """A broker connection that died silently: every settle waits for ever."""

    async def settle(self, delivery: Delivery, decision: Decision) -> None:
        await asyncio.Event().wait()


async def test_a_settle_stuck_on_a_dead_connection_frees_its_slot_after_broker_timeout() -> (
    None
):
    inbox, log, stop = StuckSource([b"a", b"b", b"c"]), FakeLog(), asyncio.Event()
    inbox.receive_failures = 0
    seen: list[bytes] = []

    async def process(delivery: Delivery) -> Decision:
        seen.append(delivery.body)
        if len(seen) == 3:
            stop.set()
        return Decision(Verdict.ACK)

    async with asyncio.timeout(10):  # one slot: b and c need a's slot back
        await pump(inbox, process, stop=stop, max_in_flight=1, grace=1.0, log=log, op_timeout=0.05)
    assert seen == [b"a", b"b", b"c"]
    failed = log.find("settling a queue message failed; the broker will deliver it again")
    assert [line["ref"] for line in failed] == ["a"]  # b, c: the same error, within a second
    assert failed[0]["error"] == "TimeoutError"


class StuckReceiveSource(FlakySource):
    """A broker connection that died silently while the first receive waited on it."""

    async def receive(self, limit: int) -> list[Delivery]:
        if self.receive_failures:
            self.receive_failures -= 1
            await asyncio.Event().wait()
        return await super().receive(limit)


async def test_a_receive_stuck_on_a_dead_connection_fails_after_broker_timeout() -> None:
    inbox, log, stop = StuckReceiveSource([b"a", b"b"]), FakeLog(), asyncio.Event()
    inbox.settle_failures = 0
    seen: list[bytes] = []

    async def process(delivery: Delivery) -> Decision:
        seen.append(delivery.body)
        if len(seen) == 2:
            stop.set()
        return Decision(Verdict.ACK)

    async with asyncio.timeout(10):
        await pump(inbox, process, stop=stop, max_in_flight=4, grace=1.0, log=log, op_timeout=0.05)
    assert log.find("receiving from the queue failed; trying again") == [
        {"error": "TimeoutError", "retry_in": 0.1}
    ]
    assert seen == [b"a", b"b"]
    assert inbox.settled == [(b"a", Verdict.ACK), (b"b", Verdict.ACK)]


async def test_deadlines_tell_their_own_cancellation_from_any_other() -> None:
    deadlines = Deadlines(0.05)
    assert deadlines.period == 0.0125
    # A limit that is not a whole number of seconds: periods that divide it, of a second at most.
    assert (Deadlines(10.5).period, Deadlines(10.5)._rounds) == (10.5 / 11, 11)
    assert (Deadlines(10.0).period, Deadlines(2.0).period) == (1.0, 0.5)
    outcomes: list[str] = []
    forever = asyncio.Event()

    async def wait(cancelled_by_others: asyncio.Event | None = None) -> None:
        task = deadlines.begin()
        try:
            if cancelled_by_others is not None:
                cancelled_by_others.set()
            await forever.wait()
        except asyncio.CancelledError:
            outcomes.append("timed out" if deadlines.expired(task) else "cancelled")
            if outcomes[-1] == "cancelled":
                raise
        finally:
            deadlines.end(task)

    async with asyncio.timeout(5):
        await wait()  # nobody sets it: the deadline ends it
        me = asyncio.current_task()
        assert me is not None and me.cancelling() == 0  # its cancellation was taken back
        waiting = asyncio.Event()
        other = asyncio.create_task(wait(waiting))
        await waiting.wait()
        other.cancel()  # before its deadline
        with pytest.raises(asyncio.CancelledError):
            await other
        quick = deadlines.begin()  # a wait that ends in time is left alone
        deadlines.end(quick)
    deadlines.close()
    assert outcomes == ["timed out", "cancelled"]


class DeadKeySource(FlakySource):
    """A dead-letter store that refuses every write (a wrong-typed key): acks still work."""

    async def settle(self, delivery: Delivery, decision: Decision) -> None:
        if decision.verdict is Verdict.DEAD:
            raise ConnectionError("WRONGTYPE s:dead holds a string")
        self.settled.append((delivery.body, decision.verdict))


async def test_a_dead_letter_is_logged_once_written_and_a_failed_write_is_not_a_flood() -> None:
    """'event dead-lettered' is written only for a dead letter the source stored; while its
    store refuses writes, the messages stay unsettled and one throttled line says why."""
    inbox, log, stop = DeadKeySource([b"a", b"b", b"c", b"ok"]), FakeLog(), asyncio.Event()
    inbox.receive_failures = 0

    async def process(delivery: Delivery) -> Decision:
        if delivery.body == b"ok":
            stop.set()
            return Decision(Verdict.ACK)
        return Decision(Verdict.DEAD, reason="NO_EVENT: not an envelope")

    async with asyncio.timeout(10):
        await pump(inbox, process, stop=stop, max_in_flight=1, grace=1.0, log=log)
    assert log.find("event dead-lettered") == []
    [failed] = log.find("settling a queue message failed; the broker will deliver it again")
    assert failed["ref"] == "a" and failed["verdict"] == "dead"
    assert inbox.settled == [(b"ok", Verdict.ACK)]
    stored, log, stop = FlakySource([b"x"]), FakeLog(), asyncio.Event()
    stored.receive_failures = stored.settle_failures = 0

    async def dead(delivery: Delivery) -> Decision:
        stop.set()
        return Decision(Verdict.DEAD, reason="NO_EVENT: not an envelope")

    async with asyncio.timeout(10):
        await pump(stored, dead, stop=stop, max_in_flight=1, grace=1.0, log=log)
    assert log.find("event dead-lettered") == [
        {"reason": "NO_EVENT: not an envelope", "attempts": 1, "ref": "x"}
    ]


def test_a_throttle_writes_a_repeating_fault_once_per_interval_with_the_count_held_back() -> None:
    now = [0.0]
    log = FakeLog()
    throttle = Throttle(log, interval=1.0, clock=lambda: now[0])
    written = []
    for step in range(25):  # 2.5 s of a fault every 0.1 s, and another one once
        now[0] = step / 10
        written.append(throttle.warning("receive failed", key="refused", error="refused"))
    assert throttle.warning("receive failed", key="timeout", error="timeout")
    assert log.find("receive failed") == [
        {"error": "refused"},
        {"error": "refused", "suppressed": 9},
        {"error": "refused", "suppressed": 9},
        {"error": "timeout"},
    ]
    assert written.count(True) == 3


def test_describe_keeps_the_message_that_repr_of_some_errors_drops() -> None:
    assert describe(ConnectionError("refused")) == "ConnectionError: refused"
    assert describe(TimeoutError()) == "TimeoutError"
    assert describe(ValueError("x" * 500), limit=20) == "ValueError: xxxxx..."


def test_a_missing_broker_skips_outside_ci_and_fails_under_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"Nothing is not reachable at 127\.0\.0\.1:1"):
        require_broker("Nothing", ("127.0.0.1", 1))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the queue tests"):
        require_broker("Nothing", ("127.0.0.1", 1))


def test_a_missing_queues_extra_is_named_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    for client, module, url in (("redis", "redis_streams", "rediss://h/0"),
                                ("aio_pika", "rabbitmq", "amqp://h/")):  # fmt: skip
        monkeypatch.setitem(sys.modules, client, None)  # as if it were not installed
        monkeypatch.delitem(sys.modules, f"worker.adapters.{module}", raising=False)
        monkeypatch.delattr(worker.adapters, module, raising=False)  # as if never imported
        with pytest.raises(SettingsError) as refused:
            open_source(url, queue_settings(), FakeLog())
        scheme = url.split(":")[0]
        assert refused.value.problems == [
            f"--source: {scheme}:// needs the queues extra: pip install 'biot-worker[queues]'"
        ]


def test_publish_is_importable_and_refuses_clearly_without_the_queues_extra() -> None:
    probe = (
        "import sys\n"
        "for name in ('redis', 'aio_pika', 'aiormq'): sys.modules[name] = None\n"
        "from config.settings import SettingsError\n"
        "from worker.testing.publish import open_publisher\n"
        "for url in ('redis://127.0.0.1/0', 'amqp://h/'):\n"
        "    try:\n"
        "        open_publisher(url)\n"
        "    except SettingsError as exc:\n"
        "        print(exc.problems[0])\n"
    )
    result = subprocess.run(  # noqa: S603 - our own interpreter and probe
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    extra = "needs the queues extra: pip install 'biot-worker[queues]'"
    assert result.stdout.splitlines() == [
        f"--source: redis:// {extra}",
        f"--source: amqp:// {extra}",
    ]


async def test_a_message_without_traceparent_has_one_trace_over_its_deliveries() -> None:
    """Retried, then dead-lettered: every delivery's lines (the dispatcher's, the retry, the dead
    letter) and the reply carry one trace id, the one made up when the event was first built."""

    async def unavailable(event: NonSpecific, ctx: Context) -> dict[str, Any]:
        raise TransientApiError("BioT answered 503", status=503)

    settings, log = queue_settings(), FakeLog()
    dispatcher = Dispatcher(routes=Router().nonspecific(unavailable), api=cast(BiotApi, object()),
                            log=log, settings=settings, verifier=None)  # fmt: skip
    source = MemorySource.from_url("memory://?max_attempts=2&retry_delay=0.01", log=log)
    async with serving(source, dispatcher.handle, settings, log):
        envelope = {"headers": {"hooktype": "NONSPECIFIC"}, "body": {}}
        await source.publish(envelope, reply_to="box", correlation_id="c-1")
        async with asyncio.timeout(10):
            reply = await source.next_reply("box")
    about = ("event failed", "event will be retried", "event dead-lettered")
    lines = [(message, trace) for message, trace in log.traced if message in about]
    trace = lines[0][1]
    assert trace is not None
    assert lines == [
        ("event failed", trace),
        ("event will be retried", trace),
        ("event failed", trace),
        ("event dead-lettered", trace),
    ]
    answered = parse_traceparent(decode_reply(reply.body)["headers"]["traceparent"])
    assert answered is not None and answered.trace_id == trace
    assert {trace for _, trace in log.traced} <= {None, trace}
    [letter] = source.dead_letters
    assert letter.reason == "CALL_TO_API_FAILED: BioT answered 503 (gave up after 2 attempts)"
    assert letter.body == orjson.dumps(envelope)  # as published


async def test_a_bad_message_has_one_trace_for_its_reply_and_its_lines() -> None:
    settings, log = queue_settings(), FakeLog()
    source = MemorySource.from_url("memory://", log=log)

    async def never(event: Any) -> Any:
        raise AssertionError("a bad message reaches no handler")

    async with serving(source, never, settings, log):
        await source.publish(b'{"headers": {"x": "1"}, "body": "x"', reply_to="box")
        async with asyncio.timeout(10):
            reply = await source.next_reply("box")
    [(_, trace)] = [line for line in log.traced if line[0] == "event dead-lettered"]
    answered = parse_traceparent(decode_reply(reply.body)["headers"]["traceparent"])
    assert answered is not None and trace == answered.trace_id


async def test_dev_with_a_source_points_the_queue_worker_at_the_embedded_emulator(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = "redis://127.0.0.1:1/0"  # nothing listens: the start fails after the emulator is up
    with pytest.raises(SystemExit):
        await run_dev(load_settings({}), Router(), source=url, stop=asyncio.Event())
    captured = capsys.readouterr()
    assert '"message":"cannot open the queue"' in captured.out
    assert "BioT emulator at http://127.0.0.1:" in captured.err
