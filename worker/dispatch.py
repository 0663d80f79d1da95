"""The dispatcher: the one core callable, ``dispatch(event) -> Response``.

For each event: bind the trace, authenticate the platform's JWT, build the hook's typed view,
route it, run the handler under the hook's deadline with a :class:`Context`, and map the result
or the error to the hook's response contract. Adapters (HTTP, Lambda, queues) are thin shells
around :meth:`Dispatcher.dispatch`; it never raises for anything a caller sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from config.settings import Settings
from worker.auth import JwtVerifier
from worker.client import BiotApi
from worker.errors import AuthError, DeadlineExceeded, WorkerError
from worker.events import (
    AdaptEntityInterception,
    Event,
    HookType,
    NonSpecific,
    Notification,
    PostInterception,
    PreInterception,
    View,
    decode_payload,
    event_token,
    require_object,
    view_for,
)
from worker.logs import Log
from worker.responses import (
    ErrorContext,
    Response,
    adapt_entity_response,
    empty_response,
    error_response,
    json_response,
    post_response,
    pre_response,
)
from worker.routing import Context, Handler, Router, handler_name
from worker.tracing import (
    QueuedTimeout,
    Span,
    Spans,
    TimeoutQueue,
    TraceContext,
    current_deadline,
    current_span_id,
    current_trace,
)

if TYPE_CHECKING:  # prometheus-client is imported only when metrics are on
    from worker.metrics import Metrics

_NAMES: Final = {hook: hook.value for hook in HookType}  # HookType.value is a Python property


class TokenVerifier(Protocol):
    """Checks the platform's JWT for a hook's scope; raises :class:`AuthError` if it fails."""

    async def verify(self, token: str, scope: str | None) -> Mapping[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """A dispatched event's response, and the error that produced it when it failed."""

    response: Response
    error: WorkerError | None = None
    #: The event's own span id while spans are exported (its log lines carry it).
    span_id: str | None = None

    @property
    def transient(self) -> bool:
        """Whether trying the same event again later may succeed (see :mod:`worker.errors`)."""
        return self.error is not None and self.error.transient


