"""biot-worker: a long-lived asyncio worker for BioT plugins.

Everything a plugin's handlers touch is importable from here::

    from worker import Block, Context, Notification, PreInterception, Router

A handler is ``async def handler(view, ctx)``: ``view`` is the event's typed view
(:class:`Notification`, :class:`PreInterception`, :class:`PostInterception`,
:class:`AdaptEntityInterception`, :class:`NonSpecific`), ``ctx`` a :class:`Context`. The
plugin's ``build_routes()`` returns a :class:`Router` listing its handlers; ``WORKER_ROUTES``
names it (default ``handlers:build_routes``).
"""

from worker.client import BiotApi, fan_out
from worker.errors import (
    ApiAuthError,
    ApiError,
    Block,
    DeadlineExceeded,
    TransientApiError,
    WorkerError,
)
from worker.logs import Log
from worker.routing import Context, Route, RouteError, Router
from worker.tracing import TraceContext
from worker.version import __version__
from worker.views import (
    AdaptEntityInterception,
    HookType,
    InterceptedRequest,
    NonSpecific,
    Notification,
    PostInterception,
    PreInterception,
    StatusCode,
)

__all__ = [
    "AdaptEntityInterception",
    "ApiAuthError",
    "ApiError",
    "BiotApi",
    "Block",
    "Context",
    "DeadlineExceeded",
    "HookType",
    "InterceptedRequest",
    "Log",
    "NonSpecific",
    "Notification",
    "PostInterception",
    "PreInterception",
    "Route",
    "RouteError",
    "Router",
    "StatusCode",
    "TraceContext",
    "TransientApiError",
    "WorkerError",
    "__version__",
    "fan_out",
]
