"""The events of each scenario, built as BioT sends them, and their checks.

Events are built from :class:`Fixtures` fetched from one emulator: BioT's signed event tokens
(one per hook, reused as BioT reuses them), an end user's token (inside intercepted requests)
and 50 patients from a search (ids for (b) and (c), the entities of (d)).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from worker.bench import logic
from worker.bench.httpload import Reply

INTERCEPTOR_SCOPE: Final = "PLUGIN_INTERCEPTOR"
NOTIFICATION_SCOPE: Final = "ACTION_NOTIFICATION"
CALLER_HEADERS: Final = {
    "content-type": "application/json",
    "accept": "application/json, application/octet-stream, application/cbor, application/*+json",
    "user-agent": "ReactorNetty/1.2.10",
}
EVENTS_PER_SCENARIO: Final = 10  # distinct bodies cycled through (different patients)


@dataclass(frozen=True, slots=True)
class Fixtures:
    interceptor_token: str
    notification_token: str
    user_token: str
    patients: list[dict[str, Any]]
    organization_id: str


@dataclass(frozen=True, slots=True)
class Event:
    headers: dict[str, str]
    body: bytes


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _interception(
    fx: Fixtures, api_id: str, path: str, body: Any, path_id: str | None
) -> dict[str, Any]:
    method = api_id.split("/", 1)[0]
    variables = [] if path_id is None else [{"name": "id", "value": path_id}]
    return {
        "initiatorData": {
            "subjectId": "7c0e2a57-8f43-4d3e-b5a9-2b1f4c6d8e90",
            "ownerOrganizationId": fx.organization_id,
            "tokenType": "USER",
        },
        "method": method,
        "entityName": "patient",
        "apiId": api_id,
        "request": {
            "path": path,
            "queryParameters": {},
            "headers": {
                "authorization": f"Bearer {fx.user_token}",
                "content-type": "application/json",
                "accept": "application/json",
                "user-agent": "Mozilla/5.0 (X11; Linux x86_64) BioT-console",
            },
            "body": body,
            "pathVariables": variables,
        },
    }


def _interceptor_event(fx: Fixtures, hooktype: str, payload: dict[str, Any]) -> Event:
    headers = {
        "hooktype": hooktype,
        "authorization": f"Bearer {fx.interceptor_token}",
        **CALLER_HEADERS,
    }
    return Event(headers, orjson.dumps(payload))


def events_a(fx: Fixtures) -> list[Event]:
    """PRE on ``PATCH patients/{id}`` with a name change in the body."""
    events = []
    for patient in fx.patients[:EVENTS_PER_SCENARIO]:
        pid = patient["_id"]
        body = {"_name": {"firstName": "Ada", "lastName": "Lovelace"}, "_description": "x" * 200}
        payload = _interception(fx, logic.API_ID_A, logic.patient_url_path(pid), body, pid)
        events.append(_interceptor_event(fx, "INTERCEPTOR_PRE", payload))
    return events


def events_b(fx: Fixtures) -> list[Event]:
    """PRE on ``GET patients/{id}``: the handler reads that patient through the API."""
    events = []
    for patient in fx.patients[:EVENTS_PER_SCENARIO]:
        pid = patient["_id"]
        payload = _interception(fx, logic.API_ID_B, logic.patient_url_path(pid), None, pid)
        events.append(_interceptor_event(fx, "INTERCEPTOR_PRE", payload))
    return events


def events_c(fx: Fixtures) -> list[Event]:
    """NOTIFICATION ``patient/_update``; the token is in the body."""
    events = []
    for patient in fx.patients[:EVENTS_PER_SCENARIO]:
        old = {**patient, "_description": "before"}
        payload = {
            "metadata": {
                "entityTypeName": "patient",
                "actionName": "_update",
                "status": "SUCCESS",
                "startTime": _now(),
                "endTime": _now(),
                "initiator": {"subject": {"id": "7c0e2a57-8f43-4d3e-b5a9-2b1f4c6d8e90"}},
            },
            "data": {"entity": patient, "additionalData": {"oldEntity": old}},
            "jwt": fx.notification_token,
        }
        events.append(Event({"hooktype": "NOTIFICATION", **CALLER_HEADERS}, orjson.dumps(payload)))
    return events


def events_d(fx: Fixtures) -> list[Event]:
    """ADAPT_ENTITY over a search of patients: the 50 entities of one result page."""
    search = orjson.dumps({"filter": {}, "page": 0, "limit": len(fx.patients)}).decode()
    payload = _interception(fx, logic.API_ID_D, logic.PATIENTS, None, None)
    payload["request"]["queryParameters"] = {"searchRequest": [search]}
    payload["response"] = {"entities": fx.patients, "httpStatusCode": "200 OK"}
    return [_interceptor_event(fx, "INTERCEPTOR_POST_ENTITY", payload)]


BUILDERS: Final[dict[str, Callable[[Fixtures], list[Event]]]] = {
    "a": events_a,
    "b": events_b,
    "c": events_c,
    "d": events_d,
    "e": events_a,  # (e) is the (a) event, published to Redis Streams
}


# ---------------------------------------------------------------- answers


def _request_of(body: bytes) -> dict[str, Any]:
    answer = orjson.loads(body)
    request: dict[str, Any] = answer["request"]
    return request


def _ok_a(body: bytes) -> bool:
    return bool(_request_of(body)["body"]["_name"]["firstName"].endswith(logic.MARK))


def _ok_b(body: bytes) -> bool:
    return logic.PATIENT_HEADER in _request_of(body)["headers"]


def _ok_c(body: bytes) -> bool:
    return True  # BioT ignores what a notification answers; the status is what counts


def _ok_d(body: bytes) -> bool:
    entities = orjson.loads(body)["response"]["entities"]
    return bool(entities) and all(
        e["_name"]["firstName"].endswith(logic.ENTITY_MARK) for e in entities
    )


_ANSWERS: Final[dict[str, Callable[[bytes], bool]]] = {
    "a": _ok_a,
    "b": _ok_b,
    "c": _ok_c,
    "d": _ok_d,
    "e": _ok_a,
}


def checker(scenario: str) -> Callable[[Reply, bool], str | None]:
    """The check of a scenario's answers: the status always, the body when asked."""
    ok = _ANSWERS[scenario]

    def check(reply: Reply, inspect: bool) -> str | None:
        if reply.status != 200:
            return f"status {reply.status}"
        if not inspect:
            return None
        try:
            return None if ok(reply.body) else "wrong answer"
        except (ValueError, KeyError, TypeError, AttributeError):
            return "wrong answer"

    return check
