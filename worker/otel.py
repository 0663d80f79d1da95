"""OpenTelemetry spans of events and of their BioT calls, exported over OTLP/HTTP.

The optional ``otel`` extra: :class:`~worker.app.WorkerApp` imports this module only when the
standard ``OTEL_*`` variables ask for spans (an OTLP endpoint is set), and without the extra or
the variable nothing of OpenTelemetry is imported. :class:`OtelSpans` implements
:class:`worker.tracing.Spans`:

- each event is a ``SERVER`` span (a ``CONSUMER`` span when its carrier names a
  ``messaging.system``) continuing BioT's incoming ``traceparent``: same trace id, BioT's span
  as its parent; named after the hook (``INTERCEPTOR_PRE``) or ``process <destination>``;
  attributes: the carrier's (HTTP or messaging semantic conventions), ``biot.hook.type``, and
  on finish ``http.response.status_code`` (``biot.response.status_code`` for a consumer span)
  and ``error.type`` when it failed (the :class:`~worker.errors.WorkerError`'s ``code``, else the
  exception's class). Its status is ERROR when no answer was given (a cancelled event), the
  answer is a 5xx, or the deadline passed; a 4xx (a refused JWT, a handler's ``Block``) leaves
  it unset, as the conventions say for a server;
- each attempt of a BioT call is a ``CLIENT`` span under the event's span (a new trace outside
  any event), named after its method, whose span id is the one the call's ``traceparent``
  carries; attributes ``http.request.method``, ``url.full`` (never a query string),
  ``server.address``, ``server.port``, ``http.request.resend_count`` for a retry, on finish
  ``http.response.status_code`` and ``error.type`` (the status for a 4xx/5xx,
  ``DEADLINE_EXCEEDED`` when the event's deadline cut it, else the exception's class); ERROR
  when no answer came or the status is 4xx/5xx.

Configuration is read from the mapping given (the settings' ``OTEL_*`` variables), with
OpenTelemetry's names and defaults (the SDK itself still reads ``os.environ`` for what is not
passed to it: span limits, ``OTEL_SDK_DISABLED``, and headers or certificate paths the mapping
lacks; in a worker process the two hold the same variables):

- ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (used as is), else ``OTEL_EXPORTER_OTLP_ENDPOINT`` plus
  ``/v1/traces``; ``..._HEADERS`` (``k=v,k2=v2``, URL-encoded values; never logged),
  ``..._TIMEOUT`` (milliseconds, as the specification says; the Python SDK alone reads seconds),
  ``..._COMPRESSION`` (``gzip`` or ``none``), ``..._CERTIFICATE``, ``..._CLIENT_KEY``,
  ``..._CLIENT_CERTIFICATE``, each ``TRACES_`` first;
- ``..._PROTOCOL``: only ``http/protobuf`` is supported. Another value (``grpc``,
  ``http/json``) logs one warning and spans are still sent as OTLP/HTTP protobuf to the
  endpoint given; point it at the collector's HTTP port (4318). Likewise an
  ``OTEL_TRACES_EXPORTER`` other than ``otlp`` (``none`` turns spans off: see
  ``WorkerSettings.otel_requested``);
- ``OTEL_BSP_SCHEDULE_DELAY``, ``OTEL_BSP_MAX_QUEUE_SIZE``, ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``,
  ``OTEL_BSP_EXPORT_TIMEOUT`` for the batch processor;
- the resource: ``service.name`` from ``OTEL_SERVICE_NAME``, else ``OTEL_RESOURCE_ATTRIBUTES``,
  else ``BIOT_APP_NAME``; ``service.version`` (biot-worker's), ``deployment.environment.name``
  (``BIOT_SERVICE_ENVIRONMENT``) and the rest of ``OTEL_RESOURCE_ATTRIBUTES``;
- ``OTEL_TRACES_SAMPLER`` (and ``_ARG``) by its standard names. **When it is unset the sampler
  is ``always_on``, not the SDK's ``parentbased_always_on``**: BioT sends its ``traceparent``
  with the flags ``00`` (it records nothing itself), and a parent-based sampler would drop every
  event. The spans' own contexts, and so the ``traceparent`` of the calls to BioT, carry ``01``
  once sampled.

Each instance has its own ``TracerProvider`` (the global one is never set: several workers may
share a process) and a ``BatchSpanProcessor``, which exports in the SDK's own thread. Nothing here
raises into the event it traces nor blocks the event loop: :meth:`OtelSpans.flush` and leaving
the block run the SDK's flush and shutdown in a daemon thread, bounded by :data:`FLUSH_SECONDS`,
and log one warning when spans could not be exported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from functools import lru_cache
from types import TracebackType
from typing import Any, Final
from urllib.parse import unquote, urlsplit

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_OFF,
    DEFAULT_ON,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.sdk.version import __version__ as sdk_version
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    Tracer,
    set_span_in_context,
)
from opentelemetry.trace import Span as OtelSpan

from worker.errors import DeadlineExceeded, WorkerError
from worker.logs import Log
from worker.tracing import Span, TraceContext, new_trace
from worker.version import __version__

__all__ = ["FLUSH_SECONDS", "OtelSpans"]

#: How long :meth:`OtelSpans.flush` and the shutdown may take (a Lambda waits on the flush).
FLUSH_SECONDS: Final = 5.0
_PROTOCOL: Final = "http/protobuf"
_OTLP: Final = "OTEL_EXPORTER_OTLP_"
_DEFAULT_ENDPOINT: Final = "http://localhost:4318"
_DEFAULT_TIMEOUT_MS: Final = 10_000
_EMPTY: Final = Context()  # never the global current context: someone else's spans stay theirs
_SCHEMES: Final = {"http": 80, "https": 443}
_BSP: Final = (  # variable, BatchSpanProcessor argument, default (the specification's)
    ("OTEL_BSP_MAX_QUEUE_SIZE", "max_queue_size", 2048),
    ("OTEL_BSP_SCHEDULE_DELAY", "schedule_delay_millis", 5000),
    ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "max_export_batch_size", 512),
    ("OTEL_BSP_EXPORT_TIMEOUT", "export_timeout_millis", 30000),
)
_SAMPLERS: Final[Mapping[str, Sampler]] = {
    "always_on": ALWAYS_ON,
    "always_off": ALWAYS_OFF,
    "parentbased_always_on": DEFAULT_ON,
    "parentbased_always_off": DEFAULT_OFF,
}
_RATIO_SAMPLERS: Final[Mapping[str, Callable[[float], Sampler]]] = {
    "traceidratio": TraceIdRatioBased,
    "parentbased_traceidratio": ParentBasedTraceIdRatio,
}


# ---------------------------------------------------------------- configuration


def _value(env: Mapping[str, str], *names: str) -> str | None:
    """The first of ``names`` set to something other than blanks, stripped."""
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return value
    return None


def _otlp(env: Mapping[str, str], name: str) -> str | None:
    """``OTEL_EXPORTER_OTLP_TRACES_<name>``, else ``OTEL_EXPORTER_OTLP_<name>``."""
    return _value(env, f"{_OTLP}TRACES_{name}", f"{_OTLP}{name}")


def traces_endpoint(env: Mapping[str, str]) -> str:
    """Where spans are sent: the traces endpoint as given, else the base one + ``/v1/traces``."""
    given = _value(env, f"{_OTLP}TRACES_ENDPOINT")
    if given is not None:
        return given
    base = _value(env, f"{_OTLP}ENDPOINT") or _DEFAULT_ENDPOINT
    return base.rstrip("/") + "/v1/traces"


def public_endpoint(url: str) -> str:
    """``url`` as it may be logged: no user information, query or fragment."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(unreadable URL)"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{port}{parts.path}"


