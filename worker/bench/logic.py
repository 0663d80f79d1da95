"""The plugin logic of each scenario, shared by every variant measured side by side.

The worker's handlers, the bare-aiohttp floor and the two Lambda-style baselines all call these
pure functions and make the same API calls, so the variants differ only in the runtime around
the logic: how the event is received, authenticated, routed, logged and answered, and how the
API is called.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

PATIENTS: Final = "/organization/v1/users/patients"
CAREGIVERS: Final = "/organization/v1/users/caregivers"
MARK: Final = " LAMBDA MODIFIED"  # BioT's sample plugin marks what it rewrote this way
ENTITY_MARK: Final = " LAMBDA"
PATIENT_HEADER: Final = "x-plugin-patient"

# The interceptor subscriptions of the scenarios: (a) and (b) are PRE by apiId, (d) by entity.
API_ID_A: Final = "PATCH/organization/v1/users/patients/{id}"
API_ID_B: Final = "GET/organization/v1/users/patients/{id}"
API_ID_D: Final = "GET/organization/v1/users/patients"


def mark_name(body: Any) -> None:
    """(a): append the mark to ``_name.firstName`` of a request body, as BioT's sample does."""
    name = body.get("_name") if isinstance(body, dict) else None
    if isinstance(name, dict) and isinstance(name.get("firstName"), str):
        name["firstName"] += MARK


def note_patient(headers: dict[str, Any], patient: Any) -> None:
    """(b): pass what the API said about the patient on to BioT's handler, as a header."""
    caption = patient.get("_caption") if isinstance(patient, dict) else None
    headers[PATIENT_HEADER] = str(caption or "unknown")


def mark_entities(entities: list[Any]) -> None:
    """(d): append the mark to ``_name.firstName`` of every entity BioT is about to return."""
    for entity in entities:
        name = entity.get("_name") if isinstance(entity, dict) else None
        if isinstance(name, dict) and isinstance(name.get("firstName"), str):
            name["firstName"] += ENTITY_MARK


def path_variable(path_variables: Any, name: str) -> str | None:
    """The value of the named path variable of an intercepted request."""
    for item in path_variables if isinstance(path_variables, list) else ():
        if isinstance(item, Mapping) and item.get("name") == name:
            value = item.get("value")
            return str(value) if value is not None else None
    return None


def patient_url_path(patient_id: str) -> str:
    """(b): the one API GET."""
    return f"{PATIENTS}/{patient_id}"


def notification_calls(patient_id: str) -> list[tuple[str, dict[str, Any] | None]]:
    """(c): the three API GETs of the notification handler, as (path, searchRequest or None)."""
    return [
        (patient_url_path(patient_id), None),
        (PATIENTS, {"filter": {"_gender": {"eq": "FEMALE"}}, "page": 0, "limit": 10}),
        (CAREGIVERS, {"filter": {}, "page": 0, "limit": 10}),
    ]
