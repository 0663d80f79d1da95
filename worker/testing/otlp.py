"""An OTLP/HTTP trace receiver in the process, for tests, and a stand-in collector process.

``async with OtlpReceiver() as receiver:`` listens on a free loopback port; point a worker's
``OTEL_EXPORTER_OTLP_ENDPOINT`` at ``receiver.endpoint`` and read what it exported in
``receiver.spans`` (:class:`ReceivedSpan` records, oldest first), waiting for them with
:meth:`OtlpReceiver.wait_for` or :meth:`OtlpReceiver.wait_spans` (bounded, no sleeping).

It serves ``POST /v1/traces`` as a collector does: an ``ExportTraceServiceRequest`` as
``application/x-protobuf`` or OTLP/JSON (``application/json``), plain, ``gzip`` or ``deflate``
encoded, answered ``200`` with an empty ``ExportTraceServiceResponse`` in the same encoding
(``answer_status`` makes it refuse instead, to test an exporter's failures); ``GET /count``
answers ``{"spans": n, "requests": m}``.

``python -m worker.testing.otlp --port 4318`` runs it alone as a counting collector (spans are
counted, not kept) until SIGINT or SIGTERM: the benchmark's stand-in. It prints one JSON line
``{"otlp_endpoint": "http://127.0.0.1:PORT"}`` once listening and ``{"spans": n, "requests": m}``
when it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import signal
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final

import orjson
from aiohttp import web

# protobuf ships no type information (types-protobuf is not a dependency): Any is enough here.
from google.protobuf import json_format  # type: ignore[import-untyped]
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

__all__ = [
    "OtlpReceiver",
    "ReceivedSpan",
    "SpanEvent",
    "decode_json",
    "decode_protobuf",
    "main",
]

TRACES_PATH: Final = "/v1/traces"
PROTOBUF: Final = "application/x-protobuf"
JSON: Final = "application/json"
#: Largest request body accepted (aiohttp inflates a compressed one within it).
MAX_BODY: Final = 64 * 1024 * 1024
WAIT: Final = 10.0  # the default bound of a wait, in seconds
_ID_FIELDS: Final = ("traceId", "spanId", "parentSpanId")
_LOOPBACK: Final = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class SpanEvent:
    """One event of a span (``exception``, say) and its attributes."""

    name: str
    attributes: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    """One exported span: ids in lower-case hex, ``kind`` as ``SERVER``/``CLIENT``/...,
    ``status_code`` as ``UNSET``/``OK``/``ERROR``, attributes as plain Python values."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: str
    attributes: Mapping[str, Any]
    status_code: str
    status_message: str
    events: tuple[SpanEvent, ...]
    resource: Mapping[str, Any]
    scope: str
    start_ns: int
    end_ns: int

    @property
    def event_names(self) -> tuple[str, ...]:
        return tuple(event.name for event in self.events)


@dataclass
class _Seen:
    spans: list[ReceivedSpan] = field(default_factory=list)
    count: int = 0
    requests: int = 0
    headers: list[dict[str, str]] = field(default_factory=list)


# ---------------------------------------------------------------- decoding


def decode_protobuf(data: bytes) -> list[ReceivedSpan]:
    """The spans of a serialized ``ExportTraceServiceRequest``; ``ValueError`` if it is not."""
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(data)
    except DecodeError as exc:
        raise ValueError(f"not an ExportTraceServiceRequest: {exc}") from None
    return list(_spans_of(request))


def decode_json(data: bytes) -> list[ReceivedSpan]:
    """The spans of an OTLP/JSON request (ids in hex, as OTLP/JSON has them)."""
    try:
        body = orjson.loads(data)
        for resource_spans in body.get("resourceSpans", ()):
            for scope_spans in resource_spans.get("scopeSpans", ()):
                for span in scope_spans.get("spans", ()):
                    _hex_ids_to_base64(span)
                    for link in span.get("links", ()):
                        _hex_ids_to_base64(link)
        request = json_format.ParseDict(body, ExportTraceServiceRequest(),
                                        ignore_unknown_fields=True)  # fmt: skip
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
        raise ValueError(f"not an OTLP/JSON trace request: {exc}") from None
    return list(_spans_of(request))


def _hex_ids_to_base64(item: dict[str, Any]) -> None:
    # protobuf's JSON mapping reads bytes as base64; OTLP/JSON writes trace and span ids in hex.
    for name in _ID_FIELDS:
        value = item.get(name)
        if isinstance(value, str):
            item[name] = base64.b64encode(bytes.fromhex(value)).decode()


def count_spans(data: bytes) -> int:
    """How many spans a serialized request holds, without building records."""
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(data)
    except DecodeError as exc:
        raise ValueError(f"not an ExportTraceServiceRequest: {exc}") from None
    return sum(
        len(scope_spans.spans)
        for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans
    )


def _spans_of(request: ExportTraceServiceRequest) -> Iterator[ReceivedSpan]:
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            scope = scope_spans.scope.name
            for span in scope_spans.spans:
                yield _record(span, resource, scope)


