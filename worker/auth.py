"""Verifying the platform's inbound JWT: RS512 only, cached keys, cached tokens.

Contract of :class:`JwtVerifier`:

- Only RS512 is accepted, verified with a loaded key object (never a PEM string per call), so
  ``alg: none``, HS* signed with the public key text, RS256 and the like are refused.
- ``exp`` is required and checked against ``wall_clock`` with ``leeway`` seconds of skew.
- Keys come either from a static ``BIOT_PUBLIC_KEY`` (never refetched) or from ``fetch_keys``
  (BioT's ``/ums/v1/security/public-key``): loaded once, kept ``key_ttl`` seconds, then refetched
  on next use. ``current`` is tried first, then ``previous`` (rotation). When every key rejects the
  signature, the keys are refetched once (single-flight) and the token retried, but no such
  refetch starts within ``refetch_cooldown`` seconds of the previous one, nor any fetch within
  that time of a failed one, so forged tokens cannot hammer BioT. The first load and TTL reloads
  do not start the cooldown: a key rotated right after start is picked up at once.
- Verified tokens are memoised by their raw text until ``exp + leeway``; the scope check runs on
  every call. When a refetch drops a key that was in the previous set, the memo is cleared, so a
  token verified by a retired key is verified again (and refused) on its next use.
- Every failure is an :class:`AuthError` (400 ``JWT_ERROR``) or a :class:`ScopeError` (403) whose
  message never contains the token.

``log`` is anything with ``info``/``warning(message, /, **fields)`` (``worker.logs.Log`` fits);
without one, the stdlib logger ``worker.auth`` is used.
"""

from __future__ import annotations

import asyncio
import base64
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_public_key,
    load_pem_public_key,
)
from jwt.types import Options

from worker.errors import AuthError, ScopeError
from worker.logs import Log, LoggerLog

__all__ = ["JwtVerifier", "KeyFetcher", "PublicKeys", "load_public_key"]

_ALGORITHMS: Final = ["RS512"]
# exp is checked here against the injected wall clock (PyJWT would read the real clock).
_OPTIONS: Final[Options] = {"require": ["exp"], "verify_exp": False}
_REASONS: Final[tuple[tuple[type[jwt.PyJWTError], str, str], ...]] = (
    (jwt.InvalidAlgorithmError, "algorithm not allowed (RS512 only)", "algorithm"),
    (jwt.ImmatureSignatureError, "token not yet valid", "not_yet_valid"),
    (jwt.InvalidAudienceError, "unexpected aud claim", "claims"),
    (jwt.DecodeError, "malformed token", "malformed"),
)


@dataclass(frozen=True, slots=True)
class PublicKeys:
    """BioT's key set: each a bare base64 SPKI DER body (as the endpoint returns it) or a PEM."""

    current: str
    previous: str | None = None


KeyFetcher = Callable[[], Awaitable[PublicKeys]]


def load_public_key(text: str) -> RSAPublicKey:
    """Load an RSA public key from a PEM or a bare base64 SPKI DER body.

    Raises :class:`AuthError` when the text is neither, or not an RSA key.
    """
    stripped = text.strip()
    try:
        if stripped.startswith("-----BEGIN"):
            key = load_pem_public_key(stripped.encode("ascii"))
        else:
            der = base64.b64decode("".join(stripped.split()), validate=True)
            key = load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm):
        # ValueError covers bad base64, bad DER/PEM and non-ASCII text.
        raise AuthError(
            "invalid BioT public key: not a PEM or base64 SPKI DER key", reason="key_unavailable"
        ) from None
    if not isinstance(key, RSAPublicKey):
        raise AuthError("invalid BioT public key: not an RSA key", reason="key_unavailable")
    return key


@dataclass(frozen=True, slots=True)
class _Key:
    key: RSAPublicKey
    der: bytes  # canonical identity: tells whether a refetch dropped this key


def _load_key(text: str) -> _Key:
    key = load_public_key(text)
    return _Key(key, key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))


def _load_keys(keys: PublicKeys) -> tuple[_Key, ...]:
    """``current`` first, then ``previous`` when present (blank counts as absent), deduplicated."""
    loaded = [_load_key(keys.current)]
    if keys.previous and keys.previous.strip():
        previous = _load_key(keys.previous)
        if previous.der != loaded[0].der:
            loaded.append(previous)
    return tuple(loaded)


class _SignatureFailed(AuthError):
    """No key accepted the signature: the one failure that may warrant a key refetch."""

    reason = "signature"


