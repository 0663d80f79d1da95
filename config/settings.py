"""Settings: frozen dataclasses built once from a mapping (normally ``os.environ``).

Contract:
- Nothing here reads the environment on its own: :func:`load_settings` takes the mapping, plus
  optional overrides (the CLI flags, keyed by the same variable names).
- Every value is checked; one :class:`SettingsError` names every bad or missing value at once.
- Secrets are kept out of ``repr`` so a settings object can be logged safely.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, TypeVar

T = TypeVar("T")

DEFAULT_NOTIFICATION_SCOPE: Final = "ACTION_NOTIFICATION"
DEFAULT_INTERCEPTION_SCOPE: Final = "PLUGIN_INTERCEPTOR"
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_BACKENDS: Final = ("stdlib", "aiologger")
EVENT_LOOPS: Final = ("asyncio", "uvloop")


class SettingsError(ValueError):
    """Raised with every problem found, one per line, so a start fails once with the full list."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid settings:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True, slots=True)
class BiotSettings:
    """The platform's own variables (platform §9)."""

    base_url: str | None = None
    service_user_id: str | None = None
    service_user_secret: str | None = field(default=None, repr=False)
    app_name: str = "biot-worker"
    environment: str = "Not specified"
    validate_jwt: bool = True
    public_key: str | None = field(default=None, repr=False)
    # Scope required in the platform's JWT per hook; None means "not checked".
    notification_scope: str | None = DEFAULT_NOTIFICATION_SCOPE
    interception_scope: str | None = DEFAULT_INTERCEPTION_SCOPE
    nonspecific_scope: str | None = None


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """The worker's own knobs, all under ``WORKER_``."""

    host: str = "127.0.0.1"
    port: int = 8080
    max_in_flight: int = 256
    max_body_bytes: int = 1_048_576
    deadline_notification: float = 30.0
    deadline_interceptor: float = 2.5
    deadline_nonspecific: float = 30.0
    shutdown_grace: float = 10.0
    log_level: str = "INFO"
    log_backend: str = "stdlib"
    allow_nonspecific_without_jwt: bool = True
    jwt_leeway: float = 5.0
    public_key_ttl: float = 3600.0
    key_refetch_cooldown: float = 5.0
    token_refresh_margin: float = 60.0
    api_timeout: float = 10.0
    api_retries: int = 3
    api_backoff_base: float = 0.05
    api_backoff_max: float = 1.0
    api_max_connections: int = 100
    ca_bundle: str | None = None
    routes: str = "handlers:build_routes"
    event_loop: str = "asyncio"


@dataclass(frozen=True, slots=True)
class Settings:
    biot: BiotSettings = field(default_factory=BiotSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)


# ---------------------------------------------------------------- parsing


def _str(raw: str) -> str:
    return raw


def _opt_str(raw: str) -> str | None:
    return raw or None


def _int(raw: str) -> int:
    return int(raw)


def _float(raw: str) -> float:
    return float(raw)


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _routes_ref(raw: str) -> str:
    module, _, function = raw.strip().partition(":")
    if not module or not function:
        raise ValueError(f"expected module:function, got {raw!r}")
    return raw.strip()


def _validate_jwt_flag(raw: str) -> bool:
    # The platform's rule (§3): only the literal "false" (any case) switches validation off.
    return raw.strip().lower() != "false"