def parse_pairs(text: str, what: str, log: Log) -> dict[str, str]:
    """``k=v,k2=v2`` with URL-encoded keys and values (OTLP headers, resource attributes); an
    entry without ``=`` or a key is left out with a warning that never shows its value."""
    pairs: dict[str, str] = {}
    for number, entry in enumerate(text.split(","), 1):
        if not entry.strip():
            continue
        key, sep, value = entry.partition("=")
        key = unquote(key).strip()
        if not sep or not key:
            log.warning("an entry is not key=value; left out", variable=what, entry=number)
            continue
        pairs[key] = unquote(value).strip()
    return pairs


def _headers(env: Mapping[str, str], log: Log) -> dict[str, str]:
    name = f"{_OTLP}TRACES_HEADERS" if _value(env, f"{_OTLP}TRACES_HEADERS") else f"{_OTLP}HEADERS"
    text = _value(env, name)
    if text is None:
        return {}
    return {key.lower(): value for key, value in parse_pairs(text, name, log).items()}


def _number(env: Mapping[str, str], name: str, default: int, log: Log) -> int:
    text = _value(env, name)
    if text is None:
        return default
    try:
        number = int(float(text))
    except ValueError:
        number = -1
    if number < 0 or (number == 0 and not name.endswith("_TIMEOUT")):
        log.warning("not a usable number; the default is used", variable=name, default=default)
        return default
    return number