class Dispatcher:
    def __init__(
        self,
        *,
        routes: Router,
        api: BiotApi,
        log: Log,
        settings: Settings,
        verifier: TokenVerifier | None,
        metrics: Metrics | None = None,
        spans: Spans | None = None,
    ) -> None:
        """``verifier=None`` switches JWT validation off (``BIOT_SHOULD_VALIDATE_JWT=false``);
        ``metrics`` counts each event, ``spans`` (exported traces) gives each its own span."""
        self._routes = routes
        self._metrics = metrics
        self._spans = spans
        self._api = api
        self._log = log
        self._settings = settings
        self._public_settings = settings.public()
        self._verifier = verifier
        # JwtVerifier answers from its cache without a coroutine; any other verifier (a test's,
        # a plugin's) is awaited, whatever attributes it has: a look-alike's truthy answer
        # (a Mock's, a coroutine's) must never pass a token.
        self._verify_cached: Callable[[str, str | None], bool] | None = (
            verifier.verify_cached if isinstance(verifier, JwtVerifier) else None
        )
        biot, worker = settings.biot, settings.worker
        self._errors = ErrorContext(biot.app_name, biot.environment)
        self._scopes = {
            HookType.NOTIFICATION: biot.notification_scope,
            HookType.INTERCEPTOR_PRE: biot.interception_scope,
            HookType.INTERCEPTOR_POST: biot.interception_scope,
            HookType.INTERCEPTOR_POST_ENTITY: biot.interception_scope,
            HookType.NONSPECIFIC: biot.nonspecific_scope,
        }
        self._budgets = {
            HookType.NOTIFICATION: worker.deadline_notification,
            HookType.INTERCEPTOR_PRE: worker.deadline_interceptor,
            HookType.INTERCEPTOR_POST: worker.deadline_interceptor,
            HookType.INTERCEPTOR_POST_ENTITY: worker.deadline_interceptor,
            HookType.NONSPECIFIC: worker.deadline_nonspecific,
        }
        self._hook_logs = {hook: log.bind(hook=hook.value) for hook in HookType}
        self._deadlines = {hook: TimeoutQueue() for hook in HookType}

    @property
    def error_context(self) -> ErrorContext:
        return self._errors

    async def dispatch(self, event: Event) -> Response:
        """Answer one event. Never raises, except ``CancelledError`` when the caller cancels."""
        if self._spans is not None:
            return (await self._handle_in_span(event, self._spans)).response
        return (await self._handle_counted(event, event.trace)).response

    async def handle(self, event: Event) -> Outcome:
        """Like :meth:`dispatch`, and say why it failed (queue adapters retry transient ones)."""
        if self._spans is not None:
            return await self._handle_in_span(event, self._spans)
        return await self._handle_counted(event, event.trace)

    async def _handle_in_span(self, event: Event, spans: Spans) -> Outcome:
        """:meth:`handle` in the event's own span, whose id the trace and log lines carry."""
        span = spans.event(event.hook.value, event.trace, event.transport)
        bound = current_span_id.set(span.context.span_id)
        try:
            outcome = await self._handle_counted(event, span.context)
        except BaseException as exc:  # cancelled (a shutdown): the span says so
            _finish(span, None, exc)
            raise
        finally:
            current_span_id.reset(bound)
        _finish(span, outcome.response.status, outcome.error)
        return dataclasses.replace(outcome, span_id=span.context.span_id)

    def refuse(
        self,
        hook: HookType,
        trace: TraceContext,
        error: WorkerError,
        received_at: float,
        transport: Mapping[str, Any] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        log: bool = True,
    ) -> Outcome:
        """Answer an event its adapter refused before it could be dispatched (too large, too
        slow, too many in flight, unreadable): counted, traced and (with ``log``) logged as a
        dispatched event is, under ``trace`` (what its headers named)."""
        span = None
        if self._spans is not None:
            span = self._spans.event(hook.value, trace, transport)
            trace = span.context
        response = error_response(error, trace, self._errors, headers)
        if log:
            bound_trace = current_trace.set(trace)
            bound_span = current_span_id.set(None if span is None else trace.span_id)
            self._hook_logs[hook].warning("event refused", status=error.status, code=error.code)
            current_span_id.reset(bound_span)
            current_trace.reset(bound_trace)
        if self._metrics is not None:
            elapsed = asyncio.get_running_loop().time() - received_at
            self._metrics.event_answered(hook.value, error.status, elapsed)
        if span is None:
            return Outcome(response, error)
        _finish(span, error.status, error)
        return Outcome(response, error, span.context.span_id)

    async def _handle_counted(self, event: Event, trace: TraceContext) -> Outcome:
        reset = current_trace.set(trace)
        metrics = self._metrics
        if metrics is not None:
            metrics.event_started()
        outcome: Outcome | None = None
        try:
            outcome = await self._answer(event, trace)
            elapsed = asyncio.get_running_loop().time() - event.received_at
            self._log_outcome(event, outcome.response, elapsed)
            if metrics is not None:
                metrics.event_finished(_NAMES[event.hook], outcome.response.status, elapsed)
            return outcome
        finally:
            current_trace.reset(reset)
            if outcome is None and metrics is not None:  # cancelled: in flight no more
                metrics.event_abandoned()

    async def _answer(self, event: Event, trace: TraceContext) -> Outcome:
        try:
            return Outcome(await self._handle(event, trace))
        except WorkerError as exc:
            return Outcome(error_response(exc, trace, self._errors), exc)
        except Exception:  # a handler's bug: logged with its traceback, never sent to BioT
            self._hook_logs[event.hook].exception("handler raised an unexpected error")
            failure = WorkerError("internal error in plugin handler")
            return Outcome(error_response(failure, trace, self._errors), failure)

    async def _handle(self, event: Event, trace: TraceContext) -> Response:
        if not event.hook_known:
            self._log.warning(
                "missing or unknown hooktype header; handled as NONSPECIFIC",
                hooktype=(event.headers.get("hooktype") or "")[:64],
            )
        payload = decode_payload(event)
        if event.hook is not HookType.NONSPECIFIC:
            require_object(payload, _NAMES[event.hook])
        verifying = self._authenticate(event, payload)
        if verifying is not None:
            await verifying
        view = view_for(event, payload)
        handler = self._routes.find(event.hook, view)
        if handler is None:
            return self._unhandled(event, view, trace)
        result = await self._run(handler, view, event, trace)
        if result is not None and not isinstance(view, NonSpecific):
            raise WorkerError(
                f"{event.hook.value} handler {handler_name(handler)} returned "
                f"{type(result).__name__}; it must change the view in place and return None",
                code="HANDLER_CONTRACT",
            )
        return self._success(view, result, trace)

    def _authenticate(self, event: Event, payload: Any) -> Awaitable[None] | None:
        """Check the event's JWT: done here when the verifier has the token's claims cached
        (nearly every event: BioT reuses its tokens), else what to await."""
        if self._verifier is None:
            return None
        try:
            token = event_token(event.hook, event.headers, payload)
            if token is None:
                if event.hook is HookType.NONSPECIFIC and self._allow_anonymous_nonspecific:
                    return None
                raise AuthError("the event carries no JWT", reason="missing")
            scope = self._scopes[event.hook]
            if self._verify_cached is not None and self._verify_cached(token, scope):
                return None
        except AuthError as exc:
            self._jwt_refused(exc)
            raise
        return self._verify(token, scope)

    async def _verify(self, token: str, scope: str | None) -> None:
        assert self._verifier is not None
        try:
            await self._verifier.verify(token, scope)
        except AuthError as exc:
            self._jwt_refused(exc)
            raise

    def _jwt_refused(self, error: AuthError) -> None:
        if self._metrics is not None:
            self._metrics.jwt_refused(error.reason)

    @property
    def _allow_anonymous_nonspecific(self) -> bool:
        return self._settings.worker.allow_nonspecific_without_jwt

    def deadline_for(self, event: Event) -> float:
        deadline = event.received_at + self._budgets[event.hook]
        return deadline if event.deadline is None else min(deadline, event.deadline)

    async def _run(self, handler: Handler, view: View, event: Event, trace: TraceContext) -> Any:
        deadline = self.deadline_for(event)
        ctx = Context(
            self._api,
            self._hook_logs[event.hook],
            trace,
            deadline,
            self._public_settings,
            event.attempt,
        )
        bound = current_deadline.set(deadline)
        timeout = QueuedTimeout(deadline, self._deadlines[event.hook])
        timeout.enter()  # as `async with timeout:` does, without two coroutines per event
        try:
            try:
                result = await handler(view, ctx)
            except BaseException as exc:
                timeout.leave(exc)  # raises TimeoutError for a cancellation it caused
                raise
            timeout.leave(None)
            return result
        except TimeoutError:
            if timeout.expired():
                budget = self._budgets[event.hook]
                raise DeadlineExceeded(
                    f"{event.hook.value} handler did not finish within its deadline",
                    details={"deadlineSeconds": budget},
                ) from None
            raise
        finally:
            current_deadline.reset(bound)

    def _unhandled(self, event: Event, view: View, trace: TraceContext) -> Response:
        if isinstance(view, NonSpecific):
            raise WorkerError("no handler for nonspecific calls", status=404, code="NO_HANDLER")
        if isinstance(view, Notification):
            self._log.debug(
                "no handler for notification", entity=view.entity_type, action=view.action
            )
        # An interceptor with no handler passes the payload through unchanged.
        return self._success(view, None, trace)

    def _success(self, view: View, result: Any, trace: TraceContext) -> Response:
        if isinstance(view, Notification):
            return empty_response(trace)
        if isinstance(view, PreInterception):
            return pre_response(view, trace)
        if isinstance(view, PostInterception):
            return post_response(view, trace)
        if isinstance(view, AdaptEntityInterception):
            return adapt_entity_response(view, trace)
        if isinstance(result, Response):
            return result
        return empty_response(trace) if result is None else json_response(result, trace)

    def _log_outcome(self, event: Event, response: Response, elapsed: float) -> None:
        log = self._hook_logs[event.hook]
        duration_ms = round(elapsed * 1000, 3)
        if response.status < 400:
            log.info("event handled", status=response.status, duration_ms=duration_ms)
            return
        error = response.json() or {}
        emit = log.warning if response.status < 500 else log.error
        emit(
            "event refused" if response.status < 500 else "event failed",
            status=response.status,
            duration_ms=duration_ms,
            code=error.get("code"),
            reason=error.get("message"),
        )


def _finish(span: Span, status: int | None, error: BaseException | None) -> None:
    """End ``span``; a failing exporter never fails the event it traced."""
    with contextlib.suppress(Exception):  # telemetry must not take an event down with it
        span.finish(status, error)
