"""End to end (issue 10 point 6): from a plugin's code to a plugin running on BioT in a box, and
to a self-hosted worker subscribed from its routes. Offline and on loopback only.

The plugin is a copy of the project's test plugin (:mod:`tests.fixture_plugin`, never the
example ``handlers``) as a top-level module of a plugin team's temporary folder, plus a
``build_changed_routes`` variant: the ``_create`` notification and ADAPT_ENTITY dropped, POST
moved to order 2. It is packed by ``build_package`` from a wheelhouse repacked from this venv
(:mod:`tests.wheelhouse`) for the running Python, which the emulator's own
:class:`~worker.testing.emulator.lambda_host.LambdaHost` then runs.

- BioT-managed: ``biot-worker deploy --zip`` (a real CLI process) creates the plugin; a user's
  PATCH with a ``traceparent`` runs the deployed zip's PRE, ADAPT_ENTITY and POST handlers and its
  notification handler, and every hop (the user's call, each call to the function, the function's
  own calls back and its log lines) carries the one trace id; a dry run of the variant changes
  nothing; ``deploy`` (the function the CLI calls, packaging the variant itself) brings version 2,
  and the dispatcher's subscriptions of the plugin's ``endpointUrl`` are exactly the variant's.
- Self-hosted: a real ``biot-worker run`` and the ``subscribe``/``unsubscribe`` CLI processes.
"""

from __future__ import annotations

import asyncio
import importlib
import io
import re
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests import fixture_plugin
from tests.e2e_deploy_helpers import Done, cli, running_worker
from tests.fixture_plugin import ADAPT_MARK, HANDLED, PATIENTS, POST_MARK, PRE_MARK
from tests.wheelhouse import build_wheelhouse, platform_tags
from worker.client import PUBLIC_KEY_PATH
from worker.deploy import package
from worker.deploy.admin import BiotAdmin, Credentials, open_admin
from worker.deploy.deploy import DeployOptions, built_package, deploy
from worker.deploy.package import build_package, platforms
from worker.deploy.subscriptions import self_hosted_requests, subscriptions_of
from worker.routing import Router
from worker.testing.emulator import Emulator, EmulatorConfig, EmulatorServer
from worker.testing.emulator.entities import PATIENT
from worker.testing.emulator.lambda_host import LambdaHost
from worker.testing.events import TRACE_ID, TRACEPARENT

PLUGIN = "e2e_deploy_plugin"
ROUTES = f"{PLUGIN}:build_routes"
CHANGED = f"{PLUGIN}:build_changed_routes"
NAME = "e2e-plugin"
USERNAME = "deployer@e2e.example"
PASSWORD = "e2e-Adm1n-passw0rd"  # the emulator's admin user in these tests
VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
RUNTIME = f"python{VERSION}"
JWT = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+")
WAIT = 60.0
TEST_TIMEOUT = 240.0  # a whole test (each wait in it is bounded too)
OTHER_TRACE = "0af7651916cd43dd8448eb211c80319c"
OTHER_TRACEPARENT = f"00-{OTHER_TRACE}-b7ad6b7169203331-01"
VARIANT = '''

def build_changed_routes() -> Router:
    """build_routes after a change: no _create notification, no ADAPT_ENTITY, POST at order 2."""
    router = Router()
    router.notification(on_patient, entity="patient", action="_update")
    router.pre(pre_patient, api_id=PATCH_PATIENT, order=1)
    router.post(post_patient, api_id=PATCH_PATIENT, order=2)
    router.nonspecific(count_patients)
    return router
'''


@dataclass(frozen=True)
class Project:
    """The plugin team's folder, its routes, the pip options of an offline build, and the ZIP
    of ``build_routes``."""

    root: Path
    pip_options: list[str]
    zip: Path
    routes: Router
    changed: Router


@pytest.fixture(scope="module")
def project() -> Iterator[Project]:
    with (
        tempfile.TemporaryDirectory(prefix="biot-e2e-deploy-") as tmp,
        pytest.MonkeyPatch.context() as patch,
    ):
        root = Path(tmp) / "plugin-team"
        root.mkdir()
        source = Path(fixture_plugin.__file__).read_text() + VARIANT
        (root / f"{PLUGIN}.py").write_text(source)
        wheels = build_wheelhouse(Path(tmp) / "wheels")
        # This venv's wheels are built for this machine's glibc, which runs the function here.
        allowed = platform_tags(wheels) - {"any"} - set(platforms(sys.version_info.minor))
        options = ["--no-index", "--find-links", str(wheels[0].parent)]
        options += [f"--platform={tag}" for tag in sorted(allowed)]
        patch.setattr(package, "PIP_TIMEOUT", WAIT)
        patch.syspath_prepend(str(root))
        try:
            module = importlib.import_module(PLUGIN)
            built = build_package(
                output=Path(tmp) / "dist" / "plugin.zip",
                python_version=VERSION,
                routes=ROUTES,
                pip_options=options,
            )
            yield Project(
                root, options, built.path, module.build_routes(), module.build_changed_routes()
            )
        finally:
            sys.modules.pop(PLUGIN, None)