def _timeout_seconds(env: Mapping[str, str], log: Log) -> float:
    name = f"{_OTLP}TRACES_TIMEOUT" if _value(env, f"{_OTLP}TRACES_TIMEOUT") else f"{_OTLP}TIMEOUT"
    millis = _number(env, name, _DEFAULT_TIMEOUT_MS, log)
    return millis / 1000 if millis > 0 else _DEFAULT_TIMEOUT_MS / 1000


def _compression(env: Mapping[str, str], log: Log) -> Compression:
    value = (_otlp(env, "COMPRESSION") or "none").lower()
    if value == "gzip":
        return Compression.Gzip
    if value != "none":
        log.warning("OTLP compression must be gzip or none; none is used", compression=value)
    return Compression.NoCompression


def _check_protocol(env: Mapping[str, str], log: Log) -> None:
    exporters = {name.strip().lower() for name in env.get("OTEL_TRACES_EXPORTER", "").split(",")}
    if exporters - {"", "otlp"}:
        log.warning("only the otlp traces exporter is supported; spans are sent over OTLP",
                    exporter=env.get("OTEL_TRACES_EXPORTER"))  # fmt: skip
    protocol = _otlp(env, "PROTOCOL")
    if protocol is not None and protocol.lower() != _PROTOCOL:
        log.warning(
            "only the http/protobuf OTLP protocol is supported; spans are sent as OTLP/HTTP "
            "protobuf to the endpoint given (a collector's HTTP port, 4318)",
            protocol=protocol,
        )


def batch_settings(env: Mapping[str, str], log: Log) -> dict[str, int]:
    """The batch processor's arguments from ``OTEL_BSP_*`` (the specification's defaults)."""
    settings = {argument: _number(env, name, default, log) for name, argument, default in _BSP}
    if settings["max_export_batch_size"] > settings["max_queue_size"]:
        log.warning("OTEL_BSP_MAX_EXPORT_BATCH_SIZE exceeds OTEL_BSP_MAX_QUEUE_SIZE; it is cut")
        settings["max_export_batch_size"] = settings["max_queue_size"]
    return settings


