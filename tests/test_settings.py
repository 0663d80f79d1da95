"""Settings: built from a mapping, every problem named at once, secrets out of repr."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from config.settings import VARIABLES, SettingsError, load_settings, replace_settings


def test_defaults_need_nothing() -> None:
    settings = load_settings({})
    assert settings.biot.base_url is None
    assert settings.biot.validate_jwt is True
    assert settings.biot.notification_scope == "ACTION_NOTIFICATION"
    assert settings.biot.interception_scope == "PLUGIN_INTERCEPTOR"
    assert settings.worker.deadline_interceptor == 2.5


def test_one_error_names_every_problem() -> None:
    env = {
        "BIOT_BASE_URL": "ftp://biot",
        "WORKER_PORT": "http",
        "WORKER_MAX_IN_FLIGHT": "0",
        "WORKER_LOG_LEVEL": "LOUD",
        "WORKER_DEADLINE_INTERCEPTOR": "-1",
        "WORKER_ALLOW_NONSPECIFIC_WITHOUT_JWT": "maybe",
    }
    with pytest.raises(SettingsError) as caught:
        load_settings(env)
    text = str(caught.value)
    for name in (
        "BIOT_BASE_URL",
        "BIOT_SERVICE_USER_ID",
        "BIOT_SERVICE_USER_SECRET_KEY",
        "WORKER_PORT",
        "WORKER_MAX_IN_FLIGHT",
        "WORKER_LOG_LEVEL",
        "WORKER_DEADLINE_INTERCEPTOR",
        "WORKER_ALLOW_NONSPECIFIC_WITHOUT_JWT",
    ):
        assert name in text
    assert len(caught.value.problems) == 8


def test_overrides_win_over_the_environment() -> None:
    settings = load_settings({"WORKER_PORT": "1"}, {"WORKER_PORT": "2"})
    assert settings.worker.port == 2


def test_secret_is_not_in_repr() -> None:
    env = {
        "BIOT_BASE_URL": "https://api.example.test/",
        "BIOT_SERVICE_USER_ID": "id",
        "BIOT_SERVICE_USER_SECRET_KEY": "very-secret",
    }
    settings = load_settings(env)
    assert settings.biot.base_url == "https://api.example.test"
    assert "very-secret" not in repr(settings)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("false", False), ("False", False), ("", True), ("no", True), ("true", True)],
)
def test_validate_jwt_follows_the_platform_rule(raw: str, expected: bool) -> None:
    assert load_settings({"BIOT_SHOULD_VALIDATE_JWT": raw}).biot.validate_jwt is expected


def test_scopes_shared_and_per_hook() -> None:
    shared = load_settings({"JWT_PERMISSION": "X"}).biot
    assert (shared.notification_scope, shared.interception_scope, shared.nonspecific_scope) == (
        "X",
        "X",
        "X",
    )
    specific = load_settings({"JWT_PERMISSION": "X", "BIOT_JWT_PERMISSION_NOTIFICATION": "N"})
    assert specific.biot.notification_scope == "N"
    off = load_settings({"BIOT_JWT_PERMISSION_INTERCEPTION": ""})
    assert off.biot.interception_scope is None


def test_replace_settings_checks_names() -> None:
    settings = replace_settings(load_settings({}), worker_port=0, biot_base_url="http://x")
    assert settings.worker.port == 0 and settings.biot.base_url == "http://x"
    with pytest.raises(TypeError):
        replace_settings(settings, nope=1)


def test_readme_documents_every_variable() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    documented = set(
        re.findall(r"^\| `([A-Z_]+)` \| (?:`--|\(environment only\))", readme, flags=re.MULTILINE)
    )
    assert documented == set(VARIABLES)
