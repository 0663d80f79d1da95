"""Settings: frozen dataclasses built once from a mapping (normally ``os.environ``).

Contract:
- Each setting is declared once as a typed dataclass field (its type and default) and once as a
  :class:`Setting` entry in :data:`SETTINGS` (its variable, parser, checks, help text and whether
  it is secret). Reading, :data:`VARIABLES`, :func:`defaults`, ``repr`` and
  :meth:`Settings.public` all follow that table; a test fails if a field has no entry or an
  entry no field.
- Nothing here reads the environment on its own: :func:`load_settings` takes the mapping, plus
  optional overrides (the CLI flags, keyed by the same variable names).
- Every value is checked; one :class:`SettingsError` names every bad or missing value at once.
- Secret fields are kept out of ``repr`` (a settings object can be logged safely), have no CLI
  flag, and are ``None`` in :meth:`Settings.public`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Generic, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

T = TypeVar("T")
Section = Literal["biot", "worker"]

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


class _Section:
    """Shared ``repr`` of the two settings groups: secret fields (per :data:`SETTINGS`) and
    fields declared with ``repr=False`` are left out."""

    __slots__ = ()
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]
    _section: ClassVar[Section]

    def __repr__(self) -> str:
        hidden = {s.field for s in SETTINGS if s.secret and s.section == self._section}
        shown = (
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.repr and f.name not in hidden
        )
        return f"{type(self).__name__}({', '.join(shown)})"


@dataclass(frozen=True, slots=True, repr=False)
class BiotSettings(_Section):
    """The platform's own variables."""

    _section: ClassVar[Section] = "biot"

    base_url: str | None = None
    service_user_id: str | None = None
    service_user_secret: str | None = None
    app_name: str = "biot-worker"
    environment: str = "Not specified"
    validate_jwt: bool = True
    # Not secret, only long: left out of repr so printed settings stay readable.
    public_key: str | None = dataclasses.field(default=None, repr=False)
    # Scope required in the platform's JWT per hook; None means "not checked".
    notification_scope: str | None = DEFAULT_NOTIFICATION_SCOPE
    interception_scope: str | None = DEFAULT_INTERCEPTION_SCOPE
    nonspecific_scope: str | None = None


@dataclass(frozen=True, slots=True, repr=False)
class WorkerSettings(_Section):
    """The worker's own knobs, all under ``WORKER_``."""

    _section: ClassVar[Section] = "worker"

    host: str = "127.0.0.1"
    port: int = 8080
    max_in_flight: int = 256
    max_body_bytes: int = 1_048_576
    body_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    header_timeout: float = 10.0
    max_connections: int = 1000
    health_port: int | None = None
    broker_timeout: float = 10.0
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
    metrics: bool = True
    # The standard OTEL_* variables as given (OpenTelemetry's own names; read by worker.otel).
    otel: tuple[tuple[str, str], ...] = ()

    def otel_env(self) -> dict[str, str]:
        """The ``OTEL_*`` variables the settings were read with."""
        return dict(self.otel)

    @property
    def otel_requested(self) -> bool:
        """Whether spans are to be exported: an OTLP endpoint is set, and neither
        ``OTEL_SDK_DISABLED=true`` nor ``OTEL_TRACES_EXPORTER=none`` says otherwise."""
        env = self.otel_env()
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        disabled = env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
        exporter = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
        return bool(endpoint and endpoint.strip()) and not disabled and exporter != "none"


@dataclass(frozen=True, slots=True)
class Settings:
    biot: BiotSettings = dataclasses.field(default_factory=BiotSettings)
    worker: WorkerSettings = dataclasses.field(default_factory=WorkerSettings)

    def public(self) -> Settings:
        """A copy with every secret field set to ``None``, to hand to plugin code."""
        return replace_settings(
            self, **{f"{s.section}_{s.field}": None for s in SETTINGS if s.secret}
        )


