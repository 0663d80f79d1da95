"""A second plugin, unlike the examples, that ``scripts/check_swapped_plugin.py`` puts in place
of ``handlers/``: device notifications, ADAPT_ENTITY on caregivers, PRE on generic entities, no
NONSPECIFIC handler. Its imports are relative, so it works as ``other_plugin`` or
``tests.other_plugin``.
"""

from __future__ import annotations

from worker import Router

from .hooks import (
    CREATE_GENERIC_ENTITY,
    DEVICE_LOGS,
    hide_caregiver_email,
    log_device_change,
    require_serial_number,
)

__all__ = ["CREATE_GENERIC_ENTITY", "DEVICE_LOGS", "build_routes"]


def build_routes() -> Router:
    """The other plugin's routing table."""
    router = Router()
    router.notification(log_device_change, entity="device", action="_create")
    router.notification(log_device_change, entity="device", action="_update")
    router.adapt_entity(hide_caregiver_email, entity="caregiver", order=5)
    router.pre(require_serial_number, api_id=CREATE_GENERIC_ENTITY, order=2)
    return router
