"""The plugin the metrics tests run (``WORKER_ROUTES=tests.metrics_plugin:build_routes``): each
event says what its handler does, so a test knows exactly what every event must count.

- PRE on ``PATCH patient``: the request body's ``mode``: ``good`` (one patients search),
  ``raise`` (a bug: 500), ``missing`` (GET of a patient that does not exist: BioT answers 404,
  the worker 502), ``hang`` (never finishes: 504 at the interceptor deadline).
- NOTIFICATION of ``patient _create``: the entity's first name, with the same modes, plus
  ``hang-once`` (hangs on the first delivery, a good event on any later one).
- NONSPECIFIC: the body's ``mode``: ``good`` (one patients search), ``hold`` (one caregivers
  search: a test holds it with the emulator's latency on that route).
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from worker import Context, NonSpecific, Notification, PreInterception, Router

REFERENCE: Final = "tests.metrics_plugin:build_routes"
PATCH_PATIENT: Final = "PATCH/organization/v1/users/patients/{id}"
PATIENTS: Final = "/organization/v1/users/patients"
CAREGIVERS: Final = "/organization/v1/users/caregivers"
#: A patient id the emulator does not have (the ``missing`` mode asks for it).
ABSENT_ID: Final = "7c1d3f0e-0000-4000-8000-00000000dead"


async def _run(mode: Any, ctx: Context) -> None:
    if mode == "raise":
        raise RuntimeError("the metrics plugin failed on purpose")
    if mode == "missing":
        await ctx.api.get(f"{PATIENTS}/{ABSENT_ID}")
    elif mode == "hang" or (mode == "hang-once" and ctx.attempt == 1):
        await asyncio.get_running_loop().create_future()  # cancelled by the deadline or a kill
    else:
        await ctx.api.search(PATIENTS, limit=1)


async def pre_patient(view: PreInterception, ctx: Context) -> None:
    body = view.request.body
    await _run(body.get("mode") if isinstance(body, dict) else None, ctx)


async def on_patient(view: Notification, ctx: Context) -> None:
    name = view.entity.get("_name")
    await _run(name.get("firstName") if isinstance(name, dict) else None, ctx)


async def nonspecific(view: NonSpecific, ctx: Context) -> dict[str, Any]:
    body = view.body
    mode = body.get("mode") if isinstance(body, dict) else None
    if mode == "hold":
        await ctx.api.search(CAREGIVERS, limit=1)
    else:
        await ctx.api.search(PATIENTS, limit=1)
    return {"mode": mode}


def build_routes() -> Router:
    router = Router()
    router.pre(pre_patient, api_id=PATCH_PATIENT, order=1)
    router.notification(on_patient, entity="patient", action="_create")
    router.nonspecific(nonspecific)
    return router
