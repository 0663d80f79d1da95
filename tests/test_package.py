"""``build_package``: the Lambda ZIP, offline.

pip installs from a wheelhouse repacked from this venv (:mod:`tests.wheelhouse`), for the
running CPython 3.11; this machine's wheels may need a newer glibc than Lambda's python3.11
(Amazon Linux 2, glibc 2.26), so their platform tags are allowed through ``pip_options``. The
plugins packed are copies of the project's test plugins under names of their own, in a
temporary project folder that is the working directory of the build (as for the CLI). The ZIP
is unpacked into an empty folder and run by the base interpreter with ``-I`` and only what a
Lambda has in its environment, ``index`` imported from that folder as Lambda's bootstrap does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests import fixture_plugin
from tests.other_plugin import CREATE_GENERIC_ENTITY
from tests.wheelhouse import build_wheelhouse, platform_tags
from worker.adapters import lambda_
from worker.deploy import lambda_index, package
from worker.deploy.package import PackageError, PackageResult, build_package
from worker.testing.events import (
    INTERCEPTION_SCOPE,
    TRACE_ID,
    KeyPair,
    headers_for,
    interceptor_body,
    make_key_pair,
)

TESTS = Path(__file__).resolve().parent
VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
FIXTURE = "packed_fixture_plugin"
OTHER = "packed_other_plugin"
PIP_TIMEOUT = 120.0
RUN_TIMEOUT = 60.0
# The interpreter under this venv: sys.executable would bring the venv's site-packages along.
BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)
# Lambda's bootstrap puts the function's folder first on the path; a bare -I interpreter
# does not, so the probe does. It answers each event, then names every module it loaded from
# outside that folder and the standard library (there must be none).
PROBE = """
import json, os, sys, sysconfig
here = os.getcwd()
sys.path.insert(0, here)
import index
answers = [index.handler(event, None) for event in json.loads(sys.stdin.read())]
import aiohttp, cryptography.hazmat.bindings._rust, jwt, orjson, yarl
paths = sysconfig.get_paths()
stdlib = (paths["stdlib"], paths["platstdlib"])
files = {getattr(module, "__file__", None) or "" for module in list(sys.modules.values())}
outside = sorted(f for f in files if f and not f.startswith((here, *stdlib)))
print(json.dumps({"answers": answers, "outside": outside}))
"""


@dataclass(frozen=True)
class Project:
    """A plugin team's folder: the build's working directory, holding the plugins."""

    root: Path
    pip_options: list[str]

    def build(self, output: Path, routes: str, **options: Any) -> PackageResult:
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(self.root)
            patch.setattr(package, "PIP_TIMEOUT", PIP_TIMEOUT)
            return build_package(
                output=output,
                python_version=VERSION,
                routes=routes,
                pip_options=options.pop("pip_options", self.pip_options),
                **options,
            )


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return build_wheelhouse(tmp_path_factory.mktemp("wheelhouse"))


@pytest.fixture(scope="session")
def project(tmp_path_factory: pytest.TempPathFactory, wheelhouse: list[Path]) -> Project:
    root = tmp_path_factory.mktemp("project")
    shutil.copy(TESTS / "fixture_plugin.py", root / f"{FIXTURE}.py")
    other = root / OTHER
    shutil.copytree(TESTS / "other_plugin", other, ignore=shutil.ignore_patterns("__pycache__"))
    # What a plugin's folder also holds, none of which belongs in the ZIP.
    for test_file in ("tests/helpers.py", "test_routes.py", "hooks_test.py", "conftest.py"):
        (other / test_file).parent.mkdir(exist_ok=True)
        (other / test_file).write_text("raise AssertionError('a test was packed')\n")
    (other / "__pycache__").mkdir()
    (other / "__pycache__" / "hooks.cpython-311.pyc").write_bytes(b"not byte code")
    (other / ".notes").write_text("hidden\n")
    (other / "data.json").write_text('{"kept": true}\n')
    allowed = sorted(
        platform_tags(wheelhouse) - {"any"} - set(package.platforms(sys.version_info.minor))
    )
    options = ["--no-index", "--find-links", str(wheelhouse[0].parent)]
    return Project(root, options + [f"--platform={tag}" for tag in allowed])


@pytest.fixture(scope="session")
def built(project: Project, tmp_path_factory: pytest.TempPathFactory) -> PackageResult:
    return project.build(tmp_path_factory.mktemp("dist") / "plugin.zip", f"{FIXTURE}:build_routes")


@pytest.fixture(scope="session")
def keys() -> KeyPair:
    return make_key_pair()


@pytest.fixture
def unpacked(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "task"
    folder.mkdir()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def names(result: PackageResult) -> list[str]:
    with zipfile.ZipFile(result.path) as zf:
        return zf.namelist()


def pre_event(keys: KeyPair, *, first: str = "Ada", api_id: str | None = None) -> dict[str, Any]:
    """A signed Function URL event of a PRE interception of ``api_id`` (a patient's PATCH)."""
    token = keys.sign(scopes=[INTERCEPTION_SCOPE])
    options = {"api_id": api_id} if api_id else {}
    body = interceptor_body(
        "INTERCEPTOR_PRE", request_body={"_name": {"firstName": first}}, **options
    )
    return {
        "version": "2.0",
        "headers": headers_for("INTERCEPTOR_PRE", token),
        "body": orjson.dumps(body).decode(),
        "isBase64Encoded": False,
    }


def run_in_lambda_folder(
    result: PackageResult, folder: Path, keys: KeyPair, events: list[dict[str, Any]]
) -> dict[str, Any]:
    """Unpack ``result`` into ``folder`` and answer ``events`` there with a bare interpreter."""
    with zipfile.ZipFile(result.path) as zf:
        zf.extractall(folder)
    env = {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "TZ": "UTC",
        "AWS_LAMBDA_FUNCTION_NAME": "packed",
        "BIOT_BASE_URL": "http://127.0.0.1:9",  # nothing listens: no handler here calls BioT
        "BIOT_SERVICE_USER_ID": "service-user",
        "BIOT_SERVICE_USER_SECRET_KEY": "service-secret",
        "BIOT_PUBLIC_KEY": keys.public_b64,
        "BIOT_APP_NAME": "packed-plugin",
        "BIOT_SERVICE_ENVIRONMENT": "test",
        "WORKER_LOG_LEVEL": "WARNING",
    }
    done = subprocess.run(  # noqa: S603 - the base interpreter running our probe
        [BASE_PYTHON, "-I", "-c", PROBE],
        input=orjson.dumps(events),
        capture_output=True,
        cwd=folder,
        env=env,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    output: dict[str, Any] = orjson.loads(done.stdout.splitlines()[-1])
    return output


def test_the_zip_answers_signed_events_with_nothing_but_its_folder(
    built: PackageResult, unpacked: Path, keys: KeyPair
) -> None:
    forged = pre_event(make_key_pair())
    ran = run_in_lambda_folder(
        built, unpacked, keys, [pre_event(keys), pre_event(keys, first="FORBIDDEN"), forged]
    )
    assert ran["outside"] == []
    rewritten, blocked, refused = ran["answers"]
    assert rewritten["statusCode"] == 200
    assert TRACE_ID in rewritten["headers"]["traceparent"]
    request = orjson.loads(rewritten["body"])["request"]
    assert request["body"]["_name"]["firstName"] == "Ada" + fixture_plugin.PRE_MARK
    assert blocked["statusCode"] == 403
    assert orjson.loads(blocked["body"])["code"] == "MODIFICATION_FORBIDDEN"
    assert refused["statusCode"] == 400
    assert orjson.loads(refused["body"])["code"] == "JWT_ERROR"


def test_the_zip_holds_the_runtime_and_nothing_else(built: PackageResult) -> None:
    listed = names(built)
    files = [name for name in listed if not name.endswith("/")]
    assert built.files == len(files)
    assert {"index.py", f"{FIXTURE}.py", "worker/__init__.py", "worker/adapters/lambda_.py"} <= set(
        files
    )
    assert {"config/settings.py", "aiohttp/__init__.py", "jwt/__init__.py"} <= set(files)
    assert any(name.startswith("cryptography/") and name.endswith(".so") for name in files)
    assert any(name.startswith("orjson/") and name.endswith(".so") for name in files)
    tools = (
        "worker/testing/",
        "worker/bench/",
        "worker/deploy/",
        "worker/cli.py",
        "worker/__main__",
    )
    assert [name for name in listed if name.startswith(tools)] == []
    unwanted = ("__pycache__", ".dist-info", ".egg-info", ".pyc")
    assert [name for name in listed if any(part in name for part in unwanted)] == []
    assert [name for name in listed if name.startswith(("bin/", "tests/", "handlers/"))] == []
    assert [name.rstrip("/") for name in listed] == sorted(name.rstrip("/") for name in listed)


def test_entries_have_fixed_times_and_modes(built: PackageResult) -> None:
    with zipfile.ZipFile(built.path) as zf:
        infos = zf.infolist()
    assert {info.date_time for info in infos} == {(1980, 1, 1, 0, 0, 0)}
    modes = {info.filename: info.external_attr >> 16 for info in infos}
    assert {mode for name, mode in modes.items() if name.endswith("/")} == {0o40755}
    assert {mode for name, mode in modes.items() if not name.endswith("/")} <= {
        0o100644,
        0o100755,
    }
    assert modes["index.py"] == 0o100644


def test_index_py_is_lambda_index_serving_the_packed_routes(built: PackageResult) -> None:
    with zipfile.ZipFile(built.path) as zf:
        index = zf.read("index.py").decode()
    source = Path(lambda_index.__file__).read_text()
    assert index == source.replace(
        f'ROUTES = "{lambda_index.ROUTES}"', f'ROUTES = "{FIXTURE}:build_routes"'
    )
    assert index != source


@pytest.mark.parametrize(("set_to", "served"), [(None, "a:b"), ("", "a:b"), ("c:d", "c:d")])
def test_the_environment_s_worker_routes_wins(
    monkeypatch: pytest.MonkeyPatch, set_to: str | None, served: str
) -> None:
    seen: list[tuple[object, object]] = []

    def handler(event: object, context: object) -> dict[str, Any]:
        seen.append((event, context))
        return {"statusCode": 200}

    monkeypatch.setattr(lambda_index, "ROUTES", "a:b")
    monkeypatch.setattr(lambda_, "handler", handler)
    monkeypatch.setenv("WORKER_ROUTES", "restored after the test")
    if set_to is None:
        monkeypatch.delenv("WORKER_ROUTES")
    else:
        monkeypatch.setenv("WORKER_ROUTES", set_to)
    assert lambda_index.handler("event", "context") == {"statusCode": 200}
    assert os.environ["WORKER_ROUTES"] == served
    assert seen == [("event", "context")]


def test_two_builds_give_the_same_bytes_and_source_date_epoch_moves_the_times(
    project: Project, built: PackageResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    again = project.build(tmp_path / "again.zip", f"{FIXTURE}:build_routes")
    assert again.path.read_bytes() == built.path.read_bytes()
    assert (again.sha256, again.size, again.files) == (built.sha256, built.size, built.files)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")  # 2023-11-14 22:13:20 UTC
    dated = project.build(tmp_path / "dated.zip", f"{FIXTURE}:build_routes")
    with zipfile.ZipFile(dated.path) as zf:
        assert {info.date_time for info in zf.infolist()} == {(2023, 11, 14, 22, 13, 20)}
    assert dated.sha256 != built.sha256 and dated.files == built.files


def test_another_plugin_package_is_packed_without_its_tests(
    project: Project, tmp_path: Path, unpacked: Path, keys: KeyPair
) -> None:
    reports: list[str] = []
    result = project.build(tmp_path / "other.zip", f"{OTHER}:build_routes", report=reports.append)
    listed = names(result)
    plugin = sorted(name for name in listed if name.startswith(f"{OTHER}/"))
    assert plugin == [
        f"{OTHER}/",
        f"{OTHER}/__init__.py",
        f"{OTHER}/data.json",
        f"{OTHER}/hooks.py",
    ]
    assert f"{FIXTURE}.py" not in listed
    assert any(line.startswith("pip: installed ") and "aiohttp-" in line for line in reports)
    ran = run_in_lambda_folder(
        result,
        unpacked,
        keys,
        [pre_event(keys, api_id=CREATE_GENERIC_ENTITY), pre_event(keys)],
    )
    refused, unrouted = ran["answers"]
    assert refused["statusCode"] == 422
    assert orjson.loads(refused["body"])["code"] == "SERIAL_NUMBER_REQUIRED"
    assert unrouted["statusCode"] == 200  # the fixture plugin's PRE is not in this ZIP
    assert orjson.loads(unrouted["body"])["request"]["body"]["_name"]["firstName"] == "Ada"


def test_a_dependency_without_a_wheel_is_named(
    project: Project, wheelhouse: list[Path], tmp_path: Path
) -> None:
    partial = tmp_path / "wheels"
    partial.mkdir()
    for wheel in wheelhouse:
        if not wheel.name.startswith("orjson-"):
            shutil.copy(wheel, partial)
    options = [*project.pip_options[3:], "--no-index", "--find-links", str(partial)]
    output = tmp_path / "plugin.zip"
    with pytest.raises(PackageError) as caught:
        project.build(output, f"{FIXTURE}:build_routes", pip_options=options)
    message = str(caught.value)
    assert message == f"no wheel of orjson for {package.platform_text(sys.version_info.minor)}"
    assert "orjson" in caught.value.output
    assert not output.exists()
    assert list(tmp_path.glob(".plugin.zip*")) == []


@pytest.mark.parametrize(
    ("python_version", "routes", "message"),
    [
        ("3.10", f"{FIXTURE}:build_routes", "--python-version 3.10: biot-worker needs 3.11+"),
        ("3", f"{FIXTURE}:build_routes", "--python-version '3': expected 3.X, e.g. 3.12"),
        (VERSION, FIXTURE, f"WORKER_ROUTES='{FIXTURE}': expected module:function"),
        (VERSION, "no_such_plugin:build", "no package or module named 'no_such_plugin' here"),
        (VERSION, f"{OTHER}.missing:build", f"has no module '{OTHER}.missing'"),
        (VERSION, "worker.routing:build", "the plugin cannot be named 'worker'"),
    ],
)
def test_bad_arguments_are_one_line_before_pip_runs(
    project: Project,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    python_version: str,
    routes: str,
    message: str,
) -> None:
    monkeypatch.chdir(project.root)
    monkeypatch.setattr(package, "install_dependencies", _no_pip)
    with pytest.raises(PackageError) as caught:
        build_package(output=tmp_path / "p.zip", python_version=python_version, routes=routes)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "p.zip").exists()


def _no_pip(*args: object) -> str:
    raise AssertionError("pip ran")


def test_a_bad_source_date_epoch_is_refused(
    project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(PackageError, match="SOURCE_DATE_EPOCH='yesterday'"):
        project.build(tmp_path / "p.zip", f"{FIXTURE}:build_routes")


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (
            "ERROR: Could not find a version that satisfies the requirement "
            "PyJWT[crypto]>=2.10 (from versions: none)\n"
            "ERROR: No matching distribution found for PyJWT[crypto]>=2.10\n",
            "no wheel of PyJWT for CPython 3.12 on Linux x86_64 (glibc 2.34)",
        ),
        (
            "Looking in links: /w\nERROR: Cannot install a and b because these package versions "
            "have conflicting dependencies.\nERROR: ResolutionImpossible: ...\n",
            "pip failed: Cannot install a and b because these package versions have conflicting "
            "dependencies.",
        ),
        ("\n  Traceback: boom\n", "pip failed: Traceback: boom"),
    ],
)
def test_pip_failures_read_as_one_line(output: str, message: str) -> None:
    error = package.pip_failure(output, 12)
    assert str(error) == message
    assert error.output == output


def test_the_target_s_glibc_follows_lambda_s_runtime() -> None:
    assert package.platforms(11)[0] == "manylinux_2_26_x86_64"
    assert package.platforms(12)[0] == "manylinux_2_34_x86_64"
    assert "manylinux2014_x86_64" in package.platforms(13)
    assert "manylinux_2_28_x86_64" not in package.platforms(11)
