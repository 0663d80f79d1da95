"""PRE_REQUEST examples: run before BioT handles the user's call; may rewrite or block it."""

from __future__ import annotations

from typing import Any

from worker import Block, Context, PreInterception

MARK = " LAMBDA MODIFIED"
FORBIDDEN_NAME = "FORBIDDEN"


async def mark_request(event: PreInterception, ctx: Context) -> None:
    """Append a mark to ``_name.firstName`` in the request body, as BioT's sample does.

    A request that names a patient "FORBIDDEN" is blocked, to show how a PRE handler refuses a
    call: the user gets 403 with BioT's error envelope.
    """
    name = _name(event.request.body)
    if name is None:
        return
    if name.get("firstName") == FORBIDDEN_NAME:
        raise Block(
            403, "MODIFICATION_FORBIDDEN", "this first name is not allowed", {"field": "_name"}
        )
    if isinstance(name.get("firstName"), str):
        name["firstName"] += MARK


def _name(body: Any) -> dict[str, Any] | None:
    name = body.get("_name") if isinstance(body, dict) else None
    return name if isinstance(name, dict) else None
