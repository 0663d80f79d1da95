"""Running handlers in tests without a network: a :class:`Context`, and one event end to end.

``make_context`` gives a handler's ``ctx`` for calling it directly; ``run_event`` sends an event
through a :class:`Router` with the real :class:`~worker.dispatch.Dispatcher` (trace, JWT check,
routing, deadline, response contract) and returns the :class:`~worker.responses.Response`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, TypeVar, overload

from config.settings import Settings, load_settings
from worker.auth import JwtVerifier
from worker.client import BiotApi
from worker.dispatch import Dispatcher
from worker.events import Event, View, decode_payload, view_for
from worker.logs import CapturingLog, Log
from worker.responses import Response
from worker.routing import Context, Router
from worker.testing.events import TRACEPARENT, KeyPair, default_keys
from worker.testing.fake_api import FakeApi
from worker.tracing import TraceContext, parse_traceparent

V = TypeVar("V", bound=View)

#: Seconds a :func:`make_context` context has before its deadline, unless told otherwise.
CONTEXT_SECONDS = 30.0


def kit_settings(**env: str) -> Settings:
    """Settings of a test worker (app ``test-plugin``, environment ``test``), plus ``env``."""
    base = {
        "BIOT_BASE_URL": "http://127.0.0.1:9",
        "BIOT_SERVICE_USER_ID": "service-user",
        "BIOT_SERVICE_USER_SECRET_KEY": "s3cr3t-service-key",
        "BIOT_APP_NAME": "test-plugin",
        "BIOT_SERVICE_ENVIRONMENT": "test",
    }
    return load_settings({**base, **env})


def make_context(
    *,
    api: BiotApi | None = None,
    log: Log | None = None,
    settings: Settings | None = None,
    deadline: float | None = None,
    trace: TraceContext | None = None,
    attempt: int = 1,
) -> Context:
    """A handler's ``ctx``: ``api`` defaults to a new :class:`FakeApi`, ``log`` to a
    :class:`~worker.logs.CapturingLog`, ``trace`` to the sample trace, ``deadline`` (absolute
    ``loop.time()``) to 30 s from now; ``settings`` have their secrets removed."""
    if deadline is None:
        deadline = _loop_time() + CONTEXT_SECONDS
    if trace is None:
        trace = parse_traceparent(TRACEPARENT)
        assert trace is not None
    return Context(
        api=api if api is not None else FakeApi(),
        log=log if log is not None else CapturingLog(),
        trace=trace,
        deadline=deadline,
        settings=(settings if settings is not None else kit_settings()).public(),
        attempt=attempt,
    )


@overload
def view_of(event: Event) -> View: ...
@overload
def view_of(event: Event, kind: type[V]) -> V: ...
def view_of(event: Event, kind: type[Any] | None = None) -> Any:
    """The typed view a handler of ``event`` gets; with ``kind`` (e.g. ``PreInterception``),
    a ``TypeError`` unless the view is one."""
    view = view_for(event, decode_payload(event))
    if kind is not None and not isinstance(view, kind):
        raise TypeError(f"the event's view is {type(view).__name__}, not {kind.__name__}")
    return view


def make_dispatcher(
    routes: Router,
    *,
    api: BiotApi | None = None,
    log: Log | None = None,
    settings: Settings | None = None,
    keys: KeyPair | None = None,
) -> Dispatcher:
    """The real dispatcher over ``routes``, trusting JWTs signed by ``keys`` (default
    :func:`default_keys`), or checking none when ``settings`` switch validation off."""
    settings = settings if settings is not None else kit_settings()
    verifier = None
    if settings.biot.validate_jwt:
        verifier = JwtVerifier(static_key=(keys or default_keys()).public_b64)
    return Dispatcher(
        routes=routes,
        api=api if api is not None else FakeApi(),
        log=log if log is not None else CapturingLog(),
        settings=settings,
        verifier=verifier,
    )


async def run_event(
    routes: Router,
    event: Event,
    *,
    api: BiotApi | None = None,
    log: Log | None = None,
    settings: Settings | None = None,
    keys: KeyPair | None = None,
) -> Response:
    """Dispatch ``event`` through ``routes`` as the worker would and return the response.

    The event's deadline is counted from this call; the other arguments are those of
    :func:`make_dispatcher`. No network is used unless ``api`` uses it.
    """
    dispatcher = make_dispatcher(routes, api=api, log=log, settings=settings, keys=keys)
    return await dispatcher.dispatch(dataclasses.replace(event, received_at=_loop_time()))


def _loop_time() -> float:
    """The loop's clock, or the monotonic clock it reads when no loop runs (asyncio's default)."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()
