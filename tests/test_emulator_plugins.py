"""The emulator's admin side (issue 10 point 5): user login, ``/settings/v2/plugins``,
``/settings/v1/interceptions`` and the dispatcher's search by endpoint, over loopback HTTP.

Most tests run plugins on :class:`StandInHost` (records deployments, answers hooks as a pass-through
plugin would); the last ones deploy a real zip on the emulator's own ``LambdaHost``.
"""

from __future__ import annotations

import base64
import io
import ssl
import sys
import zipfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from worker.testing.emulator import Emulator, EmulatorConfig, EmulatorServer
from worker.testing.emulator.cli import describe
from worker.testing.emulator.entities import PATIENT
from worker.testing.emulator.keys import cycling_factory, generate_key
from worker.testing.emulator.lambda_host import RuntimeUnavailable
from worker.testing.emulator.routes import known_api_ids
from worker.testing.emulator.testing import HookCall, pass_through

LOGIN = "/ums/v2/users/login"
SERVICE_LOGIN = "/ums/v2/services/accessToken"
PLUGINS = "/settings/v2/plugins"
INTERCEPTIONS = "/settings/v1/interceptions"
HOOKS = "/dispatcher/v1/hooks"
PATIENTS = "/organization/v1/users/patients"
PATCH_API = "PATCH/organization/v1/users/patients/{id}"
ERROR_KEYS = {"code", "message", "serviceName", "traceId", "environment", "details"}
RUNTIME = f"python{sys.version_info[0]}.{sys.version_info[1]}"


class StandInHost:
    """Contract E's methods, in memory: deployments are recorded, hooks answered unchanged."""

    def __init__(self) -> None:
        self.functions: dict[str, dict[str, Any]] = {}
        self.deploys = 0
        self.calls: list[HookCall] = []
        self.fail: Exception | None = None  # raised by the next deploy
        self.last_env: dict[str, str] = {}

    async def deploy(
        self,
        name: str,
        code: bytes,
        *,
        runtime: str,
        handler: str = "index.handler",
        env: Mapping[str, str],
        timeout: float,  # noqa: ASYNC109 - contract E's signature
    ) -> str:
        if not runtime.startswith("python3."):
            raise RuntimeUnavailable(f"runtime {runtime} is not available on this machine")
        self.last_env = dict(env)
        failure, self.fail = self.fail, None
        if failure is not None:
            raise failure
        self.deploys += 1
        self.functions[name] = {
            "code": code,
            "runtime": runtime,
            "handler": handler,
            "env": dict(env),
            "timeout": timeout,
        }
        return f"/_lambda/{name}/"

    async def remove(self, name: str) -> None:
        self.functions.pop(name, None)

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/_lambda/{name}/{tail:.*}", self._invoke)]

    async def _invoke(self, request: web.Request) -> web.Response:
        if request.match_info["name"] not in self.functions:
            return web.Response(status=404)
        headers = {k.lower(): v for k, v in request.headers.items()}
        call = HookCall(request.path, headers, orjson.loads(await request.read()))
        self.calls.append(call)
        return pass_through(call)


@pytest.fixture(scope="module")
def keys() -> list[rsa.RSAPrivateKey]:
    return [generate_key()]


@pytest.fixture
def host() -> StandInHost:
    return StandInHost()


@pytest.fixture
def emulator(keys: list[rsa.RSAPrivateKey], host: StandInHost) -> Emulator:
    config = EmulatorConfig(plugin_timeout=5.0, notification_grace=1.0)
    return Emulator(config, key_factory=cycling_factory(keys), function_host=host)


@pytest.fixture
async def server(emulator: Emulator) -> AsyncIterator[EmulatorServer]:
    async with EmulatorServer(emulator) as srv:
        yield srv


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


