"""Helpers for tests that drive the emulator: a settable clock, a recording sleep, a stub plugin.

:class:`PluginStub` is a tiny plugin on loopback: it records every hook call the emulator makes
and answers per path, by default passing the payload through unchanged as the contract allows
(PRE -> ``{"request": ...}``, POST/ADAPT_ENTITY -> ``{"response": ...}``, NOTIFICATION -> 200).
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiohttp import web

from worker.testing.emulator.wire import dumps, loads


class ManualClock:
    """Epoch seconds that move only when told; starts at the real time so JWTs stay valid."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingSleep:
    """An ``asyncio.sleep`` stand-in that records the delays asked for and only yields once."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        await asyncio.sleep(0)


@dataclass(frozen=True, slots=True)
class HookCall:
    path: str
    headers: dict[str, str]
    body: Any

    @property
    def hooktype(self) -> str:
        return self.headers.get("hooktype", "")


Responder = Callable[[HookCall], Awaitable[Any]]


def json_answer(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=dumps(body), status=status, content_type="application/json")


def pass_through(call: HookCall) -> web.Response:
    """The contract's "no change" answer for each hook type."""
    if call.hooktype == "INTERCEPTOR_PRE":
        return json_answer({"request": call.body["request"]})
    if call.hooktype in ("INTERCEPTOR_POST", "INTERCEPTOR_POST_ENTITY"):
        return json_answer({"response": call.body["response"]})
    return web.Response(status=200)


class PluginStub:
    """``async with PluginStub() as plugin:`` then subscribe ``plugin.url("/pre")``."""

    def __init__(self) -> None:
        self.calls: list[HookCall] = []
        self._responders: dict[str, Responder] = {}
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    def url(self, path: str) -> str:
        return self.base_url + path

    def on(self, path: str, responder: Responder) -> None:
        """Answer calls to ``path`` with ``responder`` (a JSON value or a ``web.Response``)."""
        self._responders[path] = responder

    def calls_to(self, path: str) -> list[HookCall]:
        return [call for call in self.calls if call.path == path]

    async def hang(self, call: HookCall) -> web.Response:
        """A responder that never answers (until the stub closes)."""
        await self._closing.wait()
        return web.Response(status=503)

    async def __aenter__(self) -> PluginStub:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        call = HookCall(request.path, headers, loads(raw) if raw else None)
        self.calls.append(call)
        responder = self._responders.get(request.path)
        if responder is None:
            return pass_through(call)
        # The responder gets its own copy: what was recorded stays as the emulator sent it.
        answer = await responder(HookCall(call.path, dict(call.headers), copy.deepcopy(call.body)))
        if isinstance(answer, web.StreamResponse):
            return answer
        return json_answer(answer)
