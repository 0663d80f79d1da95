"""``biot-worker subscribe`` / ``unsubscribe`` against the recording BioT stand-in."""

from __future__ import annotations

import io
from typing import Any

import pytest

from tests import fixture_plugin, other_plugin
from tests.fixture_plugin import PATCH_PATIENT
from tests.test_deploy import StandIn, assert_no_secret, biot, credentials
from worker import Router
from worker.deploy.admin import open_admin
from worker.deploy.deploy import DeployError
from worker.deploy.subscribe import Outcome, subscribe, unsubscribe
from worker.deploy.subscriptions import self_hosted_requests

__all__ = ["biot"]  # the fixture, imported for pytest

ENDPOINT = "https://worker.example/hooks"
OTHER = "https://someone-else.example/"


async def run(
    stand_in: StandIn, routes: Router, *, prune: bool = False, dry_run: bool = False
) -> tuple[Outcome, str, list[str]]:
    out, warnings = io.StringIO(), list[str]()
    async with open_admin(credentials(stand_in)) as admin:
        outcome = await subscribe(
            admin, routes, ENDPOINT, prune=prune, dry_run=dry_run, out=out, warn=warnings.append
        )
    return outcome, out.getvalue(), warnings


def sent(stand_in: StandIn, action: str) -> list[tuple[str, Any]]:
    return [
        (r.path.split("/")[4], r.json)
        for r in stand_in.calls("POST", "/dispatcher/")
        if r.path.endswith("/" + action)
    ]


async def test_subscribe_sends_every_route_then_nothing_the_second_time(biot: StandIn) -> None:
    routes = fixture_plugin.build_routes()
    outcome, text, _ = await run(biot, routes)
    assert sent(biot, "subscribe") == self_hosted_requests(routes, ENDPOINT)
    assert sent(biot, "subscribe")[2] == (
        "interceptions",
        {
            "type": "ADAPT_ENTITY",
            "entityName": "patient",
            "endpoint": ENDPOINT,
            "executionOrder": 1,
        },
    )
    assert len(outcome.subscribed) == 5 and outcome.in_place == []
    assert text.splitlines()[-1] == f"subscribed 5, pruned 0, 0 already in place ({ENDPOINT})"
    biot.requests.clear()
    outcome, text, warnings = await run(biot, routes)
    assert biot.writes() == []
    assert not outcome.changed and len(outcome.in_place) == 5
    assert text == "nothing to change: 5 subscription(s) already in place\n"
    assert warnings == []
    assert_no_secret(text)


async def test_a_changed_order_is_subscribed_again(biot: StandIn) -> None:
    await run(biot, fixture_plugin.build_routes())
    biot.requests.clear()
    changed = Router().pre(fixture_plugin.pre_patient, api_id=PATCH_PATIENT, order=3)
    outcome, _, warnings = await run(biot, changed)
    assert sent(biot, "subscribe") == [
        (
            "interceptions",
            {
                "type": "PRE_REQUEST",
                "apiId": PATCH_PATIENT,
                "endpoint": ENDPOINT,
                "executionOrder": 3,
            },
        )
    ]
    assert len(outcome.stale) == 4 and len(warnings) == 4
    assert all("--prune removes it" in line for line in warnings)
    assert sent(biot, "unsubscribe") == []


async def test_prune_removes_only_this_endpoints_subscriptions_no_route_asks_for(
    biot: StandIn,
) -> None:
    await run(biot, fixture_plugin.build_routes())
    async with open_admin(credentials(biot)) as admin:
        await admin.subscribe(
            "notifications",
            {"entityTypeName": "device", "actionName": "_create", "endpoint": OTHER},
        )
    biot.requests.clear()
    outcome, text, _ = await run(biot, other_plugin.build_routes(), prune=True)
    removed = sent(biot, "unsubscribe")
    assert len(removed) == 5 and all(body["endpoint"] == ENDPOINT for _, body in removed)
    assert (
        "notifications",
        {"entityTypeName": "patient", "actionName": "_create", "endpoint": ENDPOINT},
    ) in removed
    assert (
        "interceptions",
        {"type": "ADAPT_ENTITY", "entityName": "patient", "endpoint": ENDPOINT},
    ) in removed
    assert len(outcome.subscribed) == 4 and len(outcome.pruned) == 5
    held = {k: [s["endpoint"] for s in v] for k, v in biot.subscriptions.items()}
    assert sorted(held["notifications"]) == sorted([ENDPOINT, ENDPOINT, OTHER])
    assert held["interceptions"] == [ENDPOINT, ENDPOINT]
    assert "  - notification patient/_update" in text.splitlines()


