"""A plugin's configuration as ``/settings/v2/plugins`` takes it: validated, with BioT's defaults,
and merged by a partial update (BioT's settings spec 2.4.2, ``CreatePluginRequest`` and
``PartialUpdatePluginRequest``).

Create needs ``name`` (at most 57 of ``[a-zA-Z0-9-_]``), ``displayName``, ``version`` (1 to 32767)
and ``runtime``; the rest defaults (``handler`` ``index.handler``, ``timeout`` 3 s as BioT's docs
say, ``memorySize`` 128, ``ephemeralStorage`` 512, ``enabledState`` ENABLED, ZIP). A partial
update changes the fields it gives (``null`` changes nothing): ``environmentVariables`` replaces
the whole custom set (``{}`` clears it); in ``subscriptions``, ``interceptions`` and
``notifications`` omitted keep theirs, ``[]`` clears, a list replaces; each ``cors`` list
likewise. New code must come with a larger ``version``; without code the version must stay.
Unknown fields are ignored, as BioT's JSON binding does. ``enabledState``, ``cronSchedule``,
``memorySize``, ``ephemeralStorage``, ``analyticsDbAccess`` and ``cors`` are stored and shown,
not enforced.

Interceptions name an API the emulator serves (:mod:`worker.testing.emulator.routes`): PRE and
POST an ``apiId`` (404 ``INTERCEPTION_CONFIGURATION_NOT_FOUND`` otherwise), ADAPT_ENTITY an
``entityTypeName`` and no ``apiId``. Every problem is an :class:`ApiFailure` with BioT's codes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from worker.testing.emulator.routes import entity_type_names, serving
from worker.testing.emulator.subscriptions import ACTION_NAMES, ENTITY_TYPES, INTERCEPTION_TYPES
from worker.testing.emulator.wire import ApiFailure

Json = dict[str, Any]

INVALID: Final = "PLUGIN_REQUEST_VALIDATION_FAILED"
RESERVED_PREFIX: Final = "BIOT_"
_NAME: Final = re.compile(r"[a-zA-Z0-9_-]{1,57}")
_ENV_KEY: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_CORS_DEFAULTS: Final[dict[str, tuple[str, ...]]] = {
    "allowOrigins": ("*",),
    "allowMethods": ("GET", "POST"),
    "allowHeaders": ("authorization", "content-type"),
    "exposeHeaders": (),
}
_CORS_METHODS: Final = ("GET", "PUT", "POST", "DELETE", "HEAD", "PATCH")


@dataclass(frozen=True, slots=True)
class PluginSubscriptions:
    """``subscriptions`` as stored: items normalised to the JSON BioT shows."""

    interception_order: int = 1
    interceptions: tuple[Json, ...] = ()
    notifications: tuple[Json, ...] = ()

    def to_json(self) -> Json:
        return {
            "interceptionOrder": self.interception_order,
            "interceptions": [dict(item) for item in self.interceptions],
            "notifications": [dict(item) for item in self.notifications],
        }

    def order_of(self, interception: Json) -> int:
        """An interception's execution order: its own, else the plugin's ``interceptionOrder``."""
        order = interception.get("order")
        return order if isinstance(order, int) else self.interception_order


@dataclass(frozen=True, slots=True)
class PluginConfig:
    name: str
    display_name: str
    version: int
    runtime: str
    handler: str = "index.handler"
    timeout: int = 3
    memory_size: int = 128
    ephemeral_storage: int = 512
    environment: Mapping[str, str] = field(default_factory=dict)
    subscriptions: PluginSubscriptions = PluginSubscriptions()
    enabled_state: str = "ENABLED"
    cron_schedule: str | None = None
    analytics_db_access: bool = False
    cors: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(_CORS_DEFAULTS))

    def to_json(self) -> Json:
        body: Json = {
            "name": self.name,
            "displayName": self.display_name,
            "version": self.version,
            "runtime": self.runtime,
            "handler": self.handler,
            "timeout": self.timeout,
            "memorySize": self.memory_size,
            "ephemeralStorage": self.ephemeral_storage,
            "environmentVariables": dict(self.environment),
            "subscriptions": self.subscriptions.to_json(),
            "enabledState": self.enabled_state,
            "deploymentPackageType": "ZIP",
            "analyticsDbAccess": self.analytics_db_access,
            "cors": {key: list(values) for key, values in self.cors.items()},
        }
        if self.cron_schedule is not None:
            body["cronSchedule"] = self.cron_schedule
        return body


def invalid(message: str, **details: Any) -> ApiFailure:
    return ApiFailure(400, INVALID, message, details)


def create_config(body: Any) -> PluginConfig:
    """The configuration of ``POST /settings/v2/plugins`` (the ``config`` part)."""
    body = _object(body, "config")
    package_type = _optional(body, "deploymentPackageType", _choice(("ZIP", "IMAGE")))
    if package_type == "IMAGE":
        raise invalid("the emulator runs ZIP plugins only (deploymentPackageType IMAGE)")
    for key in ("name", "displayName", "version", "runtime"):
        if body.get(key) is None:
            raise invalid(f"{key} is required", field=key)
    config = PluginConfig(
        name=_name(body["name"]),
        display_name=_text(body["displayName"], "displayName", 255),
        version=_int(body["version"], "version", 1, 32767),
        runtime=_text(body["runtime"], "runtime", 50),
    )
    return _apply(config, body)


def update_config(current: PluginConfig, body: Any, *, new_code: bool) -> PluginConfig:
    """``current`` after ``PATCH /settings/v2/plugins/{name}`` (the ``config`` part)."""
    body = _object(body, "config")
    version = _optional(body, "version", lambda v: _int(v, "version", 1, 32767))
    _check_version(current.version, version, new_code)
    config = current if version is None else replace(current, version=version)
    display_name = _optional(body, "displayName", lambda v: _text(v, "displayName", 255))
    runtime = _optional(body, "runtime", lambda v: _text(v, "runtime", 50))
    if display_name is not None:
        config = replace(config, display_name=display_name)
    if runtime is not None:
        config = replace(config, runtime=runtime)
    return _apply(config, body)


def _check_version(current: int, requested: int | None, new_code: bool) -> None:
    details = {"currentVersion": current, "requestVersion": requested}
    if new_code and (requested is None or requested <= current):
        raise ApiFailure(
            400,
            "PLUGIN_VERSION_MUST_BE_LARGER_WHEN_UPDATING_CODE",
            f"new code needs a version larger than {current} (got {requested})",
            details,
        )
    if not new_code and requested is not None and requested != current:
        raise ApiFailure(
            400,
            "PLUGIN_VERSION_MUST_NOT_BE_CHANGED_WHEN_NOT_UPDATING_CODE",
            f"the version changes only with new code (current {current}, got {requested})",
            details,
        )


def _apply(config: PluginConfig, body: Json) -> PluginConfig:
    """The fields shared by create and partial update, each replacing when given."""
    changes: Json = {}
    for key, attribute, parse in _FIELDS:
        value = _optional(body, key, parse)
        if value is not None:
            changes[attribute] = value
    subscriptions = body.get("subscriptions")
    if subscriptions is not None:
        changes["subscriptions"] = _subscriptions(config.subscriptions, subscriptions)
    cors = body.get("cors")
    if cors is not None:
        changes["cors"] = _cors(config.cors, cors)
    return replace(config, **changes)


# ---------------------------------------------------------------- fields


def _object(value: Any, what: str) -> Json:
    if not isinstance(value, dict):
        raise invalid(f"{what} must be a JSON object")
    return value


def _optional(body: Json, key: str, parse: Any) -> Any:
    value = body.get(key)
    return None if value is None else parse(value)


def _name(value: Any) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        message = "name must be 1 to 57 characters of letters, digits, '-' and '_'"
        raise invalid(message, field="name", value=value)
    return value


def _text(value: Any, key: str, longest: int) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > longest:
        raise invalid(f"{key} must be a non-empty string of at most {longest} characters")
    return value


def _int(value: Any, key: str, lowest: int, highest: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lowest <= value <= highest:
        raise invalid(f"{key} must be an integer from {lowest} to {highest}", field=key)
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise invalid("analyticsDbAccess must be true or false")
    return value


def _choice(choices: tuple[str, ...]) -> Any:
    def parse(value: Any) -> str:
        if value not in choices:
            raise invalid(f"{value!r} is not one of {', '.join(choices)}", valid=list(choices))
        return str(value)

    return parse


def _environment(value: Any) -> dict[str, str]:
    variables = _object(value, "environmentVariables")
    for key, text in variables.items():
        if key.startswith(RESERVED_PREFIX):
            raise ApiFailure(
                400,
                "ENVIRONMENT_VARIABLES_CANNOT_START_WITH_RESERVED_PREFIX",
                f"environment variable {key} starts with the reserved prefix {RESERVED_PREFIX}",
                {"environmentVariable": key, "reservedPrefix": RESERVED_PREFIX},
            )
        if not _ENV_KEY.fullmatch(key) or not isinstance(text, str) or not text:
            message = f"environment variable {key!r} needs a name of [A-Za-z0-9_] and a value"
            raise invalid(message, environmentVariable=key)
    return dict(variables)


_FIELDS: Final[tuple[tuple[str, str, Any], ...]] = (
    ("handler", "handler", lambda v: _text(v, "handler", 1024)),
    ("timeout", "timeout", lambda v: _int(v, "timeout", 1, 900)),
    ("memorySize", "memory_size", lambda v: _int(v, "memorySize", 128, 10240)),
    ("ephemeralStorage", "ephemeral_storage", lambda v: _int(v, "ephemeralStorage", 512, 10240)),
    ("environmentVariables", "environment", _environment),
    ("enabledState", "enabled_state", _choice(("ENABLED", "DISABLED"))),
    ("cronSchedule", "cron_schedule", lambda v: _text(v, "cronSchedule", 250)),
    ("analyticsDbAccess", "analytics_db_access", _bool),
)


def _cors(current: Mapping[str, tuple[str, ...]], value: Any) -> dict[str, tuple[str, ...]]:
    given = _object(value, "cors")
    merged = dict(current)
    for key in _CORS_DEFAULTS:
        items = given.get(key)
        if items is None:
            continue
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise invalid(f"cors.{key} must be a list of strings")
        if key == "allowMethods" and not set(items) <= set(_CORS_METHODS):
            raise invalid(f"cors.allowMethods takes {', '.join(_CORS_METHODS)}")
        merged[key] = tuple(items)
    return merged


# ---------------------------------------------------------------- subscriptions


def _subscriptions(current: PluginSubscriptions, value: Any) -> PluginSubscriptions:
    given = _object(value, "subscriptions")
    result = current
    order = given.get("interceptionOrder")
    if order is not None:
        result = replace(result, interception_order=_order(order, "interceptionOrder"))
    if given.get("interceptions") is not None:
        items = _list(given["interceptions"], "interceptions")
        result = replace(result, interceptions=tuple(_interception(i) for i in items))
    if given.get("notifications") is not None:
        items = _list(given["notifications"], "notifications")
        result = replace(result, notifications=_notifications(items))
    return result


def _list(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise invalid(f"subscriptions.{key} must be a list")
    return value


def _order(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(f"{key} must be a positive integer", field=key, value=value)
    return value


def _interception(value: Any) -> Json:
    item = _object(value, "each interception")
    kind = item.get("type")
    if kind not in INTERCEPTION_TYPES:
        raise invalid(f"interception type {kind!r} is not one of {', '.join(INTERCEPTION_TYPES)}")
    normal: Json = {"type": kind}
    api_id, entity = item.get("apiId"), item.get("entityTypeName")
    if kind == "ADAPT_ENTITY":
        _api_id_presence(kind, api_id, must_have=False)
        normal["entityTypeName"] = _served_entity(entity)
    else:
        _api_id_presence(kind, api_id, must_have=True)
        normal["apiId"] = _served_api(api_id)
        if entity is not None:
            normal["entityTypeName"] = _text(entity, "entityTypeName", 255)
    if item.get("order") is not None:
        normal["order"] = _order(item["order"], "order")
    return normal


def _api_id_presence(kind: str, api_id: Any, *, must_have: bool) -> None:
    if (api_id is not None) != must_have:
        correct = "an apiId" if must_have else None
        raise ApiFailure(
            400,
            "INTERCEPTION_MUST_HAVE_CORRECT_API_ID_NULL_VALUE_FOR_TYPE",
            f"a {kind} interception " + ("needs an apiId" if must_have else "takes no apiId"),
            {"type": kind, "correctValue": correct, "apiId": api_id},
        )


def _not_found(value: Any, field_name: str) -> ApiFailure:
    return ApiFailure(
        404,
        "INTERCEPTION_CONFIGURATION_NOT_FOUND",
        f"no interceptable API has {field_name} {value!r} (see GET /settings/v1/interceptions)",
        {"value": value, "fieldName": field_name},
    )


def _served_api(value: Any) -> str:
    if not isinstance(value, str) or serving(value) is None:
        raise _not_found(value, "apiId")
    return value


def _served_entity(value: Any) -> str:
    if value not in entity_type_names():
        raise _not_found(value, "entityTypeName")
    return str(value)


def _notifications(items: list[Any]) -> tuple[Json, ...]:
    result: list[Json] = []
    for value in items:
        item = _notification(value)
        if item in result:
            raise invalid("a notification is listed twice", notification=item)
        result.append(item)
    return tuple(result)


def _notification(value: Any) -> Json:
    item = _object(value, "each notification")
    entity, action = item.get("entityTypeName"), item.get("actionName")
    if entity not in ENTITY_TYPES:
        raise ApiFailure(
            400, "INVALID_ENTITY_TYPE_NAME", f"invalid entity {entity!r}", {"invalid": entity}
        )
    if action not in ACTION_NAMES:
        raise ApiFailure(
            400, "INVALID_ACTION_NAME", f"invalid action {action!r}", {"invalid": action}
        )
    normal: Json = {"entityTypeName": entity, "actionName": action}
    if item.get("templateName") is not None:
        normal["templateName"] = _text(item["templateName"], "templateName", 255)
    return normal
