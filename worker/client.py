"""The BioT client: the pooled session, authenticated and traced API calls, the two calls made
without a service token (service-user login, public key), and bounded fan-out.

Contract of every outgoing call made here:

- headers are set explicitly per request (never through session defaults, middlewares or trace
  configs, which ``aioresponses`` bypasses): ``User-Agent``, ``Accept``, ``traceparent`` as a
  new child span of the current trace (a fresh trace when none is bound), ``Content-Type`` only
  when there is a body, and for API calls ``Authorization`` with the service token, which never
  follows a redirect and never leaves for another origin than the base URL's;
- an API call attempt is bounded by its timeout and by what is left of the event's deadline; the
  login and the public-key fetch by their own timeout only, since one answer serves every event
  waiting on the cache, and they are never retried here (the cache decides);
- failures raise the :mod:`worker.errors` tree, never an aiohttp error:
  :class:`TransientApiError` for timeouts, connection failures and 429/502/503/504 (with
  ``details["retryAfter"]`` when BioT sent ``Retry-After``), :class:`ApiAuthError` for 401/403,
  :class:`ApiError` otherwise, :class:`LoginError` for the login; no error carries a query
  string, a token or the secret.

Retry policy of :class:`BiotClient`, for idempotent methods only (``GET HEAD OPTIONS PUT
DELETE``): transient failures are retried up to ``retries`` extra times after
``min(backoff_max, backoff_base * 2**attempt) * (0.5 + random() / 2)`` seconds ("equal jitter"),
or after ``Retry-After`` when BioT asks for longer. A wait that would not end before the event's
deadline (or, with no deadline, one longer than the per-attempt timeout) is not started: the
last error is raised at once. POST and PATCH are never retried on those, since BioT may have
acted on them. A 401, for any method, drops the token and retries once with a fresh one; a
second 401 raises :class:`ApiAuthError`.

Seams for the composition root: ``worker.tokens.ServiceTokens`` satisfies :class:`TokenSource`;
:func:`service_login` returns ``(accessToken, accessTokenExpiration)`` as text, to be wrapped as
``AccessToken(token, parse_expiration(text))``; :func:`fetch_public_key_texts` returns
``(publicKey, previousPublicKey)``, to be wrapped as ``PublicKeys(*texts)``. Handlers see the
client as :class:`BiotApi`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random as _random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol, TypedDict, TypeVar, Unpack

import aiohttp
import orjson
from multidict import CIMultiDict
from yarl import URL

from worker.errors import (
    ApiAuthError,
    ApiError,
    DeadlineExceeded,
    LoginError,
    TransientApiError,
)
from worker.tracing import (
    OWN_TIMERS,
    QueuedTimeout,
    Span,
    Spans,
    TimeoutQueue,
    TraceContext,
    current_trace,
    new_trace,
    remaining,
)

if TYPE_CHECKING:  # prometheus-client is imported only when metrics are on
    from worker.metrics import Metrics

__all__ = [
    "DEFAULT_USER_AGENT", "LOGIN_PATH", "PUBLIC_KEY_PATH", "BiotApi", "BiotClient", "BiotContact",
    "ClientLog",
    "RequestOptions", "TokenSource", "create_session", "fan_out", "fetch_public_key_texts",
    "make_ssl_context", "open_session", "parse_retry_after", "service_login",
]  # fmt: skip

DEFAULT_USER_AGENT: Final = "biot-worker/0.1.0"
LOGIN_PATH: Final = "/ums/v2/services/accessToken"
PUBLIC_KEY_PATH: Final = "/ums/v1/security/public-key"

_TIMEOUT: Final = 10.0  # seconds per attempt, login and public-key fetch unless told otherwise
_SHARED_TIMEOUTS: Final = 16  # distinct per-call timeouts given a shared timer queue each
# Backstop for code that uses the session directly; the calls here bound each attempt themselves.
_SESSION_TIMEOUT: Final = aiohttp.ClientTimeout(total=60.0, sock_connect=10.0)
_UNBOUNDED: Final = aiohttp.ClientTimeout()  # per request: our asyncio.timeout is the bound
_RETRYABLE_STATUSES: Final = frozenset({429, 502, 503, 504})
_IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_ACCEPT: Final = "application/json"
_JSON_CONTENT_TYPE: Final = "application/json; charset=utf-8"
_TEXT_LIMIT: Final = 500  # characters of a non-JSON body kept in an error

_T = TypeVar("_T")


# ---------------------------------------------------------------- seams


class RequestOptions(TypedDict, total=False):
    """The keyword options of every request method, as :meth:`BiotApi.request` defines them."""

    params: Mapping[str, Any] | None
    json: Any
    headers: Mapping[str, str] | None
    allow_interception: bool
    timeout: float | None


class BiotApi(Protocol):
    """What a handler calls on ``ctx.api``: BioT's API as the service user, in the event's trace."""

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
        """Send one call (``json=None``: no body); its JSON, ``None`` for 204, or an ApiError."""

    async def get(self, path: str, **options: Unpack[RequestOptions]) -> Any:
        """``request("GET", path)``: transient failures are retried."""

    async def post(self, path: str, **options: Unpack[RequestOptions]) -> Any:
        """``request("POST", path)``: transient failures are raised, never retried."""

    async def put(self, path: str, **options: Unpack[RequestOptions]) -> Any:
        """``request("PUT", path)``: transient failures are retried."""

    async def patch(self, path: str, **options: Unpack[RequestOptions]) -> Any:
        """``request("PATCH", path)``: transient failures are raised, never retried."""

    async def delete(self, path: str, **options: Unpack[RequestOptions]) -> Any:
        """``request("DELETE", path)``: transient failures are retried."""

    async def search(
        self,
        path: str,
        *,
        filter: Mapping[str, Any] | None = None,
        sort: list[Mapping[str, Any]] | None = None,
        page: int = 0,
        limit: int = 30,
        free_text: str | None = None,
        **options: Unpack[RequestOptions],
    ) -> dict[str, Any]:
        """One page of ``GET path?searchRequest=<JSON>``: ``{data, metadata}``, else ApiError."""

    def iter_search(
        self,
        path: str,
        *,
        filter: Mapping[str, Any] | None = None,
        sort: list[Mapping[str, Any]] | None = None,
        limit: int = 30,
        free_text: str | None = None,
        max_pages: int | None = None,
        **options: Unpack[RequestOptions],
    ) -> AsyncIterator[dict[str, Any]]:
        """Every entity of a search in order, one page fetched at a time, ``max_pages`` at most."""


class TokenSource(Protocol):
    """Where the service token comes from (``worker.tokens.ServiceTokens``)."""

    async def get(self) -> str:
        """A token valid now; may wait on the one login in flight."""

    def invalidate(self, token: str) -> None:
        """Forget ``token``, which BioT refused, so that the next ``get`` brings another."""


class ClientLog(Protocol):
    """The part of ``worker.logs.Log`` the client uses."""

    def debug(self, message: str, /, **fields: Any) -> None:
        """Log a routine event (a refused token being replaced)."""

    def warning(self, message: str, /, **fields: Any) -> None:
        """Log an event worth attention (a retried call)."""


class _SilentLog:
    def debug(self, message: str, /, **fields: Any) -> None:
        pass

    def warning(self, message: str, /, **fields: Any) -> None:
        pass


class BiotContact:
    """When BioT last answered a call of ours, for health probes: ``answered_at`` is the
    ``time.monotonic()`` of the last response received (any status; ``None``: none yet),
    ``logins`` and ``key_fetches`` count the service-user logins and public-key fetches tried.
    One is shared by the client, the login and the key fetch; recording an answer stores a float.
    """

    __slots__ = ("answered_at", "key_fetches", "logins")

    def __init__(self) -> None:
        self.answered_at: float | None = None
        self.logins = 0
        self.key_fetches = 0


# ---------------------------------------------------------------- API calls


class _Call(NamedTuple):
    method: str
    url: str
    params: list[tuple[str, str]]
    body: bytes | None
    headers: Mapping[str, str]
    allow_interception: bool
    timeout: float
    trace: TraceContext  # the event's, or a new one for a call made outside any event
    parent: TraceContext | None  # the event's (an exported span's parent)


class ApiMethods:
    """The verbs and the searches of :class:`BiotApi` on top of one ``request``: what the real
    client and a test's stand-in (``worker.testing.FakeApi``) share, so both page alike."""

    #: Pages :meth:`iter_search` may fetch before it stops with an error (``None``: no bound).
    _max_search_pages: int | None = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        allow_interception: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 - the signature of BiotApi.request
    ) -> Any:
        """See :meth:`BiotApi.request`."""
        raise NotImplementedError

    def _url_of(self, path: str) -> str:
        """How an error names the URL of ``path``."""
        return path

    async def get(self, path: str, **options: Unpack[RequestOptions]) -> Any:
        """See :meth:`BiotApi.get`."""
        return await self.request("GET", path, **options)

    async def post(self, path: str, **options: Unpack[RequestOptions]) -> Any:
        """See :meth:`BiotApi.post`."""
        return await self.request("POST", path, **options)

    async def put(self, path: str, **options: Unpack[RequestOptions]) -> Any:
        """See :meth:`BiotApi.put`."""
        return await self.request("PUT", path, **options)

    async def patch(self, path: str, **options: Unpack[RequestOptions]) -> Any:
        """See :meth:`BiotApi.patch`."""
        return await self.request("PATCH", path, **options)

    async def delete(self, path: str, **options: Unpack[RequestOptions]) -> Any:
        """See :meth:`BiotApi.delete`."""
        return await self.request("DELETE", path, **options)

    async def search(
        self,
        path: str,
        *,
        filter: Mapping[str, Any] | None = None,
        sort: list[Mapping[str, Any]] | None = None,
        page: int = 0,
        limit: int = 30,
        free_text: str | None = None,
        **options: Unpack[RequestOptions],
    ) -> dict[str, Any]:
        """See :meth:`BiotApi.search`; caller ``params`` are sent beside ``searchRequest``."""
        search_request: dict[str, Any] = {"filter": dict(filter or {}), "page": page,
                                          "limit": limit}
        if sort:
            search_request["sort"] = [dict(item) for item in sort]
        if free_text:
            search_request["freeTextSearch"] = free_text
        options["params"] = {**(options.get("params") or {}), "searchRequest": search_request}
        answer = await self.request("GET", path, **options)
        if not isinstance(answer, dict):
            raise ApiError("search answer is not a JSON object", method="GET",
                           url=self._url_of(path))
        return answer

    async def iter_search(
        self,
        path: str,
        *,
        filter: Mapping[str, Any] | None = None,
        sort: list[Mapping[str, Any]] | None = None,
        limit: int = 30,
        free_text: str | None = None,
        max_pages: int | None = None,
        **options: Unpack[RequestOptions],
    ) -> AsyncIterator[dict[str, Any]]:
        """See :meth:`BiotApi.iter_search`; stops at an empty page or once ``totalResults`` met."""
        page, bound = 0, self._max_search_pages
        while max_pages is None or page < max_pages:
            if bound is not None and page >= bound:
                name = type(self).__name__
                raise RuntimeError(f"{name}.iter_search({path}): more than {bound} pages")
            answer = await self.search(path, filter=filter, sort=sort, page=page, limit=limit,
                                       free_text=free_text, **options)
            data = answer.get("data") or []
            for entity in data:
                yield entity
            if not data or _is_last_page(answer, page, limit, len(data)):
                return
            page += 1