async def test_dry_run_sends_nothing(biot: StandIn) -> None:
    await run(biot, fixture_plugin.build_routes())
    biot.requests.clear()
    outcome, text, _ = await run(biot, other_plugin.build_routes(), prune=True, dry_run=True)
    assert biot.writes() == []
    assert len(outcome.subscribed) == 4 and len(outcome.pruned) == 5
    assert text.splitlines()[-2:] == [
        f"would subscribe 4, would prune 5, 0 already in place ({ENDPOINT})",
        "dry run: nothing was changed",
    ]


async def test_conflict_means_already_there(biot: StandIn) -> None:
    routes = Router().notification(fixture_plugin.on_patient, entity="patient", action="_create")
    await run(biot, routes)
    biot.hide_from_search = True  # the search misses it: the 409 tells
    biot.requests.clear()
    outcome, text, _ = await run(biot, routes)
    assert len(sent(biot, "subscribe")) == 1
    assert outcome.subscribed == [] and outcome.in_place == ["notification patient/_create"]
    assert text == "nothing to change: 1 subscription(s) already in place\n"


async def test_wildcards_are_warned(biot: StandIn) -> None:
    routes = Router().notification(fixture_plugin.on_patient, entity="*", action="*")
    _, text, warnings = await run(biot, routes)
    assert biot.writes() == [] and len(warnings) == 1 and "NOTIFICATION */*" in warnings[0]
    assert text == "nothing to change: 0 subscription(s) already in place\n"


async def test_unsubscribe_removes_every_subscription_of_the_endpoint_only(biot: StandIn) -> None:
    await run(biot, fixture_plugin.build_routes())
    async with open_admin(credentials(biot)) as admin:
        await admin.subscribe(
            "interceptions",
            {"type": "PRE_REQUEST", "apiId": PATCH_PATIENT, "endpoint": OTHER, "executionOrder": 1},
        )
        out = io.StringIO()
        removed = await unsubscribe(admin, ENDPOINT, out=out)
        assert len(removed) == 5
        assert out.getvalue().splitlines()[-1] == f"removed 5 subscription(s) of {ENDPOINT}"
        again = io.StringIO()
        assert await unsubscribe(admin, ENDPOINT, out=again) == []
    assert again.getvalue() == f"nothing to remove: no subscription of {ENDPOINT}\n"
    assert biot.subscriptions["notifications"] == []
    assert [s["endpoint"] for s in biot.subscriptions["interceptions"]] == [OTHER]


async def test_an_api_id_or_entity_type_biot_does_not_list_is_refused_before_any_subscribe(
    biot: StandIn,
) -> None:
    routes = fixture_plugin.build_routes()
    routes.pre(fixture_plugin.pre_patient, api_id="PATCH/organization/v1/users/patientz/{id}")
    routes.adapt_entity(fixture_plugin.adapt_patient, entity="patinet", order=2)
    with pytest.raises(DeployError) as refused:
        await run(biot, routes)
    assert biot.writes() == []  # the good routes were not subscribed either
    assert [line.split(":")[0] for line in refused.value.lines] == [
        "unknown entity type patinet (ADAPT_ENTITY)",
        "unknown apiId PATCH/organization/v1/users/patientz/{id} (PRE_REQUEST)",
    ]
    assert "closest known: patient" in refused.value.lines[0]