class Admin:
    """The admin user's calls; every raw answer is kept to check that none shows a secret."""

    def __init__(self, http: aiohttp.ClientSession, url: str, token: str) -> None:
        self.http, self.url, self.token = http, url, token
        self.answers: list[bytes] = []

    async def call(
        self, method: str, path: str, *, data: Any = None, params: Any = None
    ) -> tuple[int, Any]:
        headers = {"authorization": f"Bearer {self.token}"}
        async with self.http.request(
            method, self.url + path, data=data, params=params, headers=headers
        ) as response:
            raw = await response.read()
        self.answers.append(raw)
        return response.status, orjson.loads(raw) if raw else None

    async def create(
        self, config: Mapping[str, Any], code: bytes | None = b"zip"
    ) -> tuple[int, Any]:
        return await self.call("POST", PLUGINS, data=form(config, code))

    async def update(
        self, name: str, config: Mapping[str, Any], code: bytes | None = None
    ) -> tuple[int, Any]:
        return await self.call("PATCH", f"{PLUGINS}/{name}", data=form(config, code))

    async def search(self, path: str, search: Mapping[str, Any] | None = None) -> list[Any]:
        params = {"searchRequest": orjson.dumps(search).decode()} if search else None
        status, body = await self.call("GET", path, params=params)
        assert status == 200, body
        data: list[Any] = body["data"]
        return data


def form(config: Mapping[str, Any], code: bytes | None) -> aiohttp.FormData:
    data = aiohttp.FormData()
    if code is not None:
        data.add_field("code", code, filename="plugin.zip", content_type="application/zip")
    data.add_field("config", orjson.dumps(dict(config)).decode(), content_type="application/json")
    return data


def plugin_config(name: str = "my-plugin", **fields: Any) -> dict[str, Any]:
    return {"name": name, "displayName": "My Plugin", "version": 1, "runtime": RUNTIME, **fields}


async def login(http: aiohttp.ClientSession, url: str, username: str, password: str) -> Any:
    async with http.post(url + LOGIN, json={"username": username, "password": password}) as r:
        return r.status, await r.json()


@pytest.fixture
async def admin(http: aiohttp.ClientSession, server: EmulatorServer, emulator: Emulator) -> Admin:
    status, body = await login(http, server.url, emulator.admin_username, emulator.admin_password)
    assert status == 200, body
    return Admin(http, server.url, body["accessJwt"]["token"])


def assert_error(status: int, body: Any, expected_status: int, code: str) -> None:
    assert status == expected_status, body
    assert set(body) == ERROR_KEYS
    assert body["code"] == code


async def dispatcher(admin: Admin, kind: str, endpoint: str) -> list[Any]:
    return await admin.search(f"{HOOKS}/{kind}", {"filter": {"endpoint": {"eq": endpoint}}})


# ---------------------------------------------------------------- user login


async def test_admin_login_answers_tokens_with_the_deploy_permissions(
    http: aiohttp.ClientSession, server: EmulatorServer, emulator: Emulator
) -> None:
    status, body = await login(http, server.url, emulator.admin_username, emulator.admin_password)
    assert status == 200
    assert {"userId", "ownerOrganizationId", "accessJwt", "refreshJwt"} <= set(body)
    assert body["accessJwt"]["expiration"].endswith("Z")
    claims = jwt.decode(body["accessJwt"]["token"], keys_public(emulator), algorithms=["RS512"])
    assert claims["tokenType"] == "USER"
    assert claims["sub"] == body["userId"]
    assert {
        "SETTINGS_PLUGIN_CREATE",
        "SETTINGS_PLUGIN_UPDATE",
        "SETTINGS_SEARCH_INTERCEPTION_SUBSCRIPTION_CONFIGURATIONS",
        "DISPATCHER_SUBSCRIPTIONS_SUBSCRIBE",
        "HOOKS_INTERCEPTION_CREATE",
    } <= set(claims["scopes"])
    # The refresh token is not an access token.
    headers = {"authorization": f"Bearer {body['refreshJwt']['token']}"}
    async with http.get(server.url + PLUGINS, headers=headers) as response:
        assert_error(response.status, await response.json(), 401, "TOKEN_NOT_VALID")


def keys_public(emulator: Emulator) -> Any:
    return load_der_public_key(base64.b64decode(emulator.public_key_b64))


async def test_admin_login_refuses_wrong_credentials(
    http: aiohttp.ClientSession, server: EmulatorServer, emulator: Emulator
) -> None:
    name, password = emulator.admin_username, emulator.admin_password
    for username, secret in ((name, password + "x"), (name + "x", password), (name, "")):
        status, body = await login(http, server.url, username, secret)
        assert_error(status, body, 403, "LOGIN_FAILED")
        assert password not in orjson.dumps(body).decode()
    async with http.post(server.url + LOGIN, json={"password": password}) as response:
        assert_error(response.status, await response.json(), 400, "BAD_REQUEST")
    # The service user is not a user.
    status, body = await login(
        http, server.url, emulator.service_user_id, emulator.service_user_secret
    )
    assert_error(status, body, 403, "LOGIN_FAILED")


