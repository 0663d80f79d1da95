"""The services of BioT's Python sample plugin (``plugin-lambda-seed-python-public`` 1.5.7),
rewritten for the baselines without copying: its logger, JWT check, login and HTTP helper.

Faithful to the seed in what costs time: stdlib ``json``; a log record printed as indented JSON
for the event, the login and each request and response (with the response text); blocking
``requests.request`` without a ``Session`` (a new connection, and over HTTPS a new TLS context
loading the CA bundle, for every call); the public key fetched once per container and the JWT
verified from its PEM *text* on every event (the seed uses python-jose, which is not a
dependency here: PyJWT given the PEM string does the same work, parse the PEM then verify
RS512); the seed's default headers, including its odd ``Host: lambda.aws.com``. State the seed
keeps in module globals (one Lambda container) lives in a :class:`Container` per thread.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from calendar import timegm
from datetime import datetime
from typing import Any, Final

import jwt
import requests

TOKEN_REFRESH_BUFFER: Final = 60  # seconds, as the seed's login cache
DEFAULT_HEADERS: Final = {
    "User-Agent": "PythonPlugin/1.5.6",
    "Host": "lambda.aws.com",
    "Accept": "application/json",
    "Content-Type": "application/json; charset=utf-8",
}
_write_lock = threading.Lock()


class SeedError(Exception):
    """What the seed raises (``JWT_ERROR``, ``CALL_TO_API_FAILED``...): ``code`` is its name."""

    def __init__(self, code: str, cause: object = None) -> None:
        super().__init__(code)
        self.code = code
        self.cause = cause


class Container(threading.local):
    """The module globals of one warm Lambda container: trace id, public key, cached token."""

    trace_id = "traceId-not-set"
    public_key: str | None = None
    token: str | None = None
    token_expiration: float | None = None


class SeedLog:
    """The seed's logger: ``print(json.dumps(record, indent=4))`` of every record."""

    def __init__(self, app_name: str, container: Container) -> None:
        self._app_name = app_name
        self._container = container

    def info(self, *args: Any) -> None:
        record = {
            "@timestamp": datetime.now().strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "message": "".join(str(arg) for arg in args),
            "level": "INFO",
            "level_value": 30000,
            "appName": self._app_name,
            "traceId": self._container.trace_id,
        }
        text = json.dumps(record, indent=4) + "\n"
        with _write_lock:  # one container prints alone; threads here share a stdout
            sys.stdout.write(text)


class SeedApi:
    """Login, public key, JWT check and API calls, each a blocking ``requests`` call."""

    def __init__(
        self, base_url: str, user_id: str, secret: str, log: SeedLog, container: Container
    ) -> None:
        self._base = base_url.rstrip("/")
        self._user_id = user_id
        self._secret = secret
        self._log = log
        self._container = container

    def authenticate(self, token: str | None, required_permission: str | None) -> None:
        box = self._container
        if box.public_key is None:
            key = requests.get(self._base + "/ums/v1/security/public-key").json()["publicKey"]  # noqa: S113 - as the seed
            box.public_key = "-----BEGIN PUBLIC KEY-----\n" + key + "\n-----END PUBLIC KEY-----"
        try:
            claims = jwt.decode(token or "", box.public_key, algorithms=["RS512"])
        except Exception as exc:
            raise SeedError("JWT_ERROR", exc) from None
        if required_permission and required_permission not in (claims.get("scopes") or []):
            raise SeedError("JWT_ERROR", f"missing {required_permission}")

    def login(self, traceparent: str, *, cached: bool) -> str:
        """A service token: from the container's cache when ``cached``, else a new login."""
        box = self._container
        expiration = box.token_expiration or 0.0
        if cached and box.token is not None and time.time() < expiration - TOKEN_REFRESH_BUFFER:
            self._log.info("Using cached access token")
            return box.token
        self._log.info("Fetching new access token")
        res = requests.post(  # noqa: S113 - the seed sets no timeout
            self._base + "/ums/v2/services/accessToken",
            json={"id": self._user_id, "secretKey": self._secret},
            headers={"traceparent": traceparent},
        )
        data = res.json()
        when = datetime.fromisoformat(data["accessTokenExpiration"].replace("Z", "+00:00"))
        box.token = data["accessToken"]
        box.token_expiration = timegm(when.replace(tzinfo=None).utctimetuple())
        return str(data["accessToken"])

    def get(
        self, path: str, traceparent: str, token: str, query: dict[str, Any] | None = None
    ) -> Any:
        """The seed's ``http_utils.get``: log, call, log the response, raise on non-2xx."""
        url = self._base + path
        self._log.info(
            "Sending http request: ", {"method": "GET", "url": url, "query_params": query}
        )
        params = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in (query or {}).items()}
        headers = {
            **DEFAULT_HEADERS,
            "traceparent": traceparent,
            "Authorization": f"Bearer {token}",
        }
        try:
            response = requests.request(method="GET", url=url, headers=headers, params=params)  # noqa: S113
        except Exception as exc:
            raise SeedError("CALL_TO_API_FAILED", exc) from None
        self._log.info(
            "Received http response: ",
            {
                "status code": response.status_code,
                "body": response.text,
                "headers": response.headers,
            },
        )
        if response.status_code not in range(200, 299):
            raise SeedError("CALL_TO_API_FAILED", response.text)
        return {} if response.status_code == 204 else response.json()
