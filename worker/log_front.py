"""The ``Log`` protocol and the front end every log shares: level check, record, ``bind``.

Contract: :class:`BoundLog` implements :class:`Log` over a :class:`Sink`. A call below the
threshold costs one comparison; otherwise the record is built by :mod:`worker.log_records`
(redacted, BioT's shape) and handed to the sink. A logging call never raises: a record that
cannot be built is replaced by a fallback record naming the failure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from worker.log_records import (
    DEBUG,
    ERROR,
    INFO,
    WARN,
    Level,
    add_fields,
    error_field,
    fallback_record,
    make_record,
)

Clock = Callable[[], float]


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
            record = make_record(
                level, message, self._app_name, self._clock(), self._bound, fields
            )
        except Exception as failure:
            record = fallback_record(level, self._app_name, failure)
        self._sink._write_record(level, record)