def _record(span: Span, resource: Mapping[str, Any], scope: str) -> ReceivedSpan:
    return ReceivedSpan(
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_span_id=span.parent_span_id.hex() or None,
        name=span.name,
        kind=Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
        attributes=_attributes(span.attributes),
        status_code=Status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_"),
        status_message=span.status.message,
        events=tuple(SpanEvent(e.name, _attributes(e.attributes)) for e in span.events),
        resource=resource,
        scope=scope,
        start_ns=span.start_time_unix_nano,
        end_ns=span.end_time_unix_nano,
    )


def _attributes(pairs: Iterable[KeyValue]) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, kind)


# ---------------------------------------------------------------- the receiver


class OtlpReceiver:
    """See the module doc. ``keep=False`` counts spans without keeping them (a long run)."""

    def __init__(self, host: str = _LOOPBACK, port: int = 0, *, keep: bool = True) -> None:
        self.host = host
        self.port = port
        self.keep = keep
        #: The status to answer exports with (200: accept them).
        self.answer_status = 200
        #: The base URL, for ``OTEL_EXPORTER_OTLP_ENDPOINT`` (set on entry).
        self.endpoint = ""
        self._seen = _Seen()
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    @property
    def spans(self) -> list[ReceivedSpan]:
        """Every span received (when ``keep``), oldest first: a copy."""
        return list(self._seen.spans)

    @property
    def count(self) -> int:
        """Spans received so far, kept or not."""
        return self._seen.count

    @property
    def requests(self) -> int:
        """Export requests accepted so far."""
        return self._seen.requests

    @property
    def headers(self) -> list[dict[str, str]]:
        """The headers of every export request received (lower-case names), oldest first."""
        return list(self._seen.headers)

    def clear(self) -> None:
        """Forget what was received."""
        self._seen = _Seen()

    async def __aenter__(self) -> OtlpReceiver:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post(TRACES_PATH, self._export)
        app.router.add_get("/count", self._count)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        self._runner = runner
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except BaseException:
            await self.aclose()
            raise
        self.port = runner.addresses[0][1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.endpoint = f"http://{host}:{self.port}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop listening; closing twice is harmless."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def wait_for(
        self,
        predicate: Callable[[Sequence[ReceivedSpan]], bool],
        *,
        timeout: float = WAIT,  # noqa: ASYNC109 - the bound of this wait
        what: str = "the spans expected",
    ) -> list[ReceivedSpan]:
        """The spans received once ``predicate(spans)`` holds; ``AssertionError`` naming
        ``what`` (and what came) if it does not within ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: predicate(self._seen.spans))
        except TimeoutError:
            names = [(span.kind, span.name) for span in self._seen.spans]
            raise AssertionError(f"no {what} within {timeout} s; received {names}") from None
        return self.spans

    async def wait_spans(
        self,
        count: int,
        *,
        timeout: float = WAIT,  # noqa: ASYNC109 - the bound of this wait
    ) -> list[ReceivedSpan]:
        """The spans received once there are at least ``count`` (counted, when not kept)."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: self._seen.count >= count)
        except TimeoutError:
            seen = self._seen.count
            raise AssertionError(f"{seen} spans within {timeout} s, not {count}") from None
        return self.spans

    async def _export(self, request: web.Request) -> web.Response:
        body = await request.read()  # aiohttp has undone a gzip or deflate Content-Encoding
        media = request.content_type
        if media not in (PROTOBUF, JSON):
            raise web.HTTPUnsupportedMediaType(text=f"expected {PROTOBUF} or {JSON}")
        if self.answer_status != 200:
            return web.Response(status=self.answer_status, text="refused (answer_status)")
        try:
            if not self.keep and media == PROTOBUF:
                received, count = [], count_spans(body)
            else:
                received = decode_protobuf(body) if media == PROTOBUF else decode_json(body)
                count = len(received)
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        await self._add(received if self.keep else [], count, request.headers.items())
        if media == JSON:
            return web.Response(body=b"{}", content_type=JSON)
        answer = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=answer, content_type=PROTOBUF)

    async def _add(
        self, spans: list[ReceivedSpan], count: int, headers: Iterable[tuple[str, str]]
    ) -> None:
        async with self._changed:
            seen = self._seen
            seen.spans.extend(spans)
            seen.count += count
            seen.requests += 1
            if self.keep:
                seen.headers.append({name.lower(): value for name, value in headers})
            self._changed.notify_all()

    async def _count(self, request: web.Request) -> web.Response:
        return web.json_response({"spans": self._seen.count, "requests": self._seen.requests})


# ---------------------------------------------------------------- a stand-in collector


def _write(line: Mapping[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(line).decode() + "\n")
    sys.stdout.flush()


async def _serve(host: str, port: int) -> OtlpReceiver:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with OtlpReceiver(host, port, keep=False) as receiver:
        _write({"otlp_endpoint": receiver.endpoint})
        await stop.wait()
    return receiver


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m worker.testing.otlp [--host 127.0.0.1] [--port 4318]``: count spans until
    SIGINT or SIGTERM (see the module doc)."""
    parser = argparse.ArgumentParser(prog="python -m worker.testing.otlp", description=__doc__)
    parser.add_argument("--host", default=_LOOPBACK, help="address to listen on (loopback)")
    parser.add_argument("--port", type=int, default=4318, help="0: any free port")
    args = parser.parse_args(argv)
    receiver = asyncio.run(_serve(args.host, args.port))
    _write({"spans": receiver.count, "requests": receiver.requests})
    return 0


if __name__ == "__main__":
    sys.exit(main())
