"""The composition root of BioT in a box: state, collaborators and the aiohttp application.

``Emulator(config)`` builds everything without touching the network; the application's start-up
opens the one outgoing client session and its clean-up waits for pending notifications (up to
``config.notification_grace``), removes the deployed plugins (their functions stop) and closes the
session. Serve it with :class:`EmulatorServer`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiohttp import web

from worker.testing.emulator.admin import AdminApi
from worker.testing.emulator.calllog import CallLog, CallRecord
from worker.testing.emulator.config import EmulatorConfig
from worker.testing.emulator.deployments import Deployments, FunctionHost, Site
from worker.testing.emulator.dispatcher_api import DispatcherApi
from worker.testing.emulator.entities import EntityStore
from worker.testing.emulator.faults import Faults
from worker.testing.emulator.gateway import EntityGateway
from worker.testing.emulator.identity import TokenService
from worker.testing.emulator.interception import InterceptionChain
from worker.testing.emulator.keys import KeyFactory, KeyRing, generate_key
from worker.testing.emulator.lambda_host import LambdaHost
from worker.testing.emulator.middleware import Sleep, errors, faults, observe
from worker.testing.emulator.notifications import Notifier
from worker.testing.emulator.plugins import HookClient
from worker.testing.emulator.settings_api import SettingsApi
from worker.testing.emulator.subscriptions import (
    InterceptionSubscription,
    NotificationSubscription,
    Subscriptions,
)
from worker.testing.emulator.ums import UmsApi
from worker.testing.emulator.wire import Clock


class Emulator:
    """BioT in a box. One instance serves one :class:`EmulatorServer` at a time.

    ``clock`` (epoch seconds) drives token expiry and timestamps; ``sleep`` performs injected
    latency; ``key_factory`` makes RSA keys (the first one in ``__init__``, blocking ~0.1 s);
    ``function_host`` runs deployed plugins and serves them (default: a :class:`LambdaHost`,
    under ``/_lambda/``; a host given is closed by whoever made it).
    """

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        *,
        clock: Clock | None = None,
        key_factory: KeyFactory | None = None,
        sleep: Sleep | None = None,
        function_host: FunctionHost | None = None,
    ) -> None:
        self.config = config = config or EmulatorConfig()
        self.clock: Clock = clock or time.time
        self._key_factory = key_factory or generate_key
        self._sleep: Sleep = sleep or asyncio.sleep
        self.base_url: str | None = None
        self.ca_file: str | None = None
        self.faults = Faults(config)
        self.keys = KeyRing(self._key_factory())
        self.tokens = TokenService(
            self.keys,
            self.clock,
            lifetime=lambda: self.faults.token_lifetime,
            organization_id=config.organization_id,
        )
        self.calls = CallLog(self.clock, config.call_log_size)
        self.store = EntityStore(self.clock, config.organization_id)
        self.store.seed_patients(config.seed_patients)
        self.subscriptions = Subscriptions(self.clock)
        self.hooks = HookClient(self.tokens, self.calls, config.plugin_timeout)
        self.notifier = Notifier(self.subscriptions, self.hooks, self.tokens, self.clock)
        self._ums = UmsApi(
            service_user_id=config.service_user_id,
            service_user_secret=config.service_user_secret,
            admin_username=config.admin_username,
            admin_password=config.admin_password,
            organization_id=config.organization_id,
            tokens=self.tokens,
            keys=self.keys,
            faults=self.faults,
            sleep=self._sleep,
        )
        self.functions = function_host or LambdaHost(
            base_url=lambda: self.base_url or "", environment=config.environment
        )
        self.deployments = Deployments(
            host=self.functions,
            users=self._ums,
            subscriptions=self.subscriptions,
            site=lambda: Site(self.base_url or "", self.ca_file),
            environment=config.environment,
            clock=self.clock,
        )
        self.app = self._build_app()

    # ------------------------------------------------------------ identity

    @property
    def service_user_id(self) -> str:
        return self.config.service_user_id

    @property
    def service_user_secret(self) -> str:
        return self.config.service_user_secret

    @property
    def admin_username(self) -> str:
        """The BioT user that may deploy plugins and subscribe endpoints here."""
        return self.config.admin_username

    @property
    def admin_password(self) -> str:
        return self.config.admin_password

    @property
    def public_key_b64(self) -> str:
        """The current public key as BioT serves it (bare base64 SPKI DER)."""
        return self.keys.public_key_b64

    @property
    def logins(self) -> int:
        """Successful service-user logins so far."""
        return self._ums.logins

    def sign_token(
        self,
        *,
        scopes: Sequence[str],
        token_type: str = "SERVICE_INTERNAL",  # noqa: S107 - a token type, not a secret
        lifetime: float | None = None,
        **claims: Any,
    ) -> str:
        """An RS512 token signed with the current key, as BioT signs the tokens it sends."""
        return self.tokens.sign(scopes=scopes, token_type=token_type, lifetime=lifetime, **claims)

    def user_token(
        self,
        subject_id: str | None = None,
        *,
        scopes: Sequence[str] = (),
        organization_id: str | None = None,
        lifetime: float | None = None,
    ) -> str:
        """An end user's token (``tokenType USER``): its calls go through interceptors."""
        return self.tokens.user_token(
            subject_id, scopes=scopes, organization_id=organization_id, lifetime=lifetime
        )

    def rotate_keys(self) -> None:
        """A new current key; the current one becomes previous (blocks while generating)."""
        self.keys.rotate(self._key_factory())

    async def rotate_keys_async(self) -> None:
        """:meth:`rotate_keys` with the key generated in a thread."""
        self.keys.rotate(await asyncio.to_thread(self._key_factory))

    # ------------------------------------------------------------ hooks and records

    def subscribe_notification(
        self, entity_type: str, action: str, endpoint: str, template: str | None = None
    ) -> NotificationSubscription:
        """As ``POST /dispatcher/v1/hooks/notifications/subscribe`` (409 ``ApiFailure`` twice)."""
        return self.subscriptions.subscribe_notification(entity_type, action, endpoint, template)

    def subscribe_interception(
        self,
        type: str,
        endpoint: str,
        api_id: str | None = None,
        entity_name: str | None = None,
        order: int | None = None,
    ) -> InterceptionSubscription:
        """As ``POST /dispatcher/v1/hooks/interceptions/subscribe``; no order runs it last."""
        return self.subscriptions.subscribe_interception(
            type, endpoint, api_id=api_id, entity_name=entity_name, order=order
        )

    @property
    def call_log(self) -> list[CallRecord]:
        """Every recorded call, oldest first (a copy)."""
        return self.calls.records()

    async def drain_notifications(self) -> None:
        """Wait until every notification sent so far has been delivered or has failed."""
        await self.notifier.drain()

    def info(self, *, include_secret: bool = True) -> dict[str, Any]:
        """What a developer needs to point a worker here."""
        body: dict[str, Any] = {
            "url": self.base_url,
            "serviceUserId": self.service_user_id,
            "adminUsername": self.admin_username,
            "organizationId": self.config.organization_id,
            "environment": self.config.environment,
            "tls": self.config.tls,
            "publicKey": self.public_key_b64,
        }
        if include_secret:
            body["serviceUserSecretKey"] = self.service_user_secret
            body["adminPassword"] = self.admin_password
        return body

    # ------------------------------------------------------------ application

    def _build_app(self) -> web.Application:
        app = web.Application(
            middlewares=[
                observe(self.tokens, self.calls),
                errors(self.config.environment),
                faults(self.faults, self._sleep),
            ]
        )
        app.add_routes(self._ums.routes())
        app.add_routes(DispatcherApi(self.subscriptions).routes())
        chain = InterceptionChain(self.subscriptions, self.hooks)
        app.add_routes(EntityGateway(self.store, chain, self.notifier, self.clock).routes())
        app.add_routes(AdminApi(self).routes())
        app.add_routes(SettingsApi(self.deployments).routes())
        app.add_routes(self.functions.routes())
        app.cleanup_ctx.append(self._lifecycle)
        return app

    async def _lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        await self.hooks.start()
        try:
            yield
        finally:
            await self.notifier.close(self.config.notification_grace)
            await self.deployments.close()
            await self.hooks.close()
