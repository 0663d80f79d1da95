"""A recording, in-memory stand-in for ``ctx.api`` (:class:`worker.BiotApi`).

>>> api = FakeApi().respond("GET", "/organization/v1/users/patients/p-1", {"_id": "p-1"})
>>> # await handler(view, make_context(api=api)); then assert on api.calls
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from worker.client import ApiMethods
from worker.errors import ApiError

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


class FakeApi(ApiMethods):
    """Answers each call with the answer configured for its method and path, and records it.

    Paths may be patterns (``fnmatch``: ``/organization/v1/users/patients/*``); the latest
    matching answer wins. An unconfigured search answers an empty page; any other unconfigured
    call raises :class:`worker.ApiError` with upstream status 404, as BioT would. The verbs and
    searches are the real client's (:class:`worker.client.ApiMethods`), so a handler pages
    alike; ``iter_search`` over more than 1000 pages (an answer that never ends) is an error.
    """

    _max_search_pages = 1000

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
