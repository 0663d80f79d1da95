"""The emulator's dispatcher: the interception chain, notifications and subscription APIs,
against a stub plugin over real loopback HTTP."""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from worker.testing.emulator import ApiFailure, Emulator, EmulatorConfig, EmulatorServer
from worker.testing.emulator.keys import cycling_factory, generate_key
from worker.testing.emulator.testing import HookCall, ManualClock, PluginStub, json_answer

PATIENTS = "/organization/v1/users/patients"
PATCH_API = "PATCH/organization/v1/users/patients/{id}"
HOOKS = "/dispatcher/v1/hooks"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def keys() -> list[rsa.RSAPrivateKey]:
    return [generate_key()]


@pytest.fixture
def config() -> EmulatorConfig:
    return EmulatorConfig(plugin_timeout=0.3, notification_grace=0.2)


@pytest.fixture
def emulator(config: EmulatorConfig, keys: list[rsa.RSAPrivateKey]) -> Emulator:
    return Emulator(config, clock=ManualClock(), key_factory=cycling_factory(keys))


@pytest.fixture
async def plugin() -> AsyncIterator[PluginStub]:
    async with PluginStub() as stub:
        yield stub


@pytest.fixture
async def server(emulator: Emulator) -> AsyncIterator[EmulatorServer]:
    async with EmulatorServer(emulator) as srv:
        yield srv


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class Caller:
    """Calls the emulator with one token (and optional extra headers)."""

    def __init__(self, http: aiohttp.ClientSession, url: str, token: str, **headers: str) -> None:
        self.http, self.url, self.token = http, url, token
        self.headers = {"authorization": f"Bearer {token}", **headers}

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = orjson.dumps(body) if body is not None else None
        async with self.http.request(
            method, self.url + path, data=data, headers=self.headers
        ) as response:
            raw = await response.read()
            return response.status, orjson.loads(raw) if raw else None


@pytest.fixture
def service(http: aiohttp.ClientSession, server: EmulatorServer, emulator: Emulator) -> Caller:
    token, _ = emulator.tokens.service_token(emulator.service_user_id)
    return Caller(http, server.url, token)


@pytest.fixture
def user(http: aiohttp.ClientSession, server: EmulatorServer, emulator: Emulator) -> Caller:
    return Caller(http, server.url, emulator.user_token("user-1"), traceparent=TRACEPARENT)


def verify(emulator: Emulator, token: str) -> dict[str, Any]:
    key = load_der_public_key(base64.b64decode(emulator.public_key_b64))
    claims: dict[str, Any] = jwt.decode(token, key, algorithms=["RS512"])  # type: ignore[arg-type]
    return claims


async def patient_id(service: Caller) -> str:
    status, body = await service.call("GET", PATIENTS)
    assert status == 200
    return str(body["data"][0]["_id"])


def subscribe_chain(emulator: Emulator, plugin: PluginStub) -> None:
    emulator.subscribe_interception("PRE_REQUEST", plugin.url("/pre"), api_id=PATCH_API)
    emulator.subscribe_interception("ADAPT_ENTITY", plugin.url("/adapt"), entity_name="patient")
    emulator.subscribe_interception("POST_REQUEST", plugin.url("/post"), api_id=PATCH_API)


async def rewrite_pre(call: HookCall) -> Any:
    request = call.body["request"]
    request["body"]["_description"] = "set by PRE"
    return {"request": request}


async def adapt_name(call: HookCall) -> Any:
    entities = call.body["response"]["entities"]
    entities[0]["_name"]["firstName"] += " ADAPTED"
    return {"response": {"entities": entities, "httpStatusCode": "200 OK"}}


async def rewrite_post(call: HookCall) -> Any:
    response = call.body["response"]
    return {"response": {"body": {**response["body"], "postSeen": True}, "httpStatusCode": "202"}}


