"""A recording, in-memory stand-in for ``ctx.api`` (:class:`worker.BiotApi`).

>>> api = FakeApi().respond("GET", "/organization/v1/users/patients/p-1", {"_id": "p-1"})
>>> # await handler(view, make_context(api=api)); then assert on api.calls
"""

from __future__ import annotations

import fnmatch
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Unpack

from worker.client import RequestOptions
from worker.errors import ApiError

_PAGE_LIMIT = 1000
#: An answer: a JSON value, an exception to raise, or a function of the call giving either.
Answer = Any | BaseException | Callable[["ApiCall"], Any]


@dataclass(frozen=True, slots=True)
class ApiCall:
    """One call a handler made: method, path, query parameters, JSON body and headers."""

    method: str
    path: str
    params: Mapping[str, Any] = field(default_factory=dict)
    json: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    allow_interception: bool = False

    @property
    def search_request(self) -> dict[str, Any]:
        """The ``searchRequest`` of a :meth:`FakeApi.search` call (``{}`` for other calls)."""
        value = self.params.get("searchRequest")
        return dict(value) if isinstance(value, Mapping) else {}


class FakeApi:
    """Answers each call with the answer configured for its method and path, and records it.

    Paths may be patterns (``fnmatch``: ``/organization/v1/users/patients/*``); the latest
    matching answer wins. An unconfigured search answers an empty page; any other unconfigured
    call raises :class:`worker.ApiError` with upstream status 404, as BioT would.
    """

    def __init__(self) -> None:
        self.calls: list[ApiCall] = []
        self._answers: list[tuple[str, str, Answer]] = []

    def respond(self, method: str, path: str, answer: Answer) -> FakeApi:
        """Answer ``METHOD path`` with ``answer`` from now on; returns ``self`` to chain."""
        self._answers.append((method.upper(), path, answer))
        return self

    def calls_to(self, method: str, path: str) -> list[ApiCall]:
        """The recorded calls of ``METHOD path`` (exact path), oldest first."""
        return [c for c in self.calls if (c.method, c.path) == (method.upper(), path)]

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        allow_interception: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 - the same signature as BiotApi
    ) -> Any:
        """Record the call and return (or raise) its configured answer."""
        call = ApiCall(
            method.upper(), path, dict(params or {}), json, dict(headers or {}), allow_interception
        )
        self.calls.append(call)
        answer = self._answer_for(call)
        if callable(answer) and not isinstance(answer, BaseException):
            answer = answer(call)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def _answer_for(self, call: ApiCall) -> Answer:
        for method, pattern, answer in reversed(self._answers):
            if method == call.method and fnmatch.fnmatchcase(call.path, pattern):
                return answer
        if call.search_request:
            request = call.search_request
            page = {"totalResults": 0, "page": request["page"], "limit": request["limit"]}
            return {"data": [], "metadata": {"page": page}}
        body = {"code": "NOT_FOUND", "message": "not configured in FakeApi"}
        message = f"BioT answered 404 to {call.method} {call.path}"
        return ApiError(message, status=404, method=call.method, url=call.path, body=body)

    async def get(self, path: str, **options: Unpack[RequestOptions]) -> Any:
        """``request("GET", path)``."""
        return await self.request("GET", path, **options)

    async def post(self, path: str, **options: Unpack[RequestOptions]) -> Any:
        """``request("POST", path)``."""
        return await self.request("POST", path, **options)

    async def put(self, path: str, **options: Unpack[RequestOptions]) -> Any:
        """``request("PUT", path)``."""
        return await self.request("PUT", path, **options)

    async def patch(self, path: str, **options: Unpack[RequestOptions]) -> Any:
        """``request("PATCH", path)``."""
        return await self.request("PATCH", path, **options)

    async def delete(self, path: str, **options: Unpack[RequestOptions]) -> Any:
        """``request("DELETE", path)``."""
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
        """A ``GET path`` with ``searchRequest`` in its params, as the real client sends it."""
        search: dict[str, Any] = {"filter": dict(filter or {}), "page": page, "limit": limit}
        if sort:
            search["sort"] = [dict(item) for item in sort]
        if free_text:
            search["freeTextSearch"] = free_text
        options["params"] = {**(options.get("params") or {}), "searchRequest": search}
        answer = await self.request("GET", path, **options)
        if not isinstance(answer, dict):
            raise ApiError("search answer is not a JSON object", method="GET", url=path)
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
        """Every entity of the pages :meth:`search` answers, until an empty or short page or
        ``totalResults``; more than 1000 pages is an error (an answer that never ends)."""
        page = 0
        while max_pages is None or page < max_pages:
            if page >= _PAGE_LIMIT:
                raise RuntimeError(f"FakeApi.iter_search({path}): more than {_PAGE_LIMIT} pages")
            answer = await self.search(
                path, filter=filter, sort=sort, page=page, limit=limit, free_text=free_text,
                **options,
            )  # fmt: skip
            data = answer.get("data") or []
            for item in data:
                yield item
            total = answer.get("metadata", {}).get("page", {}).get("totalResults")
            if len(data) < limit or (isinstance(total, int) and (page + 1) * limit >= total):
                return
            page += 1
