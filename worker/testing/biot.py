"""BioT in a box with a real worker in front of it, both on loopback, for end-to-end tests.

``async with emulated_biot(routes=router) as biot:`` starts the emulator, a worker serving
``router`` over HTTP (its real composition root: service login, public-key fetch, JWT checks)
and subscribes the worker to every route BioT can subscribe. Then a user's call through
``biot.http`` runs the interceptors and notifications as BioT would. Leaving the block (also by
an exception) stops the worker, then the emulator, and closes the clients.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from types import TracebackType

import aiohttp
from aiohttp import web

from config.settings import Settings
from worker.adapters.http import app_runner
from worker.app import WorkerApp
from worker.events import Event
from worker.logs import CapturingLog
from worker.responses import Response
from worker.routing import Router
from worker.runner import http_adapter
from worker.testing.dev import subscribe_routes
from worker.testing.emulator import Emulator, EmulatorConfig, EmulatorServer
from worker.testing.kit import kit_settings


class EmulatorSigner:
    """Signs tokens with the emulator's current key: the ``keys`` of the event builders."""

    def __init__(self, emulator: Emulator) -> None:
        self._emulator = emulator

    def sign(self, *, scopes: list[str]) -> str:
        """An RS512 JWT with ``scopes``, as BioT signs the calls it sends to plugins."""
        return self._emulator.sign_token(scopes=scopes)


class EmulatedBiot:
    """A running emulator and worker (see the module docstring); attributes are set on entry.

    ``emulator`` the :class:`Emulator` (records calls, injects faults), ``api_url`` its URL,
    ``worker_url`` the worker's event endpoint, ``app`` the :class:`WorkerApp`, ``log`` the
    worker's :class:`CapturingLog`, ``http`` a client session to ``api_url`` (relative paths)
    authorised as an end user, ``signer`` the emulator's signer for the event builders.
    """

    emulator: Emulator
    api_url: str
    worker_url: str
    app: WorkerApp
    http: aiohttp.ClientSession
    signer: EmulatorSigner

    def __init__(
        self,
        routes: Router,
        *,
        config: EmulatorConfig | None = None,
        clock: Callable[[], float] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``clock`` (epoch seconds) is shared by the emulator and the worker's token cache;
        ``env`` adds worker settings (``WORKER_...``/``BIOT_...`` variables)."""
        self.routes = routes
        self.log = CapturingLog()
        self._config = config
        self._clock = clock
        self._env = dict(env or {})
        self._stack: AsyncExitStack | None = None
        self._plain: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> EmulatedBiot:
        stack = AsyncExitStack()
        try:
            await self._start(stack)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the worker and the emulator and close the clients; closing twice is harmless."""
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def _start(self, stack: AsyncExitStack) -> None:
        emulator = Emulator(self._config or EmulatorConfig(), clock=self._clock)
        server = await stack.enter_async_context(EmulatorServer(emulator))
        self.emulator, self.api_url = emulator, server.url
        self.signer = EmulatorSigner(emulator)
        settings = self._settings(server)
        clock = self._clock or time.time
        app = await stack.enter_async_context(
            WorkerApp(settings, self.routes, log=self.log, clock=clock)
        )
        self.app = app
        self.worker_url = await self._serve_worker(stack, app)
        subscribe_routes(emulator, self.routes, self.worker_url, self.log)
        context = ssl.create_default_context(cafile=server.ca_file) if server.ca_file else None
        user = {"authorization": f"Bearer {emulator.user_token()}"}
        self.http = await stack.enter_async_context(
            aiohttp.ClientSession(
                base_url=server.url,
                headers=user,
                connector=aiohttp.TCPConnector(ssl=context if context is not None else True),
            )
        )
        self._plain = await stack.enter_async_context(aiohttp.ClientSession())

    def _settings(self, server: EmulatorServer) -> Settings:
        env = {
            "BIOT_BASE_URL": server.url,
            "BIOT_SERVICE_USER_ID": self.emulator.service_user_id,
            "BIOT_SERVICE_USER_SECRET_KEY": self.emulator.service_user_secret,
            "WORKER_API_BACKOFF_BASE": "0.001",
            "WORKER_API_BACKOFF_MAX": "0.002",
            **({"WORKER_CA_BUNDLE": server.ca_file} if server.ca_file else {}),
            **self._env,
        }
        return kit_settings(**env)

    @staticmethod
    async def _serve_worker(stack: AsyncExitStack, app: WorkerApp) -> str:
        # The same adapter and runner as biot-worker run, on a free loopback port.
        worker = app.settings.worker
        runner = app_runner(
            http_adapter(app),
            grace=2.0,
            keepalive_timeout=worker.keepalive_timeout,
            header_timeout=worker.header_timeout,
            max_connections=worker.max_connections,
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}/"

    async def send(self, event: Event) -> Response:
        """POST ``event`` to the worker as BioT would (its headers and body); the answer."""
        assert self._plain is not None, "use EmulatedBiot inside `async with`"
        async with self._plain.post(self.worker_url, data=event.body, headers=event.headers) as r:
            body = await r.read()
            return Response(r.status, body, {k.lower(): v for k, v in r.headers.items()})


def emulated_biot(
    routes: Router,
    *,
    config: EmulatorConfig | None = None,
    clock: Callable[[], float] | None = None,
    env: Mapping[str, str] | None = None,
) -> EmulatedBiot:
    """``async with emulated_biot(routes=router) as biot:``: see :class:`EmulatedBiot`."""
    return EmulatedBiot(routes, config=config, clock=clock, env=env)
