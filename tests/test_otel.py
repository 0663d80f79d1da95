"""OpenTelemetry spans (issue 11, points 2 and 5), end to end over loopback HTTP.

A real worker (its composition root and HTTP adapter) serves signed events against the emulator
playing BioT, with ``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing at the in-process OTLP/HTTP receiver
of :mod:`worker.testing.otlp`. The emulator gets one more middleware here that records the
``traceparent`` of every API call it receives, so that each client span can be matched with the
span id BioT's API saw. Also: a queue consumer span, the worker without the variable (nothing of
OpenTelemetry imported) and without the extra (one warning, events served), the configuration
read from the ``OTEL_*`` variables, and the receiver itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

import worker
from tests.conftest import KeyPair, settings_for
from tests.queue_helpers import serving
from worker import Block, Context, Notification, PreInterception, Router
from worker.adapters.http import app_runner
from worker.adapters.memory import MemorySource
from worker.app import WorkerApp
from worker.client import LOGIN_PATH, PUBLIC_KEY_PATH
from worker.errors import DeadlineExceeded
from worker.events import Event
from worker.logs import CapturingLog
from worker.otel import (
    OtelSpans,
    batch_settings,
    make_resource,
    make_sampler,
    parse_pairs,
    public_endpoint,
    traces_endpoint,
)
from worker.responses import Response
from worker.runner import http_adapter
from worker.testing import EmulatorSigner, notification_event, pre_event
from worker.testing.emulator import Emulator, EmulatorConfig, EmulatorServer
from worker.testing.otlp import OtlpReceiver, ReceivedSpan, decode_json, decode_protobuf
from worker.tracing import TraceContext, new_trace, parse_traceparent

ROOT = Path(__file__).resolve().parents[1]
PATIENTS = "/organization/v1/users/patients"
SLOW = "/slow/thing"
WAIT = 15.0
MADE_CALLS = "two calls made"


# ---------------------------------------------------------------- the plugin under test


async def two_calls(view: Notification, ctx: Context) -> None:
    page = await ctx.api.search(PATIENTS, limit=1)
    await ctx.api.get(f"{PATIENTS}/{page['data'][0]['_id']}")
    ctx.log.info(MADE_CALLS)


async def raises(view: Notification, ctx: Context) -> None:
    raise RuntimeError("a handler's bug, token=secret-in-a-bug")


async def too_slow(view: Notification, ctx: Context) -> None:
    await ctx.api.get(SLOW)  # the emulator holds it past the event's deadline


async def blocks(view: PreInterception, ctx: Context) -> None:
    raise Block(403, "MODIFICATION_FORBIDDEN", "not this one")


def routes() -> Router:
    router = Router()
    router.notification(two_calls, entity="patient", action="_create")
    router.notification(raises, entity="patient", action="_update")
    router.notification(too_slow, entity="patient", action="_delete")
    router.pre(blocks, entity="patient")
    return router


# ---------------------------------------------------------------- a worker in front of BioT


@dataclass(frozen=True)
class Seen:
    """An API call the emulator received, with the ``traceparent`` it carried."""

    method: str
    path: str
    traceparent: TraceContext | None


@dataclass
class Box:
    emulator: Emulator
    app: WorkerApp
    log: CapturingLog
    worker_url: str
    api_port: int
    http: aiohttp.ClientSession
    seen: list[Seen] = field(default_factory=list)

    @property
    def signer(self) -> EmulatorSigner:
        return EmulatorSigner(self.emulator)

    async def send(self, event: Event) -> Response:
        async with self.http.post(self.worker_url, data=event.body, headers=event.headers) as r:
            body = await r.read()
            return Response(r.status, body, {k.lower(): v for k, v in r.headers.items()})

    def api_span_ids(self, trace_id: str, path_prefix: str = "") -> set[str]:
        """The span ids of the ``traceparent`` of the calls BioT's API received in a trace."""
        return {
            s.traceparent.span_id
            for s in self.seen
            if s.traceparent is not None
            and s.traceparent.trace_id == trace_id
            and s.path.startswith(path_prefix)
        }


