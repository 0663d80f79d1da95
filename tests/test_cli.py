"""The ``biot-worker`` command as a user meets it: a base install without extras, start-up errors
as one line, trigger commands derived from the routes, and a runtime that imports no tool.

Each command runs as ``python -m worker`` in a subprocess (with a bounded timeout, so none is
left behind); "a base install" is simulated by a ``sitecustomize`` that makes every optional
dependency unimportable, as if pip had never installed it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import orjson
import pytest

from tests import other_plugin
from tests.fixture_plugin import REFERENCE
from tests.fixture_plugin import build_routes as fixture_build_routes
from tests.test_deploy import TOKEN as STAND_IN_TOKEN
from tests.test_deploy import StandIn, stand_in_thread
from worker.cli import NO_BASE_URL, build_parser
from worker.deploy.subscriptions import subscriptions_of
from worker.routing import Router
from worker.testing.dev import trigger_commands

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60
OPTIONAL = ("redis", "aio_pika", "aiologger", "uvloop", "requests", "matplotlib", "hypothesis")
BLOCKER = f"""
import sys
# A base install: these optional packages are absent. A None entry in sys.modules makes
# "import X" raise ModuleNotFoundError and importlib.util.find_spec("X") answer None.
for name in {(*OPTIONAL, "pytest")!r}:
    sys.modules[name] = None
"""


@pytest.fixture(scope="module")
def base_install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("base-install")
    (directory / "sitecustomize.py").write_text(BLOCKER)
    return directory


def environment(*paths: Path, **env: str) -> dict[str, str]:
    """The current environment without BIOT_*/WORKER_* variables, plus ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BIOT_", "WORKER_"))}
    clean["PYTHONPATH"] = os.pathsep.join([*(str(p) for p in paths), str(ROOT)])
    clean.setdefault("WORKER_ROUTES", REFERENCE)
    return {**clean, **env}


def worker(
    *argv: str, paths: tuple[Path, ...] = (), biot: Mapping[str, str] | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "worker", *argv],
        env=environment(*paths, **{**(biot or {}), **env}),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def python(code: str, *, paths: tuple[Path, ...] = (), **env: str) -> str:
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-c", code],
        env=environment(*paths, **env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def one_line_error(done: subprocess.CompletedProcess[str], command: str) -> str:
    """The process ended with status 2 and exactly one line on stderr, no traceback."""
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"biot-worker {command}: ")
    return lines[0]


# ---------------------------------------------------------------- a base install


def test_base_install_is_really_without_the_extras(base_install: Path) -> None:
    code = f"import importlib.util as u; print([u.find_spec(m) for m in {OPTIONAL!r}])"
    assert python(code, paths=(base_install,)).strip() == str([None] * len(OPTIONAL))


def test_help_works_without_extras_and_has_no_markup(base_install: Path) -> None:
    done = worker("--help", paths=(base_install,))
    assert done.returncode == 0, done.stderr
    assert "`" not in done.stdout
    for command in ("dev", "run", "demo", "emulator", "config", "publish", "bench"):
        assert command in done.stdout
    for command in ("run", "dev", "publish", "bench"):
        assert worker(command, "--help", paths=(base_install,)).returncode == 0


def test_config_works_without_extras_and_lists_the_routes(base_install: Path) -> None:
    done = worker("config", paths=(base_install,))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    [header] = [i for i, line in enumerate(lines) if line.startswith("routes (")]
    assert lines[0] == "settings:"
    values = dict(line.split(None, 1) for line in lines[1:header])
    assert values["BIOT_BASE_URL"] == "(not set)"
    assert values["WORKER_ROUTES"] == REFERENCE
    assert values["WORKER_PORT"] == "8080"
    assert f"from WORKER_ROUTES={REFERENCE}" in lines[header]
    routes = lines[header + 1 :]
    assert "  NOTIFICATION patient/_create -> tests.fixture_plugin.on_patient" in routes
    assert any(r.startswith("  PRE_REQUEST apiId=PATCH/") and "order=1" in r for r in routes)
    assert routes[-1] == "  NONSPECIFIC -> tests.fixture_plugin.count_patients"


def test_config_shows_whether_a_secret_is_set_never_its_value() -> None:
    secret = "s3cr3t-never-printed"
    done = worker(
        "config",
        BIOT_BASE_URL="https://biot.example.test",
        BIOT_SERVICE_USER_ID="svc",
        BIOT_SERVICE_USER_SECRET_KEY=secret,
    )
    assert done.returncode == 0, done.stderr
    assert secret not in done.stdout
    values = dict(line.split(None, 1) for line in done.stdout.splitlines()[1:] if "  " in line)
    assert values["BIOT_SERVICE_USER_SECRET_KEY"] == "(set, hidden)"
    assert values["BIOT_BASE_URL"] == "https://biot.example.test"


