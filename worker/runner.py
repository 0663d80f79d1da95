"""The long-lived process: the two run loops (HTTP and queue), signals, an orderly shutdown.

:func:`run_http` serves events over HTTP, :func:`run_queue` takes them from a queue; both run
until ``stop`` is set. Without a ``stop`` of the caller's, SIGTERM and SIGINT set one (see
:class:`StopSignals`). On stop, intake stops, in-flight events get ``WORKER_SHUTDOWN_GRACE``
seconds to finish, then the dispatcher's resources close in reverse order of opening (client
session, token refresher, log).

This is runtime: it needs a real BioT (``settings.biot.base_url``) and imports no tool (the
emulator, the benchmark, the CLI); ``biot-worker dev`` wraps these functions with settings
pointed at an embedded emulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, BinaryIO, TextIO
from urllib.parse import urlsplit

from aiohttp import web

from config.settings import Settings, SettingsError
from worker.adapters.health import (
    BrokerCheck,
    Check,
    Health,
    PublicKeyCheck,
    ServiceTokenCheck,
    health_runner,
)
from worker.adapters.http import HttpAdapter, serve
from worker.app import StartupError, WorkerApp
from worker.logs import Log
from worker.responses import ErrorContext
from worker.routing import Router

if TYPE_CHECKING:
    from worker.adapters.queue import IntakeStatus

__all__ = [
    "StartupError",
    "StopSignals",
    "app_health",
    "http_adapter",
    "run_http",
    "run_queue",
    "stop_on_signals",
]

Started = Callable[[WorkerApp, str], None]
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """SIGTERM and SIGINT set ``stop``; one arriving while stopping is ignored.

    The first signal starts the graceful stop, which ``WORKER_SHUTDOWN_GRACE`` bounds; later
    ones are ignored, the first of them logged as ``already stopping`` (an orchestrator that
    sends SIGTERM twice must not kill in-flight events; the grace period, not a third signal,
    is the bound). Once a signal was received the process is ending: :meth:`close` leaves both
    signals ignored rather than restoring the default action, so one arriving while resources
    close cannot kill the process with status 143. Removing the loop's handlers passes through
    the default action, so :meth:`close` does it with the signals blocked; the worker's other
    threads block them for good (see :func:`_signals_to_the_main_thread`). Without a signal
    received, :meth:`close` restores the previous handlers.
    """

    def __init__(self, stop: asyncio.Event, log: Log | None = None) -> None:
        self.stop = stop
        self.log = log
        self.received = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> None:
        self._loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
            self._loop.add_signal_handler(sig, self._on_signal, sig)

    def close(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        # Removing a handler restores the default action (kill) until SIG_IGN is set: with the
        # signals blocked meanwhile, one arriving in between stays pending and, once ignored,
        # is discarded instead of ending the process with status 143.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            for sig in _SIGNALS:
                loop.remove_signal_handler(sig)
                if self.received:
                    signal.signal(sig, signal.SIG_IGN)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._loop is None:
            return  # delivered just before close(): the process is past its stop already
        self.received += 1
        if self.received == 1 and not self.stop.is_set():
            if self.log is not None:
                self.log.info("stopping", signal=sig.name)
            self.stop.set()
        elif self.received == 2 and self.log is not None:
            # Logged once: a stream of signals must not become a stream of log lines.
            self.log.warning("already stopping; signal ignored", signal=sig.name)


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event, log: Log | None = None) -> Iterator[StopSignals]:
    """:class:`StopSignals` installed for the duration of the block."""
    signals = StopSignals(stop, log)
    signals.install()
    try:
        yield signals
    finally:
        signals.close()


@contextlib.contextmanager
def _signals_unless_given(stop: asyncio.Event | None, log: Log) -> Iterator[asyncio.Event]:
    if stop is not None:
        yield stop
        return
    own = asyncio.Event()
    with stop_on_signals(own, log):
        yield own


def _signals_to_the_main_thread() -> None:
    """Make the default executor's threads block SIGTERM and SIGINT, as the log's thread does:
    a signal then always reaches the main thread, where :class:`StopSignals` decides."""
    if threading.current_thread() is threading.main_thread():
        executor = ThreadPoolExecutor(thread_name_prefix="biot-worker", initializer=_block_signals)
        asyncio.get_running_loop().set_default_executor(executor)


def _block_signals() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)


async def run_http(
    settings: Settings,
    routes: Router,
    *,
    stop: asyncio.Event | None = None,
    started: Started | None = None,
    stream: TextIO | BinaryIO | None = None,
    freeze_gc: bool = False,
) -> None:
    """Serve events over HTTP until ``stop`` is set (SIGTERM/SIGINT when ``stop`` is None).

    ``started(app, url)`` is called once listening; ``stream`` is where log lines go (default
    stdout). A port in use or an unreadable CA bundle raises :class:`StartupError`.
    ``freeze_gc``: see :func:`freeze_startup_objects` (the process's own worker, not a test's).
    """
    if stop is None:
        _signals_to_the_main_thread()
    async with WorkerApp(settings, routes, stream=stream) as app:
        with _signals_unless_given(stop, app.log) as stopping:
            await _serve_http(app, stopping, started, freeze_gc)
        app.log.info("worker stopped; closing resources")


def freeze_startup_objects() -> None:
    """Move every object alive once the worker has started (modules, the plugin, settings,
    pools: some 47k) out of the cyclic collector's sight (``gc.freeze``). A full collection
    otherwise walks them all while every event in flight waits: 13-23 ms per full collection in
    (b) at c=32 here, which made the worker's p99 twice the floor's; 1.3-1.5 ms with them frozen.
    Objects made later are collected as before; a cycle among the frozen ones is never freed,
    which startup objects that live as long as the process do not mind. For the process's own
    worker only (``biot-worker run`` and ``dev``): a test's worker leaves the test process
    alone."""
    gc.freeze()


def http_adapter(app: WorkerApp) -> HttpAdapter:
    """The HTTP adapter in front of ``app``'s dispatcher, bounded by its settings."""
    worker = app.settings.worker
    return HttpAdapter(
        app.dispatcher,
        max_in_flight=worker.max_in_flight,
        max_body_bytes=worker.max_body_bytes,
        health=app_health(app),
        log=app.log,
        body_timeout=worker.body_timeout,
        metrics=app.metrics,
        traced=app.spans is not None,
    )