async def test_admin_credentials_are_configurable_and_printed(
    keys: list[rsa.RSAPrivateKey],
) -> None:
    config = EmulatorConfig(admin_username="ops@example.com", admin_password="s3cret-dev")
    emulator = Emulator(config, key_factory=cycling_factory(keys), function_host=StandInHost())
    async with EmulatorServer(emulator) as server, aiohttp.ClientSession() as http:
        assert (await login(http, server.url, "ops@example.com", "s3cret-dev"))[0] == 200
        assert (await login(http, server.url, "admin@biot-emulator.local", "x"))[0] == 403
        text = describe(server)
        async with http.get(server.url + "/_emulator/info") as response:
            info = await response.json()
    assert "BIOT_USERNAME=ops@example.com" in text and "BIOT_PASSWORD=s3cret-dev" in text
    assert info["adminUsername"] == "ops@example.com" and info["adminPassword"] == "s3cret-dev"
    with pytest.raises(ValueError, match="admin_username"):
        EmulatorConfig(admin_password="")


async def test_settings_apis_need_the_settings_permissions(
    http: aiohttp.ClientSession, server: EmulatorServer, emulator: Emulator
) -> None:
    credentials = {"id": emulator.service_user_id, "secretKey": emulator.service_user_secret}
    async with http.post(server.url + SERVICE_LOGIN, json=credentials) as response:
        service_token = (await response.json())["accessToken"]
    for token, status, code in (
        (None, 401, "TOKEN_NOT_VALID"),
        (service_token, 403, "ACCESS_DENIED"),
    ):
        headers = {"authorization": f"Bearer {token}"} if token else {}
        for method, path in (("GET", PLUGINS), ("GET", INTERCEPTIONS), ("DELETE", PLUGINS + "/x")):
            async with http.request(method, server.url + path, headers=headers) as response:
                assert_error(response.status, await response.json(), status, code)
        async with http.post(
            server.url + PLUGINS, data=form(plugin_config(), b"zip"), headers=headers
        ) as response:
            assert_error(response.status, await response.json(), status, code)


# ---------------------------------------------------------------- plugins


async def test_create_get_search_delete(
    admin: Admin, host: StandInHost, server: EmulatorServer, emulator: Emulator
) -> None:
    config = plugin_config(environmentVariables={"COLOR": "blue"}, timeout=7)
    status, created = await admin.create(config, b"the zip")
    assert status == 201, created
    endpoint = server.url + "/_lambda/my-plugin/"
    assert created["name"] == "my-plugin" and created["endpointUrl"] == endpoint
    assert created["version"] == 1 and created["runtime"] == RUNTIME
    assert created["handler"] == "index.handler" and created["timeout"] == 7
    assert created["environmentVariables"] == {"COLOR": "blue"}
    assert created["creationTime"].endswith("Z") and created["lastModifiedTime"].endswith("Z")
    assert created["subscriptions"] == {
        "interceptionOrder": 1,
        "interceptions": [],
        "notifications": [],
    }

    function = host.functions["my-plugin"]
    env = function["env"]
    assert function["code"] == b"the zip" and function["timeout"] == 7.0
    assert env["BIOT_BASE_URL"] == server.url and env["BIOT_APP_NAME"] == "My Plugin"
    assert env["BIOT_SERVICE_ENVIRONMENT"] == "emulator" and env["COLOR"] == "blue"
    assert env["BIOT_SERVICE_USER_ID"] != emulator.service_user_id
    assert "WORKER_CA_BUNDLE" not in env
    # The plugin's own service user logs in.
    credentials = {
        "id": env["BIOT_SERVICE_USER_ID"],
        "secretKey": env["BIOT_SERVICE_USER_SECRET_KEY"],
    }
    async with admin.http.post(server.url + SERVICE_LOGIN, json=credentials) as response:
        assert response.status == 200

    assert (await admin.call("GET", PLUGINS + "/my-plugin")) == (200, created)
    status, again = await admin.create(config, b"the zip")
    assert_error(status, again, 409, "PLUGIN_EXISTS_BY_NAME")
    await admin.create(plugin_config("other", displayName="Other"))
    found = await admin.search(PLUGINS, {"filter": {"displayName": {"eq": "My Plugin"}}})
    assert [p["name"] for p in found] == ["my-plugin"]
    assert {p["name"] for p in await admin.search(PLUGINS)} == {"my-plugin", "other"}

    status, _ = await admin.call("DELETE", PLUGINS + "/my-plugin")
    assert status == 204
    status, body = await admin.call("GET", PLUGINS + "/my-plugin")
    assert_error(status, body, 404, "PLUGIN_NOT_FOUND")
    assert_error(*await admin.call("DELETE", PLUGINS + "/my-plugin"), 404, "PLUGIN_NOT_FOUND")
    assert set(host.functions) == {"other"}
    async with admin.http.post(server.url + SERVICE_LOGIN, json=credentials) as response:
        assert response.status == 403  # its service user went with it
    secret = env["BIOT_SERVICE_USER_SECRET_KEY"].encode()
    assert not any(secret in raw or admin.token.encode() in raw for raw in admin.answers)
    assert not any(emulator.admin_password.encode() in raw for raw in admin.answers)


