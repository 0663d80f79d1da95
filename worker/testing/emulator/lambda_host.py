"""Deployed plugins run the way BioT runs them: as a Lambda function behind a Function URL.

:meth:`LambdaHost.deploy` unpacks a plugin's zip (safely: no absolute paths, no ``..``, no link
leading outside, at most 250 MB unpacked as Lambda allows) into a fresh folder and starts the
function's process: ``<python> -I -S lambda_bootstrap.py <folder> <handler>``, with the Python of
the deployment's ``runtime`` (:func:`python_for`), the folder as its only code beside that
Python's standard library (nothing of the emulator's virtualenv) and only the environment given
plus what Lambda sets (``PATH``, ``LANG``, ``TZ=UTC``, ``LAMBDA_TASK_ROOT``, ``AWS_REGION``,
``AWS_LAMBDA_FUNCTION_NAME``, ``AWS_LAMBDA_FUNCTION_TIMEOUT``, ``AWS_EXECUTION_ENV``; and
``BIOT_BASE_URL``, the emulator's, unless the environment given has one). A redeploy replaces the
process and the folder; :meth:`LambdaHost.remove` and :meth:`LambdaHost.close` kill the processes
and delete the folders.

:meth:`LambdaHost.routes` serves each function at ``/_lambda/<name>/`` (any method, any path
below): the request becomes a Function URL event (payload format 2.0) handed to the function's
handler, one event at a time per function, and the handler's answer becomes the HTTP response
by the Function URL's rules (a dict with ``statusCode`` as given; anything else 200 with its
JSON). An unhandled error, a cold start that fails or a process that dies answers 502; a handler
still running after the function's ``timeout`` answers 504 and its process is killed (the next
event starts a new one, as Lambda discards a timed-out sandbox). The function's stderr (its log)
goes to ``log`` line by line, each line cut at 16 KiB.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path, PurePosixPath
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

import orjson
from aiohttp import web

from worker.testing.emulator.wire import dumps, error_body, json_response, loads
from worker.tracing import trace_from_headers

FunctionLog = Callable[[str, str], None]  # (function name, one line of its stderr)

PREFIX: Final = "/_lambda/"
MAX_UNPACKED: Final = 250 * 1024 * 1024  # Lambda's limit for a zip's unpacked content
MAX_RESPONSE: Final = 6 * 1024 * 1024  # Lambda's synchronous response payload limit
MAX_LOG_LINE: Final = 16 * 1024
_BOOTSTRAP: Final = Path(__file__).with_name("lambda_bootstrap.py")
_HEADER: Final = 4
_NAME: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_RUNTIME: Final = re.compile(r"^python(3)\.(\d{1,2})$")
_KILL_WAIT: Final = 5.0
_PATH: Final = "/usr/local/bin:/usr/bin:/bin"
# The server frames the answer itself: a function's own values for these would break it.
_HOP_BY_HOP: Final = frozenset({"content-length", "transfer-encoding", "connection"})
_log = logging.getLogger(__name__)


class RuntimeUnavailable(Exception):
    """The deployment's ``runtime`` cannot run here (one line for the user)."""


class InvalidPackage(ValueError):
    """The uploaded code is not a zip this host can unpack safely (one line for the user)."""


# ---------------------------------------------------------------- runtimes


def python_for(runtime: str) -> str:
    """An interpreter that runs ``runtime`` (``"python3.12"``): this one when it is that version,
    else ``python3.12`` on ``PATH`` (pyenv's shims excepted: they may not run that version) or
    under ``~/.pyenv/versions/3.12*/bin``; :class:`RuntimeUnavailable` otherwise."""
    match = _RUNTIME.match(runtime)
    if match is None:
        raise RuntimeUnavailable(
            f"runtime {runtime} is not available on this machine: "
            "the emulator runs Python runtimes only (python3.X)"
        )
    version = f"{match[1]}.{match[2]}"
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == version:
        return sys.executable
    found = next(_interpreters(version), None)
    if found is None:
        raise RuntimeUnavailable(
            f"runtime {runtime} is not available on this machine: no python{version} on PATH "
            f"nor under ~/.pyenv/versions/{version}*/bin"
        )
    return found