@dataclass(frozen=True, slots=True)
class Setting(Generic[T]):
    """One variable: the field it fills, how its text is read and checked, what it means.

    ``parse`` raises :class:`ValueError` on bad text (the field keeps its default and the
    message becomes a problem); ``check`` returns a problem for a parsed value, or ``None``.
    ``required_with`` names a variable whose non-empty value makes this one required;
    ``fallback`` names a variable whose value (if not ``None``) replaces the default when this
    one is unset; ``empty_means_default`` treats an empty value as unset.
    """

    variable: str
    section: Section
    field: str
    parse: Callable[[str], T]
    help: str
    check: Callable[[T], str | None] | None = None
    secret: bool = False
    required_with: str | None = None
    fallback: str | None = None
    empty_means_default: bool = False


# ---------------------------------------------------------------- parsers and checks


def _str(raw: str) -> str:
    return raw


def _opt_str(raw: str) -> str | None:
    return raw or None


def _int(raw: str) -> int:
    return int(raw)


def _float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value):  # inf would pass "greater than 0" and break every timer
        raise ValueError(f"not a finite number: {raw.strip()!r}")
    return value


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _http_url(raw: str) -> str | None:
    if not raw:
        return None
    if not raw.startswith(("http://", "https://")):
        raise ValueError(f"must start with http:// or https://, got {raw!r}")
    return raw.rstrip("/")


def _routes_ref(raw: str) -> str:
    module, _, function = raw.strip().partition(":")
    if not module or not function:
        raise ValueError(f"expected module:function, got {raw!r}")
    return raw.strip()


def _validate_jwt_flag(raw: str) -> bool:
    # The platform's rule: only the literal "false" (any case) switches validation off.
    return raw.strip().lower() != "false"


def _scope(raw: str) -> str | None:
    # An explicitly empty value switches the scope check off for that hook.
    return raw.strip() or None


def _choice(choices: tuple[str, ...], *, upper: bool = False) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        normalized = raw.upper() if upper else raw.lower()
        if normalized not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {raw!r}")
        return normalized

    return parse


def _positive(value: float) -> str | None:
    return None if value > 0 else f"must be greater than 0, got {value}"


def _not_negative(value: float) -> str | None:
    return None if value >= 0 else f"must be 0 or more, got {value}"


def _port_number(value: int) -> str | None:
    return None if 0 <= value <= 65535 else f"must be between 0 and 65535, got {value}"


def _opt_int(raw: str) -> int | None:
    return int(raw) if raw.strip() else None


def _opt_port_number(value: int | None) -> str | None:
    return None if value is None else _port_number(value)


def _describe(exc: ValueError) -> str:
    text = str(exc)
    if text.startswith("invalid literal") or text.startswith("could not convert"):
        return "not a number: " + text.rsplit(":", 1)[-1].strip()
    return text


# ---------------------------------------------------------------- the table

_BASE_URL: Final = "BIOT_BASE_URL"
_SHARED_SCOPE: Final = "JWT_PERMISSION"

