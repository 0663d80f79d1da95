"""Shared fixtures: settings, a signing key pair, a capturing log; events come from the kit."""

from __future__ import annotations

import pytest

from config.settings import Settings, load_settings
from worker.testing.events import (
    TRACE_ID,
    TRACEPARENT,
    KeyPair,
    entity,
    headers_for,
    interceptor_body,
    make_event,
    make_key_pair,
    notification_body,
)

__all__ = [
    "TRACEPARENT",
    "TRACE_ID",
    "KeyPair",
    "entity",
    "headers_for",
    "interceptor_body",
    "make_event",
    "notification_body",
]


@pytest.fixture(scope="session")
def keys() -> KeyPair:
    return make_key_pair()


@pytest.fixture(scope="session")
def other_keys() -> KeyPair:
    return make_key_pair()


def settings_for(**env: str) -> Settings:
    base = {
        "BIOT_BASE_URL": "http://127.0.0.1:9",
        "BIOT_SERVICE_USER_ID": "service-user",
        "BIOT_SERVICE_USER_SECRET_KEY": "s3cr3t-service-key",
        "BIOT_APP_NAME": "test-plugin",
        "BIOT_SERVICE_ENVIRONMENT": "test",
    }
    base.update(env)
    return load_settings(base)