class BiotClient(ApiMethods):
    """Calls BioT's API with the service token, the current trace and the retry policy above."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        tokens: TokenSource,
        *,
        timeout: float = _TIMEOUT,
        retries: int = 3,
        backoff_base: float = 0.05,
        backoff_max: float = 1.0,
        user_agent: str = DEFAULT_USER_AGENT,
        log: ClientLog | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        random: Callable[[], float] = _random.random,
        contact: BiotContact | None = None,
        metrics: Metrics | None = None,
        spans: Spans | None = None,
    ) -> None:
        """``contact`` records when BioT last answered (see :class:`BiotContact`); ``metrics``
        counts and times each attempt; ``spans`` gives each attempt a client span, whose id
        the call's ``traceparent`` carries."""
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
        self._contact = contact
        self._metrics = metrics
        self._spans = spans
        self._fixed_timeouts: dict[float, TimeoutQueue] = {}
        self._deadline_timeouts = TimeoutQueue()

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
        """See :meth:`BiotApi.request`; ``path`` may be a full URL on the base URL's origin only."""
        parent = current_trace.get()
        call = _Call(
            method=method.upper(),
            url=_join_url(self._base_url, path),
            params=_encode_params(params),
            body=None if json is None else orjson.dumps(json),
            headers=headers or {},
            allow_interception=allow_interception,
            timeout=self._timeout if timeout is None else timeout,
            trace=parent or new_trace(),
            parent=parent,
        )
        reply = await self._send(call)
        return _decode(reply, call.method, call.url)

    def _url_of(self, path: str) -> str:
        return _public_url(_join_url(self._base_url, path))

    async def _send(self, call: _Call) -> _Reply:
        """Attempts until a 2xx, applying the 401 refresh and the retry policy."""
        attempt = 0
        refreshed = False
        while True:
            token = await self._tokens.get()
            try:
                return await self._attempt(call, token, attempt + refreshed + 1)
            except ApiAuthError as error:
                if refreshed or error.upstream_status != 401:
                    raise
                self._log.debug("service token refused; retrying with a fresh one",
                                method=call.method, url=_public_url(call.url))
                self._tokens.invalidate(token)
                refreshed = True
                if self._metrics is not None:
                    self._metrics.api_retry(call.method)
            except TransientApiError as error:
                await self._backoff(call, attempt, error)
                attempt += 1

    async def _attempt(self, call: _Call, token: str, number: int) -> _Reply:
        left = remaining()
        if left is not None and left <= 0:
            raise TransientApiError("deadline exceeded before call", method=call.method,
                                    url=_public_url(call.url))
        span = None
        if self._spans is not None:
            span = self._spans.call(call.method, _public_url(call.url), call.parent, number)
            traceparent = span.context.traceparent
        else:
            traceparent = call.trace.child().traceparent
        headers = _call_headers(call, self._user_agent, traceparent, token)
        limit = call.timeout if left is None else min(call.timeout, left)
        observed = span is not None or self._metrics is not None  # counted, or ended in a span
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            reply = await _exchange(self._session, call.method, call.url, headers, limit,
                                    params=call.params, body=call.body, contact=self._contact,
                                    timeouts=self._timeouts(call.timeout, limit))  # fmt: skip
        except BaseException as exc:  # no answer (or cancelled by the event's deadline)
            if observed:
                self._observe(call.method, None, loop.time() - started, span,
                              _cut_short(exc))  # fmt: skip
            raise
        error = _error_for(reply, call.method, call.url) if reply.status >= 300 else None
        if observed:
            self._observe(call.method, reply.status, loop.time() - started, span, error)
        if error is not None:
            raise error
        return reply

    def _timeouts(self, timeout: float, limit: float) -> TimeoutQueue:
        """The queue whose timer bounds a call: one per fixed timeout (such calls end in the
        order they start; for the first :data:`_SHARED_TIMEOUTS` values, then a timer per
        call), one for calls bounded by their event's deadline (in the order of their
        events)."""
        if limit < timeout:
            return self._deadline_timeouts
        queue = self._fixed_timeouts.get(timeout)
        if queue is None:
            if len(self._fixed_timeouts) >= _SHARED_TIMEOUTS:  # a plugin's computed timeouts
                return OWN_TIMERS
            queue = self._fixed_timeouts[timeout] = TimeoutQueue()
        return queue

    def _observe(
        self,
        method: str,
        status: int | None,
        seconds: float,
        span: Span | None,
        error: BaseException | None,
    ) -> None:
        if self._metrics is not None:
            self._metrics.api_request(method, status, seconds)
        _finish_span(span, status, error)

    async def _backoff(self, call: _Call, attempt: int, error: TransientApiError) -> None:
        """Sleep before the next attempt, or re-raise ``error`` when none may be made."""
        if call.method not in _IDEMPOTENT_METHODS or attempt >= self._retries:
            raise error
        delay = self._delay(attempt, error.details.get("retryAfter"))
        left = remaining()
        if delay >= (call.timeout if left is None else left):
            raise error
        self._log.warning("retrying BioT call", method=call.method, url=_public_url(call.url),
                          status=error.upstream_status, attempt=attempt + 1, delay=delay)
        if self._metrics is not None:
            self._metrics.api_retry(call.method)
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


