"""``biot-worker run`` as a real process against the BioT emulator over loopback HTTP.

These are the issue's acceptance checks: each hook type answered per the contract, one login
for a burst, log lines that are JSON with the event's trace id and no secret, and SIGTERM
during load losing no in-flight response.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import orjson
import pytest

from tests.conftest import TRACEPARENT, interceptor_body, notification_body
from worker.testing.emulator import Emulator, EmulatorConfig, EmulatorServer

START_TIMEOUT = 30.0


@dataclass
class WorkerProcess:
    process: asyncio.subprocess.Process
    url: str
    lines: list[bytes] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None

    async def read_rest(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            self.lines.append(line)

    def records(self) -> list[dict[str, object]]:
        return [orjson.loads(line) for line in self.lines]


async def start_worker(emulator: Emulator, base_url: str, **env: str) -> WorkerProcess:
    environment = {
        **os.environ,
        "BIOT_BASE_URL": base_url,
        "BIOT_SERVICE_USER_ID": emulator.service_user_id,
        "BIOT_SERVICE_USER_SECRET_KEY": emulator.service_user_secret,
        "BIOT_APP_NAME": "process-test",
        "WORKER_PORT": "0",
        **env,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "run",
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    lines: list[bytes] = []
    async with asyncio.timeout(START_TIMEOUT):
        async for line in process.stdout:
            lines.append(line)
            record = orjson.loads(line)
            if record["message"] == "worker listening":
                worker = WorkerProcess(process, str(record["url"]), lines)
                worker._reader = asyncio.create_task(worker.read_rest())
                return worker
    stderr = await process.stderr.read() if process.stderr else b""
    raise AssertionError(f"worker did not start: {stderr.decode()[-2000:]}")


async def stop_worker(worker: WorkerProcess) -> int:
    if worker.process.returncode is None:
        worker.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(START_TIMEOUT):
        code = await worker.process.wait()
        if worker._reader is not None:
            await worker._reader
    return code


@pytest.fixture
async def emulator() -> AsyncIterator[tuple[Emulator, str]]:
    emu = Emulator(EmulatorConfig())
    async with EmulatorServer(emu) as server:
        yield emu, server.url


@pytest.fixture
async def worker(emulator: tuple[Emulator, str]) -> AsyncIterator[WorkerProcess]:
    emu, url = emulator
    process = await start_worker(emu, url)
    try:
        yield process
    finally:
        await stop_worker(process)


def signed(emu: Emulator, hook: str, body: dict[str, object]) -> tuple[dict[str, str], bytes]:
    headers = {"hooktype": hook, "traceparent": TRACEPARENT, "content-type": "application/json"}
    if hook == "NOTIFICATION":
        body = {**body, "jwt": emu.sign_token(scopes=["ACTION_NOTIFICATION"])}
    else:
        headers["authorization"] = "Bearer " + emu.sign_token(scopes=["PLUGIN_INTERCEPTOR"])
    return headers, orjson.dumps(body)


async def post(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], body: bytes
) -> tuple[int, bytes]:
    async with http.post(url, data=body, headers=headers) as response:
        return response.status, await response.read()


async def test_each_hook_type_answers_per_contract(
    emulator: tuple[Emulator, str], worker: WorkerProcess
) -> None:
    emu, _ = emulator
    async with aiohttp.ClientSession() as http:
        status, body = await post(
            http, worker.url, *signed(emu, "NOTIFICATION", notification_body(None))
        )
        assert (status, body) == (200, b"")
        for hook in ("INTERCEPTOR_PRE", "INTERCEPTOR_POST", "INTERCEPTOR_POST_ENTITY"):
            status, body = await post(http, worker.url, *signed(emu, hook, interceptor_body(hook)))
            assert status == 200, body
            answer = orjson.loads(body)
            assert list(answer) == ["request" if hook == "INTERCEPTOR_PRE" else "response"]
        status, body = await post(http, worker.url, {"traceparent": TRACEPARENT}, b"{}")
        assert status == 200
        assert orjson.loads(body)["patients"] == 3


async def test_burst_of_200_events_logs_in_once(
    emulator: tuple[Emulator, str], worker: WorkerProcess
) -> None:
    emu, _ = emulator
    async with aiohttp.ClientSession() as http:
        calls = [
            post(http, worker.url, *signed(emu, "NOTIFICATION", notification_body(None)))
            for _ in range(200)
        ]
        results = await asyncio.gather(*calls)
    assert [status for status, _ in results] == [200] * 200
    assert emu.logins == 1


async def test_log_lines_are_json_with_trace_and_no_secret(
    emulator: tuple[Emulator, str], worker: WorkerProcess
) -> None:
    emu, _ = emulator
    headers, body = signed(emu, "INTERCEPTOR_PRE", interceptor_body("INTERCEPTOR_PRE"))
    async with aiohttp.ClientSession() as http:
        assert (await post(http, worker.url, headers, body))[0] == 200
        note_headers, note_body = signed(emu, "NOTIFICATION", notification_body(None))
        assert (await post(http, worker.url, note_headers, note_body))[0] == 200
    await _send_malformed_http(worker.url)
    assert await stop_worker(worker) == 0
    records = worker.records()  # every line parses as one JSON object
    assert [r for r in records if r["message"] == "malformed HTTP request refused"]
    assert worker.process.stderr is not None
    assert await worker.process.stderr.read() == b""  # nothing outside the JSON stream
    event_lines = [r for r in records if "hook" in r]
    assert len(event_lines) >= 3
    assert all(r["traceId"] == TRACEPARENT.split("-")[1] for r in event_lines)
    output = b"".join(worker.lines).decode()
    token = headers["authorization"].split()[1]
    for secret in (token, emu.service_user_secret, orjson.loads(note_body)["jwt"]):
        assert secret not in output
    assert all(
        {"@timestamp", "message", "level", "level_value", "appName"} <= set(r) for r in records
    )


async def test_sigterm_during_load_loses_no_in_flight_response(
    emulator: tuple[Emulator, str],
) -> None:
    emu, url = emulator
    # Every patients search takes 2 s, so all events are still in flight when SIGTERM arrives
    # even on a loaded machine (the test waits until the worker holds every one of them).
    emu.faults.update({"latency": {"GET /organization/v1/users/patients": 2.0}})
    worker = await start_worker(emu, url, WORKER_SHUTDOWN_GRACE="10")
    events = 40
    async with aiohttp.ClientSession() as http:
        calls = [
            asyncio.create_task(
                post(http, worker.url, *signed(emu, "NOTIFICATION", notification_body(None)))
            )
            for _ in range(events)
        ]
        await _wait_in_flight(http, worker.url, events)
        worker.process.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*calls)
    assert [status for status, _ in results] == [200] * events
    assert await stop_worker(worker) == 0
    messages = [r["message"] for r in worker.records()]
    assert messages.count("event handled") == events
    assert messages[-1] == "worker stopped; closing resources"


async def _send_malformed_http(url: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
    await writer.drain()
    assert (await reader.read()).split(b" ", 2)[1] == b"400"
    writer.close()
    await writer.wait_closed()


async def _wait_in_flight(http: aiohttp.ClientSession, url: str, expected: int) -> None:
    """Poll /healthz (bounded) until every event is in the worker's hands."""
    for _ in range(2000):
        async with http.get(url + "/healthz") as response:
            if (await response.json())["inFlight"] >= expected:
                return
    raise AssertionError("events never all reached the worker")


