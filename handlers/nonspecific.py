"""NONSPECIFIC examples: direct calls and scheduled runs."""

from __future__ import annotations

from typing import Any

from worker import Context, NonSpecific

PATIENTS = "/organization/v1/users/patients"


async def count_patients(event: NonSpecific, ctx: Context) -> dict[str, Any]:
    """Answer how many patients BioT holds: a scheduled job would do its work here."""
    page = await ctx.api.search(PATIENTS, limit=1)
    total = page.get("metadata", {}).get("page", {}).get("totalResults")
    return {"patients": total, "traceId": ctx.trace.trace_id}
