"""The queue source seam. (Placeholder until the queue adapters land.)"""

from __future__ import annotations

import asyncio

from config.settings import Settings
from worker.routing import Router


async def run_source(settings: Settings, routes: Router, url: str, *, stop: asyncio.Event) -> None:
    raise NotImplementedError("queue sources are not built yet")
