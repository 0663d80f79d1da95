"""Who is calling: the tokens the emulator issues and the check every protected API runs.

Token types: the service-user login issues ``SERVICE_EXTERNAL`` tokens (a
plugin's service user is outside the platform) [INFERRED: decoded samples only show the
``SERVICE_INTERNAL`` tokens BioT signs for its own calls to plugins, which is what
:meth:`TokenService.internal_token` issues]; end users hold ``USER`` tokens, and so does the
admin user (with :data:`ADMIN_USER_SCOPES`). A user login's ``REFRESH`` token is never accepted
as a bearer token.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import jwt

from worker.testing.emulator.keys import KeyRing
from worker.testing.emulator.wire import ApiFailure, Clock

TokenKind = Literal["service", "user", "plugin-internal", "none", "invalid"]

DISPATCHER_SERVICE_ID: Final = "00000000-0000-4000-8000-00000000d15a"
# What a plugin's service user may do here (the subscription APIs check these).
SERVICE_USER_SCOPES: Final = (
    "DISPATCHER_SUBSCRIPTIONS_SUBSCRIBE",
    "DISPATCHER_SUBSCRIPTIONS_UNSUBSCRIBE",
    "DISPATCHER_SUBSCRIPTIONS_SEARCH",
    "HOOKS_INTERCEPTION_CREATE",
    "HOOKS_INTERCEPTION_DELETE",
    "HOOKS_INTERCEPTION_SEARCH",
)
# What the admin user may do: deploy plugins and subscribe endpoints (issue 10's commands).
ADMIN_USER_SCOPES: Final = (
    "SETTINGS_PLUGIN_CREATE",
    "SETTINGS_PLUGIN_GET",
    "SETTINGS_PLUGIN_UPDATE",
    "SETTINGS_PLUGIN_DELETE",
    "SETTINGS_PLUGIN_SEARCH",
    "SETTINGS_SEARCH_INTERCEPTION_SUBSCRIPTION_CONFIGURATIONS",
    *SERVICE_USER_SCOPES,
)
REFRESH_TOKEN_TYPE: Final = "REFRESH"  # noqa: S105 - a token type, not a secret
_KINDS: Final[dict[str, TokenKind]] = {
    "USER": "user",
    "DEVICE": "user",
    "SERVICE_EXTERNAL": "service",
    "SERVICE_INTERNAL": "plugin-internal",
}


@dataclass(frozen=True, slots=True)
class Caller:
    """The verified holder of a bearer token."""

    kind: TokenKind
    subject_id: str
    organization_id: str
    token_type: str
    scopes: tuple[str, ...]

    def initiator_data(self) -> dict[str, str]:
        return {
            "subjectId": self.subject_id,
            "ownerOrganizationId": self.organization_id,
            "tokenType": self.token_type,
        }


@dataclass(frozen=True, slots=True)
class UserLogin:
    """The tokens of a user login and their expiry times (epoch seconds)."""

    access_token: str
    access_expires: float
    refresh_token: str = field(repr=False)
    refresh_expires: float


@dataclass(frozen=True, slots=True)
class Rejected:
    """Why a bearer token was refused; ``kind`` is ``"none"`` when there was no token."""

    kind: TokenKind
    reason: str

    def failure(self) -> ApiFailure:
        return ApiFailure(401, "TOKEN_NOT_VALID", self.reason)


_VERIFIED_MAX = 10_000


class TokenService:
    """Issues RS512 tokens with the key ring and turns ``Authorization`` headers into callers."""

    def __init__(
        self,
        keys: KeyRing,
        clock: Clock,
        *,
        lifetime: Callable[[], float],
        organization_id: str,
    ) -> None:
        self._keys = keys
        self._clock = clock
        self._lifetime = lifetime
        self._organization_id = organization_id
        self._internal: dict[str, tuple[str, float, int]] = {}
        # Verified bearer tokens by their text, with the key generation that verified them:
        # BioT's gateway does not pay an RS512 verify per call, and neither should its stand-in
        # (it made the emulator, not the worker, the bottleneck of the benchmark).
        self._verified: dict[str, tuple[dict[str, Any], int]] = {}

    def sign(
        self,
        *,
        scopes: Sequence[str],
        token_type: str = "SERVICE_INTERNAL",  # noqa: S107 - a token type, not a secret
        lifetime: float | None = None,
        **claims: Any,
    ) -> str:
        """A token with ``scopes``, ``tokenType``, ``jti`` and ``exp`` (now + lifetime)."""
        body: dict[str, Any] = {
            "scopes": list(scopes),
            "tokenType": token_type,
            "jti": str(uuid.uuid4()),
            "exp": int(self._clock() + (lifetime if lifetime is not None else self._lifetime())),
        }
        if token_type == "SERVICE_INTERNAL":  # noqa: S105
            body["serviceUserId"] = DISPATCHER_SERVICE_ID
        body.update(claims)
        return self._keys.sign(body)

    def service_token(self, service_user_id: str) -> tuple[str, float]:
        """A login token for a service user and its expiry (epoch seconds)."""
        lifetime = self._lifetime()
        expires = self._clock() + lifetime
        token = self.sign(
            scopes=SERVICE_USER_SCOPES,
            token_type="SERVICE_EXTERNAL",  # noqa: S106
            lifetime=lifetime,
            serviceUserId=service_user_id,
        )
        return token, expires

    def user_token(
        self,
        subject_id: str | None = None,
        *,
        scopes: Sequence[str] = (),
        organization_id: str | None = None,
        lifetime: float | None = None,
    ) -> str:
        """An end user's token (``tokenType USER``), as BioT's user login would issue."""
        return self.sign(
            scopes=scopes,
            token_type="USER",  # noqa: S106
            lifetime=lifetime,
            sub=subject_id or str(uuid.uuid4()),
            tenantId=organization_id or self._organization_id,
            refreshTokenId=str(uuid.uuid4()),
        )

    def user_login(self, subject_id: str, scopes: Sequence[str]) -> UserLogin:
        """A user login's tokens: an access token (``tokenType USER``) and a refresh token
        living twice as long, which is never accepted as a bearer token."""
        lifetime = self._lifetime()
        now = self._clock()
        access = self.user_token(subject_id, scopes=scopes, lifetime=lifetime)
        refresh = self.sign(
            scopes=(), token_type=REFRESH_TOKEN_TYPE, lifetime=2 * lifetime, sub=subject_id
        )
        return UserLogin(access, now + lifetime, refresh, now + 2 * lifetime)

    def internal_token(self, scope: str) -> str:
        """BioT's ``SERVICE_INTERNAL`` token for calls to plugins, reused for half its life."""
        now = self._clock()
        cached = self._internal.get(scope)
        if cached is not None:
            token, renew_at, generation = cached
            if now < renew_at and generation == self._keys.generation:
                return token
        lifetime = self._lifetime()
        token = self.sign(scopes=[scope], lifetime=lifetime)
        self._internal[scope] = (token, now + lifetime / 2, self._keys.generation)
        return token

    def caller(self, authorization: str | None) -> Caller | Rejected:
        """Verify ``Authorization: Bearer <jwt>``: signature (RS512, known key) and ``exp``."""
        if not authorization:
            return Rejected("none", "Missing Authorization header")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return Rejected("invalid", "Authorization header is not a Bearer token")
        try:
            claims = self._verify(token.strip())
        except jwt.InvalidTokenError as exc:
            return Rejected("invalid", f"Token is not valid: {type(exc).__name__}")
        if not isinstance(claims.get("exp"), int | float) or claims["exp"] <= self._clock():
            return Rejected("invalid", "Token is expired")
        if claims.get("tokenType") == REFRESH_TOKEN_TYPE:
            return Rejected("invalid", "A refresh token is not an access token")
        return self._caller_from(claims)

    def _verify(self, token: str) -> dict[str, Any]:
        """The token's claims, verified once per key generation (``exp`` is checked by the
        caller on every use)."""
        generation = self._keys.generation
        hit = self._verified.get(token)
        if hit is not None and hit[1] == generation:
            return hit[0]
        claims = self._keys.verify(token)
        if len(self._verified) >= _VERIFIED_MAX:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = (claims, generation)
        return claims

    def _caller_from(self, claims: dict[str, Any]) -> Caller:
        token_type = str(claims.get("tokenType", "SERVICE_EXTERNAL"))
        subject = claims.get("sub") or claims.get("serviceUserId") or ""
        scopes = claims.get("scopes")
        return Caller(
            kind=_KINDS.get(token_type, "service"),
            subject_id=str(subject),
            organization_id=str(claims.get("tenantId") or self._organization_id),
            token_type=token_type,
            scopes=tuple(str(s) for s in scopes) if isinstance(scopes, list) else (),
        )
