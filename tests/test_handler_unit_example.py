"""How a plugin author unit-tests a handler with no server at all: aioresponses.

``aioresponses`` (the maintained fork ``aioresponses-ng``) patches ``ClientSession._request``,
so it bypasses client middlewares and trace configs; the BioT client sets its auth and trace
headers explicitly on every request, which is why they are visible here.
"""

from __future__ import annotations

import re
from typing import Any, cast

import aiohttp
import pytest
from aioresponses import aioresponses
from yarl import URL

from handlers.notification import patient_changed
from tests.conftest import TRACE_ID, TRACEPARENT, entity, settings_for
from worker.client import BiotClient
from worker.events import Notification
from worker.logs import CapturingLog
from worker.routing import Context
from worker.tracing import current_trace, parse_traceparent

BASE = "https://api.example.test"


class StaticToken:
    async def get(self) -> str:
        return "service-token"

    def invalidate(self, token: str) -> None:
        return None


def only_request(mocked: aioresponses) -> tuple[str, URL, dict[str, str]]:
    """The one request the handler made: method, URL and the headers it sent."""
    assert mocked.requests is not None
    [((method, url), calls)] = list(mocked.requests.items())
    return method, url, dict(cast(dict[str, Any], calls[0].kwargs)["headers"])


async def test_notification_handler_with_aioresponses() -> None:
    trace = parse_traceparent(TRACEPARENT)
    assert trace is not None
    current_trace.set(trace)
    log = CapturingLog()
    page = {"data": [], "metadata": {"page": {"totalResults": 7, "page": 0, "limit": 10}}}
    async with aiohttp.ClientSession() as session:
        api = BiotClient(session, BASE, StaticToken())
        ctx = Context(
            api=api,
            log=log,
            trace=trace,
            deadline=float("inf"),
            settings=settings_for().public(),
        )
        view = Notification({"actionName": "_create"}, {}, entity(), None)
        with aioresponses() as mocked:
            mocked.get(
                re.compile(r"^https://api\.example\.test/organization/v1/users/patients"),
                payload=page,
            )
            await patient_changed(view, ctx)
            method, url, headers = only_request(mocked)
    assert log.find("patient notification handled")[0]["patients_total"] == 7
    assert headers["Authorization"] == "Bearer service-token"
    assert headers["traceparent"].split("-")[1] == TRACE_ID
    assert method == "GET"
    assert "searchRequest" in url.query


@pytest.mark.parametrize("status", [404, 500])
async def test_a_failing_api_call_reaches_the_handler_as_a_typed_error(status: int) -> None:
    from worker.errors import ApiError

    async with aiohttp.ClientSession() as session:
        api = BiotClient(session, BASE, StaticToken(), retries=0)
        with aioresponses() as mocked:
            mocked.get(
                f"{BASE}/organization/v1/users/patients/p-1", status=status, payload={"code": "X"}
            )
            with pytest.raises(ApiError) as caught:
                await api.get("/organization/v1/users/patients/p-1")
    assert caught.value.upstream_status == status
    assert caught.value.details["upstreamCode"] == "X"
