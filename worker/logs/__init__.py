"""Structured logging in BioT's JSON shape, with redaction and two backends.

Every record is ONE JSON object on ONE line::

    {"@timestamp": "2026-11-23T01:48:14.123Z", "message": "event handled", "level": "INFO",
     "level_value": 30000, "appName": "my-plugin", "traceId": "4bf9...", "hook": "PRE", ...}

``traceId`` is read from :data:`worker.tracing.current_trace` when the call is made (``null``
when no trace is bound). Every record, including its message, goes through :func:`redact`, so
no JWT, bearer token, secret key or password reaches the output. A logging call never raises.

This package's surface is here: :func:`open_log` picks a backend, :class:`CapturingLog` keeps
the records as dicts, for tests. Inside it:

- :mod:`worker.logs.records`: levels, redaction, the record in BioT's field order, its JSON line;
- :mod:`worker.logs.core`: the :class:`Log` protocol, the front end every log shares
  (:class:`BoundLog`), and the real backends' stream writer and lifecycle (:class:`Backend`);
- :mod:`worker.logs.stdlib`: :class:`StdlibLog`, the default (queue and listener thread);
- :mod:`worker.logs.aio`: ``AioLog``, aiologger behind the same protocol; an optional extra,
  imported only by :func:`open_log` when it is chosen;
- :mod:`worker.logs.bridge`: other libraries' stdlib log records into a :class:`Log`, and
  :class:`LoggerLog`, a :class:`Log` over a stdlib logger;
- :mod:`worker.logs.throttle`: :class:`Throttle`, at most one line a second for a repeating
  fault, and :func:`describe`, an error as ``Type: message``.

Backends write the same bytes; both are async context managers with an idempotent
``aclose()`` that flushes every record logged before it, and neither ever closes the stream.
"""

from __future__ import annotations

import time
from typing import Any, Final

from config.settings import SettingsError
from worker.logs.bridge import LoggerLog, bridge_stdlib_logging
from worker.logs.core import Backend, BoundLog, Clock, Log, Stream
from worker.logs.records import REDACTED, Level, redact, threshold
from worker.logs.stdlib import StdlibLog
from worker.logs.throttle import Throttle, describe

__all__ = [
    "REDACTED",
    "Backend",
    "BoundLog",
    "CapturingLog",
    "Clock",
    "Level",
    "Log",
    "LoggerLog",
    "StdlibLog",
    "Stream",
    "Throttle",
    "bridge_stdlib_logging",
    "describe",
    "open_log",
    "redact",
]


class CapturingLog(BoundLog):
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
        super().__init__(self, app_name, threshold(level), clock, {})
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

    def _write_record(self, level: Level, record: dict[str, Any]) -> None:
        self.records.append(record)


_MISSING: Final = object()


def open_log(
    backend: str, *, app_name: str | None, level: str = "INFO", stream: Stream | None = None
) -> Backend:
    """The backend named ``"stdlib"`` or ``"aiologger"``, not yet entered: use it as
    ``async with open_log(...) as log``.

    An unknown name or level raises ``ValueError``; ``"aiologger"`` when aiologger is not
    installed raises :class:`config.settings.SettingsError` saying how to install it.
    """
    if backend == "stdlib":
        return StdlibLog(app_name=app_name, level=level, stream=stream)
    if backend == "aiologger":
        return _open_aio_log(app_name=app_name, level=level, stream=stream)
    raise ValueError(f"unknown log backend {backend!r}: use 'stdlib' or 'aiologger'")


_AIOLOGGER_MISSING: Final = (
    "WORKER_LOG_BACKEND: aiologger is not installed (pip install 'biot-worker[aiologger]')"
)


def _open_aio_log(*, app_name: str | None, level: str, stream: Stream | None) -> Backend:
    try:
        from worker.logs.aio import AioLog  # an optional extra: imported only when chosen
    except ModuleNotFoundError as missing:
        if (missing.name or "").partition(".")[0] != "aiologger":
            raise
        raise SettingsError([_AIOLOGGER_MISSING]) from None
    return AioLog(app_name=app_name, level=level, stream=stream)
