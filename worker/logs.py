"""Structured logging in BioT's JSON shape (platform §6), with redaction and two backends.

Every record is ONE JSON object on ONE line::

    {"@timestamp": "2026-11-23T01:48:14.123Z", "message": "event handled", "level": "INFO",
     "level_value": 30000, "appName": "my-plugin", "traceId": "4bf9...", "hook": "PRE", ...}

``traceId`` is read from :data:`worker.tracing.current_trace` when the call is made (``null``
when no trace is bound). Every record, including its message, goes through :func:`redact`, so
no JWT, bearer token, secret key or password reaches the output. A logging call never raises.

Backends (they write the same bytes; both are async context managers with an idempotent
``aclose()`` that flushes every record logged before it, and neither ever closes the stream):

- :class:`StdlibLog` (the default): a private :class:`logging.Logger` whose ``QueueHandler``
  feeds a ``QueueListener`` thread that writes batches (one write and flush per burst) to the
  stream, so a slow or stuck stdout never stalls the event loop. The line is built, redacted
  and serialised at the call site: serialising on the listener instead was not cheaper
  (9.6-13.6 against 11.1-12.2 µs a call, with the stock ``LogRecord``), since the listener then
  fights the loop for the GIL, and the call site must copy mutable fields anyway.
- :class:`AioLog`: aiologger 0.7.0 behind the same protocol. Each record is an aiologger task.
  Its traps are handled here: pending tasks are tracked and awaited in ``aclose``
  (``shutdown()`` does not wait for them); lines go through our own handler that writes from
  one worker thread (aiologger's stream handler fails on a regular file, and its
  ``shutdown()`` closes stdout).

Measured on this VM (``timeit``, 100k calls x 7, median; ``info`` with 3 short fields, a bound
trace, writing to a file; three runs): StdlibLog 8.2-8.7 µs a call at the call site and
8.3-9.7 µs of process CPU a record including the listener thread; 0.2 µs below the level.
AioLog 15.6-17.1 µs at the call site, 24.5-27.9 µs until the line is written (the task runs
later on the loop). For comparison perf-limits.md §3.3: stdlib + orjson 13 µs through a direct
``FileHandler``, 19.5 µs through a stock ``QueueHandler`` (whose ``prepare`` formats and copies
every record on the caller's thread; ours skips both, and the 3.5 µs ``LogRecord.__init__``),
aiologger's own file handler 140-150 µs with records lost and corrupted under a burst.

:class:`CapturingLog` keeps the records as dicts, for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import logging.handlers
import queue
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any, BinaryIO, Final, NamedTuple, Protocol, Self, TextIO, cast

import orjson

from worker.tracing import current_trace_id

Clock = Callable[[], float]
Stream = TextIO | BinaryIO
REDACTED: Final = "[REDACTED]"


class Log(Protocol):
    """What the worker logs through. ``fields`` become top-level JSON fields of the record."""

    def debug(self, message: str, /, **fields: Any) -> None: ...
    def info(self, message: str, /, **fields: Any) -> None: ...
    def warning(self, message: str, /, **fields: Any) -> None: ...
    def error(self, message: str, /, **fields: Any) -> None: ...

    def exception(self, message: str, /, **fields: Any) -> None:
        """Like ``error``, plus the exception being handled under ``error``."""
        ...

    def bind(self, **fields: Any) -> Log:
        """A child log adding ``fields`` to each record; cheap (no handler, no thread)."""
        ...


# ---------------------------------------------------------------------------------------------
# Levels


class _Level(NamedTuple):
    name: str  # BioT's level name
    value: int  # BioT's level_value (the platform seeds' table)
    number: int  # the stdlib level number, used for thresholds


_DEBUG: Final = _Level("DEBUG", 10000, logging.DEBUG)
_INFO: Final = _Level("INFO", 30000, logging.INFO)
_WARN: Final = _Level("WARN", 40000, logging.WARNING)
_ERROR: Final = _Level("ERROR", 50000, logging.ERROR)
_THRESHOLDS: Final = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "WARN": 30, "ERROR": 40}


def _threshold(level: str) -> int:
    """The stdlib number of a level name (case-insensitive); ``ValueError`` if unknown."""
    try:
        return _THRESHOLDS[level.upper()]
    except KeyError:
        raise ValueError(
            f"unknown log level {level!r}: use DEBUG, INFO, WARNING or ERROR"
        ) from None


# ---------------------------------------------------------------------------------------------
# Redaction


def _normalise_key(key: str) -> str:
    return key.lower().replace("-", "").replace("_", "")


# Matched after lower-casing and dropping "-" and "_": "secretKey", "secret_key" and "SECRET-KEY"
# are one key. The last four are not in the brief but carry credentials just the same.
_SECRET_KEYS: Final = frozenset(
    _normalise_key(key)
    for key in (
        "authorization", "jwt", "secretKey", "accessToken", "password", "token",
        "service_user_secret", "x-api-key", "cookie",
        "set-cookie", "proxy-authorization", "refreshToken", "api_key",
    )
)  # fmt: skip
# A JWT (three base64url segments, the header starting with '{"' = "eyJ") or a bearer credential.
_SECRET_TEXT: Final = re.compile(
    r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"
    r"|(?P<scheme>\b[Bb][Ee][Aa][Rr][Ee][Rr]\s+)[^\s\"']+"
)
_MAX_DEPTH: Final = 32
_PLAIN: Final = frozenset({int, float, bool, type(None)})
_KEY_VERDICTS: dict[Any, bool] = {}  # memo: logs reuse a small set of keys
_KEY_VERDICTS_MAX: Final = 4096


def redact(value: Any) -> Any:
    """A copy of ``value`` with secrets replaced by ``"[REDACTED]"``; ``value`` is not modified.

    - a dict key (any depth, in dicts, lists, tuples and sets) named ``authorization``, ``jwt``,
      ``secretKey``/``secret_key``, ``accessToken``/``access_token``, ``password``, ``token``,
      ``service_user_secret``, ``x-api-key``, ``cookie`` (case-, ``-``- and ``_``-insensitive;
      also ``set-cookie``, ``proxy-authorization``, ``refreshToken``, ``api_key``) gets the value
      ``"[REDACTED]"``;
    - in every string, a JWT-looking substring becomes ``[REDACTED]`` and ``Bearer <credential>``
      becomes ``Bearer [REDACTED]``.

    Mappings become dicts, sets and tuple subclasses become lists, nesting deeper than 32 becomes
    ``"[TOO DEEP]"`` (so cycles end). Other objects are returned as they are; the backends turn
    what JSON cannot hold into ``str()``, redacted too.
    """
    return _redact(value, _MAX_DEPTH)


def _redact(value: Any, depth: int) -> Any:
    kind = type(value)
    if kind is str:
        return _redact_text(value)
    if kind in _PLAIN:
        return value
    if depth <= 0:
        return "[TOO DEEP]"
    if isinstance(value, Mapping):
        return {key: _redact_entry(key, item, depth - 1) for key, item in value.items()}
    if kind is tuple:
        return tuple(_redact(item, depth - 1) for item in value)
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact(item, depth - 1) for item in value]
    if isinstance(value, str):
        return _redact_text(str.__str__(value))
    return value


def _redact_entry(key: Any, value: Any, depth: int) -> Any:
    return REDACTED if _is_secret_key(key) else _redact(value, depth)


def _is_secret_key(key: Any) -> bool:
    verdict = _KEY_VERDICTS.get(key)
    if verdict is None:
        verdict = isinstance(key, str) and _normalise_key(key) in _SECRET_KEYS
        if len(_KEY_VERDICTS) < _KEY_VERDICTS_MAX:
            _KEY_VERDICTS[key] = verdict
    return verdict


def _redact_text(text: str) -> str:
    # The cheap test spares the regex on nearly every string; "bearer" needs its case folded.
    if "eyJ" not in text and "bearer" not in text.lower():
        return text
    return _SECRET_TEXT.sub(r"\g<scheme>[REDACTED]", text)


# ---------------------------------------------------------------------------------------------
# Records


_CORE: Final = frozenset({"@timestamp", "message", "level", "level_value", "appName", "traceId"})


@lru_cache(maxsize=4)
def _second(epoch_second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_second))


def _timestamp(now: float) -> str:
    """UTC, milliseconds, literal ``Z``; the seconds part is cached (logs come many a second)."""
    # Rounded to the microsecond first, as datetime does, then truncated to the millisecond.
    second, millisecond = divmod(round(now * 1_000_000) // 1000, 1000)
    return f"{_second(second)}.{millisecond:03d}Z"


def _add_fields(record: dict[str, Any], fields: Mapping[str, Any]) -> None:
    """Add caller fields to ``record``, redacted; plain values take the short path (most do)."""
    for key, value in fields.items():
        if key in _CORE:  # a caller field may not forge a trace id or a level: renamed instead
            key = "fields." + key
        kind = type(value)
        if _is_secret_key(key):
            value = REDACTED
        elif kind is str:
            value = _redact_text(value)
        elif kind not in _PLAIN:
            value = _redact(value, _MAX_DEPTH)
        record[key] = value


def _make_record(
    level: _Level, message: str, app_name: str | None, now: float, bound: dict[str, Any],
    fields: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """The record in BioT's field order; ``bound`` is already redacted, ``fields`` are not."""
    record = {
        "@timestamp": _timestamp(now),
        "message": _redact_text(message if type(message) is str else str(message)),
        "level": level.name,
        "level_value": level.value,
        "appName": app_name,
        "traceId": current_trace_id(),
    }
    if bound:
        record.update(bound)
    _add_fields(record, fields)
    return record