# ---------------------------------------------------------------- calls without a service token


async def service_login(
    session: aiohttp.ClientSession,
    base_url: str,
    user_id: str,
    secret: str,
    *,
    timeout: float = _TIMEOUT,  # noqa: ASYNC109 - bounded on its own: one login serves every event
    user_agent: str = DEFAULT_USER_AGENT,
    contact: BiotContact | None = None,
    spans: Spans | None = None,
) -> tuple[str, str]:
    """``POST`` :data:`LOGIN_PATH` once: ``(accessToken, accessTokenExpiration)``, or LoginError;
    counted in ``contact.logins``; a client span of its own when ``spans`` are exported."""
    url = _join_url(base_url, LOGIN_PATH)
    if contact is not None:
        contact.logins += 1
    parent = current_trace.get()
    span = None if spans is None else spans.call("POST", url, parent)
    traceparent = (parent or new_trace()).child().traceparent if span is None else (
        span.context.traceparent)  # fmt: skip
    body = orjson.dumps({"id": user_id, "secretKey": secret})
    try:
        reply = await _exchange(session, "POST", url, _headers(user_agent, traceparent, True),
                                timeout, body=body, contact=contact)  # fmt: skip
    except BaseException as error:
        _finish_span(span, None, error)
        if isinstance(error, ApiError):
            raise _login_error(error.message, url) from error
        raise
    _finish_span(span, reply.status, None)
    if reply.status >= 300:
        raise _login_refused(reply, url, secret)
    return _login_answer(reply, url)


