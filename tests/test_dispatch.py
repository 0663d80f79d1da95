"""The dispatcher: hook contracts, auth decisions, routing, deadlines, error mapping."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config.settings import Settings
from tests.conftest import (
    TRACE_ID,
    KeyPair,
    headers_for,
    interceptor_body,
    make_event,
    notification_body,
    settings_for,
)
from tests.fixture_plugin import ADAPT_MARK, HANDLED, POST_MARK, PRE_MARK, build_routes
from worker.dispatch import Dispatcher
from worker.errors import Block
from worker.events import (
    AdaptEntityInterception,
    NonSpecific,
    Notification,
    PostInterception,
    PreInterception,
)
from worker.logs import CapturingLog
from worker.responses import Response
from worker.routing import Context, Router
from worker.testing import FakeApi
from worker.testing import make_dispatcher as kit_dispatcher

PAGE = {"data": [], "metadata": {"page": {"totalResults": 3, "page": 0, "limit": 10}}}


def make_dispatcher(
    keys: KeyPair,
    routes: Router | None = None,
    settings: Settings | None = None,
    log: CapturingLog | None = None,
) -> tuple[Dispatcher, CapturingLog]:
    """The kit's dispatcher over the fixture plugin (or ``routes``); every search finds 3."""
    log = log or CapturingLog()
    dispatcher = kit_dispatcher(
        routes if routes is not None else build_routes(),
        api=FakeApi().respond("GET", "*", PAGE),
        log=log,
        settings=settings or settings_for(),
        keys=keys,
    )
    return dispatcher, log


def interceptor_token(keys: KeyPair) -> str:
    return keys.sign(scopes=["PLUGIN_INTERCEPTOR"])


def notification_token(keys: KeyPair) -> str:
    return keys.sign(scopes=["ACTION_NOTIFICATION"])


# ---------------------------------------------------------------- success contracts


async def test_notification_is_routed_with_its_typed_view(keys: KeyPair) -> None:
    seen: list[Notification] = []

    async def handler(view: Notification, ctx: Context) -> None:
        seen.append(view)

    routes = Router().notification(handler, entity="patient", action="_update")
    dispatcher, log = make_dispatcher(keys, routes)
    body = notification_body(notification_token(keys), action="_update")
    response = await dispatcher.dispatch(make_event("NOTIFICATION", body))
    assert response.status == 200
    assert response.body == b""
    assert TRACE_ID in response.headers["traceparent"]
    assert seen[0].entity_type == "patient" and seen[0].action == "_update"
    assert seen[0].old_entity is not None and seen[0].old_entity["_name"]["firstName"] == "Old"
    assert log.find("event handled")[0]["status"] == 200


async def test_notification_handler_reads_patients_through_ctx_api(keys: KeyPair) -> None:
    dispatcher, log = make_dispatcher(keys)
    body = notification_body(notification_token(keys))
    response = await dispatcher.dispatch(make_event("NOTIFICATION", body))
    assert response.status == 200
    record = log.find(HANDLED)[0]
    assert record["total"] == 3
    assert record["traceId"] == TRACE_ID


async def test_pre_rewrites_the_request_in_the_contract_shape(keys: KeyPair) -> None:
    dispatcher, _ = make_dispatcher(keys)
    event = make_event(
        "INTERCEPTOR_PRE", interceptor_body("INTERCEPTOR_PRE"), token=interceptor_token(keys)
    )
    response = await dispatcher.dispatch(event)
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    request = response.json()["request"]
    assert set(request) == {"path", "queryParameters", "headers", "body"}
    assert request["body"]["_name"]["firstName"] == "Ada" + PRE_MARK
    assert request["queryParameters"] == {"a": ["1"]}


