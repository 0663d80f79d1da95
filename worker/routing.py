"""The plugin's routing table, the :class:`Context` a handler gets, and loading a plugin.

Handlers are plain ``async def handler(view, ctx)`` functions registered by explicit calls, the
handler first, then what it answers (no decorators, no discovery)::

    router = Router()
    router.notification(on_patient_created, entity="patient", action="_create")
    router.pre(rename_patient, api_id="PATCH/organization/v1/users/patients/{id}", order=1)
    router.adapt_entity(decorate_patient, entity="patient")
    router.nonspecific(nightly_job)

The contract of each hook: a NOTIFICATION handler returns ``None`` (BioT ignores its answer);
PRE, POST and ADAPT_ENTITY handlers change the view in place (``view.request``, ``view.body``,
``view.entities``, ``view.status``) or raise :class:`~worker.errors.Block`, and return ``None``;
a NONSPECIFIC handler returns the JSON value to answer with (or ``None`` for an empty 200).

Lookup: notifications by (entity type, action, template), then without the template, then the
``"*"`` wildcards; interceptors by ``apiId``, then by entity name. The :class:`Route` records are
the single source of what the plugin subscribes to (``order`` is the interceptor's execution
order among the plugins on the same API).
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config.settings import Settings
from worker.client import BiotApi
from worker.logs import Log
from worker.tracing import TraceContext
from worker.views import (
    AdaptEntityInterception,
    HookType,
    Interception,
    NonSpecific,
    Notification,
    PostInterception,
    PreInterception,
    View,
)

WILDCARD = "*"


@dataclass(slots=True)
class Context:
    """What a handler gets besides its event's view; holds no secret and no platform JWT."""

    #: The BioT API, authenticated with the plugin's service token and carrying the trace.
    api: BiotApi
    #: The log, bound to this event's trace id and hook.
    log: Log
    #: The event's W3C trace context.
    trace: TraceContext
    #: The absolute ``loop.time()`` by which the handler must be done.
    deadline: float
    #: The worker's settings with every secret removed.
    settings: Settings = field(default_factory=Settings)
    #: Which delivery of this event this is (1 unless a queue delivered it again).
    attempt: int = 1

    def remaining(self) -> float:
        """Seconds left before this event's deadline."""
        return self.deadline - asyncio.get_running_loop().time()


NotificationHandler = Callable[[Notification, Context], Awaitable[None]]
PreHandler = Callable[[PreInterception, Context], Awaitable[None]]
PostHandler = Callable[[PostInterception, Context], Awaitable[None]]
AdaptEntityHandler = Callable[[AdaptEntityInterception, Context], Awaitable[None]]
NonSpecificHandler = Callable[[NonSpecific, Context], Awaitable[Any]]
Handler = Callable[[Any, Context], Awaitable[Any]]

#: The subscription type BioT's APIs use for each interceptor hook.
INTERCEPTION_TYPES = {
    HookType.INTERCEPTOR_PRE: "PRE_REQUEST",
    HookType.INTERCEPTOR_POST: "POST_REQUEST",
    HookType.INTERCEPTOR_POST_ENTITY: "ADAPT_ENTITY",
}


class RouteError(ValueError):
    """A routing table or a plugin that cannot be used; the message is one line for the user."""


@dataclass(frozen=True, slots=True)
class Route:
    """One registered handler and what it answers: the source of the plugin's subscriptions."""

    hook: HookType
    handler: Handler = field(compare=False)
    entity: str | None = None
    action: str | None = None
    template: str | None = None
    api_id: str | None = None
    order: int | None = field(default=None, compare=False)

    @property
    def handler_name(self) -> str:
        """``module.function`` of the handler, as errors and listings name it."""
        return handler_name(self.handler)

    @property
    def subscribable(self) -> bool:
        """Whether BioT can subscribe this route: notifications without a wildcard, PRE and
        POST by ``apiId``, ADAPT_ENTITY by entity name (BioT's subscription API takes no other)."""
        if self.hook is HookType.NOTIFICATION:
            return WILDCARD not in (self.entity, self.action)
        if self.hook is HookType.INTERCEPTOR_POST_ENTITY:
            return self.entity is not None
        if self.hook.is_interceptor:
            return self.api_id is not None
        return False

    def describe(self) -> str:
        """One line, e.g. ``PRE_REQUEST apiId=PATCH/... order=1``."""
        if self.hook is HookType.NOTIFICATION:
            text = f"NOTIFICATION {self.entity}/{self.action}"
            return text + (f" template={self.template}" if self.template else "")
        if self.hook is HookType.NONSPECIFIC:
            return "NONSPECIFIC"
        kind = INTERCEPTION_TYPES[self.hook]
        text = f"{kind} apiId={self.api_id}" if self.api_id else f"{kind} entity={self.entity}"
        return text + (f" order={self.order}" if self.order is not None else "")


