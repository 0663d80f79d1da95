"""The BioT API client: authenticated, traced, retried calls on the one pooled session
(platform §4, §5, §8).

Contract of every outgoing call made here:

- headers are set explicitly per request (never through session defaults, middlewares or trace
  configs, which ``aioresponses`` bypasses): ``Authorization`` with the service token,
  ``traceparent`` as a child span of the current trace, ``User-Agent``, ``Accept``, and
  ``Content-Type`` only when there is a body;
- each attempt is bounded by its timeout and by what is left of the event's deadline;
- transient failures of idempotent calls are retried with jittered backoff; a 401 refreshes the
  token once; everything else raises an error from :mod:`worker.errors`, never an aiohttp one.

Seams for the composition root: ``worker.tokens.ServiceTokens`` satisfies :class:`TokenSource`.

The rest of the client's public API lives in one module per concept and is re-exported here:
:mod:`worker.http_session` (the session and its TLS context), :mod:`worker.transport` (one
exchange, error translation, URL and query encoding), :mod:`worker.fan_out` (:func:`fan_out`)
and :mod:`worker.platform_api` (:func:`service_login`, :func:`fetch_public_key_texts`).
"""

from __future__ import annotations

import asyncio
import random as _random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

import aiohttp
import orjson
from multidict import CIMultiDict

from worker.errors import ApiAuthError, ApiError, TransientApiError
from worker.fan_out import fan_out
from worker.http_session import (
    DEFAULT_USER_AGENT,
    SESSION_TIMEOUT,
    create_session,
    make_ssl_context,
    open_session,
)
from worker.platform_api import LOGIN_PATH, PUBLIC_KEY_PATH, fetch_public_key_texts, service_login
from worker.tracing import TraceContext, current_trace, new_trace, remaining
from worker.transport import (
    JSON_CONTENT_TYPE,
    RETRYABLE_STATUSES,
    Reply,
    decode,
    encode_params,
    error_for,
    exchange,
    join_url,
    parse_retry_after,
    public_url,
)

__all__ = [  # what moved out is re-exported: importers of worker.client keep working
    "DEFAULT_USER_AGENT", "IDEMPOTENT_METHODS", "JSON_CONTENT_TYPE", "LOGIN_PATH",
    "PUBLIC_KEY_PATH", "RETRYABLE_STATUSES", "SESSION_TIMEOUT", "BiotClient", "ClientLog",
    "TokenSource", "create_session", "encode_params", "fan_out", "fetch_public_key_texts",
    "join_url", "make_ssl_context", "open_session", "parse_retry_after", "public_url",
    "service_login",
]  # fmt: skip

IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


class TokenSource(Protocol):
    """Where the service token comes from (``worker.tokens.ServiceTokens``)."""

    async def get(self) -> str: ...

    def invalidate(self, token: str) -> None: ...


class ClientLog(Protocol):
    """The part of ``worker.logs.Log`` the client uses."""

    def debug(self, message: str, /, **fields: Any) -> None: ...

    def warning(self, message: str, /, **fields: Any) -> None: ...


class _SilentLog:
    def debug(self, message: str, /, **fields: Any) -> None:
        pass

    def warning(self, message: str, /, **fields: Any) -> None:
        pass


@dataclass(frozen=True, slots=True)
class _Call:
    method: str
    url: str
    params: list[tuple[str, str]]
    body: bytes | None
    headers: Mapping[str, str]
    allow_interception: bool
    timeout: float
    trace: TraceContext


