"""Structured fan-out: run many awaitable calls (BioT API calls, typically) with a bound.

Contract: :func:`fan_out` runs at most ``limit`` calls at a time and returns their results in
input order; when one fails, the others are cancelled and the first failure in input order is
raised as itself (never an ``ExceptionGroup``), so handlers can ``except ApiError``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


async def fan_out(calls: Iterable[Callable[[], Awaitable[T]]], *, limit: int = 8) -> list[T]:
    """Run the calls concurrently, at most ``limit`` at a time; results in input order.

    Structured: when one fails the others are cancelled, and the failure of the first failed
    call (in input order) is raised as itself, not as an ``ExceptionGroup``, so that handlers
    can ``except ApiError``; a note on it counts any other failures.
    """
    if limit < 1:
        raise ValueError(f"limit must be 1 or more, got {limit}")
    factories = list(calls)
    gate = asyncio.Semaphore(limit)

    async def gated(call: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await call()

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(gated(call)) for call in factories]
    except ExceptionGroup as failures:
        raise _first_failure(tasks, failures) from None
    return [task.result() for task in tasks]


def _first_failure(tasks: list[asyncio.Task[Any]], failures: ExceptionGroup[Any]) -> Exception:
    # The group lists failures in the order they happened; callers expect input order.
    failed = [task.exception() for task in tasks if task.done() and not task.cancelled()]
    first = next((exc for exc in failed if isinstance(exc, Exception)), failures.exceptions[0])
    if len(failures.exceptions) > 1:
        first.add_note(f"{len(failures.exceptions) - 1} other call(s) of the fan-out also failed")
    return first