#: Every setting, in the order help output and the README list them.
SETTINGS: Final[tuple[Setting[Any], ...]] = (
    Setting(
        _BASE_URL, "biot", "base_url", _http_url,
        "BioT API root (no trailing slash); required by run; dev starts an emulator instead",
    ),
    Setting(
        "BIOT_SERVICE_USER_ID", "biot", "service_user_id", _opt_str,
        "service user id for the login (required with BIOT_BASE_URL)",
        required_with=_BASE_URL,
    ),
    Setting(
        "BIOT_SERVICE_USER_SECRET_KEY", "biot", "service_user_secret", _opt_str,
        "service user secret (required with BIOT_BASE_URL)",
        required_with=_BASE_URL, secret=True,
    ),
    Setting(
        "BIOT_APP_NAME", "biot", "app_name", _str,
        "plugin name in logs (as appName) and in error bodies (as serviceName)",
        empty_means_default=True,
    ),
    Setting(
        "BIOT_SERVICE_ENVIRONMENT", "biot", "environment", _str,
        "environment label in error bodies",
        empty_means_default=True,
    ),
    Setting(
        "BIOT_SHOULD_VALIDATE_JWT", "biot", "validate_jwt", _validate_jwt_flag,
        "only the value false switches inbound JWT checks off (warned at start)",
    ),
    Setting(
        "BIOT_PUBLIC_KEY", "biot", "public_key", _opt_str,
        "RSA public key (base64 body or PEM); unset: fetched from UMS",
    ),
    Setting(
        "BIOT_JWT_PERMISSION_NOTIFICATION", "biot", "notification_scope", _scope,
        "scope required for notifications; empty: no check",
        fallback=_SHARED_SCOPE,
    ),
    Setting(
        "BIOT_JWT_PERMISSION_INTERCEPTION", "biot", "interception_scope", _scope,
        "scope required for interceptors; empty: no check",
        fallback=_SHARED_SCOPE,
    ),
    Setting(
        _SHARED_SCOPE, "biot", "nonspecific_scope", _scope,
        "scope for every hook unless the per-hook variable is set",
    ),
    Setting("WORKER_HOST", "worker", "host", _str, "address the HTTP adapter listens on"),
    Setting(
        "WORKER_PORT", "worker", "port", _int,
        "port the HTTP adapter listens on (0: any free port)",
        check=_port_number,
    ),
    Setting(
        "WORKER_MAX_IN_FLIGHT", "worker", "max_in_flight", _int,
        "events handled at once; more answer 503 with Retry-After",
        check=_positive,
    ),
    Setting(
        "WORKER_MAX_BODY_BYTES", "worker", "max_body_bytes", _int,
        "largest event body accepted; larger answers 413",
        check=_positive,
    ),
    Setting(
        "WORKER_BODY_TIMEOUT", "worker", "body_timeout", _float,
        "seconds a client may take to send an event's body; slower answers 408",
        check=_positive,
    ),
    Setting(
        "WORKER_KEEPALIVE_TIMEOUT", "worker", "keepalive_timeout", _float,
        "seconds an idle keep-alive connection stays open",
        check=_positive,
    ),
    Setting(
        "WORKER_HEADER_TIMEOUT", "worker", "header_timeout", _float,
        "seconds a client may take to send a request's headers; slower is disconnected",
        check=_positive,
    ),
    Setting(
        "WORKER_MAX_CONNECTIONS", "worker", "max_connections", _int,
        "open HTTP connections at most (capped by the file descriptor limit); "
        "past it the longest-idle one is closed",
        check=_positive,
    ),
    Setting(
        "WORKER_HEALTH_PORT", "worker", "health_port", _opt_int,
        "port a queue worker serves /healthz and /readyz on (unset: WORKER_PORT)",
        check=_opt_port_number,
    ),
    Setting(
        "WORKER_BROKER_TIMEOUT", "worker", "broker_timeout", _float,
        "seconds one broker operation (read, ack, publish, connect) may take",
        check=_positive,
    ),
    Setting(
        "WORKER_DEADLINE_NOTIFICATION", "worker", "deadline_notification", _float,
        "seconds a notification handler may run",
        check=_positive,
    ),
    Setting(
        "WORKER_DEADLINE_INTERCEPTOR", "worker", "deadline_interceptor", _float,
        "seconds an interceptor handler may run (BioT waits 3 s)",
        check=_positive,
    ),
    Setting(
        "WORKER_DEADLINE_NONSPECIFIC", "worker", "deadline_nonspecific", _float,
        "seconds a nonspecific handler may run",
        check=_positive,
    ),
    Setting(
        "WORKER_SHUTDOWN_GRACE", "worker", "shutdown_grace", _float,
        "seconds in-flight events get to finish on SIGTERM/SIGINT",
        check=_positive,
    ),
    Setting(
        "WORKER_LOG_LEVEL", "worker", "log_level", _choice(LOG_LEVELS, upper=True),
        "DEBUG, INFO, WARNING or ERROR",
    ),
    Setting(
        "WORKER_LOG_BACKEND", "worker", "log_backend", _choice(LOG_BACKENDS),
        "stdlib (QueueHandler thread) or aiologger",
    ),
    Setting(
        "WORKER_ALLOW_NONSPECIFIC_WITHOUT_JWT", "worker", "allow_nonspecific_without_jwt", _bool,
        "accept NONSPECIFIC calls that carry no JWT",
    ),
    Setting(
        "WORKER_JWT_LEEWAY", "worker", "jwt_leeway", _float,
        "seconds of clock skew allowed on a JWT's exp",
        check=_not_negative,
    ),
    Setting(
        "WORKER_PUBLIC_KEY_TTL", "worker", "public_key_ttl", _float,
        "seconds a fetched public key is kept",
        check=_positive,
    ),
    Setting(
        "WORKER_KEY_REFETCH_COOLDOWN", "worker", "key_refetch_cooldown", _float,
        "least seconds between two key refetches on bad signatures",
        check=_positive,
    ),
    Setting(
        "WORKER_TOKEN_REFRESH_MARGIN", "worker", "token_refresh_margin", _float,
        "refresh the service token this long before it expires",
        check=_positive,
    ),
    Setting(
        "WORKER_API_TIMEOUT", "worker", "api_timeout", _float,
        "seconds one BioT API attempt may take",
        check=_positive,
    ),
    Setting(
        "WORKER_API_RETRIES", "worker", "api_retries", _int,
        "extra attempts for idempotent calls on 429/502/503/504/network",
        check=_not_negative,
    ),
    Setting(
        "WORKER_API_BACKOFF_BASE", "worker", "api_backoff_base", _float,
        "first retry delay in seconds (doubles, jittered)",
        check=_positive,
    ),
    Setting(
        "WORKER_API_BACKOFF_MAX", "worker", "api_backoff_max", _float,
        "largest retry delay in seconds",
        check=_positive,
    ),
    Setting(
        "WORKER_API_MAX_CONNECTIONS", "worker", "api_max_connections", _int,
        "size of the keep-alive connection pool to BioT",
        check=_positive,
    ),
    Setting(
        "WORKER_CA_BUNDLE", "worker", "ca_bundle", _opt_str,
        "CA bundle file to trust for BioT's HTTPS (e.g. the emulator's CA)",
    ),
    Setting(
        "WORKER_ROUTES", "worker", "routes", _routes_ref,
        "module:function returning the plugin's Router, e.g. myplugin.hooks:build_routes",
    ),
    Setting(
        "WORKER_EVENT_LOOP", "worker", "event_loop", _choice(EVENT_LOOPS),
        "asyncio, or uvloop (the uvloop extra)",
    ),
    Setting(
        "WORKER_METRICS", "worker", "metrics", _bool,
        "count events and BioT calls and serve them at GET /metrics (Prometheus); "
        "false: nothing counted, /metrics answers 404",
    ),
)  # fmt: skip