def handler_name(handler: Callable[..., Any]) -> str:
    module = getattr(handler, "__module__", None) or "?"
    name = getattr(handler, "__qualname__", None) or type(handler).__name__
    return f"{module}.{name}"


class Router:
    """The explicit table of a plugin's handlers; one handler per route."""

    def __init__(self) -> None:
        self._routes: dict[tuple[Any, ...], Route] = {}
        self._nonspecific: Route | None = None

    # ------------------------------------------------------------ registration

    def notification(
        self,
        handler: NotificationHandler,
        *,
        entity: str,
        action: str,
        template: str | None = None,
    ) -> Router:
        """Run ``handler`` after ``action`` succeeded on an ``entity`` (``"*"`` matches any)."""
        _check_handler(handler, "notification")
        _check_name(entity, "entity")
        _check_name(action, "action")
        route = Route(HookType.NOTIFICATION, handler, entity, action, template)
        return self._add(_notification_key(entity, action, template), route)

    def pre(
        self,
        handler: PreHandler,
        *,
        api_id: str | None = None,
        entity: str | None = None,
        order: int | None = None,
    ) -> Router:
        """Before BioT handles a call: change ``view.request`` in place, or raise ``Block``."""
        return self._interception(HookType.INTERCEPTOR_PRE, handler, api_id, entity, order)

    def post(
        self,
        handler: PostHandler,
        *,
        api_id: str | None = None,
        entity: str | None = None,
        order: int | None = None,
    ) -> Router:
        """After BioT handled a call: change ``view.body``/``view.status`` in place."""
        return self._interception(HookType.INTERCEPTOR_POST, handler, api_id, entity, order)

    def adapt_entity(
        self,
        handler: AdaptEntityHandler,
        *,
        api_id: str | None = None,
        entity: str | None = None,
        order: int | None = None,
    ) -> Router:
        """Before BioT returns entities: change the dicts of ``view.entities`` in place."""
        hook = HookType.INTERCEPTOR_POST_ENTITY
        return self._interception(hook, handler, api_id, entity, order)

    def nonspecific(self, handler: NonSpecificHandler) -> Router:
        """Direct and scheduled calls; the handler's return value is the JSON answer."""
        _check_handler(handler, "nonspecific")
        route = Route(HookType.NONSPECIFIC, handler)
        if self._nonspecific is not None:
            raise _duplicate(route, self._nonspecific)
        self._nonspecific = route
        return self

    def include(self, other: Router) -> Router:
        """Add every route of ``other`` (a plugin assembled from several modules)."""
        for key, route in other._routes.items():
            self._add(key, route)
        if other._nonspecific is not None:
            self.nonspecific(other._nonspecific.handler)
        return self

    def _interception(
        self,
        hook: HookType,
        handler: Handler,
        api_id: str | None,
        entity: str | None,
        order: int | None,
    ) -> Router:
        kind = INTERCEPTION_TYPES[hook]
        _check_handler(handler, kind)
        if (api_id is None) == (entity is None):
            raise RouteError(f"{kind} route of {handler_name(handler)}: give api_id or entity")
        if api_id is not None:
            _check_name(api_id, "api_id")
        if entity is not None:
            _check_name(entity, "entity")
        if order is not None and (isinstance(order, bool) or not isinstance(order, int)):
            raise RouteError(f"{kind} route of {handler_name(handler)}: order must be an int")
        route = Route(hook, handler, entity=entity, api_id=api_id, order=order)
        return self._add((hook, api_id, entity), route)

    def _add(self, key: tuple[Any, ...], route: Route) -> Router:
        existing = self._routes.get(key)
        if existing is not None:
            raise _duplicate(route, existing)
        self._routes[key] = route
        return self

    # ------------------------------------------------------------ lookup

    def find(self, hook: HookType, view: View) -> Handler | None:
        """The handler for ``view``, or ``None`` when the plugin has none."""
        if isinstance(view, Notification):
            return self._find_notification(view)
        if isinstance(view, Interception):
            return self._find_interception(hook, view)
        return self._nonspecific.handler if self._nonspecific is not None else None

    def _find_notification(self, view: Notification) -> Handler | None:
        entity, action, routes = view.entity_type, view.action, self._routes
        template = view.template
        for key in (
            _notification_key(entity, action, template) if template else None,
            _notification_key(entity, action, None),
            _notification_key(entity, WILDCARD, None),
            _notification_key(WILDCARD, action, None),
            _notification_key(WILDCARD, WILDCARD, None),
        ):
            route = routes.get(key) if key is not None else None
            if route is not None:
                return route.handler
        return None

    def _find_interception(self, hook: HookType, view: Interception) -> Handler | None:
        route = self._routes.get((hook, view.api_id, None)) or self._routes.get(
            (hook, None, view.entity_name)
        )
        return route.handler if route is not None else None

    # ------------------------------------------------------------ introspection

    def __iter__(self) -> Iterator[Route]:
        """Every route, in registration order (the nonspecific one last)."""
        yield from self._routes.values()
        if self._nonspecific is not None:
            yield self._nonspecific

    def __len__(self) -> int:
        return len(self._routes) + (self._nonspecific is not None)

    @property
    def has_nonspecific(self) -> bool:
        return self._nonspecific is not None


