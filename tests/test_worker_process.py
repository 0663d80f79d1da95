"""``biot-worker run`` as a real process against the BioT emulator over loopback HTTP.

These are the issue's acceptance checks: each hook type answered per the contract, one login
for a burst, log lines that are JSON with the event's trace id and no secret, and SIGTERM
during load (twice, as an impatient orchestrator sends it) losing no in-flight response. The
workers serve the project's own test plugin (``tests.fixture_plugin``); every process started
here is killed and reaped if its test fails or is interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import orjson
import pytest

from tests.conftest import TRACEPARENT, interceptor_body, notification_body
from tests.fixture_plugin import ADAPT_MARK, POST_MARK, PRE_MARK, REFERENCE
from worker.testing.emulator import Emulator, EmulatorConfig, EmulatorServer

START_TIMEOUT = 30.0


@dataclass
class WorkerProcess:
    process: asyncio.subprocess.Process
    url: str
    lines: list[bytes] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None
    _more: asyncio.Event = field(default_factory=asyncio.Event)

    async def read_rest(self) -> None:
        assert self.process.stdout is not None
        try:
            async for line in self.process.stdout:
                self.lines.append(line)
                self._more.set()
        finally:
            self._more.set()

    async def wait_logged(self, message: str) -> None:
        """Wait (bounded) until the worker has logged ``message``."""
        async with asyncio.timeout(START_TIMEOUT):
            while True:
                self._more.clear()
                if any(orjson.loads(line)["message"] == message for line in self.lines):
                    return
                assert self._reader is not None and not self._reader.done(), "worker ended"
                await self._more.wait()

    def records(self) -> list[dict[str, object]]:
        return [orjson.loads(line) for line in self.lines]


async def kill(process: asyncio.subprocess.Process) -> None:
    """Kill and reap ``process`` unless it has ended (a failed or interrupted test)."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


@contextlib.asynccontextmanager
async def spawned(*argv: str, env: dict[str, str]) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python -m worker ARGV``, killed on the way out whatever happened."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        *argv,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield process
    finally:
        await kill(process)


async def start_worker(emulator: Emulator, base_url: str, **env: str) -> WorkerProcess:
    """A ``biot-worker run`` process once listening; killed if it does not get there."""
    environment = {
        **os.environ,
        "WORKER_ROUTES": REFERENCE,
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
    try:
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
    except BaseException:
        await kill(process)
        raise


async def stop_worker(worker: WorkerProcess) -> int:
    """SIGTERM (unless it has ended) and the exit status; killed if it does not end in time."""
    try:
        if worker.process.returncode is None:
            worker.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(START_TIMEOUT):
            code = await worker.process.wait()
            if worker._reader is not None:
                await worker._reader
        return code
    finally:
        await kill(worker.process)


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


@pytest.mark.parametrize("second", ["none", "at once", "while stopping", "until it exits"])
async def test_sigterm_during_load_loses_no_in_flight_response(
    emulator: tuple[Emulator, str], second: str
) -> None:
    emu, url = emulator
    # Every patients search takes 2 s, so all events are still in flight when SIGTERM arrives
    # even on a loaded machine (the test waits until the worker holds every one of them).
    emu.faults.update({"latency": {"GET /organization/v1/users/patients": 2.0}})
    worker = await start_worker(emu, url, WORKER_SHUTDOWN_GRACE="10")
    events = 40
    try:
        async with aiohttp.ClientSession() as http:
            calls = [
                asyncio.create_task(
                    post(http, worker.url, *signed(emu, "NOTIFICATION", notification_body(None)))
                )
                for _ in range(events)
            ]
            await _wait_in_flight(http, worker.url, events)
            # A second SIGTERM right after the first (as some orchestrators and impatient
            # people send it) is logged and ignored: the stop stays graceful. Sent at once, the
            # kernel may merge the two; sent once the stop has begun, it is always seen.
            worker.process.send_signal(signal.SIGTERM)
            if second == "at once":
                worker.process.send_signal(signal.SIGTERM)
            if second == "while stopping":
                await worker.wait_logged("stopping")
                worker.process.send_signal(signal.SIGTERM)
            flood = asyncio.create_task(_signal_until_exit(worker)) if second[0] == "u" else None
            results = await asyncio.gather(*calls)
            if flood is not None:
                await flood  # signals kept coming while it closed its resources and exited
        assert [status for status, _ in results] == [200] * events
        # stop_worker signals once more if the process is still closing its resources: a
        # signal then must not kill it either (exit 143 was the defect).
    finally:
        code = await stop_worker(worker)
    stderr = await worker.process.stderr.read() if worker.process.stderr else b""
    assert code == 0, stderr.decode()[-3000:]
    records = worker.records()
    messages = [r["message"] for r in records]
    assert messages.count("event handled") == events
    assert messages[-1] == "worker stopped; closing resources"
    assert messages.count("stopping") == 1
    ignored = [r for r in records if r["message"] == "already stopping; signal ignored"]
    if second == "while stopping":
        assert ignored and ignored[0]["signal"] == "SIGTERM"
        assert messages.index(ignored[0]["message"]) < messages.index("event handled")


async def _signal_until_exit(worker: WorkerProcess) -> None:
    """SIGTERM every 0.1 ms, from a thread, until the process has exited (at most 20 s)."""
    deadline = time.monotonic() + 20

    def flood() -> None:
        # os.kill, not send_signal: that one polls, and a poll that reaps the process leaves
        # asyncio's child watcher to report 255 instead of the exit status.
        while worker.process.returncode is None and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.process.pid, signal.SIGTERM)
            time.sleep(0.0001)  # pacing the flood, not waiting for anything

    await asyncio.to_thread(flood)


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


