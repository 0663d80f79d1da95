"""The example plugin: BioT's sample plugin written for biot-worker.

Replace this package with your plugin (or point ``WORKER_ROUTES`` at another
``module:function``). A handler is ``async def handler(view, ctx)``: ``view`` is the event's typed
view, ``ctx`` a :class:`worker.Context` (``ctx.api``, ``ctx.log``, ``ctx.trace``,
``ctx.remaining()``). :func:`build_routes` is the explicit table of which handler answers what;
it is also what ``biot-worker dev`` subscribes to the emulator. ``handlers/test_handlers.py`` tests
these examples: replace it along with them.
"""

from __future__ import annotations

from handlers import adapt_entity, interceptor_post, interceptor_pre, nonspecific, notification
from worker import Router

PATCH_PATIENT = "PATCH/organization/v1/users/patients/{id}"


def build_routes() -> Router:
    """The routing table of this plugin (the examples equivalent to BioT's sample plugin)."""
    router = Router()
    router.notification(notification.patient_changed, entity="patient", action="_create")
    router.notification(notification.patient_changed, entity="patient", action="_update")
    # BioT subscribes PRE and POST interceptors by apiId, ADAPT_ENTITY by entity name.
    router.pre(interceptor_pre.mark_request, api_id=PATCH_PATIENT, order=1)
    router.adapt_entity(adapt_entity.mark_entities, entity="patient", order=1)
    router.post(interceptor_post.mark_response, api_id=PATCH_PATIENT, order=1)
    router.nonspecific(nonspecific.count_patients)
    return router
