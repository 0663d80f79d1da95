"""``biot-worker bench``. (Placeholder until the benchmark lands.)"""

from __future__ import annotations

import argparse
import sys


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a short run")


def bench_main(args: argparse.Namespace) -> int:
    sys.stderr.write("biot-worker bench: the benchmark is not built yet\n")
    return 2