def _without_biot_settings(**env: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BIOT_", "WORKER_"))}
    return {**clean, "WORKER_ROUTES": REFERENCE, **env}


async def test_dev_runs_the_worker_on_the_embedded_emulator() -> None:
    """The README's first command: dev brings its own BioT and subscribes the routes."""
    async with spawned("dev", "--port", "0", env=_without_biot_settings()) as process:
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
            # The routes were subscribed: a user's PATCH runs PRE, ADAPT_ENTITY and POST.
            async with http.post(api + "/_emulator/user-token") as response:
                user = {"authorization": "Bearer " + (await response.json())["accessToken"]}
            patients = api + "/organization/v1/users/patients"
            async with http.get(patients, headers=user) as response:
                patient_id = (await response.json())["data"][0]["_id"]
            change = {"_name": {"firstName": "Ada", "lastName": "L"}}
            async with http.patch(f"{patients}/{patient_id}", json=change, headers=user) as answer:
                name = (await answer.json())["_name"]["firstName"]
            assert name == "Ada" + PRE_MARK + ADAPT_MARK + POST_MARK
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(START_TIMEOUT):
            _, stderr = await process.communicate()
        assert process.returncode == 0
    banner = stderr.decode()
    assert f"BioT emulator at {api}; worker at {url}. To trigger hooks:" in banner
    # One line per registered route, derived from the routes (the fixture plugin has 6).
    assert "  - NONSPECIFIC -> tests.fixture_plugin.count_patients: curl" in banner
    assert banner.count("-> tests.fixture_plugin.") == 6


async def test_run_without_base_url_refuses_to_start() -> None:
    async with spawned("run", "--port", "0", env=_without_biot_settings()) as process:
        async with asyncio.timeout(START_TIMEOUT):
            stdout, stderr = await process.communicate()
    assert process.returncode == 2 and stdout == b""
    assert stderr.decode().splitlines() == [
        "biot-worker run: BIOT_BASE_URL is not set; a production worker never talks to a fake "
        "BioT. For local development use: biot-worker dev"
    ]


async def test_emulator_command_prints_how_to_use_it_and_serves() -> None:
    async with spawned("emulator", "--port", "0", env=dict(os.environ)) as process:
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
            "BIOT_USERNAME",  # the admin user deploy and subscribe log in as
            "BIOT_PASSWORD",
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


async def test_slow_bodies_idle_sockets_and_bad_bytes_leave_events_answered(
    emulator: tuple[Emulator, str],
) -> None:
    """``run`` wires WORKER_BODY_TIMEOUT and WORKER_KEEPALIVE_TIMEOUT: slow bodies hold no slot
    and get 408, an idle socket is closed, undecodable bytes after Bearer answer 400 and are
    logged."""
    emu, url = emulator
    worker = await start_worker(
        emu, url, WORKER_MAX_IN_FLIGHT="2", WORKER_BODY_TIMEOUT="1", WORKER_KEEPALIVE_TIMEOUT="1"
    )
    host, port = worker.url.removeprefix("http://").rsplit(":", 1)
    streams: list[asyncio.StreamWriter] = []
    try:
        async with asyncio.timeout(START_TIMEOUT), aiohttp.ClientSession() as http:
            slow = []
            for _ in range(4):  # twice the slots
                reader, writer = await asyncio.open_connection(host, int(port))
                streams.append(writer)
                writer.write(b'POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"a": ')
                await writer.drain()
                slow.append(asyncio.create_task(reader.readuntil(b"\r\n\r\n")))
            idle_reader, idle_writer = await asyncio.open_connection(host, int(port))
            streams.append(idle_writer)
            event = signed(emu, "INTERCEPTOR_PRE", interceptor_body("INTERCEPTOR_PRE"))
            status, _ = await post(http, worker.url, *event)
            assert status == 200
            assert not any(task.done() for task in slow)
            for task in slow:
                assert (await task).startswith(b"HTTP/1.1 408 ")
            assert await idle_reader.read() == b""  # closed by the keep-alive timeout

            reader, writer = await asyncio.open_connection(host, int(port))
            streams.append(writer)
            writer.write(
                b"POST / HTTP/1.1\r\nHost: x\r\nhooktype: INTERCEPTOR_PRE\r\n"
                b"authorization: Bearer \xff\xfe.\xc3(.x\r\ntraceparent: "
                + TRACEPARENT.encode()
                + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
            )
            answer = await reader.read()
            assert answer.startswith(b"HTTP/1.1 400 "), answer
            assert b'"JWT_ERROR"' in answer
            while True:  # the log line is written (bounded by the timeout above)
                worker._more.clear()
                if any(r.get("code") == "JWT_ERROR" for r in worker.records()):
                    break
                await worker._more.wait()
    finally:
        for writer in streams:
            writer.close()
        await stop_worker(worker)
