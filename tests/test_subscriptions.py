"""A Router as BioT's ``subscriptions`` object and as the dispatcher's subscription bodies."""

from __future__ import annotations

from typing import Any

from tests import fixture_plugin, other_plugin
from tests.fixture_plugin import PATCH_PATIENT
from worker import Router
from worker.deploy.subscriptions import self_hosted_requests, subscriptions_of


async def _noop(view: Any, ctx: Any) -> None:
    return None


async def _other(view: Any, ctx: Any) -> None:
    return None


def test_fixture_plugin_subscriptions_match_its_routes_exactly() -> None:
    subs = subscriptions_of(fixture_plugin.build_routes())
    assert subs.unsupported == []
    assert subs.config == {
        "interceptionOrder": 1,
        "interceptions": [
            {"type": "ADAPT_ENTITY", "entityTypeName": "patient", "order": 1},
            {"type": "POST_REQUEST", "apiId": PATCH_PATIENT, "order": 1},
            {"type": "PRE_REQUEST", "apiId": PATCH_PATIENT, "order": 1},
        ],
        "notifications": [
            {"entityTypeName": "patient", "actionName": "_create"},
            {"entityTypeName": "patient", "actionName": "_update"},
        ],
    }


def test_order_template_and_no_order_are_kept_and_sorting_is_stable() -> None:
    router = Router()
    router.pre(_noop, api_id="POST/b/v1/things", order=7)
    router.pre(_other, api_id="POST/a/v1/things")
    router.notification(_noop, entity="generic-entity", action="_create", template="device_log")
    router.notification(_other, entity="device", action="_update")
    reordered = Router()
    reordered.notification(_other, entity="device", action="_update")
    reordered.pre(_other, api_id="POST/a/v1/things")
    reordered.notification(_noop, entity="generic-entity", action="_create", template="device_log")
    reordered.pre(_noop, api_id="POST/b/v1/things", order=7)
    config = subscriptions_of(router).config
    assert config == subscriptions_of(reordered).config
    assert config["interceptions"] == [
        {"type": "PRE_REQUEST", "apiId": "POST/a/v1/things"},
        {"type": "PRE_REQUEST", "apiId": "POST/b/v1/things", "order": 7},
    ]
    assert config["notifications"] == [
        {"entityTypeName": "device", "actionName": "_update"},
        {"entityTypeName": "generic-entity", "actionName": "_create", "templateName": "device_log"},
    ]


def test_wildcards_and_inexpressible_routes_are_reported_not_dropped() -> None:
    router = Router()
    router.notification(_noop, entity="*", action="_create")
    router.notification(_other, entity="patient", action="*")
    router.pre(_noop, entity="patient")
    router.adapt_entity(_noop, api_id="GET/organization/v1/users/patients")
    router.post(_noop, api_id=PATCH_PATIENT, order=2)
    router.nonspecific(_noop)
    subs = subscriptions_of(router)
    assert subs.config["interceptions"] == [
        {"type": "POST_REQUEST", "apiId": PATCH_PATIENT, "order": 2}
    ]
    assert subs.config["notifications"] == []
    assert len(subs.unsupported) == 4
    joined = "\n".join(subs.unsupported)
    for described in (
        "NOTIFICATION */_create",
        "NOTIFICATION patient/*",
        "PRE_REQUEST entity=patient",
        "ADAPT_ENTITY apiId=GET/organization/v1/users/patients",
    ):
        assert described in joined
    assert "test_subscriptions._noop" in joined
    assert all("\n" not in line for line in subs.unsupported)


def test_nonspecific_only_plugin_subscribes_nothing() -> None:
    router = Router().nonspecific(_noop)
    subs = subscriptions_of(router)
    assert subs.config["interceptions"] == subs.config["notifications"] == []
    assert subs.unsupported == []
    assert self_hosted_requests(router, "http://w/") == []


def test_self_hosted_requests_carry_endpoint_execution_order_and_entity_name() -> None:
    endpoint = "https://worker.example/hooks"
    requests = self_hosted_requests(fixture_plugin.build_routes(), endpoint)
    assert requests == [
        (
            "notifications",
            {"entityTypeName": "patient", "actionName": "_create", "endpoint": endpoint},
        ),
        (
            "notifications",
            {"entityTypeName": "patient", "actionName": "_update", "endpoint": endpoint},
        ),
        (
            "interceptions",
            {
                "type": "ADAPT_ENTITY",
                "entityName": "patient",
                "endpoint": endpoint,
                "executionOrder": 1,
            },
        ),
        (
            "interceptions",
            {
                "type": "POST_REQUEST",
                "apiId": PATCH_PATIENT,
                "endpoint": endpoint,
                "executionOrder": 1,
            },
        ),
        (
            "interceptions",
            {
                "type": "PRE_REQUEST",
                "apiId": PATCH_PATIENT,
                "endpoint": endpoint,
                "executionOrder": 1,
            },
        ),
    ]


def test_other_plugin_subscriptions() -> None:
    subs = subscriptions_of(other_plugin.build_routes())
    assert subs.config["interceptions"] == [
        {"type": "ADAPT_ENTITY", "entityTypeName": "caregiver", "order": 5},
        {"type": "PRE_REQUEST", "apiId": other_plugin.CREATE_GENERIC_ENTITY, "order": 2},
    ]
    assert subs.config["notifications"] == [
        {"entityTypeName": "device", "actionName": "_create"},
        {"entityTypeName": "device", "actionName": "_update"},
    ]


def test_self_hosted_without_order_sends_no_execution_order() -> None:
    router = Router().pre(_noop, api_id=PATCH_PATIENT)
    assert self_hosted_requests(router, "http://w/") == [
        ("interceptions", {"type": "PRE_REQUEST", "apiId": PATCH_PATIENT, "endpoint": "http://w/"})
    ]
