"""The long-lived process: signals, the HTTP adapter, and an orderly shutdown.

Signals only set an event. On SIGTERM/SIGINT the listening socket closes, in-flight events get
``WORKER_SHUTDOWN_GRACE`` seconds to finish, then the dispatcher's resources close in reverse
order of opening (client session, token refresher, log).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import BinaryIO, TextIO
from urllib.parse import urlsplit

from config.settings import Settings, SettingsError
from worker.adapters.http import HttpAdapter, serve
from worker.adapters.source import SourceUnavailable, open_source, redact_url
from worker.app import WorkerApp
from worker.routing import Router

Started = Callable[[WorkerApp, str], None]


def install_signal_handlers(stop: asyncio.Event) -> Callable[[], None]:
    """SIGTERM and SIGINT set ``stop``; returns a function that removes the handlers."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)

    def remove() -> None:
        for sig in signals:
            loop.remove_signal_handler(sig)

    return remove


async def run_worker(
    settings: Settings,
    routes: Router,
    *,
    stop: asyncio.Event,
    started: Started | None = None,
    stream: TextIO | BinaryIO | None = None,
) -> None:
    """Serve events over HTTP until ``stop`` is set; ``started(app, url)`` once listening.

    ``stream`` is where log lines go (default stdout).
    """
    async with WorkerApp(settings, routes, stream=stream) as app:
        worker = settings.worker
        adapter = HttpAdapter(
            app.dispatcher,
            max_in_flight=worker.max_in_flight,
            max_body_bytes=worker.max_body_bytes,
            ready=app.ready,
            log=app.log,
        )

        def on_listening(port: int) -> None:
            url = f"http://{_url_host(worker.host)}:{port}"
            loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
            app.log.info(
                "worker listening", url=url, base_url=settings.biot.base_url, event_loop=loop
            )
            if started is not None:
                started(app, url)

        await serve(
            adapter,
            host=worker.host,
            port=worker.port,
            stop=stop,
            grace=worker.shutdown_grace,
            started=on_listening,
        )
        app.log.info("worker stopped; closing resources")


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):  # noqa: S104 - only formats a URL
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


async def run_queue(settings: Settings, routes: Router, url: str, *, stop: asyncio.Event) -> None:
    """``biot-worker run --source URL``: serve the queue until ``stop`` (SIGTERM/SIGINT).

    Without ``BIOT_BASE_URL`` the worker talks to an embedded emulator, as ``run`` does.
    """
    if urlsplit(url).scheme.lower() == "memory":
        raise SettingsError(["--source: memory:// is in-process only (see MemorySource)"])
    if settings.biot.base_url is None:
        from worker.testing.dev import embedded_emulator

        async with embedded_emulator(settings) as (_, server, pointed):
            await _serve_queue(pointed, routes, url, stop, emulator_url=server.url)
        return
    await _serve_queue(settings, routes, url, stop)


async def _serve_queue(
    settings: Settings, routes: Router, url: str, stop: asyncio.Event, emulator_url: str = ""
) -> None:
    async with WorkerApp(settings, routes) as app:
        try:
            source = open_source(url, settings, app.log)
        except ValueError as exc:
            raise SettingsError([f"--source: {exc}"]) from None
        try:
            await source.__aenter__()
        except SourceUnavailable as exc:
            app.log.error("cannot open the queue", source=redact_url(url), error=str(exc))
            raise SystemExit(1) from None
        try:
            fields = {"emulator_url": emulator_url} if emulator_url else {}
            app.log.info("worker consuming", source=redact_url(url), **fields)
            await source.serve(app.dispatcher.handle, stop=stop)
        finally:
            await source.__aexit__(None, None, None)
        app.log.info("worker stopped; closing resources")