async def test_main_command_runs_on_the_embedded_emulator() -> None:
    """The README's main job: no BIOT_BASE_URL, so `run` brings its own BioT."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BIOT_", "WORKER_"))}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "run",
        "--port",
        "0",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    url = api = ""
    async with asyncio.timeout(START_TIMEOUT):
        async for line in process.stdout:
            record = orjson.loads(line)
            if record["message"] == "worker listening":
                url = str(record["url"])
            if record["message"] == "embedded BioT emulator running":
                api = str(record["emulator_url"])
                break
    assert url and api
    async with aiohttp.ClientSession() as http:
        headers = {"hooktype": "NONSPECIFIC"}
        async with http.post(url, data=b"{}", headers=headers) as response:
            assert response.status == 200
            assert (await response.json())["patients"] == 3
        # The routed hooks were subscribed: a user's PATCH runs PRE, ADAPT_ENTITY and POST.
        async with http.post(api + "/_emulator/user-token") as response:
            user = {"authorization": "Bearer " + (await response.json())["accessToken"]}
        patients = api + "/organization/v1/users/patients"
        async with http.get(patients, headers=user) as response:
            patient_id = (await response.json())["data"][0]["_id"]
        change = {"_name": {"firstName": "Ada", "lastName": "L"}}
        async with http.patch(f"{patients}/{patient_id}", json=change, headers=user) as response:
            name = (await response.json())["_name"]["firstName"]
        assert name == "Ada LAMBDA MODIFIED LAMBDA LAMBDA MODIFIED"
    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(START_TIMEOUT):
        _, stderr = await process.communicate()
    assert process.returncode == 0
    banner = stderr.decode()
    assert "To trigger hooks" in banner and "PATCH" in banner


async def test_emulator_command_prints_how_to_use_it_and_serves() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "emulator",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    printed: dict[str, str] = {}
    async with asyncio.timeout(START_TIMEOUT):
        async for raw in process.stdout:
            line = raw.decode().strip()
            if "=" in line and line.startswith("BIOT_"):
                key, _, value = line.partition("=")
                printed[key] = value.split()[0]
            if line.startswith("admin API"):
                break
    assert set(printed) == {
        "BIOT_BASE_URL",
        "BIOT_SERVICE_USER_ID",
        "BIOT_SERVICE_USER_SECRET_KEY",
    }
    login = {
        "id": printed["BIOT_SERVICE_USER_ID"],
        "secretKey": printed["BIOT_SERVICE_USER_SECRET_KEY"],
    }
    async with aiohttp.ClientSession() as http:
        url = printed["BIOT_BASE_URL"] + "/ums/v2/services/accessToken"
        async with http.post(url, json=login) as response:
            assert response.status == 200
            assert "accessToken" in await response.json()
    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(START_TIMEOUT):
        await process.communicate()
    assert process.returncode == 0


async def test_worker_runs_on_uvloop_when_asked(emulator: tuple[Emulator, str]) -> None:
    emu, url = emulator
    worker = await start_worker(emu, url, WORKER_EVENT_LOOP="uvloop")
    listening = [r for r in worker.records() if r["message"] == "worker listening"]
    assert listening[0]["event_loop"] == "uvloop"
    try:
        async with aiohttp.ClientSession() as http:
            hook = "INTERCEPTOR_PRE"
            status, _ = await post(http, worker.url, *signed(emu, hook, interceptor_body(hook)))
            assert status == 200
    finally:
        assert await stop_worker(worker) == 0


def test_uvloop_missing_is_a_settings_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from config.settings import SettingsError
    from worker.cli import loop_factory

    assert loop_factory("asyncio") is None
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed
    with pytest.raises(SettingsError, match="uvloop is not installed"):
        loop_factory("uvloop")
