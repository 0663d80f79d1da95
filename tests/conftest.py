"""Shared fixtures: settings, signing key pairs, the fixture plugin's routes; events and the
``biot`` fixture come from the test kit (:mod:`worker.testing`)."""

from __future__ import annotations

import pytest

from config.settings import Settings
from tests import fixture_plugin
from worker.routing import Router
from worker.testing.events import (
    TRACE_ID,
    TRACEPARENT,
    KeyPair,
    default_keys,
    entity,
    headers_for,
    interceptor_body,
    make_event,
    make_key_pair,
    notification_body,
)
from worker.testing.kit import kit_settings

__all__ = [
    "TRACEPARENT",
    "TRACE_ID",
    "KeyPair",
    "entity",
    "headers_for",
    "interceptor_body",
    "make_event",
    "notification_body",
    "settings_for",
]


@pytest.fixture(scope="session")
def keys() -> KeyPair:
    """The kit's default key pair: events built by the kit are signed with it."""
    return default_keys()


@pytest.fixture(scope="session")
def other_keys() -> KeyPair:
    return make_key_pair()


@pytest.fixture
def fixture_routes() -> Router:
    """The project's own test plugin (:mod:`tests.fixture_plugin`), never the examples."""
    return fixture_plugin.build_routes()


def settings_for(**env: str) -> Settings:
    """Settings of a test worker (``test-plugin`` in ``test``, serving the project's test plugin)
    with ``env`` on top."""
    return kit_settings(**{"WORKER_ROUTES": fixture_plugin.REFERENCE, **env})
