"""The HTTP adapter's own protocol answers on the wire as aiohttp's web server did.

:func:`worker.adapters.http.encode_head` is checked against aiohttp's response machinery (the
adapter's fallback for shapes it does not write itself) on the same request and response; the
raw exchanges below are what aiohttp's server answered before the adapter had its own protocol
(status lines, headers and their order, keep-alive, ``Expect``, probes, 404/405, pipelining,
an unread body after a refusal, upgrades).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import helpers, web, web_response
from aiohttp.http import SERVER_SOFTWARE, HttpVersion, HttpVersion10, HttpVersion11
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from worker.adapters import http as http_adapter
from worker.adapters.health import CheckResult, Health
from worker.adapters.http import HttpAdapter, _Answer, _Connection, app_runner, encode_head
from worker.logs import CapturingLog
from worker.responses import Response
from worker.routing import Router
from worker.testing.kit import kit_settings, make_dispatcher

DATE = "Mon, 30 Nov 2026 08:00:00 GMT"


class _Ready:
    name = "serviceToken"

    async def probe(self) -> CheckResult:
        return CheckResult({})


async def _plugin(view: Any, ctx: Any) -> Any:
    body = view.body if isinstance(view.body, dict) else {}
    if "size" in body:
        return {"size": len(body["size"])}
    if "status" in body:
        payload = orjson.dumps(body["body"]) if "body" in body else b""
        return Response(body["status"], payload, body.get("headers", {}))
    return {"ok": True}


@pytest.fixture
async def port() -> AsyncIterator[int]:
    async with _serving(max_body_bytes=1000) as served:
        yield served


@contextlib.asynccontextmanager
async def _serving(*, max_body_bytes: int) -> AsyncIterator[int]:
    log = CapturingLog()
    dispatcher = make_dispatcher(Router().nonspecific(_plugin), log=log, settings=kit_settings())
    adapter = HttpAdapter(
        dispatcher,
        max_in_flight=16,
        max_body_bytes=max_body_bytes,
        health=Health([_Ready()], errors=dispatcher.error_context),
        log=log,
        body_timeout=0.5,
    )
    runner = app_runner(adapter, grace=1.0, keepalive_timeout=5.0, header_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def _exchange(port: int, request: bytes, expected: str) -> str:
    """Send ``request`` and read until the answer (``Date`` and trace ids masked, then
    ``<closed>`` if the server closed) is ``expected``, the server closes, or 5 s pass."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = ""
    data = b""
    try:
        writer.write(request)
        async with asyncio.timeout(5):
            while answer != expected and not answer.endswith("<closed>"):
                chunk = await reader.read(65536)
                data += chunk if chunk else b"<closed>"
                answer = _masked(data)
    except TimeoutError:
        pass
    finally:
        writer.close()
    return answer


def _masked(answer: bytes) -> str:
    text = re.sub(r"Date: [^\r]*", "Date: <date>", answer.decode("latin-1"))
    text = re.sub(r'"traceId":"[0-9a-f]{32}"', '"traceId":"<id>"', text)
    return re.sub(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", "<tp>", text)


def _post(body: bytes = b"{}", *, version: bytes = b"1.1", extra: bytes = b"") -> bytes:
    return (
        b"POST / HTTP/" + version + b"\r\nHost: x\r\n" + extra
        + b"Content-Length: %d\r\n\r\n" % len(body) + body
    )  # fmt: skip


OK_HEAD = (
    "content-type: application/json\r\ntraceparent: <tp>\r\nContent-Length: 11\r\n"
    "Date: <date>\r\nServer: " + SERVER_SOFTWARE + "\r\n"
)
OK = "HTTP/1.1 200 OK\r\n" + OK_HEAD + '\r\n{"ok":true}'
SERVER = "Date: <date>\r\nServer: " + SERVER_SOFTWARE + "\r\n"
# The refusal's body is read and dropped after it: the next request on the connection answers.
TOO_LARGE = (
    "HTTP/1.1 413 Request Entity Too Large\r\n" + OK_HEAD.replace("Length: 11", "Length: 190")
    + '\r\n{"code":"PAYLOAD_TOO_LARGE","message":"1500 bytes exceeds the limit of 1000 bytes",'
    '"serviceName":"test-plugin","traceId":"<id>","environment":"test","details":{}}'
)  # fmt: skip


def _text(status: str, text: str, allow: str | None = None, body: bool = True) -> str:
    allowed = f"Allow: {allow}\r\n" if allow else ""
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n{allowed}"
        f"Content-Length: {len(text)}\r\n{SERVER}\r\n{text if body else ''}"
    )


