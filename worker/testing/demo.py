"""``biot-worker demo``: an event for each route of the plugin, through the emulator and worker.

It starts BioT in a box and the worker (both in this process, over real loopback HTTP), sends
each route's event to the worker exactly as BioT does (headers, an RS512 token signed by the
emulator's key, the contract's payload), and prints per route what the handler did, read from
the answer (what it changed in the request, response or entities, or the error it answered) and
from the emulator's call log (the API calls it made), with the round-trip latency. Wildcard
routes, which BioT cannot subscribe, are listed as not exercised. Worker logs go to stderr.
"""

from __future__ import annotations

import asyncio
import ssl
import statistics
import sys
import time
from dataclasses import dataclass
from typing import IO, Any, TextIO

import aiohttp
import orjson

from config.settings import Settings
from worker.app import WorkerApp
from worker.routing import WILDCARD, Route, Router
from worker.runner import run_http
from worker.testing.dev import embedded_emulator, subscribe_routes
from worker.testing.emulator import Emulator
from worker.testing.emulator.entities import KINDS, PATIENT, EntityKind
from worker.testing.events import (
    INTERCEPTION_SCOPE,
    NOTIFICATION_SCOPE,
    interceptor_body,
    notification_body,
)
from worker.testing.events import entity as sample_entity
from worker.tracing import new_trace
from worker.views import HookType

ROUNDS = 20
_SHOWN_CHANGES = 3
_SHOWN_CHARS = 60


@dataclass(frozen=True)
class Outcome:
    route: str
    status: int | None
    did: str
    latencies_ms: list[float]

    def lines(self) -> str:
        if self.status is None or not self.latencies_ms:
            return f"{self.route}\n    {self.did}\n"
        p50 = statistics.median(self.latencies_ms)
        worst = max(self.latencies_ms)
        timing = f"{self.status}, p50 {p50:.2f} ms, max {worst:.2f} ms"
        return f"{self.route}\n    {timing}: {self.did}\n"

    @property
    def failed(self) -> bool:
        return self.status is not None and self.status >= 500


async def demo(
    settings: Settings,
    routes: Router,
    *,
    tls: bool = False,
    out: IO[str] | None = None,
    err: TextIO | None = None,
) -> int:
    """Run the demo; 1 when some handler answered 5xx, else 0."""
    out = out or sys.stdout
    stop = asyncio.Event()
    listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    async with embedded_emulator(settings, tls=tls) as (emulator, server, pointed):

        def started(app: WorkerApp, url: str) -> None:
            subscribe_routes(emulator, routes, url, app.log)
            listening.set_result(url)

        worker = asyncio.create_task(
            run_http(pointed, routes, stop=stop, started=started, stream=err or sys.stderr)
        )
        try:
            url = await _wait_listening(listening, worker)
            outcomes = await _drive(emulator, url, server.ca_file, routes)
        finally:
            stop.set()
            await worker
    _print(out, outcomes, server.url, url)
    return 1 if any(o.failed for o in outcomes) else 0


async def _wait_listening(listening: asyncio.Future[str], worker: asyncio.Task[None]) -> str:
    waiting: list[asyncio.Future[Any]] = [listening, worker]
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if not listening.done():
        worker.result()  # raises the worker's start-up error
        raise RuntimeError("the worker stopped before listening")
    return listening.result()


async def _drive(
    emulator: Emulator, worker_url: str, ca_file: str | None, routes: Router
) -> list[Outcome]:
    context: ssl.SSLContext | bool = True
    if ca_file is not None:
        context = await asyncio.to_thread(ssl.create_default_context, cafile=ca_file)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as http:
        sender = _Sender(http, worker_url, emulator)
        return [await sender.exercise(route) for route in routes]


class _Sender:
    """Sends one route's event to the worker as BioT does, ROUNDS times, timing each."""

    def __init__(self, http: aiohttp.ClientSession, url: str, emulator: Emulator) -> None:
        self._http, self._url, self._emulator = http, url, emulator

    async def exercise(self, route: Route) -> Outcome:
        name = f"{route.describe()} -> {route.handler_name}"
        if WILDCARD in (route.entity, route.action):
            did = "not exercised: a wildcard route (no one event stands for it)"
            return Outcome(name, None, did, [])
        payload = _payload(route, self._entity(route))
        latencies: list[float] = []
        status, body, trace_id = 0, None, ""
        for _ in range(ROUNDS + 1):  # the first round warms up and is not counted
            trace = new_trace()
            headers, data = self._signed(route.hook, payload, trace.traceparent)
            started = time.perf_counter()
            async with self._http.post(self._url, data=data, headers=headers) as response:
                raw = await response.read()
                status = response.status
            latencies.append((time.perf_counter() - started) * 1000)
            body, trace_id = (orjson.loads(raw) if raw else None), trace.trace_id
        did = _describe(route.hook, payload, status, body)
        calls = self._api_calls(trace_id)
        return Outcome(name, status, f"{did}{calls}", latencies[1:])

    def _entity(self, route: Route) -> dict[str, Any]:
        """A stored entity of the route's type when the emulator serves it, else a sample."""
        kind = _kind(route.entity, route.api_id)
        if kind is None:
            return sample_entity()
        stored = self._emulator.store.all(kind)
        if stored:
            return stored[0]
        body: dict[str, Any] = {"_name": "demo"}
        if kind.person:
            body = {"_name": {"firstName": "Ada", "lastName": "Lovelace"}}
        return self._emulator.store.create(kind, body)

    def _signed(
        self, hook: HookType, payload: dict[str, Any], traceparent: str
    ) -> tuple[dict[str, str], bytes]:
        headers = {"hooktype": hook.value, "traceparent": traceparent}
        headers["content-type"] = "application/json"
        if hook is HookType.NOTIFICATION:
            payload = {**payload, "jwt": self._emulator.sign_token(scopes=[NOTIFICATION_SCOPE])}
        elif hook.is_interceptor:
            token = self._emulator.sign_token(scopes=[INTERCEPTION_SCOPE])
            headers["authorization"] = f"Bearer {token}"
        return headers, orjson.dumps(payload)

    def _api_calls(self, trace_id: str) -> str:
        calls = self._emulator.calls.records(trace_id=trace_id, direction="in")
        if not calls:
            return ""
        shown = ", ".join(f"{c.method} {c.path} -> {c.status}" for c in calls[:_SHOWN_CHANGES])
        more = f" (+{len(calls) - _SHOWN_CHANGES} more)" if len(calls) > _SHOWN_CHANGES else ""
        return f"; called {shown}{more}"


