"""``biot-worker deploy`` against a BioT stand-in this file owns (loopback only).

:class:`StandIn` serves the BioT APIs the deploy tools call, as BioT's specs describe them
(user login, ``/settings/v2/plugins`` with multipart create and partial update,
``/settings/v1/interceptions`` paged, the dispatcher's subscriptions with 409 on a duplicate
notification) and records every request, so the tests assert exactly what was sent: the
subscriptions of the routes, no POST/PATCH/DELETE in a dry run or after a refused ``apiId``,
and no password or token in any output.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import socket
import sys
import threading
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from config.settings import SettingsError
from tests import fixture_plugin, other_plugin
from tests.fixture_plugin import PATCH_PATIENT
from tests.test_emulator_plugins import StandInHost
from worker import Router
from worker.deploy.admin import (
    AdminConfigError,
    BiotAdmin,
    BiotAdminError,
    Credentials,
    credentials_from,
    open_admin,
    tool_settings,
)
from worker.deploy.deploy import (
    DeployError,
    DeployOptions,
    check_name,
    check_targets,
    deploy,
    python_version_of,
    zip_file,
)
from worker.deploy.subscribe import subscribe, unsubscribe
from worker.deploy.subscriptions import subscriptions_of

USERNAME = "admin@example.com"
PASSWORD = "s3cret-Passw0rd!"  # the stand-in's own fake
TOKEN = "eyJhbGciOiJSUzUxMiJ9.stand-in-user-token.signature"
ZIP = b"PK\x03\x04 a plugin zip"
KNOWN_APIS = [
    ("patient", "organization", PATCH_PATIENT),
    ("patient", "organization", "GET/organization/v1/users/patients/{id}"),
    ("patient", "organization", "POST/organization/v1/users/patients"),
    ("caregiver", "organization", "GET/organization/v1/users/caregivers/{id}"),
    ("device", "device", "POST/device/v1/devices"),
    ("generic-entity", "generic-entity", other_plugin.CREATE_GENERIC_ENTITY),
]
WRITES = ("POST", "PATCH", "DELETE")


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    json: Any = None
    parts: dict[str, bytes] = field(default_factory=dict)


class StandIn:
    """A BioT stand-in on 127.0.0.1: records requests, serves state, fails on request."""

    def __init__(self, *, extra_apis: int = 0) -> None:
        self.requests: list[Recorded] = []
        self.plugins: dict[str, dict[str, Any]] = {}
        self.codes: dict[str, bytes] = {}
        self.subscriptions: dict[str, list[dict[str, Any]]] = {
            "notifications": [],
            "interceptions": [],
        }
        self.known = [
            {"entityTypeName": e, "servicePrefix": s, "apiId": a} for e, s, a in KNOWN_APIS
        ] + [
            {"entityTypeName": "generic-entity", "servicePrefix": "x", "apiId": f"GET/x/v1/n{i}"}
            for i in range(extra_apis)
        ]
        self.fail: dict[tuple[str, str], tuple[int, str, str]] = {}
        self.hide_from_search = False
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._ids = 0

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> str:
        app = web.Application(middlewares=[self._record])
        app.add_routes(
            [
                web.post("/ums/v2/users/login", self._login),
                web.get("/settings/v1/interceptions", self._interceptions),
                web.get("/settings/v2/plugins", self._search_plugins),
                web.post("/settings/v2/plugins", self._create),
                web.get("/settings/v2/plugins/{name}", self._get),
                web.patch("/settings/v2/plugins/{name}", self._update),
                web.delete("/settings/v2/plugins/{name}", self._delete),
                web.post("/dispatcher/v1/hooks/{kind}/subscribe", self._subscribe),
                web.post("/dispatcher/v1/hooks/{kind}/unsubscribe", self._unsubscribe),
                web.get("/dispatcher/v1/hooks/{kind}", self._search_hooks),
                web.get("/hang", self._hang),
            ]
        )
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # ------------------------------------------------------------ what was sent

    def writes(self) -> list[Recorded]:
        return [r for r in self.requests if r.method in WRITES and r.path != "/ums/v2/users/login"]

    def calls(self, method: str, prefix: str = "") -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path.startswith(prefix)]

    # ------------------------------------------------------------ handlers

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        record = Recorded(request.method, request.path, dict(request.headers))
        if request.content_type == "application/json":
            record.json = orjson.loads(await request.read())
        elif request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            async for part in reader:
                assert isinstance(part, aiohttp.BodyPartReader)
                record.parts[part.name or ""] = await part.read()
        self.requests.append(record)
        failure = self.fail.get((request.method, request.path))
        if failure is not None:
            return _error(*failure)
        guarded = request.path.startswith(("/settings/", "/dispatcher/"))
        if guarded and request.headers.get("authorization") != f"Bearer {TOKEN}":
            return _error(401, "TOKEN_NOT_VALID", "token missing or not valid")
        return await handler(request)

    def _last(self) -> Recorded:
        return self.requests[-1]

    async def _login(self, request: web.Request) -> web.Response:
        body = self._last().json or {}
        if body.get("username") != USERNAME or body.get("password") != PASSWORD:
            return _error(403, "LOGIN_FAILED", "wrong username or password")
        jwt = {"token": TOKEN, "expiration": "2030-01-01T00:00:00.000Z"}
        return web.json_response(
            {"userId": "u-1", "ownerOrganizationId": "o-1", "accessJwt": jwt, "refreshJwt": jwt}
        )

    async def _interceptions(self, request: web.Request) -> web.Response:
        return _page(self.known, request)

    async def _search_plugins(self, request: web.Request) -> web.Response:
        return _page(list(self.plugins.values()), request)

    async def _get(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.plugins:
            return _error(404, "PLUGIN_NOT_FOUND", f"plugin {name} not found")
        return web.json_response(self.plugins[name])

    async def _create(self, request: web.Request) -> web.Response:
        parts = self._last().parts
        config = orjson.loads(parts["config"])
        name = config["name"]
        if name in self.plugins:
            return _error(409, "PLUGIN_ALREADY_EXISTS", f"plugin {name} exists")
        self.plugins[name] = {
            **config,
            "endpointUrl": f"https://plugins.example/Plugin-{name}",
            "linkToConsole": "https://console.example",
            "creationTime": "2026-01-01T00:00:00Z",
            "lastModifiedTime": "2026-01-01T00:00:00Z",
        }
        if "code" in parts:
            self.codes[name] = parts["code"]
        return web.json_response(self.plugins[name], status=201)

    async def _update(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.plugins:
            return _error(404, "PLUGIN_NOT_FOUND", f"plugin {name} not found")
        parts = self._last().parts
        config = orjson.loads(parts["config"])
        plugin = self.plugins[name]
        version = config.get("version", plugin["version"])
        if "code" in parts and version <= plugin["version"]:
            return _error(400, "PLUGIN_VERSION_MUST_BE_LARGER_WHEN_UPDATING_CODE", "version")
        if "code" not in parts and version != plugin["version"]:
            return _error(400, "PLUGIN_VERSION_MUST_NOT_BE_CHANGED_WHEN_NOT_UPDATING_CODE", "v")
        for key, value in config.items():
            if key == "subscriptions":
                merged = dict(plugin.get("subscriptions") or {})
                merged.update({k: v for k, v in value.items() if v is not None})
                plugin["subscriptions"] = merged
            else:
                plugin[key] = value
        if "code" in parts:
            self.codes[name] = parts["code"]
        return web.json_response(plugin)

    async def _delete(self, request: web.Request) -> web.Response:
        self.plugins.pop(request.match_info["name"], None)
        return web.Response(status=204)

    async def _subscribe(self, request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        body = dict(self._last().json)
        held = self.subscriptions[kind]
        same = [s for s in held if _same(kind, s, body)]
        if kind == "notifications" and same:
            return _error(409, "SUBSCRIPTION_ALREADY_EXISTS", "already subscribed")
        if same:
            same[0]["executionOrder"] = body.get("executionOrder", same[0]["executionOrder"])
            return web.json_response(same[0], status=201)
        self._ids += 1
        item = {"id": f"s-{self._ids}", **body}
        if kind == "interceptions":
            item.setdefault("executionOrder", 100)
            item.setdefault("pathFilters", {})
        held.append(item)
        return web.json_response(item, status=201)

    async def _unsubscribe(self, request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        body = self._last().json
        held = self.subscriptions[kind]
        same = [s for s in held if _same(kind, s, body)]
        if not same:
            return _error(404, "SUBSCRIBER_NOT_FOUND", "no such subscription")
        held.remove(same[0])
        return web.Response(status=204)

    async def _search_hooks(self, request: web.Request) -> web.Response:
        items = [] if self.hide_from_search else self.subscriptions[request.match_info["kind"]]
        search = orjson.loads(request.query.get("searchRequest", "{}"))
        wanted = ((search.get("filter") or {}).get("endpoint") or {}).get("eq")
        matching = [s for s in items if wanted is None or s["endpoint"] == wanted]
        return _page(matching, request)

    async def _hang(self, request: web.Request) -> web.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def _same(kind: str, a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = (
        ("entityTypeName", "actionName", "endpoint", "templateName")
        if kind == "notifications"
        else ("type", "apiId", "entityName", "endpoint")
    )
    return all(a.get(k) == b.get(k) for k in keys)


def _page(items: list[dict[str, Any]], request: web.Request) -> web.Response:
    search = orjson.loads(request.query.get("searchRequest", "{}"))
    page, limit = search.get("page", 0), min(search.get("limit", 100), 100)
    data = items[page * limit : (page + 1) * limit]
    metadata = {"page": {"totalResults": len(items), "page": page, "limit": limit}}
    return web.json_response({"data": data, "metadata": metadata})


def _error(status: int, code: str, message: str) -> web.Response:
    body = {
        "code": code,
        "message": message,
        "serviceName": "stand-in",
        "traceId": "0" * 32,
        "environment": "test",
        "details": {},
    }
    return web.json_response(body, status=status)


# ---------------------------------------------------------------- fixtures


@pytest.fixture
async def biot() -> AsyncIterator[StandIn]:
    stand_in = StandIn()
    await stand_in.start()
    try:
        yield stand_in
    finally:
        await stand_in.stop()


@contextlib.contextmanager
def stand_in_thread() -> Iterator[StandIn]:
    """The stand-in on its own loop in a thread, for tests that run the CLI as a process."""
    stand_in = StandIn()
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(stand_in.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10), "the stand-in did not start"
    try:
        yield stand_in
    finally:
        asyncio.run_coroutine_threadsafe(stand_in.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def credentials(stand_in: StandIn, password: str = PASSWORD) -> Credentials:
    return Credentials(base_url=stand_in.url, username=USERNAME, password=password)


class Output:
    def __init__(self) -> None:
        self.out = io.StringIO()
        self.warnings: list[str] = []

    def warn(self, line: str) -> None:
        self.warnings.append(line)

    @property
    def text(self) -> str:
        return self.out.getvalue() + "\n".join(self.warnings)


class Code:
    """A code source that counts its calls."""

    def __init__(self, data: bytes = ZIP) -> None:
        self.data, self.runtimes = data, list[str]()

    async def __call__(self, runtime: str) -> bytes:
        self.runtimes.append(runtime)
        return self.data


async def run(
    stand_in: StandIn, routes: Router, options: DeployOptions, code: Code | None = None
) -> tuple[dict[str, Any] | None, Output]:
    output = Output()
    async with open_admin(credentials(stand_in)) as admin:
        answer = await deploy(
            admin, routes, options, code or Code(), out=output.out, warn=output.warn
        )
    return answer, output


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text
        assert TOKEN not in text
        assert "stand-in-user-token" not in text


# ---------------------------------------------------------------- create, update


async def test_create_sends_the_zip_and_the_routes_subscriptions(
    biot: StandIn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    code = Code()
    options = DeployOptions(name="my-plugin", env={"API_URL": "https://x"}, timeout=30)
    answer, output = await run(biot, fixture_plugin.build_routes(), options, code)
    posts = biot.calls("POST", "/settings/v2/plugins")
    assert len(posts) == 1 and not biot.calls("PATCH") and not biot.calls("DELETE")
    assert posts[0].parts["code"] == ZIP
    config = orjson.loads(posts[0].parts["config"])
    assert config == {
        "name": "my-plugin",
        "displayName": "my-plugin",
        "version": 1,
        "runtime": "python3.12",
        "handler": "index.handler",
        "timeout": 30,
        "memorySize": 128,
        "environmentVariables": {"API_URL": "https://x"},
        "subscriptions": subscriptions_of(fixture_plugin.build_routes()).config,
        "enabledState": "ENABLED",
        "deploymentPackageType": "ZIP",
    }
    assert config["subscriptions"]["interceptions"] == [
        {"type": "ADAPT_ENTITY", "entityTypeName": "patient", "order": 1},
        {"type": "POST_REQUEST", "apiId": PATCH_PATIENT, "order": 1},
        {"type": "PRE_REQUEST", "apiId": PATCH_PATIENT, "order": 1},
    ]
    assert code.runtimes == ["python3.12"]
    assert answer is not None
    assert output.out.getvalue().splitlines()[-1] == (
        "endpointUrl: https://plugins.example/Plugin-my-plugin"
    )
    assert "  + interception PRE_REQUEST apiId=" + PATCH_PATIENT + " order=1" in output.text
    assert "  + env API_URL" in output.text and "https://x" not in output.text
    # Every call after the login carried the user's token, and one trace.
    traces = {r.headers["traceparent"].split("-")[1] for r in biot.requests}
    assert len(traces) == 1
    assert "authorization" not in {k.lower() for k in biot.requests[0].headers}
    assert_no_secret(output.text, caplog.text)


async def test_update_sends_new_code_with_the_next_version_and_replaces_subscriptions(
    biot: StandIn,
) -> None:
    await run(biot, fixture_plugin.build_routes(), DeployOptions(name="p1"))
    biot.requests.clear()
    changed = Router()
    changed.pre(fixture_plugin.pre_patient, api_id=PATCH_PATIENT, order=2)
    changed.notification(fixture_plugin.on_patient, entity="patient", action="_create")
    answer, output = await run(biot, changed, DeployOptions(name="p1", memory=256))
    assert not biot.calls("POST", "/settings") and not biot.calls("DELETE")
    (patch,) = biot.calls("PATCH")
    assert patch.path == "/settings/v2/plugins/p1"
    assert patch.parts["code"] == ZIP
    config = orjson.loads(patch.parts["config"])
    assert config == {
        "version": 2,
        "memorySize": 256,
        "subscriptions": {
            "interceptionOrder": 1,
            "interceptions": [{"type": "PRE_REQUEST", "apiId": PATCH_PATIENT, "order": 2}],
            "notifications": [{"entityTypeName": "patient", "actionName": "_create"}],
        },
    }
    assert biot.plugins["p1"]["subscriptions"] == config["subscriptions"]
    assert answer is not None and answer["version"] == 2
    lines = output.out.getvalue().splitlines()
    for expected in (
        "  version: 1 -> 2",
        "  memorySize: 128 -> 256",
        f"  + interception PRE_REQUEST apiId={PATCH_PATIENT} order=2",
        f"  - interception PRE_REQUEST apiId={PATCH_PATIENT} order=1",
        f"  - interception POST_REQUEST apiId={PATCH_PATIENT} order=1",
        "  - interception ADAPT_ENTITY entityTypeName=patient order=1",
        "  - notification patient/_update",
        "updated plugin p1 (version 2)",
    ):
        assert expected in lines
    assert "  + notification patient/_create" not in lines


async def test_update_env_replaces_the_custom_set_and_shows_keys_only(biot: StandIn) -> None:
    env = {"KEEP": "1", "CHANGE": "old-value", "DROP": "x"}
    await run(biot, fixture_plugin.build_routes(), DeployOptions(name="p", env=env))
    biot.plugins["p"]["environmentVariables"]["BIOT_BASE_URL"] = "system-managed"
    biot.requests.clear()
    new_env = {"KEEP": "1", "CHANGE": "new-value", "ADD": "y"}
    _, output = await run(biot, fixture_plugin.build_routes(), DeployOptions(name="p", env=new_env))
    (patch,) = biot.calls("PATCH")
    config = orjson.loads(patch.parts["config"])
    assert config["environmentVariables"] == new_env
    lines = output.out.getvalue().splitlines()
    assert "  + env ADD" in lines and "  - env DROP" in lines
    assert "  ~ env CHANGE (value changed)" in lines
    assert not any("BIOT_BASE_URL" in line for line in lines)
    assert "new-value" not in output.text and "old-value" not in output.text
    assert "  subscriptions: unchanged" in lines


async def test_update_without_env_keeps_it(biot: StandIn) -> None:
    await run(biot, fixture_plugin.build_routes(), DeployOptions(name="p", env={"A": "1"}))
    await run(biot, fixture_plugin.build_routes(), DeployOptions(name="p"))
    config = orjson.loads(biot.calls("PATCH")[0].parts["config"])
    assert "environmentVariables" not in config
    assert biot.plugins["p"]["environmentVariables"] == {"A": "1"}
    assert biot.plugins["p"]["version"] == 2


async def test_update_keeps_the_deployed_runtime_unless_one_is_given(biot: StandIn) -> None:
    routes = fixture_plugin.build_routes()
    _, created = await run(biot, routes, DeployOptions(name="p", runtime="python3.11"))
    assert "plugin p: new, will be created (version 1, python3.11)" in created.text
    await run(biot, routes, DeployOptions(name="p"))
    assert "runtime" not in orjson.loads(biot.calls("PATCH")[0].parts["config"])
    assert biot.plugins["p"]["runtime"] == "python3.11"
    biot.requests.clear()
    _, moved = await run(biot, routes, DeployOptions(name="p", runtime="python3.12"))
    assert orjson.loads(biot.calls("PATCH")[0].parts["config"])["runtime"] == "python3.12"
    assert "  runtime: python3.11 -> python3.12" in moved.text.splitlines()


async def test_a_zip_built_for_another_python_than_the_runtime_is_refused(
    tmp_path: Any,
) -> None:
    """Its extension modules would not import: the plugin could not start on BioT."""
    path = tmp_path / "plugin.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("index.py", "")
        archive.writestr("cryptography/hazmat/bindings/_rust.abi3.so", b"")  # any CPython
        archive.writestr("orjson/orjson.cpython-311-x86_64-linux-gnu.so", b"")
    read = zip_file(path)
    assert await read("python3.11") == path.read_bytes()
    with pytest.raises(DeployError) as refused:
        await read("python3.12")
    assert refused.value.lines == [
        f"--zip {path}: built for CPython 3.11 (orjson/orjson.cpython-311-x86_64-linux-gnu.so), "
        "but the runtime is python3.12: package it with --python-version 3.12, or deploy it "
        "with --runtime python3.11"
    ]
    path.write_bytes(b"not a zip")
    with pytest.raises(DeployError, match="not a ZIP file"):
        await read("python3.11")


# ---------------------------------------------------------------- refusing, dry run


async def test_unknown_api_id_is_refused_before_anything_is_created(biot: StandIn) -> None:
    router = fixture_plugin.build_routes()
    router.pre(fixture_plugin.pre_patient, api_id="PATCH/organization/v1/users/patient/{id}")
    router.notification(fixture_plugin.on_patient, entity="patiant", action="_delete")
    code = Code()
    with pytest.raises(DeployError) as caught:
        await run(biot, router, DeployOptions(name="p"), code)
    assert biot.writes() == [] and code.runtimes == []
    assert not biot.calls("GET", "/settings/v2/plugins")
    assert caught.value.lines == [
        "unknown apiId PATCH/organization/v1/users/patient/{id} (PRE_REQUEST): BioT does not "
        f"list it; closest known: {PATCH_PATIENT}, GET/organization/v1/users/patients/{{id}}, "
        "POST/organization/v1/users/patients",
        "unknown entity type patiant (notification _delete): BioT does not list it; closest "
        "known: patient",
    ]


def test_check_targets_accepts_a_concrete_path_parameter_and_rejects_a_renamed_one() -> None:
    known = [{"entityTypeName": "patient", "servicePrefix": "o", "apiId": PATCH_PATIENT}]

    def subs(api_id: str) -> dict[str, Any]:
        return {"interceptions": [{"type": "PRE_REQUEST", "apiId": api_id}], "notifications": []}

    assert check_targets(subs(PATCH_PATIENT), known) == []
    assert check_targets(subs("PATCH/organization/v1/users/patients/1234"), known) == []
    assert check_targets(subs("PATCH/organization/v1/users/patients/{patientId}"), known)
    assert check_targets(subs("PATCH/organization/v1/users/patients/1/x"), known)
    assert check_targets(subs("PATCH/organization/v1/users/patients/"), known)
    far = check_targets(subs("DELETE/zzz"), known)
    assert far == [
        "unknown apiId DELETE/zzz (PRE_REQUEST): BioT does not list it; none of the 1 BioT "
        "lists is close"
    ]


async def test_every_page_of_the_interceptions_list_is_read(biot: StandIn) -> None:
    biot.known = [
        {"entityTypeName": "generic-entity", "servicePrefix": "x", "apiId": f"GET/x/v1/n{i}"}
        for i in range(250)
    ] + biot.known
    async with open_admin(credentials(biot)) as admin:
        listed = await admin.interceptions()
    assert len(listed) == 250 + len(KNOWN_APIS)
    assert len(biot.calls("GET", "/settings/v1/interceptions")) == 3


async def test_dry_run_changes_nothing_and_shows_config_and_difference(biot: StandIn) -> None:
    await run(biot, fixture_plugin.build_routes(), DeployOptions(name="p", env={"K": "secret"}))
    biot.requests.clear()
    code = Code()
    options = DeployOptions(name="p", env={"K": "other"}, dry_run=True, timeout=10)
    answer, output = await run(biot, other_plugin.build_routes(), options, code)
    assert answer is None and code.runtimes == [] and biot.writes() == []
    text = output.out.getvalue()
    assert "plugin p: exists, will be updated with new code" in text
    assert "  timeout: 60 -> 10" in text and "  ~ env K (value changed)" in text
    assert "  + notification device/_create" in text and "  - notification patient/_create" in text
    assert '"K": "***"' in text and "secret" not in text and "other" not in text
    assert text.splitlines()[-1] == "dry run: nothing was changed"
    assert biot.plugins["p"]["version"] == 1


async def test_dry_run_of_a_new_plugin(biot: StandIn) -> None:
    answer, output = await run(
        biot, fixture_plugin.build_routes(), DeployOptions(name="new", dry_run=True)
    )
    assert answer is None and biot.writes() == [] and biot.plugins == {}
    assert "plugin new: new, will be created (version 1, python3.12)" in output.text
    assert '"deploymentPackageType": "ZIP"' in output.text


async def test_unsupported_routes_are_warned_and_deploy_goes_on(biot: StandIn) -> None:
    router = fixture_plugin.build_routes()
    router.notification(fixture_plugin.on_patient, entity="*", action="_delete")
    _, output = await run(biot, router, DeployOptions(name="p"))
    assert len(output.warnings) == 1 and "NOTIFICATION */_delete" in output.warnings[0]
    assert len(biot.calls("POST", "/settings/v2/plugins")) == 1


# ---------------------------------------------------------------- BioT's errors, credentials


async def test_biot_error_is_its_code_and_message_in_one_line(biot: StandIn) -> None:
    biot.fail[("POST", "/settings/v2/plugins")] = (
        403,
        "ACCESS_DENIED",
        "no\nSETTINGS_PLUGIN_CREATE",
    )
    with pytest.raises(BiotAdminError) as caught:
        await run(biot, fixture_plugin.build_routes(), DeployOptions(name="p"))
    assert str(caught.value) == "BioT answered 403 ACCESS_DENIED: no SETTINGS_PLUGIN_CREATE"
    assert caught.value.status == 403


async def test_error_without_biot_envelope_still_one_line(biot: StandIn) -> None:
    async with aiohttp.ClientSession() as session:
        admin = BiotAdmin(session, biot.url)
        with pytest.raises(BiotAdminError) as caught:
            await admin.get_plugin("x")  # no login: 401 from the stand-in
        assert str(caught.value) == "BioT answered 401 TOKEN_NOT_VALID: token missing or not valid"
        with pytest.raises(BiotAdminError) as caught:
            await admin._call("GET", "/nowhere", auth=False)
        assert str(caught.value) == "BioT answered 404 NOT_FOUND: GET /nowhere failed"


async def test_wrong_password_is_login_failed_without_the_password(biot: StandIn) -> None:
    with pytest.raises(BiotAdminError) as caught:
        async with open_admin(credentials(biot, password="wrong-" + PASSWORD)):
            pass
    assert str(caught.value) == "BioT answered 403 LOGIN_FAILED: wrong username or password"
    assert PASSWORD not in repr(caught.value) and PASSWORD not in str(caught.value)
    assert biot.writes() == []


async def test_a_call_that_never_answers_times_out(biot: StandIn) -> None:
    async with aiohttp.ClientSession() as session:
        admin = BiotAdmin(session, biot.url, call_timeout=0.3)
        with pytest.raises(BiotAdminError) as caught:
            await asyncio.wait_for(admin._call("GET", "/hang", auth=False), 10)
    assert caught.value.status == 0 and "no answer in time" in str(caught.value)


async def test_unreachable_biot_is_one_line() -> None:
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    creds = Credentials(base_url=f"http://127.0.0.1:{port}", username="u", password=PASSWORD)
    with pytest.raises(BiotAdminError) as caught:
        async with open_admin(creds):
            pass
    assert caught.value.status == 0 and str(caught.value).startswith("BioT could not be reached")
    assert "\n" not in str(caught.value) and PASSWORD not in str(caught.value)


def test_credentials_come_from_the_environment_and_name_what_is_missing() -> None:
    env = {"BIOT_BASE_URL": "https://api.example/", "BIOT_USERNAME": "u", "BIOT_PASSWORD": PASSWORD}
    creds = credentials_from(tool_settings(env), env)
    assert creds == Credentials("https://api.example", "u", PASSWORD)
    assert PASSWORD not in repr(creds)
    with pytest.raises(AdminConfigError, match=r"^BIOT_PASSWORD not set"):
        credentials_from(tool_settings(env), {**env, "BIOT_PASSWORD": ""})
    with pytest.raises(AdminConfigError, match=r"^BIOT_USERNAME and BIOT_PASSWORD not set"):
        credentials_from(tool_settings(env), {})
    with pytest.raises(AdminConfigError, match=r"^BIOT_BASE_URL is not set"):
        credentials_from(tool_settings({}), env)


def test_tool_settings_check_values_but_ask_for_no_service_user() -> None:
    settings = tool_settings(
        {"BIOT_BASE_URL": "https://api.example/", "WORKER_CA_BUNDLE": "/ca.pem"},
        {"WORKER_ROUTES": "tests.fixture_plugin:build_routes"},
    )
    assert settings.biot.base_url == "https://api.example"
    assert settings.worker.ca_bundle == "/ca.pem"
    assert settings.worker.routes == "tests.fixture_plugin:build_routes"
    with pytest.raises(SettingsError) as caught:
        tool_settings({"BIOT_BASE_URL": "ftp://x", "WORKER_ROUTES": "nocolon"})
    assert caught.value.problems == [
        "WORKER_ROUTES: expected module:function, got 'nocolon'",
        "BIOT_BASE_URL: must start with http:// or https://, got 'ftp://x'",
    ]


async def test_a_bad_ca_bundle_is_a_config_error(tmp_path: Any) -> None:
    bundle = tmp_path / "not-a-bundle.pem"
    bundle.write_text("not PEM")
    creds = Credentials("https://127.0.0.1:9", "u", PASSWORD, ca_bundle=str(bundle))
    with pytest.raises(AdminConfigError, match=r"^WORKER_CA_BUNDLE: cannot load CA bundle"):
        async with open_admin(creds):
            pass


def test_plugin_name_and_runtime_rules() -> None:
    assert check_name("My-Plugin_3") == "My-Plugin_3"
    check_name("a" * 57)
    for bad in ("", "a" * 58, "my plugin", "plugin/x", "é"):
        with pytest.raises(ValueError, match="is not a BioT plugin name"):
            check_name(bad)
    assert python_version_of("python3.11") == "3.11"
    with pytest.raises(ValueError, match="packages Python plugins only"):
        python_version_of("nodejs24.x")


# ---------------------------------------------------------------- against the real emulator


def real_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("index.py", "def handler(event, context):\n    return {}\n")
    return buffer.getvalue()


async def test_deploy_and_subscribe_against_the_emulator() -> None:
    from worker.testing.emulator import Emulator, EmulatorConfig, EmulatorServer
    from worker.testing.emulator.config import DEFAULT_ADMIN_PASSWORD, DEFAULT_ADMIN_USERNAME

    host = StandInHost()  # deployments recorded, not run (test_lambda_host runs zips)
    runtime = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    code = Code(real_zip())
    async with EmulatorServer(Emulator(EmulatorConfig(), function_host=host)) as server:
        creds = Credentials(server.url, DEFAULT_ADMIN_USERNAME, DEFAULT_ADMIN_PASSWORD)
        out = Output()
        async with open_admin(creds) as admin:
            options = DeployOptions(name="fixture", runtime=runtime, env={"A": "1"})
            created = await deploy(
                admin, fixture_plugin.build_routes(), options, code, out=out.out, warn=out.warn
            )
            assert created is not None and created["version"] == 1
            endpoint = created["endpointUrl"]
            assert host.functions["fixture"]["code"] == code.data
            deployed = await admin.get_plugin("fixture")
            assert deployed is not None
            wanted = subscriptions_of(fixture_plugin.build_routes()).config
            assert deployed["subscriptions"]["interceptions"] == wanted["interceptions"]
            assert deployed["subscriptions"]["notifications"] == wanted["notifications"]
            held = await admin.subscriptions("interceptions", endpoint)
            assert len(held) == 3 and {s["executionOrder"] for s in held} == {1}

            # A changed route: the subscriptions follow, with new code at version 2.
            changed = Router().pre(fixture_plugin.pre_patient, api_id=PATCH_PATIENT, order=2)
            updated = await deploy(
                admin, changed, DeployOptions(name="fixture", runtime=runtime), code,
                out=out.out, warn=out.warn,
            )  # fmt: skip
            assert updated is not None and updated["version"] == 2
            assert updated["subscriptions"]["interceptions"] == [
                {"type": "PRE_REQUEST", "apiId": PATCH_PATIENT, "order": 2}
            ]
            assert updated["subscriptions"]["notifications"] == []
            assert await admin.subscriptions("notifications", endpoint) == []

            # A dry run and a refused apiId change nothing.
            dry = DeployOptions(name="fixture", runtime=runtime, dry_run=True)
            assert (
                await deploy(
                    admin, fixture_plugin.build_routes(), dry, code, out=out.out, warn=out.warn
                )
                is None
            )
            typo = Router().pre(fixture_plugin.pre_patient, api_id="PATCH/organization/v1/users/x")
            with pytest.raises(DeployError):
                await deploy(
                    admin,
                    typo,
                    DeployOptions(name="fixture", runtime=runtime),
                    code,
                    out=out.out,
                    warn=out.warn,
                )
            after = await admin.get_plugin("fixture")
            assert after is not None and after["version"] == 2

            # A self-hosted worker: subscribe twice, prune, unsubscribe.
            worker_url = "http://127.0.0.1:9/hooks"
            first = await subscribe(
                admin, fixture_plugin.build_routes(), worker_url, out=out.out, warn=out.warn
            )
            assert len(first.subscribed) == 5
            second = await subscribe(
                admin, fixture_plugin.build_routes(), worker_url, out=out.out, warn=out.warn
            )
            assert not second.changed and len(second.in_place) == 5
            with pytest.raises(DeployError, match="unknown apiId PATCH/organization/v1/users/x"):
                await subscribe(admin, typo, worker_url, out=out.out, warn=out.warn)
            changed = Router()  # a PRE at another order, ADAPT and POST gone, _create only
            changed.notification(fixture_plugin.on_patient, entity="patient", action="_create")
            changed.pre(fixture_plugin.pre_patient, api_id=PATCH_PATIENT, order=2)
            pruned = await subscribe(
                admin, changed, worker_url, prune=True, out=out.out, warn=out.warn
            )
            assert len(pruned.pruned) == 3 and len(pruned.subscribed) == 1
            held_now = [
                (s.get("entityTypeName"), s.get("actionName"), s.get("apiId"),
                 s.get("executionOrder"))
                for kind in ("notifications", "interceptions")
                for s in await admin.subscriptions(kind, worker_url)
            ]  # fmt: skip
            assert sorted(held_now, key=str) == sorted(
                [("patient", "_create", None, None), (None, None, PATCH_PATIENT, 2)], key=str
            )
            assert len(await unsubscribe(admin, worker_url, out=out.out)) == 2
            assert len(await admin.subscriptions("interceptions", endpoint)) == 1
    assert_no_secret(out.text)
    assert DEFAULT_ADMIN_PASSWORD not in out.text
