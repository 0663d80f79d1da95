"""The entity APIs the emulator serves, as BioT names them in ``apiId``s.

An ``apiId`` is the method and the path template run together, e.g.
``PATCH/organization/v1/users/patients/{id}``. A subscription may name a template or narrow it
with concrete values (``POST/generic-entity/v1/generic-entities/templates/device_log``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from worker.testing.emulator.entities import KINDS, EntityKind

Operation = Literal["search", "create", "get", "update", "delete"]

# Operation -> the notification action it performs (search sends none).
ACTIONS: Final[dict[str, str]] = {
    "create": "_create",
    "get": "_read",
    "update": "_update",
    "delete": "_delete",
}


@dataclass(frozen=True, slots=True)
class ApiRoute:
    method: str
    template: str
    kind: EntityKind
    operation: Operation

    @property
    def api_id(self) -> str:
        return f"{self.method}{self.template}"


def _routes_for(kind: EntityKind) -> tuple[ApiRoute, ...]:
    base = kind.base
    return (
        ApiRoute("GET", base, kind, "search"),
        ApiRoute("POST", base, kind, "create"),
        ApiRoute("POST", base + "/templates/{templateName}", kind, "create"),
        ApiRoute("GET", base + "/{id}", kind, "get"),
        ApiRoute("PATCH", base + "/{id}", kind, "update"),
        ApiRoute("DELETE", base + "/{id}", kind, "delete"),
    )


API_ROUTES: Final = tuple(route for kind in KINDS for route in _routes_for(kind))


def _segments(path: str) -> list[str]:
    return [s for s in path.strip().split("/") if s]


def match_template(template: str, path: str) -> dict[str, str] | None:
    """Path variables when ``path`` fits ``template`` segment by segment, else ``None``."""
    wanted, actual = _segments(template), _segments(path)
    if len(wanted) != len(actual):
        return None
    params: dict[str, str] = {}
    for pattern, value in zip(wanted, actual, strict=True):
        if pattern.startswith("{") and pattern.endswith("}"):
            params[pattern[1:-1]] = value
        elif pattern != value:
            return None
    return params


def resolve(method: str, path: str) -> tuple[ApiRoute, dict[str, str]] | None:
    """The API serving ``METHOD path`` and its path variables."""
    for route in API_ROUTES:
        if route.method == method.upper():
            params = match_template(route.template, path)
            if params is not None:
                return route, params
    return None


def api_id_matches(subscribed: str, route: ApiRoute, params: dict[str, str]) -> bool:
    """Whether a subscription's ``apiId`` covers this call of ``route``.

    Equal to the route's ``apiId``, or the same with some variables replaced by this call's
    concrete values.
    """
    if subscribed == route.api_id:
        return True
    method, slash, path = subscribed.partition("/")
    if method.upper() != route.method or not slash:
        return False
    wanted, templ = _segments(path), _segments(route.template)
    if len(wanted) != len(templ):
        return False
    for want, pattern in zip(wanted, templ, strict=True):
        if want == pattern:
            continue
        if not (pattern.startswith("{") and params.get(pattern[1:-1]) == want):
            return False
    return True


def known_api_ids() -> list[str]:
    return [route.api_id for route in API_ROUTES]


def serving(api_id: str) -> ApiRoute | None:
    """The API an ``apiId`` names: its template, or the template narrowed by concrete values
    (``POST/generic-entity/v1/generic-entities/templates/device_log``)."""
    method, slash, path = api_id.partition("/")
    if not slash:
        return None
    for route in API_ROUTES:
        if route.method == method and match_template(route.template, path) is not None:
            return route
    return None


def interception_configs() -> list[dict[str, str]]:
    """``GET /settings/v1/interceptions``'s items: ``{entityTypeName, servicePrefix, apiId}`` of
    every API served here (the service prefix is the path's first segment)."""
    return [
        {
            "entityTypeName": route.kind.name,
            "servicePrefix": _segments(route.template)[0],
            "apiId": route.api_id,
        }
        for route in API_ROUTES
    ]


def entity_type_names() -> list[str]:
    """The entity types whose APIs are served here (what ``ADAPT_ENTITY`` can name)."""
    return [kind.name for kind in KINDS]
