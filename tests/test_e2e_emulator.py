"""End to end over real loopback HTTP: the emulator plays BioT, the worker is the real one.

The emulator calls the worker's HTTP adapter with signed hook calls; the worker's handlers call
back into the emulator's API with the service token. Clocks are shared and manual where time
matters (token lifetimes, login back-off), so nothing here waits on real time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from tests.conftest import TRACE_ID, TRACEPARENT
from tests.fixture_plugin import ADAPT_MARK, HANDLED, POST_MARK, PRE_MARK
from worker.app import WorkerApp
from worker.events import Notification
from worker.logs import CapturingLog
from worker.routing import Context, Router
from worker.testing import EmulatedBiot, emulated_biot, notification_event
from worker.testing.emulator import Emulator, EmulatorConfig
from worker.testing.emulator.testing import ManualClock

PATIENTS = "/organization/v1/users/patients"


@dataclass
class Stack:
    """The kit's emulator and worker, and the manual clock they share."""

    biot: EmulatedBiot
    clock: ManualClock

    @property
    def emulator(self) -> Emulator:
        return self.biot.emulator

    @property
    def api_url(self) -> str:
        return self.biot.api_url

    @property
    def app(self) -> WorkerApp:
        return self.biot.app

    @property
    def log(self) -> CapturingLog:
        return self.biot.log

    @property
    def http(self) -> aiohttp.ClientSession:
        return self.biot.http

    def user(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.emulator.user_token()}", "traceparent": TRACEPARENT}

    async def patient(self) -> dict[str, Any]:
        service = self.emulator.sign_token(scopes=[], token_type="SERVICE_EXTERNAL")
        headers = {"authorization": f"Bearer {service}"}
        async with self.http.get(PATIENTS, headers=headers) as response:
            return dict((await response.json())["data"][0])

    async def notify(self) -> int:
        """Send a signed notification straight to the worker, as BioT does; its status."""
        event = notification_event(
            "patient", "_update", entity_data=await self.patient(), keys=self.biot.signer
        )
        return (await self.biot.send(event)).status


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def make_stack(fixture_routes: Router) -> AsyncIterator[StackFactory]:
    """Start stacks on demand; every one is stopped after the test, whether it passed or not."""
    async with AsyncExitStack() as stack:

        async def start(
            *,
            routes: Router | None = None,
            config: EmulatorConfig | None = None,
            clock_fraction: float = 0.0,
            **env: str,
        ) -> Stack:
            clock = ManualClock(int(time.time()) + clock_fraction)
            running = emulated_biot(
                routes or fixture_routes, config=config, clock=clock, env=env
            )
            return Stack(await stack.enter_async_context(running), clock)

        yield start


async def _patch_chain(s: Stack) -> None:
    """A user's PATCH runs PRE -> update -> ADAPT_ENTITY -> POST, then a notification."""
    patient = await s.patient()
    url = f"{PATIENTS}/{patient['_id']}"
    change = {"_name": {"firstName": "Ada", "lastName": "Lovelace"}}
    async with s.http.patch(url, json=change, headers=s.user()) as response:
        assert response.status == 200
        body = await response.json()
    # PRE marked the request, ADAPT_ENTITY the entity, POST the response.
    assert body["_name"]["firstName"] == "Ada" + PRE_MARK + ADAPT_MARK + POST_MARK
    stored = await s.patient()
    assert stored["_name"]["firstName"] == "Ada" + PRE_MARK  # only PRE changes storage
    await s.emulator.drain_notifications()

    hops = s.emulator.calls.records(trace_id=TRACE_ID)
    hooks = [c.hook for c in hops if c.direction == "out"]
    assert hooks == [
        "INTERCEPTOR_PRE",
        "INTERCEPTOR_POST_ENTITY",
        "INTERCEPTOR_POST",
        "NOTIFICATION",
    ]
    assert all(c.status == 200 for c in hops if c.direction == "out")
    # The notification handler called back into the API with the same trace id.
    callbacks = [c for c in hops if c.direction == "in" and c.method == "GET"]
    assert callbacks and callbacks[0].token != "USER"
    handled = s.log.find(HANDLED)
    assert handled and handled[0]["traceId"] == TRACE_ID
    assert {r["traceId"] for r in s.log.find("event handled")} == {TRACE_ID}


async def test_patch_runs_the_whole_chain_with_one_trace_id(make_stack: StackFactory) -> None:
    await _patch_chain(await make_stack())


async def test_the_whole_flow_passes_with_the_emulator_on_https(make_stack: StackFactory) -> None:
    s = await make_stack(config=EmulatorConfig(tls=True))
    assert s.api_url.startswith("https://")
    await _patch_chain(s)


async def test_pre_handler_blocks_the_call_and_the_user_gets_its_error(
    make_stack: StackFactory,
) -> None:
    s = await make_stack()
    patient = await s.patient()
    url = f"{PATIENTS}/{patient['_id']}"
    change = {"_name": {"firstName": "FORBIDDEN", "lastName": "X"}}
    async with s.http.patch(url, json=change, headers=s.user()) as response:
        assert response.status == 403
        error = await response.json()
    assert error["code"] == "MODIFICATION_FORBIDDEN"
    assert error["traceId"] == TRACE_ID
    assert (await s.patient())["_name"] == patient["_name"]  # the update never happened


