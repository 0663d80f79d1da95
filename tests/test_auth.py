"""JwtVerifier: RS512 only, refusals, key cache (TTL, rotation, single-flight refetch, cooldown),
verified-token cache. Clocks are injected; nothing sleeps."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from worker import logs
from worker.auth import JwtVerifier, PublicKeys, load_public_key
from worker.errors import AuthError, ScopeError

T = TypeVar("T")
WALL = 1_700_000_000.0
SCOPE = "PLUGIN_INTERCEPTOR"
Keys = dict[str, rsa.RSAPrivateKey]


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def keys() -> Keys:
    """Three RSA-2048 key pairs, generated once for the module (generation is slow)."""
    return {name: rsa.generate_private_key(public_exponent=65537, key_size=2048) for name in "ABC"}


def body(private: rsa.RSAPrivateKey) -> str:
    """The bare base64 SPKI DER body, as BioT's public-key endpoint returns it."""
    der = private.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


def pem(private: rsa.RSAPrivateKey) -> str:
    raw = private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    return raw.decode()


def claims(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"exp": WALL + 1800, "scopes": [SCOPE], "jti": "j1"}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def sign(private: rsa.RSAPrivateKey, alg: str = "RS512", **extra: Any) -> str:
    return jwt.encode(claims(**extra), private, algorithm=alg)


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def forge(alg: str, secret: bytes | None) -> str:
    """A token PyJWT would refuse to make: ``alg: none`` or HMAC keyed with public-key text."""
    header = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims()).encode())
    signing_input = f"{header}.{payload}".encode()
    sig = b"" if secret is None else hmac.new(secret, signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(sig)}"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeKeys:
    """The key endpoint: counts calls; may fail, or block on ``gate`` until the test opens it."""

    def __init__(self, keys: PublicKeys) -> None:
        self.keys = keys
        self.calls = 0
        self.error: Exception | None = None
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()

    async def __call__(self) -> PublicKeys:
        self.calls += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.keys


class CapturingLog(logs.CapturingLog):
    def warnings(self) -> list[str]:
        return [r["message"] for r in self.records if r["level"] == "WARN"]


class Harness:
    def __init__(self, fetch: FakeKeys, **kwargs: Any) -> None:
        self.fetch = fetch
        self.clock = Clock(1000.0)
        self.wall = Clock(WALL)
        self.log = CapturingLog()
        self.verifier = JwtVerifier(
            fetch_keys=fetch, clock=self.clock, wall_clock=self.wall, log=self.log, **kwargs
        )


