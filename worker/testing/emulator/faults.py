"""Run-time faults: added latency per route, injected error statuses, login trouble, token lifetime.

Start values come from :class:`EmulatorConfig`; the admin API reads and changes them while the
emulator runs. Route patterns: ``"*"``, a path glob, or ``"METHOD path-glob"``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from worker.testing.emulator.config import EmulatorConfig, ErrorRule


def route_matches(pattern: str, method: str, path: str) -> bool:
    """Whether ``METHOD path`` matches ``pattern`` (``*`` in globs also crosses ``/``)."""
    pattern = pattern.strip()
    if pattern == "*":
        return True
    verb, _, glob = pattern.partition(" ")
    if not glob:
        return fnmatchcase(path, pattern)
    return (verb == "*" or verb.upper() == method.upper()) and fnmatchcase(path, glob.strip())


@dataclass(slots=True)
class _ActiveRule:
    rule: ErrorRule
    remaining: int | None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"route": self.rule.route, "status": self.rule.status}
        if self.remaining is not None:
            body["count"] = self.remaining
        else:
            body["rate"] = self.rule.rate
        return body


class Faults:
    """The mutable fault settings; every method is synchronous and cheap."""

    def __init__(self, config: EmulatorConfig) -> None:
        self._config = config
        self._random = random.Random(config.random_seed)
        self.latency: dict[str, float] = {}
        self.rules: list[_ActiveRule] = []
        self.login_delay = 0.0
        self.login_fails = False
        self.token_lifetime = config.token_lifetime
        self.reset()

    def reset(self) -> None:
        """Back to the start-up configuration."""
        config = self._config
        self.latency = dict(config.latency)
        self.rules = [_ActiveRule(rule, rule.count) for rule in config.errors]
        self.login_delay = config.login_delay
        self.login_fails = config.login_fails
        self.token_lifetime = config.token_lifetime

    def delay_for(self, method: str, path: str) -> float:
        """Seconds to add to this call: the sum over matching latency patterns."""
        return sum(s for p, s in self.latency.items() if route_matches(p, method, path))

    def error_for(self, method: str, path: str) -> int | None:
        """The status to fail this call with, if a rule fires; counted rules are consumed."""
        for active in list(self.rules):
            if not route_matches(active.rule.route, method, path):
                continue
            if active.remaining is not None:
                if active.remaining <= 0:
                    continue
                active.remaining -= 1
                if active.remaining == 0:
                    self.rules.remove(active)
                return active.rule.status
            if self._random.random() < active.rule.rate:
                return active.rule.status
        return None

    def snapshot(self) -> dict[str, Any]:
        return {
            "latency": dict(self.latency),
            "errors": [active.to_json() for active in self.rules],
            "loginDelay": self.login_delay,
            "loginFails": self.login_fails,
            "tokenLifetime": self.token_lifetime,
        }

    def update(self, body: Mapping[str, Any]) -> None:
        """Apply the keys present in ``body`` (``snapshot()`` names); all-or-nothing.

        Raises ``ValueError`` naming the bad key; nothing changes then.
        """
        unknown = set(body) - {"latency", "errors", "loginDelay", "loginFails", "tokenLifetime"}
        if unknown:
            raise ValueError(f"unknown fault settings: {sorted(unknown)}")
        latency = _latency(body["latency"]) if "latency" in body else self.latency
        rules = _rules(body["errors"]) if "errors" in body else self.rules
        delay = _number(body, "loginDelay", self.login_delay, minimum=0.0)
        lifetime = _number(body, "tokenLifetime", self.token_lifetime, minimum=1e-3)
        fails = body.get("loginFails", self.login_fails)
        if not isinstance(fails, bool):
            raise ValueError("loginFails must be true or false")
        self.latency, self.rules = latency, rules
        self.login_delay, self.login_fails, self.token_lifetime = delay, fails, lifetime


def _number(body: Mapping[str, Any], key: str, default: float, *, minimum: float) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise ValueError(f"{key} must be a number of at least {minimum}")
    return float(value)


def _latency(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ValueError("latency must be an object of route pattern -> seconds")
    result: dict[str, float] = {}
    for route, seconds in value.items():
        result[str(route)] = _number({"latency": seconds}, "latency", 0.0, minimum=0.0)
    return result


def _rules(value: Any) -> list[_ActiveRule]:
    if not isinstance(value, list):
        raise ValueError("errors must be a list of {route, status, count | rate}")
    rules: list[_ActiveRule] = []
    for item in value:
        if not isinstance(item, dict) or set(item) - {"route", "status", "count", "rate"}:
            raise ValueError("each error rule is {route, status, count | rate}")
        try:
            rule = ErrorRule(**item)
        except TypeError as exc:
            raise ValueError(f"bad error rule {item!r}") from exc
        rules.append(_ActiveRule(rule, rule.count))
    return rules
