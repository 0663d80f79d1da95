"""The process's one pooled ``aiohttp.ClientSession`` and its verifying TLS context.

Contract: a session made here keeps connections alive (``max_connections`` per process),
verifies TLS against the system trust store or only the given CA bundle (never off), reads no
proxy or netrc from the environment, serialises JSON with orjson and carries a 60 s backstop
timeout; callers bound each request themselves. :func:`create_session` loads the trust store
synchronously, :func:`open_session` in a thread.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, Final

import aiohttp
import orjson

DEFAULT_USER_AGENT: Final = "biot-worker/0.1.0"
# Backstop for code that uses the session directly; this module bounds each attempt itself.
SESSION_TIMEOUT: Final = aiohttp.ClientTimeout(total=60.0, sock_connect=10.0)


def make_ssl_context(ca_bundle: str | None = None) -> ssl.SSLContext:
    """A verifying TLS context: the system trust store, or only ``ca_bundle`` when given.

    Blocking (reads certificate files): call it at startup or via ``asyncio.to_thread``.
    Raises ``ValueError`` naming the bundle when it cannot be loaded. Verification is never off.
    """
    try:
        return ssl.create_default_context(cafile=ca_bundle)
    except OSError as exc:  # FileNotFoundError, PermissionError, ssl.SSLError (not PEM)
        reason = exc.strerror or str(exc)
        raise ValueError(f"cannot load CA bundle {ca_bundle!r}: {reason}") from exc


def create_session(
    *,
    max_connections: int = 100,
    ca_bundle: str | None = None,
    user_agent: str = DEFAULT_USER_AGENT,
) -> aiohttp.ClientSession:
    """The process's one keep-alive session. Call it once at startup, inside the running loop.

    It loads the trust store synchronously (blocking file I/O); from code that must not block,
    use :func:`open_session`. Raises ``RuntimeError`` outside a running loop.
    """
    asyncio.get_running_loop()
    return _build_session(make_ssl_context(ca_bundle), max_connections, user_agent)


async def open_session(
    *,
    max_connections: int = 100,
    ca_bundle: str | None = None,
    user_agent: str = DEFAULT_USER_AGENT,
) -> aiohttp.ClientSession:
    """:func:`create_session`, loading the trust store in a thread so the loop never blocks."""
    context = await asyncio.to_thread(make_ssl_context, ca_bundle)
    return _build_session(context, max_connections, user_agent)


def _build_session(
    context: ssl.SSLContext, max_connections: int, user_agent: str
) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=max_connections, ssl=context, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": user_agent},
        json_serialize=_dumps_text,
        json_serialize_bytes=orjson.dumps,
        timeout=SESSION_TIMEOUT,
        trust_env=False,  # no proxy or netrc picked up from the environment behind our back
    )


def _dumps_text(value: Any) -> str:
    return orjson.dumps(value).decode()