def _refusal(exc: jwt.PyJWTError) -> AuthError:
    # Our own wording: PyJWT's messages may quote parts of the token.
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return AuthError(f"token has no {exc.claim} claim", reason="claims")
    for kind, message, reason in _REASONS:
        if isinstance(exc, kind):
            return AuthError(message, reason=reason)
    return AuthError("invalid token")


def _check_scope(claims: Mapping[str, Any], scope: str | None) -> None:
    if scope is None:
        return
    scopes = claims.get("scopes")
    if not isinstance(scopes, list) or scope not in scopes:
        raise ScopeError(f"missing scope {scope}")


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


class _TokenCache:
    """Claims of verified tokens keyed by the raw token, bounded; the oldest entry goes first.

    Tokens arrive in roughly the order they expire, so evicting the oldest insert is close to
    evicting the next to expire, at O(1). Expired entries are dropped when looked up.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: dict[str, tuple[Mapping[str, Any], float]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, token: str, now: float) -> Mapping[str, Any] | None:
        entry = self._entries.get(token)
        if entry is None:
            return None
        if now >= entry[1]:
            del self._entries[token]
            return None
        return entry[0]

    def put(self, token: str, claims: Mapping[str, Any], valid_until: float) -> None:
        if self._size <= 0:
            return
        if token not in self._entries:
            while len(self._entries) >= self._size:
                del self._entries[next(iter(self._entries))]
        self._entries[token] = (claims, valid_until)

    def clear(self) -> None:
        self._entries.clear()


class JwtVerifier:
    """Verifies BioT's JWTs; see the module docstring for the full contract.

    ``clock`` (monotonic) times the key TTL and the refetch cooldown; ``wall_clock`` (epoch
    seconds) is compared with ``exp``. ``fetch_keys`` should bound its own time (the client's
    timeout): verifications needing a key wait for it.
    """

    def __init__(
        self,
        *,
        fetch_keys: KeyFetcher | None = None,
        static_key: str | None = None,
        leeway: float = 5.0,
        key_ttl: float = 3600.0,
        refetch_cooldown: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        cache_size: int = 10_000,
        log: Log | None = None,
    ) -> None:
        if (fetch_keys is None) == (static_key is None):
            raise ValueError("JwtVerifier needs exactly one of fetch_keys or static_key")
        self._fetch = fetch_keys
        self._leeway = leeway
        self._ttl = key_ttl
        self._cooldown = refetch_cooldown
        self._clock = clock
        self._wall = wall_clock
        self._log: Log = log if log is not None else LoggerLog(__name__)
        self._cache = _TokenCache(cache_size)
        self._lock = asyncio.Lock()  # serialises fetches: the single flight
        self._keys: tuple[_Key, ...] = (
            () if static_key is None else _load_keys(PublicKeys(static_key))
        )
        self._version = 0  # bumped whenever the key set changes
        self._loaded_at = 0.0
        # The cooldown spaces signature-triggered refetches (a flood of forged tokens costs
        # BioT one fetch per cooldown) and retries after a failed fetch. Loads on start or
        # on TTL expiry do not count, so a rotation right after start is still picked up.
        self._last_refetch: float | None = None
        self._last_failure: float | None = None
        self._last_error = ""

    async def verify(self, token: str, scope: str | None) -> Mapping[str, Any]:
        """Return the token's claims (read-only) or raise :class:`AuthError`/:class:`ScopeError`.

        ``scope=None`` skips the scope check; otherwise the ``scopes`` list claim must hold it.
        """
        claims = self._cache.get(token, self._wall())
        if claims is None:
            claims = await self._verify_uncached(token)
        _check_scope(claims, scope)
        return claims

    def verify_cached(self, token: str, scope: str | None) -> bool:
        """:meth:`verify` without a coroutine for a token whose claims are cached: ``True``
        when it passes, ``False`` when it is not cached (then :meth:`verify` it); raises
        :class:`ScopeError` as :meth:`verify` does."""
        claims = self._cache.get(token, self._wall())
        if claims is None:
            return False
        _check_scope(claims, scope)
        return True

    async def ready(self) -> None:
        """Make sure a key is loaded (fetching if needed); raise :class:`AuthError` if it cannot."""
        await self._current_keys()

    # ------------------------------------------------------------ status, for health probes

    @property
    def fetches_keys(self) -> bool:
        """Whether keys come from BioT (``False``: a static ``BIOT_PUBLIC_KEY``)."""
        return self._fetch is not None

    def key_age(self) -> float | None:
        """Seconds since the keys in use were fetched; ``None`` when none is loaded, or the key
        is static. Past ``key_ttl`` they are still used while refetching fails."""
        if not self._keys or self._fetch is None:
            return None
        return self._clock() - self._loaded_at

    @property
    def last_error(self) -> str | None:
        """Why the last key fetch failed, until one succeeds; ``None`` otherwise."""
        return self._last_error or None

    # ------------------------------------------------------------ verification

    async def _verify_uncached(self, token: str) -> Mapping[str, Any]:
        if not isinstance(token, str) or not token:
            raise AuthError("missing token", reason="missing")
        if token.count(".") != 2:
            raise AuthError("malformed token", reason="malformed")
        keys = await self._current_keys()
        version = self._version
        try:
            claims = self._decode(token, keys)
        except _SignatureFailed:
            claims = await self._retry_after_refetch(token, version)
        self._cache.put(token, claims, float(claims["exp"]) + self._leeway)
        return claims

    def _decode(self, token: str, keys: tuple[_Key, ...]) -> Mapping[str, Any]:
        for candidate in keys:
            try:
                claims = jwt.decode(
                    token,
                    candidate.key,
                    algorithms=_ALGORITHMS,
                    options=_OPTIONS,
                    leeway=self._leeway,
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as exc:
                raise _refusal(exc) from None
            except UnicodeError:  # lone surrogates: header bytes that were not UTF-8
                raise AuthError("malformed token", reason="malformed") from None
            return self._check_exp(claims)
        raise _SignatureFailed("signature verification failed")

    def _check_exp(self, claims: dict[str, Any]) -> Mapping[str, Any]:
        exp = claims["exp"]
        if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
            raise AuthError("token exp claim is not a number", reason="claims")
        if self._wall() >= exp + self._leeway:
            raise AuthError("token expired", reason="expired")
        # Read-only: the same mapping is shared by every hit of the cache.
        return MappingProxyType(claims)

    async def _retry_after_refetch(self, token: str, seen_version: int) -> Mapping[str, Any]:
        if self._fetch is None:
            raise _SignatureFailed("signature verification failed")
        async with self._lock:
            # Someone else may have refetched while we waited, or did so too recently.
            if self._version == seen_version and not self._cooling_down(self._last_refetch):
                self._last_refetch = self._clock()
                await self._fetch_and_install()
        if self._version == seen_version:
            raise _SignatureFailed("signature verification failed")
        return self._decode(token, self._keys)

    # ------------------------------------------------------------ keys

    async def _current_keys(self) -> tuple[_Key, ...]:
        if self._keys and not self._stale():
            return self._keys
        async with self._lock:
            if not self._keys or self._stale():
                await self._refresh_stale()
        return self._keys

    def _stale(self) -> bool:
        return self._fetch is not None and self._clock() - self._loaded_at >= self._ttl

    def _cooling_down(self, since: float | None) -> bool:
        return since is not None and self._clock() - since < self._cooldown

    async def _refresh_stale(self) -> None:
        """Called under the lock when keys are missing or past their TTL."""
        if self._cooling_down(self._last_failure):
            if self._keys:
                return
            raise AuthError(
                f"could not fetch BioT public key: {self._last_error}", reason="key_unavailable"
            )
        try:
            await self._fetch_and_install()
        except AuthError:
            # A stale key beats refusing every event while BioT's key endpoint is down.
            if not self._keys:
                raise

    async def _fetch_and_install(self) -> None:
        assert self._fetch is not None
        try:
            keys = _load_keys(await self._fetch())
        except Exception as exc:
            self._last_failure = self._clock()
            self._last_error = _describe(exc)
            self._log.warning("could not fetch BioT public key", error=self._last_error)
            raise AuthError(
                f"could not fetch BioT public key: {self._last_error}", reason="key_unavailable"
            ) from exc
        self._last_error = ""
        self._install(keys)

    def _install(self, keys: tuple[_Key, ...]) -> None:
        self._loaded_at = self._clock()
        if [k.der for k in keys] == [k.der for k in self._keys]:
            return
        if not {k.der for k in self._keys} <= {k.der for k in keys}:
            self._cache.clear()  # a dropped key must not keep vouching for cached tokens
        self._keys = keys
        self._version += 1
        self._log.info("BioT public keys loaded", keys=len(keys))
