"""The platform's RSA signing keys: a current key and the one it replaced.

BioT publishes both on ``/ums/v1/security/public-key`` as bare base64 SPKI DER, so a verifier
that fetched the key before a rotation can still check tokens signed just before it.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator, Sequence
from itertools import cycle
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

KeyFactory = Callable[[], rsa.RSAPrivateKey]
ALGORITHM = "RS512"


def generate_key() -> rsa.RSAPrivateKey:
    """A fresh 2048-bit RSA key; blocks for ~50-100 ms (call at start-up or in a thread)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def cycling_factory(keys: Sequence[rsa.RSAPrivateKey]) -> KeyFactory:
    """A factory handing out pre-generated ``keys`` in turn (tests, where generation is slow)."""
    if not keys:
        raise ValueError("cycling_factory needs at least one key")
    pool: Iterator[rsa.RSAPrivateKey] = cycle(keys)
    return lambda: next(pool)


def spki_b64(key: rsa.RSAPublicKey) -> str:
    """The key as BioT serves it: base64 of the DER SubjectPublicKeyInfo, no PEM armour."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode("ascii")


class KeyRing:
    """Signs with the current key; verifies with the current or the previous one."""

    def __init__(self, current: rsa.RSAPrivateKey) -> None:
        self._current = current
        self._previous: rsa.RSAPrivateKey | None = None
        self.generation = 0

    @property
    def public_key_b64(self) -> str:
        return spki_b64(self._current.public_key())

    @property
    def previous_public_key_b64(self) -> str:
        """The key before the last rotation; the current key until the first rotation."""
        previous = self._previous or self._current
        return spki_b64(previous.public_key())

    def rotate(self, new_key: rsa.RSAPrivateKey) -> None:
        """``new_key`` becomes current; the current key becomes previous."""
        if new_key is self._current:
            raise ValueError("rotation needs a key different from the current one")
        self._previous = self._current
        self._current = new_key
        self.generation += 1

    def sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self._current, algorithm=ALGORITHM)

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims when its RS512 signature matches a known key.

        ``exp`` must be present but is not checked here (the caller owns the clock). Raises
        ``jwt.InvalidTokenError`` otherwise.
        """
        last_error: jwt.InvalidTokenError | None = None
        for key in self._verification_keys():
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key.public_key(),
                    algorithms=[ALGORITHM],
                    options={"verify_exp": False, "require": ["exp"]},
                )
            except jwt.InvalidSignatureError as exc:
                last_error = exc
                continue
            return claims
        raise last_error or jwt.InvalidSignatureError("no key")

    def _verification_keys(self) -> list[rsa.RSAPrivateKey]:
        if self._previous is None:
            return [self._current]
        return [self._current, self._previous]