@asynccontextmanager
async def worker_box(router: Router, **env: str) -> AsyncIterator[Box]:
    """The emulator (recording each call's ``traceparent``) and a worker serving ``router``
    over HTTP with ``env``; everything is stopped on the way out, whatever happened."""
    seen: list[Seen] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        trace = parse_traceparent(request.headers.get("traceparent"))
        seen.append(Seen(request.method, request.path, trace))
        response: web.StreamResponse = await handler(request)
        return response

    emulator = Emulator(EmulatorConfig())
    emulator.app.middlewares.insert(0, record)
    async with AsyncExitStack() as stack:
        server = await stack.enter_async_context(EmulatorServer(emulator))
        settings = settings_for(
            BIOT_BASE_URL=server.url,
            BIOT_SERVICE_USER_ID=emulator.service_user_id,
            BIOT_SERVICE_USER_SECRET_KEY=emulator.service_user_secret,
            WORKER_API_RETRIES="0",
            **env,
        )
        log = CapturingLog()
        app = await stack.enter_async_context(WorkerApp(settings, router, log=log))
        runner = app_runner(http_adapter(app), grace=2.0, keepalive_timeout=5.0)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/"
        http = await stack.enter_async_context(aiohttp.ClientSession())
        yield Box(emulator, app, log, url, int(server.url.rsplit(":", 1)[1]), http, seen)


def otel_env(receiver: OtlpReceiver, **more: str) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "10",
            **more}  # fmt: skip


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    async with OtlpReceiver() as started:
        yield started


def traceparent(flags: str = "01") -> tuple[str, str, str]:
    """A traceparent as BioT sends it: ``(header, trace id, parent span id)``."""
    trace = new_trace()
    return f"00-{trace.trace_id}-{trace.span_id}-{flags}", trace.trace_id, trace.span_id


def key_fetch(span: ReceivedSpan) -> bool:
    """The public key's fetch: in the trace of the first event that needed the key (its own
    test covers it), left out of the other tests' counts."""
    return str(span.attributes.get("url.full", "")).endswith(PUBLIC_KEY_PATH)


def in_trace(trace_id: str, count: int) -> Callable[[Sequence[ReceivedSpan]], bool]:
    return lambda spans: (
        len([s for s in spans if s.trace_id == trace_id and not key_fetch(s)]) >= count
    )


def one(spans: Sequence[ReceivedSpan], **match: Any) -> ReceivedSpan:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) == 1, (match, [(s.kind, s.name, s.trace_id) for s in spans])
    return found[0]


async def traced(receiver: OtlpReceiver, trace_id: str, count: int) -> list[ReceivedSpan]:
    """The ``count`` spans of a trace, once they all came (and no more came with them)."""
    spans = await receiver.wait_for(in_trace(trace_id, count), what=f"{count} spans")
    mine = [s for s in spans if s.trace_id == trace_id and not key_fetch(s)]
    assert len(mine) == count, [(s.kind, s.name) for s in mine]
    return mine


# ---------------------------------------------------------------- 1. spans and parent links


@pytest.mark.parametrize("flags", ["00", "01"])
async def test_an_event_continues_biots_trace_and_each_call_is_a_child_span(
    receiver: OtlpReceiver, flags: str
) -> None:
    header, trace_id, biot_span = traceparent(flags)
    async with worker_box(routes(), **otel_env(receiver)) as box:
        event = notification_event(keys=box.signer, traceparent=header)
        response = await box.send(event)
        assert response.status == 200
        spans = await traced(receiver, trace_id, 3)
        api_saw = box.api_span_ids(trace_id, PATIENTS)
        records = [r for r in box.log.records if r["traceId"] == trace_id]

    server = one(spans, kind="SERVER")
    assert server.parent_span_id == biot_span  # BioT's span, even when it sampled nothing
    assert server.name == "NOTIFICATION"
    assert server.status_code == "UNSET"
    attributes = server.attributes
    assert attributes["biot.hook.type"] == "NOTIFICATION"
    assert attributes["http.response.status_code"] == 200
    assert attributes["http.request.method"] == "POST"
    assert attributes["url.path"] == "/"
    assert attributes["client.address"] == "127.0.0.1"
    assert "error.type" not in attributes
    assert server.resource["service.name"] == "test-plugin"
    assert server.resource["deployment.environment.name"] == "test"
    assert server.resource["service.version"] == worker.__version__
    # The answer's traceparent names the event's span, sampled.
    assert response.headers["traceparent"] == f"00-{trace_id}-{server.span_id}-01"

    calls = [s for s in spans if s.kind == "CLIENT"]
    assert len(calls) == 2
    assert {c.parent_span_id for c in calls} == {server.span_id}
    assert {c.span_id for c in calls} == api_saw  # the ids BioT's API saw, one per call
    for call in calls:
        assert call.name == "GET"
        assert call.status_code == "UNSET"
        assert call.attributes["http.request.method"] == "GET"
        assert call.attributes["http.response.status_code"] == 200
        assert call.attributes["url.full"].startswith(f"http://127.0.0.1:{box.api_port}{PATIENTS}")
        assert "?" not in call.attributes["url.full"]  # the search's query stays out
        assert call.attributes["server.address"] == "127.0.0.1"
        assert call.attributes["server.port"] == box.api_port
    # 3. Every line of the event carries its span's id beside the same trace id.
    assert {r["message"] for r in records} >= {MADE_CALLS, "event handled"}
    assert {r.get("spanId") for r in records} == {server.span_id}


