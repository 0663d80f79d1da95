"""The biot-worker command: argument parsing and one function per command.

Each command function loads the settings and the plugin's routes before anything starts, then
hands over to the runtime (:mod:`worker.runner`) or to a tool (:mod:`worker.testing`,
:mod:`worker.bench`), which it imports only when that command runs. An error a user can cause
(a bad setting, a broken plugin, a port in use, a missing extra) ends the command with one line
on stderr and exit status 2; ``--debug`` or ``WORKER_LOG_LEVEL=DEBUG`` adds the traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from config.settings import (
    SECRET_VARIABLES,
    VARIABLES,
    Settings,
    SettingsError,
    defaults,
    load_settings,
    replace_settings,
    shown,
)
from worker.routing import RouteError, Router, load_routes
from worker.version import __version__
from worker.views import HookType

DESCRIPTION = (
    "Run BioT plugin handlers as a long-lived asyncio worker. "
    "Start with 'biot-worker dev' (the worker against an embedded BioT emulator); "
    "'biot-worker run' serves a real BioT and needs BIOT_BASE_URL. "
    "Settings come from the environment; each also has a flag (WORKER_MAX_IN_FLIGHT is "
    "--max-in-flight, BIOT_BASE_URL is --biot-base-url), except the service secret, which is "
    "read from the environment only so that it never shows in a process list."
)
NO_BASE_URL = (
    "BIOT_BASE_URL is not set; a production worker never talks to a fake BioT. "
    "For local development use: biot-worker dev"
)
#: The optional extra that provides each module a command may need.
EXTRAS = {
    "redis": "queues",
    "aio_pika": "queues",
    "aiormq": "queues",
    "requests": "bench",
    "matplotlib": "bench",
    "uvloop": "uvloop",
    "aiologger": "aiologger",
}
#: The settings flags of deploy and subscribe (the BioT user comes from the environment only).
ADMIN_SETTINGS = ("BIOT_BASE_URL", "WORKER_CA_BUNDLE", "WORKER_ROUTES")
QUEUE_SCHEMES = {"redis": "redis", "rediss": "redis", "amqp": "aio_pika", "amqps": "aio_pika"}


class CommandError(Exception):
    """A command cannot go on; the message is one line for the user."""


# ---------------------------------------------------------------- the parser


def flag_for(variable: str) -> str:
    name = variable.removeprefix("WORKER_")
    return "--" + name.lower().replace("_", "-")


def _add_setting_flags(
    parser: argparse.ArgumentParser, *, skip: frozenset[str] = frozenset()
) -> None:
    group = parser.add_argument_group("settings (each overrides its environment variable)")
    shown = defaults()
    for variable, meaning in VARIABLES.items():
        if variable in SECRET_VARIABLES or variable in skip:
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


def _add_publish_arguments(parser: argparse.ArgumentParser) -> None:
    # Defined here, not in worker.testing.publish, so that the parser imports no broker client.
    add = parser.add_argument
    add("--source", required=True, metavar="URL", help="redis://... or amqp://...")
    hooks = [hook.value for hook in HookType]
    add("--hook", action="append", choices=[*hooks, "all"], help="sample hook (repeatable)")
    add("--count", type=int, default=1, help="samples of each hook [1]")
    add("--file", type=Path, help="JSONL file of envelopes (instead of samples)")
    add("--emulator", metavar="URL", help="sign samples with this emulator's key")
    add("--wait-replies", action="store_true", help="wait for and print replies")
    add("--timeout", type=float, default=30.0, help="seconds to wait [30]")


def _add_chosen_settings(parser: argparse.ArgumentParser, variables: Sequence[str]) -> None:
    group = parser.add_argument_group("settings (each overrides its environment variable)")
    for variable in variables:
        help = f"{VARIABLES[variable]} [{variable}]"
        group.add_argument(flag_for(variable), dest=variable, metavar="VALUE", help=help)


def _add_pip_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--find-links", action="append", default=[], metavar="DIR", help="passed to pip"
    )
    parser.add_argument("--no-index", action="store_true", help="passed to pip")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv``, the tools' own flags (the emulator's, the benchmark's) are
    defined only when their command is the one given, so ``run`` imports neither tool."""
    given = next((arg for arg in argv if not arg.startswith("-")), None) if argv else None

    def wanted(name: str) -> bool:
        return argv is None or given == name

    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of a start-up error",
    )
    parser = argparse.ArgumentParser(prog="biot-worker", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"biot-worker {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, parents=[debug])

    dev = command("dev", "run the worker against an embedded BioT emulator, for development")
    _add_setting_flags(dev)
    dev.add_argument("--source", metavar="URL", help="take events from this queue, not HTTP")
    dev.add_argument(
        "--tls", "--emulator-tls", action="store_true", help="serve the emulator over HTTPS"
    )

    run = command("run", "serve a real BioT (needs BIOT_BASE_URL)")
    _add_setting_flags(run)
    run.add_argument(
        "--source",
        metavar="URL",
        help="take events from a queue (redis://HOST:PORT/DB?stream=..., "
        "amqp://USER:PASS@HOST/?queue=...) instead of HTTP (the queues extra)",
    )

    emulator = command("emulator", "run BioT in a box alone")
    emulator.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    emulator.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    if wanted("emulator"):
        from worker.testing.emulator import add_cli_arguments as add_emulator_arguments

        add_emulator_arguments(emulator)

    demo = command("demo", "send each routed hook an event and show what its handler did")
    demo.add_argument("--port", type=int, default=0, help="the worker's port (0: any free port)")
    demo.add_argument("--tls", action="store_true", help="serve the emulator over HTTPS")
    _add_setting_flags(demo, skip=frozenset({"WORKER_PORT"}))

    publish = command("publish", "put events on a queue, samples or a file (the queues extra)")
    _add_publish_arguments(publish)

    bench = command("bench", "measure interceptor latency side by side (the bench extra)")
    if wanted("bench"):
        from worker.bench.cli import add_bench_arguments

        add_bench_arguments(bench)

    package = command("package", "build the plugin's Lambda ZIP for BioT's Python runtime")
    _add_chosen_settings(package, ("WORKER_ROUTES",))
    package.add_argument(
        "--output", type=Path, default=Path("dist/plugin.zip"), help="[dist/plugin.zip]"
    )
    package.add_argument(
        "--python-version", default="3.12", help="the Lambda runtime's Python [3.12]"
    )
    _add_pip_flags(package)

    deploy = command("deploy", "create or update the plugin on BioT (BIOT_USERNAME/BIOT_PASSWORD)")
    _add_chosen_settings(deploy, ADMIN_SETTINGS)
    add = deploy.add_argument
    add("--name", required=True, help="the plugin's name (1-57 of a-z A-Z 0-9 - _)")
    add("--zip", type=Path, metavar="PATH", help="deploy this zip (default: package one)")
    add(
        "--env",
        action="append",
        metavar="KEY=VALUE",
        help="plugin variable (repeatable; given, the set replaces the deployed one)",
    )
    add("--timeout", type=int, help="seconds, 1-900 [new plugin: 60; update: unchanged]")
    add("--memory", type=int, metavar="MB", help="128-10240 [new plugin: 128; update: unchanged]")
    add("--runtime", help="BioT's Lambda runtime [new plugin: python3.12; update: unchanged]")
    add("--dry-run", action="store_true", help="show the configuration and the difference only")
    _add_pip_flags(deploy)

    subscribe = command("subscribe", "subscribe a self-hosted worker's routes on BioT's dispatcher")
    _add_chosen_settings(subscribe, ADMIN_SETTINGS)
    subscribe.add_argument("--endpoint", required=True, metavar="URL", help="the worker's URL")
    subscribe.add_argument(
        "--prune",
        action="store_true",
        help="remove this endpoint's subscriptions no route asks for",
    )
    subscribe.add_argument("--dry-run", action="store_true", help="show what would be sent only")

    unsubscribe = command("unsubscribe", "remove every dispatcher subscription of an endpoint")
    _add_chosen_settings(unsubscribe, ("BIOT_BASE_URL", "WORKER_CA_BUNDLE"))
    unsubscribe.add_argument("--endpoint", required=True, metavar="URL", help="the worker's URL")

    config = command("config", "check the settings and the routes, and print them")
    _add_setting_flags(config)
    config.add_argument(
        "--source", metavar="URL", help="also check a queue URL and print it (password hidden)"
    )
    return parser


# ---------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        message = user_message(exc)
        if message is None:
            raise
        if _debug(args):
            _print_traceback(exc)
        sys.stderr.write(f"biot-worker {args.command}: {message}\n")
        return 2


def user_message(exc: BaseException) -> str | None:
    """The message for an error a user can cause and fix, or ``None`` for a bug."""
    from worker.app import StartupError

    if isinstance(exc, SettingsError):
        if len(exc.problems) == 1:
            return f"invalid setting: {exc.problems[0]}"
        return f"{len(exc.problems)} invalid settings: " + "; ".join(exc.problems)
    if isinstance(exc, RouteError | StartupError | CommandError):
        return str(exc)
    if isinstance(exc, ModuleNotFoundError):
        module = (exc.name or "").partition(".")[0]
        if module in EXTRAS:
            return _needs_extra(module)
    return None


def _needs_extra(module: str, extra: str | None = None) -> str:
    extra = extra or EXTRAS[module]
    install = f"pip install 'biot-worker[{extra}]'"
    return f"needs the {extra} extra ({module} is not installed): {install}"


def _require(module: str, what: str, extra: str | None = None) -> None:
    if importlib.util.find_spec(module) is None:
        raise CommandError(f"{what} {_needs_extra(module, extra)}")


def _debug(args: argparse.Namespace) -> bool:
    level = getattr(args, "WORKER_LOG_LEVEL", None) or os.environ.get("WORKER_LOG_LEVEL", "")
    return bool(getattr(args, "debug", False)) or level.strip().upper() == "DEBUG"


def _print_traceback(exc: BaseException) -> None:
    # load_routes cuts the plugin's own error off its one-line message: show that one too.
    cause = exc.__cause__ or exc.__context__
    if cause is not None and exc.__suppress_context__:
        traceback.print_exception(cause, file=sys.stderr)
    traceback.print_exception(exc, file=sys.stderr)


# ---------------------------------------------------------------- the commands


def cmd_run(args: argparse.Namespace) -> int:
    from worker import runner

    settings = settings_from(args)
    if settings.biot.base_url is None:
        raise CommandError(NO_BASE_URL)
    _check_source(args.source)
    routes = plugin_routes(settings)
    if args.source is not None:
        _run(settings, runner.run_queue(settings, routes, args.source, freeze_gc=True))
    else:
        _run(settings, runner.run_http(settings, routes, freeze_gc=True))
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from worker.testing.dev import run_dev

    settings = settings_from(args)
    _check_source(args.source)
    routes = plugin_routes(settings)
    ignored = [
        name
        for name, value in (
            ("BIOT_BASE_URL", settings.biot.base_url),
            ("WORKER_CA_BUNDLE", settings.worker.ca_bundle),
        )
        if value is not None
    ]
    if ignored:
        sys.stderr.write(
            f"biot-worker dev: {' and '.join(ignored)} ignored: dev always runs against its own "
            "emulator (biot-worker run serves a real BioT)\n"
        )
    _run(settings, run_dev(settings, routes, source=args.source, tls=args.tls, freeze_gc=True))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.testing.demo import demo

    settings = replace_settings(settings_from(args), worker_port=args.port)
    routes = plugin_routes(settings)
    return _run(settings, demo(settings, routes, tls=args.tls))


def cmd_emulator(args: argparse.Namespace) -> int:
    from worker.testing.dev import emulator

    return asyncio.run(emulator(args))


def cmd_publish(args: argparse.Namespace) -> int:
    for module in ("redis", "aio_pika"):
        _require(module, "publish")
    from worker.testing.publish import publish_main

    return asyncio.run(publish_main(args))


def cmd_bench(args: argparse.Namespace) -> int:
    for module in ("requests", "matplotlib", "redis"):
        _require(module, "bench", "bench")
    from worker.bench.cli import bench_main

    return bench_main(args)


def cmd_config(args: argparse.Namespace) -> int:
    from worker.app import StartupError
    from worker.client import make_ssl_context

    settings = settings_from(args)
    _check_source(args.source)
    routes = plugin_routes(settings)
    if settings.worker.ca_bundle is not None:
        try:  # what run would refuse at start, config refuses too
            make_ssl_context(settings.worker.ca_bundle)
        except ValueError as exc:
            raise StartupError(f"WORKER_CA_BUNDLE: {exc}") from None
    values = shown(settings)
    width = max(map(len, values))
    lines = ["settings:", *(f"  {name:<{width}}  {value}" for name, value in values.items())]
    if args.source is not None:
        from worker.adapters.queue import redact_url

        lines.append(f"source: {redact_url(args.source)}")
    lines += _otel_lines(settings)
    lines.append(f"routes ({len(routes)}, from WORKER_ROUTES={settings.worker.routes}):")
    lines += [f"  {route.describe()} -> {route.handler_name}" for route in routes]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _otel_lines(settings: Settings) -> list[str]:
    """What ``config`` says of OpenTelemetry: off, or on with its variables (header values,
    which may hold API keys, hidden; a password in a URL too)."""
    import importlib.util

    from worker.adapters.queue import redact_url

    worker = settings.worker
    env = worker.otel_env()
    if not worker.otel_requested:
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return ["opentelemetry: off (OTEL_SDK_DISABLED=true)"]
        if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
            return ["opentelemetry: off (OTEL_TRACES_EXPORTER=none)"]
        return ["opentelemetry: off (set OTEL_EXPORTER_OTLP_ENDPOINT to export spans)"]
    try:  # finding a submodule imports its parent: absent, that raises
        installed = importlib.util.find_spec("opentelemetry.sdk") is not None
    except ModuleNotFoundError:
        installed = False
    if not installed:
        state = "asked for, but the otel extra is not installed: pip install 'biot-worker[otel]'"
    else:
        state = "spans exported over OTLP/HTTP"
    lines = [f"opentelemetry: {state}"]
    width = max(map(len, env))
    for name, value in sorted(env.items()):
        if "HEADERS" in name:
            value = "(set, hidden)"
        elif "://" in value:
            value = redact_url(value)
        lines.append(f"  {name:<{width}}  {value}")
    return lines


def cmd_package(args: argparse.Namespace) -> int:
    from worker.deploy.admin import tool_settings
    from worker.deploy.package import PackageError, build_package

    settings = tool_settings(os.environ, overrides(args))
    plugin_routes(settings)  # a broken plugin is named before pip runs
    try:
        result = build_package(
            output=args.output,
            python_version=args.python_version,
            routes=settings.worker.routes,
            pip_options=_pip_options(args),
            report=_progress,
        )
    except PackageError as exc:
        if exc.output and getattr(args, "debug", False):
            sys.stderr.write(exc.output.rstrip() + "\n")  # pip's whole account, under --debug
        raise CommandError(str(exc)) from None
    sys.stdout.write(
        f"{result.path}\n  size    {result.size} bytes\n  files   {result.files}\n"
        f"  sha256  {result.sha256}\n"
    )
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from worker.deploy.deploy import DeployOptions, built_package, check_name, run_deploy, zip_file

    settings, credentials = _admin_settings(args)
    routes = plugin_routes(settings)
    try:
        name = check_name(args.name)
    except ValueError as exc:
        raise CommandError(f"--name: {exc}") from None
    if args.zip is not None and not args.zip.is_file():
        raise CommandError(f"--zip {args.zip}: no such file")
    options = DeployOptions(
        name=name,
        env=_env_pairs(args.env),
        timeout=_bounded(args.timeout, "--timeout", 1, 900),
        memory=_bounded(args.memory, "--memory", 128, 10240),
        runtime=args.runtime,
        dry_run=args.dry_run,
    )
    code = (
        zip_file(args.zip)
        if args.zip is not None
        else built_package(settings.worker.routes, _progress, _pip_options(args))
    )
    warn = _warner("deploy")
    return _admin_run(
        args, run_deploy(credentials, routes, options, code, out=sys.stdout, warn=warn)
    )


def cmd_subscribe(args: argparse.Namespace) -> int:
    from worker.deploy.subscribe import run_subscribe

    settings, credentials = _admin_settings(args)
    routes = plugin_routes(settings)
    main = run_subscribe(
        credentials,
        routes,
        _endpoint(args.endpoint),
        prune=args.prune,
        dry_run=args.dry_run,
        out=sys.stdout,
        warn=_warner("subscribe"),
    )
    return _admin_run(args, main)


def cmd_unsubscribe(args: argparse.Namespace) -> int:
    from worker.deploy.subscribe import run_unsubscribe

    _, credentials = _admin_settings(args)
    return _admin_run(args, run_unsubscribe(credentials, _endpoint(args.endpoint), out=sys.stdout))


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "dev": cmd_dev,
    "demo": cmd_demo,
    "emulator": cmd_emulator,
    "publish": cmd_publish,
    "bench": cmd_bench,
    "config": cmd_config,
    "package": cmd_package,
    "deploy": cmd_deploy,
    "subscribe": cmd_subscribe,
    "unsubscribe": cmd_unsubscribe,
}


