"""The BioT APIs ``deploy``, ``subscribe`` and ``unsubscribe`` call, as a BioT user.

:func:`tool_settings` reads ``BIOT_BASE_URL`` (and ``WORKER_CA_BUNDLE``, ``WORKER_ROUTES``)
as the worker's settings do, without asking for the service user a running worker needs;
:func:`credentials_from` adds ``BIOT_USERNAME`` / ``BIOT_PASSWORD`` from the environment only,
never from a flag, so the password stays out of process lists; a missing one is an
:class:`AdminConfigError` naming the variable. :func:`open_admin` logs in
(``POST /ums/v2/users/login``) and yields a :class:`BiotAdmin` carrying the user's token.

Every call is bounded by a timeout and carries a new span of one ``traceparent`` per command. A
BioT error answer becomes :class:`BiotAdminError` (BioT's ``code`` and ``message``), a
connection failure or a timeout one too (status 0). Nothing here logs or prints the token or
the password: they appear in no message and no ``repr``.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import orjson

from config.settings import Settings, SettingsError, load_settings, replace_settings
from worker.client import open_session
from worker.tracing import TraceContext, new_trace
from worker.version import __version__

USER_AGENT: Final = f"biot-worker-deploy/{__version__}"
#: Seconds for one call; uploads of a plugin's code get :data:`UPLOAD_TIMEOUT`.
CALL_TIMEOUT: Final = 30.0
UPLOAD_TIMEOUT: Final = 300.0
PAGE_LIMIT: Final = 100
#: Pages read at most from one search (100 items each): a bound, not an expected size.
MAX_PAGES: Final = 100
PLUGINS: Final = "/settings/v2/plugins"
INTERCEPTIONS: Final = "/settings/v1/interceptions"
HOOKS: Final = "/dispatcher/v1/hooks"


class AdminConfigError(ValueError):
    """A missing or bad credential or setting; the message is one line naming the variable."""


class BiotAdminError(Exception):
    """BioT answered an error (or could not be reached: ``status`` 0)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status, code, message)
        self.status, self.code, self.message = status, code, message

    def __str__(self) -> str:
        if self.status == 0:
            return f"BioT could not be reached: {self.message}"
        return f"BioT answered {self.status} {self.code}: {self.message}"


@dataclass(frozen=True, slots=True)
class Credentials:
    """Where BioT is and who logs in; the password never shows in a ``repr``."""

    base_url: str
    username: str
    password: str = field(repr=False)
    ca_bundle: str | None = None


def tool_settings(env: Mapping[str, str], overrides: Mapping[str, str] | None = None) -> Settings:
    """The settings these commands read (``BIOT_BASE_URL``, ``WORKER_CA_BUNDLE``,
    ``WORKER_ROUTES``), checked as :func:`~config.settings.load_settings` checks them, except
    that ``BIOT_BASE_URL`` does not ask for a service user: a BioT user logs in instead.

    Raises :class:`~config.settings.SettingsError` naming every bad value.
    """
    source = {**env, **(overrides or {})}
    raw = source.pop("BIOT_BASE_URL", "").strip()
    problems: list[str] = []
    try:
        settings = load_settings(source)
    except SettingsError as exc:
        problems, settings = list(exc.problems), Settings()
    if raw and not raw.startswith(("http://", "https://")):
        problems.append(f"BIOT_BASE_URL: must start with http:// or https://, got {raw!r}")
    if problems:
        raise SettingsError(problems)
    return replace_settings(settings, biot_base_url=raw.rstrip("/") or None)


def credentials_from(settings: Settings, env: Mapping[str, str]) -> Credentials:
    """Where to log in (``settings``) and as whom (``BIOT_USERNAME``/``BIOT_PASSWORD`` of
    ``env``); :class:`AdminConfigError` naming what is missing."""
    if settings.biot.base_url is None:
        raise AdminConfigError("BIOT_BASE_URL is not set (the BioT API root to deploy to)")
    missing = [name for name in ("BIOT_USERNAME", "BIOT_PASSWORD") if not env.get(name)]
    if missing:
        raise AdminConfigError(
            f"{' and '.join(missing)} not set: the BioT user to log in as is read from the "
            "environment only"
        )
    return Credentials(
        base_url=settings.biot.base_url,
        username=env["BIOT_USERNAME"],
        password=env["BIOT_PASSWORD"],
        ca_bundle=settings.worker.ca_bundle,
    )