async def test_pre_handler_rewrites_the_request_in_place(keys: KeyPair) -> None:
    async def reroute(view: PreInterception, ctx: Context) -> None:
        view.request.path = "/elsewhere"
        view.request.body = {"x": 1}

    dispatcher, _ = make_dispatcher(keys, Router().pre(reroute, entity="patient"))
    event = make_event(
        "interceptor_pre", interceptor_body("INTERCEPTOR_PRE"), token=interceptor_token(keys)
    )
    request = (await dispatcher.dispatch(event)).json()["request"]
    assert request["path"] == "/elsewhere"
    assert request["body"] == {"x": 1}
    assert request["headers"] == {"authorization": "Bearer user-token-not-ours"}


@pytest.mark.parametrize("status", ["200 OK", "OK", "201 CREATED"])
async def test_post_echoes_http_status_code_as_it_came(keys: KeyPair, status: str) -> None:
    dispatcher, _ = make_dispatcher(keys)
    body = interceptor_body("INTERCEPTOR_POST", status=status)
    event = make_event("INTERCEPTOR_POST", body, token=interceptor_token(keys))
    response = (await dispatcher.dispatch(event)).json()["response"]
    assert response["httpStatusCode"] == status
    assert response["body"]["_name"]["firstName"] == "Ada" + POST_MARK


@pytest.mark.parametrize(
    ("given_form", "expected"), [("200 OK", "404 NOT_FOUND"), ("OK", "NOT_FOUND")]
)
async def test_post_status_change_keeps_the_form(
    keys: KeyPair, given_form: str, expected: str
) -> None:
    async def not_found(view: PostInterception, ctx: Context) -> None:
        view.status.set(404)
        view.body = {"hidden": "yes"}

    dispatcher, _ = make_dispatcher(keys, Router().post(not_found, entity="patient"))
    body = interceptor_body("INTERCEPTOR_POST", status=given_form)
    event = make_event("INTERCEPTOR_POST", body, token=interceptor_token(keys))
    response = (await dispatcher.dispatch(event)).json()["response"]
    assert response == {"body": {"hidden": "yes"}, "httpStatusCode": expected}


async def test_adapt_entity_rewrites_every_entity(keys: KeyPair) -> None:
    dispatcher, _ = make_dispatcher(keys)
    body = interceptor_body("INTERCEPTOR_POST_ENTITY")
    event = make_event("INTERCEPTOR_POST_ENTITY", body, token=interceptor_token(keys))
    response = (await dispatcher.dispatch(event)).json()["response"]
    names = [e["_name"]["firstName"] for e in response["entities"]]
    assert names == ["Ada" + ADAPT_MARK, "Bob" + ADAPT_MARK]
    assert response["httpStatusCode"] == "200 OK"


@pytest.mark.parametrize("hook", ["INTERCEPTOR_PRE", "INTERCEPTOR_POST", "INTERCEPTOR_POST_ENTITY"])
async def test_interceptor_without_handler_passes_payload_through(keys: KeyPair, hook: str) -> None:
    dispatcher, _ = make_dispatcher(keys, Router())
    body = interceptor_body(hook)
    response = await dispatcher.dispatch(make_event(hook, body, token=interceptor_token(keys)))
    assert response.status == 200
    answer = response.json()
    if hook == "INTERCEPTOR_PRE":
        expected = {k: body["request"][k] for k in ("path", "queryParameters", "headers", "body")}
        assert answer == {"request": expected}
    else:
        assert answer == {"response": body["response"]}


async def test_interceptor_routes_by_api_id_before_entity(keys: KeyPair) -> None:
    calls: list[str] = []

    async def by_api(view: AdaptEntityInterception, ctx: Context) -> None:
        calls.append("api")

    async def by_entity(view: AdaptEntityInterception, ctx: Context) -> None:
        calls.append("entity")

    routes = Router()
    routes.adapt_entity(by_entity, entity="patient")
    routes.adapt_entity(by_api, api_id="PATCH/organization/v1/users/patients/{id}")
    dispatcher, _ = make_dispatcher(keys, routes)
    hook = "INTERCEPTOR_POST_ENTITY"
    await dispatcher.dispatch(
        make_event(hook, interceptor_body(hook), token=interceptor_token(keys))
    )
    other = interceptor_body(hook, api_id="GET/organization/v1/users/patients")
    await dispatcher.dispatch(make_event(hook, other, token=interceptor_token(keys)))
    assert calls == ["api", "entity"]