async def _serve_http(
    app: WorkerApp, stop: asyncio.Event, started: Started | None, freeze_gc: bool = False
) -> None:
    settings, worker = app.settings, app.settings.worker
    adapter = http_adapter(app)
    listening = False

    def on_listening(port: int) -> None:
        nonlocal listening
        listening = True
        if freeze_gc:
            freeze_startup_objects()
        url = f"http://{_url_host(worker.host)}:{port}"
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
        app.log.info("worker listening", url=url, base_url=settings.biot.base_url, event_loop=loop)
        if started is not None:
            started(app, url)

    try:
        await serve(
            adapter,
            host=worker.host,
            port=worker.port,
            stop=stop,
            grace=worker.shutdown_grace,
            started=on_listening,
            keepalive_timeout=worker.keepalive_timeout,
            header_timeout=worker.header_timeout,
            max_connections=worker.max_connections,
            client_connections=worker.api_max_connections,
        )
    except OSError as exc:
        if listening:
            raise
        raise StartupError(_listen_problem(worker.host, worker.port, exc)) from exc


def _listen_problem(
    host: str, port: int, exc: OSError, variable: str = "WORKER_PORT", flag: str = "--port"
) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"cannot listen on {host}:{port}: the port is in use ({variable}, {flag})"
    reason = exc.strerror or str(exc)
    return f"cannot listen on {host}:{port}: {reason} (WORKER_HOST, {variable})"


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):  # noqa: S104 - only formats a URL
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def app_health(
    app: WorkerApp, *, intake: IntakeStatus | None = None, source: str | None = None
) -> Health:
    """The probes of ``app``: its public key and service token, and in queue mode (``intake``
    given) the broker at ``source`` (shown as given: hide its password first)."""
    biot, worker = app.settings.biot, app.settings.worker
    checks: list[Check] = [PublicKeyCheck(app.verifier, app.contact), ServiceTokenCheck(app.tokens)]
    if intake is not None:
        checks.append(BrokerCheck(intake, source or ""))
    return Health(
        checks,
        errors=ErrorContext(biot.app_name, biot.environment),
        contact=app.contact,
        intake=intake,
        probe_timeout=worker.api_timeout,
    )