async def test_the_service_login_is_a_client_span_with_the_id_biot_saw(
    receiver: OtlpReceiver,
) -> None:
    async with worker_box(routes(), **otel_env(receiver)) as box:
        spans = await receiver.wait_for(
            lambda got: any(s.attributes.get("url.full", "").endswith(LOGIN_PATH) for s in got),
            what="the login's span",
        )
        logins = [s for s in box.seen if s.path == LOGIN_PATH and s.traceparent is not None]
    login = one(spans, kind="CLIENT", name="POST")
    assert login.parent_span_id is None  # made at start, outside any event: a trace of its own
    assert login.attributes["http.response.status_code"] == 200
    assert [s.traceparent for s in logins] == [TraceContext(login.trace_id, login.span_id)]


@pytest.mark.parametrize("header", ["x-b3-traceid", None])
async def test_an_event_without_a_traceparent_is_a_root_span_in_its_trace(
    receiver: OtlpReceiver, header: str | None
) -> None:
    async with worker_box(routes(), **otel_env(receiver)) as box:
        event = notification_event(keys=box.signer, traceparent=None)
        headers = dict(event.headers)
        if header is not None:
            headers[header] = "a3ce929d0e0e4736"  # 64 bits, as B3 may send
        response = await box.send(replace(event, headers=headers))
        assert response.status == 200
        trace_id = response.headers["traceparent"].split("-")[1]
        spans = await traced(receiver, trace_id, 3)
        calls = box.api_span_ids(trace_id, PATIENTS)
    if header is not None:
        assert trace_id == "0000000000000000a3ce929d0e0e4736"
    server = one(spans, kind="SERVER")
    assert server.parent_span_id is None  # no caller's span to name: a root, not a dangling id
    assert {s.span_id for s in spans if s.kind == "CLIENT"} == calls
    assert {s.parent_span_id for s in spans if s.kind == "CLIENT"} == {server.span_id}


async def test_the_public_key_fetch_is_a_client_span_the_call_log_names(
    receiver: OtlpReceiver,
) -> None:
    header, trace_id, _ = traceparent()
    async with worker_box(routes(), **otel_env(receiver)) as box:
        response = await box.send(notification_event(keys=box.signer, traceparent=header))
        assert response.status == 200
        spans = await receiver.wait_for(
            lambda got: any(key_fetch(s) for s in got),
            what="the key fetch's span",
        )
        logged = [r for r in box.emulator.calls.records(direction="in")
                  if r.path == PUBLIC_KEY_PATH]  # fmt: skip
        # The emulator's own call log names the span id each call arrived with.
        api_calls = {r.span_id for r in box.emulator.calls.records(trace_id=trace_id)
                     if r.path.startswith(PATIENTS)}  # fmt: skip
    fetch = one([s for s in spans if s.attributes.get("url.full", "").endswith(PUBLIC_KEY_PATH)])
    assert fetch.kind == "CLIENT" and fetch.name == "GET"
    assert fetch.trace_id == trace_id  # fetched for the event, in its trace
    assert [r.span_id for r in logged] == [fetch.span_id]
    assert api_calls == box.api_span_ids(trace_id, PATIENTS) and None not in api_calls


