"""The ``biot-worker`` command.

``run`` serves events over HTTP (against the embedded BioT emulator when ``BIOT_BASE_URL`` is
unset), ``emulator`` runs BioT in a box alone, ``demo`` drives one event of each hook type
through both, ``config`` prints the settings in effect. Settings come from the environment;
every ``WORKER_*``/``BIOT_*`` variable also has a flag (``WORKER_MAX_IN_FLIGHT`` is
``--max-in-flight``, ``BIOT_BASE_URL`` is ``--biot-base-url``), except the service secret, which
is read from the environment only so it never shows in a process list.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence

from config.settings import VARIABLES, Settings, SettingsError, defaults, load_settings
from worker.version import __version__

SECRET_VARIABLES = frozenset({"BIOT_SERVICE_USER_SECRET_KEY"})


def flag_for(variable: str) -> str:
    name = variable.removeprefix("WORKER_")
    return "--" + name.lower().replace("_", "-")


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (each overrides its environment variable)")
    shown = defaults()
    for variable, meaning in VARIABLES.items():
        if variable in SECRET_VARIABLES:
            continue
        default = shown.get(variable)
        suffix = f" [{variable}; default {default}]" if default else f" [{variable}]"
        group.add_argument(
            flag_for(variable), dest=variable, metavar="VALUE", help=meaning + suffix
        )


def overrides(args: argparse.Namespace) -> dict[str, str]:
    return {v: str(getattr(args, v)) for v in VARIABLES if getattr(args, v, None) is not None}


def settings_from(args: argparse.Namespace) -> Settings:
    return load_settings(os.environ, overrides(args))


def build_parser() -> argparse.ArgumentParser:
    from worker.testing.emulator import add_cli_arguments as add_emulator_arguments

    parser = argparse.ArgumentParser(prog="biot-worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"biot-worker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="serve BioT events over HTTP")
    _add_setting_flags(run)
    run.add_argument(
        "--source",
        metavar="URL",
        help="take events from a queue (redis://HOST:PORT/DB?stream=..., amqp://USER:PASS@HOST/"
        "?queue=...) instead of HTTP",
    )
    run.add_argument(
        "--emulator-tls",
        action="store_true",
        help="with the embedded emulator: serve its API over HTTPS (trusting its own CA)",
    )

    emulator = commands.add_parser("emulator", help="run BioT in a box alone")
    emulator.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    emulator.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    add_emulator_arguments(emulator)

    demo = commands.add_parser("demo", help="one event of each hook through emulator and worker")
    demo.add_argument("--tls", action="store_true", help="emulator on HTTPS")

    publish = commands.add_parser("publish", help="put events on a queue (samples or a file)")
    from worker.testing.publish import add_publish_arguments

    add_publish_arguments(publish)

    bench = commands.add_parser("bench", help="measure interceptor latency side by side")
    from worker.bench.cli import add_bench_arguments

    add_bench_arguments(bench)

    config = commands.add_parser("config", help="check the settings and print them")
    _add_setting_flags(config)
    return parser


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop to run on: asyncio's own (``None``), or uvloop's when asked for."""
    if name != "uvloop":
        return None
    try:
        import uvloop
    except ImportError:
        raise SettingsError(
            ["WORKER_EVENT_LOOP: uvloop is not installed (pip install 'biot-worker[uvloop]')"]
        ) from None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch_command(args)
    except SettingsError as exc:
        sys.stderr.write(f"biot-worker: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch_command(args: argparse.Namespace) -> int:
    from worker.testing import dev as commands

    if args.command == "run":
        settings = settings_from(args)
        with asyncio.Runner(loop_factory=loop_factory(settings.worker.event_loop)) as runner:
            return runner.run(
                commands.run(settings, emulator_tls=args.emulator_tls, source=args.source)
            )
    if args.command == "publish":
        from worker.testing.publish import publish_main

        return asyncio.run(publish_main(args))
    if args.command == "bench":
        from worker.bench.cli import bench_main

        return bench_main(args)
    if args.command == "emulator":
        return asyncio.run(commands.emulator(args))
    if args.command == "demo":
        from worker.testing.demo import demo

        return asyncio.run(demo(tls=args.tls))
    sys.stdout.write(f"{settings_from(args)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