def _login_error(
    message: str, url: str, status: int | None = None, body: Any = None
) -> LoginError:
    error = LoginError(f"service-user login failed: {message}", status=status, method="POST",
                       url=_public_url(url), body=body)
    # A refusal (4xx other than 429) will not change by asking again.
    error.transient = status is None or status >= 500 or status == 429
    return error


def _login_refused(reply: _Reply, url: str, secret: str) -> LoginError:
    body, code = _error_body(reply.raw)
    if secret and secret in orjson.dumps(body).decode():
        body = {"code": code}  # BioT echoed the secret back: keep only the code
    return _login_error(_answered(reply.status, code), url, reply.status, body)


def _login_answer(reply: _Reply, url: str) -> tuple[str, str]:
    # The answer holds a token: never attach it to an error.
    try:
        answer = orjson.loads(reply.raw)
    except orjson.JSONDecodeError:
        raise _login_error("the answer is not JSON", url, reply.status) from None
    token = answer.get("accessToken") if isinstance(answer, dict) else None
    expiration = answer.get("accessTokenExpiration") if isinstance(answer, dict) else None
    if not isinstance(token, str) or not token or not isinstance(expiration, str):
        raise _login_error("the answer lacks accessToken or accessTokenExpiration", url,
                           reply.status)
    return token, expiration