async def test_a_queue_event_is_a_consumer_span(receiver: OtlpReceiver) -> None:
    header, trace_id, biot_span = traceparent("00")
    async with worker_box(routes(), **otel_env(receiver)) as box:
        source = MemorySource(log=box.log)
        event = notification_event(keys=box.signer, traceparent=header)
        envelope = {"headers": event.headers, "body": event.body.decode()}
        async with serving(source, box.app.dispatcher.handle, box.app.settings):
            await source.publish(envelope, reply_to="otel-test", correlation_id="1")
            async with asyncio.timeout(WAIT):
                reply = await source.next_reply("otel-test")
        spans = await traced(receiver, trace_id, 3)
        api_saw = box.api_span_ids(trace_id, PATIENTS)

    assert orjson.loads(reply.body)["statusCode"] == 200
    consumer = one(spans, kind="CONSUMER")
    assert consumer.name == "process memory"
    assert consumer.parent_span_id == biot_span
    assert consumer.attributes["messaging.system"] == "memory"
    assert consumer.attributes["messaging.destination.name"] == "memory"
    assert consumer.attributes["messaging.operation.type"] == "process"
    assert consumer.attributes["biot.hook.type"] == "NOTIFICATION"
    assert consumer.attributes["biot.response.status_code"] == 200
    assert "http.response.status_code" not in consumer.attributes
    calls = [s for s in spans if s.kind == "CLIENT"]
    assert {c.parent_span_id for c in calls} == {consumer.span_id}
    assert {c.span_id for c in calls} == api_saw


async def test_a_queue_message_refused_before_dispatch_is_a_consumer_span_too(
    receiver: OtlpReceiver,
) -> None:
    header, trace_id, biot_span = traceparent("00")
    async with worker_box(routes(), **otel_env(receiver)) as box:
        source = MemorySource(log=box.log)
        headers = {"traceparent": header, "hooktype": "NOTIFICATION"}
        unreadable = {"headers": headers, "body": "!!", "isBase64Encoded": True}
        async with serving(source, box.app.dispatcher.handle, box.app.settings, box.log,
                           refuse=box.app.dispatcher.refuse):  # fmt: skip
            await source.publish(unreadable)
            (consumer,) = await traced(receiver, trace_id, 1)
            async with asyncio.timeout(WAIT):
                await source.settled()
        lines = [r for r in box.log.records if r["message"] == "event dead-lettered"]

    assert consumer.kind == "CONSUMER" and consumer.parent_span_id == biot_span
    assert consumer.attributes["error.type"] == "NO_EVENT"
    assert consumer.attributes["biot.response.status_code"] == 400
    assert "messaging.message.id" in consumer.attributes  # the memory source's refs are ""
    # The dead letter's line carries the message's trace and its event's span.
    assert [(r["traceId"], r.get("spanId")) for r in lines] == [(trace_id, consumer.span_id)]


async def test_an_event_the_http_adapter_refuses_is_a_server_span_too(
    receiver: OtlpReceiver,
) -> None:
    header, trace_id, biot_span = traceparent()
    env = otel_env(receiver, WORKER_MAX_BODY_BYTES="64")
    async with worker_box(routes(), **env) as box:
        response = await box.send(notification_event(keys=box.signer, traceparent=header))
        assert response.status == 413
        (server,) = await traced(receiver, trace_id, 1)
        lines = [r for r in box.log.records if r["message"] == "event refused"]

    assert server.kind == "SERVER" and server.parent_span_id == biot_span
    assert server.attributes["http.response.status_code"] == 413
    assert server.attributes["error.type"] == "PAYLOAD_TOO_LARGE"
    assert server.status_code == "UNSET"  # a 4xx: the caller's doing
    assert response.headers["traceparent"] == f"00-{trace_id}-{server.span_id}-01"
    assert [(r["traceId"], r.get("spanId")) for r in lines] == [(trace_id, server.span_id)]


# ---------------------------------------------------------------- 2. errors mark the spans


async def test_a_handler_that_raises_marks_its_span_an_error(receiver: OtlpReceiver) -> None:
    header, trace_id, _ = traceparent()
    async with worker_box(routes(), **otel_env(receiver)) as box:
        event = notification_event("patient", "_update", keys=box.signer, traceparent=header)
        assert (await box.send(event)).status == 500
        (server,) = await traced(receiver, trace_id, 1)
    assert server.status_code == "ERROR"
    assert server.attributes["error.type"] == "INTERNAL_SERVER_ERROR"
    assert server.attributes["http.response.status_code"] == 500
    (exception,) = server.events
    assert exception.name == "exception"
    assert exception.attributes == {
        "exception.type": "worker.errors.WorkerError",
        "exception.message": "internal error in plugin handler",
    }
    assert "secret-in-a-bug" not in repr(server)  # the bug's own text is never exported


