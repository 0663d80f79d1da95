"""What the real log backends share: writing finished lines to a stream, and the lifecycle.

Contract: a :class:`Backend` is a :class:`worker.log_front.BoundLog` that is also an async
context manager with an idempotent ``aclose()`` that flushes every record logged before it.
:class:`LineWriter` writes batches of lines to a text or binary stream from any thread and
never closes it; a write that fails is reported on stderr (:func:`report`), never raised.
Subclasses implement ``_write_record``, ``_start`` and ``_stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import sys
import threading
from typing import Any, BinaryIO, Self, TextIO

from worker.log_front import BoundLog, Clock
from worker.log_records import Level, threshold

Stream = TextIO | BinaryIO


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