#: Every variable the settings read, with its meaning; the CLI derives its flags from these
#: names, and a test keeps the README's table in step.
VARIABLES: Final[dict[str, str]] = {s.variable: s.help for s in SETTINGS}

#: Variables read from the environment only: no CLI flag, never in ``repr``.
SECRET_VARIABLES: Final[frozenset[str]] = frozenset(s.variable for s in SETTINGS if s.secret)


# ---------------------------------------------------------------- reading

_UNSET: Final = object()


def _read(entry: Setting[Any], source: Mapping[str, str], problems: list[str]) -> object:
    """The value of ``entry`` in ``source``, or ``_UNSET`` if it is unset or unreadable."""
    raw = source.get(entry.variable)
    if entry.required_with and source.get(entry.required_with) and not raw:
        problems.append(f"{entry.variable}: required when {entry.required_with} is set")
    if raw is None or (raw == "" and entry.empty_means_default):
        return _UNSET
    try:
        value = entry.parse(raw)
    except ValueError as exc:
        problems.append(f"{entry.variable}: {_describe(exc)}")
        return _UNSET
    problem = entry.check(value) if entry.check else None
    if problem:
        problems.append(f"{entry.variable}: {problem}")
    return value


def _with_fallback(entry: Setting[Any], values: Mapping[str, object]) -> object:
    value = values[entry.variable]
    if value is _UNSET and entry.fallback and values[entry.fallback] not in (None, _UNSET):
        return values[entry.fallback]
    return value


