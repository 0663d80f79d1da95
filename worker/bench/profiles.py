"""Where the microseconds of one event go: a cProfile dump grouped by component, per event.

Each function's own time (``tottime``) is put in one component by its file (or, for built-ins,
by its name), and divided by the events served in the profiled window. Time blocked in
``epoll`` waiting for work is idle, not cost, and is left out. cProfile slows Python code
(roughly 1.5-2x here), so read the shares, and scale the totals to the unprofiled CPU per event.
"""

from __future__ import annotations

import pstats
from typing import Any, Final

IDLE: Final = "idle (epoll wait)"
# (component, substrings of the file path), first match wins.
_BY_PATH: Final[tuple[tuple[str, tuple[str, ...]], ...]] = (
    ("worker: JWT check (auth)", ("/worker/auth.py",)),
    ("worker: metrics", ("/worker/metrics.py", "/prometheus_client/")),
    ("OpenTelemetry", ("/worker/otel.py", "/opentelemetry/", "/google/protobuf/")),
    ("worker: log", ("/worker/log", "/logging/")),
    ("worker: BioT client", ("/worker/client.py", "/worker/tokens.py", "/worker/tracing.py")),
    ("worker: dispatch, events, responses", ("/worker/",)),
    ("aiohttp server (HTTP in)", ("/aiohttp/web", "/aiohttp/http_", "/aiohttp/_http",
                                  "/aiohttp/base_protocol")),
    ("aiohttp client (HTTP out)", ("/aiohttp/client", "/aiohttp/connector", "/aiohttp/tracing")),
    ("aiohttp other, yarl, multidict", ("/aiohttp/", "/yarl/", "/multidict/", "/propcache/")),
    ("JWT / crypto (PyJWT)", ("/jwt/", "/cryptography/")),
    ("asyncio event loop", ("/asyncio/", "/selectors.py", "/contextvars")),
    ("ssl", ("/ssl.py",)),
)  # fmt: skip
_BUILTINS: Final[tuple[tuple[str, tuple[str, ...]], ...]] = (
    (IDLE, ("epoll",)),
    ("JSON (orjson)", ("orjson",)),
    ("ssl", ("_ssl", "SSLObject", "SSLSocket")),
    ("socket syscalls", ("socket", "'send'", "'recv'", "sendto", "recv_into")),
    ("JWT / crypto (PyJWT)", ("cryptography", "RSA", "binascii", "base64")),
)


def component(filename: str, function: str) -> str:
    """The component a profiled function's own time belongs to."""
    if filename == "~":
        for name, needles in _BUILTINS:
            if any(needle in function for needle in needles):
                return name
        return "built-ins (other)"
    for name, needles in _BY_PATH:
        if any(needle in filename for needle in needles):
            return name
    return "other Python"


def summarize_profile(path: str, events: int, top: int = 15) -> dict[str, Any]:
    """Per-event microseconds by component and the ``top`` functions by own time."""
    stats: dict[tuple[str, int, str], tuple[int, int, float, float, Any]]
    stats = pstats.Stats(path).stats  # type: ignore[attr-defined]
    events = max(events, 1)
    totals: dict[str, float] = {}
    rows = []
    for (filename, line, function), (_, calls, own, cumulative, _) in stats.items():
        name = component(filename, function)
        totals[name] = totals.get(name, 0.0) + own
        if name != IDLE:
            where = function if filename == "~" else f"{_short(filename)}:{line}({function})"
            rows.append((own, cumulative, calls, where, name))
    busy = sum(seconds for name, seconds in totals.items() if name != IDLE)
    components = [
        {"component": name, "us_per_event": seconds / events * 1e6, "share": seconds / busy}
        for name, seconds in sorted(totals.items(), key=lambda item: -item[1])
        if name != IDLE and busy > 0
    ]
    rows.sort(reverse=True)
    return {
        "events": events,
        "profiled_us_per_event": busy / events * 1e6,
        "idle_us_per_event": totals.get(IDLE, 0.0) / events * 1e6,
        "components": components,
        "top": [
            {
                "function": where,
                "component": name,
                "own_us_per_event": own / events * 1e6,
                "cumulative_us_per_event": cum / events * 1e6,
                "calls_per_event": calls / events,
            }
            for own, cum, calls, where, name in rows[:top]
        ],
    }


def _short(filename: str) -> str:
    for marker in ("/site-packages/", "/lib/python3", "/work/main/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename
