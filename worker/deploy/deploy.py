"""``biot-worker deploy``: create or update a BioT-managed plugin from the code.

The order, so that nothing changes unless everything checks out:

1. the plugin's subscriptions come from its routes (:func:`~worker.deploy.subscriptions.
   subscriptions_of`); a route BioT cannot express is a warning;
2. every ``apiId`` and entity type is checked against ``GET /settings/v1/interceptions``; an
   unknown one stops the command with one line each, naming the closest known names
   (:class:`DeployError`), before anything is created;
3. ``GET /settings/v2/plugins/{name}`` tells create (404) from update;
4. the code: ``--zip``, or a package built for the runtime's Python
   (:func:`worker.deploy.package.build_package`, in a temporary folder);
5. create: ``POST /settings/v2/plugins`` multipart ``code`` + ``config`` (version 1, ZIP,
   ENABLED, ``index.handler``). Update: ``PATCH /settings/v2/plugins/{name}``, BioT's partial
   update, multipart too: new ``code`` with ``version`` one above the deployed one (BioT refuses
   new code without a larger version), the full ``subscriptions`` (lists replace what is
   there), and only the fields the command changes (``environmentVariables`` only with
   ``--env``, which replaces the whole custom set; ``timeout``/``memorySize`` only when given);
6. the plugin's ``endpointUrl``.

Each step's difference from what is deployed is printed as one line per field (subscriptions
added and removed, environment keys added, removed or changed: never their values, version).
``--dry-run`` stops after printing the configuration and those lines: no POST, PATCH or DELETE.
"""

from __future__ import annotations

import asyncio
import difflib
import io
import re
import tempfile
import zipfile
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TextIO

import orjson

from worker.deploy.admin import BiotAdmin, Credentials, open_admin
from worker.deploy.subscriptions import ADAPT_ENTITY, subscriptions_of
from worker.routing import Router

DEFAULT_RUNTIME: Final = "python3.12"
HANDLER: Final = "index.handler"
#: BioT's spec declares 60 s (its prose says 3) and 128 MB; a new plugin gets these unless
#: ``--timeout``/``--memory`` say otherwise; an update keeps what is deployed.
DEFAULT_TIMEOUT: Final = 60
DEFAULT_MEMORY: Final = 128
MAX_VERSION: Final = 32767
NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{1,57}")
PYTHON_RUNTIME: Final = re.compile(r"python(3\.\d+)")
#: An extension module built for one CPython (``.abi3.so`` ones run on any later one).
_EXTENSION_TAG: Final = re.compile(r"\.cpython-3(\d+)-[^/]*\.so\Z")
#: Keys BioT manages itself in a plugin's environment: left out of the difference.
SYSTEM_PREFIXES: Final = ("BIOT_", "AWS_")
HIDDEN: Final = "***"

CodeSource = Callable[[str], Awaitable[bytes]]
"""Gives the plugin's zip for a runtime (``python3.12``); called only when code is sent."""
Warn = Callable[[str], None]


class DeployError(Exception):
    """The deployment is refused before anything changed; one line per problem."""

    def __init__(self, lines: Iterable[str]) -> None:
        self.lines = list(lines)
        super().__init__("; ".join(self.lines))


@dataclass(frozen=True, slots=True)
class DeployOptions:
    name: str
    env: Mapping[str, str] | None = None
    timeout: int | None = None
    memory: int | None = None
    runtime: str | None = None  # None: DEFAULT_RUNTIME for a new plugin, unchanged on update
    dry_run: bool = False


@dataclass(slots=True)
class Plan:
    """What deploy sends (``config``) and how it differs from what is deployed."""

    action: Literal["create", "update"]
    config: dict[str, Any]
    changes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- the command


async def run_deploy(
    credentials: Credentials,
    routes: Router,
    options: DeployOptions,
    code: CodeSource,
    *,
    out: TextIO,
    warn: Warn,
) -> int:
    """Log in, then :func:`deploy`; 0 when done (or shown, with ``--dry-run``)."""
    async with open_admin(credentials) as admin:
        await deploy(admin, routes, options, code, out=out, warn=warn)
    return 0


async def deploy(
    admin: BiotAdmin,
    routes: Router,
    options: DeployOptions,
    code: CodeSource,
    *,
    out: TextIO,
    warn: Warn,
) -> dict[str, Any] | None:
    """Steps 1-6 of the module's contract; the plugin as BioT answered (``None`` in a dry run)."""
    subscriptions = subscriptions_of(routes)
    for line in subscriptions.unsupported:
        warn(line)
    problems = check_targets(subscriptions.config, await admin.interceptions())
    if problems:
        raise DeployError(problems)
    existing = await admin.get_plugin(options.name)
    plan = (
        plan_create(options, subscriptions.config)
        if existing is None
        else plan_update(existing, options, subscriptions.config)
    )
    _write(out, plan.changes)
    if options.dry_run:
        _write(out, ["configuration (environment values hidden):", _shown(plan.config)])
        _write(out, ["dry run: nothing was changed"])
        return None
    zipped = await code(_runtime_of(plan, existing))
    if plan.action == "create":
        answer = await admin.create_plugin(plan.config, zipped)
    else:
        answer = await admin.update_plugin(options.name, plan.config, zipped)
    version = answer.get("version", plan.config.get("version"))
    endpoint = answer.get("endpointUrl") or "(BioT gave none)"
    _write(out, [f"{plan.action}d plugin {options.name} (version {version})"])
    _write(out, [f"endpointUrl: {endpoint}"])
    return answer


