"""The other plugin's handlers."""

from __future__ import annotations

from worker import AdaptEntityInterception, Block, Context, Notification, PreInterception

DEVICE_LOGS = "/generic-entity/v1/generic-entities/templates/device_log"
CREATE_GENERIC_ENTITY = "POST/generic-entity/v1/generic-entities/templates/{templateName}"
HIDDEN = "hidden"


async def log_device_change(view: Notification, ctx: Context) -> None:
    """Record each device change as a ``device_log`` generic entity."""
    await ctx.api.post(
        DEVICE_LOGS,
        json={"_name": f"{view.action} {view.entity.get('_id')}", "device": view.entity.get("_id")},
    )
    ctx.log.info("device change logged", action=view.action)


async def hide_caregiver_email(view: AdaptEntityInterception, ctx: Context) -> None:
    """Caregivers' e-mail addresses are never returned."""
    for item in view.entities:
        if isinstance(item, dict) and "_email" in item:
            item["_email"] = HIDDEN


async def require_serial_number(view: PreInterception, ctx: Context) -> None:
    """A generic entity written without ``serialNumber`` is refused with 422."""
    if view.method not in ("POST", "PATCH"):
        return
    body = view.request.body
    serial = body.get("serialNumber") if isinstance(body, dict) else None
    if not serial:
        raise Block(422, "SERIAL_NUMBER_REQUIRED", "a serialNumber is required")
    body["serialNumber"] = str(serial).upper()
