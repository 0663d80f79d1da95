"""The emulator's Lambda host (:mod:`worker.testing.emulator.lambda_host`): a deployed zip runs in
its own process, one event at a time, behind a Function URL-like route. Every function here is a
tiny stdlib-only ``index.py`` zipped by the test; processes and folders are gone after each test.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import os
import shutil
import stat
import sys
import tempfile
import zipfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests import fixture_plugin
from tests.wheelhouse import build_wheelhouse, platform_tags
from worker.deploy.package import build_package, platforms
from worker.testing.emulator import lambda_host
from worker.testing.emulator.lambda_host import (
    InvalidPackage,
    LambdaHost,
    RuntimeUnavailable,
    function_url_response,
    python_for,
)
from worker.testing.events import TRACE_ID, default_keys, headers_for, interceptor_body
from worker.views import HookType

RUNTIME = f"python{sys.version_info[0]}.{sys.version_info[1]}"

INDEX = r"""
import json, os, sys, time

COUNT = 0


def handler(event, context):
    global COUNT
    COUNT += 1
    started = time.monotonic()
    raw = event.get("body") if not event.get("isBase64Encoded") else None
    body = json.loads(raw or "{}")
    action = body.get("action")
    if action == "sleep":
        print("sleeping", body.get("tag", ""), flush=True)
        time.sleep(body["seconds"])
    elif action == "raise":
        raise ValueError("boom")
    elif action == "exit":
        os._exit(3)
    elif action == "import":
        try:
            __import__(body["module"])
        except ImportError:
            return {"imported": False, "path": sys.path}
        return {"imported": True, "path": sys.path}
    elif action == "print":
        print("a stray print")
        os.write(1, b"a raw write on fd 1\n")
        sys.stderr.write("y" * 20000 + "\n")
        sys.stderr.flush()
        sys.stderr.write("x" * 200000 + "\nafter the long ones\n")
    elif action == "return":
        return body["result"]
    elif action == "flood":
        sys.stderr.write(("y" * 99 + "\n") * 3000)
    answer = {
        "count": COUNT,
        "pid": os.getpid(),
        "started": started,
        "ended": time.monotonic(),
        "env": dict(os.environ),
        "event": event,
        "remaining": context.get_remaining_time_in_millis(),
        "requestId": context.aws_request_id,
        "cwd": os.getcwd(),
    }
    return {"statusCode": 200, "headers": {"content-type": "application/json"},
            "body": json.dumps(answer)}