async def test_nonspecific_without_token_is_allowed_and_answers_json(keys: KeyPair) -> None:
    dispatcher, _ = make_dispatcher(keys)
    response = await dispatcher.dispatch(make_event("NONSPECIFIC", {"anything": 1}))
    assert response.status == 200
    assert response.json() == {"patients": 3, "traceId": TRACE_ID}


async def test_nonspecific_without_token_refused_when_configured(keys: KeyPair) -> None:
    settings = settings_for(WORKER_ALLOW_NONSPECIFIC_WITHOUT_JWT="false")
    dispatcher, _ = make_dispatcher(keys, settings=settings)
    response = await dispatcher.dispatch(make_event("NONSPECIFIC", {}))
    assert response.status == 400
    assert response.json()["code"] == "JWT_ERROR"


async def test_unknown_hooktype_is_nonspecific_with_a_warning(keys: KeyPair) -> None:
    seen: list[Any] = []

    async def handler(view: NonSpecific, ctx: Context) -> Response:
        seen.append(view.body)
        return Response(202, b"", {})

    dispatcher, log = make_dispatcher(keys, Router().nonspecific(handler))
    response = await dispatcher.dispatch(make_event("SOMETHING_ELSE", {"k": "v"}))
    assert response.status == 202
    assert seen == [{"k": "v"}]
    assert log.find("missing or unknown hooktype header; handled as NONSPECIFIC")


async def test_nonspecific_without_handler_is_404(keys: KeyPair) -> None:
    dispatcher, _ = make_dispatcher(keys, Router())
    response = await dispatcher.dispatch(make_event("NONSPECIFIC", None))
    assert response.status == 404
    assert response.json()["code"] == "NO_HANDLER"


# ---------------------------------------------------------------- refusals


async def test_block_becomes_biot_error_envelope(keys: KeyPair) -> None:
    dispatcher, log = make_dispatcher(keys)
    body = interceptor_body("INTERCEPTOR_PRE")
    body["request"]["body"]["_name"]["firstName"] = "FORBIDDEN"
    event = make_event("INTERCEPTOR_PRE", body, token=interceptor_token(keys))
    response = await dispatcher.dispatch(event)
    assert response.status == 403
    assert response.json() == {
        "code": "MODIFICATION_FORBIDDEN",
        "message": "this first name is not allowed",
        "serviceName": "test-plugin",
        "traceId": TRACE_ID,
        "environment": "test",
        "details": {"f": "_name"},
    }
    assert log.find("event refused")[0]["code"] == "MODIFICATION_FORBIDDEN"


def test_block_refuses_a_success_status() -> None:
    with pytest.raises(ValueError, match="4xx or 5xx"):
        Block(200)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", "NO_EVENT"),
        (b"{not json", "NO_EVENT"),
        (b"[1, 2]", "NO_EVENT"),
        (orjson.dumps({"data": {"entity": {}}, "jwt": "x"}), "JWT_ERROR"),
    ],
)
async def test_malformed_notifications_get_platform_codes(
    keys: KeyPair, body: bytes, code: str
) -> None:
    dispatcher, _ = make_dispatcher(keys)
    response = await dispatcher.dispatch(make_event("NOTIFICATION", body))
    assert response.status == 400
    assert response.json()["code"] == code


@pytest.mark.parametrize(("drop", "code"), [("metadata", "NO_METADATA"), ("data", "NO_DATA")])
async def test_notification_missing_parts(keys: KeyPair, drop: str, code: str) -> None:
    dispatcher, _ = make_dispatcher(keys)
    body = notification_body(notification_token(keys))
    del body[drop]
    response = await dispatcher.dispatch(make_event("NOTIFICATION", body))
    assert (response.status, response.json()["code"]) == (400, code)


