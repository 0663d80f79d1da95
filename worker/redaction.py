"""Redaction: keep JWTs, bearer tokens, secret keys and passwords out of what is logged.

Contract: :func:`redact` returns a copy of any value with secrets replaced by
:data:`REDACTED` and never modifies its argument. A secret is recognised by the key it is
stored under (:func:`is_secret_key`) or by its look inside a string (:func:`redact_text`).
Nothing here raises on ordinary values or does I/O; the key verdicts are memoised (bounded).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

REDACTED: Final = "[REDACTED]"


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
# Values of these exact types are never secret-bearing: callers may skip redact() for them.
PLAIN_TYPES: Final = frozenset({int, float, bool, type(None)})
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
    if kind in PLAIN_TYPES:
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