def _interpreters(version: str) -> Iterator[str]:
    on_path = shutil.which(f"python{version}")
    if on_path is not None and Path(on_path).parent.name != "shims":
        yield on_path
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    releases = sorted(root.glob(f"{version}*"), key=lambda p: p.name, reverse=True)
    for release in releases:
        if release.name == version or release.name.startswith((version + ".", version + "-")):
            candidate = release / "bin" / f"python{version}"
            if os.access(candidate, os.X_OK):
                yield str(candidate)


# ---------------------------------------------------------------- unpacking


def unpack(code: bytes, prefix: str) -> Path:
    """The zip's content in a new temporary folder (deleted again when it is refused)."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        _extract(code, directory)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return directory


def _extract(code: bytes, root: Path) -> None:
    try:
        archive = zipfile.ZipFile(BytesIO(code))
    except zipfile.BadZipFile as exc:
        raise InvalidPackage(f"the code is not a zip file: {exc}") from None
    budget = MAX_UNPACKED
    with archive:
        for info in archive.infolist():
            target = root / _safe_name(info)
            try:
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                else:
                    budget = _copy(archive, info, target, budget)
            except (OSError, zipfile.BadZipFile) as exc:
                raise InvalidPackage(f"cannot unpack {info.filename!r}: {exc}") from None


def _safe_name(info: zipfile.ZipInfo) -> PurePosixPath:
    """The entry's relative path; links are refused (a link can lead outside the folder)."""
    name = info.filename
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts or ":" in path.parts[0]:
        raise InvalidPackage(f"unsafe path in the zip: {name!r}")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise InvalidPackage(f"symbolic link in the zip: {name!r} (links are not supported)")
    return path


def _copy(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, budget: int) -> int:
    target.parent.mkdir(parents=True, exist_ok=True)
    with archive.open(info) as source, target.open("wb") as sink:
        while chunk := source.read(1 << 20):
            budget -= len(chunk)
            if budget < 0:
                raise InvalidPackage("the code is larger than 250 MB unpacked (Lambda's limit)")
            sink.write(chunk)
    mode = (info.external_attr >> 16) & 0o777
    if mode:
        target.chmod(mode | 0o600)
    return budget


# ---------------------------------------------------------------- one process


class _Failure(Exception):
    """An invocation that produced no result: answered ``status`` with Lambda's error object.
    ``discard``: the sandbox is gone or unusable (a handler's own error keeps it warm)."""

    def __init__(self, status: int, error_type: str, message: str, *, discard: bool = True):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.discard = discard

    def response(self) -> web.Response:
        body = {"errorType": self.error_type, "errorMessage": self.message}
        return json_response(body, self.status)


@dataclass(frozen=True, slots=True)
class _Spec:
    name: str
    python: str
    directory: Path
    handler: str
    env: dict[str, str]
    timeout: float
    init_timeout: float


