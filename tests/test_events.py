"""Event parsing: headers, envelopes, typed views, status echo, trace context."""

from __future__ import annotations

import base64

import orjson
import pytest

from worker.errors import AuthError, EventError, PayloadTooLarge
from worker.events import (
    HookType,
    StatusCode,
    bearer_token,
    event_from_envelope,
    event_from_http,
    hook_from_header,
)
from worker.tracing import parse_traceparent, trace_from_headers


@pytest.mark.parametrize(
    ("value", "hook", "known"),
    [
        ("NOTIFICATION", HookType.NOTIFICATION, True),
        ("interceptor_post_entity", HookType.INTERCEPTOR_POST_ENTITY, True),
        (" Interceptor_Pre ", HookType.INTERCEPTOR_PRE, True),
        ("SCHEDULER", HookType.NONSPECIFIC, False),
        (None, HookType.NONSPECIFIC, False),
    ],
)
def test_hook_type_is_case_insensitive(value: str | None, hook: HookType, known: bool) -> None:
    assert hook_from_header(value) == (hook, known)


def test_http_headers_are_lower_cased() -> None:
    event = event_from_http({"HookType": "NOTIFICATION", "X-A": "1"}, b"{}", received_at=0.0)
    assert event.hook is HookType.NOTIFICATION
    assert event.headers == {"hooktype": "NOTIFICATION", "x-a": "1"}


def test_lambda_envelope_with_string_body() -> None:
    envelope = {
        "headers": {"hooktype": "NOTIFICATION"},
        "body": '{"a":1}',
        "isBase64Encoded": False,
    }
    event = event_from_envelope(envelope, received_at=0.0, max_body_bytes=100)
    assert event.body == b'{"a":1}'


def test_lambda_envelope_with_base64_body() -> None:
    body = base64.b64encode(b'{"a":1}').decode()
    envelope = {"headers": {}, "body": body, "isBase64Encoded": True}
    event = event_from_envelope(envelope, received_at=0.0, max_body_bytes=100)
    assert event.body == b'{"a":1}'
    assert event.hook is HookType.NONSPECIFIC


def test_queue_envelope_with_object_body() -> None:
    envelope = {"headers": {"hooktype": "INTERCEPTOR_PRE"}, "body": {"a": [1]}}
    event = event_from_envelope(envelope, received_at=0.0, max_body_bytes=100)
    assert orjson.loads(event.body) == {"a": [1]}


@pytest.mark.parametrize(
    "envelope",
    [[1], "text", {"headers": "nope"}, {"headers": {}, "body": "%%%", "isBase64Encoded": True}],
)
def test_bad_envelopes_are_event_errors(envelope: object) -> None:
    with pytest.raises(EventError) as caught:
        event_from_envelope(envelope, received_at=0.0, max_body_bytes=100)
    assert caught.value.status == 400


def test_oversized_envelope_body() -> None:
    with pytest.raises(PayloadTooLarge) as caught:
        event_from_envelope({"body": "x" * 101}, received_at=0.0, max_body_bytes=100)
    assert caught.value.status == 413


@pytest.mark.parametrize("value", ["Basic abc", "Bearer", "Bearer   "])
def test_authorization_must_be_bearer(value: str) -> None:
    with pytest.raises(AuthError):
        bearer_token({"authorization": value})


def test_bearer_token_extracted() -> None:
    assert bearer_token({"authorization": "bearer a.b.c"}) == "a.b.c"
    assert bearer_token({}) is None


@pytest.mark.parametrize(
    ("raw", "code", "new"),
    [
        ("200 OK", 200, "404 NOT_FOUND"),
        ("OK", 200, "NOT_FOUND"),
        ("201", 201, "404"),
        (200, 200, 404),
        ("NOT_A_STATUS", None, "NOT_FOUND"),
    ],
)
def test_status_code_forms(raw: object, code: int | None, new: object) -> None:
    status = StatusCode.parse(raw)
    assert status.code == code
    status.set(404)
    assert (status.code, status.raw) == (404, new)


def test_traceparent_parsing() -> None:
    good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    trace = parse_traceparent(good)
    assert trace is not None and trace.traceparent == good
    child = trace.child()
    assert child.trace_id == trace.trace_id and child.span_id != trace.span_id
    for bad in ("", "00-xyz", "00-" + "0" * 32 + "-00f067aa0ba902b7-01", "traceparent-not-set"):
        assert parse_traceparent(bad) is None


def test_trace_fallbacks() -> None:
    assert trace_from_headers({"trace-id": "ABC"}).trace_id == "abc".rjust(32, "0")
    fresh = trace_from_headers({"traceparent": "garbage"})
    assert len(fresh.trace_id) == 32 and fresh.flags == "01"