async def test_notification_without_jwt_is_jwt_error(keys: KeyPair) -> None:
    dispatcher, _ = make_dispatcher(keys)
    response = await dispatcher.dispatch(make_event("NOTIFICATION", notification_body(None)))
    assert (response.status, response.json()["code"]) == (400, "JWT_ERROR")


@pytest.mark.parametrize("missing", ["apiId", "method", "request"])
async def test_interceptor_missing_field_is_no_data(keys: KeyPair, missing: str) -> None:
    dispatcher, _ = make_dispatcher(keys)
    body = interceptor_body("INTERCEPTOR_PRE")
    del body[missing]
    event = make_event("INTERCEPTOR_PRE", body, token=interceptor_token(keys))
    response = await dispatcher.dispatch(event)
    assert (response.status, response.json()["code"]) == (400, "NO_DATA")


async def test_post_without_response_is_no_data(keys: KeyPair) -> None:
    dispatcher, _ = make_dispatcher(keys)
    event = make_event(
        "INTERCEPTOR_POST", interceptor_body("INTERCEPTOR_PRE"), token=interceptor_token(keys)
    )
    response = await dispatcher.dispatch(event)
    assert (response.status, response.json()["code"]) == (400, "NO_DATA")


async def test_interceptor_without_authorization_is_jwt_error(keys: KeyPair) -> None:
    dispatcher, _ = make_dispatcher(keys)
    response = await dispatcher.dispatch(
        make_event("INTERCEPTOR_PRE", interceptor_body("INTERCEPTOR_PRE"))
    )
    assert (response.status, response.json()["code"]) == (400, "JWT_ERROR")


async def test_scope_is_checked_per_hook(keys: KeyPair) -> None:
    dispatcher, _ = make_dispatcher(keys)
    # A notification token is not good for an interceptor, and the other way round.
    pre = make_event(
        "INTERCEPTOR_PRE", interceptor_body("INTERCEPTOR_PRE"), token=notification_token(keys)
    )
    note = make_event("NOTIFICATION", notification_body(interceptor_token(keys)))
    for event in (pre, note):
        response = await dispatcher.dispatch(event)
        assert (response.status, response.json()["code"]) == (403, "JWT_ERROR")


async def test_scope_overrides_come_from_settings(keys: KeyPair) -> None:
    settings = settings_for(BIOT_JWT_PERMISSION_INTERCEPTION="CUSTOM_SCOPE")
    dispatcher, _ = make_dispatcher(keys, settings=settings)
    hook = "INTERCEPTOR_PRE"
    refused = make_event(hook, interceptor_body(hook), token=interceptor_token(keys))
    allowed = make_event(hook, interceptor_body(hook), token=keys.sign(scopes=["CUSTOM_SCOPE"]))
    assert (await dispatcher.dispatch(refused)).status == 403
    assert (await dispatcher.dispatch(allowed)).status == 200


async def test_token_from_another_key_is_refused(keys: KeyPair, other_keys: KeyPair) -> None:
    dispatcher, _ = make_dispatcher(keys)
    hook = "INTERCEPTOR_PRE"
    event = make_event(hook, interceptor_body(hook), token=interceptor_token(other_keys))
    response = await dispatcher.dispatch(event)
    assert (response.status, response.json()["code"]) == (400, "JWT_ERROR")


async def test_validation_off_accepts_events_without_tokens(keys: KeyPair) -> None:
    settings = settings_for(BIOT_SHOULD_VALIDATE_JWT="false")
    dispatcher, _ = make_dispatcher(keys, settings=settings)
    hook = "INTERCEPTOR_PRE"
    response = await dispatcher.dispatch(make_event(hook, interceptor_body(hook)))
    assert response.status == 200


# ---------------------------------------------------------------- deadlines and failures


