"""Tests of the example plugin: they live in its package, so replacing ``handlers/`` replaces them.

Only the test kit (:mod:`worker.testing`) and the plugin API are used here, the way a plugin
team tests its own handlers: a handler called directly with ``make_context``, one event through
the routing table with ``run_event``, a user's call through BioT in a box with the ``biot``
fixture, and one ``aioresponses`` test of the real BioT client.
"""

from __future__ import annotations

import re
from typing import Any, cast

import aiohttp
import pytest
from aioresponses import aioresponses

from handlers import PATCH_PATIENT, build_routes
from handlers.interceptor_pre import mark_request
from handlers.notification import patient_changed
from worker import Notification, PreInterception, Router
from worker.client import BiotClient
from worker.testing import (
    TRACE_ID,
    CapturingLog,
    EmulatedBiot,
    FakeApi,
    adapt_entity_event,
    make_context,
    nonspecific_event,
    notification_event,
    post_event,
    pre_event,
    run_event,
    view_of,
)
from worker.tracing import current_trace

PATIENTS = "/organization/v1/users/patients"
BASE = "https://api.example.test"
PAGE = {"data": [], "metadata": {"page": {"totalResults": 7, "page": 0, "limit": 10}}}
ADA = {"_name": {"firstName": "Ada", "lastName": "Lovelace"}}


@pytest.fixture
def biot_routes() -> Router:
    """The ``biot`` fixture serves this plugin, whatever ``WORKER_ROUTES`` says."""
    return build_routes()


# ---------------------------------------------------------------- a handler called directly


async def test_pre_handler_marks_the_first_name() -> None:
    view = view_of(pre_event(PATCH_PATIENT, body=ADA), PreInterception)
    await mark_request(view, make_context())
    assert view.request.body["_name"]["firstName"] == "Ada LAMBDA MODIFIED"


async def test_notification_handler_searches_patients_and_logs() -> None:
    api, log = FakeApi().respond("GET", PATIENTS, PAGE), CapturingLog()
    event = notification_event("patient", "_create")
    await patient_changed(view_of(event, Notification), make_context(api=api, log=log))
    [call] = api.calls
    assert call.search_request["limit"] == 10
    assert log.find("patient notification handled")[0]["patients_total"] == 7


# ---------------------------------------------------------------- one event through the router


async def test_pre_blocks_a_forbidden_name() -> None:
    event = pre_event(PATCH_PATIENT, body={"_name": {"firstName": "FORBIDDEN"}})
    response = await run_event(build_routes(), event)
    assert response.status == 403
    assert response.json()["code"] == "MODIFICATION_FORBIDDEN"


async def test_post_and_adapt_entity_mark_what_biot_returns() -> None:
    post = await run_event(build_routes(), post_event(PATCH_PATIENT, body=ADA))
    assert post.json()["response"]["body"]["_name"]["firstName"] == "Ada LAMBDA MODIFIED"
    adapted = await run_event(build_routes(), adapt_entity_event(entity="patient"))
    names = [e["_name"]["firstName"] for e in adapted.json()["response"]["entities"]]
    assert names == ["Ada LAMBDA", "Bob LAMBDA"]


async def test_nonspecific_counts_patients() -> None:
    api = FakeApi().respond("GET", PATIENTS, PAGE)
    response = await run_event(build_routes(), nonspecific_event({}), api=api)
    assert response.json() == {"patients": 7, "traceId": TRACE_ID}


# ---------------------------------------------------------------- through BioT in a box


async def test_a_users_patch_runs_pre_adapt_entity_and_post(biot: EmulatedBiot) -> None:
    async with biot.http.get(PATIENTS) as response:
        patient_id = (await response.json())["data"][0]["_id"]
    async with biot.http.patch(f"{PATIENTS}/{patient_id}", json=ADA) as response:
        assert response.status == 200
        name = (await response.json())["_name"]["firstName"]
    assert name == "Ada LAMBDA MODIFIED LAMBDA LAMBDA MODIFIED"
    await biot.emulator.drain_notifications()
    assert biot.log.find("patient notification handled")


# ---------------------------------------------------------------- the real client, mocked


class StaticToken:
    async def get(self) -> str:
        return "service-token"

    def invalidate(self, token: str) -> None:
        return None


async def test_notification_handler_with_aioresponses() -> None:
    """``aioresponses`` patches aiohttp below the client: the client's own headers are seen."""
    log = CapturingLog()
    view = view_of(notification_event("patient", "_create"), Notification)
    async with aiohttp.ClientSession() as session:
        api = BiotClient(session, BASE, StaticToken())
        ctx = make_context(api=api, log=log)
        current_trace.set(ctx.trace)  # the dispatcher binds it; outgoing calls carry it
        with aioresponses() as mocked:
            mocked.get(re.compile("^" + re.escape(BASE + PATIENTS)), payload=PAGE)
            await patient_changed(view, ctx)
            assert mocked.requests is not None
            [((method, url), calls)] = list(mocked.requests.items())
    headers = cast(dict[str, Any], calls[0].kwargs)["headers"]
    assert (method, headers["Authorization"]) == ("GET", "Bearer service-token")
    assert headers["traceparent"].split("-")[1] == TRACE_ID
    assert "searchRequest" in url.query
    assert log.find("patient notification handled")[0]["patients_total"] == 7


@pytest.mark.parametrize("status", [404, 500])
async def test_a_failing_api_call_reaches_the_handler_as_a_typed_error(status: int) -> None:
    from worker import ApiError

    async with aiohttp.ClientSession() as session:
        api = BiotClient(session, BASE, StaticToken(), retries=0)
        with aioresponses() as mocked:
            mocked.get(f"{BASE}{PATIENTS}/p-1", status=status, payload={"code": "X"})
            with pytest.raises(ApiError) as caught:
                await api.get(f"{PATIENTS}/p-1")
    assert caught.value.upstream_status == status
    assert caught.value.details["upstreamCode"] == "X"