def _fallback_record(level: _Level, app_name: str | None, failure: Exception) -> dict[str, Any]:
    """What is logged when a record cannot be built (a broken ``__str__``, a failing clock)."""
    return {
        "@timestamp": _timestamp(time.time()),
        "message": "log record dropped: it could not be built",
        "level": level.name,
        "level_value": level.value,
        "appName": app_name,
        "traceId": current_trace_id(),
        "logError": type(failure).__name__,
    }


def _error_field() -> dict[str, Any] | None:
    """The exception being handled as ``{type, message, traceback}``; ``None`` outside one."""
    exc = sys.exc_info()[1]
    if exc is None:
        return None
    kind = type(exc)
    module = "" if kind.__module__ == "builtins" else kind.__module__ + "."
    return {
        "type": module + kind.__qualname__,
        "message": _safe_str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


_OPTIONS: Final = (
    orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS
)


def _default(value: Any) -> str:
    # Dataclasses come here too (passthrough) so that their repr=False fields stay out.
    return _redact_text(_safe_str(value))


def _dumps(record: dict[str, Any]) -> bytes:
    """One JSON line ending in ``\\n``; never raises (a field JSON cannot hold becomes ``str``)."""
    try:
        return orjson.dumps(record, default=_default, option=_OPTIONS)
    except orjson.JSONEncodeError:  # e.g. an int beyond 64 bits, a tuple as a dict key
        return orjson.dumps(
            {key: _json_safe(value) for key, value in record.items()},
            default=_default,
            option=_OPTIONS,
        )


def _json_safe(value: Any) -> Any:
    try:
        orjson.dumps(value, default=_default, option=_OPTIONS)
    except orjson.JSONEncodeError:
        return _default(value)
    return value


# ---------------------------------------------------------------------------------------------
# The front end every backend shares


class _Sink(Protocol):
    def _write_record(self, level: _Level, record: dict[str, Any]) -> None:
        """Write one built, redacted record; must not raise."""


class _BoundLog:
    """A :class:`Log` over a sink: level check, record building, ``bind``."""

    __slots__ = ("_app_name", "_bound", "_clock", "_sink", "_threshold")

    def __init__(
        self, sink: _Sink, app_name: str | None, threshold: int, clock: Clock,
        bound: dict[str, Any],
    ) -> None:  # fmt: skip
        self._sink = sink
        self._app_name = app_name
        self._threshold = threshold
        self._clock = clock
        self._bound = bound

    def debug(self, message: str, /, **fields: Any) -> None:
        if self._threshold <= logging.DEBUG:
            self._emit(_DEBUG, message, fields)

    def info(self, message: str, /, **fields: Any) -> None:
        if self._threshold <= logging.INFO:
            self._emit(_INFO, message, fields)

    def warning(self, message: str, /, **fields: Any) -> None:
        if self._threshold <= logging.WARNING:
            self._emit(_WARN, message, fields)

    def error(self, message: str, /, **fields: Any) -> None:
        if self._threshold <= logging.ERROR:
            self._emit(_ERROR, message, fields)

    def exception(self, message: str, /, **fields: Any) -> None:
        """``error`` plus ``error: {type, message, traceback}`` of the exception being handled."""
        if self._threshold <= logging.ERROR:
            try:
                fields["error"] = _error_field()
            except Exception as failure:  # a traceback that cannot be formatted
                fields["error"] = {"type": type(failure).__name__}
            self._emit(_ERROR, message, fields)

    def bind(self, **fields: Any) -> Log:
        """A child adding ``fields`` (redacted once, now) to each record; call fields win."""
        bound = dict(self._bound)
        _add_fields(bound, fields)
        return _BoundLog(self._sink, self._app_name, self._threshold, self._clock, bound)

    def _emit(self, level: _Level, message: str, fields: dict[str, Any]) -> None:
        try:
            record = _make_record(
                level, message, self._app_name, self._clock(), self._bound, fields
            )
        except Exception as failure:
            record = _fallback_record(level, self._app_name, failure)
        self._sink._write_record(level, record)


class CapturingLog(_BoundLog):
    """A :class:`Log` for tests: keeps each record as the dict a real backend would serialise.

    ``records`` holds the records of this log and of every log bound from it, in order, already
    redacted. ``level`` defaults to DEBUG so that nothing is filtered.

    >>> log = CapturingLog()
    >>> log.bind(hook="PRE").info("event handled", status=200)
    >>> log.find("event handled")[0]["status"]
    200
    """

    def __init__(
        self, *, app_name: str = "test", level: str = "DEBUG", clock: Clock = time.time
    ) -> None:
        super().__init__(self, app_name, _threshold(level), clock, {})
        self.records: list[dict[str, Any]] = []

    def find(self, message: str, /, **fields: Any) -> list[dict[str, Any]]:
        """The records whose message is ``message`` and whose fields include ``fields``."""
        return [
            record
            for record in self.records
            if record["message"] == message
            and all(record.get(key, _MISSING) == value for key, value in fields.items())
        ]

    @property
    def messages(self) -> list[str]:
        return [record["message"] for record in self.records]

    def _write_record(self, level: _Level, record: dict[str, Any]) -> None:
        self.records.append(record)


_MISSING: Final = object()


# ---------------------------------------------------------------------------------------------
# Writing lines to the caller's stream


class _LineWriter:
    """Writes batches of lines to a text or binary stream; thread-safe; never closes it."""

    def __init__(self, stream: Stream) -> None:
        self._lock = threading.Lock()
        self._text: TextIO | None = None
        self._binary: BinaryIO | None = None
        if isinstance(stream, io.TextIOBase) or hasattr(stream, "encoding"):
            self._text = stream  # type: ignore[assignment]
        else:
            self._binary = stream

    def write(self, lines: list[bytes]) -> None:
        """Write and flush; a failure is reported on stderr once per batch, never raised."""
        data = b"".join(lines)
        try:
            with self._lock:
                self._write_flush(data)
        except Exception as failure:
            _report(f"{len(lines)} log line(s) lost: {failure!r}")

    def _write_flush(self, data: bytes) -> None:
        if self._text is not None:
            self._text.write(data.decode())
            self._text.flush()
        elif self._binary is not None:
            self._binary.write(data)
            self._binary.flush()


def _report(problem: str) -> None:
    # The log itself is broken (stdout closed, disk full): stderr is all that is left.
    with contextlib.suppress(Exception):  # nowhere left to report to
        sys.stderr.write(f"biot-worker logging: {problem}\n")


class _Backend(_BoundLog):
    """Lifecycle shared by the real backends: ``async with``, idempotent ``aclose``."""

    def __init__(
        self, *, app_name: str | None, level: str, stream: Stream | None, clock: Clock
    ) -> None:
        super().__init__(self, app_name, _threshold(level), clock, {})
        self._writer = _LineWriter(stream if stream is not None else sys.stdout)
        self._closer: asyncio.Future[None] | None = None

    async def __aenter__(self) -> Self:
        if self._closer is not None:
            raise RuntimeError("this log is closed")
        await self._start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Write every record logged so far, then stop; records logged later are written
        synchronously. Calling it again (or concurrently) waits for the same close."""
        if self._closer is None:
            self._closer = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._closer)

    def _write_record(self, level: _Level, record: dict[str, Any]) -> None:
        raise NotImplementedError

    async def _start(self) -> None:
        raise NotImplementedError

    async def _stop(self) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# stdlib backend


class _PassThroughQueueHandler(logging.handlers.QueueHandler):
    """Enqueues the record as it is: the stock ``prepare`` formats and copies every record on
    the caller's thread, and our record already carries a finished line."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


class _LineRecord(logging.LogRecord):
    """A ``LogRecord`` that only carries a finished line to the listener thread.

    ``LogRecord.__init__`` (pid, thread and process names, path parsing: about 3.5 µs) was a
    third of a call here, and none of it is used: the line already holds what BioT wants.
    """

    def __init__(self, name: str, level: _Level, line: bytes) -> None:
        self.name = name
        self.msg = line
        self.args = ()
        self.levelno = level.number
        self.levelname = level.name
        self.exc_info = None
        self.exc_text = None
        self.stack_info = None


class _BatchingHandler(logging.Handler):
    """Runs on the listener thread: collects lines and writes them when the queue is empty
    (or the batch is full), so a burst costs one write and one flush, not thousands."""

    def __init__(self, pending: queue.SimpleQueue[Any], writer: _LineWriter) -> None:
        super().__init__()
        self._pending = pending
        self._writer = writer
        self._batch: list[bytes] = []

    def emit(self, record: logging.LogRecord) -> None:
        self._batch.append(cast(bytes, record.msg))  # the line StdlibLog put there
        if len(self._batch) >= _MAX_BATCH or self._pending.empty():
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            batch, self._batch = self._batch, []
        if batch:
            self._writer.write(batch)


_MAX_BATCH: Final = 512


class StdlibLog(_Backend):
    """JSON lines through stdlib ``logging``: call site -> queue -> listener thread -> stream.

    ``level`` is DEBUG, INFO, WARNING or ERROR; records below it cost one comparison. ``stream``
    defaults to ``sys.stdout`` (read when constructed) and may be text or binary, a pipe, a
    terminal or a regular file. Records logged before ``__aenter__`` wait in the queue; records
    logged after ``aclose`` are written synchronously. The queue is unbounded: a stuck stream
    costs memory, never a stalled event loop. Safe to log from any thread.
    """

    def __init__(
        self, *, app_name: str | None, level: str = "INFO", stream: Stream | None = None,
        clock: Clock = time.time,
    ) -> None:  # fmt: skip
        super().__init__(app_name=app_name, level=level, stream=stream, clock=clock)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._batcher = _BatchingHandler(self._queue, self._writer)
        self._listener = logging.handlers.QueueListener(self._queue, self._batcher)
        # Built directly, not with getLogger: not registered in logging's tree, never shared.
        self._logger = logging.Logger("biot-worker", logging.DEBUG)
        self._logger.propagate = False
        self._logger.addHandler(_PassThroughQueueHandler(self._queue))
        self._started = False
        self._closed = False

    def _write_record(self, level: _Level, record: dict[str, Any]) -> None:
        line = _dumps(record)
        if self._closed:
            self._writer.write([line])
            return
        self._logger.handle(_LineRecord(self._logger.name, level, line))

    async def _start(self) -> None:
        if not self._started:
            self._started = True
            self._listener.start()

    async def _stop(self) -> None:
        # The join waits for the stream: off the loop, or a stuck stdout would stall it.
        await asyncio.to_thread(self._stop_listener)
        self._closed = True
        self._drain()  # what was logged while the listener was stopping

    def _stop_listener(self) -> None:
        if self._started:
            self._listener.stop()
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                record = self._queue.get_nowait()
            except queue.Empty:
                break
            if record is not None:  # None is the listener's stop sentinel
                self._batcher.handle(record)
        self._batcher.flush()


# ---------------------------------------------------------------------------------------------
# aiologger backend


class _AioLineHandler:
    """Quacks like an aiologger ``Handler``: buffers lines and writes them from one thread.

    aiologger's own stream handler cannot write to a regular file and closes the stream on
    shutdown; this one works for any stream and never closes it.
    """

    level = 0  # aiologger compares each record's level with it; ours are filtered earlier
    initialized = True

    def __init__(self, writer: _LineWriter, executor: ThreadPoolExecutor) -> None:
        self._writer = writer
        self._executor = executor
        self._buffer: list[bytes] = []
        self._flusher: asyncio.Task[None] | None = None

    async def handle(self, record: Any) -> bool:
        self._buffer.append(record.msg)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_all())
        return True

    async def flush(self) -> None:
        """Return when every buffered line is written."""
        while self._flusher is not None:
            await asyncio.shield(self._flusher)

    async def close(self) -> None:
        await self.flush()

    async def _flush_all(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._buffer:
                batch, self._buffer = self._buffer, []
                await loop.run_in_executor(self._executor, self._writer.write, batch)
        except Exception as failure:  # only if the executor is gone
            _report(f"log writer failed: {failure!r}")
        finally:
            self._flusher = None


class AioLog(_Backend):
    """JSON lines through aiologger; must be entered and used inside a running loop.

    Each record becomes an aiologger task, tracked until done; ``aclose`` awaits them all and
    the lines they buffered. Records logged before ``__aenter__``, after ``aclose`` or from
    another thread are written synchronously. ``stream`` as for :class:`StdlibLog`.
    """

    def __init__(
        self, *, app_name: str | None, level: str = "INFO", stream: Stream | None = None,
        clock: Clock = time.time,
    ) -> None:  # fmt: skip
        super().__init__(app_name=app_name, level=level, stream=stream, clock=clock)
        self._pending: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._logger: Any = None
        self._handler: _AioLineHandler | None = None
        self._make_log_record: Any = None
        self._closed = False

    async def _start(self) -> None:
        if self._loop is not None:
            return
        # Imported here: aiologger reads the environment when imported.
        from aiologger import Logger
        from aiologger.records import LogRecord

        self._executor = ThreadPoolExecutor(1, thread_name_prefix="biot-log")
        self._logger = Logger(name="biot-worker")
        self._handler = _AioLineHandler(self._writer, self._executor)
        self._logger.add_handler(self._handler)
        self._make_log_record = LogRecord
        self._loop = asyncio.get_running_loop()

    def _write_record(self, level: _Level, record: dict[str, Any]) -> None:
        line = _dumps(record)
        if self._closed or self._loop is None or not self._in_loop():
            self._writer.write([line])
            return
        log_record = self._make_log_record(
            name="biot-worker", level=level.number, pathname="", lineno=0, msg=line, args=None
        )
        task = self._loop.create_task(self._logger.handle(log_record))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _drain(self, handler: _AioLineHandler) -> None:
        # Awaiting lets more records in: repeat until a pass ends with no task pending.
        while True:
            await asyncio.gather(*self._pending, return_exceptions=True)
            await handler.flush()
            if not self._pending:
                return

    def _in_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    async def _stop(self) -> None:
        if self._handler is not None:
            await self._drain(self._handler)
        self._closed = True  # no await since the last check: nothing is left behind
        if self._logger is not None:
            await self._logger.shutdown()  # closes our handler only, never the stream
        if self._executor is not None:
            self._executor.shutdown(wait=False)


def open_log(
    backend: str, *, app_name: str | None, level: str = "INFO", stream: Stream | None = None
) -> StdlibLog | AioLog:
    """The backend named ``"stdlib"`` or ``"aiologger"`` (``ValueError`` otherwise), not yet
    entered: use it as ``async with open_log(...) as log``."""
    if backend == "stdlib":
        return StdlibLog(app_name=app_name, level=level, stream=stream)
    if backend == "aiologger":
        return AioLog(app_name=app_name, level=level, stream=stream)
    raise ValueError(f"unknown log backend {backend!r}: use 'stdlib' or 'aiologger'")
