"""The entity APIs over HTTP: authenticate, intercept, execute, notify.

For each call: verify the bearer token; when the caller is an end user (``tokenType USER``) or
sends ``allow-interception``, run PRE interceptors (a rewritten path re-routes the call), then
the operation, then ADAPT_ENTITY and POST interceptors. Service tokens skip interception, as
BioT does for plugins' own calls. A successful action is notified after the answer is built,
whatever the interceptors after it did, since the action itself has happened.
"""

from __future__ import annotations

from aiohttp import web

from worker.testing.emulator.entities import EntityStore
from worker.testing.emulator.identity import Caller
from worker.testing.emulator.interception import ApiRequest, CallSite, InterceptionChain
from worker.testing.emulator.middleware import request_trace, require_caller
from worker.testing.emulator.notifications import Action, Notifier
from worker.testing.emulator.operations import Outcome, action_name, execute
from worker.testing.emulator.routes import API_ROUTES, ApiRoute, resolve
from worker.testing.emulator.wire import ApiFailure, Clock, json_response, read_json
from worker.tracing import TraceContext


class EntityGateway:
    def __init__(
        self, store: EntityStore, chain: InterceptionChain, notifier: Notifier, clock: Clock
    ) -> None:
        self._store = store
        self._chain = chain
        self._notifier = notifier
        self._clock = clock

    def routes(self) -> list[web.RouteDef]:
        return [web.route(route.method, route.template, self.handle) for route in API_ROUTES]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        caller = require_caller(request)
        trace = request_trace(request)
        started = self._clock()
        api_request = await read_request(request)
        route, params = _route(api_request)
        intercept = caller.kind == "user" or bool(request.headers.get("allow-interception"))
        if intercept:
            site = CallSite(caller, route, params, trace)
            api_request = await self._chain.pre(site, api_request)
            route, params = _route(api_request)  # a rewritten path re-routes the call
        outcome = execute(self._store, route, params, api_request)
        try:
            if not intercept:
                return json_response(outcome.body, outcome.status)
            site = CallSite(caller, route, params, trace)
            return await self._intercepted_answer(site, api_request, outcome)
        finally:
            self._notify(route, outcome, caller, trace, started, request.remote)

    async def _intercepted_answer(
        self, site: CallSite, request: ApiRequest, outcome: Outcome
    ) -> web.Response:
        body, status = outcome.body, outcome.status
        if outcome.entities is not None:
            adapted = await self._chain.adapt(
                site, request, outcome.entities, status, many=outcome.many
            )
            body = outcome.with_entities(adapted)
        body, status = await self._chain.post(site, request, body, status)
        return json_response(body, status)

    def _notify(
        self,
        route: ApiRoute,
        outcome: Outcome,
        caller: Caller,
        trace: TraceContext,
        started: float,
        source_ip: str | None,
    ) -> None:
        action = action_name(route)
        if action is None or outcome.entity is None:
            return
        self._notifier.schedule(
            Action(
                route.kind.name,
                action,
                outcome.entity,
                outcome.old_entity,
                caller,
                trace,
                started,
                source_ip,
            )
        )


async def read_request(request: web.Request) -> ApiRequest:
    """The call as interceptors see it: lower-case headers, query lists, parsed JSON body."""
    body = await read_json(request)
    query = {key: request.query.getall(key) for key in dict.fromkeys(request.query.keys())}
    headers = {key.lower(): value for key, value in request.headers.items()}
    return ApiRequest(request.method, request.path, query, headers, body)


def _route(request: ApiRequest) -> tuple[ApiRoute, dict[str, str]]:
    found = resolve(request.method, request.path)
    if found is None:
        raise ApiFailure(404, "NOT_FOUND", f"no API at {request.method} {request.path}")
    return found
