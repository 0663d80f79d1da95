"""An emulator process (BioT in a box) as the bench uses it: its admin API and the fixtures the
events sent to its targets are built from (identity, signed event tokens, 50 patients)."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import aiohttp
import orjson

from worker.bench import procs
from worker.bench.payloads import INTERCEPTOR_SCOPE, NOTIFICATION_SCOPE, Fixtures

EVENT_TOKEN_LIFETIME = 4 * 3600.0  # longer than any run: BioT reuses its tokens


class Upstream:
    """One emulator process and what the events sent to its targets are built from."""

    def __init__(self, proc: procs.Proc, url: str, ca: str | None) -> None:
        self.proc, self.url, self.ca = proc, url, ca
        self.identity: dict[str, Any] = {}
        self.fixtures: Fixtures | None = None

    def ssl_context(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=self.ca) if self.ca else False

    async def admin(self, method: str, path: str, body: Any = None, token: str = "") -> Any:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        connector = aiohttp.TCPConnector(ssl=await asyncio.to_thread(self.ssl_context))
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            http.request(method, self.url + path, json=body, headers=headers) as response,
        ):
            response.raise_for_status()
            return await response.json()

    async def event_tokens(self, scope: str, count: int = 1) -> list[str]:
        body = {"scopes": [scope], "lifetime": EVENT_TOKEN_LIFETIME, "count": count}
        answer = await self.admin("POST", "/_emulator/event-token", body)
        return list(answer["tokens"])

    async def load_fixtures(self) -> None:
        self.identity = await self.admin("GET", "/_emulator/info")
        user = (await self.admin("POST", "/_emulator/user-token", {}))["accessToken"]
        search = orjson.dumps({"filter": {}, "page": 0, "limit": 50}).decode()
        path = f"/organization/v1/users/patients?searchRequest={search}"
        patients = (await self.admin("GET", path, token=user))["data"]
        self.fixtures = Fixtures(
            interceptor_token=(await self.event_tokens(INTERCEPTOR_SCOPE))[0],
            notification_token=(await self.event_tokens(NOTIFICATION_SCOPE))[0],
            user_token=user,
            patients=patients,
            organization_id=str(self.identity["organizationId"]),
        )