async def test_a_deadline_marks_the_event_and_the_call_it_cut(receiver: OtlpReceiver) -> None:
    header, trace_id, _ = traceparent()
    env = otel_env(receiver, WORKER_DEADLINE_NOTIFICATION="0.3")
    async with worker_box(routes(), **env) as box:
        box.emulator.faults.update({"latency": {f"GET {SLOW}": 1.0}})
        event = notification_event("patient", "_delete", keys=box.signer, traceparent=header)
        response = await box.send(event)
        spans = await traced(receiver, trace_id, 2)
        api_saw = box.api_span_ids(trace_id, SLOW)

    assert response.status == 504
    server = one(spans, kind="SERVER")
    assert server.status_code == "ERROR"
    assert server.attributes["error.type"] == DeadlineExceeded.code
    assert server.attributes["http.response.status_code"] == 504
    assert server.event_names == ("exception",)
    call = one(spans, kind="CLIENT")
    assert call.parent_span_id == server.span_id
    assert {call.span_id} == api_saw
    assert call.status_code == "ERROR"
    assert call.attributes["error.type"] == "DEADLINE_EXCEEDED"  # not a bare CancelledError
    assert "http.response.status_code" not in call.attributes  # no answer came


async def test_a_refused_jwt_is_not_a_server_error(
    receiver: OtlpReceiver, other_keys: KeyPair
) -> None:
    header, trace_id, _ = traceparent()
    async with worker_box(routes(), **otel_env(receiver)) as box:
        event = notification_event(keys=other_keys, traceparent=header)
        assert (await box.send(event)).status == 400
        (server,) = await traced(receiver, trace_id, 1)
    assert server.status_code == "UNSET"  # a 4xx of a server is the caller's fault
    assert server.attributes["error.type"] == "JWT_ERROR"
    assert server.attributes["http.response.status_code"] == 400
    assert server.events == ()


async def test_a_block_is_not_an_error(receiver: OtlpReceiver) -> None:
    header, trace_id, _ = traceparent()
    async with worker_box(routes(), **otel_env(receiver)) as box:
        event = pre_event(keys=box.signer, traceparent=header)
        assert (await box.send(event)).status == 403
        (server,) = await traced(receiver, trace_id, 1)
    assert server.name == "INTERCEPTOR_PRE"
    assert server.attributes["biot.hook.type"] == "INTERCEPTOR_PRE"
    assert server.status_code == "UNSET"
    assert server.attributes["error.type"] == "MODIFICATION_FORBIDDEN"


async def test_a_call_biot_answers_500_is_a_client_error(receiver: OtlpReceiver) -> None:
    header, trace_id, _ = traceparent()
    async with worker_box(routes(), **otel_env(receiver)) as box:
        box.emulator.faults.update(
            {"errors": [{"route": f"GET {PATIENTS}", "status": 500, "count": 1}]}
        )
        event = notification_event(keys=box.signer, traceparent=header)
        assert (await box.send(event)).status == 502
        spans = await traced(receiver, trace_id, 2)
        api_saw = box.api_span_ids(trace_id, PATIENTS)
    call = one(spans, kind="CLIENT")
    assert {call.span_id} == api_saw
    assert call.status_code == "ERROR"
    assert call.attributes["http.response.status_code"] == 500
    assert call.attributes["error.type"] == "500"
    server = one(spans, kind="SERVER")
    assert server.status_code == "ERROR"
    assert server.attributes["error.type"] == "CALL_TO_API_FAILED"


# ---------------------------------------------------------------- 3, 5. without OpenTelemetry


async def test_without_the_variable_log_lines_carry_no_span_id() -> None:
    header, trace_id, _ = traceparent()
    async with worker_box(routes()) as box:
        assert box.app.spans is None
        response = await box.send(notification_event(keys=box.signer, traceparent=header))
        records = [r for r in box.log.records if r["traceId"] == trace_id]
    assert response.status == 200
    assert {r["message"] for r in records} >= {MADE_CALLS, "event handled"}
    assert all("spanId" not in r for r in records)


_PROBE = """
import asyncio, json, sys
from tests.fixture_plugin import build_routes
from worker.testing import emulated_biot, notification_event

async def main():
    env = json.loads(sys.argv[1])
    async with emulated_biot(build_routes(), env=env) as biot:
        event = notification_event(keys=biot.signer)
        status = (await biot.send(event)).status
    loaded = sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry"
                    or m == "worker.otel")
    print(json.dumps({"status": status, "loaded": loaded}))

asyncio.run(main())
"""


