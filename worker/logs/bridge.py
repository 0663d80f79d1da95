"""Other libraries' stdlib log records (aiohttp, asyncio) as our JSON lines.

Without this, aiohttp's server logger prints a plain-text traceback to stderr for every
malformed request a caller sends. :func:`bridge_stdlib_logging` attaches one handler to the root
logger that forwards records into the worker's :class:`~worker.logs.Log` (so they are JSON,
redacted and carry the trace id), and removes it on exit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

from worker.logs.core import Log
from worker.logs.records import redact


class LogBridge(logging.Handler):
    def __init__(self, log: Log) -> None:
        super().__init__()
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._forward(record)
        except Exception:  # a log record must never break the caller
            self.handleError(record)

    def _forward(self, record: logging.LogRecord) -> None:
        fields: dict[str, Any] = {"logger": record.name}
        error = record.exc_info[1] if record.exc_info else None
        level = record.levelno
        message = record.getMessage()
        if isinstance(error, HttpProcessingError):
            # A caller sent malformed HTTP; aiohttp already answered 400. Not our error.
            level, message = logging.WARNING, "malformed HTTP request refused"
            fields["error"] = {"type": type(error).__name__, "message": error.message}
        elif error is not None:
            fields["error"] = {"type": type(error).__name__, "message": str(error)}
        self._emit(level, message, fields)

    def _emit(self, level: int, message: str, fields: dict[str, Any]) -> None:
        if level >= logging.ERROR:
            self._log.error(message, **fields)
        elif level >= logging.WARNING:
            self._log.warning(message, **fields)
        elif level >= logging.INFO:
            self._log.info(message, **fields)
        else:
            self._log.debug(message, **fields)


@contextmanager
def bridge_stdlib_logging(log: Log, level: int = logging.WARNING) -> Iterator[LogBridge]:
    """Forward stdlib records at ``level`` and above into ``log`` while the block runs."""
    root = logging.getLogger()
    bridge = LogBridge(log)
    bridge.setLevel(level)
    previous = root.level
    root.addHandler(bridge)
    root.setLevel(min(previous, level) if previous else level)
    try:
        yield bridge
    finally:
        root.removeHandler(bridge)
        root.setLevel(previous)


class LoggerLog:
    """A :class:`~worker.logs.Log` over a stdlib logger: the default of components used without
    the worker's log (a library user building a ``JwtVerifier`` alone, say). Fields go into the
    message text, redacted, so they cannot collide with ``LogRecord`` attributes."""

    def __init__(self, name: str, **bound: Any) -> None:
        self._logger = logging.getLogger(name)
        self._bound = bound

    def _log(self, level: int, message: str, fields: dict[str, Any], exc: bool = False) -> None:
        if not self._logger.isEnabledFor(level):
            return
        merged = redact({**self._bound, **fields})
        self._logger.log(level, "%s %s" if merged else "%s", message, merged, exc_info=exc)

    def debug(self, message: str, /, **fields: Any) -> None:
        self._log(logging.DEBUG, message, fields)

    def info(self, message: str, /, **fields: Any) -> None:
        self._log(logging.INFO, message, fields)

    def warning(self, message: str, /, **fields: Any) -> None:
        self._log(logging.WARNING, message, fields)

    def error(self, message: str, /, **fields: Any) -> None:
        self._log(logging.ERROR, message, fields)

    def exception(self, message: str, /, **fields: Any) -> None:
        self._log(logging.ERROR, message, fields, exc=True)

    def bind(self, **fields: Any) -> Log:
        return LoggerLog(self._logger.name, **self._bound, **fields)