def test_run_without_base_url_refuses_and_names_dev(base_install: Path) -> None:
    line = one_line_error(worker("run", paths=(base_install,)), "run")
    assert line == f"biot-worker run: {NO_BASE_URL}"
    assert "biot-worker dev" in line


@pytest.mark.parametrize(
    ("argv", "env", "extra"),
    [
        (("publish", "--source", "redis://127.0.0.1:1/0"), {}, "queues"),
        (("dev", "--source", "redis://127.0.0.1:1/0?stream=s"), {}, "queues"),
        (("run", "--source", "amqp://127.0.0.1:1/"), {"BIOT_BASE_URL": "http://x"}, "queues"),
        (("dev",), {"WORKER_EVENT_LOOP": "uvloop"}, "uvloop"),
        (("dev",), {"WORKER_LOG_BACKEND": "aiologger"}, "aiologger"),
        (("bench", "--quick", "--scenarios", "a"), {}, "bench"),
    ],
)
def test_a_command_that_needs_an_extra_names_it(
    base_install: Path, argv: tuple[str, ...], env: dict[str, str], extra: str
) -> None:
    if "BIOT_BASE_URL" in env:
        env = {**env, "BIOT_SERVICE_USER_ID": "id", "BIOT_SERVICE_USER_SECRET_KEY": "secret"}
    line = one_line_error(worker(*argv, paths=(base_install,), biot=env), argv[0])
    assert f"pip install 'biot-worker[{extra}]'" in line


def test_lambda_handler_answers_without_extras(base_install: Path, tmp_path: Path) -> None:
    (tmp_path / "lambda_plugin.py").write_text(
        textwrap.dedent(
            """
            from worker import Router

            async def hello(view, ctx):
                return {"hello": "base install"}

            def build_routes():
                return Router().nonspecific(hello)
            """
        )
    )
    code = textwrap.dedent(
        """
        import json, sys
        from worker.adapters import lambda_
        answer = lambda_.handler({"headers": {"hooktype": "NONSPECIFIC"}, "body": "{}"}, None)
        lambda_.shutdown()
        loaded = sorted(m for m in sys.modules if m.startswith(("worker.testing", "worker.bench")))
        print(json.dumps({"answer": answer, "loaded": loaded}))
        """
    )
    out = python(
        code,
        paths=(base_install, tmp_path),
        # A BioT nobody listens on: with validation off and a handler that calls no API, the
        # event needs neither the public key nor a login.
        BIOT_BASE_URL="http://127.0.0.1:9",
        BIOT_SERVICE_USER_ID="id",
        BIOT_SERVICE_USER_SECRET_KEY="secret",
        BIOT_SHOULD_VALIDATE_JWT="false",
        WORKER_ROUTES="lambda_plugin:build_routes",
        WORKER_LOG_LEVEL="ERROR",
    )
    result = orjson.loads(out.splitlines()[-1])
    assert result["answer"]["statusCode"] == 200
    assert orjson.loads(result["answer"]["body"]) == {"hello": "base install"}
    assert result["loaded"] == []


@pytest.mark.parametrize(
    "module", ["worker.adapters.http", "worker.adapters.lambda_", "worker.runner"]
)
def test_the_runtime_imports_no_tool_and_no_broker(module: str) -> None:
    # Run with every extra installed: not loading them must be by design, not by absence.
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    loaded = python(code).split()
    tools = ("worker.testing", "worker.bench", "worker.cli", "redis", "aio_pika", "handlers")
    assert [m for m in loaded if m in tools or m.startswith(tuple(t + "." for t in tools))] == []


# ---------------------------------------------------------------- start-up errors