async def test_create_validates_the_configuration(admin: Admin, host: StandInHost) -> None:
    invalid = "PLUGIN_REQUEST_VALIDATION_FAILED"
    cases: list[tuple[dict[str, Any], int, str]] = [
        (plugin_config("x" * 58), 400, invalid),
        (plugin_config("bad name!"), 400, invalid),
        (plugin_config(""), 400, invalid),
        (plugin_config(version=0), 400, invalid),
        (plugin_config(version=32768), 400, invalid),
        (plugin_config(version="1"), 400, invalid),
        (plugin_config(timeout=901), 400, invalid),
        ({"name": "n", "version": 1, "runtime": RUNTIME}, 400, invalid),  # no displayName
        (plugin_config(deploymentPackageType="IMAGE"), 400, invalid),
        (
            plugin_config(environmentVariables={"BIOT_BASE_URL": "x"}),
            400,
            "ENVIRONMENT_VARIABLES_CANNOT_START_WITH_RESERVED_PREFIX",
        ),
        (
            plugin_config(
                subscriptions={"interceptions": [{"type": "PRE_REQUEST", "apiId": "GET/nope"}]}
            ),
            404,
            "INTERCEPTION_CONFIGURATION_NOT_FOUND",
        ),
        (
            plugin_config(subscriptions={"interceptions": [{"type": "PRE_REQUEST"}]}),
            400,
            "INTERCEPTION_MUST_HAVE_CORRECT_API_ID_NULL_VALUE_FOR_TYPE",
        ),
        (
            plugin_config(
                subscriptions={
                    "interceptions": [
                        {"type": "ADAPT_ENTITY", "apiId": PATCH_API, "entityTypeName": "patient"}
                    ]
                }
            ),
            400,
            "INTERCEPTION_MUST_HAVE_CORRECT_API_ID_NULL_VALUE_FOR_TYPE",
        ),
        (
            plugin_config(
                subscriptions={
                    "interceptions": [{"type": "ADAPT_ENTITY", "entityTypeName": "device"}]
                }
            ),
            404,
            "INTERCEPTION_CONFIGURATION_NOT_FOUND",
        ),
        (
            plugin_config(
                subscriptions={
                    "interceptions": [{"type": "PRE_REQUEST", "apiId": PATCH_API, "order": 0}]
                }
            ),
            400,
            invalid,
        ),
        (
            plugin_config(
                subscriptions={
                    "notifications": [{"entityTypeName": "patient", "actionName": "_nope"}]
                }
            ),
            400,
            "INVALID_ACTION_NAME",
        ),
    ]
    for config, status, code in cases:
        assert_error(*await admin.create(config), status, code)
    assert_error(*await admin.create(plugin_config(), code=None), 400, invalid)  # no seed code
    assert host.deploys == 0
    assert await admin.search(PLUGINS) == []
    status, body = await admin.create(plugin_config("x" * 57))
    assert status == 201, body


