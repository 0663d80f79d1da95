"""A plugin's subscriptions, derived from its :class:`~worker.routing.Router`.

Two forms of the same routes:

- :func:`subscriptions_of`: the ``subscriptions`` object of BioT's plugin configuration
  (``/settings/v2/plugins``): ``interceptionOrder`` (the plugin's default execution order, 1 as
  BioT's own default, always sent since the partial update requires it), ``interceptions``
  (``type``, ``apiId`` for PRE_REQUEST/POST_REQUEST or ``entityTypeName`` for ADAPT_ENTITY, and
  ``order`` when the route gives one) and ``notifications`` (``entityTypeName``, ``actionName``,
  ``templateName`` when the route gives one);
- :func:`self_hosted_requests`: the dispatcher's bodies for a self-hosted worker
  (``/dispatcher/v1/hooks/{notifications|interceptions}/subscribe``), ``executionOrder`` from the
  route's ``order``.

Both are sorted (interceptions by type, target, order; notifications by entity, action,
template), so the same routes always give the same bytes. NONSPECIFIC routes need no
subscription. A route BioT cannot express (a wildcard notification, PRE/POST by entity,
ADAPT_ENTITY by ``apiId``) is listed in ``unsupported`` by its description, never dropped in
silence: the commands print each as a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, Literal

from worker.routing import INTERCEPTION_TYPES, Route, Router
from worker.views import HookType

#: BioT's default for ``subscriptions.interceptionOrder`` (a positive number).
DEFAULT_INTERCEPTION_ORDER: Final = 1
#: The interception type whose target is an entity type, not an API.
ADAPT_ENTITY: Final = "ADAPT_ENTITY"

Kind = Literal["notifications", "interceptions"]
Request = tuple[Kind, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Subscriptions:
    """BioT's ``subscriptions`` object, and the routes it could not express (one line each)."""

    config: dict[str, Any]
    unsupported: list[str] = field(default_factory=list)


def subscriptions_of(router: Router) -> Subscriptions:
    """The ``subscriptions`` object of the plugin configuration for ``router``'s routes."""
    interceptions: list[dict[str, Any]] = []
    notifications: list[dict[str, Any]] = []
    unsupported: list[str] = []
    for route in router:
        if route.hook is HookType.NONSPECIFIC:
            continue
        if not route.subscribable:
            unsupported.append(unsupported_reason(route))
        elif route.hook is HookType.NOTIFICATION:
            notifications.append(_notification(route))
        else:
            interceptions.append(_interception(route))
    config = {
        "interceptionOrder": DEFAULT_INTERCEPTION_ORDER,
        "interceptions": sorted(interceptions, key=interception_key),
        "notifications": sorted(notifications, key=notification_key),
    }
    return Subscriptions(config, unsupported)


def self_hosted_requests(router: Router, endpoint: str) -> list[Request]:
    """The dispatcher subscription bodies for ``endpoint``: notifications first, then
    interceptions, each in the order of :func:`subscriptions_of`."""
    config = subscriptions_of(router).config
    requests: list[Request] = [
        ("notifications", {**item, "endpoint": endpoint}) for item in config["notifications"]
    ]
    requests += [
        ("interceptions", dispatcher_interception(item, endpoint))
        for item in config["interceptions"]
    ]
    return requests


def dispatcher_interception(item: dict[str, Any], endpoint: str) -> dict[str, Any]:
    """A configuration interception as the dispatcher's body (``entityName``,
    ``executionOrder``)."""
    body: dict[str, Any] = {"type": item["type"]}
    if item["type"] == ADAPT_ENTITY:
        body["entityName"] = item["entityTypeName"]
    else:
        body["apiId"] = item["apiId"]
    body["endpoint"] = endpoint
    if item.get("order") is not None:
        body["executionOrder"] = item["order"]
    return body


def unsupported_reason(route: Route) -> str:
    """Why BioT cannot subscribe ``route``, naming it and its handler."""
    if route.hook is HookType.NOTIFICATION:
        why = "BioT subscribes notifications by entity type and action, not a wildcard"
    elif route.hook is HookType.INTERCEPTOR_POST_ENTITY:
        why = "BioT subscribes ADAPT_ENTITY by entity type, not by apiId"
    else:
        why = f"BioT subscribes {INTERCEPTION_TYPES[route.hook]} by apiId, not by entity"
    return f"{route.describe()} ({route.handler_name}): not subscribed: {why}"


def interception_key(item: dict[str, Any]) -> tuple[str, str, int]:
    target = item.get("apiId") or item.get("entityTypeName") or item.get("entityName") or ""
    order = item.get("order", item.get("executionOrder"))
    return (str(item.get("type")), str(target), order if isinstance(order, int) else 0)


def notification_key(item: dict[str, Any]) -> tuple[str, str, str]:
    return (
        str(item.get("entityTypeName")),
        str(item.get("actionName")),
        str(item.get("templateName") or ""),
    )


def _notification(route: Route) -> dict[str, Any]:
    item: dict[str, Any] = {"entityTypeName": route.entity, "actionName": route.action}
    if route.template is not None:
        item["templateName"] = route.template
    return item


def _interception(route: Route) -> dict[str, Any]:
    kind = INTERCEPTION_TYPES[route.hook]
    item: dict[str, Any] = {"type": kind}
    if kind == ADAPT_ENTITY:
        item["entityTypeName"] = route.entity
    else:
        item["apiId"] = route.api_id
    if route.order is not None:
        item["order"] = route.order
    return item
