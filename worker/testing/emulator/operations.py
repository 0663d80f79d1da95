"""What each entity API does to the store, independent of HTTP and of interceptors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from worker.testing.emulator.entities import Entity, EntityStore
from worker.testing.emulator.interception import ApiRequest
from worker.testing.emulator.routes import ACTIONS, ApiRoute
from worker.testing.emulator.search import parse_search_request, search, search_response
from worker.testing.emulator.wire import ApiFailure


@dataclass(slots=True)
class Outcome:
    """The handler's result before ADAPT_ENTITY and POST interceptors.

    ``entities`` is what ADAPT_ENTITY sees (one entity, or a search's page); ``None`` when the
    API returns no entity (delete). ``entity``/``old_entity`` are what the notification reports.
    """

    status: int
    body: Any
    entities: list[Entity] | None
    many: bool = False
    entity: Entity | None = None
    old_entity: Entity | None = None

    def with_entities(self, entities: list[Entity]) -> Any:
        """The response body rebuilt around (adapted) ``entities``."""
        if self.many:
            return {**self.body, "data": entities}
        return entities[0] if entities else self.body


def _object_body(request: ApiRequest) -> dict[str, Any]:
    if not isinstance(request.body, dict):
        raise ApiFailure(400, "INVALID_REQUEST_BODY", "the request body must be a JSON object")
    return request.body


def execute(
    store: EntityStore, route: ApiRoute, params: dict[str, str], request: ApiRequest
) -> Outcome:
    """Run ``route`` on ``store``; raises :class:`ApiFailure` with BioT's codes."""
    kind = route.kind
    if route.operation == "search":
        raw = request.query.get("searchRequest", [None])[0]
        search_request = parse_search_request(raw)
        page, total = search(store.all(kind), search_request)
        return Outcome(200, search_response(page, total, search_request), page, many=True)
    if route.operation == "create":
        entity = store.create(kind, _object_body(request), params.get("templateName"))
        return Outcome(201, entity, [entity], entity=entity)
    if route.operation == "get":
        entity = store.get(kind, params["id"])
        return Outcome(200, entity, [entity], entity=entity)
    if route.operation == "update":
        old, new = store.update(kind, params["id"], _object_body(request))
        return Outcome(200, new, [new], entity=new, old_entity=old)
    old = store.delete(kind, params["id"])
    return Outcome(204, None, None, entity=old)


def action_name(route: ApiRoute) -> str | None:
    """The notification ``actionName`` of a route's operation (none for search)."""
    return ACTIONS.get(route.operation)