async def test_deadline_cancels_the_handler_and_answers_504(keys: KeyPair) -> None:
    cancelled = asyncio.Event()

    async def stuck(view: PreInterception, ctx: Context) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    settings = settings_for(WORKER_DEADLINE_INTERCEPTOR="0.05")
    dispatcher, _ = make_dispatcher(keys, Router().pre(stuck, entity="patient"), settings)
    hook = "INTERCEPTOR_PRE"
    event = make_event(hook, interceptor_body(hook), token=interceptor_token(keys))
    response = await dispatcher.dispatch(event)
    assert response.status == 504
    assert response.json()["code"] == "DEADLINE_EXCEEDED"
    assert cancelled.is_set()


async def test_context_exposes_the_deadline(keys: KeyPair) -> None:
    remaining: list[float] = []

    async def handler(view: PreInterception, ctx: Context) -> None:
        remaining.append(ctx.remaining())

    dispatcher, _ = make_dispatcher(keys, Router().pre(handler, entity="patient"))
    hook = "INTERCEPTOR_PRE"
    await dispatcher.dispatch(
        make_event(hook, interceptor_body(hook), token=interceptor_token(keys))
    )
    assert 0 < remaining[0] <= 2.5


async def test_handler_bug_is_500_without_traceback(keys: KeyPair) -> None:
    async def broken(view: PreInterception, ctx: Context) -> None:
        raise KeyError("secret-detail")

    dispatcher, log = make_dispatcher(keys, Router().pre(broken, entity="patient"))
    hook = "INTERCEPTOR_PRE"
    event = make_event(hook, interceptor_body(hook), token=interceptor_token(keys))
    response = await dispatcher.dispatch(event)
    assert response.status == 500
    assert response.json()["code"] == "INTERNAL_SERVER_ERROR"
    assert b"Traceback" not in response.body and b"secret-detail" not in response.body
    assert "KeyError" in str(log.find("handler raised an unexpected error")[0]["error"])


@pytest.mark.parametrize(
    ("hook", "register"),
    [
        ("NOTIFICATION", lambda r, h: r.notification(h, entity="patient", action="_create")),
        ("INTERCEPTOR_PRE", lambda r, h: r.pre(h, entity="patient")),
        ("INTERCEPTOR_POST", lambda r, h: r.post(h, entity="patient")),
        ("INTERCEPTOR_POST_ENTITY", lambda r, h: r.adapt_entity(h, entity="patient")),
    ],
)
async def test_a_value_returned_where_the_hook_ignores_it_is_a_clear_500(
    keys: KeyPair, hook: str, register: Any
) -> None:
    async def returns_a_list(view: Any, ctx: Context) -> Any:
        return ["not", "used"]

    dispatcher, _ = make_dispatcher(keys, register(Router(), returns_a_list))
    if hook == "NOTIFICATION":
        event = make_event(hook, notification_body(notification_token(keys)))
    else:
        event = make_event(hook, interceptor_body(hook), token=interceptor_token(keys))
    response = await dispatcher.dispatch(event)
    assert response.status == 500
    error = response.json()
    assert error["code"] == "HANDLER_CONTRACT"
    assert "returns_a_list returned list" in error["message"]
    assert "in place and return None" in error["message"]


async def test_trace_falls_back_to_b3_header(keys: KeyPair) -> None:
    dispatcher, _ = make_dispatcher(keys)
    headers = headers_for("NONSPECIFIC")
    del headers["traceparent"]
    headers["x-b3-traceid"] = "a07a7e532f3541d8"
    response = await dispatcher.dispatch(make_event("NONSPECIFIC", {}, headers=headers))
    assert response.json()["traceId"] == "0000000000000000a07a7e532f3541d8"