async def fetch_public_key_texts(
    session: aiohttp.ClientSession,
    base_url: str,
    *,
    timeout: float = _TIMEOUT,  # noqa: ASYNC109 - bounded on its own, like the login
    contact: BiotContact | None = None,
    spans: Spans | None = None,
) -> tuple[str, str | None]:
    """``GET`` :data:`PUBLIC_KEY_PATH`, no token (nor trace, unless ``spans`` are exported: then
    a client span of its own, named in the call's ``traceparent``): ``(publicKey, previous or
    None)``; counted in ``contact.key_fetches``."""
    url = _join_url(base_url, PUBLIC_KEY_PATH)
    if contact is not None:
        contact.key_fetches += 1
    headers = {"Accept": _ACCEPT}
    span = None if spans is None else spans.call("GET", url, current_trace.get())
    if span is not None:
        headers["traceparent"] = span.context.traceparent
    try:
        reply = await _exchange(session, "GET", url, headers, timeout, contact=contact)
    except BaseException as error:
        _finish_span(span, None, error)
        raise
    _finish_span(span, reply.status, None)
    if reply.status >= 300:
        raise _error_for(reply, "GET", url)
    answer = _decode(reply, "GET", url)
    current = answer.get("publicKey") if isinstance(answer, dict) else None
    if not isinstance(current, str) or not current:
        raise ApiError("public-key answer lacks publicKey", status=reply.status, method="GET",
                       url=_public_url(url))
    previous = answer.get("previousPublicKey")
    return current, previous if isinstance(previous, str) and previous else None


def _cut_short(error: BaseException) -> BaseException:
    """A cancellation that the event's deadline caused, named so (for the call's span)."""
    left = remaining()
    if isinstance(error, asyncio.CancelledError) and left is not None and left <= 0:
        return DeadlineExceeded("the event's deadline cut the call short")
    return error


def _finish_span(span: Span | None, status: int | None, error: BaseException | None) -> None:
    if span is not None:
        with contextlib.suppress(Exception):  # telemetry must not fail the call
            span.finish(status, error)


