"""NOTIFICATION examples: BioT calls these after an entity action succeeded."""

from __future__ import annotations

from worker import Context, Notification

PATIENTS = "/organization/v1/users/patients"


async def patient_changed(event: Notification, ctx: Context) -> None:
    """Like BioT's sample plugin: read patients with the service token, log what happened."""
    page = await ctx.api.search(PATIENTS, limit=10)
    total = page.get("metadata", {}).get("page", {}).get("totalResults")
    changed = sorted(set(event.entity) ^ set(event.old_entity or {}))
    ctx.log.info(
        "patient notification handled",
        action=event.action,
        patient_id=event.entity.get("_id"),
        patients_total=total,
        attributes_added_or_removed=changed,
    )
