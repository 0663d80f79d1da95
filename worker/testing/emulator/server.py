"""Serving the emulator on loopback: :class:`EmulatorServer` and :func:`serve_forever`."""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
import tempfile
from collections.abc import Callable
from types import TracebackType

from aiohttp import web

from worker.testing.emulator.app import Emulator
from worker.testing.emulator.config import EmulatorConfig
from worker.testing.emulator.tls import ensure_tls_files, server_ssl_context


def check_loopback(host: str) -> None:
    """Raise ``ValueError`` unless ``host`` is ``localhost`` or a loopback address."""
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"the emulator only listens on loopback addresses, not {host!r}")


class EmulatorServer:
    """``async with EmulatorServer(emulator) as srv:`` serves it at ``srv.url``.

    With ``config.tls`` it serves HTTPS with a self-signed CA written to ``config.tls_dir`` (or a
    temporary directory removed on exit); ``srv.ca_file`` is the bundle clients must trust.
    Leaving the block stops the server, waits for pending notifications and closes the client
    session; leaving twice is harmless.
    """

    def __init__(self, emulator: Emulator, host: str = "127.0.0.1", port: int = 0) -> None:
        check_loopback(host)
        self.emulator = emulator
        self.host = host
        self.port = port
        self.url = ""
        self.ca_file: str | None = None
        self._runner: web.AppRunner | None = None
        self._temp_dir: str | None = None

    async def __aenter__(self) -> EmulatorServer:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _start(self) -> None:
        context = None
        if self.emulator.config.tls:
            directory = self.emulator.config.tls_dir or self._make_temp_dir()
            files = await asyncio.to_thread(ensure_tls_files, directory)
            context = await asyncio.to_thread(server_ssl_context, files)
            self.ca_file = self.emulator.ca_file = files.ca_file
        self._runner = web.AppRunner(
            self.emulator.app, handle_signals=False, access_log=None, shutdown_timeout=2.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=context)
        await site.start()
        port = self._runner.addresses[0][1]
        scheme = "https" if context is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"{scheme}://{host}:{port}"
        self.emulator.base_url = self.url

    def _make_temp_dir(self) -> str:
        self._temp_dir = tempfile.mkdtemp(prefix="biot-emulator-tls-")
        return self._temp_dir

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        temp_dir, self._temp_dir = self._temp_dir, None
        if temp_dir is not None:
            await asyncio.to_thread(shutil.rmtree, temp_dir, True)
        self.emulator.base_url = self.emulator.ca_file = None


async def serve_forever(
    config: EmulatorConfig,
    *,
    host: str,
    port: int,
    ready: Callable[[EmulatorServer], None] | None = None,
    stop: asyncio.Event,
) -> None:
    """Run an emulator until ``stop`` is set; ``ready(server)`` is called once it listens."""
    check_loopback(host)
    emulator = Emulator(config)
    async with EmulatorServer(emulator, host=host, port=port) as server:
        if ready is not None:
            ready(server)
        await stop.wait()