# ---------------------------------------------------------------- fan-out


async def fan_out(calls: Iterable[Callable[[], Awaitable[_T]]], *, limit: int = 8) -> list[_T]:
    """Run the calls, ``limit`` at a time, results in input order; a failure cancels the rest."""
    if limit < 1:
        raise ValueError(f"limit must be 1 or more, got {limit}")
    factories = list(calls)
    gate = asyncio.Semaphore(limit)

    async def gated(call: Callable[[], Awaitable[_T]]) -> _T:
        async with gate:
            return await call()

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(gated(call)) for call in factories]
    except ExceptionGroup as failures:
        # Raised as itself, not as an ExceptionGroup, so that handlers can `except ApiError`.
        raise _first_failure(tasks, failures) from None
    return [task.result() for task in tasks]


def _first_failure(tasks: list[asyncio.Task[Any]], failures: ExceptionGroup[Any]) -> Exception:
    # The group lists failures in the order they happened; callers expect input order.
    failed = [task.exception() for task in tasks if task.done() and not task.cancelled()]
    first = next((exc for exc in failed if isinstance(exc, Exception)), failures.exceptions[0])
    if len(failures.exceptions) > 1:
        first.add_note(f"{len(failures.exceptions) - 1} other call(s) of the fan-out also failed")
    return first


# ---------------------------------------------------------------- the session


def make_ssl_context(ca_bundle: str | None = None) -> ssl.SSLContext:
    """A verifying TLS context: system store or only ``ca_bundle``; blocking; ValueError if bad."""
    try:
        return ssl.create_default_context(cafile=ca_bundle)
    except OSError as exc:  # FileNotFoundError, PermissionError, ssl.SSLError (not PEM)
        reason = exc.strerror or str(exc)
        raise ValueError(f"cannot load CA bundle {ca_bundle!r}: {reason}") from exc


def create_session(
    *,
    max_connections: int = 100,
    ca_bundle: str | None = None,
    user_agent: str = DEFAULT_USER_AGENT,
) -> aiohttp.ClientSession:
    """The process's one keep-alive session, trust store loaded blocking; needs a running loop."""
    asyncio.get_running_loop()
    return _build_session(make_ssl_context(ca_bundle), max_connections, user_agent)


async def open_session(
    *,
    max_connections: int = 100,
    ca_bundle: str | None = None,
    user_agent: str = DEFAULT_USER_AGENT,
) -> aiohttp.ClientSession:
    """:func:`create_session`, loading the trust store in a thread so the loop never blocks."""
    context = await asyncio.to_thread(make_ssl_context, ca_bundle)
    return _build_session(context, max_connections, user_agent)


def _build_session(
    context: ssl.SSLContext, max_connections: int, user_agent: str
) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=max_connections, ssl=context, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": user_agent},
        json_serialize=_dumps_text,
        json_serialize_bytes=orjson.dumps,
        timeout=_SESSION_TIMEOUT,
        trust_env=False,  # no proxy or netrc picked up from the environment behind our back
    )


def _dumps_text(value: Any) -> str:
    return orjson.dumps(value).decode()


# ---------------------------------------------------------------- one exchange, and its outcome


class _Reply(NamedTuple):
    status: int
    headers: Mapping[str, str]
    raw: bytes


def _call_headers(call: _Call, user_agent: str, traceparent: str, token: str) -> CIMultiDict[str]:
    """An API call's headers: the traced ones, ``allow-interception``, the caller's, and the
    service token last (a caller's header never replaces it)."""
    headers = _headers(user_agent, traceparent, call.body is not None)
    if call.allow_interception:
        headers["allow-interception"] = "1"
    if call.headers:
        headers.update(call.headers)
    headers["Authorization"] = f"Bearer {token}"
    return headers


def _headers(user_agent: str, traceparent: str, has_body: bool) -> CIMultiDict[str]:
    """The headers every traced call carries (``traceparent``: the call's own span)."""
    headers = CIMultiDict({"User-Agent": user_agent, "Accept": _ACCEPT, "traceparent": traceparent})
    if has_body:
        headers["Content-Type"] = _JSON_CONTENT_TYPE
    return headers