class _Sandbox:
    """One process of a function: its protocol pipes and the task forwarding its stderr."""

    def __init__(self, process: asyncio.subprocess.Process, spec: _Spec, log: FunctionLog):
        self.process = process
        self._spec = spec
        self._ready = False
        assert process.stderr is not None
        self._forwarder = asyncio.create_task(_forward(process.stderr, spec.name, log))

    @classmethod
    async def spawn(cls, spec: _Spec, log: FunctionLog) -> _Sandbox:
        process = await asyncio.create_subprocess_exec(
            spec.python,
            "-I",
            "-S",
            str(_BOOTSTRAP),
            str(spec.directory),
            spec.handler,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=spec.env,
            cwd=spec.directory,
            start_new_session=True,  # its own process group: a kill takes its children too
        )
        return cls(process, spec, log)

    async def call(self, event: Any) -> Any:
        """The handler's result; :class:`_Failure` for an error, a timeout or a dead process."""
        if not self._ready:
            await self._cold_start()
        request = {"event": event, "requestId": str(uuid.uuid4())}
        request["remainingMs"] = int(self._spec.timeout * 1000)
        try:
            async with asyncio.timeout(self._spec.timeout):
                reply = await self._exchange(dumps(request))
        except TimeoutError:
            raise _Failure(
                504, "Sandbox.Timedout", f"Task timed out after {self._spec.timeout:.2f} seconds"
            ) from None
        if "error" in reply:
            error = reply["error"]
            error_type, message = str(error.get("errorType")), str(error.get("errorMessage"))
            raise _Failure(502, error_type, message, discard=False)
        return reply.get("result")

    async def _cold_start(self) -> None:
        try:
            async with asyncio.timeout(self._spec.init_timeout):
                reply = await self._read()
        except TimeoutError:
            message = f"the cold start took more than {self._spec.init_timeout:.2f} seconds"
            raise _Failure(502, "Sandbox.Timedout", message) from None
        if "initError" in reply:
            error = reply["initError"]
            raise _Failure(502, str(error.get("errorType")), str(error.get("errorMessage")))
        self._ready = True

    async def _exchange(self, message: bytes) -> Any:
        stdin = self.process.stdin
        assert stdin is not None
        try:
            stdin.write(len(message).to_bytes(_HEADER, "big") + message)
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            raise await self._died() from None
        return await self._read()

    async def _read(self) -> Any:
        stdout = self.process.stdout
        assert stdout is not None
        try:
            size = int.from_bytes(await stdout.readexactly(_HEADER), "big")
            if size > MAX_RESPONSE:
                message = f"the response is larger than {MAX_RESPONSE} bytes (Lambda's limit)"
                raise _Failure(502, "Function.ResponseSizeTooLarge", message)
            reply = loads(await stdout.readexactly(size))
        except asyncio.IncompleteReadError:
            raise await self._died() from None
        except orjson.JSONDecodeError:
            raise _Failure(
                502, "Runtime.InvalidResponse", "the runtime's reply is not JSON"
            ) from None
        if not isinstance(reply, dict):
            raise _Failure(502, "Runtime.InvalidResponse", "the runtime's reply is not an object")
        return reply

    async def _died(self) -> _Failure:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_KILL_WAIT):
                await self.process.wait()
        status = self.process.returncode
        return _Failure(502, "Runtime.ExitError", f"the function's process exited ({status})")

    async def kill(self) -> None:
        """Kill the process (and its group), reap it and finish forwarding its log; bounded."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_KILL_WAIT):
                await self.process.wait()
                await asyncio.wait({self._forwarder})
        self._forwarder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._forwarder


async def _forward(stream: asyncio.StreamReader, name: str, log: FunctionLog) -> None:
    """Each line of ``stream`` to ``log`` (cut at :data:`MAX_LOG_LINE`), until end of file."""
    emit = _emitter(log, name)
    pending = b""
    skipping = False  # inside a line already cut: drop the rest of it
    while chunk := await stream.read(1 << 16):
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if not skipping:
                emit(line)
            skipping = False
        if skipping:
            pending = b""
        elif len(pending) > MAX_LOG_LINE:
            emit(pending)
            pending, skipping = b"", True
    if pending and not skipping:
        emit(pending)


def _emitter(log: FunctionLog, name: str) -> Callable[[bytes], None]:
    """``log`` for one process; a failing sink is reported once and reading goes on (a pipe
    nobody reads would block the function)."""
    failed = False

    def emit(line: bytes) -> None:
        nonlocal failed
        try:
            log(name, _text(line))
        except Exception:
            if not failed:
                _log.exception("the log of function %s failed", name)
            failed = True

    return emit


def _text(line: bytes) -> str:
    text = line[:MAX_LOG_LINE].decode("utf-8", "replace").rstrip("\r")
    return text + " [cut]" if len(line) > MAX_LOG_LINE else text


def _default_log(name: str, line: str) -> None:
    """A function's line on the emulator's stderr, where a developer running ``biot-worker
    emulator`` sees it (as CloudWatch would show it), prefixed with the function's name."""
    sys.stderr.write(f"[lambda {name}] {line}\n")


