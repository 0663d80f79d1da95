"""UMS over HTTP: service-user login, user login, the public key, the health check.

Service-user login answers ``{accessToken, accessTokenExpiration}``; wrong credentials answer
403 ``LOGIN_FAILED`` as BioT's UMS spec documents (a body without ``id``/``secretKey`` is a 400).
The configured service user always exists; a deployed plugin gets one of its own
(:meth:`UmsApi.add_service_user`), removed with the plugin. User login
(``POST /ums/v2/users/login`` with ``{username, password}``) knows the admin user only and
answers ``{userId, ownerOrganizationId, accessJwt: {token, expiration}, refreshJwt: {...},
mfaRequired, passwordResetRequired}``; wrong credentials are a 403 ``LOGIN_FAILED`` too.
A login outage (fault ``loginFails``) answers 503 to both; ``loginDelay`` slows every login down.
"""

from __future__ import annotations

import hmac
import secrets
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web

from worker.testing.emulator.faults import Faults
from worker.testing.emulator.identity import ADMIN_USER_SCOPES, TokenService
from worker.testing.emulator.keys import KeyRing
from worker.testing.emulator.middleware import request_trace
from worker.testing.emulator.wire import ApiFailure, iso_ms, json_response, loads
from worker.version import __version__

Sleep = Callable[[float], Awaitable[None]]

ADMIN_USER_ID: Final = "00000000-0000-4000-8000-0000000ad814"


class UmsApi:
    def __init__(
        self,
        *,
        service_user_id: str,
        service_user_secret: str,
        admin_username: str,
        admin_password: str,
        organization_id: str,
        tokens: TokenService,
        keys: KeyRing,
        faults: Faults,
        sleep: Sleep,
    ) -> None:
        self._service_users = {service_user_id: service_user_secret}
        self._admin = (admin_username, admin_password)
        self._organization_id = organization_id
        self._tokens = tokens
        self._keys = keys
        self._faults = faults
        self._sleep = sleep
        self.logins = 0

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/ums/v2/services/accessToken", self.login),
            web.post("/ums/v2/users/login", self.user_login),
            web.get("/ums/v1/security/public-key", self.public_key),
            web.get("/ums/system/healthCheck", self.health),
        ]

    def add_service_user(self) -> tuple[str, str]:
        """A new service user's id and secret key, as BioT makes one for a new plugin."""
        user_id, secret = str(uuid.uuid4()), secrets.token_urlsafe(32)
        self._service_users[user_id] = secret
        return user_id, secret

    def remove_service_user(self, user_id: str) -> None:
        """Forget a service user (its tokens stay valid until they expire, as in BioT)."""
        self._service_users.pop(user_id, None)

    async def login(self, request: web.Request) -> web.Response:
        await self._login_faults()
        user_id, secret = _credentials(await request.read())
        expected = self._service_users.get(user_id)
        if expected is None or not _same(secret, expected):
            raise ApiFailure(403, "LOGIN_FAILED", "Service user id or secret key is wrong")
        token, expires = self._tokens.service_token(user_id)
        self.logins += 1
        return json_response({"accessToken": token, "accessTokenExpiration": iso_ms(expires)})

    async def user_login(self, request: web.Request) -> web.Response:
        await self._login_faults()
        username, password = _user_credentials(await request.read())
        if not (_same(username, self._admin[0]) and _same(password, self._admin[1])):
            raise ApiFailure(403, "LOGIN_FAILED", "Username or password is wrong")
        login = self._tokens.user_login(ADMIN_USER_ID, ADMIN_USER_SCOPES)
        return json_response(
            {
                "userId": ADMIN_USER_ID,
                "ownerOrganizationId": self._organization_id,
                "accessJwt": {
                    "token": login.access_token,
                    "expiration": iso_ms(login.access_expires),
                },
                "refreshJwt": {
                    "token": login.refresh_token,
                    "expiration": iso_ms(login.refresh_expires),
                },
                "mfaRequired": False,
                "passwordResetRequired": False,
            }
        )

    async def _login_faults(self) -> None:
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


def _json_object(raw: bytes, shape: str) -> dict[str, Any]:
    try:
        body: Any = loads(raw) if raw.strip() else None
    except ValueError as exc:
        raise ApiFailure(400, "BAD_REQUEST", "the login body is not JSON") from exc
    if not isinstance(body, dict):
        raise ApiFailure(400, "BAD_REQUEST", shape)
    return body


def _credentials(raw: bytes) -> tuple[str, str]:
    body = _json_object(raw, "the login body must be {id, secretKey}")
    user_id, secret = body.get("id"), body.get("secretKey")
    if not isinstance(user_id, str) or not isinstance(secret, str) or not user_id or not secret:
        raise ApiFailure(400, "BAD_REQUEST", "id and secretKey are required strings")
    return user_id, secret


def _user_credentials(raw: bytes) -> tuple[str, str]:
    body = _json_object(raw, "the login body must be {username, password}")
    username, password = body.get("username"), body.get("password")
    if not isinstance(username, str) or not username:
        raise ApiFailure(400, "BAD_REQUEST", "username is required (a string)")
    if password is not None and not isinstance(password, str):
        raise ApiFailure(400, "BAD_REQUEST", "password must be a string")
    return username, password or ""


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())