async def _exchange(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    headers: Mapping[str, str],
    limit: float,
    *,
    params: list[tuple[str, str]] | None = None,
    body: bytes | None = None,
    contact: BiotContact | None = None,
    timeouts: TimeoutQueue | None = None,
) -> _Reply:
    """One request with exactly ``headers``, its body read within ``limit`` seconds, any status;
    a response (its status line and headers) sets ``contact.answered_at``. ``timeouts`` is the
    queue whose timer bounds it (``None``: a timer of its own).

    Timeouts and connection failures raise :class:`TransientApiError`, a malformed URL
    :class:`ApiError`; nothing here retries.
    """
    loop = asyncio.get_running_loop()
    timeout = QueuedTimeout(loop.time() + limit, timeouts or OWN_TIMERS)
    try:
        timeout.enter()  # as `async with asyncio.timeout(limit):`, without its coroutines
        try:
            async with session.request(
                method, url, params=params, data=body, headers=headers,
                timeout=_UNBOUNDED, allow_redirects=False,  # the token never follows a redirect
            ) as response:
                if contact is not None:
                    contact.answered_at = time.monotonic()
                reply = _Reply(response.status, response.headers, await response.read())
        except BaseException as exc:
            timeout.leave(exc)  # raises TimeoutError for a cancellation it caused
            raise
        timeout.leave(None)
        return reply
    except TimeoutError:
        message = f"no answer within {limit:.3g}s"
        raise TransientApiError(message, method=method, url=_public_url(url)) from None
    except aiohttp.InvalidURL as exc:
        raise ApiError("invalid URL", method=method, url=_public_url(url)) from exc
    except aiohttp.ClientError as exc:
        message = f"connection failed ({type(exc).__name__})"
        raise TransientApiError(message, method=method, url=_public_url(url)) from exc


def _error_for(reply: _Reply, method: str, url: str) -> ApiError:
    """The typed error for a non-2xx reply; transient ones carry ``details["retryAfter"]``."""
    body, code = _error_body(reply.raw)
    url = _public_url(url)
    kind = _error_kind(reply.status)
    error = kind(f"{_answered(reply.status, code)} to {method} {url}", status=reply.status,
                 method=method, url=url, body=body)
    wait = parse_retry_after(reply.headers.get("Retry-After"))
    if kind is TransientApiError and wait is not None:
        error.details["retryAfter"] = wait
    return error


def _error_kind(status: int) -> type[ApiError]:
    if status in _RETRYABLE_STATUSES:
        return TransientApiError
    if status in (401, 403):
        return ApiAuthError
    return ApiError


def _error_body(raw: bytes) -> tuple[Any, str | None]:
    """BioT's ``ErrorResponse`` (or the body's text, cut short) and its ``code`` when it has one."""
    try:
        body = orjson.loads(raw) if raw.strip() else None
    except orjson.JSONDecodeError:
        body = raw[:_TEXT_LIMIT].decode("utf-8", "replace")
    return body, body.get("code") if isinstance(body, dict) else None


def _answered(status: int, code: str | None) -> str:
    return f"BioT answered {status}{f' {code}' if code else ''}"


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


def _decode(reply: _Reply, method: str, url: str) -> Any:
    """The decoded JSON of a 2xx reply; ``None`` for 204 or an empty body; ApiError if not JSON."""
    if reply.status == 204 or not reply.raw.strip():
        return None
    try:
        return orjson.loads(reply.raw)
    except orjson.JSONDecodeError:
        message = f"BioT answered {reply.status} to {method} with a body that is not JSON"
        body = reply.raw[:_TEXT_LIMIT].decode("utf-8", "replace")
        raise ApiError(message, status=reply.status, method=method, url=_public_url(url),
                       body=body) from None


def _public_url(url: str) -> str:
    """``url`` without its query string, which may carry search terms or secrets."""
    return url.split("?", 1)[0]


def _join_url(base_url: str, path: str) -> str:
    """``path`` under ``base_url``; a full URL on another origin raises ``ValueError``."""
    if not path.startswith(("http://", "https://")):
        return base_url.rstrip("/") + "/" + path.lstrip("/")
    if URL(path).origin() != URL(base_url).origin():
        raise ValueError(f"refusing to call {_public_url(path)}: not under {base_url}")
    return path


def _encode_params(params: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """Query pairs: a list or tuple repeats the key, ``None`` is left out, ``True`` is ``true``,
    and a dict (BioT's ``searchRequest``) is JSON."""
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
