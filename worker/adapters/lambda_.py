"""The Lambda adapter: ``worker.adapters.lambda_.handler(event, context)``.

Deploy the worker as a BioT-managed Lambda (``handler: worker.adapters.lambda_.handler``) and
the same handlers run unchanged. The first invocation of a container builds one event loop and
one :class:`~worker.app.WorkerApp` (settings from the environment, routes from the
``module:function`` named by ``WORKER_ROUTES``); warm invocations reuse the loop, the HTTP
session, the service token and the key cache, which is where a long-lived runtime wins over
BioT's sample plugin.

The answer is a Function URL response (``statusCode``, ``headers``, ``body`` as a JSON string).
A scheduler event (no ``headers``, no ``body``) is dispatched as NONSPECIFIC with the whole
scheduler event as its body.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO, Protocol, TextIO

from config.settings import Settings, load_settings
from worker.app import WorkerApp
from worker.errors import WorkerError
from worker.events import Event, event_from_envelope
from worker.responses import Response, error_response
from worker.routing import Router, load_routes
from worker.tracing import trace_from_headers

# Leave this much of Lambda's remaining time to serialise and return the answer.
_RETURN_MARGIN = 0.05


class LambdaContext(Protocol):
    def get_remaining_time_in_millis(self) -> int: ...


class LambdaRuntime:
    """One event loop and one opened :class:`WorkerApp`, kept across warm invocations."""

    def __init__(
        self, settings: Settings, routes: Router, stream: TextIO | BinaryIO | None = None
    ) -> None:
        self.loop = asyncio.new_event_loop()
        # No listener to serve metrics from, and nothing lives past the container: none kept.
        self.app = WorkerApp(settings, routes, stream=stream, metrics=False)
        try:
            self.loop.run_until_complete(self.app.__aenter__())
        except BaseException:
            self.loop.close()  # a failed start leaves no loop (and its selector) behind
            raise

    def invoke(self, event: Any, context: LambdaContext | None) -> dict[str, Any]:
        response = self.loop.run_until_complete(self._handle_and_flush(event, context))
        return {
            "statusCode": response.status,
            "headers": dict(response.headers),
            "body": response.body.decode(),
        }

    async def _handle_and_flush(self, raw: Any, context: LambdaContext | None) -> Response:
        try:
            return await self._handle(raw, context)
        finally:
            # Lambda freezes the container once we answer: no log line (nor span) may wait.
            await self.app.flush_spans()
            await self.app.flush_log()

    async def _handle(self, raw: Any, context: LambdaContext | None) -> Response:
        received_at = self.loop.time()
        deadline = _deadline(received_at, context)
        try:
            event = self._event(raw, received_at, deadline)
        except WorkerError as exc:
            headers = raw.get("headers") if isinstance(raw, Mapping) else None
            trace = trace_from_headers(headers if isinstance(headers, Mapping) else {})
            return error_response(exc, trace, self.app.dispatcher.error_context)
        return await self.app.dispatcher.dispatch(event)

    def _event(self, raw: Any, received_at: float, deadline: float | None) -> Event:
        if isinstance(raw, Mapping) and "headers" not in raw and "body" not in raw:
            # A scheduler event: NONSPECIFIC by design, not a call that lost its hooktype.
            raw = {"headers": {"hooktype": "NONSPECIFIC"}, "body": dict(raw)}
        max_body = self.app.settings.worker.max_body_bytes
        return event_from_envelope(
            raw, received_at=received_at, max_body_bytes=max_body, deadline=deadline
        )

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.app.aclose())
        finally:
            self.loop.close()


def _deadline(now: float, context: LambdaContext | None) -> float | None:
    if context is None:
        return None
    return now + context.get_remaining_time_in_millis() / 1000 - _RETURN_MARGIN


_runtime: LambdaRuntime | None = None


def configure(
    settings: Settings | None = None,
    routes: Callable[[], Router] | Router | None = None,
    stream: TextIO | BinaryIO | None = None,
) -> LambdaRuntime:
    """Build the container's runtime (first invocation does this with the environment).

    ``routes`` defaults to the plugin named by ``WORKER_ROUTES``; ``stream`` is where log lines
    go (default stdout, which Lambda sends to CloudWatch).
    """
    global _runtime
    shutdown()
    if settings is None:
        settings = load_settings(os.environ)
    if routes is None:
        router = load_routes(settings.worker.routes)
    else:
        router = routes() if callable(routes) else routes
    _runtime = LambdaRuntime(settings, router, stream)
    return _runtime


def shutdown() -> None:
    """Close the runtime (tests; a real container is simply frozen and discarded)."""
    global _runtime
    runtime, _runtime = _runtime, None
    if runtime is not None:
        runtime.close()


def handler(event: Any, context: LambdaContext | None = None) -> dict[str, Any]:
    """The Lambda entry point."""
    runtime = _runtime or configure()
    return runtime.invoke(event, context)
