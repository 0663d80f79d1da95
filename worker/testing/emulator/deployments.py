"""The plugins deployed on the emulator: each one's configuration, code, function and subscriptions.

What BioT does for ``/settings/v2/plugins``, in the same order and with its rollback:

- create: a new UMS service user, the code started as a Lambda function (``FunctionHost.deploy``,
  contract E: :class:`~worker.testing.emulator.lambda_host.LambdaHost`), its subscriptions
  registered with the dispatcher for ``endpointUrl`` (the emulator's URL + the function's path);
- update: the function restarted when its code, runtime, handler, timeout, environment or
  display name changed, the subscriptions replaced when they changed;
- delete: the function removed, its subscriptions and its service user too.

The function's environment is what BioT gives a plugin: ``BIOT_BASE_URL`` (the emulator's),
``BIOT_SERVICE_USER_ID`` / ``BIOT_SERVICE_USER_SECRET_KEY`` (its own service user),
``BIOT_APP_NAME`` (the display name), ``BIOT_SERVICE_ENVIRONMENT``, ``WORKER_CA_BUNDLE`` when the
emulator serves HTTPS, and the plugin's ``environmentVariables``. A step that fails undoes the
steps before it; a runtime this machine cannot run or a zip that cannot be unpacked is a 400 and
changes nothing. The emulator has no seed code: a plugin is created with its zip. Changes are
made one at a time (one lock). Nothing here shows the service user's secret.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol

from aiohttp import web

from worker.testing.emulator.lambda_host import InvalidPackage, RuntimeUnavailable
from worker.testing.emulator.plugin_config import (
    INVALID,
    PluginConfig,
    PluginSubscriptions,
    create_config,
    update_config,
)
from worker.testing.emulator.subscriptions import Subscriptions
from worker.testing.emulator.wire import ApiFailure, Clock, iso_ms

MAX_CODE_BYTES: Final = 50 * 1024 * 1024  # Lambda's limit for a zip uploaded directly
_log = logging.getLogger(__name__)


class FunctionHost(Protocol):
    """Runs a plugin's code and serves it at the path ``deploy`` returns (contract E)."""

    async def deploy(
        self,
        name: str,
        code: bytes,
        *,
        runtime: str,
        handler: str = "index.handler",
        env: Mapping[str, str],
        timeout: float,  # noqa: ASYNC109 - the function's own limit, contract E
    ) -> str: ...

    async def remove(self, name: str) -> None: ...

    def routes(self) -> list[web.RouteDef]: ...