class _Reader:
    """Reads variables from the merged mapping and collects problems instead of raising."""

    def __init__(self, source: Mapping[str, str]) -> None:
        self.source = source
        self.problems: list[str] = []

    def get(self, name: str, parse: Callable[[str], T], default: T) -> T:
        raw = self.source.get(name)
        if raw is None:
            return default
        try:
            return parse(raw)
        except ValueError as exc:
            self.problems.append(f"{name}: {_describe(exc)}")
            return default

    def positive(self, name: str, parse: Callable[[str], T], default: T) -> T:
        value = self.get(name, parse, default)
        if isinstance(value, int | float) and value <= 0:
            self.problems.append(f"{name}: must be greater than 0, got {value}")
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(name, _str, default)
        normalized = value.upper() if choices is LOG_LEVELS else value.lower()
        if normalized not in choices:
            self.problems.append(f"{name}: must be one of {', '.join(choices)}, got {value!r}")
            return default
        return normalized

    def scope(self, name: str, fallback: str | None) -> str | None:
        # An explicitly empty value switches the scope check off for that hook.
        if name in self.source:
            return self.source[name].strip() or None
        return fallback


def _describe(exc: ValueError) -> str:
    text = str(exc)
    if text.startswith("invalid literal") or text.startswith("could not convert"):
        return "not a number: " + text.rsplit(":", 1)[-1].strip()
    return text


def _read_biot(r: _Reader) -> BiotSettings:
    base_url = r.get("BIOT_BASE_URL", _opt_str, None)
    if base_url is not None:
        if not base_url.startswith(("http://", "https://")):
            r.problems.append(
                f"BIOT_BASE_URL: must start with http:// or https://, got {base_url!r}"
            )
        base_url = base_url.rstrip("/")
    user_id = r.get("BIOT_SERVICE_USER_ID", _opt_str, None)
    secret = r.get("BIOT_SERVICE_USER_SECRET_KEY", _opt_str, None)
    if base_url is not None:
        if user_id is None:
            r.problems.append("BIOT_SERVICE_USER_ID: required when BIOT_BASE_URL is set")
        if secret is None:
            r.problems.append("BIOT_SERVICE_USER_SECRET_KEY: required when BIOT_BASE_URL is set")
    shared = r.scope("JWT_PERMISSION", None)
    return BiotSettings(
        base_url=base_url,
        service_user_id=user_id,
        service_user_secret=secret,
        app_name=r.get("BIOT_APP_NAME", _str, "biot-worker") or "biot-worker",
        environment=r.get("BIOT_SERVICE_ENVIRONMENT", _str, "Not specified") or "Not specified",
        validate_jwt=r.get("BIOT_SHOULD_VALIDATE_JWT", _validate_jwt_flag, True),
        public_key=r.get("BIOT_PUBLIC_KEY", _opt_str, None),
        notification_scope=r.scope(
            "BIOT_JWT_PERMISSION_NOTIFICATION", shared or DEFAULT_NOTIFICATION_SCOPE
        ),
        interception_scope=r.scope(
            "BIOT_JWT_PERMISSION_INTERCEPTION", shared or DEFAULT_INTERCEPTION_SCOPE
        ),
        nonspecific_scope=shared,
    )