async def test_a_runtime_the_emulator_cannot_run_is_refused_and_nothing_stored(
    admin: Admin, host: StandInHost, server: EmulatorServer
) -> None:
    subscriptions = {"interceptions": [{"type": "PRE_REQUEST", "apiId": PATCH_API}]}
    status, body = await admin.create(
        plugin_config(runtime="nodejs24.x", subscriptions=subscriptions)
    )
    assert_error(status, body, 400, "PLUGIN_REQUEST_VALIDATION_FAILED")
    assert "nodejs24.x is not available" in body["message"]
    assert_error(*await admin.call("GET", PLUGINS + "/my-plugin"), 404, "PLUGIN_NOT_FOUND")
    assert await dispatcher(admin, "interceptions", server.url + "/_lambda/my-plugin/") == []

    assert (await admin.create(plugin_config(subscriptions=subscriptions)))[0] == 201
    status, body = await admin.update("my-plugin", {"runtime": "java21"})
    assert_error(status, body, 400, "PLUGIN_REQUEST_VALIDATION_FAILED")
    assert (await admin.call("GET", PLUGINS + "/my-plugin"))[1]["runtime"] == RUNTIME
    assert host.functions["my-plugin"]["runtime"] == RUNTIME and host.deploys == 1


async def test_a_function_that_fails_to_start_rolls_back(
    admin: Admin, host: StandInHost, server: EmulatorServer
) -> None:
    host.fail = OSError("no such file")
    status, body = await admin.create(plugin_config())
    assert_error(status, body, 500, "AWS_EXCEPTION")
    assert body["details"] == {"className": "OSError"} and "no such file" in body["message"]
    assert_error(*await admin.call("GET", PLUGINS + "/my-plugin"), 404, "PLUGIN_NOT_FOUND")
    env = host.last_env
    credentials = {
        "id": env["BIOT_SERVICE_USER_ID"],
        "secretKey": env["BIOT_SERVICE_USER_SECRET_KEY"],
    }
    async with admin.http.post(server.url + SERVICE_LOGIN, json=credentials) as response:
        assert response.status == 403  # its service user was removed again
    assert (await admin.create(plugin_config()))[0] == 201  # nothing was left behind
    first = host.functions["my-plugin"]["env"]["BIOT_SERVICE_USER_ID"]

    host.fail = OSError("disk full")
    status, body = await admin.update("my-plugin", {"version": 2}, b"new code")
    assert_error(status, body, 500, "AWS_EXCEPTION")
    status, body = await admin.call("GET", PLUGINS + "/my-plugin")
    assert body["version"] == 1 and host.functions["my-plugin"]["code"] == b"zip"
    assert host.functions["my-plugin"]["env"]["BIOT_SERVICE_USER_ID"] == first


async def test_an_emulator_over_tls_gives_its_plugins_the_ca(
    keys: list[rsa.RSAPrivateKey], tmp_path: Path
) -> None:
    host = StandInHost()
    config = EmulatorConfig(tls=True, tls_dir=str(tmp_path))
    emulator = Emulator(config, key_factory=cycling_factory(keys), function_host=host)
    async with EmulatorServer(emulator) as server:
        context = ssl.create_default_context(cafile=server.ca_file)
        connector = aiohttp.TCPConnector(ssl=context)
        async with aiohttp.ClientSession(connector=connector) as http:
            status, body = await login(
                http, server.url, config.admin_username, config.admin_password
            )
            assert status == 200
            admin = Admin(http, server.url, body["accessJwt"]["token"])
            status, created = await admin.create(plugin_config())
        assert status == 201, created
        assert created["endpointUrl"].startswith("https://")
        env = host.functions["my-plugin"]["env"]
        assert env["WORKER_CA_BUNDLE"] == server.ca_file and env["BIOT_BASE_URL"] == server.url
    assert host.functions == {}  # the emulator's stop removed its plugins


