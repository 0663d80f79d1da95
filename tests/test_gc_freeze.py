"""The process's own worker moves its startup objects out of the cyclic collector's sight once
it listens (``gc.freeze``), so a full collection does not walk them while events wait; a worker
started in-process (a test's) leaves the collector alone."""

from __future__ import annotations

import subprocess
import sys

import pytest

_SCRIPT = """
import asyncio, gc, sys
from config.settings import load_settings
from worker.routing import Router
from worker.runner import run_http

async def main() -> None:
    stop, seen = asyncio.Event(), []

    def started(app, url):
        seen.append(gc.get_freeze_count())
        stop.set()

    settings = load_settings({
        "WORKER_HOST": "127.0.0.1", "WORKER_PORT": "0", "BIOT_BASE_URL": "http://127.0.0.1:9",
        "BIOT_SERVICE_USER_ID": "u", "BIOT_SERVICE_USER_SECRET_KEY": "s",
    })
    await run_http(settings, Router(), stop=stop, started=started, stream=sys.stderr,
                   freeze_gc=sys.argv[1] == "freeze")
    print(seen[0])

asyncio.run(main())
"""


@pytest.mark.parametrize(("mode", "frozen"), [("freeze", True), ("leave", False)])
def test_the_process_worker_freezes_what_it_started_with(mode: str, frozen: bool) -> None:
    done = subprocess.run(  # noqa: S603 - our own interpreter running our script
        [sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    count = int(done.stdout.strip())
    assert (count > 10_000) if frozen else (count == 0), count
