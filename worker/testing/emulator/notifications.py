"""Notifications after successful actions, sent in the background as BioT's dispatcher does.

The caller never waits for them. Every delivery task is tracked: :meth:`Notifier.drain` waits for
all of them (tests use it instead of sleeping), :meth:`Notifier.close` waits a grace period on
shutdown and then cancels what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from worker.testing.emulator.identity import Caller, TokenService
from worker.testing.emulator.plugins import HookClient
from worker.testing.emulator.subscriptions import NotificationSubscription, Subscriptions
from worker.testing.emulator.wire import Clock, iso_ms
from worker.tracing import TraceContext

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Action:
    """A completed action on an entity, as the notification reports it."""

    entity_type: str
    action: str
    entity: dict[str, Any]
    old_entity: dict[str, Any] | None
    caller: Caller
    trace: TraceContext
    started: float
    source_ip: str | None = None


class Notifier:
    def __init__(
        self,
        subscriptions: Subscriptions,
        client: HookClient,
        tokens: TokenService,
        clock: Clock,
    ) -> None:
        self._subscriptions = subscriptions
        self._client = client
        self._tokens = tokens
        self._clock = clock
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        return len(self._tasks)

    def schedule(self, action: Action) -> None:
        """Start delivering ``action`` to its subscribers (those subscribed right now)."""
        template = action.entity.get("_template")
        template_name = template.get("name") if isinstance(template, dict) else None
        targets = self._subscriptions.notification_targets(
            action.entity_type, action.action, template_name
        )
        if not targets:
            return
        body = self._body(action)
        task = asyncio.create_task(self._deliver(targets, body, action.trace))
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("notification delivery failed", exc_info=task.exception())

    async def drain(self) -> None:
        """Wait until every scheduled delivery has finished (including ones they trigger).

        Cancelling the wait does not cancel the deliveries.
        """
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def close(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for deliveries, then cancel the rest."""
        if not self._tasks:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self.drain()
        pending = list(self._tasks)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _deliver(
        self,
        targets: list[NotificationSubscription],
        body: dict[str, Any],
        trace: TraceContext,
    ) -> None:
        results = await asyncio.gather(
            *(self._client.notify(sub.endpoint, body, trace) for sub in targets),
            return_exceptions=True,
        )
        for sub, result in zip(targets, results, strict=True):
            if isinstance(result, Exception):
                _log.error(
                    "notification to %s failed: %r",
                    sub.endpoint,
                    result,
                    extra={"traceId": trace.trace_id},
                )

    def _body(self, action: Action) -> dict[str, Any]:
        initiator: dict[str, Any] = {"subject": {"id": action.caller.subject_id}}
        if action.source_ip:
            initiator["sourceIpAddress"] = action.source_ip
        additional: dict[str, Any] = {}
        if action.old_entity is not None:
            additional["oldEntity"] = action.old_entity
        return {
            "metadata": {
                "entityTypeName": action.entity_type,
                "actionName": action.action,
                "status": "SUCCESS",
                "startTime": iso_ms(action.started),
                "endTime": iso_ms(self._clock()),
                "traceId": action.trace.trace_id,
                "initiator": initiator,
            },
            "data": {"entity": action.entity, "additionalData": additional},
            "jwt": self._tokens.internal_token("ACTION_NOTIFICATION"),
        }