@pytest.fixture
def plugins(tmp_path: Path) -> Path:
    (tmp_path / "broken_syntax.py").write_text("from worker import Router\ndef build_routes(:\n")
    (tmp_path / "broken_import.py").write_text("import not_a_module_anywhere\n")
    (tmp_path / "duplicate.py").write_text(
        textwrap.dedent(
            """
            from worker import Router

            async def one(view, ctx): ...
            async def two(view, ctx): ...

            def build_routes():
                router = Router()
                router.pre(one, entity="patient")
                router.pre(two, entity="patient")
                return router
            """
        )
    )
    return tmp_path


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        ("no_such_plugin:build_routes", "no module named 'no_such_plugin'"),
        ("broken_syntax:build_routes", "broken_syntax.py:2: SyntaxError"),
        ("broken_import:build_routes", "broken_import.py:1: ModuleNotFoundError"),
        ("duplicate:build_routes", "duplicate route PRE_REQUEST entity=patient"),
        (f"{REFERENCE.partition(':')[0]}:missing", "has no missing()"),
    ],
)
@pytest.mark.parametrize("command", ["config", "dev", "run"])
def test_a_broken_plugin_is_one_line_and_starts_nothing(
    plugins: Path, routes: str, expected: str, command: str
) -> None:
    env = {"WORKER_ROUTES": routes, "BIOT_BASE_URL": "http://127.0.0.1:9"}
    env |= {"BIOT_SERVICE_USER_ID": "id", "BIOT_SERVICE_USER_SECRET_KEY": "secret"}
    if command == "dev":
        del env["BIOT_BASE_URL"], env["BIOT_SERVICE_USER_ID"], env["BIOT_SERVICE_USER_SECRET_KEY"]
    done = worker(command, "--port", "0", paths=(plugins,), biot=env)
    line = one_line_error(done, command)
    assert f"WORKER_ROUTES={routes}" in line and expected in line
    assert done.stdout == ""  # nothing started, so nothing logged


def test_debug_shows_the_traceback_of_the_plugin(plugins: Path) -> None:
    for argv, env in (
        (("--debug", "config"), {}),
        (("config", "--debug"), {}),
        (("config",), {"WORKER_LOG_LEVEL": "DEBUG"}),
    ):
        env = {**env, "WORKER_ROUTES": "broken_import:build_routes"}
        done = worker(*argv, paths=(plugins,), biot=env)
        assert done.returncode == 2
        assert "Traceback" in done.stderr and "not_a_module_anywhere" in done.stderr
        assert done.stderr.splitlines()[-1].startswith("biot-worker config: WORKER_ROUTES=")


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _real_biot(**env: str) -> dict[str, str]:
    return {
        "BIOT_BASE_URL": "http://127.0.0.1:9",
        "BIOT_SERVICE_USER_ID": "id",
        "BIOT_SERVICE_USER_SECRET_KEY": "secret",
        **env,
    }


def test_port_in_use_is_one_line(busy_port: int) -> None:
    line = one_line_error(worker("run", "--port", str(busy_port), biot=_real_biot()), "run")
    assert line == (
        f"biot-worker run: cannot listen on 127.0.0.1:{busy_port}: the port is in use "
        "(WORKER_PORT, --port)"
    )
    line = one_line_error(worker("dev", "--port", str(busy_port)), "dev")
    assert "the port is in use" in line


