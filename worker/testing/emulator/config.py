"""The emulator's start-up configuration: frozen, validated, with development defaults.

The service user's id and secret, and the admin user's username and password (the BioT user that
``biot-worker deploy`` and ``subscribe`` log in as), are fixed development values so that a
restarted emulator keeps working with the same environment; they protect nothing (the emulator
binds to loopback).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

DEFAULT_SERVICE_USER_ID: Final = "5e1c0a7d-3b2f-4c8e-9a61-0d4f2b7e8c13"
DEFAULT_SERVICE_USER_SECRET: Final = "biot-emulator-dev-secret"  # noqa: S105 - a dev-only fake
DEFAULT_ORGANIZATION_ID: Final = "00000000-0000-4000-8000-0000000000a1"
DEFAULT_ADMIN_USERNAME: Final = "admin@biot-emulator.local"
DEFAULT_ADMIN_PASSWORD: Final = "biot-emulator-dev-password"  # noqa: S105 - a dev-only fake


@dataclass(frozen=True, slots=True)
class ErrorRule:
    """Answer matching calls with ``status`` instead of serving them.

    ``route`` is a pattern: ``"*"``, a path glob (``/organization/v1/users/patients/*``) or a
    method and a path glob (``GET /organization/*``). With ``count`` the next ``count`` matching
    calls fail, then the rule is spent; otherwise each matching call fails with probability
    ``rate`` (drawn from the emulator's seeded random generator).
    """

    route: str = "*"
    status: int = 503
    count: int | None = None
    rate: float = 0.0

    def __post_init__(self) -> None:
        if not 400 <= self.status <= 599:
            raise ValueError(f"error status must be 4xx or 5xx, got {self.status}")
        if self.count is not None and self.count < 0:
            raise ValueError(f"error count must be 0 or more, got {self.count}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"error rate must be between 0 and 1, got {self.rate}")
        if not self.route.strip():
            raise ValueError("error route must not be empty")


@dataclass(frozen=True, slots=True)
class EmulatorConfig:
    """Everything the emulator is started with; the run-time knobs start from these values.

    ``latency`` maps a route pattern (as in :class:`ErrorRule`) to added seconds; every matching
    pattern adds its delay. ``login_fails`` makes the service-user login answer 503.
    """

    service_user_id: str = DEFAULT_SERVICE_USER_ID
    service_user_secret: str = field(default=DEFAULT_SERVICE_USER_SECRET, repr=False)
    organization_id: str = DEFAULT_ORGANIZATION_ID
    admin_username: str = DEFAULT_ADMIN_USERNAME
    admin_password: str = field(default=DEFAULT_ADMIN_PASSWORD, repr=False)
    token_lifetime: float = 1800.0
    plugin_timeout: float = 3.0
    latency: Mapping[str, float] = field(default_factory=dict)
    errors: tuple[ErrorRule, ...] = ()
    login_delay: float = 0.0
    login_fails: bool = False
    random_seed: int | None = None
    tls: bool = False
    tls_dir: str | None = None
    environment: str = "emulator"
    seed_patients: int = 3
    notification_grace: float = 5.0
    call_log_size: int = 10_000

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ValueError("invalid emulator config: " + "; ".join(problems))


def _problems(config: EmulatorConfig) -> list[str]:
    problems: list[str] = []
    for name in ("token_lifetime", "plugin_timeout", "notification_grace"):
        if getattr(config, name) <= 0:
            problems.append(f"{name} must be greater than 0")
    if config.login_delay < 0:
        problems.append("login_delay must be 0 or more")
    if config.seed_patients < 0:
        problems.append("seed_patients must be 0 or more")
    if config.call_log_size <= 0:
        problems.append("call_log_size must be greater than 0")
    if not config.service_user_id or not config.service_user_secret:
        problems.append("service_user_id and service_user_secret must not be empty")
    if not config.admin_username or not config.admin_password:
        problems.append("admin_username and admin_password must not be empty")
    problems.extend(
        f"latency for {route!r} must be 0 or more"
        for route, seconds in config.latency.items()
        if seconds < 0
    )
    return problems