"""


def make_zip(files: Mapping[str, str | bytes], links: Mapping[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return buffer.getvalue()


@dataclass
class Served:
    host: LambdaHost
    url: str
    temp: Path
    lines: list[tuple[str, str]] = field(default_factory=list)
    waiting: list[tuple[str, asyncio.Event]] = field(default_factory=list)

    def log(self, name: str, line: str) -> None:
        self.lines.append((name, line))
        for text, seen in self.waiting:
            if text in line:
                seen.set()

    def seen(self, text: str) -> asyncio.Event:
        """Set once a function logs a line containing ``text``."""
        event = asyncio.Event()
        self.waiting.append((text, event))
        return event

    async def deploy(self, name: str = "fn", code: bytes | None = None, **options: Any) -> str:
        options.setdefault("runtime", RUNTIME)
        options.setdefault("env", {})
        options.setdefault("timeout", 10.0)
        return await self.host.deploy(name, code or make_zip({"index.py": INDEX}), **options)

    async def call(
        self, path: str, body: Any = None, *, method: str = "POST", **kwargs: Any
    ) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else kwargs.pop("data", None)
        timeout = aiohttp.ClientTimeout(total=30)
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.request(method, self.url + path, data=data, **kwargs) as response,
        ):
            raw = await response.read()
            try:
                return response.status, json.loads(raw)
            except ValueError:
                return response.status, raw

    def folders(self) -> list[Path]:
        return sorted(self.temp.glob("biot-lambda-*"))


@pytest.fixture
async def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Served]:
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    url = ""
    host = LambdaHost(base_url=lambda: url, init_timeout=15.0)
    served = Served(host, "", temp)
    host._log = served.log
    app = web.Application()
    app.add_routes(host.routes())
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    url = served.url = str(server.make_url("")).rstrip("/")
    try:
        async with asyncio.timeout(90):
            yield served
    finally:
        await host.close()
        await server.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_deploy_and_invoke_through_a_function_url(served: Served) -> None:
    path = await served.deploy("fn", env={"MY_SETTING": "on"}, timeout=7)
    assert path == "/_lambda/fn/"
    status, body = await served.call(
        path + "some/where?b=2&a=1&a=3",
        {"hello": "world"},
        headers={"X-Custom": "Yes", "Cookie": "c1=v1; c2=v2", "User-Agent": "ReactorNetty/1.2.10"},
    )
    assert status == 200
    event = body["event"]
    assert event["version"] == "2.0"
    assert event["routeKey"] == "$default"
    assert event["rawPath"] == "/some/where"
    assert event["rawQueryString"] == "b=2&a=1&a=3"
    assert event["queryStringParameters"] == {"a": "1,3", "b": "2"}
    assert event["headers"]["x-custom"] == "Yes"
    assert all(key == key.lower() for key in event["headers"])
    assert event["cookies"] == ["c1=v1", "c2=v2"]
    assert json.loads(event["body"]) == {"hello": "world"}
    assert event["isBase64Encoded"] is False
    http = event["requestContext"]["http"]
    assert http["method"] == "POST"
    assert http["path"] == "/some/where"
    assert http["userAgent"] == "ReactorNetty/1.2.10"
    assert http["sourceIp"] == "127.0.0.1"
    assert event["requestContext"]["domainName"] == served.url.split("//", 1)[1]
    assert 0 < body["remaining"] <= 7000
    assert body["requestId"]
    assert body["count"] == 1
    assert body["cwd"] == str(served.folders()[0].resolve())

    status, body = await served.call(path, data=b"\xff\x00binary")
    assert status == 200
    assert body["event"]["isBase64Encoded"] is True
    assert base64.b64decode(body["event"]["body"]) == b"\xff\x00binary"
    assert body["count"] == 2  # the same warm process

    status, body = await served.call("/_lambda/fn", method="GET")
    assert status == 200
    assert body["event"]["requestContext"]["http"]["method"] == "GET"
    assert body["event"]["rawPath"] == "/"
    assert "body" not in body["event"]


async def test_one_event_at_a_time(served: Served) -> None:
    path = await served.deploy()
    sleep = {"action": "sleep", "seconds": 0.2}
    answers = await asyncio.gather(*(served.call(path, sleep) for _ in range(4)))
    assert [status for status, _ in answers] == [200] * 4
    bodies = sorted((body for _, body in answers), key=lambda body: body["started"])
    assert [body["count"] for body in bodies] == [1, 2, 3, 4]
    assert len({body["pid"] for body in bodies}) == 1
    for before, after in itertools.pairwise(bodies):
        assert before["ended"] <= after["started"]  # never two handlers running at once


async def test_a_timed_out_invocation_is_504_and_the_process_is_replaced(served: Served) -> None:
    path = await served.deploy(timeout=0.5)
    _, first = await served.call(path)
    status, body = await served.call(path, {"action": "sleep", "seconds": 60})
    assert status == 504
    assert body == {
        "errorType": "Sandbox.Timedout",
        "errorMessage": "Task timed out after 0.50 seconds",
    }
    assert not alive(first["pid"])
    status, again = await served.call(path)
    assert status == 200
    assert again["count"] == 1  # a cold start: a new process
    assert again["pid"] != first["pid"]


async def test_a_handler_error_is_502_and_the_process_stays_warm(served: Served) -> None:
    path = await served.deploy()
    _, first = await served.call(path)
    status, body = await served.call(path, {"action": "raise"})
    assert status == 502
    assert body == {"errorType": "ValueError", "errorMessage": "boom"}
    status, after = await served.call(path)
    assert status == 200
    assert (after["pid"], after["count"]) == (first["pid"], 3)
    await served.host.remove("fn")
    assert any("ValueError: boom" in line for _, line in served.lines)  # the traceback is logged


async def test_a_crashed_process_is_502_then_a_new_one_answers(served: Served) -> None:
    path = await served.deploy()
    _, first = await served.call(path)
    status, body = await served.call(path, {"action": "exit"})
    assert status == 502
    assert body["errorType"] == "Runtime.ExitError"
    assert "(3)" in body["errorMessage"]
    status, after = await served.call(path)
    assert status == 200
    assert after["count"] == 1
    assert after["pid"] != first["pid"]


async def test_an_unserialisable_result_is_502(served: Served) -> None:
    path = await served.deploy()
    status, body = await served.call(path, {"action": "return", "result": None})
    assert (status, body) == (200, None)  # null is JSON: 200 with it
    bad = make_zip({"index.py": "def handler(event, context):\n    return {1, 2}\n"})
    path = await served.deploy("bad", bad)
    status, body = await served.call(path)
    assert status == 502
    assert body["errorType"] == "Runtime.MarshalError"


async def test_results_become_responses_by_the_function_url_rules(served: Served) -> None:
    path = await served.deploy()
    status, body = await served.call(path, {"action": "return", "result": {"plain": [1, 2]}})
    assert (status, body) == (200, {"plain": [1, 2]})
    status, body = await served.call(path, {"action": "return", "result": "just text"})
    assert (status, body) == (200, b"just text")
    explicit = {
        "statusCode": 418,
        "headers": {"x-a": "b", "Content-Length": "999", "transfer-encoding": "chunked"},
        "cookies": ["k=v"],
        "body": base64.b64encode(b"\x00\x01").decode(),
        "isBase64Encoded": True,
    }
    timeout = aiohttp.ClientTimeout(total=30)
    data = json.dumps({"action": "return", "result": explicit})
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.post(served.url + path, data=data) as response,
    ):
        assert response.status == 418
        assert response.headers["x-a"] == "b"
        assert response.headers.getall("Set-Cookie") == ["k=v"]
        assert await response.read() == b"\x00\x01"
    status, body = await served.call(path, {"action": "return", "result": {"statusCode": "200"}})
    assert status == 502
    assert body["errorType"] == "Runtime.InvalidResponse"


def test_function_url_response_without_a_body() -> None:
    response = function_url_response({"statusCode": 204})
    assert response.status == 204
    assert response.body == b""
    response = function_url_response({"statusCode": 200, "body": {"a": 1}})
    assert response.body == b'{"a":1}'


async def test_the_function_sees_only_the_environment_given(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAMBDA_HOST_TEST_LEAK", "should-not-be-seen")
    env = {"MY_SETTING": "on", "AWS_REGION": "eu-west-1", "BIOT_BASE_URL": "https://biot.example"}
    path = await served.deploy("envfn", env=env, timeout=3)
    _, body = await served.call(path)
    seen = body["env"]
    assert "LAMBDA_HOST_TEST_LEAK" not in seen
    assert "VIRTUAL_ENV" not in seen
    assert seen["MY_SETTING"] == "on"
    assert seen["BIOT_BASE_URL"] == "https://biot.example"
    assert seen["AWS_REGION"] == "us-east-1"  # reserved by Lambda: the given value loses
    assert seen["AWS_LAMBDA_FUNCTION_NAME"] == "envfn"
    assert seen["AWS_LAMBDA_FUNCTION_TIMEOUT"] == "3"
    assert seen["AWS_EXECUTION_ENV"] == f"AWS_Lambda_{RUNTIME}"
    assert seen["TZ"] == "UTC"
    assert seen["LAMBDA_TASK_ROOT"] == str(served.folders()[0])
    extra = set(seen) - set(env) - {"PATH", "LANG", "TZ", "LAMBDA_TASK_ROOT", "LC_CTYPE"}
    assert all(name.startswith("AWS_") for name in extra), extra

    path = await served.deploy("defaults")
    _, body = await served.call(path)
    assert body["env"]["BIOT_BASE_URL"] == served.url  # the emulator's, when none is given


async def test_the_zip_folder_is_the_only_code_path(served: Served) -> None:
    path = await served.deploy()
    status, body = await served.call(path, {"action": "import", "module": "aiohttp"})
    assert status == 200
    assert body["imported"] is False
    assert body["path"][0] == str(served.folders()[0])
    assert not any("site-packages" in entry for entry in body["path"])
    assert not any(entry.startswith(str(Path.cwd())) for entry in body["path"])
    _, body = await served.call(path, {"action": "import", "module": "json"})
    assert body["imported"] is True  # the standard library is there


async def test_stray_output_goes_to_the_log_not_into_the_protocol(served: Served) -> None:
    path = await served.deploy()
    status, body = await served.call(path, {"action": "print"})
    assert status == 200
    assert body["count"] == 1
    await served.host.remove("fn")  # waits for the last of its stderr
    lines = [line for name, line in served.lines if name == "fn"]
    assert "a stray print" in lines
    assert "a raw write on fd 1" in lines
    cut = [line for line in lines if line.startswith(("xxx", "yyy"))]
    assert cut == [c * lambda_host.MAX_LOG_LINE + " [cut]" for c in "yx"]
    assert "after the long ones" in lines


async def test_a_failing_cold_start_is_502_each_time(served: Served) -> None:
    path = await served.deploy("broken", make_zip({"index.py": "import not_a_module\n"}))
    for _ in range(2):
        status, body = await served.call(path)
        assert status == 502
        assert body["errorType"] == "Runtime.ImportModuleError"
        assert "not_a_module" in body["errorMessage"]
    path = await served.deploy("nohandler", handler="index.missing")
    status, body = await served.call(path)
    assert status == 502
    assert "missing" in body["errorMessage"]


async def test_a_slow_cold_start_is_bounded(served: Served) -> None:
    served.host._init_timeout = 0.5
    code = make_zip({"index.py": "import time\ntime.sleep(60)\ndef handler(e, c):\n    return 1\n"})
    path = await served.deploy("slow", code)
    status, body = await served.call(path)
    assert status == 502
    assert body["errorType"] == "Sandbox.Timedout"


async def test_an_unknown_function_is_404_in_biots_error_shape(served: Served) -> None:
    status, body = await served.call("/_lambda/nothing/", {})
    assert status == 404
    assert body["code"] == "FUNCTION_NOT_FOUND"
    assert set(body) == {"code", "message", "serviceName", "traceId", "environment", "details"}


@pytest.mark.parametrize(
    ("files", "links", "message"),
    [
        ({"../evil.py": "x"}, None, "unsafe path"),
        ({"/etc/evil.py": "x"}, None, "unsafe path"),
        ({"a/../../evil.py": "x"}, None, "unsafe path"),
        ({"C:/evil.py": "x"}, None, "unsafe path"),
        ({"index.py": INDEX}, {"passwd": "/etc/passwd"}, "symbolic link"),
        ({"index.py": INDEX}, {"up": "../../x"}, "symbolic link"),
    ],
)
async def test_unsafe_zips_are_refused(
    served: Served, files: dict[str, str], links: dict[str, str] | None, message: str
) -> None:
    with pytest.raises(InvalidPackage, match=message):
        await served.deploy("unsafe", make_zip(files, links))
    assert served.folders() == []
    assert not (served.temp.parent / "evil.py").exists()
    assert served.host.names() == []


async def test_bad_and_oversized_zips_are_refused(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(InvalidPackage, match="not a zip file"):
        await served.deploy("bad", b"not a zip at all")
    monkeypatch.setattr(lambda_host, "MAX_UNPACKED", 1000)
    with pytest.raises(InvalidPackage, match="larger than 250 MB"):
        await served.deploy("big", make_zip({"index.py": INDEX, "data.bin": b"\0" * 2000}))
    with pytest.raises(InvalidPackage, match="bad function name"):
        await served.deploy("../x")
    assert served.folders() == []


async def test_a_runtime_that_cannot_run_is_refused_at_deploy(served: Served) -> None:
    with pytest.raises(RuntimeUnavailable, match=r"runtime python3\.99 is not available"):
        await served.deploy(runtime="python3.99")
    assert served.folders() == []
    assert served.host.names() == []


def test_python_for_finds_interpreters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert python_for(RUNTIME) == sys.executable
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path))
    with pytest.raises(RuntimeUnavailable) as caught:
        python_for("python3.99")
    assert str(caught.value) == (
        "runtime python3.99 is not available on this machine: no python3.99 on PATH "
        "nor under ~/.pyenv/versions/3.99*/bin"
    )
    for release in ("3.99.1", "3.990.0"):
        binary = tmp_path / "versions" / release / "bin" / "python3.99"
        binary.parent.mkdir(parents=True)
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o755)
    assert python_for("python3.99") == str(tmp_path / "versions/3.99.1/bin/python3.99")
    for runtime in ("nodejs24.x", "java21", "python2.7.1", "python"):
        with pytest.raises(RuntimeUnavailable, match="Python runtimes only"):
            python_for(runtime)


async def test_a_redeploy_replaces_the_process_and_the_folder(served: Served) -> None:
    path = await served.deploy()
    _, first = await served.call(path)
    [old_folder] = served.folders()
    second = make_zip({"index.py": "def handler(event, context):\n    return {'version': 2}\n"})
    assert await served.deploy("fn", second) == path
    status, body = await served.call(path)
    assert (status, body) == (200, {"version": 2})
    assert not alive(first["pid"])
    assert not old_folder.exists()
    assert len(served.folders()) == 1


async def test_remove_and_close_leave_no_process_and_no_folder(served: Served) -> None:
    pids = []
    for name in ("one", "two", "three"):
        _, body = await served.call(await served.deploy(name))
        pids.append(body["pid"])
    assert len(served.folders()) == 3
    await served.host.remove("one")
    await served.host.remove("one")  # harmless
    assert not alive(pids[0])
    status, _ = await served.call("/_lambda/one/")
    assert status == 404
    assert len(served.folders()) == 2
    await served.host.close()
    await served.host.close()  # harmless
    assert not any(alive(pid) for pid in pids)
    assert served.folders() == []
    with pytest.raises(RuntimeError, match="closed"):
        await served.deploy("late")


async def test_the_packaged_worker_answers_a_signed_pre_event(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real thing: ``build_package`` (offline, from a wheelhouse of this venv) packs the
    worker and the fixture plugin; the zip runs in the host and answers BioT's PRE call."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(fixture_plugin.__file__, project / "lambda_plugin.py")
    monkeypatch.chdir(project)
    wheels = tmp_path / "wheels"
    # This venv's wheels are built for this machine's glibc, which runs the function here; the
    # packager's own platforms are those of Lambda's Amazon Linux (older for python3.11).
    wheel_tags = platform_tags(await asyncio.to_thread(build_wheelhouse, wheels))
    allowed = wheel_tags - {"any"} - set(platforms(sys.version_info.minor))
    options = ["--no-index", "--find-links", str(wheels)]
    options += [f"--platform={tag}" for tag in sorted(allowed)]
    package = await asyncio.to_thread(
        build_package,
        output=tmp_path / "plugin.zip",
        python_version=RUNTIME.removeprefix("python"),
        routes="lambda_plugin:build_routes",
        pip_options=options,
    )
    keys = default_keys()
    env = {
        "BIOT_PUBLIC_KEY": keys.public_b64,
        "BIOT_SERVICE_USER_ID": "service-user",
        "BIOT_SERVICE_USER_SECRET_KEY": "s3cr3t-service-key",
        "BIOT_APP_NAME": "lambda-test",
        "BIOT_SERVICE_ENVIRONMENT": "test",
    }
    path = await served.deploy("real", package.path.read_bytes(), env=env, timeout=10)
    token = keys.sign(scopes=["PLUGIN_INTERCEPTOR"])
    payload = interceptor_body(HookType.INTERCEPTOR_PRE, api_id=fixture_plugin.PATCH_PATIENT)
    headers = headers_for(HookType.INTERCEPTOR_PRE, token)
    status, body = await served.call(path, payload, headers=headers)
    assert status == 200, body
    assert body["request"]["body"]["_name"]["firstName"] == "Ada" + fixture_plugin.PRE_MARK
    status, body = await served.call(path, payload, headers=headers_for(HookType.INTERCEPTOR_PRE))
    assert status == 400
    assert body["code"] == "JWT_ERROR"
    await served.host.remove("real")  # the last of its log is in
    lines = [line for name, line in served.lines if name == "real"]
    assert any(TRACE_ID in line and '"level"' in line for line in lines)  # its JSON log
    assert not any(token in line or "s3cr3t-service-key" in line for line in lines)


async def test_a_redeploy_lets_the_event_in_flight_finish_on_the_old_code(served: Served) -> None:
    path = await served.deploy()
    started = served.seen("sleeping old")
    in_flight = asyncio.create_task(
        served.call(path, {"action": "sleep", "seconds": 0.5, "tag": "old"})
    )
    async with asyncio.timeout(30):
        await started.wait()
    second = make_zip({"index.py": "def handler(event, context):\n    return {'version': 2}\n"})
    await served.deploy("fn", second)
    status, body = await in_flight
    assert status == 200
    assert body["count"] == 1  # answered by the first deployment
    assert await served.call(path) == (200, {"version": 2})
    assert len(served.folders()) == 1


async def test_an_interrupted_invocation_discards_its_process(served: Served) -> None:
    path = await served.deploy()
    _, first = await served.call(path)
    function = served.host._functions["fn"]
    started = served.seen("sleeping cut")
    body = json.dumps({"action": "sleep", "seconds": 60, "tag": "cut"})
    call = asyncio.create_task(function.invoke({"body": body}))
    async with asyncio.timeout(30):
        await started.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert not alive(first["pid"])
    status, after = await served.call(path)
    assert status == 200
    assert after["count"] == 1  # a new process: the old one's late reply can answer nobody


async def test_a_failing_log_sink_does_not_block_the_function(served: Served) -> None:
    def broken(name: str, line: str) -> None:
        raise RuntimeError("sink down")

    served.host._log = broken
    path = await served.deploy()
    for _ in range(3):  # 3 x 300 KB of stderr: far more than a pipe holds
        status, _ = await served.call(path, {"action": "flood"})
        assert status == 200
