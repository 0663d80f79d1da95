"""``JwtVerifier.verify_cached``: the dispatcher's answer for a token already verified, without
a coroutine; what it cannot answer it leaves to ``verify``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from tests.conftest import KeyPair, interceptor_body, make_event, settings_for
from worker.auth import JwtVerifier
from worker.dispatch import Dispatcher
from worker.errors import AuthError, ScopeError
from worker.logs import CapturingLog
from worker.routing import Router
from worker.testing import FakeApi

SCOPE = "PLUGIN_INTERCEPTOR"


class _Wall:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _verifier(keys: KeyPair, wall: _Wall) -> JwtVerifier:
    return JwtVerifier(static_key=keys.public_b64, wall_clock=wall, leeway=5.0)


async def test_only_a_verified_token_is_answered_from_the_cache(keys: KeyPair) -> None:
    wall = _Wall(0.0)
    verifier = _verifier(keys, wall)
    token = keys.sign(scopes=[SCOPE], lifetime=600)
    claims = await verifier.verify(token, SCOPE)
    wall.now = float(claims["exp"]) - 600
    assert verifier.verify_cached("not.a.token", SCOPE) is False
    assert verifier.verify_cached(token, SCOPE) is True
    assert verifier.verify_cached(token, None) is True
    with pytest.raises(ScopeError):
        verifier.verify_cached(token, "ACTION_NOTIFICATION")
    wall.now = float(claims["exp"]) + 5.0  # expiry plus leeway: verified again, and refused
    assert verifier.verify_cached(token, SCOPE) is False
    with pytest.raises(AuthError):
        await verifier.verify(token, SCOPE)


class _OnlyVerify:
    """A verifier with nothing but ``verify`` (the TokenVerifier protocol): always awaited."""

    def __init__(self) -> None:
        self.calls = 0

    async def verify(self, token: str, scope: str | None) -> Mapping[str, Any]:
        self.calls += 1
        if token != "good":
            raise AuthError("invalid token", reason="malformed")
        return {"scopes": [scope]}


def _pre_dispatcher(verifier: Any) -> Dispatcher:
    """A dispatcher with a PRE route that answers nothing, checking tokens with ``verifier``."""

    async def handler(view: Any, ctx: Any) -> None:
        return None

    return Dispatcher(
        routes=Router().pre(handler, entity="patient"),
        api=FakeApi(),
        log=CapturingLog(),
        settings=settings_for(),
        verifier=verifier,
    )


async def test_a_verifier_without_a_cache_is_awaited_for_every_event() -> None:
    verifier = _OnlyVerify()
    dispatcher = _pre_dispatcher(verifier)
    hook = "INTERCEPTOR_PRE"
    good = await dispatcher.dispatch(make_event(hook, interceptor_body(hook), token="good"))
    bad = await dispatcher.dispatch(make_event(hook, interceptor_body(hook), token="bad"))
    assert (good.status, bad.status) == (200, 400)
    assert verifier.calls == 2


class _LookAlike(_OnlyVerify):
    """A verifier with a ``verify_cached`` of its own whose answer is truthy but no verdict
    (a coroutine, as an ``async def`` or an AsyncMock gives): it must not pass a token."""

    async def verify_cached(self, token: str, scope: str | None) -> bool:
        return True


async def test_only_jwt_verifier_answers_from_its_cache_a_look_alike_is_awaited() -> None:
    verifier = _LookAlike()
    dispatcher = _pre_dispatcher(verifier)
    hook = "INTERCEPTOR_PRE"
    bad = await dispatcher.dispatch(make_event(hook, interceptor_body(hook), token="bad"))
    assert bad.status == 400
    assert verifier.calls == 1


async def test_a_cached_token_without_the_hook_scope_is_403_and_counted(keys: KeyPair) -> None:
    from worker.metrics import Metrics

    async def handler(view: Any, ctx: Any) -> None:
        return None

    metrics = Metrics(token_expires_in=lambda: 100.0)
    dispatcher = Dispatcher(
        routes=Router().pre(handler, entity="patient"),
        api=FakeApi(),
        log=CapturingLog(),
        settings=settings_for(),
        verifier=JwtVerifier(static_key=keys.public_b64),
        metrics=metrics,
    )
    hook = "INTERCEPTOR_PRE"
    token = keys.sign(scopes=["ACTION_NOTIFICATION"])
    answers = [
        await dispatcher.dispatch(make_event(hook, interceptor_body(hook), token=token))
        for _ in range(2)  # the first verifies the token, the second finds it cached
    ]
    assert [a.status for a in answers] == [403, 403]
    body, _ = await metrics.render()
    assert b'biot_worker_jwt_refusals_total{reason="scope"} 2.0' in body
