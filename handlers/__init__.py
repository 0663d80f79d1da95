"""The plugin's own handlers and its routing table.

Each hook type has a module; :func:`build_routes` is the explicit table that says which handler
answers which event. Replace these examples with your plugin's logic: a handler is
``async def handler(view, ctx)`` where ``view`` is the event's typed view and ``ctx`` carries
``ctx.api`` (the BioT client), ``ctx.log``, ``ctx.trace``, ``ctx.deadline`` and ``ctx.settings``.
"""

from __future__ import annotations

from handlers import adapt_entity, interceptor_post, interceptor_pre, nonspecific, notification
from worker.routing import Router

PATCH_PATIENT = "PATCH/organization/v1/users/patients/{id}"


def build_routes() -> Router:
    """The routing table of this plugin (the examples equivalent to BioT's sample plugin)."""
    router = Router()
    router.notification("patient", "_create", notification.patient_changed)
    router.notification("patient", "_update", notification.patient_changed)
    # BioT subscribes PRE and POST interceptors by apiId, ADAPT_ENTITY by entity name.
    router.pre(interceptor_pre.mark_request, api_id=PATCH_PATIENT)
    router.adapt_entity(adapt_entity.mark_entities, entity="patient")
    router.post(interceptor_post.mark_response, api_id=PATCH_PATIENT)
    router.nonspecific(nonspecific.count_patients)
    return router
