"""POST_REQUEST examples: run after BioT handled the call; may rewrite the response."""

from __future__ import annotations

from worker import Context, PostInterception

MARK = " LAMBDA MODIFIED"


async def mark_response(event: PostInterception, ctx: Context) -> None:
    """Append a mark to ``_name.firstName`` of the response body, as BioT's sample does."""
    body = event.body
    if isinstance(body, dict) and isinstance(body.get("_name"), dict):
        name = body["_name"]
        if isinstance(name.get("firstName"), str):
            name["firstName"] += MARK
