"""The dispatcher's subscription APIs over HTTP (``/dispatcher/v1/hooks/...``).

Each needs a valid token holding the permission BioT's spec names (the service user's login
token holds them all). Subscribing answers 201 with the subscription, unsubscribing 204, and the
lists are BioT searches (``searchRequest`` with filter/sort/page).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from worker.testing.emulator.middleware import require_caller
from worker.testing.emulator.search import parse_search_request, search, search_response
from worker.testing.emulator.subscriptions import Subscriptions
from worker.testing.emulator.wire import ApiFailure, json_response, read_json

_BASE = "/dispatcher/v1/hooks"


class DispatcherApi:
    def __init__(self, subscriptions: Subscriptions) -> None:
        self._subs = subscriptions

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post(f"{_BASE}/notifications/subscribe", self.subscribe_notification),
            web.post(f"{_BASE}/notifications/unsubscribe", self.unsubscribe_notification),
            web.get(f"{_BASE}/notifications", self.list_notifications),
            web.post(f"{_BASE}/interceptions/subscribe", self.subscribe_interception),
            web.post(f"{_BASE}/interceptions/unsubscribe", self.unsubscribe_interception),
            web.get(f"{_BASE}/interceptions", self.list_interceptions),
        ]

    async def subscribe_notification(self, request: web.Request) -> web.Response:
        require_caller(request, "DISPATCHER_SUBSCRIPTIONS_SUBSCRIBE")
        body = await _body(request)
        sub = self._subs.subscribe_notification(*_notification_args(body))
        return json_response(sub.to_json(), 201)

    async def unsubscribe_notification(self, request: web.Request) -> web.Response:
        require_caller(request, "DISPATCHER_SUBSCRIPTIONS_UNSUBSCRIBE")
        body = await _body(request)
        self._subs.unsubscribe_notification(*_notification_args(body))
        return json_response(None, 204)

    async def subscribe_interception(self, request: web.Request) -> web.Response:
        require_caller(request, "HOOKS_INTERCEPTION_CREATE")
        body = await _body(request)
        order = body.get("executionOrder")
        if order is not None and (isinstance(order, bool) or not isinstance(order, int)):
            raise ApiFailure(400, "BAD_REQUEST", "executionOrder must be an integer")
        sub = self._subs.subscribe_interception(
            _text(body, "type"),
            _text(body, "endpoint"),
            api_id=_optional(body, "apiId"),
            entity_name=_optional(body, "entityName"),
            order=order,
            path_filters=_filters(body.get("pathFilters")),
        )
        return json_response(sub.to_json(), 201)

    async def unsubscribe_interception(self, request: web.Request) -> web.Response:
        require_caller(request, "HOOKS_INTERCEPTION_DELETE")
        body = await _body(request)
        self._subs.unsubscribe_interception(
            _text(body, "type"),
            _text(body, "endpoint"),
            api_id=_optional(body, "apiId"),
            entity_name=_optional(body, "entityName"),
            path_filters=_filters(body.get("pathFilters")),
        )
        return json_response(None, 204)

    async def list_notifications(self, request: web.Request) -> web.Response:
        require_caller(request, "DISPATCHER_SUBSCRIPTIONS_SEARCH")
        items = [s.to_json() for s in self._subs.notifications()]
        return _search(request, items)

    async def list_interceptions(self, request: web.Request) -> web.Response:
        require_caller(request, "HOOKS_INTERCEPTION_SEARCH")
        items = [s.to_json() for s in self._subs.interceptions()]
        return _search(request, items)


async def _body(request: web.Request) -> dict[str, Any]:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiFailure(400, "BAD_REQUEST", "the request body must be a JSON object")
    return body


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise ApiFailure(400, "BAD_REQUEST", f"{key} is required (a string)")
    return value


def _optional(body: dict[str, Any], key: str) -> str | None:
    return _text(body, key) if body.get(key) is not None else None


def _notification_args(body: dict[str, Any]) -> tuple[str, str, str, str | None]:
    return (
        _text(body, "entityTypeName"),
        _text(body, "actionName"),
        _text(body, "endpoint"),
        _optional(body, "templateName"),
    )


def _filters(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ApiFailure(400, "BAD_REQUEST", "pathFilters must be an object")
    return {str(k): str(v) for k, v in value.items()}


def _search(request: web.Request, items: list[dict[str, Any]]) -> web.Response:
    search_request = parse_search_request(request.query.get("searchRequest"))
    # Subscriptions carry creationTime (interceptions) or nothing (notifications: kept in order).
    page, total = search(items, search_request, default_sort="creationTime")
    return json_response(search_response(page, total, search_request))