@asynccontextmanager
async def open_admin(
    credentials: Credentials, *, call_timeout: float = CALL_TIMEOUT
) -> AsyncIterator[BiotAdmin]:
    """A :class:`BiotAdmin` logged in as ``credentials``' user; the session closes after."""
    try:
        session = await open_session(
            max_connections=4, ca_bundle=credentials.ca_bundle, user_agent=USER_AGENT
        )
    except ValueError as exc:
        raise AdminConfigError(f"WORKER_CA_BUNDLE: {exc}") from None
    async with session:
        admin = BiotAdmin(session, credentials.base_url, call_timeout=call_timeout)
        await admin.login(credentials.username, credentials.password)
        yield admin


class BiotAdmin:
    """BioT's admin APIs over one session; :meth:`login` first."""

    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, *, call_timeout: float = CALL_TIMEOUT
    ) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._timeout = call_timeout
        self._token: str | None = None
        self.trace: TraceContext = new_trace()

    def __repr__(self) -> str:
        return f"BiotAdmin({self._base!r}, logged_in={self._token is not None})"

    # ------------------------------------------------------------ user login

    async def login(self, username: str, password: str) -> None:
        """``POST /ums/v2/users/login``; keeps ``accessJwt.token`` for the next calls."""
        body = {"username": username, "password": password}
        answer = await self._call("POST", "/ums/v2/users/login", json=body, auth=False)
        token = (answer.get("accessJwt") or {}).get("token") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token:
            raise BiotAdminError(200, "LOGIN_FAILED", "the login answer has no accessJwt.token")
        self._token = token

    # ------------------------------------------------------------ plugins

    async def get_plugin(self, name: str) -> dict[str, Any] | None:
        """The plugin's configuration, or ``None`` when BioT has no plugin of that name."""
        try:
            return _object(await self._call("GET", f"{PLUGINS}/{name}"))
        except BiotAdminError as exc:
            if exc.status == 404:
                return None
            raise

    async def create_plugin(self, config: Mapping[str, Any], code: bytes | None) -> dict[str, Any]:
        """``POST /settings/v2/plugins``, multipart ``code`` (the zip) and ``config`` (JSON)."""
        form = _form(config, code)
        return _object(await self._call("POST", PLUGINS, data=form, upload=code is not None))

    async def update_plugin(
        self, name: str, config: Mapping[str, Any], code: bytes | None
    ) -> dict[str, Any]:
        """``PATCH /settings/v2/plugins/{name}``: a partial update of ``config``; with
        ``code``, new code (``config['version']`` larger than the deployed one)."""
        form = _form(config, code)
        path = f"{PLUGINS}/{name}"
        return _object(await self._call("PATCH", path, data=form, upload=code is not None))

    async def delete_plugin(self, name: str) -> None:
        await self._call("DELETE", f"{PLUGINS}/{name}")

    async def search_plugins(self, search: Mapping[str, Any]) -> list[dict[str, Any]]:
        return await self._search(PLUGINS, search)

    async def interceptions(self) -> list[dict[str, Any]]:
        """Every API and entity type BioT can intercept: ``{entityTypeName, servicePrefix,
        apiId}`` (every page of ``GET /settings/v1/interceptions``)."""
        return await self._search(INTERCEPTIONS, {})

    # ------------------------------------------------------------ dispatcher subscriptions

    async def subscribe(self, kind: str, body: Mapping[str, Any]) -> bool:
        """Subscribe (``kind`` notifications or interceptions); ``False`` when BioT answers
        409, the subscription being there already."""
        try:
            await self._call("POST", f"{HOOKS}/{kind}/subscribe", json=dict(body))
        except BiotAdminError as exc:
            if exc.status == 409:
                return False
            raise
        return True

    async def unsubscribe(self, kind: str, body: Mapping[str, Any]) -> None:
        await self._call("POST", f"{HOOKS}/{kind}/unsubscribe", json=dict(body))

    async def subscriptions(self, kind: str, endpoint: str) -> list[dict[str, Any]]:
        """The dispatcher's ``kind`` subscriptions of ``endpoint`` (filtered by BioT, and again
        here in case a server ignores the filter)."""
        search = {"filter": {"endpoint": {"eq": endpoint}}}
        found = await self._search(f"{HOOKS}/{kind}", search)
        return [item for item in found if item.get("endpoint") == endpoint]

    # ------------------------------------------------------------ one call

    async def _search(self, path: str, search: Mapping[str, Any]) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        for page in range(MAX_PAGES):
            request = {**search, "page": page, "limit": PAGE_LIMIT}
            params = {"searchRequest": orjson.dumps(request).decode()}
            answer = _object(await self._call("GET", path, params=params))
            data = answer.get("data")
            if not isinstance(data, list):
                raise BiotAdminError(200, "BAD_ANSWER", f"GET {path}: no data list in the answer")
            items += [item for item in data if isinstance(item, dict)]
            total = ((answer.get("metadata") or {}).get("page") or {}).get("totalResults")
            if len(data) < PAGE_LIMIT or (isinstance(total, int) and len(items) >= total):
                break
        return items

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: aiohttp.FormData | None = None,
        params: Mapping[str, str] | None = None,
        auth: bool = True,
        upload: bool = False,
    ) -> Any:
        headers = {"traceparent": self.trace.child().traceparent, "accept": "application/json"}
        if auth:
            headers["authorization"] = f"Bearer {self._token}"
        timeout = aiohttp.ClientTimeout(total=UPLOAD_TIMEOUT if upload else self._timeout)
        try:
            async with self._session.request(
                method,
                self._base + path,
                json=json,
                data=data,
                params=params,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            ) as response:
                raw = await response.read()
                status = response.status
        except TimeoutError:
            raise BiotAdminError(0, "TIMEOUT", f"{method} {path}: no answer in time") from None
        except aiohttp.ClientError as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise BiotAdminError(0, "UNREACHABLE", f"{method} {path}: {reason}") from None
        if status >= 400:
            raise _error(status, raw, f"{method} {path}")
        return _json(raw, f"{method} {path}")