@dataclass
class Box:
    """The emulator with its real Lambda host, the admin user's credentials, a client, and the
    lines its functions logged."""

    emulator: Emulator
    url: str
    http: aiohttp.ClientSession
    project: Project
    lines: list[tuple[str, str]] = field(default_factory=list)
    _more: asyncio.Event = field(default_factory=asyncio.Event)

    def log(self, name: str, line: str) -> None:
        self.lines.append((name, line))
        self._more.set()

    def function_log(self) -> list[dict[str, Any]]:
        """The plugin's log lines so far, each one a JSON object."""
        return [orjson.loads(line) for name, line in self.lines if name == NAME]

    async def logged(self, message: str, hook: str) -> None:
        """Wait (bounded) until the plugin has logged ``message`` for an event of ``hook``."""
        async with asyncio.timeout(WAIT):
            while not any(
                r["message"] == message and r.get("hook") == hook for r in self.function_log()
            ):
                self._more.clear()
                await self._more.wait()

    @property
    def credentials(self) -> Credentials:
        return Credentials(base_url=self.url, username=USERNAME, password=PASSWORD)

    async def cli(self, *argv: str, routes: str = ROUTES) -> Done:
        """The real ``biot-worker`` in the plugin team's folder, logged in as the admin user."""
        env = {
            "BIOT_BASE_URL": self.url,
            "BIOT_USERNAME": USERNAME,
            "BIOT_PASSWORD": PASSWORD,
            "WORKER_ROUTES": routes,
        }
        done = await cli(*argv, cwd=self.project.root, env=env)
        assert PASSWORD not in done.output
        assert not JWT.search(done.output)
        return done

    async def patch(self, first: str, traceparent: str = TRACEPARENT) -> dict[str, Any]:
        """A user's PATCH of the first patient's first name; the patient as answered."""
        patient_id = self.emulator.store.all(PATIENT)[0]["_id"]
        headers = {
            "authorization": f"Bearer {self.emulator.user_token()}",
            "traceparent": traceparent,
        }
        body = {"_name": {"firstName": first, "lastName": "Lovelace"}}
        async with self.http.patch(
            f"{self.url}{PATIENTS}/{patient_id}", json=body, headers=headers
        ) as response:
            assert response.status == 200, await response.text()
            answer: dict[str, Any] = await response.json()
        await self.emulator.drain_notifications()
        return answer

    def hooks_sent(self, trace_id: str) -> list[tuple[str | None, str]]:
        """The calls the emulator made to plugins for ``trace_id``: (hook, URL)."""
        records = self.emulator.calls.records(trace_id=trace_id, direction="out")
        assert all(r.status == 200 for r in records), records
        return [(r.hook, r.path) for r in records]


@pytest.fixture
async def box(project: Project) -> AsyncIterator[Box]:
    config = EmulatorConfig(
        admin_username=USERNAME,
        admin_password=PASSWORD,
        plugin_timeout=WAIT / 2,
        notification_grace=WAIT / 2,
    )
    holder: list[Box] = []
    host = LambdaHost(
        base_url=lambda: holder[0].url, log=lambda n, t: holder[0].log(n, t), init_timeout=WAIT
    )
    emulator = Emulator(config, function_host=host)
    async with (
        host,
        EmulatorServer(emulator) as server,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as http,
    ):
        holder.append(Box(emulator, server.url, http, project))
        yield holder[0]


async def dispatcher_state(admin: BiotAdmin, endpoint: str) -> list[tuple[str, dict[str, Any]]]:
    """The dispatcher's subscriptions of ``endpoint``, in the shape of the subscribe bodies."""
    keys = {
        "notifications": ("entityTypeName", "actionName", "templateName", "endpoint"),
        "interceptions": ("type", "apiId", "entityName", "endpoint", "executionOrder"),
    }
    held = [
        (kind, {key: item[key] for key in keys[kind] if item.get(key) is not None})
        for kind in ("notifications", "interceptions")
        for item in await admin.subscriptions(kind, endpoint)
    ]
    return sorted(held, key=orjson.dumps)


def wanted_state(routes: Router, endpoint: str) -> list[tuple[str, dict[str, Any]]]:
    return sorted(self_hosted_requests(routes, endpoint), key=orjson.dumps)


