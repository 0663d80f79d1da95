"""The explicit routing table: which handler answers which event.

Handlers are plain ``async def handler(view, ctx)`` functions registered by explicit calls (no
decorators run at import time, no discovery)::

    router = Router()
    router.notification("patient", "_create", on_patient_created)
    router.pre(rename_patient, api_id="PATCH/organization/v1/users/patients/{id}")
    router.adapt_entity(decorate_patient, entity="patient")

Lookup order: notifications by (entity type, action, template), then without the template, then
the ``"*"`` wildcards; interceptors by ``apiId``, then entity name, then the catch-all
registered with neither. One handler per key: registering a key twice is an error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from worker.events import (
    AdaptEntityInterception,
    HookType,
    InterceptedRequest,
    Interception,
    NonSpecific,
    Notification,
    PostInterception,
    PreInterception,
)

if TYPE_CHECKING:
    from worker.dispatch import Context

NotificationHandler = Callable[[Notification, "Context"], Awaitable[None]]
PreHandler = Callable[
    [PreInterception, "Context"], Awaitable[InterceptedRequest | dict[str, Any] | None]
]
PostHandler = Callable[[PostInterception, "Context"], Awaitable[Any]]
AdaptEntityHandler = Callable[[AdaptEntityInterception, "Context"], Awaitable[list[Any] | None]]
NonSpecificHandler = Callable[[NonSpecific, "Context"], Awaitable[Any]]
AnyHandler = Callable[[Any, "Context"], Awaitable[Any]]

WILDCARD = "*"


@dataclass(frozen=True, slots=True)
class NotificationRoute:
    entity_type: str
    action: str
    template: str | None


@dataclass(frozen=True, slots=True)
class InterceptionRoute:
    hook: HookType
    api_id: str | None
    entity: str | None


class Router:
    def __init__(self) -> None:
        self._notifications: dict[NotificationRoute, AnyHandler] = {}
        self._interceptions: dict[InterceptionRoute, AnyHandler] = {}
        self._nonspecific: AnyHandler | None = None

    # ------------------------------------------------------------ registration

    def notification(
        self,
        entity_type: str,
        action: str,
        handler: NotificationHandler,
        *,
        template: str | None = None,
    ) -> Router:
        """Handle notifications of ``entity_type``/``action`` (``"*"`` matches any)."""
        route = NotificationRoute(entity_type, action, template)
        _add(self._notifications, route, handler)
        return self

    def pre(
        self, handler: PreHandler, *, api_id: str | None = None, entity: str | None = None
    ) -> Router:
        """PRE_REQUEST: may rewrite the request (mutate ``view.request`` or return a new one)."""
        return self._interception(HookType.INTERCEPTOR_PRE, handler, api_id, entity)

    def post(
        self, handler: PostHandler, *, api_id: str | None = None, entity: str | None = None
    ) -> Router:
        """POST_REQUEST: may rewrite the response body (mutate ``view.body`` or return one)."""
        return self._interception(HookType.INTERCEPTOR_POST, handler, api_id, entity)

    def adapt_entity(
        self, handler: AdaptEntityHandler, *, api_id: str | None = None, entity: str | None = None
    ) -> Router:
        """ADAPT_ENTITY: may rewrite the entities (mutate ``view.entities`` or return a list)."""
        return self._interception(HookType.INTERCEPTOR_POST_ENTITY, handler, api_id, entity)

    def nonspecific(self, handler: NonSpecificHandler) -> Router:
        """Direct and scheduled calls; the return value becomes the JSON answer."""
        if self._nonspecific is not None:
            raise ValueError("a nonspecific handler is already registered")
        self._nonspecific = handler
        return self

    def _interception(
        self, hook: HookType, handler: AnyHandler, api_id: str | None, entity: str | None
    ) -> Router:
        if api_id is not None and entity is not None:
            raise ValueError("route an interceptor by api_id or by entity, not both")
        _add(self._interceptions, InterceptionRoute(hook, api_id, entity), handler)
        return self

    # ------------------------------------------------------------ lookup

    def find(self, hook: HookType, view: object) -> AnyHandler | None:
        if isinstance(view, Notification):
            return self._find_notification(view)
        if isinstance(view, Interception):
            return self._find_interception(hook, view)
        return self._nonspecific

    def _find_notification(self, view: Notification) -> AnyHandler | None:
        entity, action = view.entity_type, view.action
        candidates = (
            NotificationRoute(entity, action, view.template),
            NotificationRoute(entity, action, None),
            NotificationRoute(entity, WILDCARD, None),
            NotificationRoute(WILDCARD, action, None),
            NotificationRoute(WILDCARD, WILDCARD, None),
        )
        return _first(self._notifications, candidates)

    def _find_interception(self, hook: HookType, view: Interception) -> AnyHandler | None:
        candidates = (
            InterceptionRoute(hook, view.api_id, None),
            InterceptionRoute(hook, None, view.entity_name),
            InterceptionRoute(hook, None, None),
        )
        return _first(self._interceptions, candidates)

    # ------------------------------------------------------------ introspection

    def notification_routes(self) -> Iterator[NotificationRoute]:
        return iter(self._notifications)

    def interception_routes(self) -> Iterator[InterceptionRoute]:
        return iter(self._interceptions)

    @property
    def has_nonspecific(self) -> bool:
        return self._nonspecific is not None


def _add(table: dict[Any, AnyHandler], key: object, handler: AnyHandler) -> None:
    if key in table:
        raise ValueError(f"a handler is already registered for {key}")
    table[key] = handler


def _first(table: dict[Any, AnyHandler], keys: tuple[Any, ...]) -> AnyHandler | None:
    for key in keys:
        handler = table.get(key)
        if handler is not None:
            return handler
    return None
