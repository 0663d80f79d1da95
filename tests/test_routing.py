"""The Router (handler first, one route per key, routes as data) and loading a plugin."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from worker import Context, HookType, Route, RouteError, Router
from worker.routing import load_routes
from worker.views import NonSpecific, Notification, PreInterception, interception_view

API_ID = "PATCH/organization/v1/users/patients/{id}"


async def first(view: Any, ctx: Context) -> None:
    """A handler."""


async def second(view: Any, ctx: Context) -> None:
    """Another handler."""


def notification(entity: str, action: str, template: str | None = None) -> Notification:
    metadata: dict[str, Any] = {"entityTypeName": entity, "actionName": action}
    entity_body: dict[str, Any] = {"_id": "1"}
    if template is not None:
        entity_body["_template"] = {"name": template}
    return Notification(metadata, {"entity": entity_body}, entity_body, None)


def pre_view(api_id: str = API_ID, entity: str = "patient") -> PreInterception:
    payload = {
        "apiId": api_id,
        "entityName": entity,
        "method": "PATCH",
        "initiatorData": {},
        "request": {
            "path": "/p",
            "queryParameters": {},
            "headers": {},
            "body": {},
            "pathVariables": [],
        },
    }
    view = interception_view(HookType.INTERCEPTOR_PRE, payload)
    assert isinstance(view, PreInterception)
    return view


def test_a_duplicate_route_names_both_handlers() -> None:
    router = Router().pre(first, api_id=API_ID)
    with pytest.raises(RouteError) as caught:
        router.pre(second, api_id=API_ID, order=3)
    message = str(caught.value)
    assert "\n" not in message
    assert "test_routing.first" in message
    assert "test_routing.second" in message
    assert "PRE_REQUEST" in message


def test_duplicate_notification_and_nonspecific_routes_are_refused() -> None:
    router = Router().notification(first, entity="patient", action="_create")
    with pytest.raises(RouteError, match="duplicate route NOTIFICATION patient/_create"):
        router.notification(second, entity="patient", action="_create")
    router.nonspecific(first)
    with pytest.raises(RouteError, match="duplicate route NONSPECIFIC"):
        router.nonspecific(second)


def test_the_handler_comes_first() -> None:
    with pytest.raises(RouteError, match="handler must come first"):
        Router().notification("patient", entity="_create", action="x")  # type: ignore[arg-type]


def test_an_interceptor_route_names_an_api_id_or_an_entity() -> None:
    with pytest.raises(RouteError, match="give api_id or entity"):
        Router().pre(first)
    with pytest.raises(RouteError, match="give api_id or entity"):
        Router().post(first, api_id=API_ID, entity="patient")
    with pytest.raises(RouteError, match="order must be an int"):
        Router().adapt_entity(first, entity="patient", order="1")  # type: ignore[arg-type]
    with pytest.raises(RouteError, match="non-empty"):
        Router().notification(first, entity="", action="_create")


def test_routes_are_data_with_their_order() -> None:
    router = (
        Router()
        .notification(first, entity="patient", action="_update", template="Patient")
        .pre(first, api_id=API_ID, order=2)
        .adapt_entity(second, entity="patient")
        .nonspecific(second)
    )
    routes = list(router)
    assert len(router) == 4
    assert [r.hook for r in routes] == [
        HookType.NOTIFICATION,
        HookType.INTERCEPTOR_PRE,
        HookType.INTERCEPTOR_POST_ENTITY,
        HookType.NONSPECIFIC,
    ]
    assert routes[1] == Route(HookType.INTERCEPTOR_PRE, first, api_id=API_ID, order=2)
    assert routes[1].order == 2
    assert [r.describe() for r in routes] == [
        "NOTIFICATION patient/_update template=Patient",
        f"PRE_REQUEST apiId={API_ID} order=2",
        "ADAPT_ENTITY entity=patient",
        "NONSPECIFIC",
    ]
    assert routes[0].handler_name == "tests.test_routing.first"
    assert [r.subscribable for r in routes] == [True, True, True, False]


def test_only_what_biot_can_subscribe_is_subscribable() -> None:
    router = (
        Router()
        .pre(first, entity="patient")
        .post(first, api_id=API_ID)
        .adapt_entity(first, api_id=API_ID)
        .notification(first, entity="*", action="_create")
    )
    assert [r.subscribable for r in router] == [False, True, False, False]


def test_notification_lookup_prefers_the_most_specific_route() -> None:
    router = (
        Router()
        .notification(first, entity="patient", action="_update", template="Patient")
        .notification(second, entity="patient", action="*")
    )
    hook = HookType.NOTIFICATION
    assert router.find(hook, notification("patient", "_update", "Patient")) is first
    assert router.find(hook, notification("patient", "_update", "Other")) is second
    assert router.find(hook, notification("device", "_update")) is None
    assert not list(router)[1].subscribable


def test_interceptor_lookup_by_api_id_then_entity() -> None:
    router = Router().pre(first, api_id=API_ID).pre(second, entity="patient")
    hook = HookType.INTERCEPTOR_PRE
    assert router.find(hook, pre_view()) is first
    assert router.find(hook, pre_view(api_id="GET/x")) is second
    assert router.find(hook, pre_view(api_id="GET/x", entity="device")) is None
    assert router.find(HookType.INTERCEPTOR_POST, pre_view()) is None
    assert router.find(HookType.NONSPECIFIC, NonSpecific({}, {})) is None


def test_include_merges_routers_and_still_refuses_duplicates() -> None:
    part = Router().pre(first, api_id=API_ID).nonspecific(first)
    whole = Router().include(part)
    assert len(whole) == 2
    with pytest.raises(RouteError, match="duplicate"):
        whole.include(Router().pre(second, api_id=API_ID))


# ---------------------------------------------------------------- loading a plugin


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Iterator[Path]:
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.startswith("plugin_")]:
            del sys.modules[name]


def write(directory: Path, name: str, text: str) -> None:
    (directory / f"{name}.py").write_text(text)


def test_load_routes_calls_the_factory(plugin_dir: Path) -> None:
    write(
        plugin_dir,
        "plugin_ok",
        "from worker import Router\n"
        "async def h(view, ctx):\n    return None\n"
        "def routes():\n    return Router().nonspecific(h)\n",
    )
    assert len(load_routes("plugin_ok:routes")) == 1


@pytest.mark.parametrize(
    ("source", "reference", "expected"),
    [
        ("def routes(:\n", "plugin_syntax:routes", "plugin_syntax.py:1: SyntaxError"),
        (
            "import os\nimport plugin_no_such_dependency\n",
            "plugin_dep:routes",
            "plugin_dep.py:2: ModuleNotFoundError",
        ),
        ("x = 1\n\n\nraise RuntimeError('boom')\n", "plugin_raises:routes", "plugin_raises.py:4"),
        ("x = 1\n", "plugin_nofunc:routes", "plugin_nofunc has no routes()"),
        ("def routes():\n    return 42\n", "plugin_notrouter:routes", "routes() returned int"),
        (
            "from worker import Router\n"
            "async def a(v, c): ...\n"
            "def routes():\n"
            "    return Router().nonspecific(a).nonspecific(a)\n",
            "plugin_dup:routes",
            "duplicate route NONSPECIFIC",
        ),
    ],
)
def test_load_routes_errors_are_one_line(
    plugin_dir: Path, source: str, reference: str, expected: str
) -> None:
    write(plugin_dir, reference.split(":")[0], source)
    with pytest.raises(RouteError) as caught:
        load_routes(reference)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"WORKER_ROUTES={reference}: ")
    assert expected in message


def test_load_routes_names_a_missing_module() -> None:
    with pytest.raises(RouteError, match="no module named 'plugin_absent'"):
        load_routes("plugin_absent:routes")
