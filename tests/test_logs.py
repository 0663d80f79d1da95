"""worker.logs: BioT's JSON line shape, redaction, both backends on pipes, files and terminals."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO, TextIO

import orjson
import pytest

from config.settings import SettingsError
from worker.logs import (
    REDACTED,
    CapturingLog,
    Log,
    StdlibLog,
    open_log,
    redact,
)
from worker.logs.aio import AioLog
from worker.logs.records import dumps_line
from worker.tracing import TraceContext, current_trace

BACKENDS = ("stdlib", "aiologger")
TRACE = TraceContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
JWT = "eyJhbGciOiJSUzUxMiJ9.eyJzdWIiOiJzdmMtMSJ9.c2lnbmF0dXJlLXNlY3JldA"
CORE = ["@timestamp", "message", "level", "level_value", "appName", "traceId"]
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
FIXED_NOW = 1_795_398_494.125  # 2026-11-23T01:48:14.125Z, exact in binary

Stream = TextIO | BinaryIO


def parse_lines(raw: bytes) -> list[dict[str, Any]]:
    """Every line must be one complete JSON object; the output must end with a newline."""
    assert raw.endswith(b"\n")
    return [orjson.loads(line) for line in raw.split(b"\n")[:-1]]


@contextlib.contextmanager
def bound_trace(trace: TraceContext) -> Any:
    token = current_trace.set(trace)
    try:
        yield trace
    finally:
        current_trace.reset(token)


# --- streams of each kind, and what was written to them ----------------------------------------


def _read_to_eof(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # a pty master reads EIO once every slave fd is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


class Target:
    """A stream of one kind (regular file, pipe, pty) and everything written to it."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self._path = tmp_path / "out.log"
        self._reader: asyncio.Task[bytes] | None = None
        self._read_fd = -1
        self.stream: Stream
        if kind == "file":
            self.stream = self._path.open("wb")
        elif kind == "text-file":
            self.stream = self._path.open("w", encoding="utf-8")
        elif kind == "pipe":
            self._read_fd, write_fd = os.pipe()
            self.stream = open(write_fd, "w", encoding="utf-8")  # noqa: SIM115
        else:  # a terminal
            self._read_fd, write_fd = os.openpty()
            self.stream = open(write_fd, "wb", buffering=0)  # noqa: SIM115
        if self._read_fd >= 0:  # read all along: a burst is bigger than a pipe's buffer
            self._reader = asyncio.create_task(asyncio.to_thread(_read_to_eof, self._read_fd))

    async def output(self) -> bytes:
        """Close our end and return every byte written (a pty's CR LF read back as LF)."""
        self.stream.close()
        if self._reader is None:
            return self._path.read_bytes()
        data = await self._reader
        os.close(self._read_fd)
        return data.replace(b"\r\n", b"\n")


@pytest.fixture
async def target_factory(tmp_path: Path) -> AsyncIterator[Callable[[str], Target]]:
    made: list[Target] = []

    def make(kind: str) -> Target:
        made.append(Target(kind, tmp_path))
        return made[-1]

    yield make
    for target in made:  # a failed test must not leak fds or a reader thread
        if not target.stream.closed:
            await target.output()


# --- the record's shape ------------------------------------------------------------------------


async def write_sample(log: Log) -> None:
    """The same calls for every backend, so their outputs can be compared byte for byte."""
    log.debug("debugging", step=1)
    log.info("event handled", hook="PRE", status=200, duration_ms=1.5)
    with bound_trace(TRACE):
        log.bind(hook="POST").warning("slow", duration_ms=2500)
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("handler failed")
    log.error("plain error", details={"a": [1, 2.5, None, True]}, text="naïve ✓")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["file", "text-file", "pipe", "pty"])