EXCHANGES = [
    pytest.param([_post()], OK, id="keep-alive"),
    pytest.param([_post(extra=b"Connection: close\r\n")],
                 OK.replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n") + "<closed>", id="close"),
    pytest.param([_post(version=b"1.0")], OK.replace("HTTP/1.1", "HTTP/1.0") + "<closed>",
                 id="http-1.0"),
    pytest.param([_post(version=b"1.0", extra=b"Connection: keep-alive\r\n")],
                 OK.replace("HTTP/1.1", "HTTP/1.0").replace("\r\n\r\n",
                                                            "\r\nConnection: keep-alive\r\n\r\n"),
                 id="http-1.0-keep-alive"),
    pytest.param([_post() + _post()], OK + OK, id="pipelined"),
    pytest.param([b"GET /foo HTTP/1.1\r\nHost: x\r\n\r\n"],
                 _text("405 Method Not Allowed", "405: Method Not Allowed", "POST"),
                 id="get-event"),
    pytest.param([b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"],
                 _text("405 Method Not Allowed", "405: Method Not Allowed", "POST", body=False),
                 id="head-event"),
    pytest.param([b"PUT /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"],
                 _text("405 Method Not Allowed", "405: Method Not Allowed", "GET,HEAD,POST"),
                 id="put-probe"),
    pytest.param([b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n"],
                 _text("404 Not Found", "404: Not Found"), id="not-a-path"),
    pytest.param([b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n"],
                 "HTTP/1.1 200 OK\r\n" + OK_HEAD.replace("Length: 11", "Length: 28") + "\r\n",
                 id="head-probe"),
    pytest.param([b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"],
                 _text("404 Not Found", "metrics are off (WORKER_METRICS=false)\n"),
                 id="metrics-off"),
    pytest.param([b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Length: 2\r\n\r\n", b"{}"],
                 "HTTP/1.1 100 Continue\r\n\r\n" + OK, id="expect-continue"),
    pytest.param([b"POST / HTTP/1.1\r\nHost: x\r\nExpect: x\r\nContent-Length: 2\r\n\r\n{}"],
                 _text("417 Expectation Failed", "Unknown Expect: x"), id="expect-other"),
    pytest.param([_post(b"x" * 1500) + _post()], TOO_LARGE + OK, id="413-then-next"),
    pytest.param([_post(extra=b"Connection: Upgrade\r\nUpgrade: websocket\r\n") + _post()],
                 OK + OK, id="upgrade-declined"),
    pytest.param([_post(b'{"status": 201, "body": 1, "headers": {"x-a": "b"}}')],
                 f"HTTP/1.1 201 Created\r\nx-a: b\r\nContent-Length: 1\r\n"
                 f"Content-Type: application/octet-stream\r\n{SERVER}\r\n1", id="plugin-created"),
    pytest.param([_post(b'{"status": 204, "body": 1}')],
                 f"HTTP/1.1 204 No Content\r\n{SERVER}\r\n", id="plugin-no-content"),
    pytest.param([_post(b'{"status": 200, "body": 1, "headers": {"Server": "me"}}')],
                 "HTTP/1.1 200 OK\r\nServer: me\r\nContent-Length: 1\r\nContent-Type: "
                 "application/octet-stream\r\nDate: <date>\r\n\r\n1", id="plugin-server"),
    pytest.param([_post(b'{"status": 200, "body": 1, "headers": {"x-a": "1\\r\\nx-b: 2"}}')],
                 "<closed>", id="plugin-header-injection"),
]  # fmt: skip


@pytest.mark.parametrize(("chunks", "expected"), EXCHANGES)
async def test_the_wire_is_aiohttps(port: int, chunks: list[bytes], expected: str) -> None:
    assert await _exchange(port, b"".join(chunks), expected) == expected


async def test_a_body_larger_than_the_read_buffer_pauses_reading_and_is_read_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past the body reader's high-water mark the parser and the socket pause; reading the
    body resumes them, and the next request on the connection is answered."""
    pauses: list[None] = []
    pause = _Connection.pause_reading

    def counted(connection: _Connection) -> None:
        pauses.append(None)
        pause(connection)

    monkeypatch.setattr(_Connection, "pause_reading", counted)
    body = orjson.dumps({"size": "x" * 700_000})
    async with _serving(max_body_bytes=2_000_000) as served:
        expected = "HTTP/1.1 200 OK\r\n" + OK_HEAD.replace("Length: 11", "Length: 15")
        expected += '\r\n{"size":700000}' + OK
        assert await _exchange(served, _post(body) + _post(), expected) == expected
    assert pauses


# ---------------------------------------------------------------- encode_head vs aiohttp


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.data = b""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.data += bytes(data)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def _request(method: str, version: HttpVersion, should_close: bool) -> RawRequestMessage:
    headers = CIMultiDictProxy(CIMultiDict({"Host": "x"}))
    return RawRequestMessage(method, "/", version, headers, (), should_close, None, False, False,
                             URL("/"))  # fmt: skip


RESPONSES = [
    Response(200, b'{"a":1}', {"content-type": "application/json", "traceparent": "00-x"}),
    Response(200, b"", {"traceparent": "00-x"}),
    Response(413, b"{}", {"content-type": "application/json", "retry-after": "1"}),
    Response(405, b"405: Method Not Allowed", {"Content-Type": "text/plain", "Allow": "POST"}),
    Response(200, b"body without a type", {}),
    Response(503, b"x", {"Content-Type": "a", "content-type": "b"}),
    Response(200, b"x", {"x-tab": "a\tb", "x-text": "caf\u00e9 \u2028 \u00a0"}),
]


@pytest.mark.parametrize("response", RESPONSES)
@pytest.mark.parametrize("method", ["POST", "GET", "HEAD"])
@pytest.mark.parametrize("version", [HttpVersion10, HttpVersion11])
@pytest.mark.parametrize(("should_close", "close"), [(False, False), (True, False), (False, True)])
async def test_encode_head_writes_what_aiohttp_writes(
    monkeypatch: pytest.MonkeyPatch,
    response: Response,
    method: str,
    version: HttpVersion,
    should_close: bool,
    close: bool,
) -> None:
    for module in (helpers, web_response, http_adapter):
        monkeypatch.setattr(module, "rfc822_formatted_time", lambda: DATE)
    request = _request(method, version, should_close)
    ours = encode_head(request, response, not (should_close or close))
    assert ours is not None
    expected, keep_alive = await _aiohttp_writes(request, response, close)
    assert ours + (b"" if method == "HEAD" else response.body) == expected
    assert keep_alive == (not (should_close or close))


@pytest.mark.parametrize(
    "response",
    [
        Response(204, b"", {}),
        Response(299, b"", {}),
        Response(200, b"1", {"Content-Length": "1"}),
        Response(200, b"1", {"Connection": "close"}),
        Response(200, b"1", {"x": "a\r\nb"}),
        Response(200, b"1", {"x": "a\x00b"}),
    ],
)
def test_encode_head_leaves_other_shapes_to_aiohttp(response: Response) -> None:
    assert encode_head(_request("POST", HttpVersion11, False), response, True) is None


async def _aiohttp_writes(
    request: RawRequestMessage, response: Response, close: bool
) -> tuple[bytes, bool]:
    """What aiohttp's ``web.Response`` writes for ``response`` to ``request``."""
    loop = asyncio.get_running_loop()
    server: Any = type("S", (), {"adapter": None, "open": None, "keepalive_timeout": 0.0,
                                  "lingering_time": 0.0})()  # fmt: skip
    connection = _Connection(server, loop)
    transport = _Transport()
    connection.transport = transport
    write: Callable[..., Awaitable[bool]] = connection._write_with_aiohttp
    keep_alive = await write(request, EMPTY_PAYLOAD, _Answer(response, close))
    return transport.data, keep_alive
