"""The dispatcher's subscription registry: who gets notified and who intercepts which API.

Rules follow BioT's dispatcher spec: a duplicate notification subscription is a 409; subscribing
an existing interception again only updates its ``executionOrder``; an interception given an
order another one of the same type and API holds takes it and pushes the others up by one.
Without an order, an interception runs after those already subscribed.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from worker.testing.emulator.routes import ApiRoute, api_id_matches
from worker.testing.emulator.wire import ApiFailure, Clock, iso_ms

ENTITY_TYPES: Final = (
    "device", "organization", "organization-user", "caregiver", "patient", "usage-session",
    "generic-entity", "command", "device-alert", "patient-alert", "registration-code",
)  # fmt: skip
ACTION_NAMES: Final = (
    "_create", "_update", "_delete", "_list", "_command", "_generateCertificate",
    "_activateCertificate", "_revokeCertificate", "_operate", "_read", "_start", "_stop",
    "_remoteStart", "_remoteStop", "_remoteResume", "_remotePause", "_updateAdmin",
    "_updateEnabledState", "_login", "_logout", "_clear", "_manage", "_assign",
    "_saveMeasurement", "_monitor", "_view", "_saveMeasurementBulk", "_incomingSms",
)  # fmt: skip
INTERCEPTION_TYPES: Final = ("PRE_REQUEST", "POST_REQUEST", "ADAPT_ENTITY")
# Subscription type -> the hooktype header of the call.
HOOKTYPES: Final = {
    "PRE_REQUEST": "INTERCEPTOR_PRE",
    "POST_REQUEST": "INTERCEPTOR_POST",
    "ADAPT_ENTITY": "INTERCEPTOR_POST_ENTITY",
}


@dataclass(frozen=True, slots=True)
class NotificationSubscription:
    id: str
    entity_type: str
    action: str
    endpoint: str
    template_name: str | None = None

    def to_json(self) -> dict[str, Any]:
        body = {
            "id": self.id,
            "entityTypeName": self.entity_type,
            "actionName": self.action,
            "endpoint": self.endpoint,
        }
        if self.template_name is not None:
            body["templateName"] = self.template_name
        return body


@dataclass(frozen=True, slots=True)
class InterceptionSubscription:
    id: str
    type: str
    target: str  # apiId for PRE/POST, entityName for ADAPT_ENTITY
    endpoint: str
    order: int
    created: str
    modified: str
    path_filters: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        key = "entityName" if self.type == "ADAPT_ENTITY" else "apiId"
        return {
            "id": self.id,
            "type": self.type,
            key: self.target,
            "endpoint": self.endpoint,
            "executionOrder": self.order,
            "pathFilters": dict(self.path_filters),
            "creationTime": self.created,
            "lastModifiedTime": self.modified,
        }

    def same_point(self, other: InterceptionSubscription) -> bool:
        return self.type == other.type and self.target == other.target


def _endpoint(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise ApiFailure(400, "INVALID_ENDPOINT", "endpoint must be an http(s) URL")
    return value


def _choice(value: Any, choices: tuple[str, ...], code: str, what: str) -> str:
    if value not in choices:
        details = {"invalid": value, "valid": list(choices)}
        raise ApiFailure(400, code, f"invalid {what} {value!r}", details)
    return str(value)


class Subscriptions:
    """Notification and interception subscriptions; raises :class:`ApiFailure` on bad input."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._notifications: list[NotificationSubscription] = []
        self._interceptions: list[InterceptionSubscription] = []

    def subscribe_notification(
        self, entity_type: str, action: str, endpoint: str, template: str | None = None
    ) -> NotificationSubscription:
        entity_type = _choice(entity_type, ENTITY_TYPES, "INVALID_ENTITY_TYPE_NAME", "entity")
        action = _choice(action, ACTION_NAMES, "INVALID_ACTION_NAME", "action")
        new = NotificationSubscription(
            str(uuid.uuid4()), entity_type, action, _endpoint(endpoint), template
        )
        if any(self._same_notification(s, new) for s in self._notifications):
            message = "this endpoint is already subscribed to this action"
            raise ApiFailure(409, "SUBSCRIPTION_ALREADY_EXISTS", message, new.to_json())
        self._notifications.append(new)
        return new

    def unsubscribe_notification(
        self, entity_type: str, action: str, endpoint: str, template: str | None = None
    ) -> None:
        probe = NotificationSubscription("", entity_type, action, endpoint, template)
        kept = [s for s in self._notifications if not self._same_notification(s, probe)]
        if len(kept) == len(self._notifications):
            raise ApiFailure(404, "SUBSCRIBER_NOT_FOUND", "no such subscription", probe.to_json())
        self._notifications = kept

    def subscribe_interception(
        self,
        type: str,
        endpoint: str,
        api_id: str | None = None,
        entity_name: str | None = None,
        order: int | None = None,
        path_filters: Mapping[str, str] | None = None,
    ) -> InterceptionSubscription:
        probe = self._probe(type, endpoint, api_id, entity_name, path_filters)
        existing = next((s for s in self._interceptions if self._same_interception(s, probe)), None)
        if existing is not None:
            self._interceptions.remove(existing)
            probe = replace(probe, id=existing.id, created=existing.created)
        peers = [s for s in self._interceptions if s.same_point(probe)]
        if order is None:
            order = existing.order if existing else max((p.order for p in peers), default=-1) + 1
        self._make_room(peers, order)
        new = replace(probe, order=order)
        self._interceptions.append(new)
        return new

    def unsubscribe_interception(
        self,
        type: str,
        endpoint: str,
        api_id: str | None = None,
        entity_name: str | None = None,
        path_filters: Mapping[str, str] | None = None,
    ) -> None:
        probe = self._probe(type, endpoint, api_id, entity_name, path_filters)
        kept = [s for s in self._interceptions if not self._same_interception(s, probe)]
        if len(kept) == len(self._interceptions):
            raise ApiFailure(404, "SUBSCRIBER_NOT_FOUND", "no such interception", probe.to_json())
        self._interceptions = kept

    def unsubscribe_endpoint(self, endpoint: str) -> None:
        """Remove every subscription of ``endpoint`` (a deployed plugin's, when it changes)."""
        self._notifications = [s for s in self._notifications if s.endpoint != endpoint]
        self._interceptions = [s for s in self._interceptions if s.endpoint != endpoint]

    def notifications(self) -> list[NotificationSubscription]:
        return list(self._notifications)

    def interceptions(self) -> list[InterceptionSubscription]:
        return sorted(self._interceptions, key=lambda s: (s.type, s.target, s.order))

    def notification_targets(
        self, entity_type: str, action: str, template_name: str | None
    ) -> list[NotificationSubscription]:
        return [
            s
            for s in self._notifications
            if s.entity_type == entity_type
            and s.action == action
            and (s.template_name is None or s.template_name == template_name)
        ]

    def interceptors(
        self, type: str, route: ApiRoute, params: Mapping[str, str]
    ) -> list[InterceptionSubscription]:
        """The interceptions of ``type`` for this call, in execution order."""
        variables = dict(params)
        found = [
            s for s in self._interceptions if s.type == type and self._covers(s, route, variables)
        ]
        return sorted(found, key=lambda s: s.order)

    @staticmethod
    def _covers(sub: InterceptionSubscription, route: ApiRoute, params: dict[str, str]) -> bool:
        if any(params.get(k) != v for k, v in sub.path_filters.items()):
            return False
        if sub.type == "ADAPT_ENTITY":
            return sub.target == route.kind.name
        return api_id_matches(sub.target, route, params)

    def _probe(
        self,
        type: str,
        endpoint: str,
        api_id: str | None,
        entity_name: str | None,
        path_filters: Mapping[str, str] | None,
    ) -> InterceptionSubscription:
        type = _choice(type, INTERCEPTION_TYPES, "INVALID_INTERCEPTION_TYPE", "type")
        target = entity_name if type == "ADAPT_ENTITY" else api_id
        if not isinstance(target, str) or not target:
            needed = "entityName" if type == "ADAPT_ENTITY" else "apiId"
            raise ApiFailure(400, "INVALID_API_ID", f"{type} needs {needed}")
        now = iso_ms(self._clock())
        filters = {str(k): str(v) for k, v in (path_filters or {}).items()}
        return InterceptionSubscription(
            str(uuid.uuid4()), type, target, _endpoint(endpoint), 0, now, now, filters
        )

    def _make_room(self, peers: list[InterceptionSubscription], order: int) -> None:
        """Push the run of peers from ``order`` upwards by one, as BioT resolves clashes."""
        by_order = {p.order: p for p in peers}
        run: list[InterceptionSubscription] = []
        while order in by_order:
            run.append(by_order[order])
            order += 1
        for sub in run:
            index = self._interceptions.index(sub)
            self._interceptions[index] = replace(sub, order=sub.order + 1)

    @staticmethod
    def _same_notification(a: NotificationSubscription, b: NotificationSubscription) -> bool:
        return a.to_json() | {"id": ""} == b.to_json() | {"id": ""}

    @staticmethod
    def _same_interception(a: InterceptionSubscription, b: InterceptionSubscription) -> bool:
        same_filters = dict(a.path_filters) == dict(b.path_filters)
        return a.same_point(b) and a.endpoint == b.endpoint and same_filters