async def test_every_record_is_one_line_of_biot_json(
    backend: str, kind: str, target_factory: Callable[[str], Target]
) -> None:
    target = target_factory(kind)
    async with open_log(backend, app_name="my-plugin", level="DEBUG", stream=target.stream) as log:
        await write_sample(log)
    records = parse_lines(await target.output())

    assert [r["message"] for r in records] == [
        "debugging", "event handled", "slow", "handler failed", "plain error",
    ]  # fmt: skip
    assert [list(r)[:6] for r in records] == [CORE] * 5
    assert [(r["level"], r["level_value"]) for r in records] == [
        ("DEBUG", 10000), ("INFO", 30000), ("WARN", 40000), ("ERROR", 50000), ("ERROR", 50000),
    ]  # fmt: skip
    assert all(TIMESTAMP.match(r["@timestamp"]) and r["appName"] == "my-plugin" for r in records)
    assert [r["traceId"] for r in records] == [None, None, TRACE.trace_id, TRACE.trace_id, None]
    assert records[1] | {"@timestamp": "t"} == {
        "@timestamp": "t", "message": "event handled", "level": "INFO", "level_value": 30000,
        "appName": "my-plugin", "traceId": None, "hook": "PRE", "status": 200, "duration_ms": 1.5,
    }  # fmt: skip
    assert records[2]["hook"] == "POST" and records[2]["duration_ms"] == 2500
    assert records[4]["text"] == "naïve ✓"


async def test_both_backends_write_identical_bytes(target_factory: Callable[[str], Target]) -> None:
    outputs = []
    for backend in (StdlibLog, AioLog):
        target = target_factory("file")
        log = backend(app_name="x", level="DEBUG", stream=target.stream, clock=lambda: FIXED_NOW)
        async with log:
            await write_sample(log)
        outputs.append(await target.output())

    assert outputs[0] == outputs[1]
    assert outputs[0].count(b"\n") == 5
    assert parse_lines(outputs[0])[0]["@timestamp"] == "2026-11-23T01:48:14.125Z"


@pytest.mark.parametrize(
    "now", [FIXED_NOW, 0.0, 1_700_000_000.0, 1_700_000_000.999_999_9, 1_795_398_494.123, 59.0005]
)
def test_timestamp_is_utc_milliseconds_with_z(now: float) -> None:
    log = CapturingLog(clock=lambda: now)
    log.info("tick")
    moment = datetime.fromtimestamp(now, UTC)
    assert log.records[0]["@timestamp"] == moment.isoformat(timespec="milliseconds")[:-6] + "Z"


async def test_trace_id_is_read_when_each_call_is_made() -> None:
    log = CapturingLog()
    other = TraceContext("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")

    both_started = asyncio.Barrier(2)  # each event logs while the other is in flight

    async def handle(trace: TraceContext) -> None:
        with bound_trace(trace):
            log.info("start")
            await both_started.wait()
            log.info("end")

    await asyncio.gather(handle(TRACE), handle(other))
    by_trace = {(r["traceId"], r["message"]) for r in log.records}
    assert by_trace == {(t.trace_id, m) for t in (TRACE, other) for m in ("start", "end")}


def test_fields_cannot_forge_core_fields() -> None:
    log = CapturingLog()
    with bound_trace(TRACE):
        log.bind(level="bound").info("real", traceId="forged", appName="evil")
    record = log.records[0]
    assert record["traceId"] == TRACE.trace_id and record["appName"] == "test"
    assert record["level"] == "INFO" and record["fields.level"] == "bound"
    assert record["fields.traceId"] == "forged" and record["fields.appName"] == "evil"


def test_bind_adds_fields_and_call_fields_win() -> None:
    log = CapturingLog()
    child = log.bind(hook="PRE", entity="patient")
    grandchild = child.bind(entity="device")
    grandchild.info("one", status=200)
    child.info("two", hook="overridden")
    log.info("three")
    assert [{k: v for k, v in r.items() if k not in CORE} for r in log.records] == [
        {"hook": "PRE", "entity": "device", "status": 200},
        {"hook": "overridden", "entity": "patient"},
        {},
    ]
    assert log.find("one", status=200) == [log.records[0]]
    assert log.find("one", status=500) == [] and log.messages == ["one", "two", "three"]


