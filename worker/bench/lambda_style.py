"""Baselines (ii) and (iii): a plugin written as BioT advises, served one event per thread.

``python -m worker.bench.lambda_style --style docs|sample --port P --base-url URL`` (service user
from ``BIOT_SERVICE_USER_ID`` / ``BIOT_SERVICE_USER_SECRET_KEY``; HTTPS trust from
``REQUESTS_CA_BUNDLE``, as ``requests`` reads it).

Both run the pipeline of BioT's Python sample plugin (its ``index.handler``): log the event, pick
the hook by the ``hooktype`` header, extract data and token, verify the JWT from the PEM text,
get a service token, perform, answer a Lambda result (``statusCode``, ``body``), with the
services of :mod:`worker.bench.seed` (blocking ``requests``, a new connection per call). They
differ in the service token only:

- ``docs`` (ii), the style BioT's documentation advises ("a new access token for each burst of
  API calls"): a login on every event;
- ``sample`` (iii), BioT's current sample plugin (1.5.7): the token cached per container and
  renewed 60 s before it expires.

How this stands for AWS Lambda, and where it differs. Each thread of a ``ThreadingHTTPServer``
serves one keep-alive connection, one event at a time, and keeps its own "module globals"
(:class:`worker.bench.seed.Container`), so each connection of the load generator is one warm
Lambda container. Unlike Lambda: all containers are threads of ONE process sharing one GIL on
the one pinned core (a Lambda fleet gives each container its own CPU and bills each one), so at
concurrency above 1 this measures what one core does, as for the worker; there is no Lambda
runtime around the handler (runtime-API polling, the Function URL front end, log shipping to
CloudWatch) and no cold start after the warm-up; logs go to a file; the event arrives as the
Function URL would deliver it (payload format 2.0: lower-case headers, body as a string).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, Final

from worker.bench import logic
from worker.bench.seed import Container, SeedApi, SeedError, SeedLog

SCOPES: Final = {
    "NOTIFICATION": "ACTION_NOTIFICATION",
    "INTERCEPTOR_PRE": "PLUGIN_INTERCEPTOR",
    "INTERCEPTOR_POST_ENTITY": "PLUGIN_INTERCEPTOR",
}
_STATUSES: Final = {"JWT_ERROR": 400}


class SeedPlugin:
    """The sample plugin's ``handler(event)`` with the benchmark scenarios as its ``perform``."""

    def __init__(self, api: SeedApi, log: SeedLog, container: Container, *, cached: bool) -> None:
        self._api, self._log, self._container, self._cached = api, log, container, cached

    def handler(self, event: dict[str, Any]) -> dict[str, Any]:
        self._log.info("At Lambda start, got event: ", event)
        self._log.info("At Lambda start, got body: ", json.loads(event["body"]))
        traceparent = "traceparent-not-set"
        hook = event["headers"].get("hooktype", "NONSPECIFIC")
        try:
            data, token, traceparent = self._extract(hook, event)
            self._container.trace_id = traceparent.split("-")[1]
            self._api.authenticate(token, SCOPES.get(hook))
            service_token = self._api.login(traceparent, cached=self._cached)
            return self._perform(hook, data, service_token, traceparent)
        except SeedError as exc:
            body = {"code": exc.code, "message": str(exc.cause), "traceId": traceparent}
            return {"statusCode": _STATUSES.get(exc.code, 500), "body": json.dumps(body)}

    def _extract(self, hook: str, event: dict[str, Any]) -> tuple[dict[str, Any], str, str]:
        headers = event["headers"]
        traceparent = headers.get("traceparent") or "00-" + "0" * 31 + "1-" + "0" * 15 + "1-01"
        if hook == "NOTIFICATION":
            body = json.loads(event["body"])
            return body, body["jwt"], traceparent
        # Interceptors: the whole event with the body parsed (the PRE extractor un-doubles "\\").
        text = event["body"].replace("\\\\", "\\") if hook == "INTERCEPTOR_PRE" else event["body"]
        token = headers.get("authorization", " ").split(" ")[1]
        return {**event, "body": json.loads(text)}, token, traceparent

    def _perform(
        self, hook: str, data: dict[str, Any], token: str, traceparent: str
    ) -> dict[str, Any]:
        if hook == "NOTIFICATION":
            patient_id = str(data["data"]["entity"]["_id"])
            for path, search in logic.notification_calls(patient_id):
                query = None if search is None else {"searchRequest": search}
                self._api.get(path, traceparent, token, query)
            return {"statusCode": 200, "body": json.dumps({"message": "OK"})}
        body = data["body"]
        if hook == "INTERCEPTOR_POST_ENTITY":
            logic.mark_entities(body["response"]["entities"])
            return {"statusCode": 200, "body": json.dumps({"response": body["response"]})}
        request = body["request"]
        if body["apiId"] == logic.API_ID_B:
            patient_id = logic.path_variable(request["pathVariables"], "id") or "missing"
            patient = self._api.get(logic.patient_url_path(patient_id), traceparent, token)
            logic.note_patient(request["headers"], patient)
        else:
            logic.mark_name(request["body"])
        return {"statusCode": 200, "body": json.dumps({"request": request})}


class EventHandler(BaseHTTPRequestHandler):
    """The Function URL's part: HTTP in, a payload-2.0 event to the handler, its result out."""

    protocol_version = "HTTP/1.1"  # keep-alive: one connection, one thread, one "container"
    # Headers and body leave in two writes; with Nagle on, the body would wait for the
    # client's delayed ACK (40 ms), an artefact of this shell that Lambda's front end lacks.
    disable_nagle_algorithm = True
    plugin: SeedPlugin  # set on the subclass built by make_server

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        event = {
            "version": "2.0",
            "routeKey": "$default",
            "rawPath": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "requestContext": {"http": {"method": "POST", "path": self.path}},
            "body": raw.decode("utf-8"),
            "isBase64Encoded": False,
        }
        result = self.plugin.handler(event)
        self._answer(int(result.get("statusCode", 200)), str(result.get("body", "")).encode())

    def do_GET(self) -> None:
        self._answer(200, b"ok")

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the Function URL's access log is not the function's


def make_server(
    style: str, port: int, base_url: str, user_id: str, secret: str
) -> ThreadingHTTPServer:
    container = Container()
    log = SeedLog("biot-bench-" + style, container)
    api = SeedApi(base_url, user_id, secret, log, container)
    plugin = SeedPlugin(api, log, container, cached=style == "sample")
    handler = type("Handler", (EventHandler,), {"plugin": plugin})
    server = _Server(("127.0.0.1", port), handler)
    server.daemon_threads = True
    return server


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # listen backlog; the default 5 refuses a burst of connections


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.bench.lambda_style")
    parser.add_argument("--style", choices=("docs", "sample"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--base-url", required=True)
    args = parser.parse_args(argv)
    server = make_server(
        args.style,
        args.port,
        args.base_url,
        os.environ.get("BIOT_SERVICE_USER_ID", ""),
        os.environ.get("BIOT_SERVICE_USER_SECRET_KEY", ""),
    )

    def stop(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    with server:
        server.serve_forever(poll_interval=0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
