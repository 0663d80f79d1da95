"""The default log backend: JSON lines through stdlib ``logging`` and a listener thread.

Contract: :class:`StdlibLog` is a :class:`worker.logs.core.Backend` over a private
:class:`logging.Logger` whose ``QueueHandler`` feeds a ``QueueListener`` thread that writes
batches (one write and flush per burst) to the stream, so a slow or stuck stdout never stalls
the event loop. The line is built, redacted and serialised at the call site: serialising on the
listener instead was not cheaper, since the listener then fights the loop for the GIL, and the
call site must copy mutable fields anyway.

On the event loop's thread, finished lines are not handed to the listener one by one: waking
that thread per record costs more CPU than the record itself (the thread fights the loop for
the GIL). They are collected and handed over as one batch at most ``_HANDOVER_DELAY`` later (or
when ``_MAX_BATCH`` lines are waiting, or on :meth:`StdlibLog.flush` and ``aclose``). Lines
logged from other threads take the direct path. Lines of one thread keep their order.
"""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import queue
import signal
import threading
import time
from typing import Any, Final, cast

from worker.logs.core import Backend, Clock, LineWriter, Stream
from worker.logs.records import INFO, Level, dumps_line


class _PassThroughQueueHandler(logging.handlers.QueueHandler):
    """Enqueues the record as it is: the stock ``prepare`` formats and copies every record on
    the caller's thread, and our record already carries a finished line."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


class _LineRecord(logging.LogRecord):
    """A ``LogRecord`` that only carries a finished line to the listener thread.

    ``LogRecord.__init__`` (pid, thread and process names, path parsing) is a large share of a
    call, and none of it is used: the line already holds what BioT wants.
    """

    def __init__(self, name: str, level: Level, line: bytes) -> None:
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

    def __init__(self, pending: queue.SimpleQueue[Any], writer: LineWriter) -> None:
        super().__init__()
        self._pending = pending
        self._writer = writer
        self._batch: list[bytes] = []

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record, _FlushMarker):
            self.flush()
            record.done.set()
            return
        self._batch.append(cast(bytes, record.msg))  # the line(s) StdlibLog put there
        if len(self._batch) >= _MAX_BATCH or self._pending.empty():
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            batch, self._batch = self._batch, []
        if batch:
            self._writer.write(batch)


class _FlushMarker(_LineRecord):
    """Queued behind the lines to flush; the listener sets ``done`` once they are written."""

    def __init__(self, name: str, level: Level) -> None:
        super().__init__(name, level, b"")
        self.done = threading.Event()


_MAX_BATCH: Final = 512
_STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
# How long lines logged on the loop wait before they are handed to the writer thread.
_HANDOVER_DELAY: Final = 0.01


class StdlibLog(Backend):
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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._held: list[bytes] = []  # lines logged on the loop, not yet handed over
        self._handover_timer: asyncio.TimerHandle | None = None

    def _write_record(self, level: Level, record: dict[str, Any]) -> None:
        line = dumps_line(record)
        if self._closed:
            self._writer.write([line])
        elif self._loop is not None and threading.get_ident() == self._loop_thread:
            self._hold(line)
        else:
            self._logger.handle(_LineRecord(self._logger.name, level, line))

    def _hold(self, line: bytes) -> None:
        self._held.append(line)
        if len(self._held) >= _MAX_BATCH:
            self._handover()
        elif self._handover_timer is None and self._loop is not None:
            self._handover_timer = self._loop.call_later(_HANDOVER_DELAY, self._handover)

    def _handover(self) -> None:
        """Give the held lines to the writer thread as one record (loop thread only)."""
        if self._handover_timer is not None:
            self._handover_timer.cancel()
            self._handover_timer = None
        held, self._held = self._held, []
        if held:
            self._logger.handle(_LineRecord(self._logger.name, INFO, b"".join(held)))

    async def flush(self) -> None:
        """Return once every line logged so far is written to the stream.

        The Lambda adapter calls it before answering, since a frozen container runs no timer.
        """
        if self._closed or not self._started:
            return
        self._handover()
        marker = _FlushMarker(self._logger.name, INFO)
        self._logger.handle(marker)
        await asyncio.to_thread(marker.done.wait)

    async def _start(self) -> None:
        if not self._started:
            self._started = True
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
            # The listener thread inherits this mask: SIGTERM and SIGINT stay the main thread's,
            # so the worker's stop decides what a signal does, not whichever thread gets it.
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            try:
                self._listener.start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    async def _stop(self) -> None:
        self._handover()
        self._loop = None  # from now on every record takes the direct path
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
