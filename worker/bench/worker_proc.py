"""The worker as the benchmark runs it when it must look inside.

``python -m worker.bench.worker_proc run`` is ``biot-worker run`` (:func:`worker.cli.main`)
plus two bench-only switches:

- ``BENCH_PROFILE=PATH``: ``SIGUSR1`` starts cProfile on the main thread (the event loop),
  ``SIGUSR2`` stops it and writes the stats to ``PATH`` (``pstats`` format); if profiling is
  still on when the worker ends (``SIGTERM``), the stats are written then. The listener thread
  of the stdlib log backend is not profiled: its CPU shows in ``/proc``, not here.
- ``BENCH_UVLOOP=1``: run the worker on uvloop (when it is installed; uvloop is an extra).
- ``BENCH_PRELOAD=module[,module]``: import these first. ``biot-worker bench --candidate M``
  uses it to measure a proposed hot-path change (``M`` patches the worker when imported) side
  by side with the worker as it is, before anyone edits the real module.
"""

from __future__ import annotations

import cProfile
import importlib
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType


class SignalProfiler:
    """cProfile switched on and off by signals, writing its stats to one file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.profile: cProfile.Profile | None = None

    def start(self, signum: int = 0, frame: FrameType | None = None) -> None:
        if self.profile is None:
            self.profile = cProfile.Profile()
            self.profile.enable()

    def stop(self, signum: int = 0, frame: FrameType | None = None) -> None:
        profile, self.profile = self.profile, None
        if profile is not None:
            profile.disable()
            profile.dump_stats(self.path + ".tmp")
            os.replace(self.path + ".tmp", self.path)  # readers never see a half-written file

    def install(self) -> None:
        signal.signal(signal.SIGUSR1, self.start)
        signal.signal(signal.SIGUSR2, self.stop)


def main(argv: Sequence[str] | None = None) -> int:
    from worker.cli import main as worker_main

    for module in filter(None, os.environ.get("BENCH_PRELOAD", "").split(",")):
        importlib.import_module(module.strip())
    if os.environ.get("BENCH_UVLOOP") == "1":
        import uvloop  # type: ignore[import-not-found, unused-ignore]

        uvloop.install()
    path = os.environ.get("BENCH_PROFILE")
    profiler = SignalProfiler(path) if path else None
    if profiler is not None:
        profiler.install()
    try:
        return worker_main(argv)
    finally:
        if profiler is not None:
            profiler.stop()


if __name__ == "__main__":
    sys.exit(main())