class ServiceUsers(Protocol):
    """UMS's service users (:class:`~worker.testing.emulator.ums.UmsApi`)."""

    def add_service_user(self) -> tuple[str, str]: ...

    def remove_service_user(self, user_id: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Site:
    """Where the emulator serves: its base URL and, with TLS, the CA bundle to trust."""

    url: str
    ca_file: str | None = None


@dataclass(frozen=True, slots=True)
class Deployment:
    config: PluginConfig
    code: bytes = field(repr=False)
    endpoint: str
    user_id: str
    secret: str = field(repr=False)
    created: float
    modified: float

    def to_json(self) -> dict[str, Any]:
        """The plugin as ``/settings/v2/plugins`` answers it (custom environment only)."""
        return {
            **self.config.to_json(),
            "endpointUrl": self.endpoint,
            "linkToConsole": None,
            "creationTime": iso_ms(self.created),
            "lastModifiedTime": iso_ms(self.modified),
        }


class Deployments:
    """The deployed plugins by name; raises :class:`ApiFailure` with BioT's codes."""

    def __init__(
        self,
        *,
        host: FunctionHost,
        users: ServiceUsers,
        subscriptions: Subscriptions,
        site: Callable[[], Site],
        environment: str,
        clock: Clock,
    ) -> None:
        self._host = host
        self._users = users
        self._subs = subscriptions
        self._site = site
        self._environment = environment
        self._clock = clock
        self._plugins: dict[str, Deployment] = {}
        self._lock = asyncio.Lock()

    def get(self, name: str) -> Deployment:
        found = self._plugins.get(name)
        if found is None:
            message = f"no plugin named {name!r}"
            raise ApiFailure(404, "PLUGIN_NOT_FOUND", message, {"pluginName": name})
        return found

    def all(self) -> list[Deployment]:
        return list(self._plugins.values())

    async def create(self, body: Any, code: bytes | None) -> Deployment:
        config = create_config(body)
        if code is None:
            raise ApiFailure(400, INVALID, "the emulator has no seed code: send the zip as `code`")
        async with self._lock:
            if config.name in self._plugins:
                message = f"a plugin named {config.name!r} exists"
                raise ApiFailure(409, "PLUGIN_EXISTS_BY_NAME", message, {"pluginName": config.name})
            user_id, secret = self._users.add_service_user()
            try:
                deployment = await self._start(config, code, user_id, secret)
            except BaseException:
                self._users.remove_service_user(user_id)
                raise
            self._plugins[config.name] = deployment
            return deployment

    async def update(self, name: str, body: Any, code: bytes | None) -> Deployment:
        async with self._lock:
            current = self.get(name)
            config = update_config(current.config, body, new_code=code is not None)
            new = replace(current, config=config, code=code or current.code)
            if code is not None or _launch(config) != _launch(current.config):
                new = await self._restart(current, new)
            elif config.subscriptions != current.config.subscriptions:
                self._replace_subscriptions(current.endpoint, config.subscriptions, current)
            new = replace(new, modified=self._clock())
            self._plugins[name] = new
            return new

    async def delete(self, name: str) -> None:
        async with self._lock:
            self.get(name)
            await self._remove(name)

    async def close(self) -> None:
        """Remove every plugin (the emulator stops: their functions stop with it)."""
        async with self._lock:
            for name in list(self._plugins):
                await self._remove(name)

    # ------------------------------------------------------------ steps

    async def _remove(self, name: str) -> None:
        current = self._plugins.pop(name)
        await self._host.remove(name)
        self._subs.unsubscribe_endpoint(current.endpoint)
        self._users.remove_service_user(current.user_id)

    async def _start(
        self, config: PluginConfig, code: bytes, user_id: str, secret: str
    ) -> Deployment:
        endpoint = await self._deploy(config, code, user_id, secret)
        try:
            self._register(endpoint, config.subscriptions)
        except BaseException:
            self._subs.unsubscribe_endpoint(endpoint)
            await self._host.remove(config.name)
            raise
        now = self._clock()
        return Deployment(config, code, endpoint, user_id, secret, now, now)

    async def _restart(self, current: Deployment, new: Deployment) -> Deployment:
        endpoint = await self._deploy(new.config, new.code, new.user_id, new.secret)
        unchanged = endpoint == current.endpoint
        try:
            if not (unchanged and new.config.subscriptions == current.config.subscriptions):
                self._replace_subscriptions(endpoint, new.config.subscriptions, current)
        except BaseException:
            await self._deploy(current.config, current.code, current.user_id, current.secret)
            raise
        return replace(new, endpoint=endpoint)

    async def _deploy(self, config: PluginConfig, code: bytes, user_id: str, secret: str) -> str:
        site = self._site()
        try:
            path = await self._host.deploy(
                config.name,
                code,
                runtime=config.runtime,
                handler=config.handler,
                env=self._env(config, site, user_id, secret),
                timeout=float(config.timeout),
            )
        except (RuntimeUnavailable, InvalidPackage) as exc:
            raise ApiFailure(400, INVALID, str(exc), {"runtime": config.runtime}) from exc
        except Exception as exc:
            _log.exception("plugin %s could not be deployed", config.name)
            message = f"the plugin's function could not be started: {exc}"
            raise ApiFailure(
                500, "AWS_EXCEPTION", message, {"className": type(exc).__name__}
            ) from exc
        return site.url + path

    def _env(self, config: PluginConfig, site: Site, user_id: str, secret: str) -> dict[str, str]:
        env = {
            **config.environment,
            "BIOT_BASE_URL": site.url,
            "BIOT_SERVICE_USER_ID": user_id,
            "BIOT_SERVICE_USER_SECRET_KEY": secret,
            "BIOT_APP_NAME": config.display_name,
            "BIOT_SERVICE_ENVIRONMENT": self._environment,
        }
        if site.ca_file is not None:
            env["WORKER_CA_BUNDLE"] = site.ca_file
        return env

    def _replace_subscriptions(
        self, endpoint: str, subscriptions: PluginSubscriptions, current: Deployment
    ) -> None:
        """Register ``subscriptions`` for ``endpoint`` instead of ``current``'s; on a failure
        ``current``'s are registered again."""
        self._subs.unsubscribe_endpoint(current.endpoint)
        try:
            self._register(endpoint, subscriptions)
        except BaseException:
            self._subs.unsubscribe_endpoint(endpoint)
            self._register(current.endpoint, current.config.subscriptions)
            raise

    def _register(self, endpoint: str, subscriptions: PluginSubscriptions) -> None:
        for item in subscriptions.interceptions:
            self._subs.subscribe_interception(
                item["type"],
                endpoint,
                api_id=item.get("apiId") if item["type"] != "ADAPT_ENTITY" else None,
                entity_name=item.get("entityTypeName") if item["type"] == "ADAPT_ENTITY" else None,
                order=subscriptions.order_of(item),
            )
        for item in subscriptions.notifications:
            self._subs.subscribe_notification(
                item["entityTypeName"], item["actionName"], endpoint, item.get("templateName")
            )


def _launch(config: PluginConfig) -> tuple[Any, ...]:
    """What the function's process depends on: a change restarts it."""
    environment = tuple(sorted(config.environment.items()))
    return (config.runtime, config.handler, config.timeout, config.display_name, environment)
