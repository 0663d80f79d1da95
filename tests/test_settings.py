"""Settings: one table drives reading, help and docs; all problems named at once; secrets hidden."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from config.settings import (
    SECRET_VARIABLES,
    SETTINGS,
    VARIABLES,
    BiotSettings,
    SettingsError,
    WorkerSettings,
    defaults,
    load_settings,
    replace_settings,
)

GROUPS: dict[str, type[BiotSettings] | type[WorkerSettings]] = {
    "biot": BiotSettings,
    "worker": WorkerSettings,
}


# ---------------------------------------------------------------- the table


def test_every_field_has_one_table_entry_and_every_entry_a_field() -> None:
    declared = {(s, f.name) for s, group in GROUPS.items() for f in dataclasses.fields(group)}
    declared.discard(("worker", "otel"))  # OpenTelemetry's own OTEL_* variables, kept as given
    entries = [(s.section, s.field) for s in SETTINGS]
    assert len(entries) == len(set(entries)), "a field named by two entries"
    assert set(entries) == declared
    assert len(VARIABLES) == len(SETTINGS), "a variable named by two entries"


def test_each_parser_returns_its_fields_declared_type() -> None:
    for entry in SETTINGS:
        declared = typing.get_type_hints(GROUPS[entry.section])[entry.field]
        assert typing.get_type_hints(entry.parse)["return"] == declared, entry.variable


def test_rules_name_variables_of_the_table() -> None:
    for entry in SETTINGS:
        for other in (entry.required_with, entry.fallback):
            assert other is None or other in VARIABLES, entry.variable


def test_help_texts_are_plain_words() -> None:
    for variable, meaning in VARIABLES.items():
        assert not re.search(r"[`§]", meaning), variable


def test_defaults_cover_every_variable_and_read_back_unchanged() -> None:
    shown = defaults()
    assert list(shown) == list(VARIABLES)
    baseline = load_settings({})
    for variable, text in shown.items():
        if text:
            assert load_settings({variable: text}) == baseline, variable


# ---------------------------------------------------------------- reading


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
    assert caught.value.problems == [
        "BIOT_BASE_URL: must start with http:// or https://, got 'ftp://biot'",
        "BIOT_SERVICE_USER_ID: required when BIOT_BASE_URL is set",
        "BIOT_SERVICE_USER_SECRET_KEY: required when BIOT_BASE_URL is set",
        "WORKER_PORT: not a number: 'http'",
        "WORKER_MAX_IN_FLIGHT: must be greater than 0, got 0",
        "WORKER_DEADLINE_INTERCEPTOR: must be greater than 0, got -1.0",
        "WORKER_LOG_LEVEL: must be one of DEBUG, INFO, WARNING, ERROR, got 'LOUD'",
        "WORKER_ALLOW_NONSPECIFIC_WITHOUT_JWT: expected true or false, got 'maybe'",
    ]
    assert str(caught.value).startswith("invalid settings:\n  - BIOT_BASE_URL: ")


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"WORKER_PORT": "65536"}, "WORKER_PORT: must be between 0 and 65535, got 65536"),
        ({"WORKER_PORT": "-1"}, "WORKER_PORT: must be between 0 and 65535, got -1"),
        ({"WORKER_API_RETRIES": "-1"}, "WORKER_API_RETRIES: must be 0 or more, got -1"),
        ({"WORKER_JWT_LEEWAY": "-0.5"}, "WORKER_JWT_LEEWAY: must be 0 or more, got -0.5"),
        ({"WORKER_API_TIMEOUT": ""}, "WORKER_API_TIMEOUT: not a number: ''"),
        ({"WORKER_BROKER_TIMEOUT": "inf"}, "WORKER_BROKER_TIMEOUT: not a finite number: 'inf'"),
        ({"WORKER_API_TIMEOUT": "nan"}, "WORKER_API_TIMEOUT: not a finite number: 'nan'"),
        ({"WORKER_ROUTES": "handlers"}, "WORKER_ROUTES: expected module:function, got 'handlers'"),
        (
            {"WORKER_EVENT_LOOP": "trio"},
            "WORKER_EVENT_LOOP: must be one of asyncio, uvloop, got 'trio'",
        ),
        (
            {"BIOT_BASE_URL": "https://biot", "BIOT_SERVICE_USER_SECRET_KEY": "s"},
            "BIOT_SERVICE_USER_ID: required when BIOT_BASE_URL is set",
        ),
    ],
)  # fmt: skip
def test_each_rule_has_its_message(env: dict[str, str], problem: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(env)
    assert caught.value.problems == [problem]


def test_limits_are_inclusive_and_choices_normalised() -> None:
    env = {
        "WORKER_PORT": "0",
        "WORKER_API_RETRIES": "0",
        "WORKER_JWT_LEEWAY": "0",
        "WORKER_LOG_LEVEL": "debug",
        "WORKER_LOG_BACKEND": "AIOLOGGER",
        "WORKER_EVENT_LOOP": "UVLOOP",
        "WORKER_ROUTES": " pkg.hooks:build ",
    }
    worker = load_settings(env).worker
    assert (worker.port, worker.api_retries, worker.jwt_leeway) == (0, 0, 0.0)
    assert (worker.log_level, worker.log_backend, worker.event_loop) == (
        "DEBUG",
        "aiologger",
        "uvloop",
    )
    assert worker.routes == "pkg.hooks:build"


def test_empty_names_fall_back_to_their_defaults() -> None:
    biot = load_settings({"BIOT_APP_NAME": "", "BIOT_SERVICE_ENVIRONMENT": ""}).biot
    assert (biot.app_name, biot.environment) == ("biot-worker", "Not specified")


def test_empty_base_url_needs_no_service_user() -> None:
    assert load_settings({"BIOT_BASE_URL": ""}).biot.base_url is None


def test_overrides_win_over_the_environment() -> None:
    settings = load_settings({"WORKER_PORT": "1"}, {"WORKER_PORT": "2"})
    assert settings.worker.port == 2


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("false", False), ("False", False), (" FALSE ", False), ("", True), ("no", True), ("0", True)],
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
    empty_shared = load_settings({"JWT_PERMISSION": ""}).biot
    assert empty_shared.notification_scope == "ACTION_NOTIFICATION"
    assert empty_shared.nonspecific_scope is None


def test_replace_settings_checks_names() -> None:
    settings = replace_settings(load_settings({}), worker_port=0, biot_base_url="http://x")
    assert settings.worker.port == 0 and settings.biot.base_url == "http://x"
    with pytest.raises(TypeError):
        replace_settings(settings, nope=1)


# ---------------------------------------------------------------- secrets


SIGNED_IN = {
    "BIOT_BASE_URL": "https://api.example.test/",
    "BIOT_SERVICE_USER_ID": "id",
    "BIOT_SERVICE_USER_SECRET_KEY": "very-secret",
}


def test_the_service_secret_is_the_secret() -> None:
    assert {"BIOT_SERVICE_USER_SECRET_KEY"} == SECRET_VARIABLES


def test_secret_is_not_in_repr() -> None:
    settings = load_settings(SIGNED_IN)
    assert settings.biot.base_url == "https://api.example.test"
    assert settings.biot.service_user_secret == "very-secret"
    assert "very-secret" not in repr(settings)
    assert "service_user_secret" not in repr(settings)
    assert "service_user_id='id'" in repr(settings)


def test_public_copy_has_no_secret() -> None:
    settings = load_settings(SIGNED_IN)
    public = settings.public()
    assert public.biot.service_user_secret is None
    assert public == replace_settings(settings, biot_service_user_secret=None)
    for entry in SETTINGS:
        if entry.secret:
            assert getattr(getattr(public, entry.section), entry.field) is None


# ---------------------------------------------------------------- the README


def test_readme_table_matches_the_settings() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    rows = re.findall(
        r"^\| `([A-Z_]+)` \| (`--[a-z-]+`|\(environment only\)) \| (.*?) \| (.*?) \|$",
        readme,
        flags=re.MULTILINE,
    )
    documented = {variable: (flag, default, meaning) for variable, flag, default, meaning in rows}
    assert list(documented) == list(VARIABLES)
    shown = defaults()
    for variable, (flag, default, meaning) in documented.items():
        secret = variable in SECRET_VARIABLES
        assert (flag == "(environment only)") == secret, variable
        assert default == (f"`{shown[variable]}`" if shown[variable] else "—"), variable
        assert meaning == VARIABLES[variable], variable


def test_opentelemetry_variables_are_kept_as_given_and_say_when_spans_are_wanted() -> None:
    unset = load_settings({"WORKER_PORT": "9000"}).worker
    assert unset.otel_env() == {}
    assert not unset.otel_requested
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
        "OTEL_SERVICE_NAME": "my-plugin",
        "UNRELATED": "x",
    }
    worker = load_settings(env).worker
    assert worker.otel_env() == {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
        "OTEL_SERVICE_NAME": "my-plugin",
    }
    assert worker.otel_requested
    only_traces = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}
    assert load_settings(only_traces).worker.otel_requested
    for off in ({"OTEL_SDK_DISABLED": "true"}, {"OTEL_TRACES_EXPORTER": "none"},
                {"OTEL_EXPORTER_OTLP_ENDPOINT": " "}):  # fmt: skip
        assert not load_settings({**env, **off}).worker.otel_requested, off


def test_metrics_are_on_unless_switched_off() -> None:
    assert load_settings({}).worker.metrics
    assert not load_settings({"WORKER_METRICS": "false"}).worker.metrics
    with pytest.raises(SettingsError, match="WORKER_METRICS"):
        load_settings({"WORKER_METRICS": "maybe"})


@pytest.mark.parametrize("endpoint", ["127.0.0.1:4318", "notaurl", "ftp://collector:21"])
def test_an_otlp_endpoint_without_http_is_refused_at_start(endpoint: str) -> None:
    for variable in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        with pytest.raises(SettingsError, match=f"{variable}: not an http\\(s\\) URL"):
            load_settings({variable: endpoint})
    assert load_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://otlp.example:4318"})
