"""The test kit itself: event builders, FakeApi, make_context, run_event, emulated_biot, the
``biot`` fixture, and the second plugin (``tests/other_plugin``) loaded through WORKER_ROUTES."""

from __future__ import annotations

import os
from typing import Any

import aiohttp
import jwt
import orjson
import pytest

from tests.other_plugin import CREATE_GENERIC_ENTITY, DEVICE_LOGS
from worker import (
    AdaptEntityInterception,
    ApiError,
    Context,
    HookType,
    NonSpecific,
    Notification,
    PostInterception,
    PreInterception,
    Router,
)
from worker.events import Event
from worker.logs import CapturingLog
from worker.routing import load_routes
from worker.testing import (
    INTERCEPTION_SCOPE,
    NOTIFICATION_SCOPE,
    TRACE_ID,
    EmulatedBiot,
    FakeApi,
    adapt_entity_event,
    api_id_for,
    default_keys,
    emulated_biot,
    entity,
    kit_settings,
    make_context,
    make_key_pair,
    nonspecific_event,
    notification_event,
    post_event,
    pre_event,
    run_event,
    view_of,
)

PATIENTS = "/organization/v1/users/patients"


def claims(token: str) -> dict[str, Any]:
    """The claims of a token the kit signed, verified with the kit's public key."""
    key = default_keys().private.public_key()
    return dict(jwt.decode(token, key, algorithms=["RS512"]))


def bearer(event: Event) -> str:
    return event.headers["authorization"].removeprefix("Bearer ")


# ---------------------------------------------------------------- builders


def test_notification_event_is_signed_with_the_notification_scope_in_its_body() -> None:
    event = notification_event("device", "_update", entity_data={"_id": "d-1"}, template="Pump")
    view = view_of(event, Notification)
    assert event.hook is HookType.NOTIFICATION and event.trace.trace_id == TRACE_ID
    assert (view.entity_type, view.action, view.template) == ("device", "_update", "Pump")
    assert view.entity["_id"] == "d-1" and view.old_entity is None
    assert claims(body_of(event)["jwt"])["scopes"] == [NOTIFICATION_SCOPE]
    assert "authorization" not in event.headers


def body_of(event: Event) -> dict[str, Any]:
    return dict(orjson.loads(event.body))


@pytest.mark.parametrize(
    ("event", "hook", "kind"),
    [
        (pre_event(), HookType.INTERCEPTOR_PRE, PreInterception),
        (post_event(), HookType.INTERCEPTOR_POST, PostInterception),
        (adapt_entity_event(), HookType.INTERCEPTOR_POST_ENTITY, AdaptEntityInterception),
    ],
)
def test_interceptor_events_carry_the_interception_scope_in_the_header(
    event: Event, hook: HookType, kind: type[Any]
) -> None:
    assert event.hook is hook and isinstance(view_of(event), kind)
    assert claims(bearer(event))["scopes"] == [INTERCEPTION_SCOPE]


def test_interceptor_builders_fill_api_id_path_and_payload() -> None:
    pre = view_of(pre_event(entity="caregiver", body={"x": 1}), PreInterception)
    assert pre.api_id == "PATCH/organization/v1/users/caregivers/{id}"
    assert pre.request.path == "/organization/v1/users/caregivers/p-1"
    assert pre.request.path_variables == [{"name": "id", "value": "p-1"}]
    assert (pre.entity_name, pre.request.body) == ("caregiver", {"x": 1})
    post = view_of(post_event(api_id_for("device", "GET"), "device", body=[1], status="OK"),
                   PostInterception)  # fmt: skip
    assert (post.api_id, post.body, post.status.raw) == ("GET/devices/{id}", [1], "OK")
    adapt = view_of(adapt_entity_event(entity="caregiver"), AdaptEntityInterception)
    assert adapt.api_id == "GET/organization/v1/users/caregivers/{id}"
    assert [e["_template"]["name"] for e in adapt.entities] == ["caregiver", "caregiver"]
    given = view_of(adapt_entity_event(entities=[{"a": 1}]), AdaptEntityInterception)
    assert given.entities == [{"a": 1}]


def test_unsigned_and_nonspecific_events() -> None:
    assert "authorization" not in pre_event(signed=False).headers
    assert "jwt" not in body_of(notification_event(signed=False))
    plain = nonspecific_event({"job": "nightly"}, headers={"x-job": "1"})
    view = view_of(plain, NonSpecific)
    assert plain.hook is HookType.NONSPECIFIC
    assert (view.body, view.headers["x-job"]) == ({"job": "nightly"}, "1")
    assert "authorization" not in plain.headers and nonspecific_event().body == b""
    assert claims(bearer(nonspecific_event(signed=True)))["scopes"] == []


def test_view_of_refuses_the_wrong_kind() -> None:
    with pytest.raises(TypeError, match="PreInterception, not PostInterception"):
        view_of(pre_event(), PostInterception)


