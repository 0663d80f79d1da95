"""The worker's error tree. Each branch is a decision, not a taxonomy.

::

    WorkerError                      base; ``status``/``code`` become BioT's ErrorResponse
    ├── EventError                   permanent: the event itself is bad -> 400, never retried
    │   └── PayloadTooLarge          413
    ├── AuthError                    permanent: the platform's JWT is refused -> 400 JWT_ERROR
    │   └── ScopeError               403: valid token without the hook's scope
    ├── Block                        a handler refuses an intercepted call (status/code it chose)
    ├── DeadlineExceeded             the hook's deadline passed; the handler was cancelled -> 504
    ├── Overloaded                   too many events in flight -> 503 + Retry-After (transient)
    └── ApiError                     a BioT API call failed (status + BioT's error body)
        ├── TransientApiError        connection errors, timeouts, 429/502/503/504: retry later
        ├── ApiAuthError             401/403 from BioT after the one refresh-and-retry
        └── LoginError               the service-user login failed (transient: outage, 5xx)

``transient`` tells a queue adapter whether redelivering the event may succeed. Foreign
exceptions (aiohttp, PyJWT) are translated into this tree where they are caught.
"""

from __future__ import annotations

from typing import Any


class WorkerError(Exception):
    """A failure the worker answers with BioT's error envelope: ``status``, ``code``, ``details``;
    ``transient`` ones may succeed when the same event is tried again."""

    status: int = 500
    code: str = "INTERNAL_SERVER_ERROR"
    transient: bool = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.details: dict[str, Any] = details if details is not None else {}


class EventError(WorkerError):
    """The event is missing or malformed: ``NO_EVENT``, ``NO_DATA``, ``NO_METADATA``."""

    status = 400
    code = "NO_EVENT"


class PayloadTooLarge(EventError):
    status = 413
    code = "PAYLOAD_TOO_LARGE"


class AuthError(WorkerError):
    """The platform's JWT is refused; ``reason`` is one word from a fixed set (the label of
    ``biot_worker_jwt_refusals_total``): ``missing``, ``malformed``, ``signature``,
    ``expired``, ``not_yet_valid``, ``algorithm``, ``claims``, ``scope``, ``key_unavailable``
    or ``invalid``."""

    status = 400
    code = "JWT_ERROR"
    reason = "invalid"

    def __init__(self, message: str, *, reason: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        if reason is not None:
            self.reason = reason


class ScopeError(AuthError):
    status = 403
    reason = "scope"


class Block(WorkerError):
    """Raised by an interceptor handler to block the user's API call with BioT's error envelope.

    >>> raise Block(403, "MODIFICATION_FORBIDDEN", "patients cannot be renamed", {"field": "_name"})
    """

    def __init__(
        self,
        status: int = 403,
        code: str = "MODIFICATION_FORBIDDEN",
        message: str = "blocked by plugin",
        details: dict[str, Any] | None = None,
    ) -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"Block status must be 4xx or 5xx, got {status}")
        super().__init__(message, status=status, code=code, details=details)


class DeadlineExceeded(WorkerError):
    """The handler was still running at its hook's deadline and was cancelled (504)."""

    status = 504
    code = "DEADLINE_EXCEEDED"
    transient = True


class Overloaded(WorkerError):
    """More events arrived than ``WORKER_MAX_IN_FLIGHT`` allows (503 with ``Retry-After``)."""

    status = 503
    code = "OVERLOADED"
    transient = True


class ApiError(WorkerError):
    """A call to BioT's API failed; ``body`` is BioT's ErrorResponse when it sent one."""

    code = "CALL_TO_API_FAILED"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        method: str = "",
        url: str = "",
        body: Any = None,
    ) -> None:
        # The worker answers 502 for an upstream failure; the upstream status stays on the error.
        super().__init__(message, status=502, details=_api_details(status, method, url, body))
        self.upstream_status = status
        self.method = method
        self.url = url
        self.body = body


def _api_details(status: int | None, method: str, url: str, body: Any) -> dict[str, Any]:
    details: dict[str, Any] = {"method": method, "url": url}
    if status is not None:
        details["status"] = status
    if isinstance(body, dict) and body.get("code"):
        details["upstreamCode"] = body["code"]
    return details


class TransientApiError(ApiError):
    """BioT answered 429/502/503/504, timed out or could not be reached: worth trying again."""

    transient = True


class ApiAuthError(ApiError):
    """BioT answered 401 (after one token refresh) or 403: the service user may not do this."""


class LoginError(ApiError):
    """The service user could not log in (wrong credentials or BioT's login unavailable)."""

    code = "LOGIN_FAILED"
    transient = True
