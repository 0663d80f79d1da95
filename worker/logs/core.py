"""What every log shares: the ``Log`` protocol, its front end, and the real backends' lifecycle.

Contract:

- :class:`BoundLog` implements :class:`Log` over a :class:`Sink`. A call below the threshold
  costs one comparison; otherwise the record is built by :mod:`worker.logs.records` (redacted,
  BioT's shape) and handed to the sink. A logging call never raises: a record that cannot be
  built is replaced by a fallback record naming the failure.
- :class:`Backend` is a :class:`BoundLog` that is also an async context manager with an
  idempotent ``aclose()`` that flushes every record logged before it; subclasses implement
  ``_write_record``, ``_start``, ``_stop`` and ``flush``.
- :class:`LineWriter` writes batches of lines to a text or binary stream from any thread and
  never closes it; a write that fails is reported on stderr (:func:`report`), never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol, Self, TextIO

from worker.logs.records import (
    DEBUG,
    ERROR,
    INFO,
    WARN,
    Level,
    add_fields,
    error_field,
    fallback_record,
    make_record,
    threshold,
)

Clock = Callable[[], float]
Stream = TextIO | BinaryIO


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


class Sink(Protocol):
    def _write_record(self, level: Level, record: dict[str, Any]) -> None:
        """Write one built, redacted record; must not raise."""


class BoundLog:
    """A :class:`Log` over a sink: level check, record building, ``bind``."""

    __slots__ = ("_app_name", "_bound", "_clock", "_sink", "_threshold")

    def __init__(
        self, sink: Sink, app_name: str | None, threshold: int, clock: Clock,
        bound: dict[str, Any],
    ) -> None:  # fmt: skip
        self._sink = sink
        self._app_name = app_name
        self._threshold = threshold
        self._clock = clock
        self._bound = bound

    def debug(self, message: str, /, **fields: Any) -> None:
        if self._threshold <= logging.DEBUG:
            self._emit(DEBUG, message, fields)

    def info(self, message: str, /, **fields: Any) -> None:
        if self._threshold <= logging.INFO:
            self._emit(INFO, message, fields)

    def warning(self, message: str, /, **fields: Any) -> None:
        if self._threshold <= logging.WARNING:
            self._emit(WARN, message, fields)

    def error(self, message: str, /, **fields: Any) -> None:
        if self._threshold <= logging.ERROR:
            self._emit(ERROR, message, fields)

    def exception(self, message: str, /, **fields: Any) -> None:
        """``error`` plus ``error: {type, message, traceback}`` of the exception being handled."""
        if self._threshold <= logging.ERROR:
            try:
                fields["error"] = error_field()
            except Exception as failure:  # a traceback that cannot be formatted
                fields["error"] = {"type": type(failure).__name__}
            self._emit(ERROR, message, fields)

    def bind(self, **fields: Any) -> Log:
        """A child adding ``fields`` (redacted once, now) to each record; call fields win."""
        bound = dict(self._bound)
        add_fields(bound, fields)
        return BoundLog(self._sink, self._app_name, self._threshold, self._clock, bound)

    def _emit(self, level: Level, message: str, fields: dict[str, Any]) -> None:
        try:
            record = make_record(level, message, self._app_name, self._clock(), self._bound, fields)
        except Exception as failure:
            record = fallback_record(level, self._app_name, failure)
        self._sink._write_record(level, record)


class LineWriter:
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
            report(f"{len(lines)} log line(s) lost: {failure!r}")

    def _write_flush(self, data: bytes) -> None:
        if self._text is not None:
            self._text.write(data.decode())
            self._text.flush()
        elif self._binary is not None:
            self._binary.write(data)
            self._binary.flush()


def report(problem: str) -> None:
    """Tell stderr that the log itself failed; never raises."""
    # The log itself is broken (stdout closed, disk full): stderr is all that is left.
    with contextlib.suppress(Exception):  # nowhere left to report to
        sys.stderr.write(f"biot-worker logging: {problem}\n")


class Backend(BoundLog):
    """Lifecycle shared by the real backends: ``async with``, idempotent ``aclose``."""

    def __init__(
        self, *, app_name: str | None, level: str, stream: Stream | None, clock: Clock
    ) -> None:
        super().__init__(self, app_name, threshold(level), clock, {})
        self._writer = LineWriter(stream if stream is not None else sys.stdout)
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

    async def flush(self) -> None:
        """Return once every line logged so far is written to the stream."""
        raise NotImplementedError

    def _write_record(self, level: Level, record: dict[str, Any]) -> None:
        raise NotImplementedError

    async def _start(self) -> None:
        raise NotImplementedError

    async def _stop(self) -> None:
        raise NotImplementedError