async def no_code(runtime: str) -> bytes:
    raise AssertionError("a dry run asked for the code")


# ---------------------------------------------------------------- BioT-managed


async def test_package_deploy_run_and_redeploy_on_the_emulator(box: Box) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        project = box.project
        endpoint = f"{box.url}/_lambda/{NAME}/"
        done = await box.cli(
            "deploy",
            "--name",
            NAME,
            "--zip",
            str(project.zip),
            "--runtime",
            RUNTIME,
            "--timeout",
            "30",
        )
        assert done.code == 0, done.output
        assert f"created plugin {NAME} (version 1)" in done.stdout
        assert done.stdout.rstrip().endswith(f"endpointUrl: {endpoint}")

        async with open_admin(box.credentials) as admin:
            deployed = await admin.get_plugin(NAME)
            assert deployed is not None and deployed["version"] == 1
            assert deployed["subscriptions"] == subscriptions_of(project.routes).config
            assert await dispatcher_state(admin, endpoint) == wanted_state(project.routes, endpoint)

            # A direct call to the Function URL (NONSPECIFIC) pays the cold start, whose warm-up
            # calls (public key, service login) belong to no event.
            headers = {"traceparent": OTHER_TRACEPARENT}
            async with box.http.post(endpoint, json={}, headers=headers) as response:
                assert response.status == 200, await response.text()
                assert await response.json() == {"patients": 3, "traceId": OTHER_TRACE}
            await box.logged("event handled", "NONSPECIFIC")  # its log is in: none comes later

            # A user's PATCH: the deployed zip's handlers run, each hop under the user's trace id.
            box.emulator.calls.clear()
            box.lines.clear()
            answer = await box.patch("Ada")
            assert answer["_name"]["firstName"] == "Ada" + PRE_MARK + ADAPT_MARK + POST_MARK
            assert box.hooks_sent(TRACE_ID) == [
                ("INTERCEPTOR_PRE", endpoint),
                ("INTERCEPTOR_POST_ENTITY", endpoint),
                ("INTERCEPTOR_POST", endpoint),
                ("NOTIFICATION", endpoint),
            ]
            callbacks = box.emulator.calls.records(trace_id=TRACE_ID, direction="in")
            assert [(r.method, r.token) for r in callbacks if r.path == PATIENTS] == [
                ("GET", "service")
            ]
            records = box.emulator.calls.records()
            # The key fetch fills a cache that serves every event: it carries no event's trace
            # (worker.client's contract), and happens once, on the first signed event.
            shared = [r for r in records if r.path == PUBLIC_KEY_PATH]
            assert len(shared) == 1 and shared[0].token == "none"
            assert {r.trace_id for r in records if r not in shared} == {TRACE_ID}, records
            await box.logged("event handled", "NOTIFICATION")
            function_log = box.function_log()
            assert {r["traceId"] for r in function_log} == {TRACE_ID}
            assert [r["hook"] for r in function_log if r["message"] == "event handled"] == [
                "INTERCEPTOR_PRE",
                "INTERCEPTOR_POST_ENTITY",
                "INTERCEPTOR_POST",
                "NOTIFICATION",
            ]
            [handled] = [r for r in function_log if r["message"] == HANDLED]
            assert (handled["action"], handled["total"]) == ("_update", 3)
            assert not any(JWT.search(line) or PASSWORD in line for _, line in box.lines)

            # A dry run of the changed routes changes nothing.
            out = io.StringIO()
            dry = DeployOptions(name=NAME, runtime=RUNTIME, dry_run=True)
            assert (
                await deploy(admin, project.changed, dry, no_code, out=out, warn=_no_warning)
                is None
            )
            assert "dry run: nothing was changed" in out.getvalue()
            assert "  - interception ADAPT_ENTITY entityTypeName=patient order=1" in out.getvalue()
            assert await admin.get_plugin(NAME) == deployed
            assert await dispatcher_state(admin, endpoint) == wanted_state(project.routes, endpoint)

            # Deploy the changed routes (packaged by deploy itself): version 2, the subscriptions
            # follow exactly, and the new code runs.
            reports: list[str] = []
            code = built_package(CHANGED, reports.append, project.pip_options)
            options = DeployOptions(name=NAME, runtime=RUNTIME)
            out = io.StringIO()
            updated = await deploy(admin, project.changed, options, code, out=out, warn=_no_warning)
            assert updated is not None and updated["version"] == 2
            assert f"endpointUrl: {endpoint}" in out.getvalue()
            assert any(line.startswith("package: ") for line in reports)
            assert updated["subscriptions"] == subscriptions_of(project.changed).config
            assert await dispatcher_state(admin, endpoint) == wanted_state(
                project.changed, endpoint
            )
            assert len(await dispatcher_state(admin, endpoint)) == 3

        answer = await box.patch("Grace", OTHER_TRACEPARENT)
        assert answer["_name"]["firstName"] == "Grace" + PRE_MARK + POST_MARK
        assert [hook for hook, _ in box.hooks_sent(OTHER_TRACE)] == [
            "INTERCEPTOR_PRE",
            "INTERCEPTOR_POST",
            "NOTIFICATION",
        ]


