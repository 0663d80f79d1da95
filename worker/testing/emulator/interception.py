"""The interception chain around an entity API call: PRE, then ADAPT_ENTITY, then POST.

Payloads follow BioT's access-control contract; each interceptor of a stage sees
the request (and response) as the one before it left them. A 4xx/5xx answer blocks the call: the
caller receives that status and body unchanged (:class:`PassThrough`). A 2xx answer that is not
a JSON object, or whose ``request``/``response`` has the wrong shape, fails the call with 502;
an answer without ``request``/``response`` changes nothing.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

from worker.testing.emulator.identity import Caller
from worker.testing.emulator.plugins import HookClient, PluginReply
from worker.testing.emulator.routes import ApiRoute
from worker.testing.emulator.subscriptions import HOOKTYPES, InterceptionSubscription, Subscriptions
from worker.testing.emulator.wire import ApiFailure, PassThrough, loads, parse_status, status_text
from worker.tracing import TraceContext


@dataclass(frozen=True, slots=True)
class ApiRequest:
    """The user's request as interceptors see and rewrite it."""

    method: str
    path: str
    query: dict[str, list[str]] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None

    def to_json(self, params: dict[str, str]) -> dict[str, Any]:
        return {
            "path": self.path,
            "queryParameters": copy.deepcopy(self.query),
            "headers": dict(self.headers),
            "body": copy.deepcopy(self.body),
            "pathVariables": [{"name": k, "value": v} for k, v in params.items()],
        }


@dataclass(frozen=True, slots=True)
class CallSite:
    """One intercepted call: who made it, which API, with which variables, in which trace."""

    caller: Caller
    route: ApiRoute
    params: dict[str, str]
    trace: TraceContext


class InterceptionChain:
    def __init__(self, subscriptions: Subscriptions, client: HookClient) -> None:
        self._subscriptions = subscriptions
        self._client = client

    async def pre(self, site: CallSite, request: ApiRequest) -> ApiRequest:
        """Run PRE_REQUEST interceptors; returns the request as they rewrote it."""
        for sub in self._subs("PRE_REQUEST", site):
            answer = await self._call(sub, site, _payload(site, request))
            rewritten = answer.get("request")
            if rewritten is not None:
                request = _apply_request(request, rewritten, sub.endpoint)
        return request

    async def adapt(
        self,
        site: CallSite,
        request: ApiRequest,
        entities: list[Any],
        status: int,
        *,
        many: bool,
    ) -> list[Any]:
        """Run ADAPT_ENTITY interceptors over the returned entities.

        A single-entity API (``many=False``) must get exactly one entity back.
        """
        for sub in self._subs("ADAPT_ENTITY", site):
            payload = _payload(site, request)
            payload["response"] = {"entities": entities, "httpStatusCode": status_text(status)}
            answer = await self._call(sub, site, payload)
            response = answer.get("response")
            if response is not None:
                entities = _entities(response, sub.endpoint)
                if not many and len(entities) != 1:
                    raise _invalid(sub.endpoint, f"{len(entities)} entities for a single one")
        return entities

    async def post(
        self, site: CallSite, request: ApiRequest, body: Any, status: int
    ) -> tuple[Any, int]:
        """Run POST_REQUEST interceptors; returns the response body and status they left."""
        for sub in self._subs("POST_REQUEST", site):
            payload = _payload(site, request)
            payload["response"] = {"body": body, "httpStatusCode": status_text(status)}
            answer = await self._call(sub, site, payload)
            response = answer.get("response")
            if response is not None:
                body, status = _apply_response(response, body, status, sub.endpoint)
        return body, status

    def _subs(self, type: str, site: CallSite) -> list[InterceptionSubscription]:
        return self._subscriptions.interceptors(type, site.route, site.params)

    async def _call(
        self, sub: InterceptionSubscription, site: CallSite, payload: dict[str, Any]
    ) -> dict[str, Any]:
        reply = await self._client.intercept(sub.endpoint, HOOKTYPES[sub.type], payload, site.trace)
        if reply.status >= 400:
            raise PassThrough(reply.status, reply.body, reply.content_type)
        return _answer(reply, sub)


def _payload(site: CallSite, request: ApiRequest) -> dict[str, Any]:
    return {
        "initiatorData": site.caller.initiator_data(),
        "method": site.route.method,
        "entityName": site.route.kind.name,
        "apiId": site.route.api_id,
        "request": request.to_json(site.params),
    }


def _invalid(endpoint: str, message: str) -> ApiFailure:
    return ApiFailure(
        502,
        "PLUGIN_INVALID_RESPONSE",
        f"plugin {endpoint} answered {message}",
        {"endpoint": endpoint},
    )


def _answer(reply: PluginReply, sub: InterceptionSubscription) -> dict[str, Any]:
    """The plugin's JSON object (a JSON string holding one is unwrapped, as Lambda seeds send)."""
    try:
        answer = loads(reply.body)
        if isinstance(answer, str):
            answer = loads(answer)
    except ValueError as exc:
        raise _invalid(sub.endpoint, f"{reply.status} with a body that is not JSON") from exc
    if not isinstance(answer, dict):
        raise _invalid(sub.endpoint, "JSON that is not an object")
    return answer


def _apply_request(request: ApiRequest, new: Any, endpoint: str) -> ApiRequest:
    if not isinstance(new, dict):
        raise _invalid(endpoint, "a request that is not an object")
    path = new.get("path", request.path)
    query = new.get("queryParameters", request.query)
    headers = new.get("headers", request.headers)
    if not isinstance(path, str) or not path.startswith("/"):
        raise _invalid(endpoint, "a request.path that is not an absolute path")
    if query is None:
        query = {}
    if not isinstance(query, dict) or not isinstance(headers, dict):
        raise _invalid(endpoint, "request.queryParameters/headers that are not objects")
    return replace(
        request,
        path=path,
        query={
            str(k): [str(x) for x in (v if isinstance(v, list) else [v])] for k, v in query.items()
        },
        headers={str(k).lower(): str(v) for k, v in headers.items()},
        body=new.get("body", request.body),
    )


def _entities(response: Any, endpoint: str) -> list[Any]:
    entities = response.get("entities") if isinstance(response, dict) else None
    if not isinstance(entities, list) or not all(isinstance(e, dict) for e in entities):
        raise _invalid(endpoint, "response.entities that is not a list of objects")
    return entities


def _apply_response(response: Any, body: Any, status: int, endpoint: str) -> tuple[Any, int]:
    if not isinstance(response, dict):
        raise _invalid(endpoint, "a response that is not an object")
    new_status = status
    if "httpStatusCode" in response:
        parsed = parse_status(response["httpStatusCode"])
        if parsed is None:
            raise _invalid(endpoint, f"httpStatusCode {response['httpStatusCode']!r}")
        new_status = parsed
    return response.get("body", body), new_status
