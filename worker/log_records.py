"""One log record: BioT's levels, the record's fields in BioT's order, and its JSON line.

Contract: :func:`make_record` builds the dict a backend writes (``@timestamp`` in UTC with
milliseconds and ``Z``, ``message``, ``level``, ``level_value``, ``appName``, ``traceId`` read
from :data:`worker.tracing.current_trace`, then the caller's fields), every part of it
redacted by :mod:`worker.redaction`; a caller field may not overwrite one of those six.
:func:`dumps_line` turns a record into one JSON line ending in ``\\n`` and never raises.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Final, NamedTuple

import orjson

from worker.redaction import PLAIN_TYPES, REDACTED, is_secret_key, redact, redact_text
from worker.tracing import current_trace_id

# ---------------------------------------------------------------------------------------------
# Levels


class Level(NamedTuple):
    name: str  # BioT's level name
    value: int  # BioT's level_value (the platform seeds' table)
    number: int  # the stdlib level number, used for thresholds


DEBUG: Final = Level("DEBUG", 10000, logging.DEBUG)
INFO: Final = Level("INFO", 30000, logging.INFO)
WARN: Final = Level("WARN", 40000, logging.WARNING)
ERROR: Final = Level("ERROR", 50000, logging.ERROR)
_THRESHOLDS: Final = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "WARN": 30, "ERROR": 40}


def threshold(level: str) -> int:
    """The stdlib number of a level name (case-insensitive); ``ValueError`` if unknown."""
    try:
        return _THRESHOLDS[level.upper()]
    except KeyError:
        raise ValueError(
            f"unknown log level {level!r}: use DEBUG, INFO, WARNING or ERROR"
        ) from None


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


def add_fields(record: dict[str, Any], fields: Mapping[str, Any]) -> None:
    """Add caller fields to ``record``, redacted; plain values take the short path (most do)."""
    for key, value in fields.items():
        if key in _CORE:  # a caller field may not forge a trace id or a level: renamed instead
            key = "fields." + key
        kind = type(value)
        if is_secret_key(key):
            value = REDACTED
        elif kind is str:
            value = redact_text(value)
        elif kind not in PLAIN_TYPES:
            value = redact(value)
        record[key] = value


def make_record(
    level: Level, message: str, app_name: str | None, now: float, bound: dict[str, Any],
    fields: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """The record in BioT's field order; ``bound`` is already redacted, ``fields`` are not."""
    record = {
        "@timestamp": _timestamp(now),
        "message": redact_text(message if type(message) is str else str(message)),
        "level": level.name,
        "level_value": level.value,
        "appName": app_name,
        "traceId": current_trace_id(),
    }
    if bound:
        record.update(bound)
    add_fields(record, fields)
    return record


def fallback_record(level: Level, app_name: str | None, failure: Exception) -> dict[str, Any]:
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


def error_field() -> dict[str, Any] | None:
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


# ---------------------------------------------------------------------------------------------
# JSON lines


_OPTIONS: Final = (
    orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS
)


def _default(value: Any) -> str:
    # Dataclasses come here too (passthrough) so that their repr=False fields stay out.
    return redact_text(_safe_str(value))


def dumps_line(record: dict[str, Any]) -> bytes:
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