async def probe(env: dict[str, str]) -> dict[str, Any]:
    """A fresh interpreter serving one event with the worker ``env``: its status and the
    OpenTelemetry modules it loaded."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _PROBE, orjson.dumps(env).decode(), cwd=ROOT, env=clean,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(60):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()[-2000:]
    result: dict[str, Any] = orjson.loads(out.splitlines()[-1])
    return result


async def test_without_the_variable_nothing_of_opentelemetry_is_imported(
    receiver: OtlpReceiver,
) -> None:
    without, with_it = await asyncio.gather(probe({}), probe(otel_env(receiver)))
    assert without == {"status": 200, "loaded": []}
    assert with_it["status"] == 200  # the probe does see them when they are asked for
    assert "worker.otel" in with_it["loaded"]
    assert "opentelemetry.sdk.trace" in with_it["loaded"]


@contextlib.contextmanager
def extra_missing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """As if the ``otel`` extra were not installed: every ``opentelemetry`` import fails."""
    with monkeypatch.context() as patch:
        for name in [m for m in sys.modules if m.split(".")[0] == "opentelemetry"]:
            patch.setitem(sys.modules, name, None)
        patch.setitem(sys.modules, "opentelemetry", None)
        patch.delitem(sys.modules, "worker.otel", raising=False)
        patch.delattr(worker, "otel", raising=False)
        yield


async def test_without_the_extra_one_warning_and_events_are_served(
    receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    header, trace_id, _ = traceparent()
    with extra_missing(monkeypatch):
        async with worker_box(routes(), **otel_env(receiver)) as box:
            response = await box.send(notification_event(keys=box.signer, traceparent=header))
            assert box.app.spans is None
            warnings = [r for r in box.log.records if "OpenTelemetry" in r["message"]]
            records = [r for r in box.log.records if r["traceId"] == trace_id]
    assert response.status == 200
    assert records and all("spanId" not in r for r in records)
    assert len(warnings) == 1
    assert warnings[0]["level"] == "WARN"
    assert warnings[0]["missing"].split(".")[0] == "opentelemetry"
    assert receiver.requests == 0


# ---------------------------------------------------------------- OtelSpans on its own


def spans_of(receiver: OtlpReceiver, log: CapturingLog, **env: str) -> OtelSpans:
    given = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
             "OTEL_BSP_SCHEDULE_DELAY": "600000", **env}  # fmt: skip
    return OtelSpans(given, service_name="svc", environment="staging", log=log)


async def test_flush_exports_what_has_ended_and_headers_go_to_the_collector_only(
    receiver: OtlpReceiver,
) -> None:
    log = CapturingLog()
    env = {"OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=s3cr%3Dt,bogus",
           "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"}  # fmt: skip
    async with spans_of(receiver, log, **env) as spans:
        parent = new_trace()
        event = spans.event("NONSPECIFIC", parent)
        event.finish(200)
        event.finish(500, RuntimeError("again"))  # ended once: later calls change nothing
        await spans.flush()  # no schedule delay to wait for: exported now
        assert [s.span_id for s in receiver.spans] == [event.context.span_id]
    assert receiver.spans[0].attributes["http.response.status_code"] == 200
    assert receiver.spans[0].status_code == "UNSET"
    assert receiver.headers[0]["x-api-key"] == "s3cr=t"
    assert receiver.headers[0]["content-encoding"] == "gzip"
    assert "s3cr" not in repr(log.records)
    assert log.find("an entry is not key=value; left out", entry=2)


async def test_a_malformed_header_never_reaches_any_log_with_its_value(
    receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The SDK parses os.environ's headers itself and its own warning quotes the entry.
    bad = "x-api-key:supers3cret111"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", bad)
    log = CapturingLog()
    with caplog.at_level(logging.DEBUG):
        async with spans_of(receiver, log, OTEL_EXPORTER_OTLP_HEADERS=bad) as spans:
            spans.event("NONSPECIFIC", new_trace()).finish(200)
            await spans.flush()
    assert len(receiver.spans) == 1
    assert "supers3cret111" not in caplog.text and "supers3cret111" not in repr(log.records)
    assert log.find("an entry is not key=value; left out", entry=1)


async def test_a_failing_collector_is_one_warning_per_flush(receiver: OtlpReceiver) -> None:
    log = CapturingLog()
    spans = spans_of(receiver, log)
    async with spans:
        receiver.answer_status = 400
        spans.event("NOTIFICATION", new_trace()).finish(200)
        await spans.flush()
        assert len(log.find("spans could not be exported", when="on flush")) == 1
        receiver.answer_status = 200
        spans.event("NOTIFICATION", new_trace()).finish(200)
        await spans.flush()
        assert len(log.find("spans could not be exported")) == 1
    await spans.aclose()  # closing twice is harmless
    late = spans.event("NOTIFICATION", new_trace())  # after closing: a valid id, not exported
    late.finish(200)
    assert len(late.context.span_id) == 16
    assert receiver.count == 1


@pytest.mark.parametrize(
    ("sampler", "exported"),
    [
        ({}, {"00", "01"}),
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_on"}, {"01"}),
        ({"OTEL_TRACES_SAMPLER": "always_off"}, set()),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1"}, {"00", "01"}),
    ],
)
async def test_the_sampler_is_always_on_unless_told(
    receiver: OtlpReceiver, sampler: dict[str, str], exported: set[str]
) -> None:
    async with spans_of(receiver, CapturingLog(), **sampler) as spans:
        made = {}
        for flags in ("00", "01"):
            trace = TraceContext(new_trace().trace_id, new_trace().span_id, flags)
            event = spans.event("NOTIFICATION", trace)
            spans.call("GET", "http://127.0.0.1:1/x", event.context).finish(200)
            event.finish(200)
            made[trace.trace_id] = flags
        await spans.flush()
    assert {made[s.trace_id] for s in receiver.spans} == exported
    assert len(receiver.spans) == 2 * len(exported)


@pytest.mark.parametrize(
    ("url", "address", "port"),
    [
        ("https://api.example.com/organization/v1/x", "api.example.com", 443),
        ("http://[::1]:8080/x", "::1", 8080),
        ("http://localhost/x", "localhost", 80),
    ],
)
async def test_call_attributes(receiver: OtlpReceiver, url: str, address: str, port: int) -> None:
    async with spans_of(receiver, CapturingLog()) as spans:
        spans.call("DELETE", url, None, attempt=3).finish(None, TimeoutError())
        await spans.flush()
    (call,) = receiver.spans
    assert call.parent_span_id is None
    assert call.attributes == {
        "http.request.method": "DELETE",
        "url.full": url,
        "server.address": address,
        "server.port": port,
        "http.request.resend_count": 2,
        "error.type": "TimeoutError",
    }
    assert call.status_code == "ERROR"


def test_the_endpoint_and_the_settings_come_from_the_mapping_given() -> None:
    base = "OTEL_EXPORTER_OTLP_ENDPOINT"
    assert traces_endpoint({base: "http://c:4318"}) == "http://c:4318/v1/traces"
    assert traces_endpoint({base: "http://c:4318/"}) == "http://c:4318/v1/traces"
    traces = {base: "http://c:4318", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:1/in"}
    assert traces_endpoint(traces) == "http://t:1/in"
    assert public_endpoint("https://user:pw@c:4318/v1/traces?key=x") == "https://c:4318/v1/traces"
    log = CapturingLog()
    assert parse_pairs("a=1, b = x%2Cy ,=z,c", "V", log) == {"a": "1", "b": "x,y"}
    assert len(log.find("an entry is not key=value; left out")) == 2
    bsp = {"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_BSP_MAX_QUEUE_SIZE": "10",
           "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "99", "OTEL_BSP_EXPORT_TIMEOUT": "x"}  # fmt: skip
    assert batch_settings(bsp, log) == {
        "max_queue_size": 10,
        "schedule_delay_millis": 50,
        "max_export_batch_size": 10,  # no more than the queue holds
        "export_timeout_millis": 30000,
    }
    assert make_sampler({}, log)[0] == "always_on"
    assert make_sampler({"OTEL_TRACES_SAMPLER": "nonsense"}, log)[0] == "always_on"
    ratio = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"}
    assert make_sampler(ratio, log)[0] == "parentbased_traceidratio(1)"
    resource = make_resource(
        {"OTEL_RESOURCE_ATTRIBUTES": "service.name=ignored,team=devices",
         "OTEL_SERVICE_NAME": "named"}, "app", "prod", log,
    ).attributes  # fmt: skip
    assert resource["service.name"] == "named"
    assert resource["team"] == "devices"
    assert resource["deployment.environment.name"] == "prod"
    assert make_resource({}, "app", None, log).attributes["service.name"] == "app"


async def test_another_protocol_is_one_warning_and_http_protobuf_is_used(
    receiver: OtlpReceiver,
) -> None:
    log = CapturingLog()
    async with spans_of(receiver, log, OTEL_EXPORTER_OTLP_PROTOCOL="grpc") as spans:
        spans.event("NOTIFICATION", new_trace()).finish(200)
        await spans.flush()
    assert len([r for r in log.records if r.get("protocol") == "grpc"]) == 1
    assert receiver.count == 1


# ---------------------------------------------------------------- 6. the receiver


def _request() -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    attribute = resource_spans.resource.attributes.add()
    attribute.key, attribute.value.string_value = "service.name", "svc"
    scope_spans = resource_spans.scope_spans.add()
    scope_spans.scope.name = "biot-worker"
    span = scope_spans.spans.add()
    span.trace_id = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")
    span.span_id = bytes.fromhex("00f067aa0ba902b7")
    span.parent_span_id = bytes.fromhex("1111111111111111")
    span.name, span.kind = "GET", span.SPAN_KIND_CLIENT
    for key, kind, value in (("n", "int_value", 7), ("ok", "bool_value", True)):
        pair = span.attributes.add()
        pair.key = key
        setattr(pair.value, kind, value)
    listed = span.attributes.add()
    listed.key = "list"
    listed.value.array_value.values.add().string_value = "a"
    span.status.code, span.status.message = span.status.STATUS_CODE_ERROR, "boom"
    span.events.add().name = "exception"
    return request


async def test_the_receiver_decodes_gzipped_protobuf_and_json(receiver: OtlpReceiver) -> None:
    traces = receiver.endpoint + "/v1/traces"
    body = gzip.compress(_request().SerializeToString())
    headers = {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"}
    json_body = {"resourceSpans": [{"scopeSpans": [{"spans": [{
        "traceId": "5bf92f3577b34da6a3ce929d0e0e4736", "spanId": "10f067aa0ba902b7",
        "name": "process q", "kind": 5, "status": {}}]}]}]}  # fmt: skip
    async with aiohttp.ClientSession() as http:
        async with http.post(traces, data=body, headers=headers) as answer:
            assert answer.status == 200
            assert answer.content_type == "application/x-protobuf"
            ExportTraceServiceResponse().ParseFromString(await answer.read())
        async with http.post(traces, json=json_body) as answer:
            assert answer.status == 200
            assert await answer.json() == {}
        bad = {"Content-Type": "application/x-protobuf"}
        async with http.post(traces, data=b"\xff\xff not protobuf", headers=bad) as answer:
            assert answer.status == 400
        async with http.post(traces, data=b"x", headers={"Content-Type": "text/plain"}) as answer:
            assert answer.status == 415
        async with http.get(receiver.endpoint + "/count") as answer:
            assert await answer.json() == {"spans": 2, "requests": 2}
    span, consumer = receiver.spans
    assert span == decode_protobuf(_request().SerializeToString())[0]
    assert (span.trace_id, span.span_id, span.parent_span_id) == (
        "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "1111111111111111")  # fmt: skip
    assert (span.name, span.kind, span.status_code, span.status_message) == (
        "GET", "CLIENT", "ERROR", "boom")  # fmt: skip
    assert span.attributes == {"n": 7, "ok": True, "list": ["a"]}
    assert span.event_names == ("exception",)
    assert span.resource == {"service.name": "svc"}
    assert span.scope == "biot-worker"
    assert (consumer.kind, consumer.parent_span_id) == ("CONSUMER", None)
    assert consumer.span_id == "10f067aa0ba902b7"
    with pytest.raises(ValueError, match="OTLP/JSON"):
        decode_json(b"[1]")


async def test_the_receiver_runs_as_a_counting_collector_process() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker.testing.otlp", "--port", "0", cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        async with asyncio.timeout(WAIT):
            endpoint = orjson.loads(await process.stdout.readline())["otlp_endpoint"]
            async with aiohttp.ClientSession() as http:
                headers = {"Content-Type": "application/x-protobuf"}
                body = _request().SerializeToString()
                async with http.post(endpoint + "/v1/traces", data=body, headers=headers) as r:
                    assert r.status == 200
                async with http.get(endpoint + "/count") as r:
                    assert await r.json() == {"spans": 1, "requests": 1}
            process.send_signal(signal.SIGTERM)
            out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        assert orjson.loads(out.splitlines()[-1]) == {"spans": 1, "requests": 1}
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