def test_events_can_be_signed_by_other_keys() -> None:
    other = make_key_pair()
    token = bearer(pre_event(keys=other))
    with pytest.raises(jwt.InvalidSignatureError):
        claims(token)


# ---------------------------------------------------------------- FakeApi


async def test_fake_api_answers_by_method_and_pattern_and_records() -> None:
    api = FakeApi()
    api.respond("GET", f"{PATIENTS}/*", {"any": True}).respond("GET", f"{PATIENTS}/p-2", {"p": 2})
    assert await api.get(f"{PATIENTS}/p-1") == {"any": True}
    assert await api.get(f"{PATIENTS}/p-2", params={"q": "1"}) == {"p": 2}  # the latest wins
    api.respond("POST", PATIENTS, lambda call: {"echo": call.json})
    assert await api.post(PATIENTS, json={"a": 1}) == {"echo": {"a": 1}}
    assert [(c.method, c.path) for c in api.calls] == [
        ("GET", f"{PATIENTS}/p-1"), ("GET", f"{PATIENTS}/p-2"), ("POST", PATIENTS),
    ]  # fmt: skip
    assert api.calls_to("GET", f"{PATIENTS}/p-2")[0].params == {"q": "1"}


async def test_fake_api_raises_configured_errors_and_404_for_the_unknown() -> None:
    api = FakeApi().respond("DELETE", "/x", ApiError("gone", status=410))
    with pytest.raises(ApiError) as gone:
        await api.delete("/x")
    assert gone.value.upstream_status == 410
    with pytest.raises(ApiError) as missing:
        await api.patch("/nothing", json={})
    assert missing.value.upstream_status == 404
    assert len(api.calls) == 2


async def test_fake_api_search_pages() -> None:
    api = FakeApi()
    assert (await api.search(PATIENTS))["data"] == []  # unconfigured: an empty page
    pages: dict[int, list[Any]] = {0: [1, 2], 1: [3, 4], 2: [5]}

    def page(call: Any) -> dict[str, Any]:
        return {"data": pages[call.search_request["page"]]}

    api.respond("GET", PATIENTS, page)
    items: list[Any] = [item async for item in api.iter_search(PATIENTS, limit=2)]
    assert items == [1, 2, 3, 4, 5]
    search = api.calls[-1].search_request
    assert search == {"filter": {}, "page": 2, "limit": 2}
    api.respond("GET", "/endless", {"data": [1]})
    with pytest.raises(RuntimeError, match="more than 1000 pages"):
        async for _ in api.iter_search("/endless", limit=1):
            pass


# ---------------------------------------------------------------- make_context and run_event


async def test_make_context_defaults() -> None:
    ctx = make_context()
    assert isinstance(ctx.api, FakeApi) and isinstance(ctx.log, CapturingLog)
    assert ctx.trace.trace_id == TRACE_ID and ctx.attempt == 1
    assert 29 < ctx.remaining() <= 30
    assert ctx.settings.biot.service_user_secret is None  # secrets never reach a handler
    assert ctx.settings.biot.app_name == "test-plugin"


async def test_run_event_runs_the_routed_handler_with_ctx_api() -> None:
    seen: list[Any] = []

    async def on_device(view: Notification, ctx: Context) -> None:
        seen.append(await ctx.api.get(f"/devices/{view.entity['_id']}"))

    routes = Router().notification(on_device, entity="device", action="_create")
    api = FakeApi().respond("GET", "/devices/*", {"ok": 1})
    event = notification_event("device", entity_data={"_id": "d-9"})
    response = await run_event(routes, event, api=api)
    assert response.status == 200 and seen == [{"ok": 1}]
    assert api.calls[0].path == "/devices/d-9"


async def test_run_event_checks_the_jwt_unless_validation_is_off() -> None:
    async def mark(view: PreInterception, ctx: Context) -> None:
        view.request.body = {"marked": True}

    routes = Router().pre(mark, entity="patient")
    forged = pre_event(keys=make_key_pair())
    assert (await run_event(routes, forged)).json()["code"] == "JWT_ERROR"
    assert (await run_event(routes, pre_event(signed=False))).status == 400
    off = kit_settings(BIOT_SHOULD_VALIDATE_JWT="false")
    answer = await run_event(routes, pre_event(signed=False), settings=off)
    assert answer.json()["request"]["body"] == {"marked": True}


async def test_run_event_counts_the_deadline_from_the_call() -> None:
    event = pre_event()
    event.received_at -= 3600  # built long ago (e.g. at collection time)
    log = CapturingLog()
    response = await run_event(Router(), event, log=log)
    assert response.status == 200  # not a 504


# ---------------------------------------------------------------- the emulator


