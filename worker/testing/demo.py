"""``biot-worker demo``: one event of each hook type through the emulator and the worker.

It starts BioT in a box and the worker (both in this process, over real loopback HTTP), sends
each hook's event to the worker exactly as BioT does (headers, an RS512 token signed by the
emulator's key, the contract's payload), and prints per hook what the handler did and the
round-trip latency. It ends with a user's PATCH through the emulator, which runs the whole
chain (PRE -> update -> ADAPT_ENTITY -> POST, then the notification). Worker logs go to stderr.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, TextIO

import aiohttp
import orjson

from config.settings import load_settings
from handlers import PATCH_PATIENT, build_routes
from worker.app import WorkerApp
from worker.runner import run_worker
from worker.testing.dev import embedded_emulator, subscribe_routes
from worker.testing.emulator import Emulator
from worker.tracing import new_trace

PATIENTS = "/organization/v1/users/patients"
ROUNDS = 20


@dataclass(frozen=True)
class Outcome:
    hook: str
    status: int
    did: str
    latencies_ms: list[float]

    def row(self) -> str:
        p50 = statistics.median(self.latencies_ms)
        worst = max(self.latencies_ms)
        return f"{self.hook:<26} {self.status:>6} {p50:>9.2f} {worst:>9.2f}  {self.did}"


async def demo(*, tls: bool = False, out: IO[str] | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    stop = asyncio.Event()
    listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    routes = build_routes()
    async with embedded_emulator(load_settings({}), tls=tls) as (emulator, server, settings):

        def started(app: WorkerApp, url: str) -> None:
            subscribe_routes(emulator, routes, url, app.log)
            listening.set_result(url)

        worker = asyncio.create_task(
            run_worker(settings, routes, stop=stop, started=started, stream=err or sys.stderr)
        )
        try:
            url = await _wait_listening(listening, worker)
            outcomes = await _drive(emulator, server.url, url, server.ca_file)
        finally:
            stop.set()
            await worker
    _print(out, outcomes, server.url)
    return 0 if all(o.status < 400 for o in outcomes) else 1


async def _wait_listening(listening: asyncio.Future[str], worker: asyncio.Task[None]) -> str:
    waiting: list[asyncio.Future[Any]] = [listening, worker]
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if not listening.done():
        worker.result()  # raises the worker's start-up error
        raise RuntimeError("the worker stopped before listening")
    return listening.result()


async def _drive(
    emulator: Emulator, api_url: str, worker_url: str, ca_file: str | None
) -> list[Outcome]:
    ssl: Any = True
    if ca_file is not None:
        import ssl as ssl_module

        ssl = await asyncio.to_thread(ssl_module.create_default_context, cafile=ca_file)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl)) as http:
        # Read the sample patient as a service would: no interceptor runs on it.
        service = emulator.sign_token(scopes=[], token_type="SERVICE_EXTERNAL")  # noqa: S106
        async with http.get(api_url + PATIENTS, headers=_bearer(service)) as response:
            patient = (await response.json())["data"][0]
        user = _bearer(emulator.user_token())
        sender = _Sender(http, worker_url, emulator)
        outcomes = [
            await sender.send("NOTIFICATION", _notification(patient), _did_notification),
            await sender.send("INTERCEPTOR_PRE", _interception(patient), _did_pre),
            await sender.send("INTERCEPTOR_POST_ENTITY", _adapt(patient), _did_adapt),
            await sender.send("INTERCEPTOR_POST", _post(patient), _did_post),
            await sender.send("NONSPECIFIC", {}, lambda body: f"answered {body}"),
        ]
        outcomes.append(await _user_patch(http, api_url, patient, user, emulator))
    return outcomes


class _Sender:
    """Sends one hook's event to the worker as BioT does, ROUNDS times, timing each."""

    def __init__(self, http: aiohttp.ClientSession, url: str, emulator: Emulator) -> None:
        self._http, self._url, self._emulator = http, url, emulator

    async def send(
        self, hook: str, payload: dict[str, Any], describe: Callable[[Any], str]
    ) -> Outcome:
        latencies, status, body = [], 0, None
        for _ in range(ROUNDS + 1):  # the first round warms up and is not counted
            headers, data = self._signed(hook, payload)
            started = time.perf_counter()
            async with self._http.post(self._url, data=data, headers=headers) as response:
                raw = await response.read()
                status = response.status
            latencies.append((time.perf_counter() - started) * 1000)
            body = orjson.loads(raw) if raw else None
        return Outcome(hook, status, describe(body), latencies[1:])

    def _signed(self, hook: str, payload: dict[str, Any]) -> tuple[dict[str, str], bytes]:
        headers = {
            "hooktype": hook,
            "traceparent": new_trace().traceparent,
            "content-type": "application/json",
        }
        if hook == "NOTIFICATION":
            payload = {**payload, "jwt": self._emulator.sign_token(scopes=["ACTION_NOTIFICATION"])}
        elif hook.startswith("INTERCEPTOR"):
            token = self._emulator.sign_token(scopes=["PLUGIN_INTERCEPTOR"])
            headers["authorization"] = f"Bearer {token}"
        return headers, orjson.dumps(payload)


