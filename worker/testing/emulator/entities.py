"""In-memory patients, caregivers and generic entities with BioT's built-in attributes.

Every stored entity carries ``_id``, ``_name``, ``_caption``, ``_template{id,name,displayName}``,
``_ownerOrganization{id}``, ``_creationTime`` and ``_lastModifiedTime``; people also carry
``_email`` and ``_enabled``. Custom attributes are kept as given. The store hands out deep
copies, so nothing a caller does to a returned entity changes what is stored.
"""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass
from typing import Any, Final

from worker.testing.emulator.wire import ApiFailure, Clock, iso_ms

Entity = dict[str, Any]

_READ_ONLY: Final = frozenset(
    {"_id", "_creationTime", "_lastModifiedTime", "_template", "_templateId", "_caption"}
)
_TEMPLATE_NS: Final = uuid.UUID("6f1f6c2e-5a0b-4f43-9a0e-3a8c1b9d7e55")
_SEED_PEOPLE: Final = (
    ("Ada", "Lovelace", "FEMALE", "1815-12-10"),
    ("Alan", "Turing", "MALE", "1912-06-23"),
    ("Grace", "Hopper", "FEMALE", "1906-12-09"),
    ("Edsger", "Dijkstra", "MALE", "1930-05-11"),
    ("Barbara", "Liskov", "FEMALE", "1939-11-07"),
)


@dataclass(frozen=True, slots=True)
class EntityKind:
    """One entity API: its entity type name, collection path and error code when missing."""

    name: str
    base: str
    person: bool
    default_template: str
    not_found_code: str


PATIENT: Final = EntityKind(
    "patient", "/organization/v1/users/patients", True, "Patient", "USER_NOT_FOUND"
)
CAREGIVER: Final = EntityKind(
    "caregiver", "/organization/v1/users/caregivers", True, "Caregiver", "USER_NOT_FOUND"
)
GENERIC_ENTITY: Final = EntityKind(
    "generic-entity",
    "/generic-entity/v1/generic-entities",
    False,
    "GenericEntity",
    "GENERIC_ENTITY_NOT_FOUND",
)
KINDS: Final = (PATIENT, CAREGIVER, GENERIC_ENTITY)


def template_for(kind: EntityKind, name: str) -> dict[str, str]:
    """The ``_template`` reference of a template name; ids are stable per kind and name."""
    template_id = str(uuid.uuid5(_TEMPLATE_NS, f"{kind.name}/{name}"))
    return {"id": template_id, "name": name, "displayName": name}