def load_settings(env: Mapping[str, str], overrides: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from ``env`` with ``overrides`` (CLI flags) taking precedence.

    Unset variables leave their field's default. Raises :class:`SettingsError` naming every bad
    or missing value.
    """
    source = {**env, **(overrides or {})}
    problems: list[str] = []
    values = {s.variable: _read(s, source, problems) for s in SETTINGS}
    problems += _otlp_endpoint_problems(source)
    if problems:
        raise SettingsError(problems)
    changes = {f"{s.section}_{s.field}": _with_fallback(s, values) for s in SETTINGS}
    kept: dict[str, Any] = {k: v for k, v in changes.items() if v is not _UNSET}
    # OpenTelemetry's own variables, kept as given for its SDK (see WorkerSettings.otel).
    kept["worker_otel"] = tuple(sorted((k, v) for k, v in source.items() if k.startswith("OTEL_")))
    return replace_settings(Settings(), **kept)


_OTLP_ENDPOINTS: Final = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def _otlp_endpoint_problems(source: Mapping[str, str]) -> list[str]:
    """An OTLP endpoint that is set must be an http(s) URL: without a scheme every export
    would fail, each with an error line, while the worker looked configured."""
    problems = []
    for variable in _OTLP_ENDPOINTS:
        value = (source.get(variable) or "").strip()
        if value:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                problems.append(
                    f"{variable}: not an http(s) URL: {_without_password(value)!r} "
                    "(e.g. http://127.0.0.1:4318)"
                )
    return problems


def replace_settings(settings: Settings, **changes: Any) -> Settings:
    """A copy with fields changed, named ``biot_<field>`` or ``worker_<field>``.

    Raises :class:`TypeError` for a name that is not a field.
    """
    biot = {k[5:]: v for k, v in changes.items() if k.startswith("biot_")}
    worker = {k[7:]: v for k, v in changes.items() if k.startswith("worker_")}
    unknown = set(changes) - {f"biot_{k}" for k in biot} - {f"worker_{k}" for k in worker}
    if unknown:
        raise TypeError(f"unknown settings: {sorted(unknown)}")
    return Settings(
        biot=dataclasses.replace(settings.biot, **biot),
        worker=dataclasses.replace(settings.worker, **worker),
    )


def defaults() -> dict[str, str]:
    """The default of each variable as text, for help output; ``""`` when it has none."""
    groups: dict[str, object] = {"biot": BiotSettings(), "worker": WorkerSettings()}
    return {s.variable: _as_text(getattr(groups[s.section], s.field)) for s in SETTINGS}


def _as_text(value: object) -> str:
    if value is None:
        return ""
    return str(value).lower() if isinstance(value, bool) else str(value)


def shown(settings: Settings) -> dict[str, str]:
    """Each variable's value in effect as text, for ``biot-worker config``: a secret shows only
    whether it is set, a public key only its length, a URL no password, an unset value
    ``(not set)``."""
    groups: dict[str, object] = {"biot": settings.biot, "worker": settings.worker}
    values: dict[str, str] = {}
    for s in SETTINGS:
        value = getattr(groups[s.section], s.field)
        if value is None or value == "":
            values[s.variable] = "(not set)"
        elif s.secret:
            values[s.variable] = "(set, hidden)"
        elif s.variable == "BIOT_PUBLIC_KEY":
            values[s.variable] = f"(set, {len(str(value))} characters)"
        elif s.variable == "BIOT_BASE_URL":
            values[s.variable] = _without_password(str(value))
        else:
            values[s.variable] = _as_text(value)
    return values


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