async def test_user_patch_runs_pre_update_adapt_post(
    emulator: Emulator, plugin: PluginStub, service: Caller, user: Caller
) -> None:
    subscribe_chain(emulator, plugin)
    plugin.on("/pre", rewrite_pre)
    plugin.on("/adapt", adapt_name)
    plugin.on("/post", rewrite_post)
    pid = await patient_id(service)

    status, body = await user.call("PATCH", f"{PATIENTS}/{pid}", {"_gender": "MALE"})

    assert status == 202  # POST rewrote the status
    assert body["postSeen"] is True
    assert body["_description"] == "set by PRE"
    assert body["_name"]["firstName"].endswith(" ADAPTED")  # POST saw ADAPT's entity
    stored = (await service.call("GET", f"{PATIENTS}/{pid}"))[1]
    assert stored["_description"] == "set by PRE"
    assert stored["_gender"] == "MALE"
    assert not stored["_name"]["firstName"].endswith(" ADAPTED")

    assert [c.path for c in plugin.calls] == ["/pre", "/adapt", "/post"]
    hooktypes = [c.hooktype for c in plugin.calls]
    assert hooktypes == ["INTERCEPTOR_PRE", "INTERCEPTOR_POST_ENTITY", "INTERCEPTOR_POST"]
    spans = set()
    for call in plugin.calls:
        claims = verify(emulator, call.headers["authorization"].removeprefix("Bearer "))
        assert claims["scopes"] == ["PLUGIN_INTERCEPTOR"]
        assert claims["tokenType"] == "SERVICE_INTERNAL"
        _, trace_id, span, _ = call.headers["traceparent"].split("-")
        assert trace_id == TRACE_ID
        spans.add(span)
        assert call.headers["content-type"] == "application/json"
        assert call.body["apiId"] == PATCH_API
        assert call.body["method"] == "PATCH"
        assert call.body["entityName"] == "patient"
        assert call.body["initiatorData"]["tokenType"] == "USER"
        assert call.body["initiatorData"]["subjectId"] == "user-1"
        assert call.body["request"]["pathVariables"] == [{"name": "id", "value": pid}]
        assert call.body["request"]["headers"]["authorization"] == f"Bearer {user.token}"
    assert len(spans) == 3 and "00f067aa0ba902b7" not in spans
    pre, adapt, post = (c.body for c in plugin.calls)
    assert pre["request"]["body"] == {"_gender": "MALE"}
    assert "response" not in pre
    assert adapt["request"]["body"]["_description"] == "set by PRE"
    assert adapt["response"]["httpStatusCode"] == "200 OK"
    assert adapt["response"]["entities"][0]["_id"] == pid
    assert post["response"]["body"]["_name"]["firstName"].endswith(" ADAPTED")

    traced = emulator.calls.records(trace_id=TRACE_ID)
    assert [(r.direction, r.hook) for r in traced] == [
        ("out", "INTERCEPTOR_PRE"),
        ("out", "INTERCEPTOR_POST_ENTITY"),
        ("out", "INTERCEPTOR_POST"),
        ("in", None),
    ]
    assert traced[-1].token == "user"


async def test_pre_interceptor_blocks_the_call(
    emulator: Emulator, plugin: PluginStub, service: Caller, user: Caller
) -> None:
    subscribe_chain(emulator, plugin)
    emulator.subscribe_notification("patient", "_update", plugin.url("/notify"))
    refusal = {"code": "MODIFICATION_FORBIDDEN", "message": "no", "traceId": TRACE_ID}

    async def block(call: HookCall) -> Any:
        return json_answer(refusal, status=403)

    plugin.on("/pre", block)
    pid = await patient_id(service)
    before = (await service.call("GET", f"{PATIENTS}/{pid}"))[1]

    status, body = await user.call("PATCH", f"{PATIENTS}/{pid}", {"_gender": "MALE"})
    await emulator.drain_notifications()

    assert (status, body) == (403, refusal)
    assert [c.path for c in plugin.calls] == ["/pre"]
    assert (await service.call("GET", f"{PATIENTS}/{pid}"))[1] == before