# ---------------------------------------------------------------- deploy and subscribe


def _admin_settings(args: argparse.Namespace) -> tuple[Settings, Any]:
    """The settings and the BioT user's credentials; a missing one is exit 2."""
    from worker.deploy.admin import AdminConfigError, credentials_from, tool_settings

    settings = tool_settings(os.environ, overrides(args))
    try:
        return settings, credentials_from(settings, os.environ)
    except AdminConfigError as exc:
        raise CommandError(str(exc)) from None


def _admin_run(args: argparse.Namespace, main: Coroutine[Any, Any, int]) -> int:
    """Run a command that talks to BioT: BioT's error or a refused deployment is one line per
    problem and exit 1; a bad CA bundle is exit 2."""
    from worker.deploy.admin import AdminConfigError, BiotAdminError
    from worker.deploy.deploy import DeployError

    try:
        return asyncio.run(main)
    except AdminConfigError as exc:
        raise CommandError(str(exc)) from None
    except (BiotAdminError, DeployError) as exc:
        if _debug(args):
            _print_traceback(exc)
        lines = exc.lines if isinstance(exc, DeployError) else [str(exc)]
        sys.stderr.write("".join(f"biot-worker {args.command}: {line}\n" for line in lines))
        return 1


def _warner(command: str) -> Callable[[str], None]:
    def warn(line: str) -> None:
        sys.stderr.write(f"biot-worker {command}: warning: {line}\n")

    return warn