def _read_worker(r: _Reader) -> WorkerSettings:
    d = WorkerSettings()
    port = r.get("WORKER_PORT", _int, d.port)
    if not 0 <= port <= 65535:
        r.problems.append(f"WORKER_PORT: must be between 0 and 65535, got {port}")
    retries = r.get("WORKER_API_RETRIES", _int, d.api_retries)
    if retries < 0:
        r.problems.append(f"WORKER_API_RETRIES: must be 0 or more, got {retries}")
    leeway = r.get("WORKER_JWT_LEEWAY", _float, d.jwt_leeway)
    if leeway < 0:
        r.problems.append(f"WORKER_JWT_LEEWAY: must be 0 or more, got {leeway}")
    return WorkerSettings(
        host=r.get("WORKER_HOST", _str, d.host),
        port=port,
        max_in_flight=r.positive("WORKER_MAX_IN_FLIGHT", _int, d.max_in_flight),
        max_body_bytes=r.positive("WORKER_MAX_BODY_BYTES", _int, d.max_body_bytes),
        deadline_notification=r.positive(
            "WORKER_DEADLINE_NOTIFICATION", _float, d.deadline_notification
        ),
        deadline_interceptor=r.positive(
            "WORKER_DEADLINE_INTERCEPTOR", _float, d.deadline_interceptor
        ),
        deadline_nonspecific=r.positive(
            "WORKER_DEADLINE_NONSPECIFIC", _float, d.deadline_nonspecific
        ),
        shutdown_grace=r.positive("WORKER_SHUTDOWN_GRACE", _float, d.shutdown_grace),
        log_level=r.choice("WORKER_LOG_LEVEL", LOG_LEVELS, d.log_level),
        log_backend=r.choice("WORKER_LOG_BACKEND", LOG_BACKENDS, d.log_backend),
        allow_nonspecific_without_jwt=r.get(
            "WORKER_ALLOW_NONSPECIFIC_WITHOUT_JWT", _bool, d.allow_nonspecific_without_jwt
        ),
        jwt_leeway=leeway,
        public_key_ttl=r.positive("WORKER_PUBLIC_KEY_TTL", _float, d.public_key_ttl),
        key_refetch_cooldown=r.positive(
            "WORKER_KEY_REFETCH_COOLDOWN", _float, d.key_refetch_cooldown
        ),
        token_refresh_margin=r.positive(
            "WORKER_TOKEN_REFRESH_MARGIN", _float, d.token_refresh_margin
        ),
        api_timeout=r.positive("WORKER_API_TIMEOUT", _float, d.api_timeout),
        api_retries=retries,
        api_backoff_base=r.positive("WORKER_API_BACKOFF_BASE", _float, d.api_backoff_base),
        api_backoff_max=r.positive("WORKER_API_BACKOFF_MAX", _float, d.api_backoff_max),
        api_max_connections=r.positive("WORKER_API_MAX_CONNECTIONS", _int, d.api_max_connections),
        ca_bundle=r.get("WORKER_CA_BUNDLE", _opt_str, d.ca_bundle),
        routes=r.get("WORKER_ROUTES", _routes_ref, d.routes),
        event_loop=r.choice("WORKER_EVENT_LOOP", EVENT_LOOPS, d.event_loop),
    )


