"""The two BioT calls made without a service token: the service-user login and the public key.

Contract: each is one exchange on the shared session, bounded by its own ``timeout`` (not by
the current event's deadline, since one answer serves every waiting event) and never retried
here (the caller's cache decides). Neither the secret nor the token ever ends up in an error.

Seams for the composition root: :func:`service_login` returns ``(accessToken,
accessTokenExpiration)`` as text, to be wrapped as ``AccessToken(token,
parse_expiration(text))``; :func:`fetch_public_key_texts` returns ``(publicKey,
previousPublicKey)``, to be wrapped as ``PublicKeys(*texts)``.
"""

from __future__ import annotations

from typing import Any, Final

import aiohttp
import orjson

from worker.errors import ApiError, LoginError
from worker.http_session import DEFAULT_USER_AGENT
from worker.tracing import current_trace, new_trace
from worker.transport import (
    JSON_CONTENT_TYPE,
    Reply,
    decode,
    error_body,
    error_for,
    exchange,
    join_url,
    public_url,
)

LOGIN_PATH: Final = "/ums/v2/services/accessToken"
PUBLIC_KEY_PATH: Final = "/ums/v1/security/public-key"


async def service_login(
    session: aiohttp.ClientSession,
    base_url: str,
    user_id: str,
    secret: str,
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 - the login is bounded on its own, see below
    user_agent: str = DEFAULT_USER_AGENT,
) -> tuple[str, str]:
    """``POST /ums/v2/services/accessToken``; returns ``(accessToken, accessTokenExpiration)``.

    Bounded by ``timeout`` only, not by the current event's deadline: one login serves every
    event waiting on the token cache. Not retried here (the token cache decides). Any failure
    raises :class:`LoginError` with the status and BioT's error code, never the secret;
    ``transient`` is false for a refusal (4xx other than 429).
    """
    url = join_url(base_url, LOGIN_PATH)
    headers = {
        "User-Agent": user_agent,
        "Accept": "application/json",
        "Content-Type": JSON_CONTENT_TYPE,
        "traceparent": (current_trace.get() or new_trace()).child().traceparent,
    }
    body = orjson.dumps({"id": user_id, "secretKey": secret})
    try:
        reply = await exchange(session, "POST", url, headers=headers, limit=timeout, body=body)
    except ApiError as error:
        raise _login_error(error.message, url) from error
    if reply.status >= 300:
        raise _login_refused(reply, url, secret)
    return _login_answer(reply, url)


def _login_error(
    message: str, url: str, status: int | None = None, body: Any = None
) -> LoginError:
    error = LoginError(f"service-user login failed: {message}", status=status, method="POST",
                       url=public_url(url), body=body)
    error.transient = status is None or status >= 500 or status == 429
    return error


def _login_refused(reply: Reply, url: str, secret: str) -> LoginError:
    body = error_body(reply.raw)
    code = body.get("code") if isinstance(body, dict) else None
    if secret and secret in orjson.dumps(body).decode():
        body = {"code": code}  # BioT echoed the secret back: keep only the code
    detail = f"BioT answered {reply.status}{f' {code}' if code else ''}"
    return _login_error(detail, url, reply.status, body)


def _login_answer(reply: Reply, url: str) -> tuple[str, str]:
    # The answer holds a token: never attach it to an error.
    try:
        answer = orjson.loads(reply.raw)
    except orjson.JSONDecodeError:
        raise _login_error("the answer is not JSON", url, reply.status) from None
    token = answer.get("accessToken") if isinstance(answer, dict) else None
    expiration = answer.get("accessTokenExpiration") if isinstance(answer, dict) else None
    if not isinstance(token, str) or not token or not isinstance(expiration, str):
        raise _login_error("the answer lacks accessToken or accessTokenExpiration", url,
                           reply.status)
    return token, expiration


async def fetch_public_key_texts(
    session: aiohttp.ClientSession,
    base_url: str,
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 - bounded on its own, like the login
) -> tuple[str, str | None]:
    """``GET /ums/v1/security/public-key`` → ``(publicKey, previousPublicKey or None)``.

    Sent without ``Authorization`` or trace headers, as the platform does. Raises
    :class:`TransientApiError` (connection, timeout, 429/5xx) or :class:`ApiError`.
    """
    url = join_url(base_url, PUBLIC_KEY_PATH)
    headers = {"Accept": "application/json"}
    reply = await exchange(session, "GET", url, headers=headers, limit=timeout)
    if reply.status >= 300:
        raise error_for(reply, "GET", url)
    answer = decode(reply, "GET", url)
    current = answer.get("publicKey") if isinstance(answer, dict) else None
    if not isinstance(current, str) or not current:
        raise ApiError("public-key answer lacks publicKey", status=reply.status, method="GET",
                       url=public_url(url))
    previous = answer.get("previousPublicKey")
    return current, previous if isinstance(previous, str) and previous else None