async def test_every_log_line_of_an_event_carries_its_trace_and_no_token(keys: KeyPair) -> None:
    dispatcher, log = make_dispatcher(keys)
    token = notification_token(keys)
    await dispatcher.dispatch(make_event("NOTIFICATION", notification_body(token)))
    assert log.records
    assert all(r["traceId"] == TRACE_ID for r in log.records)
    assert token not in orjson.dumps(log.records).decode()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    hook=st.sampled_from(
        ["NOTIFICATION", "INTERCEPTOR_PRE", "INTERCEPTOR_POST", "INTERCEPTOR_POST_ENTITY", None]
    ),
    body=st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers(min_value=-(2**63), max_value=2**63 - 1)
            | st.text(max_size=10),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(st.text(max_size=8), inner, max_size=4)
            ),
            max_leaves=12,
        ).map(orjson.dumps),
    ),
    validate=st.booleans(),
)
async def test_nothing_a_caller_sends_yields_a_500(
    keys: KeyPair, hook: str | None, body: bytes, validate: bool
) -> None:
    settings = settings_for(BIOT_SHOULD_VALIDATE_JWT=str(validate).lower())
    dispatcher, _ = make_dispatcher(keys, Router(), settings, CapturingLog())
    response = await dispatcher.dispatch(make_event(hook, body, token="not.a.jwt"))
    assert response.status in (200, 400, 403, 404)
    if response.status >= 400:
        assert response.json()["code"] in (
            "NO_EVENT",
            "NO_DATA",
            "NO_METADATA",
            "JWT_ERROR",
            "NO_HANDLER",
        )


async def test_outcome_says_whether_a_failure_is_transient(keys: KeyPair) -> None:
    from worker.errors import TransientApiError

    async def flaky(view: PreInterception, ctx: Context) -> None:
        raise TransientApiError("BioT answered 503", status=503, method="GET", url="/x")

    dispatcher, _ = make_dispatcher(keys, Router().pre(flaky, entity="patient"))
    hook = "INTERCEPTOR_PRE"
    good = make_event(hook, interceptor_body(hook), token=interceptor_token(keys))
    outcome = await dispatcher.handle(good)
    assert outcome.transient and outcome.response.status == 502
    refused = await dispatcher.handle(make_event(hook, interceptor_body(hook)))
    assert refused.error is not None and not refused.transient
    assert refused.response.status == 400
    passed = await make_dispatcher(keys, Router())[0].handle(good)
    assert passed.error is None and not passed.transient


# ---------------------------------------------------------------- what a handler can reach


def _reachable_text(view: Any, ctx: Context) -> str:
    """Everything a handler can read from its view and its context's data, as text (fields
    left out of a ``repr`` included)."""
    fields = [getattr(view, f.name) for f in dataclasses.fields(view)]
    settings = [getattr(ctx.settings.biot, f.name) for f in dataclasses.fields(ctx.settings.biot)]
    return repr((fields, settings, ctx.settings.worker, ctx.trace, ctx.attempt))


@pytest.mark.parametrize("hook", ["NOTIFICATION", "INTERCEPTOR_PRE", "NONSPECIFIC"])
async def test_a_handler_never_sees_the_platform_jwt_or_the_service_secret(
    keys: KeyPair, hook: str
) -> None:
    seen: list[str] = []

    async def look(view: Any, ctx: Context) -> None:
        seen.append(_reachable_text(view, ctx))

    routes = Router()
    if hook == "NOTIFICATION":
        routes.notification(look, entity="patient", action="_create")
        token = notification_token(keys)
        event = make_event(hook, notification_body(token))
    elif hook == "INTERCEPTOR_PRE":
        routes.pre(look, entity="patient")
        token = interceptor_token(keys)
        event = make_event(hook, interceptor_body(hook), token=token)
    else:
        routes.nonspecific(look)
        token = keys.sign(scopes=[])
        event = make_event(hook, {"jwt": token, "job": "nightly"}, token=token)
    dispatcher, _ = make_dispatcher(keys, routes)
    response = await dispatcher.dispatch(event)
    assert response.status == 200
    [text] = seen
    assert token not in text
    assert "s3cr3t-service-key" not in text
