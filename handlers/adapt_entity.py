"""ADAPT_ENTITY examples: rewrite each entity BioT is about to return (also in searches)."""

from __future__ import annotations

from worker import AdaptEntityInterception, Context

MARK = " LAMBDA"


async def mark_entities(event: AdaptEntityInterception, ctx: Context) -> None:
    """Append a mark to ``_name.firstName`` of every entity, as BioT's sample does."""
    for entity in event.entities:
        name = entity.get("_name") if isinstance(entity, dict) else None
        if isinstance(name, dict) and isinstance(name.get("firstName"), str):
            name["firstName"] += MARK
