"""``python -m worker.bench.spin CPU``: keep one vCPU out of idle, at the lowest priority.

On a virtual machine a vCPU woken from idle by a packet can take milliseconds to run, which
puts that stall, not the code, in every low-load tail. A ``SCHED_IDLE`` busy loop
pinned to the CPU keeps it awake and yields to any normal task at once, so the measured
processes keep the CPU whenever they want it; its own CPU time is not counted anywhere. The
bench starts one per CPU it uses with ``--busy-cpus``; a spinner whose parent is gone
(the bench was killed) stops by itself within a fraction of a second.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    os.sched_setaffinity(0, {int(argv[0])})
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    parent = os.getppid()
    while os.getppid() == parent:
        for _ in range(1_000_000):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