@pytest.fixture
def make(keys: Keys) -> Callable[..., Harness]:
    def build(current: str = "A", previous: str | None = None, **kwargs: Any) -> Harness:
        prev = body(keys[previous]) if previous else None
        return Harness(FakeKeys(PublicKeys(body(keys[current]), prev)), **kwargs)

    return build


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every token handed to ``jwt.decode`` (the ~110 µs path the cache avoids)."""
    calls: list[str] = []
    real = jwt.decode

    def spy(token: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(token)
        return real(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", spy)
    return calls


async def soon(awaitable: Awaitable[T]) -> T:
    """Fail instead of hanging if the code under test never completes (a guard, not a wait)."""
    return await asyncio.wait_for(awaitable, timeout=5)


async def refused(verifier: JwtVerifier, token: str, scope: str | None = None) -> AuthError:
    with pytest.raises(AuthError) as info:
        await verifier.verify(token, scope)
    if token:
        assert token not in str(info.value)
    return info.value


# ---------------------------------------------------------------- keys


def test_load_public_key_accepts_bare_body_pem_and_wrapped_body(keys: Keys) -> None:
    expected = keys["A"].public_key().public_numbers()
    wrapped = "\n".join(body(keys["A"])[i : i + 64] for i in range(0, 400, 64))
    for text in (body(keys["A"]), pem(keys["A"]), f"  {wrapped}\n"):
        assert load_public_key(text).public_numbers() == expected


@pytest.mark.parametrize("text", ["", "not a key", "QUJD", "-----BEGIN PUBLIC KEY-----\nxx", "ké"])
def test_load_public_key_refuses_garbage(text: str) -> None:
    with pytest.raises(AuthError, match="invalid BioT public key"):
        load_public_key(text)


def test_load_public_key_refuses_non_rsa_key() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    der = private.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(AuthError, match="not an RSA key"):
        load_public_key(base64.b64encode(der).decode())


def test_needs_exactly_one_key_source(keys: Keys) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        JwtVerifier()
    with pytest.raises(ValueError, match="exactly one"):
        JwtVerifier(fetch_keys=FakeKeys(PublicKeys(body(keys["A"]))), static_key=body(keys["A"]))


def test_garbage_static_key_fails_at_construction() -> None:
    with pytest.raises(AuthError, match="invalid BioT public key"):
        JwtVerifier(static_key="garbage")


# ---------------------------------------------------------------- verification


async def test_valid_token_returns_read_only_claims(
    make: Callable[..., Harness], keys: Keys
) -> None:
    h = make()
    result = await h.verifier.verify(sign(keys["A"], serviceUserId="u1"), SCOPE)
    assert result["serviceUserId"] == "u1"
    assert result["scopes"] == [SCOPE]
    with pytest.raises(TypeError):
        result["serviceUserId"] = "other"  # type: ignore[index]


async def test_pem_static_key_verifies_and_never_expires(keys: Keys) -> None:
    clock = Clock(0.0)
    verifier = JwtVerifier(static_key=pem(keys["A"]), clock=clock, wall_clock=Clock(WALL))
    await verifier.ready()
    clock.now = 10**9  # far past any TTL: a static key has nothing to refetch
    assert (await verifier.verify(sign(keys["A"]), SCOPE))["jti"] == "j1"


async def test_static_key_refuses_other_signer_without_fetching(keys: Keys) -> None:
    verifier = JwtVerifier(static_key=body(keys["A"]), wall_clock=Clock(WALL), refetch_cooldown=0)
    error = await refused(verifier, sign(keys["B"]))
    assert error.message == "signature verification failed"


@pytest.mark.parametrize(
    ("make_token", "reason"),
    [
        (lambda k: forge("none", None), "algorithm not allowed (RS512 only)"),
        (lambda k: forge("HS256", pem(k["A"]).encode()), "algorithm not allowed (RS512 only)"),
        (lambda k: forge("HS256", body(k["A"]).encode()), "algorithm not allowed (RS512 only)"),
        (lambda k: sign(k["A"], alg="RS256"), "algorithm not allowed (RS512 only)"),
        (lambda k: sign(k["A"], exp=None), "token has no exp claim"),
        (lambda k: sign(k["A"], exp="9999999999"), "token exp claim is not a number"),
        (lambda k: sign(k["A"], exp=WALL - 6), "token expired"),
        (lambda k: sign(k["B"]), "signature verification failed"),
        (lambda k: sign(k["A"]).rsplit(".", 1)[0] + ".", "signature verification failed"),
    ],
    ids=[
        "alg-none",
        "hs256-pem",
        "hs256-body",
        "rs256",
        "no-exp",
        "str-exp",
        "expired",
        "other-key",
        "no-signature",
    ],
)
async def test_refusals(
    make: Callable[..., Harness],
    keys: Keys,
    make_token: Callable[[Keys], str],
    reason: str,
) -> None:
    h = make()
    error = await refused(h.verifier, make_token(keys), SCOPE)
    assert (type(error) is not ScopeError, error.status, error.code) == (True, 400, "JWT_ERROR")
    assert error.message == reason


async def test_tampered_payload_is_refused(make: Callable[..., Harness], keys: Keys) -> None:
    h = make()
    header, _, signature = sign(keys["A"]).split(".")
    payload = b64url(json.dumps(claims(scopes=[SCOPE, "ADMIN"])).encode())
    error = await refused(h.verifier, f"{header}.{payload}.{signature}")
    assert error.message == "signature verification failed"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("", "missing token"),
        ("abc", "malformed token"),
        ("a.b", "malformed token"),
        ("a.b.c", "malformed token"),
        ("...", "malformed token"),
        ("é.a.b", "malformed token"),
        ("\udcff\udcfe.a.b", "malformed token"),  # header bytes that were not UTF-8
        ("eyJh\udcc3.eyJ\udcff.sig", "malformed token"),
    ],
)
async def test_garbage_tokens(make: Callable[..., Harness], token: str, reason: str) -> None:
    error = await refused(make().verifier, token)
    assert error.message == reason


async def test_leeway_on_exp(make: Callable[..., Harness], keys: Keys) -> None:
    h = make(leeway=5.0)
    assert await h.verifier.verify(sign(keys["A"], exp=WALL - 4), None)
    error = await refused(h.verifier, sign(keys["A"], exp=WALL - 5))
    assert error.message == "token expired"


async def test_missing_scope_is_403(make: Callable[..., Harness], keys: Keys) -> None:
    h = make()
    with pytest.raises(ScopeError) as info:
        await h.verifier.verify(sign(keys["A"], scopes=["ACTION_NOTIFICATION"]), SCOPE)
    assert (info.value.status, info.value.message) == (403, "missing scope PLUGIN_INTERCEPTOR")


@pytest.mark.parametrize("scopes", [None, SCOPE, {"PLUGIN_INTERCEPTOR": True}])
async def test_missing_or_non_list_scopes_claim_fails_scope_check(
    make: Callable[..., Harness], keys: Keys, scopes: Any
) -> None:
    token = sign(keys["A"], scopes=scopes)
    with pytest.raises(ScopeError):
        await make().verifier.verify(token, SCOPE)


async def test_no_scope_required_accepts_token_without_scopes(
    make: Callable[..., Harness], keys: Keys
) -> None:
    assert await make().verifier.verify(sign(keys["A"], scopes=None), None)


# ---------------------------------------------------------------- key cache


async def test_key_fetched_once_and_refetched_after_ttl(
    make: Callable[..., Harness], keys: Keys
) -> None:
    h = make(key_ttl=60.0)
    await h.verifier.ready()
    for jti in ("1", "2", "3"):
        await h.verifier.verify(sign(keys["A"], jti=jti), SCOPE)
    h.clock.now += 59.5
    await h.verifier.verify(sign(keys["A"], jti="4"), SCOPE)
    assert h.fetch.calls == 1
    h.clock.now += 0.5
    await h.verifier.verify(sign(keys["A"], jti="5"), SCOPE)
    assert h.fetch.calls == 2


async def test_cold_start_fetches_once_for_concurrent_verifications(
    make: Callable[..., Harness], keys: Keys
) -> None:
    h = make(refetch_cooldown=0.0)  # the single flight alone must prevent a second fetch
    gate = h.fetch.gate = asyncio.Event()

    async def open_gate() -> None:
        await h.fetch.started.wait()
        gate.set()

    tokens = [sign(keys["A"], jti=str(i)) for i in range(30)]
    verifications = asyncio.gather(*(h.verifier.verify(t, SCOPE) for t in tokens))
    results, _ = await soon(asyncio.gather(verifications, open_gate()))
    assert len(results) == 30
    assert h.fetch.calls == 1


async def test_token_signed_with_previous_key_verifies(
    make: Callable[..., Harness], keys: Keys
) -> None:
    h = make(current="B", previous="A")
    assert await h.verifier.verify(sign(keys["A"]), SCOPE)
    assert await h.verifier.verify(sign(keys["B"]), SCOPE)
    assert h.fetch.calls == 1


async def test_rotation_refetches_once_then_accepts_new_and_previous(
    make: Callable[..., Harness], keys: Keys
) -> None:
    h = make()
    await h.verifier.verify(sign(keys["A"], jti="old"), SCOPE)
    h.fetch.keys = PublicKeys(body(keys["B"]), body(keys["A"]))
    h.clock.now += 10  # past the cooldown
    assert await h.verifier.verify(sign(keys["B"]), SCOPE)
    assert await h.verifier.verify(sign(keys["A"], jti="fresh"), SCOPE)
    assert h.fetch.calls == 2


async def test_concurrent_signature_failures_share_one_refetch(
    make: Callable[..., Harness], keys: Keys
) -> None:
    h = make()
    await h.verifier.ready()
    h.fetch.keys = PublicKeys(body(keys["B"]), body(keys["A"]))
    gate = h.fetch.gate = asyncio.Event()
    h.fetch.started = asyncio.Event()
    h.clock.now += 10

    async def open_gate() -> None:
        await h.fetch.started.wait()
        gate.set()

    tokens = [sign(keys["B"], jti=str(i)) for i in range(50)]
    verifications = asyncio.gather(*(h.verifier.verify(t, SCOPE) for t in tokens))
    results, _ = await soon(asyncio.gather(verifications, open_gate()))
    assert [r["jti"] for r in results] == [str(i) for i in range(50)]
    assert h.fetch.calls == 2


async def test_forged_floods_refetch_at_most_once_per_cooldown(
    make: Callable[..., Harness], keys: Keys
) -> None:
    h = make(refetch_cooldown=5.0)
    await h.verifier.ready()  # fetch 1 at t=1000

    async def burst() -> None:
        tokens = [sign(keys["C"], jti=str(i)) for i in range(20)]
        outcomes = await asyncio.gather(
            *(h.verifier.verify(t, SCOPE) for t in tokens), return_exceptions=True
        )
        assert all(isinstance(o, AuthError) for o in outcomes)
        assert {o.message for o in outcomes if isinstance(o, AuthError)} == {
            "signature verification failed"
        }

    await burst()  # the initial load does not start the cooldown: one refetch
    assert h.fetch.calls == 2
    await burst()  # within the cooldown of that refetch: none
    assert h.fetch.calls == 2
    h.clock.now += 5.0
    await burst()
    assert h.fetch.calls == 3
    h.clock.now += 4.5
    await burst()
    assert h.fetch.calls == 3
    h.clock.now += 0.5
    await burst()
    assert h.fetch.calls == 4


async def test_rotation_right_after_the_first_load_is_picked_up(
    make: Callable[..., Harness], keys: Keys
) -> None:
    h = make(refetch_cooldown=5.0)
    await h.verifier.ready()
    h.fetch.keys = PublicKeys(body(keys["B"]), body(keys["A"]))  # BioT rotated A -> B
    claims = await h.verifier.verify(sign(keys["B"]), SCOPE)
    assert claims["scopes"] == [SCOPE]
    assert h.fetch.calls == 2


async def test_fetch_failure_without_cached_key(make: Callable[..., Harness], keys: Keys) -> None:
    h = make(refetch_cooldown=5.0)
    h.fetch.error = ConnectionError("connection refused")
    token = sign(keys["A"])
    error = await refused(h.verifier, token, SCOPE)
    assert error.message == "could not fetch BioT public key: connection refused"
    assert h.log.warnings() == ["could not fetch BioT public key"]
    with pytest.raises(AuthError, match="could not fetch BioT public key: connection refused"):
        await h.verifier.ready()
    assert h.fetch.calls == 1  # the cooldown also protects a cold start
    h.fetch.error = None
    h.clock.now += 5.0
    assert await h.verifier.verify(token, SCOPE)
    assert h.fetch.calls == 2


async def test_fetch_failure_keeps_using_cached_key(
    make: Callable[..., Harness], keys: Keys
) -> None:
    h = make(key_ttl=60.0, refetch_cooldown=5.0)
    await h.verifier.ready()
    h.clock.now += 61
    h.fetch.error = RuntimeError("HTTP 503")
    assert await h.verifier.verify(sign(keys["A"], jti="1"), SCOPE)
    assert await h.verifier.verify(sign(keys["A"], jti="2"), SCOPE)
    await h.verifier.ready()
    assert h.fetch.calls == 2
    assert h.log.warnings() == ["could not fetch BioT public key"]
    h.clock.now += 5.0
    h.fetch.error = None
    assert await h.verifier.verify(sign(keys["A"], jti="3"), SCOPE)
    assert h.fetch.calls == 3


async def test_failed_refetch_after_signature_failure_surfaces(
    make: Callable[..., Harness], keys: Keys
) -> None:
    h = make()
    await h.verifier.ready()
    h.clock.now += 10
    h.fetch.error = RuntimeError("timeout")
    error = await refused(h.verifier, sign(keys["B"]), SCOPE)
    assert error.message == "could not fetch BioT public key: timeout"
    assert await h.verifier.verify(sign(keys["A"]), SCOPE)  # the cached key still serves


async def test_garbage_key_from_endpoint_is_a_fetch_failure(
    make: Callable[..., Harness], keys: Keys
) -> None:
    h = make()
    h.fetch.keys = PublicKeys("not-a-key")
    with pytest.raises(AuthError, match="could not fetch BioT public key: invalid BioT public"):
        await h.verifier.ready()


async def test_blank_previous_key_is_ignored(make: Callable[..., Harness], keys: Keys) -> None:
    h = make()
    h.fetch.keys = PublicKeys(body(keys["A"]), "  ")
    assert await h.verifier.verify(sign(keys["A"]), SCOPE)


# ---------------------------------------------------------------- verified-token cache


async def test_cache_hit_skips_pyjwt_but_still_checks_scope(
    make: Callable[..., Harness], keys: Keys, decode_calls: list[str]
) -> None:
    h = make()
    token = sign(keys["A"])
    first = await h.verifier.verify(token, SCOPE)
    assert await h.verifier.verify(token, SCOPE) == first
    assert decode_calls == [token]
    with pytest.raises(ScopeError):
        await h.verifier.verify(token, "ACTION_NOTIFICATION")
    assert decode_calls == [token]


async def test_cached_token_is_reverified_and_refused_after_exp(
    make: Callable[..., Harness], keys: Keys, decode_calls: list[str]
) -> None:
    h = make(leeway=5.0)
    token = sign(keys["A"], exp=WALL + 60)
    await h.verifier.verify(token, SCOPE)
    h.wall.now = WALL + 64.5
    await h.verifier.verify(token, SCOPE)
    assert len(decode_calls) == 1
    h.wall.now = WALL + 65
    error = await refused(h.verifier, token, SCOPE)
    assert error.message == "token expired"
    assert len(decode_calls) == 2


async def test_cache_is_bounded_and_evicts_oldest(
    make: Callable[..., Harness], keys: Keys, decode_calls: list[str]
) -> None:
    h = make(cache_size=2)
    t1, t2, t3 = (sign(keys["A"], jti=str(i)) for i in range(3))
    for token in (t1, t2, t3, t3, t2):
        await h.verifier.verify(token, SCOPE)
    assert decode_calls == [t1, t2, t3]
    await h.verifier.verify(t1, SCOPE)
    assert decode_calls == [t1, t2, t3, t1]


async def test_failed_verification_is_not_cached(
    make: Callable[..., Harness], keys: Keys, decode_calls: list[str]
) -> None:
    h = make()
    token = sign(keys["A"], exp=None)
    await refused(h.verifier, token)
    await refused(h.verifier, token)
    assert decode_calls == [token, token]


async def test_rotation_keeping_old_key_keeps_cache(
    make: Callable[..., Harness], keys: Keys, decode_calls: list[str]
) -> None:
    h = make(key_ttl=60.0)
    old = sign(keys["A"], jti="old")
    await h.verifier.verify(old, SCOPE)
    h.fetch.keys = PublicKeys(body(keys["B"]), body(keys["A"]))
    h.clock.now += 61
    await h.verifier.verify(sign(keys["B"]), SCOPE)  # TTL refetch: A stays as previous
    await h.verifier.verify(old, SCOPE)
    assert decode_calls.count(old) == 1


async def test_refetch_dropping_a_key_clears_cache(
    make: Callable[..., Harness], keys: Keys
) -> None:
    h = make(key_ttl=60.0)
    old = sign(keys["A"], jti="old")
    await h.verifier.verify(old, SCOPE)
    h.fetch.keys = PublicKeys(body(keys["B"]), body(keys["C"]))
    h.clock.now += 61
    await h.verifier.verify(sign(keys["B"]), SCOPE)  # TTL refetch drops A
    error = await refused(h.verifier, old, SCOPE)
    assert error.message == "signature verification failed"
