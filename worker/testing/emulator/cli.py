"""The emulator's command-line flags, kept next to the emulator (the CLI adds host and port), and
what ``biot-worker emulator`` prints once it listens (:func:`describe`).

``--latency`` takes ``SECONDS`` (every route) or ``ROUTE=SECONDS``; ``--fail`` takes
``ROUTE=STATUS:COUNT`` (the next COUNT calls) or ``ROUTE=STATUS@RATE`` (each call with that
probability). Routes are patterns such as ``*``, ``/organization/*`` or ``"GET /organization/*"``.
"""

from __future__ import annotations

import argparse

from worker.testing.emulator.config import (
    DEFAULT_ADMIN_PASSWORD,
    DEFAULT_ADMIN_USERNAME,
    DEFAULT_SERVICE_USER_ID,
    DEFAULT_SERVICE_USER_SECRET,
    EmulatorConfig,
    ErrorRule,
)
from worker.testing.emulator.server import EmulatorServer


def parse_latency(value: str) -> tuple[str, float]:
    """``"0.2"`` -> ``("*", 0.2)``; ``"GET /x/*=0.2"`` -> ``("GET /x/*", 0.2)``."""
    route, sep, seconds = value.rpartition("=")
    route = route.strip() if sep else "*"
    try:
        delay = float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad latency {value!r}: want [ROUTE=]SECONDS") from None
    if delay < 0 or not route:
        raise argparse.ArgumentTypeError(f"bad latency {value!r}: want [ROUTE=]SECONDS >= 0")
    return route, delay


def parse_fail(value: str) -> ErrorRule:
    """``"GET /x/*=503:2"`` (next 2 calls) or ``"*=500@0.1"`` (10 % of calls)."""
    route, sep, spec = value.rpartition("=")
    route = route.strip() if sep else "*"
    try:
        if ":" in spec:
            status, count = spec.split(":", 1)
            return ErrorRule(route=route, status=int(status), count=int(count))
        status, _, rate = spec.partition("@")
        return ErrorRule(route=route, status=int(status), rate=float(rate) if rate else 1.0)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"bad failure {value!r}: want ROUTE=STATUS:COUNT or ROUTE=STATUS@RATE ({exc})"
        ) from None


def _positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return number


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the emulator's flags (all optional; defaults are :class:`EmulatorConfig`'s)."""
    group = parser.add_argument_group("emulator")
    add = group.add_argument
    add("--service-user-id", default=DEFAULT_SERVICE_USER_ID, help="service user id to accept")
    add(
        "--service-user-secret",
        default=DEFAULT_SERVICE_USER_SECRET,
        help="service user secret key to accept (a development value by default)",
    )
    add("--admin-username", default=DEFAULT_ADMIN_USERNAME, help="the BioT user that deploys")
    add(
        "--admin-password",
        default=DEFAULT_ADMIN_PASSWORD,
        help="its password (a development value by default)",
    )
    add("--token-lifetime", type=_positive, default=1800.0, help="token lifetime, seconds")
    add("--plugin-timeout", type=_positive, default=3.0, help="timeout of each plugin call")
    add(
        "--latency",
        type=parse_latency,
        action="append",
        default=[],
        metavar="[ROUTE=]SECONDS",
        help="added latency, repeatable",
    )
    add(
        "--fail",
        type=parse_fail,
        action="append",
        default=[],
        metavar="ROUTE=STATUS:COUNT|ROUTE=STATUS@RATE",
        help="injected errors, repeatable",
    )
    add("--login-delay", type=float, default=0.0, help="seconds added to every login")
    add("--login-fails", action="store_true", help="every login answers 503")
    add("--random-seed", type=int, default=None, help="seed for rate-based faults")
    add("--tls", action="store_true", help="serve HTTPS with a self-signed CA")
    add("--tls-dir", default=None, help="where to write (and reuse) the CA and certificate")
    add("--environment", default="emulator", help="environment named in error responses")
    add("--seed-patients", type=int, default=3, help="patients created at start")


def config_from_args(ns: argparse.Namespace) -> EmulatorConfig:
    """The :class:`EmulatorConfig` the flags describe; ``ValueError`` when inconsistent."""
    return EmulatorConfig(
        service_user_id=ns.service_user_id,
        service_user_secret=ns.service_user_secret,
        admin_username=ns.admin_username,
        admin_password=ns.admin_password,
        token_lifetime=ns.token_lifetime,
        plugin_timeout=ns.plugin_timeout,
        latency=dict(ns.latency),
        errors=tuple(ns.fail),
        login_delay=ns.login_delay,
        login_fails=ns.login_fails,
        random_seed=ns.random_seed,
        tls=ns.tls,
        tls_dir=ns.tls_dir,
        environment=ns.environment,
        seed_patients=ns.seed_patients,
    )


def describe(server: EmulatorServer) -> str:
    """What a developer needs once the emulator listens: the worker's environment (service
    user) and the deploy commands' (admin user), all development values."""
    emulator = server.emulator
    lines = [
        f"BioT emulator listening on {server.url}",
        f"  BIOT_BASE_URL={server.url}",
        f"  BIOT_SERVICE_USER_ID={emulator.service_user_id}",
        f"  BIOT_SERVICE_USER_SECRET_KEY={emulator.service_user_secret}   (a development value)",
    ]
    if server.ca_file:
        lines.append(f"  WORKER_CA_BUNDLE={server.ca_file}")
    lines += [
        "  deploy, subscribe and unsubscribe log in as the admin user:",
        f"  BIOT_USERNAME={emulator.admin_username}",
        f"  BIOT_PASSWORD={emulator.admin_password}   (a development value)",
        f"  admin API: {server.url}/_emulator/info",
    ]
    return "\n".join(lines) + "\n"