async def test_slow_plugin_times_out_with_504(
    emulator: Emulator, plugin: PluginStub, service: Caller, user: Caller
) -> None:
    subscribe_chain(emulator, plugin)
    plugin.on("/adapt", plugin.hang)
    pid = await patient_id(service)

    status, body = await user.call("PATCH", f"{PATIENTS}/{pid}", {"_gender": "MALE"})

    assert status == 504
    assert body["code"] == "PLUGIN_TIMEOUT"
    assert plugin.url("/adapt") in body["message"]
    assert body["traceId"] == TRACE_ID
    timed_out = emulator.calls.records(hook="INTERCEPTOR_POST_ENTITY")
    assert [(r.status, r.error) for r in timed_out] == [(None, "timeout")]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_unreachable_plugin_is_502(emulator: Emulator, service: Caller, user: Caller) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}/pre"
    emulator.subscribe_interception("PRE_REQUEST", endpoint, api_id=PATCH_API)
    status, body = await user.call("PATCH", f"{PATIENTS}/{await patient_id(service)}", {})
    assert (status, body["code"]) == (502, "PLUGIN_UNREACHABLE")
    assert body["details"] == {"endpoint": endpoint, "hookType": "INTERCEPTOR_PRE"}


@pytest.mark.parametrize(
    "answer",
    [
        web.Response(text="not json"),
        json_answer([1, 2]),
        json_answer({"request": {"path": 5}}),
        json_answer({"request": "x"}),
    ],
)
async def test_invalid_plugin_answer_is_502(
    emulator: Emulator,
    plugin: PluginStub,
    service: Caller,
    user: Caller,
    answer: web.Response,
) -> None:
    emulator.subscribe_interception("PRE_REQUEST", plugin.url("/pre"), api_id=PATCH_API)

    async def respond(call: HookCall) -> Any:
        return answer

    plugin.on("/pre", respond)
    status, body = await user.call("PATCH", f"{PATIENTS}/{await patient_id(service)}", {})
    assert (status, body["code"]) == (502, "PLUGIN_INVALID_RESPONSE")


async def test_service_token_skips_interceptors_unless_allow_interception(
    emulator: Emulator, plugin: PluginStub, service: Caller
) -> None:
    subscribe_chain(emulator, plugin)
    pid = await patient_id(service)
    status, _ = await service.call("PATCH", f"{PATIENTS}/{pid}", {"_gender": "MALE"})
    assert status == 200
    assert plugin.calls == []

    service.headers["allow-interception"] = "1"
    status, _ = await service.call("PATCH", f"{PATIENTS}/{pid}", {"_gender": "FEMALE"})
    assert status == 200
    assert [c.path for c in plugin.calls] == ["/pre", "/adapt", "/post"]
    assert plugin.calls[0].body["initiatorData"] == {
        "subjectId": emulator.service_user_id,
        "ownerOrganizationId": emulator.config.organization_id,
        "tokenType": "SERVICE_EXTERNAL",
    }


async def test_search_interception_rewrites_query_and_adapts_every_entity(
    emulator: Emulator, plugin: PluginStub, user: Caller
) -> None:
    emulator.subscribe_interception("PRE_REQUEST", plugin.url("/pre"), api_id="GET" + PATIENTS)
    emulator.subscribe_interception("ADAPT_ENTITY", plugin.url("/adapt"), entity_name="patient")

    async def only_women(call: HookCall) -> Any:
        request = call.body["request"]
        request["queryParameters"] = {"searchRequest": ['{"filter":{"_gender":{"eq":"FEMALE"}}}']}
        return {"request": request}

    async def tag(call: HookCall) -> Any:
        entities = [{**e, "tagged": True} for e in call.body["response"]["entities"]]
        return {"response": {"entities": entities}}

    plugin.on("/pre", only_women)
    plugin.on("/adapt", tag)
    status, body = await user.call("GET", PATIENTS)
    assert status == 200
    assert {p["_gender"] for p in body["data"]} == {"FEMALE"}
    assert len(body["data"]) == 2
    assert all(p["tagged"] for p in body["data"])
    assert body["metadata"]["page"]["totalResults"] == 2
    assert plugin.calls[0].body["request"]["queryParameters"] == {}
    rewritten = plugin.calls[1].body["request"]["queryParameters"]["searchRequest"]
    assert "FEMALE" in rewritten[0]


