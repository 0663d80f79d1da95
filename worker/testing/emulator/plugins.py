"""Calls from the platform to plugins, as BioT's dispatcher makes them, over one client session.

Every call is a ``POST`` of JSON to the subscribed endpoint with ``hooktype``, a child span of
the caller's ``traceparent``, ``content-type`` and (for interceptors) ``authorization: Bearer``
with a token the platform signs. Each call has the plugin timeout. Every call is recorded in the
call log with its outcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from worker.testing.emulator.calllog import CallLog
from worker.testing.emulator.identity import TokenService
from worker.testing.emulator.wire import ApiFailure, dumps
from worker.tracing import TraceContext

_ACCEPT: Final = "application/json, application/octet-stream, application/cbor, application/*+json"
_USER_AGENT: Final = "biot-emulator"


@dataclass(frozen=True, slots=True)
class PluginReply:
    status: int
    body: bytes
    content_type: str


class HookClient:
    """Posts hook payloads to plugin endpoints; owns the one outgoing ``ClientSession``.

    :meth:`start` and :meth:`close` bracket its life (the app's start-up and clean-up); closing
    twice is harmless.
    """

    def __init__(self, tokens: TokenService, call_log: CallLog, timeout: float) -> None:
        self._tokens = tokens
        self._call_log = call_log
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout)
            )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def intercept(
        self, endpoint: str, hooktype: str, payload: dict[str, Any], trace: TraceContext
    ) -> PluginReply:
        """Call an interceptor; a timeout or connection failure becomes a 5xx ``ApiFailure``."""
        headers = {"authorization": "Bearer " + self._tokens.internal_token("PLUGIN_INTERCEPTOR")}
        return await self._post(endpoint, hooktype, payload, trace, headers)

    async def notify(self, endpoint: str, body: dict[str, Any], trace: TraceContext) -> None:
        """Deliver a notification; the plugin's answer is recorded and otherwise ignored."""
        try:
            await self._post(endpoint, "NOTIFICATION", body, trace, {})
        except ApiFailure:
            return  # already recorded; BioT ignores notification results

    async def _post(
        self,
        endpoint: str,
        hooktype: str,
        payload: dict[str, Any],
        trace: TraceContext,
        extra: dict[str, str],
    ) -> PluginReply:
        headers = {
            "hooktype": hooktype,
            "traceparent": trace.child().traceparent,
            "content-type": "application/json",
            "accept": _ACCEPT,
            "user-agent": _USER_AGENT,
            **extra,
        }
        try:
            reply = await self._send(endpoint, dumps(payload), headers)
        except TimeoutError as exc:
            self._record(endpoint, hooktype, trace, None, "timeout")
            message = f"plugin {endpoint} did not answer {hooktype} within {self._timeout}s"
            raise ApiFailure(504, "PLUGIN_TIMEOUT", message, _details(endpoint, hooktype)) from exc
        except aiohttp.ClientError as exc:
            self._record(endpoint, hooktype, trace, None, type(exc).__name__)
            message = f"plugin {endpoint} could not be reached for {hooktype}: {exc}"
            raise ApiFailure(
                502, "PLUGIN_UNREACHABLE", message, _details(endpoint, hooktype)
            ) from exc
        self._record(endpoint, hooktype, trace, reply.status, None)
        return reply

    async def _send(self, endpoint: str, body: bytes, headers: dict[str, str]) -> PluginReply:
        if self._session is None:
            raise RuntimeError("HookClient is not started (the emulator app is not running)")
        async with self._session.post(endpoint, data=body, headers=headers) as response:
            content = await response.read()
            return PluginReply(response.status, content, response.content_type)

    def _record(
        self, endpoint: str, hook: str, trace: TraceContext, status: int | None, error: str | None
    ) -> None:
        self._call_log.add(
            "out",
            "POST",
            endpoint,
            status,
            trace.trace_id,
            "plugin-internal",
            hook=hook,
            error=error,
        )


def _details(endpoint: str, hooktype: str) -> dict[str, str]:
    return {"endpoint": endpoint, "hookType": hooktype}
