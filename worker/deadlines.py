"""The current event's deadline, as an absolute ``loop.time()`` value in a ``ContextVar``.

The dispatcher binds it when it starts a handler; the BioT client reads it to bound each call
(and its retries) by what is left of the event's time.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar

current_deadline: ContextVar[float | None] = ContextVar("biot_deadline", default=None)


def remaining(deadline: float | None = None) -> float | None:
    """Seconds left before ``deadline`` (default: the current event's), or ``None`` if unbounded."""
    if deadline is None:
        deadline = current_deadline.get()
    if deadline is None:
        return None
    return deadline - asyncio.get_running_loop().time()
