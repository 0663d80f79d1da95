"""``biot-worker subscribe`` / ``unsubscribe``: a self-hosted worker's dispatcher subscriptions.

:func:`subscribe` first lists what the dispatcher holds for the endpoint (its search APIs,
filtered by ``endpoint``), then sends only what is missing: a notification is there when its
entity type, action and template are; an interception when its type and ``apiId`` (or
``entityName``) are, at the route's ``order`` as ``executionOrder`` (a route without one takes
whatever order BioT gave). BioT's dispatcher answers 409 to a notification that exists and
overrides an interception's ``executionOrder`` in place, so a second run sends nothing and says
"nothing to change: N subscriptions already in place". With ``prune``, this endpoint's
subscriptions that no route asks for are unsubscribed; without it they are named as a warning.
Before anything, every ``apiId`` and entity type is checked against ``GET
/settings/v1/interceptions``, as ``deploy`` does: an unknown one is refused with the closest
known names and nothing is subscribed.
``dry_run`` prints what would be sent and sends nothing. :func:`unsubscribe` removes every
subscription of the endpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from worker.deploy.admin import BiotAdmin, Credentials, open_admin
from worker.deploy.deploy import DeployError, check_targets
from worker.deploy.subscriptions import Kind, self_hosted_requests, subscriptions_of
from worker.routing import Router

KINDS: tuple[Kind, ...] = ("notifications", "interceptions")
Warn = Callable[[str], None]


@dataclass(slots=True)
class Outcome:
    """What :func:`subscribe` did (or, in a dry run, would do)."""

    subscribed: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    in_place: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.subscribed or self.pruned)


async def run_subscribe(
    credentials: Credentials,
    routes: Router,
    endpoint: str,
    *,
    prune: bool,
    dry_run: bool,
    out: TextIO,
    warn: Warn,
) -> int:
    async with open_admin(credentials) as admin:
        await subscribe(admin, routes, endpoint, prune=prune, dry_run=dry_run, out=out, warn=warn)
    return 0


async def run_unsubscribe(credentials: Credentials, endpoint: str, *, out: TextIO) -> int:
    async with open_admin(credentials) as admin:
        await unsubscribe(admin, endpoint, out=out)
    return 0


async def subscribe(
    admin: BiotAdmin,
    routes: Router,
    endpoint: str,
    *,
    prune: bool = False,
    dry_run: bool = False,
    out: TextIO,
    warn: Warn,
) -> Outcome:
    """Make the dispatcher's subscriptions of ``endpoint`` those of ``routes``; first, as
    ``deploy`` does, refuse every ``apiId`` or entity type BioT does not list
    (:class:`~worker.deploy.deploy.DeployError`), before anything is sent."""
    subscriptions = subscriptions_of(routes)
    for line in subscriptions.unsupported:
        warn(line)
    problems = check_targets(subscriptions.config, await admin.interceptions())
    if problems:
        raise DeployError(problems)
    held = {kind: await admin.subscriptions(kind, endpoint) for kind in KINDS}
    wanted = self_hosted_requests(routes, endpoint)
    outcome = Outcome()
    for kind, body in wanted:
        described = describe(kind, body)
        if any(_satisfies(kind, item, body) for item in held[kind]):
            outcome.in_place.append(described)
        elif dry_run or await admin.subscribe(kind, body):
            outcome.subscribed.append(described)
        else:  # 409: it was there after all
            outcome.in_place.append(described)
    keys = {(kind, _key(kind, body)) for kind, body in wanted}
    for kind in KINDS:
        for item in held[kind]:
            if (kind, _key(kind, item)) in keys:
                continue
            if not prune:
                outcome.stale.append(describe(kind, item))
                continue
            if not dry_run:
                await admin.unsubscribe(kind, unsubscribe_body(kind, item))
            outcome.pruned.append(describe(kind, item))
    _report(outcome, endpoint, dry_run=dry_run, out=out, warn=warn)
    return outcome


async def unsubscribe(admin: BiotAdmin, endpoint: str, *, out: TextIO) -> list[str]:
    """Remove every dispatcher subscription of ``endpoint``; what was removed."""
    removed: list[str] = []
    for kind in KINDS:
        for item in await admin.subscriptions(kind, endpoint):
            await admin.unsubscribe(kind, unsubscribe_body(kind, item))
            removed.append(describe(kind, item))
    if not removed:
        _write(out, [f"nothing to remove: no subscription of {endpoint}"])
    else:
        lines = [f"  - {line}" for line in removed]
        _write(out, [*lines, f"removed {len(removed)} subscription(s) of {endpoint}"])
    return removed


def _report(outcome: Outcome, endpoint: str, *, dry_run: bool, out: TextIO, warn: Warn) -> None:
    for line in outcome.stale:
        warn(f"{line}: subscribed but no route asks for it (--prune removes it)")
    if not outcome.changed:
        count = len(outcome.in_place)
        _write(out, [f"nothing to change: {count} subscription(s) already in place"])
        return
    lines = [f"  + {line}" for line in outcome.subscribed]
    lines += [f"  - {line}" for line in outcome.pruned]
    verb = ("would subscribe", "would prune") if dry_run else ("subscribed", "pruned")
    lines.append(
        f"{verb[0]} {len(outcome.subscribed)}, {verb[1]} {len(outcome.pruned)}, "
        f"{len(outcome.in_place)} already in place ({endpoint})"
    )
    if dry_run:
        lines.append("dry run: nothing was changed")
    _write(out, lines)


def _write(out: TextIO, lines: Iterable[str]) -> None:
    out.write("".join(line + "\n" for line in lines))
    out.flush()


# ---------------------------------------------------------------- matching


def _key(kind: str, item: Mapping[str, Any]) -> tuple[Any, ...]:
    """What makes a subscription the same one: its target, not its order or id."""
    if kind == "notifications":
        return (item.get("entityTypeName"), item.get("actionName"), item.get("templateName"))
    filters = tuple(sorted((item.get("pathFilters") or {}).items()))
    target = item.get("apiId") or item.get("entityName")
    return (item.get("type"), target, filters)


def _satisfies(kind: str, held: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    if _key(kind, held) != _key(kind, wanted):
        return False
    order = wanted.get("executionOrder")
    return order is None or held.get("executionOrder") == order


def unsubscribe_body(kind: str, item: Mapping[str, Any]) -> dict[str, Any]:
    """The dispatcher's unsubscribe body for a subscription its search returned."""
    keys = (
        ("entityTypeName", "actionName", "endpoint", "templateName")
        if kind == "notifications"
        else ("type", "apiId", "entityName", "endpoint", "pathFilters")
    )
    return {key: item[key] for key in keys if item.get(key) not in (None, {})}


def describe(kind: str, body: Mapping[str, Any]) -> str:
    """One line: ``notification patient/_create`` or ``interception PRE_REQUEST apiId=...``."""
    if kind == "notifications":
        template = body.get("templateName")
        suffix = f" template={template}" if template else ""
        return f"notification {body.get('entityTypeName')}/{body.get('actionName')}{suffix}"
    target = (
        f"entityName={body.get('entityName')}"
        if body.get("entityName")
        else f"apiId={body.get('apiId')}"
    )
    order = body.get("executionOrder")
    filters = body.get("pathFilters")
    text = f"interception {body.get('type')} {target}"
    text += f" executionOrder={order}" if order is not None else ""
    return text + (f" pathFilters={filters}" if filters else "")
