"""``biot-worker run`` against hostile clients, as a real process on loopback (issue 9 point 5).

Each attack runs while genuine signed events are sent; each test asserts those events answered
200 during the attack, the attackers closed (or answered 408) within the configured timeouts,
the log held to a few lines a second, and the worker's descriptors and RSS back near where they
started. The timeouts are short here (1 s for headers and bodies) so that a test takes seconds.
Set ``HOSTILE_REPORT=path`` to collect each attack's figures as JSON lines (the README's table).
"""

from __future__ import annotations

import resource
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from tests.hostile_clients import (
    Attack,
    Genuine,
    eventually,
    logged,
    open_fds,
    port_of,
    report,
    rss_kib,
    running_worker,
)
from tests.test_worker_process import WorkerProcess
from worker.adapters.http import ACCEPT_BURST, FD_RESERVE
from worker.testing.emulator import Emulator, EmulatorConfig, EmulatorServer

SHORT = {"WORKER_HEADER_TIMEOUT": "1", "WORKER_BODY_TIMEOUT": "1"}
SLOW_BODY = (
    b"POST / HTTP/1.1\r\nHost: x\r\nhooktype: INTERCEPTOR_PRE\r\n"
    b'Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{"metadata": '
)
PAUSED = "not accepting connections: out of file descriptors"
SLOW_HEADERS = b"POST / HTTP/1.1\r\nHost: x\r\nhooktype: INTER"
FD_SLACK = 8  # descriptors the worker may hold after an attack beyond its start (pool, log)
RSS_SLACK_KIB = 16 * 1024  # a generous bound: the allocator keeps some arenas


@pytest.fixture(autouse=True)
def enough_descriptors() -> Iterator[None]:
    """This process holds thousands of sockets: its soft descriptor limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
async def emulator() -> AsyncIterator[tuple[Emulator, str]]:
    emu = Emulator(EmulatorConfig())
    async with EmulatorServer(emu) as server:
        yield emu, server.url


async def _baseline(emu: Emulator, worker: WorkerProcess) -> tuple[Genuine, int, int]:
    """Warm the worker up, then time genuine events without an attack; its fds and RSS."""
    quiet = Genuine(emu, worker.url)
    async with aiohttp.ClientSession() as http:
        await quiet.send(http, 20)
        quiet.latencies.clear()
        await quiet.send(http, 50)
    assert quiet.statuses == [200] * 70
    pid = worker.process.pid
    return quiet, open_fds(pid), rss_kib(pid)


async def _recovered(worker: WorkerProcess, fds: int, rss: int) -> tuple[int, int]:
    """Wait (bounded) for the worker's descriptors to come back near ``fds``; fds and RSS."""
    pid = worker.process.pid
    await eventually(lambda: open_fds(pid) <= fds + FD_SLACK, "the worker's fds to return", 10)
    after_fds, after_rss = open_fds(pid), rss_kib(pid)
    assert after_rss - rss < RSS_SLACK_KIB, (rss, after_rss)
    return after_fds, after_rss


async def test_300_slow_bodies_get_408_and_genuine_events_pass(
    emulator: tuple[Emulator, str],
) -> None:
    emu, url = emulator
    async with running_worker(emu, url, {"WORKER_KEEPALIVE_TIMEOUT": "30", **SHORT}) as worker:
        quiet, fds, rss = await _baseline(emu, worker)
        attack, during = Attack(port_of(worker)), Genuine(emu, worker.url)
        try:
            started = time.monotonic()
            await attack.open(300, SLOW_BODY)
            async with aiohttp.ClientSession() as http:
                await during.send(http, 50)
            peak_fds, peak_rss = open_fds(worker.process.pid), rss_kib(worker.process.pid)
            answers = await attack.until_closed(limit=6)
            closed_after = time.monotonic() - started
        finally:
            await attack.close()
        assert during.statuses == [200] * 50
        assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in answers)
        assert all(b'"REQUEST_TIMEOUT"' in answer for answer in answers)
        after_fds, after_rss = await _recovered(worker, fds, rss)
    report("300 slow bodies", quiet=quiet.percentiles(), during=during.percentiles(),
           closed_within_s=round(closed_after, 2), fds=[fds, peak_fds, after_fds],
           rss_kib=[rss, peak_rss, after_rss])  # fmt: skip


async def test_1000_slowloris_closed_by_the_header_timeout(
    emulator: tuple[Emulator, str],
) -> None:
    emu, url = emulator
    env = {"WORKER_KEEPALIVE_TIMEOUT": "30", "WORKER_MAX_CONNECTIONS": "2000", **SHORT}
    async with running_worker(emu, url, env) as worker:
        quiet, fds, rss = await _baseline(emu, worker)
        attack, during = Attack(port_of(worker)), Genuine(emu, worker.url)
        try:
            started = time.monotonic()
            await attack.open(1000, SLOW_HEADERS)
            async with aiohttp.ClientSession() as http:
                await during.send(http, 50)
            await attack.send_all(b"TYPE: x\r\nx-trickle: 1\r\n")  # more, never the end
            peak_fds, peak_rss = open_fds(worker.process.pid), rss_kib(worker.process.pid)
            answers = await attack.until_closed(limit=8)  # keep-alive (30 s) is not what acts
            closed_after = time.monotonic() - started
        finally:
            await attack.close()
        assert during.statuses == [200] * 50
        assert answers == [b""] * 1000  # closed without an answer
        after_fds, after_rss = await _recovered(worker, fds, rss)
        lines = logged(worker, "connection closed: headers not complete in time")
        assert 1 <= len(lines) <= closed_after + 2  # one line a second at most
        assert sum(1 + int(line.get("suppressed", 0)) for line in lines) <= 1000
    report("1000 slowloris", quiet=quiet.percentiles(), during=during.percentiles(),
           closed_within_s=round(closed_after, 2), fds=[fds, peak_fds, after_fds],
           rss_kib=[rss, peak_rss, after_rss], log_lines=len(lines))  # fmt: skip


