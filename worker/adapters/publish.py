"""``biot-worker publish``: put events on a queue. (Placeholder until the queue adapters land.)"""

from __future__ import annotations

import argparse
import sys


def add_publish_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, metavar="URL", help="queue URL")


async def publish_main(args: argparse.Namespace) -> int:
    sys.stderr.write("biot-worker publish: the queue adapters are not built yet\n")
    return 2
