"""The composition root: builds every collaborator from :class:`Settings`, owns their lifecycle.

``async with WorkerApp(settings, routes) as app:`` opens, in order, the log, the one HTTP
session, the service-token cache (with its background refresher), the JWT verifier, the BioT
client and the dispatcher; leaving the block closes them in reverse. Closing twice is harmless.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO, TextIO

import aiohttp

from config.settings import Settings
from worker.auth import JwtVerifier, PublicKeys
from worker.client import (
    BiotClient,
    BiotContact,
    fetch_public_key_texts,
    open_session,
    service_login,
)
from worker.dispatch import Dispatcher
from worker.errors import LoginError
from worker.logs import Backend, Log, bridge_stdlib_logging, open_log
from worker.routing import Router
from worker.tokens import AccessToken, ServiceTokens, parse_expiration
from worker.tracing import Spans
from worker.version import __version__

if TYPE_CHECKING:  # prometheus-client is imported only when metrics are on
    from worker.metrics import Metrics

USER_AGENT = f"biot-worker/{__version__}"


class StartupError(Exception):
    """The worker cannot start (a port in use, an unreadable CA bundle); one line for the user."""


class WorkerApp:
    def __init__(
        self,
        settings: Settings,
        routes: Router,
        *,
        log: Log | None = None,
        stream: TextIO | BinaryIO | None = None,
        clock: Callable[[], float] = time.time,
        metrics: bool | None = None,
    ) -> None:
        """``log`` replaces the configured backend (tests pass a capturing log); ``clock`` is
        the wall clock used for token expiries (tests share one with the emulator);
        ``metrics`` overrides ``WORKER_METRICS`` (the Lambda adapter, with nowhere to serve
        them, passes ``False``)."""
        if settings.biot.base_url is None:
            raise ValueError("WorkerApp needs settings.biot.base_url (the emulator provides one)")
        self.settings = settings
        #: The plugin's routing table, as given.
        self.routes = routes
        self._given_log = log
        self._stream = stream
        self._clock = clock
        self._want_metrics = settings.worker.metrics if metrics is None else metrics
        self._stack: AsyncExitStack | None = None
        self._backend: Backend | None = None
        self._session: aiohttp.ClientSession | None = None
        self.log: Log
        self.tokens: ServiceTokens
        self.verifier: JwtVerifier | None
        self.api: BiotClient
        self.dispatcher: Dispatcher
        #: When BioT last answered, and how many logins and key fetches were tried (health).
        self.contact = BiotContact()
        #: The Prometheus metrics (``None``: ``WORKER_METRICS=false``), see :mod:`worker.metrics`.
        self.metrics: Metrics | None = None
        #: Exported spans (``None``: OpenTelemetry not asked for, or its extra not installed).
        self.spans: Spans | None = None

    async def __aenter__(self) -> WorkerApp:
        stack = AsyncExitStack()
        try:
            await self._open(stack)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def _open(self, stack: AsyncExitStack) -> None:
        biot, worker = self.settings.biot, self.settings.worker
        if self._given_log is not None:
            self.log = self._given_log
        else:
            backend = open_log(
                worker.log_backend,
                app_name=biot.app_name,
                level=worker.log_level,
                stream=self._stream,
            )
            opened = await stack.enter_async_context(backend)
            self._backend = opened
            self.log = opened
            # aiohttp and asyncio log through stdlib logging: make those lines ours too.
            stack.enter_context(bridge_stdlib_logging(self.log))
        # The trust store (and a CA bundle) is read in a thread: the loop never blocks on it.
        try:
            self._session = await open_session(
                max_connections=worker.api_max_connections,
                ca_bundle=worker.ca_bundle,
                user_agent=USER_AGENT,
            )
        except ValueError as exc:  # the CA bundle is missing or not PEM
            raise StartupError(f"WORKER_CA_BUNDLE: {exc}") from exc
        stack.push_async_callback(self._session.close)
        if self._want_metrics:
            from worker.metrics import Metrics

            self.metrics = Metrics(token_expires_in=lambda: self.tokens.expires_in())
        self.spans = await self._open_spans(stack)
        self.tokens = await stack.enter_async_context(
            ServiceTokens(
                self._service_login(),
                refresh_margin=worker.token_refresh_margin,
                clock=self._clock,
                log=self.log,
                metrics=self.metrics,
            )
        )
        self.verifier = self._make_verifier()
        self.api = BiotClient(
            self._session,
            self._base_url,
            self.tokens,
            timeout=worker.api_timeout,
            retries=worker.api_retries,
            backoff_base=worker.api_backoff_base,
            backoff_max=worker.api_backoff_max,
            user_agent=USER_AGENT,
            log=self.log,
            contact=self.contact,
            metrics=self.metrics,
            spans=self.spans,
        )
        self.dispatcher = Dispatcher(
            routes=self.routes,
            api=self.api,
            log=self.log,
            settings=self.settings,
            verifier=self.verifier,
            metrics=self.metrics,
            spans=self.spans,
        )

    async def _open_spans(self, stack: AsyncExitStack) -> Spans | None:
        """OpenTelemetry's spans when the ``OTEL_*`` variables ask for them and the ``otel``
        extra is installed; nothing of it is imported otherwise."""
        biot, worker = self.settings.biot, self.settings.worker
        if not worker.otel_requested:
            return None
        try:
            from worker.otel import OtelSpans
        except ImportError as exc:
            self.log.warning(
                "OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed; "
                "no spans are exported (pip install 'biot-worker[otel]')",
                missing=exc.name,
            )
            return None
        exporter = OtelSpans(
            worker.otel_env(),
            service_name=biot.app_name,
            environment=biot.environment,
            log=self.log,
        )
        return await stack.enter_async_context(exporter)

    @property
    def _base_url(self) -> str:
        assert self.settings.biot.base_url is not None
        return self.settings.biot.base_url

    def _make_verifier(self) -> JwtVerifier | None:
        biot, worker = self.settings.biot, self.settings.worker
        if not biot.validate_jwt:
            self.log.warning(
                "BIOT_SHOULD_VALIDATE_JWT is false: events are NOT authenticated; "
                "never run like this where BioT can reach the worker"
            )
            return None
        return JwtVerifier(
            fetch_keys=None if biot.public_key else self._fetch_keys,
            static_key=biot.public_key,
            leeway=worker.jwt_leeway,
            key_ttl=worker.public_key_ttl,
            refetch_cooldown=worker.key_refetch_cooldown,
            wall_clock=self._clock,
            log=self.log,
        )

    def _service_login(self) -> ServiceLogin:
        biot = self.settings.biot
        assert self._session is not None
        return ServiceLogin(
            self._session,
            self._base_url,
            biot.service_user_id,
            biot.service_user_secret,
            timeout=self.settings.worker.api_timeout,
            contact=self.contact,
            spans=self.spans,
        )

    async def _fetch_keys(self) -> PublicKeys:
        assert self._session is not None
        try:
            current, previous = await fetch_public_key_texts(
                self._session,
                self._base_url,
                timeout=self.settings.worker.api_timeout,
                contact=self.contact,
                spans=self.spans,
            )
        except Exception:
            if self.metrics is not None:
                self.metrics.key_fetch(ok=False)
            raise
        if self.metrics is not None:
            self.metrics.key_fetch(ok=True)
        return PublicKeys(current, previous)

    async def flush_spans(self) -> None:
        """Export the spans ended so far (the Lambda adapter, before its process is frozen)."""
        if self.spans is not None:
            await self.spans.flush()

    async def flush_log(self) -> None:
        """Return once every log line so far is written (the Lambda adapter, before answering)."""
        if self._backend is not None:
            await self._backend.flush()


class ServiceLogin:
    """The service user's login, holding only what it needs: the token cache calls it, and
    through the BioT client a handler could reach it, so it must not lead to the settings."""

    __slots__ = ("_base_url", "_contact", "_secret", "_session", "_spans", "_timeout", "_user_id")

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        user_id: str | None,
        secret: str | None,
        *,
        timeout: float,
        contact: BiotContact | None = None,
        spans: Spans | None = None,
    ) -> None:
        self._session = session
        self._spans = spans
        self._base_url = base_url
        self._user_id = user_id
        self._secret = secret
        self._timeout = timeout
        self._contact = contact

    def __repr__(self) -> str:
        return f"ServiceLogin({self._base_url!r}, user={self._user_id!r})"

    async def __call__(self) -> AccessToken:
        if self._user_id is None or self._secret is None:
            raise LoginError("BIOT_SERVICE_USER_ID and BIOT_SERVICE_USER_SECRET_KEY are not set")
        value, expiration = await service_login(
            self._session,
            self._base_url,
            self._user_id,
            self._secret,
            timeout=self._timeout,
            user_agent=USER_AGENT,
            contact=self._contact,
            spans=self._spans,
        )
        try:
            # The JWT's own exp is whole seconds while accessTokenExpiration has milliseconds:
            # trust the earlier of the two, or BioT may refuse a token we still think valid.
            return AccessToken(value, math.floor(parse_expiration(expiration)))
        except ValueError:
            raise LoginError("login answered an unreadable accessTokenExpiration") from None
