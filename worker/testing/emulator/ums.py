"""UMS over HTTP: service-user login, the public key, the health check.

Login answers ``{accessToken, accessTokenExpiration}``; wrong credentials answer 403
``LOGIN_FAILED`` as BioT's UMS spec documents (a body without ``id``/``secretKey`` is a 400).
A login outage (fault ``loginFails``) answers 503; ``loginDelay`` slows every login down.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from worker.testing.emulator.faults import Faults
from worker.testing.emulator.identity import TokenService
from worker.testing.emulator.keys import KeyRing
from worker.testing.emulator.middleware import request_trace
from worker.testing.emulator.wire import ApiFailure, iso_ms, json_response, loads
from worker.version import __version__

Sleep = Callable[[float], Awaitable[None]]


class UmsApi:
    def __init__(
        self,
        *,
        service_user_id: str,
        service_user_secret: str,
        tokens: TokenService,
        keys: KeyRing,
        faults: Faults,
        sleep: Sleep,
    ) -> None:
        self._user_id = service_user_id
        self._secret = service_user_secret
        self._tokens = tokens
        self._keys = keys
        self._faults = faults
        self._sleep = sleep
        self.logins = 0

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/ums/v2/services/accessToken", self.login),
            web.get("/ums/v1/security/public-key", self.public_key),
            web.get("/ums/system/healthCheck", self.health),
        ]

    async def login(self, request: web.Request) -> web.Response:
        if self._faults.login_delay > 0:
            await self._sleep(self._faults.login_delay)
        if self._faults.login_fails:
            raise ApiFailure(
                503,
                "SERVICE_UNAVAILABLE",
                "Login is unavailable (injected fault)",
                {"injected": True},
                {"Retry-After": "1"},
            )
        user_id, secret = _credentials(await request.read())
        if not (_same(user_id, self._user_id) and _same(secret, self._secret)):
            raise ApiFailure(403, "LOGIN_FAILED", "Service user id or secret key is wrong")
        token, expires = self._tokens.service_token(user_id)
        self.logins += 1
        return json_response({"accessToken": token, "accessTokenExpiration": iso_ms(expires)})

    async def public_key(self, request: web.Request) -> web.Response:
        return json_response(
            {
                "publicKey": self._keys.public_key_b64,
                "previousPublicKey": self._keys.previous_public_key_b64,
            }
        )

    async def health(self, request: web.Request) -> web.Response:
        trace_id = request_trace(request).trace_id
        return json_response(
            {"version": f"emulator-{__version__}", "springVersion": "n/a", "traceId": trace_id}
        )


def _credentials(raw: bytes) -> tuple[str, str]:
    try:
        body: Any = loads(raw) if raw.strip() else None
    except ValueError as exc:
        raise ApiFailure(400, "BAD_REQUEST", "the login body is not JSON") from exc
    if not isinstance(body, dict):
        raise ApiFailure(400, "BAD_REQUEST", "the login body must be {id, secretKey}")
    user_id, secret = body.get("id"), body.get("secretKey")
    if not isinstance(user_id, str) or not isinstance(secret, str) or not user_id or not secret:
        raise ApiFailure(400, "BAD_REQUEST", "id and secretKey are required strings")
    return user_id, secret


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())