@contextlib.asynccontextmanager
async def _health_listener(
    app: WorkerApp, health: Health, intake: IntakeStatus
) -> AsyncIterator[str]:
    """A queue worker's ``/healthz``, ``/readyz`` and ``/metrics`` on ``WORKER_HEALTH_PORT``
    (unset: ``WORKER_PORT``) at ``WORKER_HOST``, for the block; yields its URL. A port that
    cannot be bound raises :class:`StartupError`."""
    worker = app.settings.worker
    port = worker.port if worker.health_port is None else worker.health_port
    names = ("WORKER_PORT", "--port") if worker.health_port is None else (
        "WORKER_HEALTH_PORT", "--health-port")  # fmt: skip
    runner = health_runner(
        health, lambda: intake.in_flight, idle_timeout=worker.header_timeout, metrics=app.metrics
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, worker.host, port)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(_listen_problem(worker.host, port, exc, *names)) from exc
        bound = next((a[1] for a in runner.addresses if isinstance(a, tuple)), port)
        yield f"http://{_url_host(worker.host)}:{bound}"
    finally:
        await runner.cleanup()


async def run_queue(
    settings: Settings,
    routes: Router,
    url: str,
    *,
    stop: asyncio.Event | None = None,
    stream: TextIO | BinaryIO | None = None,
    fields: dict[str, str] | None = None,
    freeze_gc: bool = False,
) -> None:
    """Serve the queue at ``url`` until ``stop`` is set (SIGTERM/SIGINT when ``stop`` is None),
    with ``/healthz`` and ``/readyz`` on the health port (see :func:`_health_listener`).
    ``freeze_gc``: see :func:`freeze_startup_objects`, once the queue and the port are open.

    A bad URL raises :class:`SettingsError`; a broker that cannot be reached at start logs
    ``cannot open the queue`` and raises ``SystemExit(1)``; a health port that cannot be bound
    raises :class:`StartupError`. The ``worker consuming`` log line names the source (its
    password hidden) and the health URL, plus ``fields``.
    """
    # The queue seam (and through it a broker client) is imported only when a queue is used.
    from worker.adapters import open_source, queue

    if urlsplit(url).scheme.lower() == "memory":
        raise SettingsError(["--source: memory:// is in-process only (see MemorySource)"])
    if stop is None:
        _signals_to_the_main_thread()
    async with WorkerApp(settings, routes, stream=stream) as app:
        try:
            source = open_source(url, settings, app.log)
        except SettingsError:
            raise
        except ValueError as exc:
            raise SettingsError([f"--source: {exc}"]) from None
        async with contextlib.AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(source)
            except queue.SourceUnavailable as exc:
                app.log.error("cannot open the queue", source=queue.redact_url(url), error=str(exc))
                raise SystemExit(1) from None
            intake = queue.IntakeStatus()
            health = app_health(app, intake=intake, source=queue.redact_url(url))
            health_url = await stack.enter_async_context(_health_listener(app, health, intake))
            app.log.info("worker consuming", source=queue.redact_url(url), health=health_url,
                         **(fields or {}))  # fmt: skip
            if freeze_gc:
                freeze_startup_objects()
            with _signals_unless_given(stop, app.log) as stopping:
                await queue.consume(
                    source, app.dispatcher.handle, settings=settings, stop=stopping, log=app.log,
                    status=intake, metrics=app.metrics, refuse=app.dispatcher.refuse,
                    traced=app.spans is not None,
                )  # fmt: skip
        app.log.info("worker stopped; closing resources")