class _Function:
    """A deployed function: its sandbox (started at deploy, again after a failure) and the lock
    that hands it one event at a time."""

    def __init__(self, spec: _Spec, log: FunctionLog) -> None:
        self.spec = spec
        self._log = log
        self._lock = asyncio.Lock()
        self._sandbox: _Sandbox | None = None
        self._removed = False

    async def start(self) -> None:
        self._sandbox = await _Sandbox.spawn(self.spec, self._log)

    async def invoke(self, event: Any) -> Any:
        async with self._lock:
            if self._removed:
                raise _Failure(502, "Function.Removed", f"{self.spec.name} was removed")
            if self._sandbox is None:
                try:
                    await self.start()
                except OSError as exc:
                    raise _Failure(502, "Runtime.StartError", f"cannot start: {exc}") from None
            assert self._sandbox is not None
            try:
                return await self._sandbox.call(event)
            except _Failure as failure:
                if failure.discard:
                    await self._discard(failure.message)
                raise
            except BaseException:
                await self._discard("interrupted")  # its late reply must never answer another
                raise

    async def _discard(self, reason: str) -> None:
        """A sandbox that timed out, died, failed its cold start or was interrupted is killed;
        the next event starts a new one."""
        _log.warning("%s: %s; its process is discarded", self.spec.name, reason)
        sandbox, self._sandbox = self._sandbox, None
        if sandbox is not None:
            await sandbox.kill()

    async def retire(self) -> None:
        """:meth:`remove` once the events already waiting for this function are answered."""
        async with self._lock:
            await self.remove()

    async def remove(self) -> None:
        """Kill the process and delete the folder (an event in flight answers 502)."""
        self._removed = True
        sandbox, self._sandbox = self._sandbox, None
        try:
            if sandbox is not None:
                await sandbox.kill()
        finally:
            await asyncio.to_thread(shutil.rmtree, self.spec.directory, True)


# ---------------------------------------------------------------- the host


class LambdaHost:
    """The functions deployed on the emulator, by name, and the HTTP routes that invoke them.

    ``base_url`` is the emulator's URL (a callable when it is known only once it serves); ``log``
    receives each line a function writes on stderr. An async context manager; closing twice is
    harmless.
    """

    def __init__(
        self,
        *,
        base_url: Callable[[], str] | str,
        log: FunctionLog | None = None,
        init_timeout: float = 10.0,
        environment: str = "emulator",
    ) -> None:
        self._base_url = base_url
        self._log = log or _default_log
        self._init_timeout = init_timeout
        self._environment = environment
        self._functions: dict[str, _Function] = {}
        self._closed = False

    async def __aenter__(self) -> LambdaHost:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def base_url(self) -> str:
        return self._base_url() if callable(self._base_url) else self._base_url

    def names(self) -> list[str]:
        return sorted(self._functions)

    async def deploy(
        self,
        name: str,
        code: bytes,
        *,
        runtime: str,
        handler: str = "index.handler",
        env: Mapping[str, str],
        timeout: float,  # noqa: ASYNC109 - the function's Lambda timeout, not this call's
    ) -> str:
        """Unpack ``code``, start its process (replacing a previous deployment of ``name``) and
        return its path here. :class:`RuntimeUnavailable` or :class:`InvalidPackage` when it
        cannot run; nothing of the previous deployment changes then."""
        if self._closed:
            raise RuntimeError("the Lambda host is closed")
        if not _NAME.match(name):
            raise InvalidPackage(f"bad function name {name!r}: want 1-64 of [A-Za-z0-9_-]")
        if not timeout > 0:
            raise InvalidPackage(f"bad timeout {timeout!r}: want seconds > 0")
        python = await asyncio.to_thread(python_for, runtime)
        directory = await asyncio.to_thread(unpack, code, f"biot-lambda-{name}-")
        environ = self._env(name, runtime, env, timeout, directory)
        spec = _Spec(name, python, directory, handler, environ, timeout, self._init_timeout)
        function = _Function(spec, self._log)
        try:
            await function.start()
            if self._closed:
                raise RuntimeError("the Lambda host was closed during the deployment")
        except BaseException:
            await function.remove()
            raise
        previous, self._functions[name] = self._functions.get(name), function
        if previous is not None:
            await previous.retire()
        return f"{PREFIX}{name}/"

    def _env(
        self, name: str, runtime: str, env: Mapping[str, str], timeout: float, directory: Path
    ) -> dict[str, str]:
        """What the function's process sees: the environment given over a few defaults, under
        the variables Lambda reserves."""
        defaults = {"PATH": _PATH, "LANG": "C.UTF-8", "TZ": "UTC", "BIOT_BASE_URL": self.base_url()}
        reserved = {
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EXECUTION_ENV": f"AWS_Lambda_{runtime}",
            "AWS_LAMBDA_FUNCTION_NAME": name,
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_FUNCTION_TIMEOUT": f"{timeout:g}",
            "LAMBDA_TASK_ROOT": str(directory),
        }
        return {**defaults, **{str(k): str(v) for k, v in env.items()}, **reserved}

    async def remove(self, name: str) -> None:
        """Kill ``name``'s process and delete its folder; an unknown name is ignored."""
        function = self._functions.pop(name, None)
        if function is not None:
            await function.remove()

    async def close(self) -> None:
        """Remove every function; closing twice is harmless."""
        self._closed = True
        functions, self._functions = list(self._functions.values()), {}
        for function in functions:
            await function.remove()

    # ------------------------------------------------------------ HTTP

    def routes(self) -> list[web.RouteDef]:
        return [
            web.route("*", PREFIX + "{name}", self._handle),
            web.route("*", PREFIX + "{name}/{tail:.*}", self._handle),
        ]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        function = self._functions.get(name)
        if function is None:
            return self._not_found(request, name)
        event = await function_url_event(request, "/" + request.match_info.get("tail", ""), self)
        try:
            result = await function.invoke(event)
        except _Failure as failure:
            return failure.response()
        return function_url_response(result)

    def _not_found(self, request: web.Request, name: str) -> web.Response:
        trace = trace_from_headers({k.lower(): v for k, v in request.headers.items()})
        body = error_body(
            "FUNCTION_NOT_FOUND",
            f"no function {name!r} is deployed on this emulator",
            path=request.path,
            trace_id=trace.trace_id,
            environment=self._environment,
        )
        return json_response(body, 404)