def test_unreadable_ca_bundle_is_one_line(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    for bundle in (str(tmp_path / "missing.pem"), str(garbage)):
        line = one_line_error(worker("config", WORKER_CA_BUNDLE=bundle), "config")
        assert line.startswith("biot-worker config: WORKER_CA_BUNDLE: cannot load CA bundle")
        done = worker("run", "--port", "0", biot=_real_biot(WORKER_CA_BUNDLE=bundle))
        line = one_line_error(done, "run")
        assert line.startswith(
            f"biot-worker run: WORKER_CA_BUNDLE: cannot load CA bundle '{bundle}'"
        )


def test_settings_errors_are_one_line_naming_every_problem() -> None:
    line = one_line_error(worker("config", WORKER_PORT="eighty"), "config")
    assert line.startswith("biot-worker config: invalid setting: WORKER_PORT: ")
    done = worker("config", WORKER_PORT="eighty", WORKER_MAX_IN_FLIGHT="-1")
    line = one_line_error(done, "config")
    assert line.startswith("biot-worker config: 2 invalid settings: WORKER_PORT: ")
    assert "; WORKER_MAX_IN_FLIGHT: " in line


@pytest.mark.parametrize("url", ["kafka://127.0.0.1/t", "memory://", "no-scheme"])
def test_a_bad_queue_url_is_one_line(url: str) -> None:
    line = one_line_error(worker("run", "--source", url, biot=_real_biot()), "run")
    assert "--source: " in line
    one_line_error(worker("dev", "--source", url), "dev")


# ---------------------------------------------------------------- dev's trigger commands


async def _noop(view: object, ctx: object) -> None:
    return None


def test_trigger_commands_follow_the_registered_routes() -> None:
    router = Router()
    router.notification(_noop, entity="caregiver", action="_delete")
    router.notification(_noop, entity="device", action="_create")
    router.notification(_noop, entity="*", action="_create")
    router.pre(_noop, api_id="POST/generic-entity/v1/generic-entities/templates/device_log")
    router.post(_noop, api_id="GET/nowhere/v1/things")
    router.adapt_entity(_noop, entity="patient", order=2)
    router.nonspecific(_noop)
    lines = list(trigger_commands("http://emu", "http://worker", router))
    assert lines[0].startswith("first get a user token: TOKEN=$(curl -s -X POST http://emu/")
    by_route = {line.split(" -> ")[0]: line for line in lines[1:]}
    assert len(by_route) == len(router)
    delete = by_route["NOTIFICATION caregiver/_delete"]
    assert "-X POST" in delete and "http://emu/organization/v1/users/caregivers" in delete
    assert delete.endswith("-X DELETE -H \"authorization: Bearer $TOKEN\" "
                           "http://emu/organization/v1/users/caregivers/$ID")  # fmt: skip
    assert "serves no entity type 'device'" in by_route["NOTIFICATION device/_create"]
    assert "wildcard" in by_route["NOTIFICATION */_create"]
    pre = by_route["PRE_REQUEST apiId=POST/generic-entity/v1/generic-entities/templates/device_log"]
    assert "-X POST" in pre and pre.endswith(
        "/generic-entity/v1/generic-entities/templates/device_log"
    )
    assert (
        "serves no API 'GET/nowhere/v1/things'"
        in by_route["POST_REQUEST apiId=GET/nowhere/v1/things"]
    )
    adapt = by_route["ADAPT_ENTITY entity=patient order=2"]
    assert adapt.endswith("-X GET -H \"authorization: Bearer $TOKEN\" "
                          "http://emu/organization/v1/users/patients")  # fmt: skip
    nonspecific = by_route["NONSPECIFIC"]
    assert nonspecific.endswith("curl -s -X POST -H 'hooktype: NONSPECIFIC' -d '{}' http://worker/")


def test_only_nonspecific_needs_no_token() -> None:
    lines = list(trigger_commands("http://emu", "http://worker", Router().nonspecific(_noop)))
    assert len(lines) == 1 and "TOKEN" not in lines[0]


def test_publish_and_bench_arguments_are_parsed_without_their_extras() -> None:
    args = build_parser().parse_args(["publish", "--source", "redis://h/0", "--hook", "all"])
    assert (args.command, args.source, args.hook, args.count) == (
        "publish",
        "redis://h/0",
        ["all"],
        1,
    )
    args = build_parser().parse_args(["bench", "--quick", "--scenarios", "a,b"])
    assert (args.quick, args.scenarios) == (True, ("a", "b"))


def test_demo_exercises_the_routes_of_worker_routes() -> None:
    done = worker("demo", "--port", "0", WORKER_ROUTES="tests.other_plugin:build_routes")
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout.splitlines()
    assert out[0].startswith("biot-worker demo: the worker at http://127.0.0.1:")
    described = {line.split(" -> ")[0] for line in out if " -> tests.other_plugin." in line}
    assert described == {route.describe() for route in other_plugin.build_routes()}
    # What each handler did is read from its answer and the emulator's call log.
    assert "changed entities[0]._email: null -> 'hidden'" in done.stdout
    assert "answered 422 SERIAL_NUMBER_REQUIRED" in done.stdout
    assert (
        "called POST /generic-entity/v1/generic-entities/templates/device_log -> 201" in done.stdout
    )


def test_demo_sends_the_nonspecific_route_an_event_too() -> None:
    done = worker("demo", WORKER_ROUTES="tests.fixture_plugin:build_routes")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    at = lines.index("NONSPECIFIC -> tests.fixture_plugin.count_patients")
    assert "200, p50" in lines[at + 1]
    assert 'answered {"patients":3' in lines[at + 1]
    assert "not exercised" not in done.stdout


def test_run_and_config_import_no_tool() -> None:
    code = (
        "import sys\n"
        "from worker.cli import main\n"
        "for argv in (['run'], ['config']):\n"
        "    main(argv)\n"
        "tools = ('worker.testing', 'worker.bench')\n"
        "print('TOOLS', sorted(m for m in sys.modules if m.startswith(tools)))\n"
    )
    assert python(code).splitlines()[-1] == "TOOLS []"


def test_config_hides_a_password_inside_the_base_url() -> None:
    done = worker(
        "config",
        BIOT_BASE_URL="https://svc:pa55w0rd@biot.example.test/api",
        BIOT_SERVICE_USER_ID="svc",
        BIOT_SERVICE_USER_SECRET_KEY="secret",
    )
    assert done.returncode == 0, done.stderr
    assert "pa55w0rd" not in done.stdout
    assert "https://svc:***@biot.example.test/api" in done.stdout


# ---------------------------------------------------------------- package, deploy, subscribe


ADMIN = {"BIOT_USERNAME": "admin@example.com", "BIOT_PASSWORD": "s3cret-Passw0rd!"}


def admin_env(stand_in: StandIn) -> dict[str, str]:
    return {"BIOT_BASE_URL": stand_in.url, **ADMIN}


def assert_one_line(done: subprocess.CompletedProcess[str], status: int, text: str) -> None:
    assert done.returncode == status, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert text in done.stderr


def assert_no_secret(done: subprocess.CompletedProcess[str]) -> None:
    for secret in (ADMIN["BIOT_PASSWORD"], STAND_IN_TOKEN):
        assert secret not in done.stdout and secret not in done.stderr


@pytest.fixture
def biot() -> Iterator[StandIn]:
    with stand_in_thread() as stand_in:
        yield stand_in


@pytest.fixture
def plugin_zip(tmp_path: Path) -> Path:
    path = tmp_path / "plugin.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("index.py", "def handler(event, context):\n    return {}\n")
    return path


def test_deploy_subscribe_package_help_without_extras(base_install: Path) -> None:
    for command in ("package", "deploy", "subscribe", "unsubscribe"):
        done = worker(command, "--help", paths=(base_install,))
        assert done.returncode == 0, done.stderr
        assert "--password" not in done.stdout


def test_deploy_creates_prints_the_endpoint_and_no_secret(
    biot: StandIn, plugin_zip: Path, base_install: Path
) -> None:
    done = worker(
        "deploy", "--name", "my-plugin", "--zip", str(plugin_zip), "--env", "A=1",
        paths=(base_install,), biot=admin_env(biot),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "endpointUrl: https://plugins.example/Plugin-my-plugin"
    (post,) = biot.calls("POST", "/settings/v2/plugins")
    assert post.parts["code"] == plugin_zip.read_bytes()
    config = orjson.loads(post.parts["config"])
    assert config["subscriptions"] == subscriptions_of(fixture_build_routes()).config
    assert config["environmentVariables"] == {"A": "1"}
    assert_no_secret(done)
    biot.requests.clear()
    dry = worker("deploy", "--name", "my-plugin", "--dry-run", biot=admin_env(biot))
    assert dry.returncode == 0, dry.stderr
    assert biot.writes() == []
    assert "  version: 1 -> 2" in dry.stdout and "dry run: nothing was changed" in dry.stdout
    assert_no_secret(dry)


def test_deploy_refuses_an_unknown_api_id_before_creating_anything(
    biot: StandIn, plugin_zip: Path, tmp_path: Path
) -> None:
    (tmp_path / "typo_plugin.py").write_text(
        textwrap.dedent(
            """
            from worker import Router

            async def pre(view, ctx):
                return None

            def build_routes():
                return Router().pre(pre, api_id="PATCH/organization/v1/users/patient/{id}")
            """
        )
    )
    done = worker(
        "deploy", "--name", "p", "--zip", str(plugin_zip), paths=(tmp_path,),
        WORKER_ROUTES="typo_plugin:build_routes", biot=admin_env(biot),
    )  # fmt: skip
    assert_one_line(done, 1, "biot-worker deploy: unknown apiId PATCH/organization/v1/users/")
    assert "closest known: PATCH/organization/v1/users/patients/{id}" in done.stderr
    assert biot.writes() == []


def test_deploy_shows_biot_errors_as_code_and_message(biot: StandIn, plugin_zip: Path) -> None:
    biot.fail[("POST", "/settings/v2/plugins")] = (403, "ACCESS_DENIED", "no permission")
    done = worker("deploy", "--name", "p", "--zip", str(plugin_zip), biot=admin_env(biot))
    assert done.returncode == 1
    assert done.stderr == "biot-worker deploy: BioT answered 403 ACCESS_DENIED: no permission\n"
    wrong = worker(
        "deploy", "--name", "p", "--zip", str(plugin_zip),
        biot={**admin_env(biot), "BIOT_PASSWORD": "wrong"},
    )  # fmt: skip
    assert wrong.returncode == 1
    assert wrong.stderr == (
        "biot-worker deploy: BioT answered 403 LOGIN_FAILED: wrong username or password\n"
    )


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (("deploy", "--name", "p"), {"BIOT_PASSWORD": ""}, "BIOT_PASSWORD not set"),
        (("deploy", "--name", "p"), {"BIOT_BASE_URL": ""}, "BIOT_BASE_URL is not set"),
        (("deploy", "--name", "my plugin"), {}, "--name: 'my plugin' is not a BioT plugin name"),
        (("deploy", "--name", "p", "--timeout", "0"), {}, "--timeout 0: must be from 1 to 900"),
        (("deploy", "--name", "p", "--memory", "64"), {}, "--memory 64: must be from 128"),
        (("deploy", "--name", "p", "--env", "NOVALUE"), {}, "--env 'NOVALUE': expected KEY=VALUE"),
        (("deploy", "--name", "p", "--zip", "/nonexistent.zip"), {}, "--zip /nonexistent.zip"),
        (("subscribe", "--endpoint", "worker:8080"), {}, "--endpoint: must start with http"),
        (("unsubscribe", "--endpoint", "x"), {"BIOT_USERNAME": ""}, "BIOT_USERNAME not set"),
        (("deploy", "--name", "p", "--routes", "nosuch:x"), {}, "no module named 'nosuch'"),
    ],
)
def test_deploy_and_subscribe_usage_errors_are_one_line_exit_2(
    argv: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    base = {"BIOT_BASE_URL": "http://127.0.0.1:9", **ADMIN}
    done = worker(*argv, biot={**base, **env})
    assert_one_line(done, 2, message)
    assert done.stderr.startswith(f"biot-worker {argv[0]}: ")


def test_the_password_is_no_flag() -> None:
    done = worker("deploy", "--name", "p", "--password", "x")
    assert done.returncode == 2 and "unrecognized arguments: --password" in done.stderr


def test_subscribe_twice_then_unsubscribe(biot: StandIn, base_install: Path) -> None:
    endpoint = "https://worker.example/"
    first = worker("subscribe", "--endpoint", endpoint, paths=(base_install,), biot=admin_env(biot))
    assert first.returncode == 0, first.stderr
    assert f"subscribed 5, pruned 0, 0 already in place ({endpoint})" in first.stdout
    biot.requests.clear()
    second = worker("subscribe", "--endpoint", endpoint, "--prune", biot=admin_env(biot))
    assert second.returncode == 0, second.stderr
    assert second.stdout == "nothing to change: 5 subscription(s) already in place\n"
    assert biot.writes() == []
    gone = worker("unsubscribe", "--endpoint", endpoint, biot=admin_env(biot))
    assert gone.returncode == 0, gone.stderr
    assert gone.stdout.splitlines()[-1] == f"removed 5 subscription(s) of {endpoint}"
    assert biot.subscriptions == {"notifications": [], "interceptions": []}
    for done in (first, second, gone):
        assert_no_secret(done)


def test_package_without_a_wheel_names_the_package(tmp_path: Path) -> None:
    empty = tmp_path / "wheels"
    empty.mkdir()
    output = tmp_path / "plugin.zip"
    done = worker(
        "package", "--no-index", "--find-links", str(empty), "--output", str(output),
        "--python-version", "3.12",
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].startswith("biot-worker package: no wheel of ")
    assert not output.exists()


def test_config_says_whether_spans_are_exported_and_hides_otlp_headers() -> None:
    done = worker("config")
    assert done.returncode == 0, done.stderr
    assert "opentelemetry: off (set OTEL_EXPORTER_OTLP_ENDPOINT to export spans)" in done.stdout
    done = worker(
        "config",
        OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:pw0rd@127.0.0.1:4318",
        OTEL_EXPORTER_OTLP_HEADERS="api-key=k3y-never-printed",
    )
    assert done.returncode == 0, done.stderr
    assert "opentelemetry: spans exported over OTLP/HTTP" in done.stdout
    assert "  OTEL_EXPORTER_OTLP_HEADERS   (set, hidden)" in done.stdout
    assert "  OTEL_EXPORTER_OTLP_ENDPOINT  http://collector:***@127.0.0.1:4318" in done.stdout
    assert "k3y-never-printed" not in done.stdout and "pw0rd" not in done.stdout
    done = worker("config", OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4318",
                  OTEL_SDK_DISABLED="true")  # fmt: skip
    assert "opentelemetry: off (OTEL_SDK_DISABLED=true)" in done.stdout