async def test_partial_update(admin: Admin, host: StandInHost, server: EmulatorServer) -> None:
    endpoint = server.url + "/_lambda/my-plugin/"
    subscriptions = {
        "interceptionOrder": 2,
        "interceptions": [{"type": "PRE_REQUEST", "apiId": PATCH_API}],
        "notifications": [{"entityTypeName": "patient", "actionName": "_update"}],
    }
    config = plugin_config(environmentVariables={"A": "1", "B": "2"}, subscriptions=subscriptions)
    status, created = await admin.create(config)
    assert status == 201, created

    status, same = await admin.update("my-plugin", {})
    assert status == 200 and same["subscriptions"] == created["subscriptions"]
    assert same["environmentVariables"] == {"A": "1", "B": "2"} and host.deploys == 1

    status, body = await admin.update("my-plugin", {"subscriptions": {"notifications": []}})
    assert status == 200, body
    assert body["subscriptions"]["interceptions"] == subscriptions["interceptions"]
    assert body["subscriptions"]["notifications"] == [] and host.deploys == 1
    assert await dispatcher(admin, "notifications", endpoint) == []
    [pre] = await dispatcher(admin, "interceptions", endpoint)
    assert pre["apiId"] == PATCH_API and pre["executionOrder"] == 2

    adapt = [{"type": "ADAPT_ENTITY", "entityTypeName": "patient", "order": 5}]
    status, body = await admin.update("my-plugin", {"subscriptions": {"interceptions": adapt}})
    assert body["subscriptions"]["interceptions"] == adapt
    [item] = await dispatcher(admin, "interceptions", endpoint)
    assert (item["type"], item["entityName"], item["executionOrder"]) == (
        "ADAPT_ENTITY",
        "patient",
        5,
    )

    status, body = await admin.update("my-plugin", {"environmentVariables": {"C": "3"}})
    assert body["environmentVariables"] == {"C": "3"} and host.deploys == 2
    env = host.functions["my-plugin"]["env"]
    assert env["C"] == "3" and "A" not in env and env["BIOT_APP_NAME"] == "My Plugin"

    status, body = await admin.update("my-plugin", {"timeout": 10, "displayName": "Renamed"})
    assert (body["timeout"], body["displayName"], host.deploys) == (10, "Renamed", 3)
    assert host.functions["my-plugin"]["env"]["BIOT_APP_NAME"] == "Renamed"
    assert host.functions["my-plugin"]["env"]["C"] == "3"
    status, body = await admin.update(
        "my-plugin", {"environmentVariables": {}, "cors": {"allowOrigins": []}}
    )
    assert body["environmentVariables"] == {} and body["cors"]["allowOrigins"] == []
    assert body["cors"]["allowMethods"] == ["GET", "POST"]
    assert body["lastModifiedTime"] >= created["lastModifiedTime"]
    assert body["creationTime"] == created["creationTime"]
    assert_error(*await admin.update("nope", {}), 404, "PLUGIN_NOT_FOUND")


async def test_version_rules(admin: Admin, host: StandInHost) -> None:
    assert (await admin.create(plugin_config(version=3), b"v3"))[0] == 201
    larger = "PLUGIN_VERSION_MUST_BE_LARGER_WHEN_UPDATING_CODE"
    for config in ({"version": 3}, {"version": 2}, {}):
        status, body = await admin.update("my-plugin", config, b"v4")
        assert_error(status, body, 400, larger)
        assert body["details"]["currentVersion"] == 3
    status, body = await admin.update("my-plugin", {"version": 4})
    assert_error(status, body, 400, "PLUGIN_VERSION_MUST_NOT_BE_CHANGED_WHEN_NOT_UPDATING_CODE")
    assert host.functions["my-plugin"]["code"] == b"v3" and host.deploys == 1

    status, body = await admin.update("my-plugin", {"version": 3, "timeout": 5})
    assert status == 200 and body["version"] == 3  # the same version without code is fine
    status, body = await admin.update("my-plugin", {"version": 4}, b"v4")
    assert status == 200 and body["version"] == 4
    assert host.functions["my-plugin"]["code"] == b"v4"
    status, body = await admin.update("my-plugin", {"timeout": 6})
    assert status == 200 and host.functions["my-plugin"]["code"] == b"v4"  # the code stays