async def test_template_specific_api_id_only_intercepts_that_template(
    emulator: Emulator, plugin: PluginStub, user: Caller
) -> None:
    api_id = "POST/organization/v1/users/patients/templates/Special"
    emulator.subscribe_interception("PRE_REQUEST", plugin.url("/pre"), api_id=api_id)
    body = {"_name": {"firstName": "A", "lastName": "B"}}
    assert (await user.call("POST", PATIENTS + "/templates/Plain", body))[0] == 201
    assert plugin.calls == []
    assert (await user.call("POST", PATIENTS + "/templates/Special", body))[0] == 201
    assert [c.body["apiId"] for c in plugin.calls] == [
        "POST/organization/v1/users/patients/templates/{templateName}"
    ]


async def test_notifications_after_create_and_update(
    emulator: Emulator, plugin: PluginStub, service: Caller
) -> None:
    emulator.subscribe_notification("patient", "_create", plugin.url("/notify"))
    emulator.subscribe_notification("patient", "_update", plugin.url("/notify"))
    emulator.subscribe_notification("patient", "_update", plugin.url("/other"), template="Other")
    service.headers["traceparent"] = TRACEPARENT

    status, created = await service.call(
        "POST", PATIENTS, {"_name": {"firstName": "N", "lastName": "O"}}
    )
    assert status == 201
    status, updated = await service.call("PATCH", f"{PATIENTS}/{created['_id']}", {"k": 1})
    await emulator.drain_notifications()

    assert [c.path for c in plugin.calls] == ["/notify", "/notify"]
    create, update = plugin.calls
    for call in (create, update):
        assert call.hooktype == "NOTIFICATION"
        assert call.headers["traceparent"].split("-")[1] == TRACE_ID
        assert "authorization" not in call.headers
        claims = verify(emulator, call.body["jwt"])
        assert claims["scopes"] == ["ACTION_NOTIFICATION"]
        assert claims["tokenType"] == "SERVICE_INTERNAL"
        metadata = call.body["metadata"]
        assert metadata["entityTypeName"] == "patient"
        assert metadata["status"] == "SUCCESS"
        assert metadata["traceId"] == TRACE_ID
        assert metadata["initiator"]["subject"]["id"] == emulator.service_user_id
    assert create.body["metadata"]["actionName"] == "_create"
    assert create.body["data"] == {"entity": created, "additionalData": {}}
    assert update.body["metadata"]["actionName"] == "_update"
    assert update.body["data"]["entity"] == updated
    assert update.body["data"]["additionalData"] == {"oldEntity": created}
    delivered = emulator.calls.records(hook="NOTIFICATION")
    assert [(r.status, r.trace_id) for r in delivered] == [(200, TRACE_ID)] * 2


async def test_notification_does_not_delay_the_caller(
    emulator: Emulator, plugin: PluginStub, service: Caller
) -> None:
    release = asyncio.Event()

    async def slow(call: HookCall) -> Any:
        await release.wait()
        return web.Response(status=200)

    plugin.on("/notify", slow)
    emulator.subscribe_notification("patient", "_delete", plugin.url("/notify"))
    status, _ = await service.call("DELETE", f"{PATIENTS}/{await patient_id(service)}")
    assert status == 204
    assert emulator.notifier.pending == 1
    release.set()
    async with service.http.post(service.url + "/_emulator/notifications/drain") as response:
        assert response.status == 204
    assert emulator.notifier.pending == 0
    assert plugin.calls[0].body["metadata"]["actionName"] == "_delete"


async def test_shutdown_cancels_notifications_after_grace(
    emulator: Emulator, plugin: PluginStub
) -> None:
    emulator.subscribe_notification("patient", "_create", plugin.url("/notify"))
    plugin.on("/notify", plugin.hang)
    async with EmulatorServer(emulator) as srv, aiohttp.ClientSession() as http:
        token = emulator.sign_token(scopes=[], token_type="SERVICE_EXTERNAL")
        body = {"_name": {"firstName": "A", "lastName": "B"}}
        status, _ = await Caller(http, srv.url, token).call("POST", PATIENTS, body)
        assert status == 201
        assert emulator.notifier.pending == 1
    assert emulator.notifier.pending == 0