def _notification_key(entity: str, action: str, template: str | None) -> tuple[Any, ...]:
    return (HookType.NOTIFICATION, entity, action, template)


def _check_handler(handler: object, kind: str) -> None:
    if not callable(handler):
        raise RouteError(f"{kind} route: the handler must come first, got {handler!r}")


def _check_name(value: object, what: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise RouteError(f"route {what} must be a non-empty string, got {value!r}")


def _duplicate(new: Route, existing: Route) -> RouteError:
    return RouteError(
        f"duplicate route {new.describe()}: {existing.handler_name} and {new.handler_name}"
    )


# ---------------------------------------------------------------- loading a plugin


def load_routes(reference: str) -> Router:
    """Import ``module`` of ``module:function`` and call ``function()`` for the :class:`Router`.

    Raises :class:`RouteError` with one line naming the file and line of a syntax or import
    error in the plugin, a missing function, or a function that returns no ``Router``.
    """
    module_name, _, function_name = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing == module_name or module_name.startswith(missing + "."):
            raise RouteError(f"WORKER_ROUTES={reference}: no module named {exc.name!r}") from None
        raise RouteError(f"WORKER_ROUTES={reference}: {_where(exc)}") from None
    except Exception as exc:  # the plugin's own error at import: name its file and line
        raise RouteError(f"WORKER_ROUTES={reference}: {_where(exc)}") from None
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise RouteError(f"WORKER_ROUTES={reference}: {module_name} has no {function_name}()")
    try:
        routes = factory()
    except RouteError as exc:
        raise RouteError(f"WORKER_ROUTES={reference}: {exc}") from None
    except Exception as exc:
        raise RouteError(f"WORKER_ROUTES={reference}: {_where(exc)}") from None
    if not isinstance(routes, Router):
        kind = type(routes).__name__
        raise RouteError(f"WORKER_ROUTES={reference}: {function_name}() returned {kind}")
    return routes


def _where(exc: BaseException) -> str:
    """``file:line: Type: message`` of the innermost frame of ``exc`` outside the import system."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{_short(exc.filename)}:{exc.lineno}: {type(exc).__name__}: {exc.msg}"
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if not frame.filename.startswith("<frozen") and frame.filename != __file__
    ]
    message = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if not frames:
        return message
    frame = frames[-1]
    return f"{_short(frame.filename)}:{frame.lineno}: {message}"


def _short(filename: str) -> str:
    path = Path(filename)
    for root in (Path.cwd(), *(Path(p) for p in sys.path if p)):
        try:
            return str(path.relative_to(root))
        except ValueError:
            continue
    return filename