@pytest.mark.parametrize("fraction", [0.0, 0.9])
async def test_short_token_lifetime_means_one_login_per_lifetime(
    make_stack: StackFactory, fraction: float
) -> None:
    # With a fractional start, the JWT's whole-second exp is up to 1 s before the
    # accessTokenExpiration BioT advertises; the worker must not be caught out by it.
    s = await make_stack(config=EmulatorConfig(token_lifetime=2.0), clock_fraction=fraction)
    statuses = []
    for _ in range(20):  # 10 s of the shared clock, an event every 0.5 s
        statuses.append(await s.notify())
        s.clock.advance(0.5)
    assert statuses == [200] * 20
    # A token is refreshed once per lifetime (20% ahead of expiry), never per event; with a
    # fractional start its real lifetime (to the JWT's exp) is only 2.0 - fraction seconds.
    lifetime = 2.0 - fraction
    assert int(9.5 / lifetime) <= s.emulator.logins <= 10 / (0.8 * lifetime) + 1
    assert not [c for c in s.emulator.call_log if c.status == 401]


async def test_key_rotation_mid_run_keeps_verification_working(make_stack: StackFactory) -> None:
    # A cooldown of 0.1 ms lets this test rotate twice in quick succession, which BioT never
    # does; the cooldown itself is covered in test_auth.
    s = await make_stack(WORKER_KEY_REFETCH_COOLDOWN="0.0001")
    assert await s.notify() == 200
    await s.emulator.rotate_keys_async()
    assert await s.notify() == 200  # signed with the new key: one refetch
    await s.emulator.rotate_keys_async()
    await s.emulator.rotate_keys_async()
    assert await s.notify() == 200
    fetches = [c for c in s.emulator.call_log if c.path == "/ums/v1/security/public-key"]
    assert len(fetches) == 3


async def _get_then_post(view: Notification, ctx: Context) -> None:
    await ctx.api.get(f"{PATIENTS}/{view.entity['_id']}")
    await ctx.api.post(PATIENTS, json={"_name": {"firstName": "New", "lastName": "P"}})


async def test_injected_503_retried_for_get_not_for_post(make_stack: StackFactory) -> None:
    routes = Router().notification(_get_then_post, entity="patient", action="_update")
    s = await make_stack(routes=routes)
    s.emulator.faults.update(
        {
            "errors": [
                {"route": "GET /organization/v1/users/patients/*", "status": 503, "count": 2},
                {"route": "POST /organization/v1/users/patients", "status": 503, "count": 1},
            ]
        }
    )
    assert await s.notify() == 502
    incoming = [c for c in s.emulator.call_log if c.direction == "in" and c.token != "USER"]
    gets = [c.status for c in incoming if c.method == "GET" and c.path.count("/") == 5]
    posts = [c.status for c in incoming if c.method == "POST" and c.path == PATIENTS]
    assert gets[-3:] == [503, 503, 200]  # retried to success
    assert posts == [503]  # not retried
    failed = s.log.find("event failed")[0]
    assert failed["code"] == "CALL_TO_API_FAILED"


async def test_login_outage_is_a_clear_error_and_recovers(make_stack: StackFactory) -> None:
    s = await make_stack()
    s.emulator.faults.update({"loginFails": True})
    assert await s.notify() == 502
    assert s.log.find("event failed")[0]["code"] == "LOGIN_FAILED"
    s.emulator.faults.update({"loginFails": False})
    s.clock.advance(60)  # past the login back-off
    assert await s.notify() == 200


async def test_token_expiring_during_a_burst_causes_one_refresh_and_no_failure(
    make_stack: StackFactory,
) -> None:
    events = 50
    arrived = 0
    expired = asyncio.Event()
    holder: list[Stack] = []

    async def twice(view: Notification, ctx: Context) -> None:
        nonlocal arrived
        await ctx.api.get(f"{PATIENTS}/{view.entity['_id']}")  # with the first token
        arrived += 1
        if arrived == events:  # every event is in flight: now the token expires
            holder[0].clock.advance(3600)
            expired.set()
        await expired.wait()
        await ctx.api.get(f"{PATIENTS}/{view.entity['_id']}")  # needs a fresh token

    s = await make_stack(routes=Router().notification(twice, entity="patient", action="_update"))
    holder.append(s)
    statuses = await asyncio.gather(*(s.notify() for _ in range(events)))
    assert statuses == [200] * events
    assert s.emulator.logins == 2  # the first token, and exactly one refresh
    assert not [c for c in s.emulator.call_log if c.status == 401]


async def test_validation_off_is_warned_at_start(make_stack: StackFactory) -> None:
    s = await make_stack(BIOT_SHOULD_VALIDATE_JWT="false")
    warning = s.log.find(
        "BIOT_SHOULD_VALIDATE_JWT is false: events are NOT authenticated; "
        "never run like this where BioT can reach the worker"
    )
    assert warning and warning[0]["level"] == "WARN"
    assert s.app.verifier is None