async def test_multipart_is_required_and_checked(admin: Admin, server: EmulatorServer) -> None:
    invalid = "PLUGIN_REQUEST_VALIDATION_FAILED"
    headers = {"authorization": f"Bearer {admin.token}"}
    async with admin.http.post(server.url + PLUGINS, json=plugin_config(), headers=headers) as r:
        assert_error(r.status, await r.json(), 400, invalid)
    no_config = aiohttp.FormData()
    no_config.add_field("code", b"zip", filename="plugin.zip")
    assert_error(*await admin.call("POST", PLUGINS, data=no_config), 400, invalid)
    old_name = aiohttp.FormData()
    old_name.add_field("configuration", orjson.dumps(plugin_config()).decode())
    assert_error(*await admin.call("POST", PLUGINS, data=old_name), 400, invalid)
    bad_json = aiohttp.FormData()
    bad_json.add_field("config", "{not json", content_type="application/json")
    assert_error(*await admin.call("POST", PLUGINS, data=bad_json), 400, invalid)
    assert_error(*await admin.create(plugin_config(), b""), 400, invalid)
    # A zip larger than aiohttp's default 1 MiB request body is fine (Lambda takes 50 MB).
    big = aiohttp.FormData()  # a file object: aiohttp warns about large bytes values
    big.add_field("code", io.BytesIO(b"z" * (3 * 1024 * 1024)), filename="plugin.zip")
    big.add_field("config", orjson.dumps(plugin_config()).decode())
    status, body = await admin.call("POST", PLUGINS, data=big)
    assert status == 201, body


# ---------------------------------------------------------------- subscriptions


async def test_subscriptions_follow_the_plugin_and_its_hooks_are_called(
    admin: Admin, host: StandInHost, server: EmulatorServer, emulator: Emulator
) -> None:
    endpoint = server.url + "/_lambda/my-plugin/"
    pre = {"type": "PRE_REQUEST", "apiId": PATCH_API, "order": 3}
    subscriptions = {
        "interceptions": [pre],
        "notifications": [{"entityTypeName": "patient", "actionName": "_update"}],
    }
    assert (await admin.create(plugin_config(subscriptions=subscriptions)))[0] == 201
    [item] = await dispatcher(admin, "interceptions", endpoint)
    assert (item["type"], item["apiId"], item["executionOrder"]) == ("PRE_REQUEST", PATCH_API, 3)
    [note] = await dispatcher(admin, "notifications", endpoint)
    assert (note["entityTypeName"], note["actionName"]) == ("patient", "_update")

    patient_id = emulator.store.all(PATIENT)[0]["_id"]
    user = {"authorization": f"Bearer {emulator.user_token()}"}
    body = {"_name": {"firstName": "A", "lastName": "B"}}
    async with admin.http.patch(
        f"{server.url}{PATIENTS}/{patient_id}", json=body, headers=user
    ) as r:
        assert r.status == 200, await r.text()
    await emulator.drain_notifications()
    assert [c.hooktype for c in host.calls] == ["INTERCEPTOR_PRE", "NOTIFICATION"]
    assert all(c.path == "/_lambda/my-plugin/" for c in host.calls)

    status, _ = await admin.update("my-plugin", {"subscriptions": {"interceptions": []}})
    assert status == 200 and await dispatcher(admin, "interceptions", endpoint) == []
    assert len(await dispatcher(admin, "notifications", endpoint)) == 1
    assert (await admin.call("DELETE", PLUGINS + "/my-plugin"))[0] == 204
    assert await dispatcher(admin, "notifications", endpoint) == []


async def test_interceptions_list_every_served_api(admin: Admin) -> None:
    items = await admin.search(INTERCEPTIONS)
    assert sorted(i["apiId"] for i in items) == sorted(known_api_ids())
    patch = next(i for i in items if i["apiId"] == PATCH_API)
    assert patch == {
        "entityTypeName": "patient",
        "servicePrefix": "organization",
        "apiId": PATCH_API,
    }
    generic = await admin.search(
        INTERCEPTIONS, {"filter": {"entityTypeName": {"eq": "generic-entity"}}}
    )
    assert generic and all(i["servicePrefix"] == "generic-entity" for i in generic)