def _form(config: Mapping[str, Any], code: bytes | None) -> aiohttp.FormData:
    form = aiohttp.FormData()
    if code is not None:
        # A file object, not bytes: aiohttp warns about a bytes body over 1 MiB sent from a
        # running loop (a plugin ZIP is several MiB).
        form.add_field(
            "code", io.BytesIO(code), filename="plugin.zip", content_type="application/zip"
        )
    form.add_field("config", orjson.dumps(dict(config)).decode(), content_type="application/json")
    return form


def _json(raw: bytes, call: str) -> Any:
    if not raw.strip():
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BiotAdminError(200, "BAD_ANSWER", f"{call}: the answer is not JSON") from None


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _error(status: int, raw: bytes, call: str) -> BiotAdminError:
    """BioT's ``ErrorResponse`` (``code``, ``message``) as one line; the HTTP reason without
    one."""
    try:
        body = orjson.loads(raw) if raw.strip() else None
    except orjson.JSONDecodeError:
        body = None
    code = body.get("code") if isinstance(body, dict) else None
    message = body.get("message") if isinstance(body, dict) else None
    if not isinstance(code, str) or not code:
        code = _REASONS.get(status, "HTTP_ERROR")
    if not isinstance(message, str) or not message:
        message = f"{call} failed"
    return BiotAdminError(status, code, " ".join(message.split()))


_REASONS: Final = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    409: "CONFLICT",
    500: "INTERNAL_SERVER_ERROR",
    502: "BAD_GATEWAY",
    503: "SERVICE_UNAVAILABLE",
    504: "GATEWAY_TIMEOUT",
}
