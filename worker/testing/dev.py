"""What the CLI's commands do: ``run`` (with the embedded emulator by default), ``emulator``.

``demo`` lives in :mod:`worker.testing.demo`. The CLI module only parses flags and calls these.
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
from worker.events import HookType
from worker.logs import Log
from worker.routing import INTERCEPTION_TYPES, Router, load_routes
from worker.runner import install_signal_handlers, run_worker
from worker.testing.emulator import Emulator, EmulatorConfig, EmulatorServer, config_from_args
from worker.testing.emulator import serve_forever as serve_emulator

Started = Callable[[WorkerApp, str], None]


async def run(
    settings: Settings,
    *,
    emulator_tls: bool = False,
    source: str | None = None,
    routes: Router | None = None,
    stop: asyncio.Event | None = None,
    started: Started | None = None,
) -> int:
    """``biot-worker run``: serve until SIGTERM/SIGINT (or ``stop``).

    Events come over HTTP, or from the queue named by ``source`` (``redis://``, ``amqp://``).
    """
    routes = routes if routes is not None else load_routes(settings.worker.routes)
    stop = stop if stop is not None else asyncio.Event()
    remove = install_signal_handlers(stop)
    try:
        if source is not None:
            from worker.runner import run_queue

            await run_queue(settings, routes, source, stop=stop)
        elif settings.biot.base_url is not None:
            await run_worker(settings, routes, stop=stop, started=started)
        else:
            await run_embedded(settings, routes, stop=stop, tls=emulator_tls, started=started)
    finally:
        remove()
    return 0


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


async def run_embedded(
    settings: Settings,
    routes: Router,
    *,
    stop: asyncio.Event,
    tls: bool = False,
    started: Started | None = None,
    stream: TextIO | BinaryIO | None = None,
) -> None:
    """The worker against an in-process emulator, subscribed to every routed hook."""
    async with embedded_emulator(settings, tls=tls) as (emulator, server, pointed):

        def on_started(app: WorkerApp, url: str) -> None:
            subscribe_routes(emulator, routes, url, app.log)
            log_instructions(app.log, server.url, url, routes)
            if started is not None:
                started(app, url)

        await run_worker(pointed, routes, stop=stop, started=on_started, stream=stream)


def subscribe_routes(emulator: Emulator, routes: Router, endpoint: str, log: Log) -> None:
    """Subscribe ``endpoint`` to every route BioT can subscribe, as a deployment would."""
    for route in routes:
        if route.hook is HookType.NONSPECIFIC:
            continue
        if not route.subscribable:
            log.warning("wildcard notification route not subscribed", route=route.describe())
            continue
        if route.hook is HookType.NOTIFICATION:
            assert route.entity is not None and route.action is not None
            emulator.subscribe_notification(
                route.entity, route.action, endpoint, template=route.template
            )
            continue
        emulator.subscribe_interception(
            INTERCEPTION_TYPES[route.hook],
            endpoint,
            api_id=route.api_id,
            entity_name=route.entity,
            order=route.order,
        )


def trigger_commands(emulator_url: str, worker_url: str, routes: Router) -> Iterator[str]:
    """Shell commands that make the emulator (or a direct call) fire each routed hook."""
    token = (
        f"TOKEN=$(curl -s -X POST {emulator_url}/_emulator/user-token"
        " | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"accessToken\"])')"
    )
    patients = f"{emulator_url}/organization/v1/users/patients"
    yield f"get a user token: {token}"
    yield (
        "PRE, ADAPT_ENTITY, POST and a NOTIFICATION (_update): "
        f'ID=$(curl -s -H "authorization: Bearer $TOKEN" {patients}'
        ' | python3 -c \'import json,sys; print(json.load(sys.stdin)["data"][0]["_id"])\'); '
        f"curl -s -X PATCH -H \"authorization: Bearer $TOKEN\" -H 'content-type: application/json'"
        f' -d \'{{"_name": {{"firstName": "Ada", "lastName": "Lovelace"}}}}\' {patients}/$ID'
    )
    if routes.has_nonspecific:
        yield f"NONSPECIFIC: curl -s -X POST -H 'hooktype: NONSPECIFIC' -d '{{}}' {worker_url}/"


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


async def emulator(args: argparse.Namespace, *, out: IO[str] | None = None) -> int:
    """``biot-worker emulator``: BioT in a box alone, until SIGTERM/SIGINT."""
    stream = out or sys.stdout
    try:
        config = config_from_args(args)
    except ValueError as exc:
        sys.stderr.write(f"biot-worker emulator: {exc}\n")
        return 2
    stop = asyncio.Event()
    remove = install_signal_handlers(stop)

    def ready(server: EmulatorServer) -> None:
        info = server.emulator.info()
        stream.write(
            f"BioT emulator listening on {server.url}\n"
            f"  BIOT_BASE_URL={server.url}\n"
            f"  BIOT_SERVICE_USER_ID={info['serviceUserId']}\n"
            f"  BIOT_SERVICE_USER_SECRET_KEY={config.service_user_secret}"
            "   (a development value)\n"
            + (f"  WORKER_CA_BUNDLE={server.ca_file}\n" if server.ca_file else "")
            + f"  admin API: {server.url}/_emulator/info\n"
        )
        stream.flush()

    try:
        await serve_emulator(config, host=args.host, port=args.port, ready=ready, stop=stop)
    finally:
        remove()
    return 0
