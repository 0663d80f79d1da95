"""The aiologger log backend: aiologger 0.7.0 behind the same ``Log`` protocol.

aiologger is an optional extra: this module imports it, and :func:`worker.logs.open_log` imports
this module only when that backend is chosen (aiologger also reads the environment when
imported, which must not happen when the worker is imported).

Contract: :class:`AioLog` is a :class:`worker.logs.core.Backend` writing the same bytes as
:class:`worker.logs.stdlib.StdlibLog`. Each record is an aiologger task. Its traps are handled
here: pending tasks are tracked and awaited in ``aclose`` (``shutdown()`` does not wait for
them); lines go through our own handler that writes from one worker thread (aiologger's stream
handler fails on a regular file, and its ``shutdown()`` closes stdout).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiologger import Logger
from aiologger.records import LogRecord

from worker.logs.core import Backend, Clock, LineWriter, Stream, report
from worker.logs.records import Level, dumps_line


class _AioLineHandler:
    """Quacks like an aiologger ``Handler``: buffers lines and writes them from one thread.

    aiologger's own stream handler cannot write to a regular file and closes the stream on
    shutdown; this one works for any stream and never closes it.
    """

    level = 0  # aiologger compares each record's level with it; ours are filtered earlier
    initialized = True

    def __init__(self, writer: LineWriter, executor: ThreadPoolExecutor) -> None:
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
            report(f"log writer failed: {failure!r}")
        finally:
            self._flusher = None


class AioLog(Backend):
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
        self._closed = False

    async def _start(self) -> None:
        if self._loop is not None:
            return
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="biot-log")
        self._logger = Logger(name="biot-worker")
        self._handler = _AioLineHandler(self._writer, self._executor)
        self._logger.add_handler(self._handler)
        self._loop = asyncio.get_running_loop()

    def _write_record(self, level: Level, record: dict[str, Any]) -> None:
        line = dumps_line(record)
        if self._closed or self._loop is None or not self._in_loop():
            self._writer.write([line])
            return
        log_record = LogRecord(
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

    async def flush(self) -> None:
        """Return once every line logged so far is written to the stream."""
        if self._handler is not None and not self._closed:
            await self._drain(self._handler)

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