def _runtime_of(plan: Plan, existing: Mapping[str, Any] | None) -> str:
    runtime = plan.config.get("runtime") or (existing or {}).get("runtime") or DEFAULT_RUNTIME
    return str(runtime)


def _write(out: TextIO, lines: Iterable[str]) -> None:
    out.write("".join(line + "\n" for line in lines))
    out.flush()


def _shown(config: Mapping[str, Any]) -> str:
    """The configuration as indented JSON, environment values replaced by ``***``."""
    shown = dict(config)
    if isinstance(shown.get("environmentVariables"), dict):
        shown["environmentVariables"] = {k: HIDDEN for k in shown["environmentVariables"]}
    return orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode()


# ---------------------------------------------------------------- checking against BioT


def check_targets(subscriptions: Mapping[str, Any], known: list[dict[str, Any]]) -> list[str]:
    """One line per ``apiId`` or entity type of ``subscriptions`` that BioT does not list.

    An ``apiId`` matches a listed one segment by segment, where a listed path parameter
    (``{id}``, ``{templateName}``) may be given as a concrete value (BioT narrows the
    interception to it).
    """
    api_ids = sorted({str(item["apiId"]) for item in known if item.get("apiId")})
    entities = sorted({str(item["entityTypeName"]) for item in known if item.get("entityTypeName")})
    problems: list[str] = []
    for item in subscriptions.get("interceptions", []):
        if item["type"] == ADAPT_ENTITY:
            if item["entityTypeName"] not in entities:
                problems.append(_unknown("entity type", item["entityTypeName"], entities, item))
        elif not any(_api_matches(item["apiId"], listed) for listed in api_ids):
            problems.append(_unknown("apiId", item["apiId"], api_ids, item))
    for item in subscriptions.get("notifications", []):
        if item["entityTypeName"] not in entities:
            problems.append(_unknown("entity type", item["entityTypeName"], entities, item))
    return problems


def _api_matches(given: str, listed: str) -> bool:
    if given == listed:
        return True
    ours, theirs = given.split("/"), listed.split("/")
    return len(ours) == len(theirs) and all(
        a == b or (_is_parameter(b) and not _is_parameter(a) and a != "")
        for a, b in zip(ours, theirs, strict=True)
    )


def _is_parameter(segment: str) -> bool:
    return segment.startswith("{") and segment.endswith("}")


def _unknown(what: str, value: str, known: list[str], item: Mapping[str, Any]) -> str:
    where = item.get("type") or f"notification {item.get('actionName')}"
    close = difflib.get_close_matches(value, known, n=3, cutoff=0.6)
    hint = (
        "closest known: " + ", ".join(close)
        if close
        else f"none of the {len(known)} BioT lists is close"
    )
    return f"unknown {what} {value} ({where}): BioT does not list it; {hint}"


# ---------------------------------------------------------------- create or update


