"""The worker's routing table for the benchmark.

Run the worker with ``WORKER_ROUTES=worker.bench.scenarios:build_routes``.
One table serves every scenario, routed the way BioT subscriptions are (PRE by ``apiId``,
ADAPT_ENTITY by entity, notifications by entity type and action), so one worker process is
measured on all of them:

- (a) PRE ``PATCH patients/{id}``: rewrite the request, no API call;
- (b) PRE ``GET patients/{id}``: one API GET of that patient, noted in a request header;
- (c) NOTIFICATION ``patient/_update``: three API GETs fanned out with :func:`fan_out`;
- (d) ADAPT_ENTITY ``patient``: mark each of the (50) entities of a search result.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from worker.bench import logic
from worker.client import fan_out
from worker.events import AdaptEntityInterception, Notification, PreInterception
from worker.routing import Context, Router


async def rewrite_request(view: PreInterception, ctx: Context) -> None:
    logic.mark_name(view.request.body)


async def note_patient(view: PreInterception, ctx: Context) -> None:
    patient_id = logic.path_variable(view.request.path_variables, "id") or "missing"
    patient = await ctx.api.get(logic.patient_url_path(patient_id))
    logic.note_patient(view.request.headers, patient)


async def _get(ctx: Context, path: str, search: dict[str, Any] | None) -> Any:
    params = None if search is None else {"searchRequest": search}
    return await ctx.api.get(path, params=params)


async def read_three(view: Notification, ctx: Context) -> None:
    calls = logic.notification_calls(str(view.entity.get("_id")))
    await fan_out([partial(_get, ctx, path, search) for path, search in calls])


async def mark_entities(view: AdaptEntityInterception, ctx: Context) -> None:
    logic.mark_entities(view.entities)


def build_routes() -> Router:
    router = Router()
    router.pre(rewrite_request, api_id=logic.API_ID_A)
    router.pre(note_patient, api_id=logic.API_ID_B)
    router.notification(read_three, entity="patient", action="_update")
    router.adapt_entity(mark_entities, entity="patient")
    return router
