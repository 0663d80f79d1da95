"""The project's own test plugin: what the suite runs instead of the example ``handlers``.

Each interceptor appends its own mark to ``_name.firstName`` so a test can tell which ran, and
in which order; the PRE handler blocks the name ``FORBIDDEN``; the notification and NONSPECIFIC
handlers search patients through ``ctx.api``. ``WORKER_ROUTES=tests.fixture_plugin:build_routes``
serves it from a worker process.
"""

from __future__ import annotations

from typing import Any

from worker import (
    AdaptEntityInterception,
    Block,
    Context,
    NonSpecific,
    Notification,
    PostInterception,
    PreInterception,
    Router,
)

REFERENCE = "tests.fixture_plugin:build_routes"
PATCH_PATIENT = "PATCH/organization/v1/users/patients/{id}"
PATIENTS = "/organization/v1/users/patients"
PRE_MARK = " +pre"
ADAPT_MARK = " +adapt"
POST_MARK = " +post"
FORBIDDEN = "FORBIDDEN"
HANDLED = "fixture notification handled"


def _mark(value: Any, mark: str) -> None:
    name = value.get("_name") if isinstance(value, dict) else None
    if isinstance(name, dict) and isinstance(name.get("firstName"), str):
        name["firstName"] += mark


async def on_patient(view: Notification, ctx: Context) -> None:
    page = await ctx.api.search(PATIENTS, limit=10)
    total = page.get("metadata", {}).get("page", {}).get("totalResults")
    ctx.log.info(HANDLED, action=view.action, patient_id=view.entity.get("_id"), total=total)


async def pre_patient(view: PreInterception, ctx: Context) -> None:
    body = view.request.body
    name = body.get("_name") if isinstance(body, dict) else None
    if isinstance(name, dict) and name.get("firstName") == FORBIDDEN:
        raise Block(403, "MODIFICATION_FORBIDDEN", "this first name is not allowed", {"f": "_name"})
    _mark(body, PRE_MARK)


async def adapt_patient(view: AdaptEntityInterception, ctx: Context) -> None:
    for item in view.entities:
        _mark(item, ADAPT_MARK)


async def post_patient(view: PostInterception, ctx: Context) -> None:
    _mark(view.body, POST_MARK)


async def count_patients(view: NonSpecific, ctx: Context) -> dict[str, Any]:
    page = await ctx.api.search(PATIENTS, limit=1)
    total = page.get("metadata", {}).get("page", {}).get("totalResults")
    return {"patients": total, "traceId": ctx.trace.trace_id}


def build_routes() -> Router:
    """Notifications of patient _create/_update, PRE/POST on PATCH patient, ADAPT_ENTITY on
    patient, and a NONSPECIFIC handler."""
    router = Router()
    router.notification(on_patient, entity="patient", action="_create")
    router.notification(on_patient, entity="patient", action="_update")
    router.pre(pre_patient, api_id=PATCH_PATIENT, order=1)
    router.adapt_entity(adapt_patient, entity="patient", order=1)
    router.post(post_patient, api_id=PATCH_PATIENT, order=1)
    router.nonspecific(count_patients)
    return router