async def _user_patch(
    http: aiohttp.ClientSession,
    api_url: str,
    patient: dict[str, Any],
    user: dict[str, str],
    emulator: Emulator,
) -> Outcome:
    url = f"{api_url}{PATIENTS}/{patient['_id']}"
    change = {"_name": {"firstName": "Ada", "lastName": "Lovelace"}}
    started = time.perf_counter()
    async with http.patch(url, json=change, headers=user) as response:
        body = await response.json()
        status = response.status
    latency = (time.perf_counter() - started) * 1000
    await emulator.drain_notifications()
    first = body.get("_name", {}).get("firstName") if isinstance(body, dict) else None
    notified = [c for c in emulator.call_log if c.hook == "NOTIFICATION" and c.direction == "out"]
    did = f"user PATCH firstName 'Ada' -> {first!r}; notifications sent: {len(notified)}"
    return Outcome("user PATCH via emulator", status, did, [latency])


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def _interception(patient: dict[str, Any]) -> dict[str, Any]:
    return {
        "initiatorData": {"subjectId": "demo-user", "tokenType": "USER"},
        "method": "PATCH",
        "entityName": "patient",
        "apiId": PATCH_PATIENT,
        "request": {
            "path": f"{PATIENTS}/{patient['_id']}",
            "queryParameters": {},
            "headers": {"content-type": "application/json"},
            "body": {"_name": {"firstName": "Ada", "lastName": "Lovelace"}},
            "pathVariables": [{"name": "id", "value": patient["_id"]}],
        },
    }


def _adapt(patient: dict[str, Any]) -> dict[str, Any]:
    return {**_interception(patient), "response": {"entities": [patient], "httpStatusCode": "OK"}}


def _post(patient: dict[str, Any]) -> dict[str, Any]:
    response = {"body": patient, "httpStatusCode": "200 OK"}
    return {**_interception(patient), "response": response}


def _notification(patient: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {"entityTypeName": "patient", "actionName": "_update", "status": "SUCCESS"},
        "data": {"entity": patient, "additionalData": {"oldEntity": patient}},
    }


def _did_notification(body: Any) -> str:
    return "read patients through the API with the cached service token (see its log line)"


def _did_pre(body: Any) -> str:
    return f"request firstName 'Ada' -> {body['request']['body']['_name']['firstName']!r}"


def _did_adapt(body: Any) -> str:
    names = [e["_name"]["firstName"] for e in body["response"]["entities"]]
    return f"entities' firstName -> {names}"


def _did_post(body: Any) -> str:
    name = body["response"]["body"]["_name"]["firstName"]
    return f"response firstName -> {name!r}, httpStatusCode {body['response']['httpStatusCode']!r}"


def _print(out: IO[str], outcomes: list[Outcome], api_url: str) -> None:
    out.write(f"biot-worker demo against the BioT emulator at {api_url}\n")
    out.write(f"{'hook':<26} {'status':>6} {'p50 ms':>9} {'max ms':>9}  what the handler did\n")
    for outcome in outcomes:
        out.write(outcome.row() + "\n")
    out.write(f"(latency: {ROUNDS} round trips per hook after one warm-up, loopback HTTP)\n")
