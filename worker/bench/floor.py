"""Baseline (i), the floor: a bare aiohttp handler per scenario, nothing a plugin runtime adds.

``python -m worker.bench.floor --port P --base-url URL [--ca-bundle F]`` (the service user comes
from ``BIOT_SERVICE_USER_ID`` / ``BIOT_SERVICE_USER_SECRET_KEY``). ``POST /a`` ... ``/d`` read
the body, run the scenario's logic (:mod:`worker.bench.logic`) and answer the hook's contract
shape; for (b) and (c) they make the same API calls as the worker through one pooled
``aiohttp.ClientSession`` with a token obtained once at start (and again only when it nears its
expiry or is refused). No JWT verification, no routing beyond the path, no logging, no
timeouts or retries: what is left is the cost of aiohttp in and out and orjson.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from worker.bench import logic

REFRESH_MARGIN = 60.0


class Floor:
    def __init__(self, base_url: str, user_id: str, secret: str, ca_bundle: str | None) -> None:
        self._base = base_url.rstrip("/")
        self._credentials = {"id": user_id, "secretKey": secret}
        self._ca_bundle = ca_bundle
        self._session: aiohttp.ClientSession | None = None
        self._token = ""
        self._expires = 0.0

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        context = await asyncio.to_thread(ssl.create_default_context, cafile=self._ca_bundle)
        connector = aiohttp.TCPConnector(limit=100, ssl=context)
        async with aiohttp.ClientSession(connector=connector) as session:
            self._session = session
            await self._login()
            yield

    async def _login(self) -> None:
        assert self._session is not None
        url = self._base + "/ums/v2/services/accessToken"
        async with self._session.post(url, json=self._credentials) as response:
            response.raise_for_status()
            self._token = (await response.json())["accessToken"]
        self._expires = time.monotonic() + 1800.0

    async def _get(self, path: str, search: dict[str, Any] | None = None) -> Any:
        if time.monotonic() > self._expires - REFRESH_MARGIN:
            await self._login()
        assert self._session is not None
        params = None if search is None else {"searchRequest": orjson.dumps(search).decode()}
        for _ in range(2):
            headers = {"Authorization": f"Bearer {self._token}"}
            async with self._session.get(self._base + path, params=params, headers=headers) as r:
                if r.status == 401:
                    await self._login()
                    continue
                r.raise_for_status()
                return orjson.loads(await r.read())
        raise RuntimeError("API refused the token twice")

    async def a(self, request: web.Request) -> web.Response:
        payload = orjson.loads(await request.read())
        logic.mark_name(payload["request"]["body"])
        return _json({"request": payload["request"]})

    async def b(self, request: web.Request) -> web.Response:
        payload = orjson.loads(await request.read())
        inner = payload["request"]
        patient_id = logic.path_variable(inner["pathVariables"], "id") or "missing"
        patient = await self._get(logic.patient_url_path(patient_id))
        logic.note_patient(inner["headers"], patient)
        return _json({"request": inner})

    async def c(self, request: web.Request) -> web.Response:
        payload = orjson.loads(await request.read())
        calls = logic.notification_calls(str(payload["data"]["entity"]["_id"]))
        await asyncio.gather(*(self._get(path, search) for path, search in calls))
        return web.Response(status=200)

    async def d(self, request: web.Request) -> web.Response:
        payload = orjson.loads(await request.read())
        logic.mark_entities(payload["response"]["entities"])
        return _json({"response": payload["response"]})

    def application(self) -> web.Application:
        app = web.Application()
        app.cleanup_ctx.append(self.lifecycle)
        app.router.add_post("/a", self.a)
        app.router.add_post("/b", self.b)
        app.router.add_post("/c", self.c)
        app.router.add_post("/d", self.d)
        app.router.add_get("/healthz", _healthz)
        return app


def _json(value: Any) -> web.Response:
    return web.Response(body=orjson.dumps(value), content_type="application/json")


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.bench.floor", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--ca-bundle", default=None)
    args = parser.parse_args(argv)
    floor = Floor(
        args.base_url,
        os.environ.get("BIOT_SERVICE_USER_ID", ""),
        os.environ.get("BIOT_SERVICE_USER_SECRET_KEY", ""),
        args.ca_bundle,
    )
    web.run_app(floor.application(), host="127.0.0.1", port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