def _progress(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _pip_options(args: argparse.Namespace) -> list[str]:
    options = ["--no-index"] if args.no_index else []
    for folder in args.find_links:
        options += ["--find-links", folder]
    return options


def _env_pairs(pairs: list[str] | None) -> dict[str, str] | None:
    if pairs is None:
        return None
    env: dict[str, str] = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key.strip():
            raise CommandError(f"--env {pair.partition('=')[0]!r}: expected KEY=VALUE")
        env[key.strip()] = value
    return env


def _bounded(value: int | None, flag: str, low: int, high: int) -> int | None:
    if value is not None and not low <= value <= high:
        raise CommandError(f"{flag} {value}: must be from {low} to {high}")
    return value


def _endpoint(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise CommandError(f"--endpoint: must start with http:// or https://, got {url!r}")
    return url


def plugin_routes(settings: Settings) -> Router:
    """The plugin's routes, loaded before anything starts so that a broken plugin costs nothing.

    The working directory is importable, as with ``python -m``: a plugin beside the project
    loads whichever way the command was started.
    """
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    return load_routes(settings.worker.routes)


def _check_source(url: str | None) -> None:
    """Refuse a queue URL of an unknown scheme, or one whose extra is missing, before starting."""
    if url is None:
        return
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme == "memory":
        raise CommandError("--source: memory:// is in-process only (tests use MemorySource)")
    if scheme not in QUEUE_SCHEMES:
        raise CommandError(
            f"--source: unknown queue URL scheme {scheme!r} (use redis://, rediss://, amqp:// "
            "or amqps://)"
        )
    _require(QUEUE_SCHEMES[scheme], f"--source {scheme}://")


def _run(settings: Settings, main: Coroutine[Any, Any, Any]) -> int:
    """Run ``main`` on the configured event loop; 0 unless it returns a status of its own."""
    try:
        factory = loop_factory(settings.worker.event_loop)
        _check_log_backend(settings)
    except BaseException:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        status = runner.run(main)
    return status if isinstance(status, int) else 0


def _check_log_backend(settings: Settings) -> None:
    if settings.worker.log_backend == "aiologger" and importlib.util.find_spec("aiologger") is None:
        install = "pip install 'biot-worker[aiologger]'"
        raise SettingsError([f"WORKER_LOG_BACKEND: aiologger is not installed ({install})"])


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


if __name__ == "__main__":
    sys.exit(main())