# ---------------------------------------------------------------- Function URL wire


async def function_url_event(request: web.Request, path: str, host: LambdaHost) -> dict[str, Any]:
    """The request as a Lambda Function URL event (payload format version 2.0)."""
    headers: dict[str, str] = {}
    for key, value in request.headers.items():
        key = key.lower()
        headers[key] = f"{headers[key]},{value}" if key in headers else value
    cookies = headers.pop("cookie", "")
    domain = urlsplit(host.base_url()).netloc or request.host
    now = time.time()
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": request.query_string,
        "headers": headers,
        "requestContext": {
            "accountId": "anonymous",
            "apiId": request.match_info["name"],
            "domainName": domain,
            "domainPrefix": domain.split(".", 1)[0],
            "http": {
                "method": request.method,
                "path": path,
                "protocol": f"HTTP/{request.version.major}.{request.version.minor}",
                "sourceIp": request.remote or "127.0.0.1",
                "userAgent": headers.get("user-agent", ""),
            },
            "requestId": str(uuid.uuid4()),
            "routeKey": "$default",
            "stage": "$default",
            "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
            "timeEpoch": int(now * 1000),
        },
        "isBase64Encoded": False,
    }
    if cookies:
        event["cookies"] = [c.strip() for c in cookies.split(";") if c.strip()]
    if request.query_string:
        event["queryStringParameters"] = _query(request.query_string)
    body = await request.read()
    if body:
        _set_body(event, body)
    return event


def _query(raw: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for key, value in parse_qsl(raw, keep_blank_values=True):
        values[key] = f"{values[key]},{value}" if key in values else value
    return values


def _set_body(event: dict[str, Any], body: bytes) -> None:
    try:
        event["body"] = body.decode("utf-8")
    except UnicodeDecodeError:
        event["body"] = base64.b64encode(body).decode()
        event["isBase64Encoded"] = True


def function_url_response(result: Any) -> web.Response:
    """A handler's result by the Function URL's rules: a dict with ``statusCode`` gives the
    status, ``headers``, ``cookies`` and ``body`` (base64 when ``isBase64Encoded``); any other
    result answers 200 with its JSON (a string as it is)."""
    if not (isinstance(result, dict) and "statusCode" in result):
        body = result if isinstance(result, str) else dumps(result)
        return web.Response(status=200, body=body, content_type="application/json")
    status = result["statusCode"]
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        return _Failure(502, "Runtime.InvalidResponse", f"bad statusCode {status!r}").response()
    response = web.Response(status=status, body=_body_of(result))
    headers = result.get("headers")
    for key, value in headers.items() if isinstance(headers, dict) else ():
        if str(key).lower() not in _HOP_BY_HOP:
            response.headers[str(key)] = str(value)
    for cookie in result.get("cookies") or ():
        response.headers.add("Set-Cookie", str(cookie))
    return response


def _body_of(result: dict[str, Any]) -> bytes:
    body = result.get("body")
    if body is None:
        return b""
    if not isinstance(body, str):
        return dumps(body)
    if result.get("isBase64Encoded"):
        return base64.b64decode(body)
    return body.encode()