def make_sampler(env: Mapping[str, str], log: Log) -> tuple[str, Sampler]:
    """``OTEL_TRACES_SAMPLER`` (and ``_ARG``); ``always_on`` when unset (see the module doc)."""
    name = (_value(env, "OTEL_TRACES_SAMPLER") or "always_on").lower()
    if name in _SAMPLERS:
        return name, _SAMPLERS[name]
    if name not in _RATIO_SAMPLERS:
        log.warning("unknown OTEL_TRACES_SAMPLER; always_on is used", sampler=name)
        return "always_on", ALWAYS_ON
    text = _value(env, "OTEL_TRACES_SAMPLER_ARG")
    try:
        ratio = 1.0 if text is None else float(text)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        log.warning("OTEL_TRACES_SAMPLER_ARG must be a ratio from 0 to 1; 1 is used")
        ratio = 1.0
    return f"{name}({ratio:g})", _RATIO_SAMPLERS[name](ratio)


def make_resource(
    env: Mapping[str, str], service_name: str | None, environment: str | None, log: Log
) -> Resource:
    """The worker's resource (see the module doc); ``OTEL_RESOURCE_ATTRIBUTES`` may override
    the defaults, and ``OTEL_SERVICE_NAME`` overrides all."""
    attributes: dict[str, Any] = {
        "telemetry.sdk.language": "python",
        "telemetry.sdk.name": "opentelemetry",
        "telemetry.sdk.version": sdk_version,
        "service.name": service_name or "biot-worker",
        "service.version": __version__,
    }
    if environment:
        attributes["deployment.environment.name"] = environment
    given = _value(env, "OTEL_RESOURCE_ATTRIBUTES")
    if given is not None:
        attributes.update(parse_pairs(given, "OTEL_RESOURCE_ATTRIBUTES", log))
    name = _value(env, "OTEL_SERVICE_NAME")
    if name is not None:
        attributes["service.name"] = name
    return Resource(attributes)


# ---------------------------------------------------------------- export