# --- levels and exceptions ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
async def test_records_below_the_level_are_dropped(
    backend: str, target_factory: Callable[[str], Target]
) -> None:
    target = target_factory("file")
    async with open_log(backend, app_name="a", level="warning", stream=target.stream) as log:
        log.debug("d")
        log.info("i")
        log.bind(x=1).info("bound info")
        log.warning("w")
        log.error("e")
        log.exception("x")
    assert [r["message"] for r in parse_lines(await target.output())] == ["w", "e", "x"]


def test_error_level_drops_warnings() -> None:
    log = CapturingLog(level="ERROR")
    log.warning("w")
    log.error("e")
    assert log.messages == ["e"]


@pytest.mark.parametrize("level", ["TRACE", "", "CRITICAL"])
def test_unknown_level_is_refused(level: str) -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        StdlibLog(app_name="a", level=level)
    with pytest.raises(ValueError, match="unknown log level"):
        AioLog(app_name="a", level=level)


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log backend"):
        open_log("loguru", app_name="a")


def test_importing_the_logs_does_not_import_aiologger() -> None:
    code = "import sys, worker.logs; assert 'aiologger' not in sys.modules, 'aiologger imported'"
    done = subprocess.run(  # noqa: S603  # a fresh interpreter: this one imported aiologger
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr


def test_aiologger_not_installed_is_a_settings_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes "import aiologger" fail as if it were not installed; without
    # worker.logs.aio in sys.modules, open_log imports it afresh.
    monkeypatch.setitem(sys.modules, "aiologger", None)
    monkeypatch.delitem(sys.modules, "worker.logs.aio")
    with pytest.raises(SettingsError) as raised:
        open_log("aiologger", app_name="a")
    assert raised.value.problems == [
        "WORKER_LOG_BACKEND: aiologger is not installed (pip install 'biot-worker[aiologger]')"
    ]


def _fail_deep() -> None:
    raise KeyError(f"no such key; token was {JWT}")


def test_exception_carries_type_message_and_traceback() -> None:
    log = CapturingLog()
    try:
        try:
            _fail_deep()
        except KeyError as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError:
        log.exception("handler failed", hook="PRE")
    error = log.records[0]["error"]
    assert log.records[0]["level"] == "ERROR" and log.records[0]["hook"] == "PRE"
    assert error["type"] == "RuntimeError" and error["message"] == "wrapped"
    assert "_fail_deep" in error["traceback"] and "RuntimeError: wrapped" in error["traceback"]
    assert "The above exception was the direct cause" in error["traceback"]
    assert JWT not in error["traceback"] and REDACTED in error["traceback"]


def test_exception_type_names_its_module() -> None:
    log = CapturingLog()
    try:
        raise orjson.JSONDecodeError("bad", "{", 0)
    except ValueError:
        log.exception("parse failed")
    assert log.records[0]["error"]["type"] == "orjson.JSONDecodeError"


def test_exception_outside_an_except_block_logs_an_error() -> None:
    log = CapturingLog()
    log.exception("no exception here")
    assert log.records[0]["level"] == "ERROR" and log.records[0]["error"] is None


# --- redaction ---------------------------------------------------------------------------------


def test_redact_replaces_secret_keys_at_any_depth() -> None:
    value: dict[str, Any] = {
        "Authorization": "Bearer abc",
        "body": {"jwt": JWT, "items": [{"secretKey": "s1"}, ("x", {"ACCESS_TOKEN": "t1"})]},
        "login": {"id": "svc", "secret_key": "s2", "accessToken": "t2", "password": "p"},
        "headers": MappingProxyType({"X-Api-Key": "k", "Cookie": "c", "token": "t3"}),
        "service_user_secret": "s3",
        "token_count": 3,
        "tokens_seen": ["a"],
    }
    assert redact(value) == {
        "Authorization": REDACTED,
        "body": {
            "jwt": REDACTED,
            "items": [{"secretKey": REDACTED}, ("x", {"ACCESS_TOKEN": REDACTED})],
        },
        "login": {
            "id": "svc", "secret_key": REDACTED, "accessToken": REDACTED, "password": REDACTED,
        },
        "headers": {"X-Api-Key": REDACTED, "Cookie": REDACTED, "token": REDACTED},
        "service_user_secret": REDACTED,
        "token_count": 3,
        "tokens_seen": ["a"],
    }  # fmt: skip
    assert value["login"]["password"] == "p"  # the input is untouched


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"token {JWT} expired", "token [REDACTED] expired"),
        (JWT, "[REDACTED]"),
        ("header: Bearer x", "header: Bearer [REDACTED]"),
        ("authorization=bearer abc.def-ghi, next", "authorization=bearer [REDACTED] next"),
        ("'BEARER tok-1'", "'BEARER [REDACTED]'"),
        (f"Bearer {JWT}", "Bearer [REDACTED]"),
        ("a JWT eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0. (alg none)", "a JWT [REDACTED] (alg none)"),
        ("nothing secret: eyJ alone; no bearer", "nothing secret: eyJ alone; no bearer"),
        ("", ""),
    ],
)
def test_redact_strings(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert redact([{"note": text}]) == [{"note": expected}]


def test_redact_ends_cycles_and_deep_nesting() -> None:
    cyclic: dict[str, Any] = {"a": 1}
    cyclic["self"] = cyclic
    deep: list[Any] = []
    node = deep
    for _ in range(100):
        node.append([])
        node = node[0]
    assert "[TOO DEEP]" in orjson.dumps(redact(cyclic)).decode()
    assert "[TOO DEEP]" in orjson.dumps(redact(deep)).decode()


def test_redact_leaves_plain_values_alone() -> None:
    values = [1, 2.5, None, True, "plain", {"k": "v"}, [1, "a"], ("t",)]
    assert [redact(v) for v in values] == values
    assert redact({3, 4}) in ([3, 4], [4, 3])


@pytest.mark.parametrize("backend", BACKENDS)
async def test_no_secret_reaches_the_output(
    backend: str, target_factory: Callable[[str], Target]
) -> None:
    target = target_factory("file")
    secrets = [b"tok-1", b"tok-2", b"tok-3", b"s3cr3t", b"pw-1", b"c2lnbmF0dXJl", b"eyJ"]
    async with open_log(backend, app_name="a", stream=target.stream) as log:
        bound = log.bind(password="pw-1", hook="PRE")
        bound.info(f"called with Bearer tok-1 and {JWT}", authorization="Bearer tok-2")
        bound.info(
            "event",
            body={"jwt": JWT, "data": [{"secretKey": "s3cr3t"}, ("x", {"Access_Token": "tok-3"})]},
            note=f"the token is {JWT}",
            lines=["Bearer tok-3", JWT],
        )
        try:
            raise PermissionError(f"refused Bearer tok-1 {JWT}")
        except PermissionError:
            bound.exception("login failed")
    raw = await target.output()
    assert [secret for secret in secrets if secret in raw] == []
    assert raw.count(b"[REDACTED]") >= 10
    assert len(parse_lines(raw)) == 3


# --- values JSON cannot hold ----------------------------------------------------------------


class _Shown:
    def __str__(self) -> str:
        return "shown as Bearer zzz"


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


@dataclass
class _Credentials:
    user: str
    secret: str = field(repr=False)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_unserialisable_values_become_strings(
    backend: str, target_factory: Callable[[str], Target]
) -> None:
    target = target_factory("file")
    async with open_log(backend, app_name="a", stream=target.stream) as log:
        log.info(
            "odd values",
            shown=_Shown(),
            unprintable=_Unprintable(),
            raw=b"bytes",
            huge=2**70,
            tuple_keys={(1, 2): "x"},
            creds=_Credentials("svc", "hide-me"),
            numbers={1: "one"},
            when=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        )
        log.info("after")
    raw = await target.output()
    first, second = parse_lines(raw)
    assert first["shown"] == "shown as Bearer [REDACTED]"
    assert first["unprintable"] == "<unprintable _Unprintable>"
    assert first["raw"] == "b'bytes'" and first["huge"] == str(2**70)
    assert first["tuple_keys"] == "{(1, 2): 'x'}" and first["numbers"] == {"1": "one"}
    assert first["creds"] == "_Credentials(user='svc')" and b"hide-me" not in raw
    assert first["when"] == "2026-01-02T03:04:05+00:00" and second["message"] == "after"


@pytest.mark.parametrize("backend", BACKENDS)
async def test_lone_surrogates_are_replaced_and_the_line_is_written(
    backend: str, target_factory: Callable[[str], Target]
) -> None:
    target = target_factory("pipe")  # a text stream: the line must also be valid UTF-8
    header = b"caf\xff".decode("utf-8", "surrogateescape")  # "caf\udcff"
    message = "header " + header
    async with open_log(backend, app_name="a", stream=target.stream) as log:
        log.info(message, value=header, headers={"x-odd": header, header: 1}, n=2**70)
        log.info("after")
    first, second = parse_lines(await target.output())
    assert first["message"] == "header caf\\xff" and first["value"] == "caf\\xff"
    assert first["headers"] == {"x-odd": "caf\\xff", "caf\\xff": 1}
    assert first["n"] == str(2**70)
    assert second["message"] == "after"


def test_dumps_line_never_raises_on_lone_surrogates() -> None:
    record = {"message": "\ud800 alone", "\udcff": ["\udfff", {"k": ("\udcff",)}]}
    assert orjson.loads(dumps_line(record)) == {
        "message": "\\ud800 alone",
        "\\xff": ["\\udfff", {"k": ["\\xff"]}],
    }


def test_a_record_that_cannot_be_built_is_replaced_not_raised() -> None:
    def broken_clock() -> float:
        raise OSError("clock unplugged")

    log = CapturingLog(clock=broken_clock)
    log.info("lost")
    assert log.records[0]["message"] == "log record dropped: it could not be built"
    assert log.records[0]["logError"] == "OSError" and log.records[0]["level"] == "INFO"


# --- lifecycle: nothing lost, nothing closed, nothing stalled ---------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["file", "pipe"])
async def test_a_burst_from_concurrent_tasks_is_written_completely(
    backend: str, kind: str, target_factory: Callable[[str], Target]
) -> None:
    target = target_factory(kind)
    log = open_log(backend, app_name="a", stream=target.stream)

    async def task(n: int) -> None:
        for i in range(100):
            log.info("burst", task=n, i=i, payload="x" * 50)
            if i % 10 == 0:
                await asyncio.sleep(0)  # a yield, not a wait: interleaves the tasks

    async with log:
        await asyncio.gather(*(task(n) for n in range(50)))
    records = parse_lines(await target.output())
    assert len(records) == 5000
    assert {(r["task"], r["i"]) for r in records} == {(n, i) for n in range(50) for i in range(100)}


@pytest.mark.parametrize("backend", BACKENDS)
async def test_aclose_twice_is_harmless_and_never_closes_the_stream(
    backend: str, tmp_path: Path
) -> None:
    path = tmp_path / "out.log"
    with path.open("w", encoding="utf-8") as stream:
        log = open_log(backend, app_name="a", stream=stream)
        async with log:
            log.info("one")
            await asyncio.gather(log.aclose(), log.aclose())
        await log.aclose()
        assert not stream.closed
        stream.write("caller still writes\n")
        log.info("after close")  # written at once, not lost
        with pytest.raises(RuntimeError, match="closed"):
            await log.__aenter__()
    first, caller_line, last = path.read_bytes().splitlines(keepends=True)
    assert caller_line == b"caller still writes\n"
    assert [r["message"] for r in parse_lines(first + last)] == ["one", "after close"]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_default_stream_is_stdout_and_stays_open(
    backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with open_log(backend, app_name="stdout-app") as log:
        log.info("to stdout")
    assert not sys.stdout.closed
    records = parse_lines(capsys.readouterr().out.encode())
    assert [(r["message"], r["appName"]) for r in records] == [("to stdout", "stdout-app")]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_records_outside_the_open_window_or_loop_are_kept(
    backend: str, target_factory: Callable[[str], Target]
) -> None:
    target = target_factory("file")
    log = open_log(backend, app_name="a", stream=target.stream)
    log.info("before enter")
    async with log:
        await asyncio.to_thread(log.info, "from a thread")
        log.info("inside")
    assert {r["message"] for r in parse_lines(await target.output())} == {
        "before enter",
        "from a thread",
        "inside",
    }


async def test_aclose_without_enter_writes_what_was_queued() -> None:
    stream = io.BytesIO()
    log = StdlibLog(app_name="a", stream=stream)
    log.info("queued")
    await log.aclose()
    assert [r["message"] for r in parse_lines(stream.getvalue())] == ["queued"]


class GatedStream(io.BytesIO):
    """A binary stream whose writes block until ``release`` is set (a stuck stdout).

    A write from the event loop's thread does not block (the test would hang) but is recorded,
    so a backend that writes on the loop fails the test instead.
    """

    def __init__(self, loop_thread: int) -> None:
        super().__init__()
        self.loop_thread = loop_thread
        self.entered = threading.Event()
        self.release = threading.Event()
        self.writes_on_loop_thread = 0

    def write(self, data: Any) -> int:
        if threading.get_ident() == self.loop_thread:
            self.writes_on_loop_thread += 1
        else:
            self.entered.set()
            self.release.wait(timeout=30)
        return super().write(data)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_stuck_stream_does_not_block_the_event_loop(backend: str) -> None:
    stream = GatedStream(threading.get_ident())
    async with open_log(backend, app_name="a", stream=stream) as log:
        log.info("first")
        assert await asyncio.to_thread(stream.entered.wait, 10)  # the writer is stuck now
        handoff: asyncio.Queue[int] = asyncio.Queue(maxsize=1)

        async def consume() -> int:
            return sum([await handoff.get() for _ in range(500)])

        consumer = asyncio.create_task(consume())
        for i in range(500):  # 500 loop hand-offs, each logged, while the writer is stuck
            await handoff.put(i)
            log.info("while stuck", i=i)
        assert await consumer == sum(range(500))
        assert stream.getvalue() == b"" and not stream.release.is_set()
        stream.release.set()
    records = parse_lines(stream.getvalue())
    assert stream.writes_on_loop_thread == 0
    assert [r["message"] for r in records] == ["first"] + ["while stuck"] * 500
    assert [r["i"] for r in records[1:]] == list(range(500))


class _CountingStream(io.BytesIO):
    """A binary stream that counts write calls (each is one hand-over to the OS)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: Any) -> int:
        self.writes += 1
        return super().write(data)


async def test_stdlib_lines_on_the_loop_are_handed_over_in_one_batch() -> None:
    stream = _CountingStream()
    async with StdlibLog(app_name="app", stream=stream) as log:
        for i in range(100):
            log.info("line", i=i)
        # No await since: the hand-over timer cannot have run, nothing reached the thread.
        assert stream.getvalue() == b""
        await log.flush()
        lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
        assert [record["i"] for record in lines] == list(range(100))
        assert stream.writes == 1


async def test_stdlib_lines_from_another_thread_take_the_direct_path() -> None:
    stream = _CountingStream()
    async with StdlibLog(app_name="app", stream=stream) as log:
        await asyncio.to_thread(log.info, "from a thread")
        log.info("from the loop")
        await log.flush()
        messages = [orjson.loads(line)["message"] for line in stream.getvalue().splitlines()]
    assert sorted(messages) == ["from a thread", "from the loop"]


async def test_stdlib_aclose_writes_held_lines() -> None:
    stream = _CountingStream()
    log = StdlibLog(app_name="app", stream=stream)
    async with log:
        log.info("held until close")
    assert orjson.loads(stream.getvalue())["message"] == "held until close"


async def test_aio_flush_writes_everything_logged_so_far() -> None:
    stream = _CountingStream()
    async with AioLog(app_name="app", stream=stream) as log:
        for i in range(20):
            log.info("line", i=i)
        await log.flush()
        assert len(stream.getvalue().splitlines()) == 20
