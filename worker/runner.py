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

from config.settings import Settings
from worker.adapters.http import HttpAdapter, serve
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
