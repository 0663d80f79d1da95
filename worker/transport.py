"""One HTTP exchange with BioT, and the translation of its outcome into :mod:`worker.errors`.

Contract: :func:`exchange` sends one request with exactly the headers it is given (never
following a redirect), reads the body within ``limit`` seconds and returns a :class:`Reply`
whatever the status; aiohttp failures come out as :class:`TransientApiError` (timeouts,
connection failures) or :class:`ApiError` (a malformed URL), never as aiohttp's own.
:func:`error_for` and :func:`decode` turn a reply into the typed error or the decoded JSON.
The helpers that build a request (:func:`join_url`, :func:`encode_params`) and read one
(:func:`parse_retry_after`, :func:`public_url`) live here too. Nothing here retries.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Final

import aiohttp
import orjson
from yarl import URL

from worker.errors import ApiAuthError, ApiError, TransientApiError

RETRYABLE_STATUSES: Final = frozenset({429, 502, 503, 504})
JSON_CONTENT_TYPE: Final = "application/json; charset=utf-8"
_UNBOUNDED: Final = aiohttp.ClientTimeout()  # per request: our asyncio.timeout is the bound
_TEXT_LIMIT: Final = 500


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    raw: bytes


async def exchange(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str],
    limit: float,
    params: list[tuple[str, str]] | None = None,
    body: bytes | None = None,
) -> Reply:
    """One request with its body read, within ``limit`` seconds; aiohttp failures translated.

    Timeouts and connection failures raise :class:`TransientApiError`, a malformed URL
    :class:`ApiError`. HTTP error statuses are returned, not raised.
    """
    where = public_url(url)
    try:
        async with asyncio.timeout(limit):
            async with session.request(
                method, url, params=params, data=body, headers=headers,
                timeout=_UNBOUNDED, allow_redirects=False,  # the token never follows a redirect
            ) as response:
                return Reply(response.status, response.headers, await response.read())
    except TimeoutError:
        message = f"no answer within {limit:.3g}s"
        raise TransientApiError(message, method=method, url=where) from None
    except aiohttp.InvalidURL as exc:
        raise ApiError("invalid URL", method=method, url=where) from exc
    except aiohttp.ClientError as exc:
        message = f"connection failed ({type(exc).__name__})"
        raise TransientApiError(message, method=method, url=where) from exc


def public_url(url: str) -> str:
    """``url`` without its query string, which may carry search terms or secrets."""
    return url.split("?", 1)[0]


def join_url(base_url: str, path: str) -> str:
    """``path`` under ``base_url``; a full URL is accepted only on the same origin.

    Raises ``ValueError`` for another origin, so the service token never leaves for it.
    """
    if not path.startswith(("http://", "https://")):
        return base_url.rstrip("/") + "/" + path.lstrip("/")
    if URL(path).origin() != URL(base_url).origin():
        raise ValueError(f"refusing to call {public_url(path)}: not under {base_url}")
    return path


def error_body(raw: bytes) -> Any:
    """BioT's ``ErrorResponse`` when the body is JSON, else its text cut to a readable size."""
    try:
        return orjson.loads(raw) if raw.strip() else None
    except orjson.JSONDecodeError:
        return raw[:_TEXT_LIMIT].decode("utf-8", "replace")


def error_for(reply: Reply, method: str, url: str) -> ApiError:
    """The typed error for a non-2xx reply; transient ones carry ``details["retryAfter"]``."""
    body = error_body(reply.raw)
    code = body.get("code") if isinstance(body, dict) else None
    url = public_url(url)
    message = f"BioT answered {reply.status}{f' {code}' if code else ''} to {method} {url}"
    kind = _error_kind(reply.status)
    error = kind(message, status=reply.status, method=method, url=url, body=body)
    wait = parse_retry_after(reply.headers.get("Retry-After"))
    if kind is TransientApiError and wait is not None:
        error.details["retryAfter"] = wait
    return error


def _error_kind(status: int) -> type[ApiError]:
    if status in RETRYABLE_STATUSES:
        return TransientApiError
    if status in (401, 403):
        return ApiAuthError
    return ApiError


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date), or ``None``."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def decode(reply: Reply, method: str, url: str) -> Any:
    """The decoded JSON of a 2xx reply; ``None`` for 204 or an empty body."""
    if reply.status == 204 or not reply.raw.strip():
        return None
    try:
        return orjson.loads(reply.raw)
    except orjson.JSONDecodeError:
        message = f"BioT answered {reply.status} to {method} with a body that is not JSON"
        body = reply.raw[:_TEXT_LIMIT].decode("utf-8", "replace")
        raise ApiError(message, status=reply.status, method=method, url=public_url(url),
                       body=body) from None


def encode_params(params: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """Query pairs: lists and tuples repeat the key, ``None`` is left out, booleans are
    ``true``/``false``, and dicts (BioT's ``searchRequest``) are JSON-encoded with orjson."""
    pairs: list[tuple[str, str]] = []
    for key, value in (params or {}).items():
        values = value if isinstance(value, list | tuple) else (value,)
        pairs.extend((key, _param_text(item)) for item in values if item is not None)
    return pairs


def _param_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return orjson.dumps(value).decode()