async def test_notification_subscription_api(
    emulator: Emulator, service: Caller, http: aiohttp.ClientSession, server: EmulatorServer
) -> None:
    body = {"entityTypeName": "patient", "actionName": "_create", "endpoint": "http://x/notify"}
    status, created = await service.call("POST", f"{HOOKS}/notifications/subscribe", body)
    assert status == 201
    assert created["id"] and created["actionName"] == "_create"
    status, error = await service.call("POST", f"{HOOKS}/notifications/subscribe", body)
    assert (status, error["code"]) == (409, "SUBSCRIPTION_ALREADY_EXISTS")
    status, listed = await service.call("GET", f"{HOOKS}/notifications")
    assert listed["data"] == [created]
    assert listed["metadata"]["page"]["totalResults"] == 1

    assert (await service.call("POST", f"{HOOKS}/notifications/unsubscribe", body))[0] == 204
    status, error = await service.call("POST", f"{HOOKS}/notifications/unsubscribe", body)
    assert (status, error["code"]) == (404, "SUBSCRIBER_NOT_FOUND")

    bad = body | {"actionName": "_explode"}
    status, error = await service.call("POST", f"{HOOKS}/notifications/subscribe", bad)
    assert (status, error["code"]) == (400, "INVALID_ACTION_NAME")
    user = Caller(http, server.url, emulator.user_token())
    status, error = await user.call("POST", f"{HOOKS}/notifications/subscribe", body)
    assert (status, error["code"]) == (403, "ACCESS_DENIED")
    anonymous = Caller(http, server.url, "")
    anonymous.headers = {}
    assert (await anonymous.call("GET", f"{HOOKS}/notifications"))[0] == 401


async def test_interception_subscription_api_and_execution_order(
    emulator: Emulator, plugin: PluginStub, service: Caller, user: Caller
) -> None:
    def pre(path: str, order: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"type": "PRE_REQUEST", "apiId": PATCH_API}
        body["endpoint"] = plugin.url(path)
        if order is not None:
            body["executionOrder"] = order
        return body

    subscribe = f"{HOOKS}/interceptions/subscribe"
    assert (await service.call("POST", subscribe, pre("/a", 1)))[1]["executionOrder"] == 1
    assert (await service.call("POST", subscribe, pre("/b", 1)))[1]["executionOrder"] == 1
    status, listed = await service.call("GET", f"{HOOKS}/interceptions")
    orders = {i["endpoint"]: i["executionOrder"] for i in listed["data"]}
    assert orders == {plugin.url("/a"): 2, plugin.url("/b"): 1}

    await user.call("PATCH", f"{PATIENTS}/{await patient_id(service)}", {})
    assert [c.path for c in plugin.calls] == ["/b", "/a"]

    status, again = await service.call("POST", subscribe, pre("/a", 0))
    assert (status, again["executionOrder"]) == (201, 0)
    assert len(emulator.subscriptions.interceptions()) == 2
    unsubscribe = f"{HOOKS}/interceptions/unsubscribe"
    assert (await service.call("POST", unsubscribe, pre("/a")))[0] == 204
    assert (await service.call("POST", unsubscribe, pre("/a")))[0] == 404
    no_entity = {"type": "ADAPT_ENTITY", "endpoint": plugin.url("/x")}
    status, error = await service.call("POST", subscribe, no_entity)
    assert (status, error["code"]) == (400, "INVALID_API_ID")
    bad_endpoint = pre("/a") | {"endpoint": "ftp://x"}
    status, error = await service.call("POST", subscribe, bad_endpoint)
    assert (status, error["code"]) == (400, "INVALID_ENDPOINT")


def test_python_side_duplicate_subscription_raises(emulator: Emulator) -> None:
    emulator.subscribe_notification("patient", "_create", "http://127.0.0.1:1/n")
    with pytest.raises(ApiFailure) as caught:
        emulator.subscribe_notification("patient", "_create", "http://127.0.0.1:1/n")
    assert caught.value.status == 409