def load_settings(env: Mapping[str, str], overrides: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from ``env`` with ``overrides`` (CLI flags) taking precedence.

    Raises :class:`SettingsError` naming every bad or missing value.
    """
    merged: dict[str, str] = dict(env)
    if overrides:
        merged.update(overrides)
    reader = _Reader(merged)
    biot = _read_biot(reader)
    worker = _read_worker(reader)
    if reader.problems:
        raise SettingsError(reader.problems)
    return Settings(biot=biot, worker=worker)


def replace_settings(settings: Settings, **changes: Any) -> Settings:
    """A copy with fields changed, named ``biot_<field>`` or ``worker_<field>``."""

    biot = {k[5:]: v for k, v in changes.items() if k.startswith("biot_")}
    worker = {k[7:]: v for k, v in changes.items() if k.startswith("worker_")}
    unknown = set(changes) - {f"biot_{k}" for k in biot} - {f"worker_{k}" for k in worker}
    if unknown:
        raise TypeError(f"unknown settings: {sorted(unknown)}")
    return Settings(biot=replace(settings.biot, **biot), worker=replace(settings.worker, **worker))


# ---------------------------------------------------------------- documentation

#: Every variable the settings read, with its meaning; the CLI derives its flags from the
#: ``WORKER_`` and ``BIOT_`` names here, and a test keeps the README's table in step.
VARIABLES: Final[dict[str, str]] = {
    "BIOT_BASE_URL": "BioT API root (no trailing slash); unset: `run` starts the emulator",
    "BIOT_SERVICE_USER_ID": "service user id for the login (required with BIOT_BASE_URL)",
    "BIOT_SERVICE_USER_SECRET_KEY": "service user secret (required with BIOT_BASE_URL)",
    "BIOT_APP_NAME": "plugin name in logs (`appName`) and errors (`serviceName`)",
    "BIOT_SERVICE_ENVIRONMENT": "environment label in error bodies",
    "BIOT_SHOULD_VALIDATE_JWT": "`false` switches inbound JWT checks off (warned at start)",
    "BIOT_PUBLIC_KEY": "RSA public key (base64 body or PEM); unset: fetched from UMS",
    "BIOT_JWT_PERMISSION_NOTIFICATION": "scope required for notifications; empty: no check",
    "BIOT_JWT_PERMISSION_INTERCEPTION": "scope required for interceptors; empty: no check",
    "JWT_PERMISSION": "scope for every hook unless the per-hook variable is set",
    "WORKER_HOST": "address the HTTP adapter listens on",
    "WORKER_PORT": "port the HTTP adapter listens on (0: any free port)",
    "WORKER_MAX_IN_FLIGHT": "events handled at once; more answer 503 with Retry-After",
    "WORKER_MAX_BODY_BYTES": "largest event body accepted; larger answers 413",
    "WORKER_DEADLINE_NOTIFICATION": "seconds a notification handler may run",
    "WORKER_DEADLINE_INTERCEPTOR": "seconds an interceptor handler may run (BioT waits 3 s)",
    "WORKER_DEADLINE_NONSPECIFIC": "seconds a nonspecific handler may run",
    "WORKER_SHUTDOWN_GRACE": "seconds in-flight events get to finish on SIGTERM/SIGINT",
    "WORKER_LOG_LEVEL": "DEBUG, INFO, WARNING or ERROR",
    "WORKER_LOG_BACKEND": "stdlib (QueueHandler thread) or aiologger",
    "WORKER_ALLOW_NONSPECIFIC_WITHOUT_JWT": "accept NONSPECIFIC calls that carry no JWT",
    "WORKER_JWT_LEEWAY": "seconds of clock skew allowed on a JWT's exp",
    "WORKER_PUBLIC_KEY_TTL": "seconds a fetched public key is kept",
    "WORKER_KEY_REFETCH_COOLDOWN": "least seconds between two key refetches on bad signatures",
    "WORKER_TOKEN_REFRESH_MARGIN": "refresh the service token this long before it expires",
    "WORKER_API_TIMEOUT": "seconds one BioT API attempt may take",
    "WORKER_API_RETRIES": "extra attempts for idempotent calls on 429/502/503/504/network",
    "WORKER_API_BACKOFF_BASE": "first retry delay in seconds (doubles, jittered)",
    "WORKER_API_BACKOFF_MAX": "largest retry delay in seconds",
    "WORKER_API_MAX_CONNECTIONS": "size of the keep-alive connection pool to BioT",
    "WORKER_CA_BUNDLE": "CA bundle file to trust for BioT's HTTPS (e.g. the emulator's CA)",
    "WORKER_ROUTES": "module:function returning the plugin's Router",
    "WORKER_EVENT_LOOP": "asyncio, or uvloop (the uvloop extra)",
}


def defaults() -> dict[str, str]:
    """The default of each variable as text, for help output (secrets have none)."""
    d, b = WorkerSettings(), BiotSettings()
    values: dict[str, object] = {
        "BIOT_APP_NAME": b.app_name,
        "BIOT_SERVICE_ENVIRONMENT": b.environment,
        "BIOT_SHOULD_VALIDATE_JWT": "true",
        "BIOT_JWT_PERMISSION_NOTIFICATION": DEFAULT_NOTIFICATION_SCOPE,
        "BIOT_JWT_PERMISSION_INTERCEPTION": DEFAULT_INTERCEPTION_SCOPE,
    }
    for name in VARIABLES:
        if name.startswith("WORKER_"):
            value = getattr(d, name[7:].lower())
            values[name] = str(value).lower() if isinstance(value, bool) else value
    return {k: "" if v is None else str(v) for k, v in values.items()}