def check_name(name: str) -> str:
    """BioT's plugin name rule: 1-57 characters of ``[a-zA-Z0-9-_]``; ValueError otherwise."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"{name!r} is not a BioT plugin name (1-57 of a-z A-Z 0-9 - _)")
    return name


def python_version_of(runtime: str) -> str:
    """``3.12`` of ``python3.12``; ValueError for a runtime biot-worker cannot build for."""
    match = PYTHON_RUNTIME.fullmatch(runtime)
    if match is None:
        raise ValueError(
            f"runtime {runtime}: biot-worker packages Python plugins only (pythonX.Y); "
            "give --zip to deploy another runtime's code"
        )
    return match.group(1)


def plan_create(options: DeployOptions, subscriptions: dict[str, Any]) -> Plan:
    runtime = options.runtime or DEFAULT_RUNTIME
    config: dict[str, Any] = {
        "name": options.name,
        "displayName": options.name,
        "version": 1,
        "runtime": runtime,
        "handler": HANDLER,
        "timeout": options.timeout or DEFAULT_TIMEOUT,
        "memorySize": options.memory or DEFAULT_MEMORY,
        "environmentVariables": dict(options.env or {}),
        "subscriptions": subscriptions,
        "enabledState": "ENABLED",
        "deploymentPackageType": "ZIP",
    }
    changes = [f"plugin {options.name}: new, will be created (version 1, {runtime})"]
    changes += _subscription_changes({}, subscriptions)
    changes += _env_changes({}, config["environmentVariables"])
    return Plan("create", config, changes)


def plan_update(
    existing: Mapping[str, Any], options: DeployOptions, subscriptions: dict[str, Any]
) -> Plan:
    current = existing.get("version")
    version = current + 1 if isinstance(current, int) else 1
    if version > MAX_VERSION:
        raise DeployError([f"plugin {options.name} is at version {current}, BioT's last"])
    config: dict[str, Any] = {"version": version}
    changes = [f"plugin {options.name}: exists, will be updated with new code"]
    changes.append(f"  version: {current} -> {version}")
    wanted = {
        "runtime": options.runtime,
        "handler": HANDLER,
        "timeout": options.timeout,
        "memorySize": options.memory,
    }
    for key, value in wanted.items():
        if value is not None and existing.get(key) != value:
            config[key] = value
            changes.append(f"  {key}: {existing.get(key)} -> {value}")
    if options.env is not None:
        deployed = _custom_env(existing.get("environmentVariables"))
        if deployed != dict(options.env):
            config["environmentVariables"] = dict(options.env)
            changes += _env_changes(deployed, options.env)
    config["subscriptions"] = subscriptions
    changes += _subscription_changes(existing.get("subscriptions") or {}, subscriptions) or [
        "  subscriptions: unchanged"
    ]
    return Plan("update", config, changes)


def _custom_env(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items() if not str(k).startswith(SYSTEM_PREFIXES)}


def _env_changes(deployed: Mapping[str, str], wanted: Mapping[str, str]) -> list[str]:
    lines = [f"  + env {key}" for key in sorted(wanted.keys() - deployed.keys())]
    lines += [f"  - env {key}" for key in sorted(deployed.keys() - wanted.keys())]
    lines += [
        f"  ~ env {key} (value changed)"
        for key in sorted(wanted.keys() & deployed.keys())
        if wanted[key] != deployed[key]
    ]
    return lines


def _subscription_changes(deployed: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    for key, describe in (("interceptions", _interception), ("notifications", _notification)):
        before = [describe(item) for item in deployed.get(key) or [] if isinstance(item, dict)]
        after = [describe(item) for item in wanted.get(key) or []]
        lines += [f"  + {line}" for line in after if line not in before]
        lines += [f"  - {line}" for line in before if line not in after]
    order = deployed.get("interceptionOrder")
    if order is not None and order != wanted.get("interceptionOrder"):
        lines.append(f"  interceptionOrder: {order} -> {wanted.get('interceptionOrder')}")
    return lines


def _interception(item: Mapping[str, Any]) -> str:
    target = f"apiId={item.get('apiId')}"
    if item.get("type") == ADAPT_ENTITY:
        target = f"entityTypeName={item.get('entityTypeName')}"
    order = f" order={item['order']}" if item.get("order") is not None else ""
    return f"interception {item.get('type')} {target}{order}"


def _notification(item: Mapping[str, Any]) -> str:
    template = item.get("templateName")
    suffix = f" template={template}" if template else ""
    return f"notification {item.get('entityTypeName')}/{item.get('actionName')}{suffix}"


# ---------------------------------------------------------------- the code


def zip_file(path: Path) -> CodeSource:
    """The code of an existing zip, read off the event loop; refused when its extension modules
    were built for another CPython than the runtime's (the plugin could not start)."""

    async def read(runtime: str) -> bytes:
        try:
            return await asyncio.to_thread(_read_zip, path, runtime)
        except OSError as exc:
            raise DeployError([f"--zip {path}: {exc.strerror or exc}"]) from None

    return read


def _read_zip(path: Path, runtime: str) -> bytes:
    data = path.read_bytes()
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        raise DeployError([f"--zip {path}: not a ZIP file"]) from None
    wanted = PYTHON_RUNTIME.fullmatch(runtime)
    built = next((m for m in map(_EXTENSION_TAG.search, names) if m is not None), None)
    if wanted is not None and built is not None and f"3.{built.group(1)}" != wanted.group(1):
        python = f"3.{built.group(1)}"
        raise DeployError([
            f"--zip {path}: built for CPython {python} ({built.string}), but the runtime is "
            f"{runtime}: package it with --python-version {wanted.group(1)}, or deploy it "
            f"with --runtime python{python}"
        ])  # fmt: skip
    return data


def built_package(
    routes: str, report: Callable[[str], None], pip_options: Sequence[str] = ()
) -> CodeSource:
    """The code packaged for the runtime's Python in a temporary folder (removed after), all
    of it in a thread: ``report`` is called from there."""

    async def build(runtime: str) -> bytes:
        try:
            version = python_version_of(runtime)
        except ValueError as exc:
            raise DeployError([str(exc)]) from None
        return await asyncio.to_thread(_build, routes, version, report, pip_options)

    return build


def _build(
    routes: str, python_version: str, report: Callable[[str], None], pip_options: Sequence[str]
) -> bytes:
    from worker.deploy.package import PackageError, build_package

    with tempfile.TemporaryDirectory(prefix="biot-worker-deploy-") as folder:
        output = Path(folder) / "plugin.zip"
        try:
            result = build_package(
                output=output,
                python_version=python_version,
                routes=routes,
                pip_options=pip_options,
                report=report,
            )
        except PackageError as exc:
            raise DeployError([f"package: {exc}"]) from None
        report(f"package: {result.size} bytes, {result.files} files, sha256 {result.sha256}")
        return result.path.read_bytes()