def _kind(entity: str | None, api_id: str | None) -> EntityKind | None:
    for kind in KINDS:
        if entity == kind.name:
            return kind
        if api_id is not None and api_id.partition("/")[2].startswith(kind.base.lstrip("/")):
            return kind
    return None


def _payload(route: Route, stored: dict[str, Any]) -> dict[str, Any]:
    if route.hook is HookType.NONSPECIFIC:
        return {}
    if route.hook is HookType.NOTIFICATION:
        assert route.entity is not None and route.action is not None
        body = notification_body(None, entity_type=route.entity, action=route.action)
        entity = dict(stored)
        if route.template:
            entity["_template"] = {**entity.get("_template", {}), "name": route.template}
        body["data"] = {"entity": entity, "additionalData": {"oldEntity": stored}}
        return body
    return _interception(route, stored)


def _interception(route: Route, stored: dict[str, Any]) -> dict[str, Any]:
    kind = _kind(route.entity, route.api_id) or PATIENT
    api_id = route.api_id or f"PATCH{kind.base}/{{id}}"
    method, _, template = api_id.partition("/")
    path = "/" + template.replace("{id}", str(stored["_id"]))
    path = path.replace("{templateName}", kind.default_template)
    body = interceptor_body(route.hook.value, api_id=api_id, entity_name=route.entity or kind.name)
    request = body["request"]
    request["path"] = path
    request["pathVariables"] = [{"name": "id", "value": stored["_id"]}] if "{id}" in api_id else []
    request["queryParameters"] = {}
    request["body"] = (
        {k: stored[k] for k in ("_name",) if k in stored} if method in ("PATCH", "POST") else None
    )
    if route.hook is HookType.INTERCEPTOR_POST:
        body["response"]["body"] = stored
    if route.hook is HookType.INTERCEPTOR_POST_ENTITY:
        body["response"]["entities"] = [stored]
    return body


def _describe(hook: HookType, payload: dict[str, Any], status: int, body: Any) -> str:
    if status >= 400:
        if isinstance(body, dict):
            return f"answered {status} {body.get('code')}: {_short(body.get('message'))}"
        return f"answered {status}"
    if hook is HookType.NOTIFICATION:
        return "handled (BioT ignores a notification's answer)"
    if hook is HookType.NONSPECIFIC:
        return f"answered {_short(body)}"
    if not isinstance(body, dict):
        return f"answered {_short(body)}"
    if hook is HookType.INTERCEPTOR_PRE:
        answered = body.get("request")
        sent = payload["request"]
        if isinstance(answered, dict):  # the answer carries only the parts a PRE may change
            sent = {key: value for key, value in sent.items() if key in answered}
        return _changes("request", sent, answered)
    if hook is HookType.INTERCEPTOR_POST:
        return _changes("response", payload["response"], body.get("response"))
    sent = payload["response"]["entities"]
    answered = (body.get("response") or {}).get("entities")
    return _changes("entities", sent, answered)


def _changes(what: str, before: Any, after: Any) -> str:
    found: list[str] = []
    _diff(what, before, after, found)
    if not found:
        return f"{what} unchanged"
    shown = "; ".join(found[:_SHOWN_CHANGES])
    more = f" (+{len(found) - _SHOWN_CHANGES} more)" if len(found) > _SHOWN_CHANGES else ""
    return f"changed {shown}{more}"


def _diff(path: str, before: Any, after: Any, found: list[str]) -> None:
    if isinstance(before, dict) and isinstance(after, dict):
        for key in dict.fromkeys([*before, *after]):
            _diff(f"{path}.{key}", before.get(key, _ABSENT), after.get(key, _ABSENT), found)
    elif isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        for index, (old, new) in enumerate(zip(before, after, strict=True)):
            _diff(f"{path}[{index}]", old, new, found)
    elif before != after:
        found.append(f"{path}: {_short(before)} -> {_short(after)}")


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT: Any = _Absent()


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, str | _Absent) else _json(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _json(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return repr(value)


def _print(out: IO[str], outcomes: list[Outcome], api_url: str, worker_url: str) -> None:
    out.write(f"biot-worker demo: the worker at {worker_url}, the BioT emulator at {api_url}\n")
    out.write("each route, then its status, latency and what the handler did:\n")
    for outcome in outcomes:
        out.write(outcome.lines())
    if not outcomes:
        out.write("(the plugin has no routes)\n")
    out.write(f"(latency: {ROUNDS} round trips per route after one warm-up, loopback HTTP)\n")
