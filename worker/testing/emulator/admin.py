"""The emulator's own control API under ``/_emulator/`` (not part of BioT).

``GET info`` (URL, service user id and its dev secret, the admin user's username and dev
password, public key); ``GET|PUT|DELETE faults``
(read, change the keys given, reset to the start configuration); ``POST rotate-keys``;
``GET calls`` (``?trace_id=&direction=in|out&hook=``) and ``DELETE calls``; ``POST user-token``
(``{subjectId?, scopes?, lifetime?}`` -> an end user's token); ``POST event-token``
(``{scopes, lifetime?, count?}`` -> ``{token, tokens, accessTokenExpiration}``: the
``SERVICE_INTERNAL`` token BioT signs for its calls to plugins, with the current key, so a load
generator can send events signed exactly as BioT does); ``POST notifications/drain``
(answers once every pending notification was delivered). The secrets are served because this
is a loopback-only development tool whose credentials are fakes printed at start anyway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Final, Protocol

from aiohttp import web

from worker.testing.emulator.calllog import CallLog
from worker.testing.emulator.faults import Faults
from worker.testing.emulator.keys import KeyRing
from worker.testing.emulator.wire import ApiFailure, Clock, iso_ms, json_response, read_json

PREFIX = "/_emulator"
MAX_EVENT_TOKENS: Final = 10_000


class Emulator(Protocol):
    """What the control API reads and drives: the emulator's state, keys and token signing."""

    faults: Faults
    keys: KeyRing
    calls: CallLog
    clock: Clock

    def info(self, *, include_secret: bool = True) -> dict[str, Any]: ...

    async def rotate_keys_async(self) -> None: ...

    def user_token(
        self,
        subject_id: str | None = None,
        *,
        scopes: Sequence[str] = (),
        organization_id: str | None = None,
        lifetime: float | None = None,
    ) -> str: ...

    def sign_token(
        self,
        *,
        scopes: Sequence[str],
        token_type: str = ...,
        lifetime: float | None = None,
        **claims: Any,
    ) -> str: ...

    async def drain_notifications(self) -> None: ...


class AdminApi:
    def __init__(self, emulator: Emulator) -> None:
        self._emulator = emulator

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get(f"{PREFIX}/info", self.info),
            web.get(f"{PREFIX}/faults", self.get_faults),
            web.put(f"{PREFIX}/faults", self.put_faults),
            web.delete(f"{PREFIX}/faults", self.reset_faults),
            web.post(f"{PREFIX}/rotate-keys", self.rotate_keys),
            web.get(f"{PREFIX}/calls", self.get_calls),
            web.delete(f"{PREFIX}/calls", self.clear_calls),
            web.post(f"{PREFIX}/user-token", self.user_token),
            web.post(f"{PREFIX}/event-token", self.event_token),
            web.post(f"{PREFIX}/notifications/drain", self.drain),
        ]

    async def info(self, request: web.Request) -> web.Response:
        return json_response(self._emulator.info())

    async def get_faults(self, request: web.Request) -> web.Response:
        return json_response(self._emulator.faults.snapshot())

    async def put_faults(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise ApiFailure(400, "BAD_REQUEST", "faults must be a JSON object")
        try:
            self._emulator.faults.update(body)
        except ValueError as exc:
            raise ApiFailure(400, "BAD_REQUEST", str(exc)) from exc
        return json_response(self._emulator.faults.snapshot())

    async def reset_faults(self, request: web.Request) -> web.Response:
        self._emulator.faults.reset()
        return json_response(self._emulator.faults.snapshot())

    async def rotate_keys(self, request: web.Request) -> web.Response:
        await self._emulator.rotate_keys_async()
        keys = self._emulator.keys
        return json_response(
            {"publicKey": keys.public_key_b64, "previousPublicKey": keys.previous_public_key_b64}
        )

    async def get_calls(self, request: web.Request) -> web.Response:
        query = request.query
        records = self._emulator.calls.records(
            trace_id=query.get("trace_id"),
            direction=query.get("direction"),
            hook=query.get("hook"),
        )
        return json_response({"calls": [record.to_json() for record in records]})

    async def clear_calls(self, request: web.Request) -> web.Response:
        self._emulator.calls.clear()
        return json_response(None, 204)

    async def user_token(self, request: web.Request) -> web.Response:
        body = await read_json(request) or {}
        if not isinstance(body, dict):
            raise ApiFailure(400, "BAD_REQUEST", "expected {subjectId?, scopes?, lifetime?}")
        subject, scopes, lifetime = _user_token_args(body)
        lifetime = lifetime or self._emulator.faults.token_lifetime
        token = self._emulator.user_token(subject, scopes=scopes, lifetime=lifetime)
        expires = iso_ms(self._emulator.clock() + lifetime)
        return json_response({"accessToken": token, "accessTokenExpiration": expires})

    async def event_token(self, request: web.Request) -> web.Response:
        body = await read_json(request) or {}
        if not isinstance(body, dict):
            raise ApiFailure(400, "BAD_REQUEST", "expected {scopes, lifetime?, count?}")
        scopes, lifetime, count = _event_token_args(body)
        lifetime = lifetime or self._emulator.faults.token_lifetime

        def sign() -> str:
            return self._emulator.sign_token(scopes=scopes, lifetime=lifetime)

        # One RS512 signature takes about a millisecond: sign batches off the loop.
        if count == 1:
            tokens = [sign()]
        else:
            tokens = await asyncio.to_thread(lambda: [sign() for _ in range(count)])
        expires = iso_ms(self._emulator.clock() + lifetime)
        return json_response(
            {"token": tokens[0], "tokens": tokens, "accessTokenExpiration": expires}
        )

    async def drain(self, request: web.Request) -> web.Response:
        await self._emulator.drain_notifications()
        return json_response(None, 204)


def _user_token_args(body: dict[str, Any]) -> tuple[str | None, list[str], float | None]:
    subject = body.get("subjectId")
    scopes = body.get("scopes", [])
    lifetime = body.get("lifetime")
    if subject is not None and not isinstance(subject, str):
        raise ApiFailure(400, "BAD_REQUEST", "subjectId must be a string")
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise ApiFailure(400, "BAD_REQUEST", "scopes must be a list of strings")
    if lifetime is not None and (
        isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or lifetime <= 0
    ):
        raise ApiFailure(400, "BAD_REQUEST", "lifetime must be a positive number")
    return subject, scopes, float(lifetime) if lifetime is not None else None


def _event_token_args(body: dict[str, Any]) -> tuple[list[str], float | None, int]:
    scopes = body.get("scopes")
    lifetime = body.get("lifetime")
    count = body.get("count", 1)
    if not isinstance(scopes, list) or not scopes or not all(isinstance(s, str) for s in scopes):
        raise ApiFailure(400, "BAD_REQUEST", "scopes must be a non-empty list of strings")
    if lifetime is not None and (
        isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or lifetime <= 0
    ):
        raise ApiFailure(400, "BAD_REQUEST", "lifetime must be a positive number")
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_EVENT_TOKENS:
        message = f"count must be an integer from 1 to {MAX_EVENT_TOKENS}"
        raise ApiFailure(400, "BAD_REQUEST", message)
    return scopes, float(lifetime) if lifetime is not None else None, count
