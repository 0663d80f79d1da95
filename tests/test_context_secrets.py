"""What a handler can reach from ``ctx`` in a real worker: not the settings with the service
secret, not the composition root. (Python hides nothing: the BioT client's private login holds
the one credential it must send, and nothing more.)"""

from __future__ import annotations

import asyncio
import types
from collections import deque
from typing import Any

from config.settings import Settings
from worker import Context, NonSpecific, Router
from worker.app import WorkerApp
from worker.testing import emulated_biot, nonspecific_event

# Walking into these would reach everything in the process (the event loop holds every
# scheduled callback), not what ctx holds.
_OPAQUE = (
    types.ModuleType,
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.CodeType,
    asyncio.AbstractEventLoop,
)


def reachable(root: object, limit: int = 20_000) -> list[object]:
    """Objects reachable from ``root`` through instance attributes, bound methods and
    containers (breadth first, bounded)."""
    seen: dict[int, object] = {}
    queue: deque[object] = deque([root])
    while queue and len(seen) < limit:
        obj = queue.popleft()
        if id(obj) in seen or isinstance(obj, _OPAQUE):
            continue
        seen[id(obj)] = obj
        queue.extend(_children(obj))
    return list(seen.values())


def _children(obj: object) -> list[object]:
    if isinstance(obj, types.MethodType):
        return [obj.__self__]
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, list | tuple | set | frozenset | deque):
        return list(obj)
    children: list[object] = list(getattr(obj, "__dict__", {}).values())
    for klass in type(obj).__mro__:
        for name in getattr(klass, "__slots__", ()):
            if hasattr(obj, name):
                children.append(getattr(obj, name))
    return children


async def test_a_handler_cannot_walk_from_ctx_to_the_settings_or_the_app() -> None:
    contexts: list[Context] = []

    async def grab(view: NonSpecific, ctx: Context) -> dict[str, Any]:
        contexts.append(ctx)
        return {}

    async with emulated_biot(Router().nonspecific(grab)) as biot:
        response = await biot.send(nonspecific_event({}))
        assert response.status == 200
        secret = biot.app.settings.biot.service_user_secret
        assert secret
        found = reachable(contexts[0])
    assert len(found) > 10  # the walk did go through the client, its session and token cache
    assert not any(isinstance(obj, WorkerApp) for obj in found)
    leaking = [
        obj for obj in found if isinstance(obj, Settings) and obj.biot.service_user_secret
    ]
    assert leaking == []
    holders = [type(obj).__name__ for obj in found if any(v is secret for v in _children(obj))]
    assert holders == ["ServiceLogin"]