class _WatchedExporter(SpanExporter):
    """The OTLP exporter, counting the batches that failed (read by the flush, which warns),
    and shut down once however often asked."""

    def __init__(self, inner: SpanExporter) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        self._failed = 0
        self._closed = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._inner.export(spans)
        except Exception:  # the SDK would log it; we count it too
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            with self._lock:
                self._failed += 1
        return result

    def take_failures(self) -> int:
        """Batches that failed since the last call."""
        with self._lock:
            failed, self._failed = self._failed, 0
        return failed

    def shutdown(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


async def _in_daemon_thread(work: Callable[[], object], seconds: float) -> bool:
    """Run ``work`` in a daemon thread for at most ``seconds``: whether it ended in time without
    raising or returning ``False``. A thread still stuck (a collector that never answers) is
    abandoned, and never holds up the interpreter's exit as the loop's executor would."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bool] = loop.create_future()

    def settle(ok: bool) -> None:
        if not done.done():
            done.set_result(ok)

    def run() -> None:
        try:
            ok = work() is not False
        except Exception:
            ok = False
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(settle, ok)

    threading.Thread(target=run, name="biot-worker-otel", daemon=True).start()
    try:
        async with asyncio.timeout(seconds):
            return await done
    except TimeoutError:
        return False


# ---------------------------------------------------------------- spans


class _Unexported:
    """A span that is not exported (spans closed, or the SDK failed): a valid context only."""

    __slots__ = ("context",)

    def __init__(self, context: TraceContext) -> None:
        self.context = context

    def finish(self, status: int | None, error: BaseException | None = None) -> None:
        pass


class _OpenSpan:
    """An SDK span behind :class:`worker.tracing.Span`; ends once, never raises."""

    __slots__ = ("_span", "_status_key", "context")

    def __init__(self, span: OtelSpan, context: TraceContext, status_key: str | None) -> None:
        self._span: OtelSpan | None = span
        self._status_key = status_key  # None: a client span
        self.context = context

    def finish(self, status: int | None, error: BaseException | None = None) -> None:
        span, self._span = self._span, None
        if span is None:
            return
        with contextlib.suppress(Exception):  # telemetry never fails what it traces
            if span.is_recording():
                if self._status_key is None:
                    _end_call(span, status, error)
                else:
                    _end_event(span, self._status_key, status, error)
            span.end()


def _end_event(span: OtelSpan, key: str, status: int | None, error: BaseException | None) -> None:
    attributes: dict[str, Any] = {}
    if status is not None:
        attributes[key] = status
    if error is not None:
        attributes["error.type"] = error.code if isinstance(error, WorkerError) else _kind(error)
    if attributes:
        span.set_attributes(attributes)
    if status is None or status >= 500 or isinstance(error, DeadlineExceeded):
        _mark_error(span, error)


def _end_call(span: OtelSpan, status: int | None, error: BaseException | None) -> None:
    if status is None:
        span.set_attribute("error.type", _call_failure(error))
    elif status < 400:
        span.set_attribute("http.response.status_code", status)
        return
    else:
        span.set_attributes({"http.response.status_code": status, "error.type": str(status)})
    _mark_error(span, error, "no answer" if status is None else f"BioT answered {status}")


def _call_failure(error: BaseException | None) -> str:
    """What cut a call short: the transport's own error (a timeout, a refused connection)
    behind the worker's ``TransientApiError`` when there is one."""
    if error is None:
        return "_OTHER"
    if isinstance(error, DeadlineExceeded):  # the event's deadline cancelled the call
        return error.code
    cause = error.__cause__ or error.__context__
    if isinstance(error, WorkerError) and cause is not None:
        return _kind(cause)
    return _kind(error)


def _kind(error: BaseException) -> str:
    """The exception's fully qualified class name (a builtin's bare name), as ``error.type``."""
    cls = type(error)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _mark_error(span: OtelSpan, error: BaseException | None, fallback: str = "no answer") -> None:
    """Status ERROR with an ``exception`` event: the worker's own message (never a token), or
    the type alone of anything else, whose text could hold anything."""
    if error is None:
        span.set_status(Status(StatusCode.ERROR, fallback))
        return
    attributes = {"exception.type": _kind(error)}
    description = attributes["exception.type"]
    if isinstance(error, WorkerError):
        description = attributes["exception.message"] = error.message
    span.add_event("exception", attributes)
    span.set_status(Status(StatusCode.ERROR, description))


_KEPT_TRACE_ID: ContextVar[int | None] = ContextVar("biot_kept_trace_id", default=None)


class _KeptTraceIds(RandomIdGenerator):
    """Random ids, except the trace id of a root span started for an event that came with a
    trace id but no caller's span (``x-b3-traceid``, or one made up): that event's trace id,
    which its log lines and BioT calls already carry."""

    def generate_trace_id(self) -> int:
        kept = _KEPT_TRACE_ID.get()
        return super().generate_trace_id() if kept is None else kept


#: The SDK's loggers whose lines the worker keeps out of its log: the header parser quotes a
#: malformed ``OTEL_EXPORTER_OTLP_HEADERS`` entry, secret and all (our own parser says which
#: entry without its value), and the exporter writes a warning for each retry of a batch (its
#: error line when the batch is given up stays).
_SDK_HEADER_LOGGER: Final = "opentelemetry.util.re"
_SDK_RETRY_LOGGERS: Final = (
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.common.http",
)


def _quiet_sdk_logs() -> None:
    """Keep secrets and per-retry noise of the SDK out of the log (process-wide, idempotent)."""
    logging.getLogger(_SDK_HEADER_LOGGER).setLevel(logging.CRITICAL)
    for name in _SDK_RETRY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _remote(parent: TraceContext, remote: bool) -> Context:
    """An SDK context whose current span is ``parent`` (BioT's, or our event's)."""
    flags = TraceFlags(int(parent.flags, 16))
    context = SpanContext(int(parent.trace_id, 16), int(parent.span_id, 16), remote, flags)
    return set_span_in_context(NonRecordingSpan(context), _EMPTY)


def _context_of(span: OtelSpan, parent: TraceContext | None) -> TraceContext:
    context = span.get_span_context()
    if not context.is_valid:  # the SDK switched off (OTEL_SDK_DISABLED in os.environ)
        return parent.child() if parent is not None else new_trace()
    trace = parent.trace_id if parent is not None else format(context.trace_id, "032x")
    return TraceContext(trace, format(context.span_id, "016x"), "01" if context.trace_flags.sampled
                        else "00")  # fmt: skip


@lru_cache(maxsize=256)
def _server(authority: str, scheme: str) -> tuple[str, int | None]:
    """``server.address`` and ``server.port`` of a URL's ``host[:port]``."""
    host, colon, port = authority.rpartition("@")[2].rpartition(":")
    if not colon or "]" in port:  # no port (or only an IPv6 address's colons)
        host, port = authority.rpartition("@")[2], ""
    host = host.strip("[]")
    return host, int(port) if port.isdigit() else _SCHEMES.get(scheme)


def _call_attributes(method: str, url: str, attempt: int) -> dict[str, Any]:
    scheme, _, rest = url.partition("://")
    authority = rest.split("/", 1)[0]
    host, port = _server(authority, scheme.lower())
    attributes: dict[str, Any] = {
        "http.request.method": method,
        "url.full": url,
        "server.address": host,
    }
    if port is not None:
        attributes["server.port"] = port
    if attempt > 1:
        attributes["http.request.resend_count"] = attempt - 1
    return attributes


class OtelSpans:
    """:class:`worker.tracing.Spans` exported over OTLP/HTTP (see the module doc).

    ``async with OtelSpans(env, service_name=..., environment=..., log=log) as spans:`` starts
    the exporter; leaving the block exports what has ended (bounded) and stops it. Leaving
    twice is harmless; spans asked for outside the block are not exported.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        service_name: str | None,
        environment: str | None,
        log: Log,
    ) -> None:
        self._env = dict(env)
        self._log = log
        self.endpoint = traces_endpoint(self._env)
        self.sampler_name, self._sampler = make_sampler(self._env, log)
        self._resource = make_resource(self._env, service_name, environment, log)
        self._provider: TracerProvider | None = None
        self._exporter: _WatchedExporter | None = None
        self._tracer: Tracer | None = None
        self._hook_attributes: dict[str, dict[str, Any]] = {}
        self._failing = False  # a span could not be started: said once

    async def __aenter__(self) -> OtelSpans:
        try:
            self._start()
        except Exception as exc:  # the worker serves on without spans rather than not at all
            self._log.warning("OpenTelemetry could not start; no spans are exported",
                              error=_kind(exc), reason=str(exc)[:200])  # fmt: skip
        return self

    def _start(self) -> None:
        env, log = self._env, self._log
        _check_protocol(env, log)
        _quiet_sdk_logs()
        exporter = OTLPSpanExporter(
            endpoint=self.endpoint,
            certificate_file=_otlp(env, "CERTIFICATE"),
            client_key_file=_otlp(env, "CLIENT_KEY"),
            client_certificate_file=_otlp(env, "CLIENT_CERTIFICATE"),
            headers=_headers(env, log),
            timeout=_timeout_seconds(env, log),
            compression=_compression(env, log),
        )
        self._exporter = _WatchedExporter(exporter)
        provider = TracerProvider(
            sampler=self._sampler,
            resource=self._resource,
            shutdown_on_exit=False,
            id_generator=_KeptTraceIds(),
        )
        batch = batch_settings(env, log)
        processor = BatchSpanProcessor(
            self._exporter,
            max_queue_size=batch["max_queue_size"],
            schedule_delay_millis=batch["schedule_delay_millis"],
            max_export_batch_size=batch["max_export_batch_size"],
            export_timeout_millis=batch["export_timeout_millis"],
        )
        provider.add_span_processor(processor)
        self._provider = provider
        self._tracer = provider.get_tracer("biot-worker", __version__)
        log.info(
            "exporting spans over OTLP/HTTP",
            endpoint=public_endpoint(self.endpoint),
            sampler=self.sampler_name,
            service=self._resource.attributes.get("service.name"),
        )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Export what has ended and stop the exporter, within :data:`FLUSH_SECONDS`."""
        provider, self._provider, self._tracer = self._provider, None, None
        if provider is None:
            return
        ended = await _in_daemon_thread(provider.shutdown, FLUSH_SECONDS)
        if not ended and self._exporter is not None:
            self._exporter.shutdown()  # stops the exporter's retries in its own thread
        self._warn_unexported(ended, "at shutdown")

    async def flush(self) -> None:
        """Export every span ended so far, within :data:`FLUSH_SECONDS`."""
        provider = self._provider
        if provider is None:
            return
        millis = int(FLUSH_SECONDS * 1000)
        flushed = await _in_daemon_thread(lambda: provider.force_flush(millis), FLUSH_SECONDS)
        self._warn_unexported(flushed, "on flush")

    def _warn_unexported(self, in_time: bool, when: str) -> None:
        failed = self._exporter.take_failures() if self._exporter is not None else 0
        if in_time and not failed:
            return
        self._log.warning(
            "spans could not be exported",
            when=when,
            endpoint=public_endpoint(self.endpoint),
            failed_batches=failed,
            timed_out=not in_time,
        )

    # ------------------------------------------------------------ Spans

    def event(
        self, hook: str, parent: TraceContext, attributes: Mapping[str, Any] | None = None
    ) -> Span:
        """The event's server (or consumer) span, continuing BioT's ``parent``."""
        tracer = self._tracer
        if tracer is None:
            return _Unexported(parent.child())
        try:
            if attributes and "messaging.system" in attributes:
                destination = attributes.get("messaging.destination.name")
                name = f"process {destination}" if destination else "process"
                kind, key = SpanKind.CONSUMER, "biot.response.status_code"
            else:
                name, kind, key = hook, SpanKind.SERVER, "http.response.status_code"
            given = (
                {**attributes, "biot.hook.type": hook} if attributes else self._for_hook(hook)
            )  # fmt: skip
            if parent.inherited:
                span = tracer.start_span(name, _remote(parent, True), kind, given)
            else:  # no caller's span to name: a root span, in the trace id the event has
                kept = _KEPT_TRACE_ID.set(int(parent.trace_id, 16))
                try:
                    span = tracer.start_span(name, _EMPTY, kind, given)
                finally:
                    _KEPT_TRACE_ID.reset(kept)
            return _OpenSpan(span, _context_of(span, parent), key)
        except Exception as exc:
            return self._unexported(parent.child(), exc)

    def call(self, method: str, url: str, parent: TraceContext | None, attempt: int = 1) -> Span:
        """A client span of one attempt of a BioT call, under the event's span ``parent``."""
        tracer = self._tracer
        if tracer is None:
            return _Unexported(parent.child() if parent is not None else new_trace())
        try:
            context = _EMPTY if parent is None else _remote(parent, False)
            given = _call_attributes(method, url, attempt)
            span = tracer.start_span(method, context, SpanKind.CLIENT, given)
            return _OpenSpan(span, _context_of(span, parent), None)
        except Exception as exc:
            return self._unexported(parent.child() if parent is not None else new_trace(), exc)

    def _for_hook(self, hook: str) -> dict[str, Any]:
        # One dict per hook, shared by its spans: the SDK copies what it is given.
        found = self._hook_attributes.get(hook)
        if found is None:
            found = self._hook_attributes[hook] = {"biot.hook.type": hook}
        return found

    def _unexported(self, context: TraceContext, error: Exception) -> Span:
        if not self._failing:
            self._failing = True
            self._log.warning("a span could not be started; it is not exported",
                              error=_kind(error))  # fmt: skip
        return _Unexported(context)