async def test_dispatcher_search_by_endpoint(admin: Admin, server: EmulatorServer) -> None:
    one, two = "http://127.0.0.1:9/one", "http://127.0.0.1:9/two"
    for endpoint in (one, two):
        body = {"entityTypeName": "patient", "actionName": "_create", "endpoint": endpoint}
        async with admin.http.post(
            server.url + f"{HOOKS}/notifications/subscribe",
            json=body,
            headers={"authorization": f"Bearer {admin.token}"},
        ) as response:
            assert response.status == 201
        interception = {"type": "PRE_REQUEST", "apiId": PATCH_API, "endpoint": endpoint}
        async with admin.http.post(
            server.url + f"{HOOKS}/interceptions/subscribe",
            json=interception,
            headers={"authorization": f"Bearer {admin.token}"},
        ) as response:
            assert response.status == 201
    for kind in ("notifications", "interceptions"):
        assert [s["endpoint"] for s in await dispatcher(admin, kind, one)] == [one]
        assert len(await admin.search(f"{HOOKS}/{kind}")) == 2


# ---------------------------------------------------------------- a real function


def zipped(files: Mapping[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()


INDEX = """
import base64, json, os, urllib.request

def handler(event, context):
    raw = event.get("body") or ""
    if event.get("isBase64Encoded"):
        raw = base64.b64decode(raw).decode()
    payload = json.loads(raw) if raw else {}
    if event["headers"].get("hooktype") == "INTERCEPTOR_PRE":
        request = payload["request"]
        request["body"]["_name"]["firstName"] += " by " + os.environ["BIOT_APP_NAME"]
        return {"statusCode": 200, "headers": {"content-type": "application/json"},
                "body": json.dumps({"request": request})}
    login = urllib.request.Request(
        os.environ["BIOT_BASE_URL"] + "/ums/v2/services/accessToken",
        data=json.dumps({"id": os.environ["BIOT_SERVICE_USER_ID"],
                         "secretKey": os.environ["BIOT_SERVICE_USER_SECRET_KEY"]}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(login, timeout=10) as answer:
        status = answer.status
    return {"statusCode": 200, "headers": {"content-type": "application/json"}, "body": json.dumps(
        {"login": status, "color": os.environ.get("COLOR"), "env": sorted(os.environ)})}
"""


@pytest.fixture
async def real(keys: list[rsa.RSAPrivateKey]) -> AsyncIterator[tuple[Admin, EmulatorServer]]:
    emulator = Emulator(
        EmulatorConfig(plugin_timeout=20.0, notification_grace=1.0),
        key_factory=cycling_factory(keys),
    )
    async with (
        EmulatorServer(emulator) as server,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http,
    ):
        status, body = await login(
            http, server.url, emulator.admin_username, emulator.admin_password
        )
        assert status == 200
        yield Admin(http, server.url, body["accessJwt"]["token"]), server


async def test_a_deployed_zip_runs_with_its_environment_and_its_pre_handler(
    real: tuple[Admin, EmulatorServer],
) -> None:
    admin, server = real
    emulator = server.emulator
    subscriptions = {"interceptions": [{"type": "PRE_REQUEST", "apiId": PATCH_API}]}
    config = plugin_config(environmentVariables={"COLOR": "blue"}, subscriptions=subscriptions)
    status, created = await admin.create(config, zipped({"index.py": INDEX}))
    assert status == 201, created

    async with admin.http.post(created["endpointUrl"], json={}) as response:
        assert response.status == 200, await response.text()
        report = await response.json()
    assert report["login"] == 200 and report["color"] == "blue"
    assert "VIRTUAL_ENV" not in report["env"] and "PYTHONPATH" not in report["env"]
    assert {"BIOT_BASE_URL", "BIOT_SERVICE_USER_ID", "BIOT_APP_NAME"} <= set(report["env"])

    patient_id = emulator.store.all(PATIENT)[0]["_id"]
    user = {"authorization": f"Bearer {emulator.user_token()}"}
    body = {"_name": {"firstName": "A", "lastName": "B"}}
    async with admin.http.patch(
        f"{server.url}{PATIENTS}/{patient_id}", json=body, headers=user
    ) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["_name"]["firstName"] == "A by My Plugin"

    status, body = await admin.update("my-plugin", {"runtime": "python3.99"})
    assert_error(status, body, 400, "PLUGIN_REQUEST_VALIDATION_FAILED")
    assert "python3.99" in body["message"]
    assert (await admin.call("DELETE", PLUGINS + "/my-plugin"))[0] == 204
    async with admin.http.post(created["endpointUrl"], json={}) as response:
        assert response.status == 404