async def test_2000_idle_sockets_over_the_cap_leave_room_for_events(
    emulator: tuple[Emulator, str],
) -> None:
    emu, url = emulator
    env = {"WORKER_KEEPALIVE_TIMEOUT": "2", "WORKER_MAX_CONNECTIONS": "500", **SHORT}
    async with running_worker(emu, url, env) as worker:
        quiet, fds, rss = await _baseline(emu, worker)
        attack, during = Attack(port_of(worker)), Genuine(emu, worker.url)
        try:
            started = time.monotonic()
            await attack.open(2000)
            async with aiohttp.ClientSession() as http:
                await during.send(http, 50)
            peak_fds, peak_rss = open_fds(worker.process.pid), rss_kib(worker.process.pid)
            answers = await attack.until_closed(limit=2 + 6)
            closed_after = time.monotonic() - started
        finally:
            await attack.close()
        assert during.statuses == [200] * 50
        assert answers == [b""] * 2000
        assert peak_fds <= fds + 500 + ACCEPT_BURST + FD_SLACK  # the cap held
        after_fds, after_rss = await _recovered(worker, fds, rss)
        lines = logged(worker, "connection closed: too many open connections")
        assert 1 <= len(lines) <= closed_after + 2
    report("2000 idle sockets, cap 500", quiet=quiet.percentiles(), during=during.percentiles(),
           closed_within_s=round(closed_after, 2), fds=[fds, peak_fds, after_fds],
           rss_kib=[rss, peak_rss, after_rss], log_lines=len(lines))  # fmt: skip


async def test_fd_limit_256_lowers_the_cap_and_300_silent_sockets_lock_nobody_out(
    emulator: tuple[Emulator, str],
) -> None:
    emu, url = emulator
    env = {"WORKER_KEEPALIVE_TIMEOUT": "30", "WORKER_API_MAX_CONNECTIONS": "20", **SHORT}
    async with running_worker(emu, url, env, nofile=256) as worker:
        [lowered] = logged(worker, "connection cap lowered to fit the file descriptor limit")
        assert lowered["cap"] == 256 - 20 - ACCEPT_BURST - FD_RESERVE
        quiet, fds, rss = await _baseline(emu, worker)
        attack, during = Attack(port_of(worker)), Genuine(emu, worker.url)
        lines_before = len(worker.lines)
        try:
            await attack.open(300)
            async with aiohttp.ClientSession() as http:
                await during.send(http, 50)
            peak_fds = open_fds(worker.process.pid)
        finally:
            await attack.close()
        assert during.statuses == [200] * 50
        assert peak_fds < 256
        after_fds, _ = await _recovered(worker, fds, rss)
        noise = [r for r in worker.records()[lines_before:] if r["message"] != "event handled"]
        assert len(noise) <= 10, noise  # no flood
        assert not logged(worker, PAUSED)
    report("fd limit 256, 300 silent sockets", quiet=quiet.percentiles(),
           during=during.percentiles(), fds=[fds, peak_fds, after_fds], cap=lowered["cap"],
           log_lines=len(noise))  # fmt: skip


async def test_out_of_descriptors_pauses_accepting_and_serves_open_connections(
    emulator: tuple[Emulator, str],
) -> None:
    """Descriptors taken by something else (the limit lowered under the running worker): it
    stops accepting, says so once a second at most, keeps answering its open connections and
    accepts again once descriptors are free."""
    emu, url = emulator
    async with running_worker(emu, url, {"WORKER_KEEPALIVE_TIMEOUT": "30", **SHORT}) as worker:
        pid = worker.process.pid
        _, fds, _ = await _baseline(emu, worker)
        attack, during = Attack(port_of(worker)), Genuine(emu, worker.url)
        async with aiohttp.ClientSession() as http:
            await during.send(http, 1)  # this session's connection is open before the limit
            _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_fds(pid) + 10, hard))
            started = time.monotonic()
            try:
                await attack.open(100)  # the kernel's backlog holds what the worker cannot take
                await eventually(
                    lambda: bool(logged(worker, PAUSED)),
                    "the worker to run out of descriptors", 5,
                )  # fmt: skip
                await during.send(http, 50)
                await eventually(  # the pause repeats, a line a second: not a flood
                    lambda: len(logged(worker, PAUSED)) >= 2,
                    "a second pause", 5,
                )  # fmt: skip
                paused_for = time.monotonic() - started
            finally:
                await attack.close()
                resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
        assert during.statuses == [200] * 51
        lines = logged(worker, PAUSED)
        assert len(lines) <= paused_for + 1
        async with aiohttp.ClientSession() as http:  # a new connection is accepted again
            fresh = Genuine(emu, worker.url)
            await fresh.send(http, 5)
        assert fresh.statuses == [200] * 5
        await eventually(lambda: open_fds(pid) <= fds + FD_SLACK, "the worker's fds to return", 10)
    report("out of descriptors (limit lowered while running), 100 sockets",
           during=during.percentiles(), log_lines=len(lines), paused_s=round(paused_for, 2))