class BiotClient:
    """Calls BioT's API with the service token and the current trace; see the module contract.

    Retry policy, for idempotent methods only (``GET HEAD OPTIONS PUT DELETE``): connection
    errors, timeouts and 429/502/503/504 are retried up to ``retries`` extra times after
    ``min(backoff_max, backoff_base * 2**attempt) * (0.5 + random() / 2)`` seconds ("equal
    jitter"), or after ``Retry-After`` when BioT asks for longer. A wait that would not end
    before the event's deadline (or, with no deadline, a ``Retry-After`` longer than the
    per-attempt timeout) is not started: the last error is raised at once. POST and PATCH are
    never retried on those, since BioT may have acted on them. A 401, for any method, drops
    the token and retries once with a fresh one; a second 401 raises :class:`ApiAuthError`.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        tokens: TokenSource,
        *,
        timeout: float = 10.0,
        retries: int = 3,
        backoff_base: float = 0.05,
        backoff_max: float = 1.0,
        user_agent: str = DEFAULT_USER_AGENT,
        log: ClientLog | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._tokens = tokens
        self._timeout = timeout
        self._retries = retries
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._user_agent = user_agent
        self._log: ClientLog = log if log is not None else _SilentLog()
        self._sleep = sleep
        self._random = random

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        allow_interception: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 - a per-call bound, merged with the deadline
    ) -> Any:
        """Send one call and return its decoded JSON (``None`` for 204 or an empty body).

        ``json=None`` sends no body. ``path`` is joined to the base URL (a full URL must be on
        the same origin). Caller ``headers`` go on top of ours, except ``Authorization``.
        Raises :class:`TransientApiError`, :class:`ApiAuthError` or :class:`ApiError`.
        """
        call = _Call(
            method=method.upper(),
            url=join_url(self._base_url, path),
            params=encode_params(params),
            body=None if json is None else orjson.dumps(json),
            headers=headers or {},
            allow_interception=allow_interception,
            timeout=self._timeout if timeout is None else timeout,
            trace=current_trace.get() or new_trace(),
        )
        reply = await self._send(call)
        return decode(reply, call.method, call.url)

    async def get(self, path: str, **kw: Any) -> Any:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, **kw: Any) -> Any:
        return await self.request("POST", path, **kw)

    async def put(self, path: str, **kw: Any) -> Any:
        return await self.request("PUT", path, **kw)

    async def patch(self, path: str, **kw: Any) -> Any:
        return await self.request("PATCH", path, **kw)

    async def delete(self, path: str, **kw: Any) -> Any:
        return await self.request("DELETE", path, **kw)

    async def search(
        self,
        path: str,
        *,
        filter: Mapping[str, Any] | None = None,
        sort: list[Mapping[str, Any]] | None = None,
        page: int = 0,
        limit: int = 30,
        free_text: str | None = None,
        **kw: Any,
    ) -> dict[str, Any]:
        """``GET path?searchRequest=<JSON>``; returns ``{data, metadata: {page: {...}}}``.

        Raises :class:`ApiError` when the answer is not a JSON object.
        """
        search_request: dict[str, Any] = {"filter": dict(filter or {}), "page": page,
                                          "limit": limit}
        if sort:
            search_request["sort"] = [dict(item) for item in sort]
        if free_text:
            search_request["freeTextSearch"] = free_text
        params = {**(kw.pop("params", None) or {}), "searchRequest": search_request}
        answer = await self.request("GET", path, params=params, **kw)
        if not isinstance(answer, dict):
            raise ApiError("search answer is not a JSON object", method="GET",
                           url=public_url(join_url(self._base_url, path)))
        return answer

    async def iter_search(
        self,
        path: str,
        *,
        filter: Mapping[str, Any] | None = None,
        sort: list[Mapping[str, Any]] | None = None,
        limit: int = 30,
        max_pages: int | None = None,
        **kw: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        """Every entity across pages, in order; stops at an empty page, when ``totalResults``
        is covered, or after ``max_pages`` pages."""
        page = 0
        while max_pages is None or page < max_pages:
            answer = await self.search(path, filter=filter, sort=sort, page=page, limit=limit,
                                       **kw)
            data = answer.get("data") or []
            for entity in data:
                yield entity
            if not data or _is_last_page(answer, page, limit, len(data)):
                return
            page += 1

    async def _send(self, call: _Call) -> Reply:
        """Attempts until a 2xx, applying the 401 refresh and the retry policy."""
        attempt = 0
        refreshed = False
        while True:
            token = await self._tokens.get()
            try:
                return await self._attempt(call, token)
            except ApiAuthError as error:
                if refreshed or error.upstream_status != 401:
                    raise
                self._log.debug("service token refused; retrying with a fresh one",
                                method=call.method, url=public_url(call.url))
                self._tokens.invalidate(token)
                refreshed = True
            except TransientApiError as error:
                await self._backoff(call, attempt, error)
                attempt += 1

    async def _attempt(self, call: _Call, token: str) -> Reply:
        left = remaining()
        if left is not None and left <= 0:
            raise TransientApiError("deadline exceeded before call", method=call.method,
                                    url=public_url(call.url))
        limit = call.timeout if left is None else min(call.timeout, left)
        reply = await exchange(
            self._session, call.method, call.url, headers=self._headers(call, token),
            limit=limit, params=call.params, body=call.body,
        )
        if reply.status >= 300:
            raise error_for(reply, call.method, call.url)
        return reply

    def _headers(self, call: _Call, token: str) -> CIMultiDict[str]:
        headers = CIMultiDict(
            {
                "User-Agent": self._user_agent,
                "Accept": "application/json",
                "traceparent": call.trace.child().traceparent,  # a new span per attempt
            }
        )
        if call.body is not None:
            headers["Content-Type"] = JSON_CONTENT_TYPE
        if call.allow_interception:
            headers["allow-interception"] = "1"
        headers.update(call.headers)
        headers["Authorization"] = f"Bearer {token}"
        return headers

    async def _backoff(self, call: _Call, attempt: int, error: TransientApiError) -> None:
        """Sleep before the next attempt, or re-raise ``error`` when none may be made."""
        if call.method not in IDEMPOTENT_METHODS or attempt >= self._retries:
            raise error
        delay = self._delay(attempt, error.details.get("retryAfter"))
        left = remaining()
        if delay >= (call.timeout if left is None else left):
            raise error
        self._log.warning("retrying BioT call", method=call.method, url=public_url(call.url),
                          status=error.upstream_status, attempt=attempt + 1, delay=delay)
        await self._sleep(delay)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        backoff = min(self._backoff_max, self._backoff_base * 2.0**attempt)
        jittered = backoff * (0.5 + self._random() / 2)
        return jittered if retry_after is None else max(jittered, retry_after)


def _is_last_page(answer: Mapping[str, Any], page: int, limit: int, count: int) -> bool:
    metadata = answer.get("metadata")
    page_info = metadata.get("page") if isinstance(metadata, dict) else None
    total = page_info.get("totalResults") if isinstance(page_info, dict) else None
    if isinstance(total, int):
        return total <= (page + 1) * limit
    return count < limit  # no total given: a short page is the last one