async def test_emulated_biot_serves_the_routes_and_cleans_up() -> None:
    async def hello(view: NonSpecific, ctx: Context) -> dict[str, Any]:
        page = await ctx.api.search(PATIENTS)
        return {"patients": page["metadata"]["page"]["totalResults"]}

    async def pre(view: PreInterception, ctx: Context) -> None:
        return None

    routes = Router().nonspecific(hello).pre(pre, api_id=api_id_for("patient"))
    async with emulated_biot(routes) as biot:
        answer = await biot.send(nonspecific_event({}))
        assert answer.status == 200 and answer.json() == {"patients": 3}
        [subscription] = biot.emulator.subscriptions.interceptions()
        assert (subscription.type, subscription.target) == ("PRE_REQUEST", api_id_for("patient"))
        signed = await biot.send(pre_event(keys=biot.signer))
        assert signed.status == 200
        forged = await biot.send(pre_event())  # the kit's key is not the emulator's
        assert forged.json()["code"] == "JWT_ERROR"
        worker_url = biot.worker_url
    assert biot.emulator.base_url is None  # the emulator stopped
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.post(worker_url, data=b"{}")


async def test_emulated_biot_stops_everything_when_the_block_fails() -> None:
    with pytest.raises(LookupError):
        async with emulated_biot(Router()) as biot:
            raise LookupError("a failing test")
    assert biot.emulator.base_url is None
    await biot.aclose()  # closing twice is harmless


async def test_emulated_biot_stops_the_emulator_when_the_worker_cannot_start() -> None:
    running = emulated_biot(Router(), env={"WORKER_API_TIMEOUT": "-1"})
    with pytest.raises(ValueError, match="WORKER_API_TIMEOUT"):
        await running.__aenter__()
    assert running.emulator.base_url is None


@pytest.fixture
def routes_named_by_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_ROUTES", "tests.fixture_plugin:build_routes")


async def test_the_biot_fixture_subscribes_the_plugin_worker_routes_names(
    routes_named_by_env: None, biot: EmulatedBiot, biot_routes: Router
) -> None:
    """The plugin WORKER_ROUTES names (here the project's test plugin, never the examples)."""
    notifications = [r for r in biot_routes if r.hook is HookType.NOTIFICATION and r.subscribable]
    # BioT subscribes PRE and POST by apiId, ADAPT_ENTITY by entity name.
    interceptors = [
        r
        for r in biot_routes
        if (r.entity if r.hook is HookType.INTERCEPTOR_POST_ENTITY else r.api_id)
        and r.hook.is_interceptor
    ]
    subscriptions = biot.emulator.subscriptions
    assert biot.routes is biot_routes and len(biot_routes) > 0
    assert {r.handler_name.rpartition(".")[0] for r in biot_routes} == {"tests.fixture_plugin"}
    assert len(subscriptions.notifications()) == len(notifications)
    assert len(subscriptions.interceptions()) == len(interceptors)
    assert {s.endpoint for s in subscriptions.interceptions()} <= {biot.worker_url}


# ---------------------------------------------------------------- another plugin via WORKER_ROUTES


@pytest.fixture
def other_plugin(monkeypatch: pytest.MonkeyPatch) -> Router:
    monkeypatch.setenv("WORKER_ROUTES", "tests.other_plugin:build_routes")
    return load_routes(os.environ["WORKER_ROUTES"])


async def test_the_biot_routes_fixture_follows_worker_routes(
    other_plugin: Router, request: pytest.FixtureRequest
) -> None:
    routes = request.getfixturevalue("biot_routes")
    assert [r.describe() for r in routes] == [r.describe() for r in other_plugin]


async def test_each_route_of_another_plugin_runs_through_run_event(other_plugin: Router) -> None:
    assert {r.hook for r in other_plugin} == {
        HookType.NOTIFICATION, HookType.INTERCEPTOR_POST_ENTITY, HookType.INTERCEPTOR_PRE,
    }  # fmt: skip
    api = FakeApi().respond("POST", DEVICE_LOGS, {"_id": "log-1"})
    for action in ("_create", "_update"):
        device = notification_event("device", action, entity_data={"_id": "d-1"})
        assert (await run_event(other_plugin, device, api=api)).status == 200
    assert [c.json["device"] for c in api.calls_to("POST", DEVICE_LOGS)] == ["d-1", "d-1"]
    people = [entity(_email="a@example.com"), entity("Bob")]
    adapted = await run_event(other_plugin, adapt_entity_event(entity="caregiver", entities=people))
    assert [e.get("_email") for e in adapted.json()["response"]["entities"]] == ["hidden", None]
    create = CREATE_GENERIC_ENTITY
    refused = await run_event(other_plugin, pre_event(create, "generic-entity", body={}))
    assert (refused.status, refused.json()["code"]) == (422, "SERIAL_NUMBER_REQUIRED")
    passed = await run_event(
        other_plugin, pre_event(create, "generic-entity", body={"serialNumber": "ab-1"})
    )
    assert passed.json()["request"]["body"] == {"serialNumber": "AB-1"}
    missing = await run_event(other_plugin, nonspecific_event({}))
    assert (missing.status, missing.json()["code"]) == (404, "NO_HANDLER")