class EntityStore:
    """Entities by kind and id; raises :class:`ApiFailure` with BioT's codes on bad input."""

    def __init__(self, clock: Clock, organization_id: str) -> None:
        self._clock = clock
        self._organization_id = organization_id
        self._items: dict[str, dict[str, Entity]] = {kind.name: {} for kind in KINDS}
        self._templates: dict[str, dict[str, dict[str, str]]] = {kind.name: {} for kind in KINDS}
        for kind in KINDS:
            self.register_template(kind, kind.default_template)

    def create(self, kind: EntityKind, body: Entity, template_name: str | None = None) -> Entity:
        """Store a new entity from ``body`` under the named (or default) template."""
        _check_name(kind, body.get("_name"))
        template = self._template(kind, body, template_name)
        self._check_email(kind, body.get("_email"), None)
        now = iso_ms(self._clock())
        entity: Entity = {k: copy.deepcopy(v) for k, v in body.items() if k not in _READ_ONLY}
        entity.update(
            _id=str(uuid.uuid4()),
            _template=template,
            _creationTime=now,
            _lastModifiedTime=now,
        )
        entity["_ownerOrganization"] = _owner(body, self._organization_id)
        if kind.person:
            entity.setdefault("_email", None)
            entity.setdefault("_enabled", "ENABLED")
        entity["_caption"] = _caption(entity)
        self._items[kind.name][entity["_id"]] = entity
        return copy.deepcopy(entity)

    def get(self, kind: EntityKind, entity_id: str) -> Entity:
        return copy.deepcopy(self._find(kind, entity_id))

    def update(self, kind: EntityKind, entity_id: str, patch: Entity) -> tuple[Entity, Entity]:
        """Merge ``patch`` into the entity (top-level keys replace); returns (old, new)."""
        current = self._find(kind, entity_id)
        if "_name" in patch:
            _check_name(kind, patch["_name"])
        if "_email" in patch:
            self._check_email(kind, patch["_email"], entity_id)
        old = copy.deepcopy(current)
        for key, value in patch.items():
            if key not in _READ_ONLY:
                current[key] = copy.deepcopy(value)
        if "_ownerOrganization" in patch:
            current["_ownerOrganization"] = _owner(patch, self._organization_id)
        current["_lastModifiedTime"] = iso_ms(self._clock())
        current["_caption"] = _caption(current)
        return old, copy.deepcopy(current)

    def delete(self, kind: EntityKind, entity_id: str) -> Entity:
        """Remove the entity; returns what was stored."""
        self._find(kind, entity_id)
        return self._items[kind.name].pop(entity_id)

    def all(self, kind: EntityKind) -> list[Entity]:
        """Every entity of ``kind`` in creation order (copies)."""
        return [copy.deepcopy(e) for e in self._items[kind.name].values()]

    def seed_patients(self, count: int) -> None:
        for index in range(count):
            first, last, gender, born = _SEED_PEOPLE[index % len(_SEED_PEOPLE)]
            suffix = "" if index < len(_SEED_PEOPLE) else str(index // len(_SEED_PEOPLE))
            self.create(
                PATIENT,
                {
                    "_name": {"firstName": first, "lastName": last + suffix},
                    "_email": f"{first}.{last}{suffix}@example.com".lower(),
                    "_gender": gender,
                    "_dateOfBirth": born,
                },
            )

    def _find(self, kind: EntityKind, entity_id: str) -> Entity:
        entity = self._items[kind.name].get(entity_id)
        if entity is None:
            raise ApiFailure(
                404,
                kind.not_found_code,
                f"{kind.name} with id [{entity_id}] not found",
                {"id": entity_id},
            )
        return entity

    def _template(
        self, kind: EntityKind, body: Entity, template_name: str | None
    ) -> dict[str, str]:
        known = self._templates[kind.name]
        if template_name is None and body.get("_templateId") is not None:
            template_id = str(body["_templateId"])
            for template in known.values():
                if template["id"] == template_id:
                    return dict(template)
            message = f"template [{template_id}] not found"
            raise ApiFailure(404, "TEMPLATE_NOT_FOUND", message, {"id": template_id})
        template = template_for(kind, template_name or kind.default_template)
        known.setdefault(template["name"], template)
        return dict(template)

    def register_template(self, kind: EntityKind, name: str) -> dict[str, str]:
        """Make a template known so that creating by ``_templateId`` finds it."""
        template = template_for(kind, name)
        self._templates[kind.name].setdefault(name, template)
        return dict(template)

    def _check_email(self, kind: EntityKind, email: Any, own_id: str | None) -> None:
        if not kind.person or email is None:
            return
        if not isinstance(email, str) or "@" not in email:
            raise ApiFailure(400, "ATTRIBUTE_VALUE_CONVERSION_FAILED", "_email is not an email")
        for other in self._items[kind.name].values():
            if other["_id"] != own_id and str(other.get("_email") or "").lower() == email.lower():
                raise ApiFailure(409, "EMAIL_ALREADY_EXIST", "email exists", {"email": email})


def _check_name(kind: EntityKind, name: Any) -> None:
    if kind.person:
        valid = isinstance(name, dict) and all(
            isinstance(name.get(part), str) and name[part] for part in ("firstName", "lastName")
        )
    else:
        valid = isinstance(name, str) and bool(name)
    if not valid:
        shape = "{firstName, lastName}" if kind.person else "a non-empty string"
        raise ApiFailure(
            400, "ATTRIBUTE_IS_MANDATORY", f"_name must be {shape}", {"attributeName": "_name"}
        )


def _owner(body: Entity, default_id: str) -> dict[str, Any]:
    owner = body.get("_ownerOrganization")
    if isinstance(owner, dict) and isinstance(owner.get("id"), str) and owner["id"]:
        return {"id": owner["id"]}
    return {"id": default_id}


def _caption(entity: Entity) -> str:
    name = entity.get("_name")
    if isinstance(name, dict):
        return f"{name.get('firstName', '')} {name.get('lastName', '')}".strip()
    return str(name or "")
