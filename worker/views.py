"""The typed view of each hook's payload, built from its decoded JSON body.

Handlers receive these: a :class:`Notification`, a :class:`PreInterception`,
:class:`PostInterception` or :class:`AdaptEntityInterception`, or a :class:`NonSpecific`. The
builders raise :class:`~worker.errors.EventError` with the platform's codes (``NO_EVENT``,
``NO_DATA``, ``NO_METADATA``) for anything missing or malformed.
"""

from __future__ import annotations

import http
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from worker.errors import EventError


class HookType(StrEnum):
    """The ``hooktype`` header's values: which kind of call the platform makes."""

    NOTIFICATION = "NOTIFICATION"
    INTERCEPTOR_PRE = "INTERCEPTOR_PRE"
    INTERCEPTOR_POST = "INTERCEPTOR_POST"
    INTERCEPTOR_POST_ENTITY = "INTERCEPTOR_POST_ENTITY"
    NONSPECIFIC = "NONSPECIFIC"

    @property
    def is_interceptor(self) -> bool:
        return self in _INTERCEPTORS


_INTERCEPTORS = frozenset(
    {HookType.INTERCEPTOR_PRE, HookType.INTERCEPTOR_POST, HookType.INTERCEPTOR_POST_ENTITY}
)


def require_object(payload: Any, what: str) -> dict[str, Any]:
    if payload is None:
        raise EventError(f"{what} has no body", code="NO_EVENT")
    if not isinstance(payload, dict):
        raise EventError(f"{what} body must be a JSON object", code="NO_EVENT")
    return payload


# ---------------------------------------------------------------- HTTP status echo


@dataclass(slots=True)
class StatusCode:
    """BioT's ``httpStatusCode``: ``"200 OK"`` or ``"OK"``, echoed as it came.

    ``code`` is the numeric status when it can be read. Setting a new ``code`` renders it in
    the form the original used.
    """

    raw: Any
    code: int | None

    @classmethod
    def parse(cls, raw: Any) -> StatusCode:
        return cls(raw, _status_number(raw))

    def set(self, code: int) -> None:
        self.code = code
        self.raw = _render_status(code, self.raw)


def _status_number(raw: Any) -> int | None:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if not isinstance(raw, str):
        return None
    head = raw.strip().split(" ", 1)[0]
    if head.isdigit():
        return int(head)
    member = http.HTTPStatus.__members__.get(head.upper())
    return int(member) if member is not None else None


def _render_status(code: int, like: Any) -> Any:
    if isinstance(like, int):
        return code
    try:
        name = http.HTTPStatus(code).name
    except ValueError:
        return f"{code}" if isinstance(like, str) and like.strip().isdigit() else str(code)
    text = like.strip() if isinstance(like, str) else ""
    if text.isdigit():
        return str(code)
    if text and not text[0].isdigit():
        return name
    return f"{code} {name}"


# ---------------------------------------------------------------- typed views


@dataclass(slots=True)
class Notification:
    """A NOTIFICATION event: sent after an entity action succeeded."""

    metadata: dict[str, Any]
    data: dict[str, Any]
    entity: dict[str, Any]
    old_entity: dict[str, Any] | None

    @property
    def entity_type(self) -> str:
        return str(self.metadata.get("entityTypeName") or "")

    @property
    def action(self) -> str:
        return str(self.metadata.get("actionName") or "")

    @property
    def template(self) -> str | None:
        template = self.entity.get("_template")
        if isinstance(template, dict) and template.get("name"):
            return str(template["name"])
        name = self.metadata.get("templateName")
        return str(name) if name else None


@dataclass(slots=True)
class InterceptedRequest:
    """The user's request as an interceptor sees it; PRE handlers may change any field."""

    path: str
    query_parameters: dict[str, list[str]]
    headers: dict[str, str]
    body: Any
    path_variables: list[dict[str, Any]]

    def to_contract(self) -> dict[str, Any]:
        """BioT's ``NewInterceptedRequest`` (what a PRE interceptor answers)."""
        return {
            "path": self.path,
            "queryParameters": self.query_parameters,
            "headers": self.headers,
            "body": self.body,
        }


@dataclass(slots=True)
class Interception:
    """Fields common to PRE, POST and ADAPT_ENTITY payloads."""

    hook: HookType
    method: str
    api_id: str
    entity_name: str | None
    initiator: dict[str, Any]
    request: InterceptedRequest
    raw: dict[str, Any] = field(repr=False)


@dataclass(slots=True)
class PreInterception(Interception):
    """PRE_REQUEST: change ``request`` in place (or raise ``Block``); BioT then handles it."""


