"""``biot-worker dev`` and ``biot-worker emulator``: the worker against BioT in a box.

``dev`` starts the emulator in this process, points the settings at it, and runs the runtime's
own loops (:func:`worker.runner.run_http`, or :func:`worker.runner.run_queue` with
``--source``); over HTTP it subscribes every route of the plugin, as a deployment would, and
prints shell commands that make the emulator fire each of them. ``emulator`` is BioT in a box
alone. The runtime never imports this module: only the CLI does.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import IO, BinaryIO, TextIO

from config.settings import Settings, replace_settings
from worker.app import WorkerApp
from worker.logs import Log
from worker.routing import INTERCEPTION_TYPES, Route, Router
from worker.runner import run_http, run_queue, stop_on_signals
from worker.testing.emulator import (
    ApiFailure,
    Emulator,
    EmulatorConfig,
    EmulatorServer,
    config_from_args,
)
from worker.testing.emulator import serve_forever as serve_emulator
from worker.testing.emulator.cli import describe
from worker.testing.emulator.entities import KINDS, EntityKind
from worker.testing.emulator.routes import ApiRoute, resolve
from worker.views import HookType

Started = Callable[[WorkerApp, str], None]


@asynccontextmanager
async def embedded_emulator(
    settings: Settings, *, tls: bool = False
) -> AsyncIterator[tuple[Emulator, EmulatorServer, Settings]]:
    """Start an emulator and give the settings that point the worker at it."""
    emulator = Emulator(EmulatorConfig(tls=tls))
    async with EmulatorServer(emulator) as server:
        pointed = replace_settings(
            settings,
            biot_base_url=server.url,
            biot_service_user_id=emulator.service_user_id,
            biot_service_user_secret=emulator.service_user_secret,
            worker_ca_bundle=server.ca_file,
        )
        yield emulator, server, pointed


async def run_dev(
    settings: Settings,
    routes: Router,
    *,
    source: str | None = None,
    tls: bool = False,
    stop: asyncio.Event | None = None,
    started: Started | None = None,
    stream: TextIO | BinaryIO | None = None,
    banner: TextIO | None = None,
    freeze_gc: bool = False,
) -> None:
    """The worker against an embedded emulator until ``stop`` (default: SIGTERM/SIGINT).

    Over HTTP every route BioT can subscribe is subscribed and the trigger commands go to
    ``banner`` (default stderr); with ``source`` the events come from that queue instead.
    ``freeze_gc``: see :func:`worker.runner.freeze_startup_objects` (``biot-worker dev``).
    """
    async with embedded_emulator(settings, tls=tls) as (emulator, server, pointed):
        out = banner or sys.stderr
        if source is not None:
            _write_queue_banner(out, server.url, source)
            fields = {"emulator_url": server.url}
            await run_queue(pointed, routes, source, stop=stop, stream=stream, fields=fields,
                            freeze_gc=freeze_gc)  # fmt: skip
            return

        def on_started(app: WorkerApp, url: str) -> None:
            subscribe_routes(emulator, routes, url, app.log)
            log_instructions(app.log, server.url, url, routes, banner=out)
            if started is not None:
                started(app, url)

        await run_http(pointed, routes, stop=stop, started=on_started, stream=stream,
                       freeze_gc=freeze_gc)  # fmt: skip


def subscribe_routes(emulator: Emulator, routes: Router, endpoint: str, log: Log) -> None:
    """Subscribe ``endpoint`` to every route BioT can subscribe, as a deployment would."""
    for route in routes:
        if route.hook is HookType.NONSPECIFIC:
            continue
        if not route.subscribable:
            log.warning("wildcard notification route not subscribed", route=route.describe())
            continue
        try:
            _subscribe(emulator, route, endpoint)
        except ApiFailure as exc:
            log.warning("route not subscribed", route=route.describe(), error=str(exc))


def _subscribe(emulator: Emulator, route: Route, endpoint: str) -> None:
    if route.hook is HookType.NOTIFICATION:
        assert route.entity is not None and route.action is not None
        emulator.subscribe_notification(
            route.entity, route.action, endpoint, template=route.template
        )
        return
    emulator.subscribe_interception(
        INTERCEPTION_TYPES[route.hook],
        endpoint,
        api_id=route.api_id,
        entity_name=route.entity,
        order=route.order,
    )


# ---------------------------------------------------------------- trigger commands

_SERVED = {kind.name: kind for kind in KINDS}
_ACTIONS = {"_create": "create", "_read": "get", "_update": "update", "_delete": "delete"}
_ID = "python3 -c 'import json,sys; print(json.load(sys.stdin)[\"_id\"])'"


def trigger_commands(emulator_url: str, worker_url: str, routes: Router) -> Iterator[str]:
    """One shell command per route that makes the emulator (or a direct call) fire it.

    Derived from the routes actually registered; a route the emulator cannot fire (an entity
    type or API it does not serve, a wildcard) gets one line saying so instead.
    """
    commands = _Commands(emulator_url, worker_url)
    lines = [f"{r.describe()} -> {r.handler_name}: {commands.of(r)}" for r in routes]
    if commands.uses_token:
        yield (
            f"first get a user token: TOKEN=$(curl -s -X POST {emulator_url}/_emulator/user-token"
            " | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"accessToken\"])')"
        )
    yield from lines


class _Commands:
    """Builds the shell command that fires one route; remembers whether a user token is needed."""

    def __init__(self, emulator_url: str, worker_url: str) -> None:
        self.emulator_url, self.worker_url = emulator_url, worker_url
        self.uses_token = False

    def of(self, route: Route) -> str:
        if route.hook is HookType.NONSPECIFIC:
            return f"curl -s -X POST -H 'hooktype: NONSPECIFIC' -d '{{}}' {self.worker_url}/"
        if not route.subscribable:
            return "a wildcard route: BioT cannot subscribe it, so nothing here triggers it"
        if route.hook is HookType.NOTIFICATION:
            return self._notification(route)
        if route.api_id is not None:
            return self._api(route.api_id)
        assert route.entity is not None
        kind = _SERVED.get(route.entity)
        if kind is None:
            return self._unserved_entity(route.entity)
        return self._call("GET", self._url(kind.base))

    def _notification(self, route: Route) -> str:
        assert route.entity is not None and route.action is not None
        kind = _SERVED.get(route.entity)
        if kind is None:
            return self._unserved_entity(route.entity)
        operation = _ACTIONS.get(route.action)
        if operation is None:
            known = ", ".join(_ACTIONS)
            return f"the emulator performs no action {route.action!r} (only {known})"
        return self._operation(kind, operation, route.template)

    def _api(self, api_id: str) -> str:
        method, slash, path = api_id.partition("/")
        found = resolve(method, "/" + path) if slash else None
        if found is None:
            return f"the emulator serves no API {api_id!r} (see its /_emulator/info)"
        route, params = found
        template = params.get("templateName")
        entity_id = params.get("id")
        concrete = None if template is None or template.startswith("{") else template
        if entity_id is not None and not entity_id.startswith("{"):
            return self._call(route.method, self._url(_path(route, entity_id, concrete)))
        return self._operation(route.kind, route.operation, concrete)

    def _operation(self, kind: EntityKind, operation: str, template: str | None) -> str:
        base = self._url(kind.base)
        create = self._call(
            "POST", f"{base}/templates/{template}" if template else base, _sample_body(kind)
        )
        if operation == "create":
            return create
        if operation == "search":
            return self._call("GET", base)
        method = {"get": "GET", "update": "PATCH", "delete": "DELETE"}[operation]
        body = _sample_body(kind) if operation == "update" else None
        return f"ID=$({create} | {_ID}) && {self._call(method, base + '/$ID', body)}"

    def _call(self, method: str, url: str, body: str | None = None) -> str:
        self.uses_token = True
        command = f'curl -s -X {method} -H "authorization: Bearer $TOKEN"'
        if body is not None:
            command += f" -H 'content-type: application/json' -d '{body}'"
        return f"{command} {url}"

    def _url(self, path: str) -> str:
        return self.emulator_url + path

    def _unserved_entity(self, entity: str) -> str:
        served = ", ".join(_SERVED)
        return f"the emulator serves no entity type {entity!r} (only {served}); send it yourself"


def _path(route: ApiRoute, entity_id: str, template: str | None) -> str:
    path = route.template.replace("{id}", entity_id)
    return path.replace("{templateName}", template or route.kind.default_template)


def _sample_body(kind: EntityKind) -> str:
    if kind.person:
        return '{"_name": {"firstName": "Ada", "lastName": "Lovelace"}}'
    return '{"_name": "dev sample"}'


def log_instructions(
    log: Log, emulator_url: str, worker_url: str, routes: Router, banner: TextIO | None = None
) -> None:
    """One JSON log line with the URLs, and copy-paste commands as plain text on stderr.

    The commands are for a person at a terminal; they stay out of the JSON log stream (where
    ``Bearer $TOKEN`` would, rightly, be redacted).
    """
    log.info("embedded BioT emulator running", emulator_url=emulator_url, worker_url=worker_url)
    out = banner or sys.stderr
    out.write(f"\nBioT emulator at {emulator_url}; worker at {worker_url}. To trigger hooks:\n")
    for line in trigger_commands(emulator_url, worker_url, routes):
        out.write(f"  - {line}\n")
    out.write("  (or run: biot-worker demo)\n\n")
    out.flush()


def _write_queue_banner(out: TextIO, emulator_url: str, source: str) -> None:
    from worker.adapters.queue import redact_url

    shown = redact_url(source)
    out.write(
        f"\nBioT emulator at {emulator_url}; the worker consumes {shown}. To put events on it:\n"
        f"  biot-worker publish --source URL --emulator {emulator_url} --hook all"
        " --wait-replies\n\n"
    )
    out.flush()


async def emulator(args: argparse.Namespace, *, out: IO[str] | None = None) -> int:
    """``biot-worker emulator``: BioT in a box alone, until SIGTERM/SIGINT."""
    stream = out or sys.stdout
    try:
        config = config_from_args(args)
    except ValueError as exc:
        sys.stderr.write(f"biot-worker emulator: {exc}\n")
        return 2
    stop = asyncio.Event()

    def ready(server: EmulatorServer) -> None:
        stream.write(describe(server))
        stream.flush()

    with stop_on_signals(stop):
        await serve_emulator(config, host=args.host, port=args.port, ready=ready, stop=stop)
    return 0
