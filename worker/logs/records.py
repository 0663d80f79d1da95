"""One log record: BioT's levels, redaction, the record's fields in BioT's order, its JSON line.

Contract:

- :func:`redact` returns a copy of any value with secrets replaced by :data:`REDACTED` and never
  modifies its argument. A secret is recognised by the key it is stored under
  (:func:`is_secret_key`) or by its look inside a string (:func:`redact_text`). Nothing here
  raises on ordinary values or does I/O; the key verdicts are memoised (bounded).
- :func:`make_record` builds the dict a backend writes (``@timestamp`` in UTC with milliseconds
  and ``Z``, ``message``, ``level``, ``level_value``, ``appName``, ``traceId`` read from
  :data:`worker.tracing.current_trace`, then the caller's fields), every part of it redacted; a
  caller field may not overwrite one of those six.
- :func:`dumps_line` turns a record into one JSON line ending in ``\\n`` and never raises.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import traceback
from collections.abc import Mapping
from typing import Any, Final, NamedTuple

import orjson

from worker.tracing import current_span_id, current_trace, current_trace_id

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
# Redaction: keep JWTs, bearer tokens, secret keys and passwords out of what is logged


REDACTED: Final = "[REDACTED]"


def _normalise_key(key: str) -> str:
    return key.lower().replace("-", "").replace("_", "")


# Matched after lower-casing and dropping "-" and "_": "secretKey", "secret_key" and "SECRET-KEY"
# are one key. Beyond BioT's four (authorization, jwt, secretKey, accessToken), the others carry
# credentials just the same.
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
# Values of these exact types are never secret-bearing: callers may skip redact() for them.
_PLAIN_TYPES: Final = frozenset({int, float, bool, type(None)})
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
        return redact_text(value)
    if kind in _PLAIN_TYPES:
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
        return redact_text(str.__str__(value))
    return value


def _redact_entry(key: Any, value: Any, depth: int) -> Any:
    return REDACTED if is_secret_key(key) else _redact(value, depth)


def is_secret_key(key: Any) -> bool:
    """Whether a value stored under ``key`` is a secret (see :func:`redact` for the names)."""
    verdict = _KEY_VERDICTS.get(key)
    if verdict is None:
        verdict = isinstance(key, str) and _normalise_key(key) in _SECRET_KEYS
        if len(_KEY_VERDICTS) < _KEY_VERDICTS_MAX:
            _KEY_VERDICTS[key] = verdict
    return verdict


def redact_text(text: str) -> str:
    """``text`` with JWT-looking substrings and bearer credentials replaced (see :func:`redact`)."""
    # The cheap test spares the regex on nearly every string; "bearer" needs its case folded.
    if "eyJ" not in text and "bearer" not in text.lower():
        return text
    return _SECRET_TEXT.sub(r"\g<scheme>[REDACTED]", text)


# ---------------------------------------------------------------------------------------------
# Records


_CORE: Final = frozenset(
    {"@timestamp", "message", "level", "level_value", "appName", "traceId", "spanId"}
)


def _second(epoch_second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_second))


_MILLISECONDS: Final = tuple(f".{n:03d}Z" for n in range(1000))
# The seconds part of the last timestamp, replaced whole (another thread may log too).
_last_second: tuple[int, str] = (0, _second(0))


def _timestamp(now: float) -> str:
    """UTC, milliseconds, literal ``Z``; the seconds part is cached (logs come many a second)."""
    global _last_second
    # Rounded to the microsecond first, as datetime does, then truncated to the millisecond.
    second, millisecond = divmod(round(now * 1_000_000) // 1000, 1000)
    cached = _last_second
    if cached[0] != second:
        cached = _last_second = (second, _second(second))
    return cached[1] + _MILLISECONDS[millisecond]


# Messages that redact_text leaves as they are: a message is nearly always a constant, so each is
# checked once (bounded; only clean ones are kept, so the memo holds no secret).
_CLEAN_MESSAGES: set[str] = set()
_CLEAN_MESSAGES_MAX: Final = 4096


def _message(message: object) -> str:
    text = message if type(message) is str else str(message)
    if text in _CLEAN_MESSAGES:
        return text
    redacted = redact_text(text)
    if redacted is text and len(_CLEAN_MESSAGES) < _CLEAN_MESSAGES_MAX:
        _CLEAN_MESSAGES.add(text)
    return redacted


def add_fields(record: dict[str, Any], fields: Mapping[str, Any]) -> None:
    """Add caller fields to ``record``, redacted; plain values take the short path (most do)."""
    verdicts = _KEY_VERDICTS
    for key, value in fields.items():
        if key in _CORE:  # a caller field may not forge a trace id or a level: renamed instead
            key = "fields." + key
        secret = verdicts.get(key)
        if secret is None:
            secret = is_secret_key(key)
        if secret:
            value = REDACTED
        else:
            kind = type(value)
            if kind is str:
                value = redact_text(value)
            elif kind not in _PLAIN_TYPES:
                value = redact(value)
        record[key] = value


def make_record(
    level: Level, message: str, app_name: str | None, now: float, bound: dict[str, Any],
    fields: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """The record in BioT's field order; ``bound`` is already redacted, ``fields`` are not."""
    trace = current_trace.get()
    record = {
        "@timestamp": _timestamp(now),
        "message": _message(message),
        "level": level.name,
        "level_value": level.value,
        "appName": app_name,
        "traceId": None if trace is None else trace.trace_id,
    }
    span_id = current_span_id.get()
    if span_id is not None:  # bound only while spans are exported (worker.otel)
        record["spanId"] = span_id
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
    """One JSON line ending in ``\\n``; never raises.

    A field JSON cannot hold (an int beyond 64 bits, a tuple as a dict key) becomes its ``str``;
    text UTF-8 cannot hold (a lone surrogate, as in a header decoded with ``surrogateescape``)
    is written escaped: the byte it stood for as ``\\xff``, another surrogate as ``\\udfff``.
    Only a record that fails pays for either.
    """
    try:
        return orjson.dumps(record, default=_default, option=_OPTIONS)
    except orjson.JSONEncodeError:
        return _dumps_repaired(record)


def _dumps_repaired(record: dict[str, Any]) -> bytes:
    # Each value now encodes alone and every key is a str (keyword arguments): the whole does too.
    repaired = {_utf8(key): _json_safe(value) for key, value in record.items()}
    return orjson.dumps(repaired, default=_default, option=_OPTIONS)


def _json_safe(value: Any) -> Any:
    """``value`` if JSON can hold it; else with its text made valid UTF-8; else its ``str``."""
    if _encodes(value):
        return value
    cleaned = _without_surrogates(value, _MAX_DEPTH)
    if _encodes(cleaned):
        return cleaned
    return _utf8(_default(value))


def _encodes(value: Any) -> bool:
    try:
        orjson.dumps(value, default=_default, option=_OPTIONS)
    except orjson.JSONEncodeError:
        return False
    return True


def _without_surrogates(value: Any, depth: int) -> Any:
    """``value`` with every string (dict keys too) made valid UTF-8, containers rebuilt."""
    if isinstance(value, str):
        return _utf8(value)
    if depth <= 0:
        return value
    if isinstance(value, dict):
        return {
            _without_surrogates(key, 0): _without_surrogates(item, depth - 1)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_without_surrogates(item, depth - 1) for item in value]
    return value


def _utf8(text: str) -> str:
    """``text`` with what UTF-8 cannot encode (lone surrogates) escaped, so a log line shows
    which bytes a client sent: ``surrogateescape``'s stand-ins as ``\\xNN``, others as
    ``\\uNNNN``."""
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the bytes a header really carried
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")
