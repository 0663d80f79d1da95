"""What the OS says about a process: CPU time, resident memory, CPU pinning.

CPU time is the process's CPU-time clock (every thread of the process, including threads that
have exited), read to the nanosecond with ``clock_gettime`` on the clock id Linux gives another
process (``clock_getcpuclockid``); where that is refused, ``utime + stime`` of
``/proc/PID/stat``, in clock ticks (``SC_CLK_TCK``, 100 a second, so good to 10 ms only: a
quick point's 0.3 s of CPU would be off by up to 3 %). Neither read waits on a disk, so both are
safe to call from the event loop.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Final

CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")
# Field numbers of /proc/PID/stat (1-based, as in proc(5)); counted after the ")" of comm.
_UTIME, _STIME, _RSS = 14, 15, 24


@dataclass(frozen=True, slots=True)
class ProcStat:
    cpu_seconds: float
    rss_bytes: int


def parse_stat(text: str, *, clk_tck: int = CLK_TCK, page_size: int = PAGE_SIZE) -> ProcStat:
    """Parse one ``/proc/PID/stat`` line; ``comm`` may hold spaces and parentheses.

    Raises ``ValueError`` on a line that does not have the expected fields.
    """
    close = text.rfind(")")
    if close < 0:
        raise ValueError("not a /proc/PID/stat line: no ')' after comm")
    fields = text[close + 1 :].split()
    # fields[0] is field 3 (state), so field k is fields[k - 3].
    if len(fields) < _RSS - 2:
        raise ValueError(f"not a /proc/PID/stat line: {len(fields) + 2} fields")
    ticks = int(fields[_UTIME - 3]) + int(fields[_STIME - 3])
    return ProcStat(ticks / clk_tck, int(fields[_RSS - 3]) * page_size)


def read_stat(pid: int) -> ProcStat:
    """The process's CPU seconds and RSS now; ``OSError`` when it is gone."""
    return parse_stat(Path(f"/proc/{pid}/stat").read_text())


def cpu_seconds(pid: int) -> float:
    """The CPU seconds ``pid`` has used, to the nanosecond where the kernel lets us read its
    CPU-time clock; ``FileNotFoundError`` when it is gone (as :func:`read_stat`)."""
    try:
        return time.clock_gettime(process_cpu_clock(pid))
    except OSError:
        return read_stat(pid).cpu_seconds  # refused (or gone: then this raises)


def process_cpu_clock(pid: int) -> int:
    """The clock id of ``pid``'s CPU time, as glibc's ``clock_getcpuclockid`` makes it
    (``CPUCLOCK_SCHED`` of the whole process: ``(~pid << 3) | 2``)."""
    return ((~pid) << 3) | 2


def rss_bytes(pid: int) -> int:
    return read_stat(pid).rss_bytes


def thread_ids(pid: int) -> list[int]:
    """Every thread of ``pid`` (its tasks under ``/proc/PID/task``)."""
    try:
        return [int(name) for name in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def pin(pid: int, cpus: Collection[int]) -> None:
    """Pin every current thread of ``pid`` to ``cpus``; threads started later inherit it.

    ``sched_setaffinity`` acts on one thread, so each task is pinned; a thread that ends
    meanwhile is skipped.
    """
    for tid in thread_ids(pid) or [pid]:
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(tid, cpus)


def available_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))