def _no_warning(line: str) -> None:
    raise AssertionError(f"unexpected warning: {line}")


# ---------------------------------------------------------------- self-hosted


async def test_subscribe_a_running_worker_prune_and_unsubscribe(box: Box) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        project = box.project
        env = {
            "BIOT_BASE_URL": box.url,
            "BIOT_SERVICE_USER_ID": box.emulator.service_user_id,
            "BIOT_SERVICE_USER_SECRET_KEY": box.emulator.service_user_secret,
            "BIOT_APP_NAME": "e2e-self-hosted",
            "WORKER_ROUTES": ROUTES,
            "WORKER_PORT": "0",
        }
        async with (
            running_worker(project.root, env) as worker,
            open_admin(box.credentials) as admin,
        ):
            endpoint = worker.url
            done = await box.cli("subscribe", "--endpoint", endpoint)
            assert done.code == 0, done.output
            assert f"subscribed 5, pruned 0, 0 already in place ({endpoint})" in done.stdout
            assert await dispatcher_state(admin, endpoint) == wanted_state(project.routes, endpoint)

            answer = await box.patch("Ada")
            assert answer["_name"]["firstName"] == "Ada" + PRE_MARK + ADAPT_MARK + POST_MARK
            assert box.hooks_sent(TRACE_ID) == [
                ("INTERCEPTOR_PRE", endpoint),
                ("INTERCEPTOR_POST_ENTITY", endpoint),
                ("INTERCEPTOR_POST", endpoint),
                ("NOTIFICATION", endpoint),
            ]
            callbacks = box.emulator.calls.records(trace_id=TRACE_ID, direction="in")
            assert [(r.method, r.token) for r in callbacks if r.path == PATIENTS] == [
                ("GET", "service")
            ]

            # The routes change: --prune makes the endpoint's subscriptions exactly the new ones.
            done = await box.cli("subscribe", "--endpoint", endpoint, "--prune", routes=CHANGED)
            assert done.code == 0, done.output
            assert f"subscribed 1, pruned 2, 2 already in place ({endpoint})" in done.stdout
            assert await dispatcher_state(admin, endpoint) == wanted_state(
                project.changed, endpoint
            )
            done = await box.cli("subscribe", "--endpoint", endpoint, "--prune", routes=CHANGED)
            assert done.code == 0, done.output
            assert done.stdout == "nothing to change: 3 subscription(s) already in place\n"
            answer = await box.patch("Grace", OTHER_TRACEPARENT)
            assert answer["_name"]["firstName"] == "Grace" + PRE_MARK + POST_MARK

            done = await box.cli("unsubscribe", "--endpoint", endpoint)
            assert done.code == 0, done.output
            assert f"removed 3 subscription(s) of {endpoint}" in done.stdout
            assert await dispatcher_state(admin, endpoint) == []
            box.emulator.calls.clear()
            answer = await box.patch("Alan", OTHER_TRACEPARENT)
            assert answer["_name"]["firstName"] == "Alan"
            assert box.hooks_sent(OTHER_TRACE) == []

        assert worker.process.returncode == 0
        # The worker's log: the first PATCH's events and its handler's line under its trace id,
        # the second's under the second's, and no secret.
        events = [r for r in worker.records() if r["message"] == "event handled"]
        assert [(r["hook"], r["traceId"]) for r in events] == [
            ("INTERCEPTOR_PRE", TRACE_ID),
            ("INTERCEPTOR_POST_ENTITY", TRACE_ID),
            ("INTERCEPTOR_POST", TRACE_ID),
            ("NOTIFICATION", TRACE_ID),
            ("INTERCEPTOR_PRE", OTHER_TRACE),
            ("INTERCEPTOR_POST", OTHER_TRACE),
            ("NOTIFICATION", OTHER_TRACE),
        ]
        handled = [r["traceId"] for r in worker.records() if r["message"] == HANDLED]
        assert handled == [TRACE_ID, OTHER_TRACE]
        output = b"".join(worker.lines).decode() + worker.stderr.decode()
        assert box.emulator.service_user_secret not in output and not JWT.search(output)