@dataclass(slots=True)
class PostInterception(Interception):
    """POST_REQUEST: change ``body`` (or assign it) and ``status`` before BioT answers."""

    body: Any = None
    status: StatusCode = field(default_factory=lambda: StatusCode("200 OK", 200))


@dataclass(slots=True)
class AdaptEntityInterception(Interception):
    """ADAPT_ENTITY: change the dicts of ``entities`` before BioT returns them."""

    entities: list[Any] = field(default_factory=list)
    status: StatusCode = field(default_factory=lambda: StatusCode("200 OK", 200))


@dataclass(slots=True)
class NonSpecific:
    """A direct or scheduled call: the parsed JSON body (``None`` when empty) and headers."""

    body: Any
    headers: Mapping[str, str]


View = Notification | PreInterception | PostInterception | AdaptEntityInterception | NonSpecific


def notification_view(payload: Any) -> Notification:
    body = require_object(payload, "notification")
    metadata = body.get("metadata")
    if not isinstance(metadata, dict):
        raise EventError("notification has no metadata object", code="NO_METADATA")
    data = body.get("data")
    if not isinstance(data, dict):
        raise EventError("notification has no data object", code="NO_DATA")
    entity = data.get("entity")
    if not isinstance(entity, dict):
        raise EventError("notification data has no entity object", code="NO_DATA")
    additional = data.get("additionalData")
    old = additional.get("oldEntity") if isinstance(additional, dict) else None
    return Notification(metadata, data, entity, old if isinstance(old, dict) else None)


def _missing(body: Mapping[str, Any], names: tuple[str, ...]) -> list[str]:
    return [name for name in names if body.get(name) is None]


def _request(raw: Any) -> InterceptedRequest:
    if not isinstance(raw, dict):
        raise EventError("interceptor payload has no request object", code="NO_DATA")
    path = raw.get("path")
    if not isinstance(path, str) or not path:
        raise EventError("interceptor request has no path", code="NO_DATA")
    query = raw.get("queryParameters") or {}
    headers = raw.get("headers") or {}
    variables = raw.get("pathVariables") or []
    if not isinstance(query, dict) or not isinstance(headers, dict):
        raise EventError("queryParameters and headers must be objects", code="NO_DATA")
    if not isinstance(variables, list):
        raise EventError("pathVariables must be a list", code="NO_DATA")
    return InterceptedRequest(path, _query(query), headers, raw.get("body"), variables)


def _query(query: dict[str, Any]) -> dict[str, list[str]]:
    # The contract is name -> list of strings; a bare string is tolerated and wrapped.
    return {k: v if isinstance(v, list) else [v] for k, v in query.items()}


_REQUIRED = ("method", "apiId", "request")


def _response(payload: dict[str, Any]) -> dict[str, Any]:
    response = payload.get("response")
    if not isinstance(response, dict):
        raise EventError("interceptor payload has no response object", code="NO_DATA")
    return response


def interception_view(
    hook: HookType, payload: Any
) -> PreInterception | PostInterception | AdaptEntityInterception:
    # Built field by field rather than through a dict of the common fields and ** (this runs
    # once per interceptor event).
    body = require_object(payload, "interceptor")
    method, api_id, raw_request = body.get("method"), body.get("apiId"), body.get("request")
    if method is None or api_id is None or raw_request is None:
        missing = _missing(body, _REQUIRED)
        raise EventError(
            f"interceptor payload is missing {', '.join(missing)}",
            code="NO_DATA",
            details={"missing": missing},
        )
    if not isinstance(method, str) or not isinstance(api_id, str):
        raise EventError("method and apiId must be strings", code="NO_DATA")
    entity = body.get("entityName")
    entity_name = entity if isinstance(entity, str) else None
    initiator = body.get("initiatorData")
    initiator_data = initiator if isinstance(initiator, dict) else {}
    request = _request(raw_request)
    if hook is HookType.INTERCEPTOR_PRE:
        return PreInterception(hook, method, api_id, entity_name, initiator_data, request, body)
    response = _response(body)
    status = StatusCode.parse(response.get("httpStatusCode", "200 OK"))
    if hook is HookType.INTERCEPTOR_POST:
        return PostInterception(hook, method, api_id, entity_name, initiator_data, request, body,
                                response.get("body"), status)  # fmt: skip
    entities = response.get("entities")
    if not isinstance(entities, list):
        raise EventError("ADAPT_ENTITY response has no entities list", code="NO_DATA")
    return AdaptEntityInterception(hook, method, api_id, entity_name, initiator_data, request,
                                   body, entities, status)  # fmt: skip
