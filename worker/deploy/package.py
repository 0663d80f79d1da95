"""``biot-worker package``: the ZIP that BioT's Python Lambda runtime runs as it is.

:func:`build_package` writes one ZIP holding, at its root:

- the project's runtime dependencies (``[project].dependencies`` of the project's
  ``pyproject.toml``, else of the installed ``biot-worker`` distribution, extras left out),
  resolved by pip as binary wheels for CPython ``python_version`` on Linux x86_64 with the glibc
  of that Lambda runtime (2.26 on Amazon Linux 2 up to python3.11, 2.34 on Amazon Linux 2023
  from python3.12), without their ``*.dist-info``, ``bin/`` scripts or byte code;
- the ``worker`` runtime without the tools (``worker.testing``, ``worker.bench``,
  ``worker.deploy``, ``worker/cli.py``, ``worker/__main__.py``), and ``config``;
- the plugin: the top-level package (or module file) of ``routes`` (``WORKER_ROUTES``,
  ``module:function``), looked up in the working directory first, then on the import path,
  without its tests (``test_*.py``, ``*_test.py``, ``conftest.py``, ``tests/`` folders);
- ``index.py`` (:mod:`worker.deploy.lambda_index` with ``ROUTES`` set to ``routes``), whose
  ``handler(event, context)`` is BioT's default handler ``index.handler``.

No ``__pycache__``, ``*.pyc`` or hidden files anywhere. The ZIP is reproducible: the same tree
and versions give the same bytes (entries sorted, directories listed, every timestamp
1980-01-01 00:00 or ``SOURCE_DATE_EPOCH``, modes 0644 and 0755 for directories and executables,
deflate level 6), written next to ``output`` and moved into place when complete.

pip runs as ``python -m pip`` in a subprocess (this is a command-line tool, not the worker's
event loop), bounded by :data:`PIP_TIMEOUT`; ``pip_options`` go to it as they are (e.g.
``["--no-index", "--find-links", DIR]`` for an offline build). Every failure a user can cause is
a :class:`PackageError` whose ``str()`` is one line; a dependency without a wheel for the target
names the package, and pip's whole output stays in :attr:`PackageError.output`. pip evaluates
environment markers (``; python_version < "3.13"``) for the Python running it, not the target:
a marker that differs between the two picks the running Python's side.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

import config.settings as config_settings

#: The oldest Python the worker runs on (``requires-python`` in pyproject.toml).
MIN_PYTHON: Final = (3, 11)
#: How long pip may take to resolve and download the dependencies.
PIP_TIMEOUT: Final = 900.0
#: The distribution whose dependencies are packed when no pyproject.toml is at hand.
DISTRIBUTION: Final = "biot-worker"
#: A ZIP cannot date a file before this (SOURCE_DATE_EPOCH is clamped to it).
_ZIP_EPOCH: Final = 315532800  # 1980-01-01T00:00:00Z
_COMPRESS_LEVEL: Final = 6
_WORKER: Final = Path(__file__).resolve().parents[1]
_CONFIG: Final = Path(config_settings.__file__).resolve().parent
_INDEX_SOURCE: Final = Path(__file__).with_name("lambda_index.py")
_ROUTES_LINE: Final = re.compile(r'^ROUTES = "[^"\n]*"$', re.MULTILINE)
_ROUTES: Final = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_VERSION: Final = re.compile(r"^3\.(\d{1,2})$")
_TOOLS: Final = frozenset({"testing", "bench", "deploy", "cli.py", "__main__.py"})
_NO_WHEEL: Final = re.compile(
    r"(?:No matching distribution found for|Could not find a version that satisfies the "
    r"requirement) ([A-Za-z0-9][A-Za-z0-9._-]*)"
)
_EXTRA: Final = re.compile(r"\bextra\s*==")
_INSTALLED: Final = re.compile(r"^Successfully installed (.+)$", re.MULTILINE)

Entries = dict[str, Path | bytes]
Skip = Callable[[PurePosixPath, bool], bool]


class PackageError(Exception):
    """A package that cannot be built; ``str()`` is one line for the user, ``output`` is pip's
    whole output when pip failed."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


@dataclass(frozen=True)
class PackageResult:
    """The written ZIP: its path, size in bytes, number of files and sha256 (hex)."""

    path: Path
    size: int
    files: int
    sha256: str


def build_package(
    *,
    output: Path,
    python_version: str = "3.12",
    routes: str,
    pip_options: Sequence[str] = (),
    report: Callable[[str], None] | None = None,
) -> PackageResult:
    """Build the plugin's Lambda ZIP at ``output`` (see the module's docstring)."""
    say = report or _silent
    minor = _target_minor(python_version)
    plugin = find_plugin(routes)
    requirements = runtime_requirements()
    entries: Entries = {}
    with tempfile.TemporaryDirectory(prefix="biot-package-") as tmp:
        target = Path(tmp) / "deps"
        say(f"resolving {', '.join(requirements)} for {platform_text(minor)}")
        say(install_dependencies(requirements, target, minor, pip_options))
        _add(entries, _files(target, _skip_in_dependencies), "", "the dependencies")
        _add(entries, _files(_WORKER, _skip_in_worker), "worker/", "the worker")
        _add(entries, _files(_CONFIG, _skip_always), "config/", "config")
        if plugin.is_dir():
            _add(entries, _files(plugin, _skip_in_plugin), f"{plugin.name}/", "the plugin")
        else:
            _add(entries, {plugin.name: plugin}, "", "the plugin")
        _add(entries, {"index.py": index_source(routes)}, "", "index.py")
        return write_zip(entries, output, _date_time())


def _silent(message: str) -> None:
    del message


def _target_minor(python_version: str) -> int:
    match = _VERSION.match(python_version)
    if match is None:
        raise PackageError(f"--python-version {python_version!r}: expected 3.X, e.g. 3.12")
    minor = int(match.group(1))
    if (3, minor) < MIN_PYTHON:
        oldest = ".".join(map(str, MIN_PYTHON))
        raise PackageError(f"--python-version {python_version}: biot-worker needs {oldest}+")
    return minor


def platform_text(minor: int) -> str:
    """The target, as the messages name it."""
    return f"CPython 3.{minor} on Linux x86_64 (glibc {_glibc(minor)})"


def _glibc(minor: int) -> str:
    # Lambda's python3.8-3.11 run on Amazon Linux 2 (glibc 2.26), python3.12+ on Amazon
    # Linux 2023 (glibc 2.34): a wheel built for a newer glibc would not load there.
    return "2.26" if minor <= 11 else "2.34"


def platforms(minor: int) -> list[str]:
    """pip's ``--platform`` values for the target, most specific first (pip ranks wheels by
    this order and does not widen a ``manylinux_2_X`` tag to older glibcs by itself)."""
    newest = int(_glibc(minor).split(".")[1])
    tags = [f"manylinux_2_{glibc}_x86_64" for glibc in range(newest, 16, -1)]
    # manylinux2014 widens to manylinux2010 and manylinux1 in pip; 2_12 and 2_5 are their
    # PEP 600 names, which some wheels carry alone.
    return [*tags, "manylinux2014_x86_64", "manylinux_2_12_x86_64", "manylinux_2_5_x86_64"]


# ---------------------------------------------------------------- what goes in


def find_plugin(routes: str) -> Path:
    """The folder of the top-level package of ``routes`` (or its module file)."""
    if not _ROUTES.match(routes):
        raise PackageError(f"WORKER_ROUTES={routes!r}: expected module:function")
    module = routes.partition(":")[0]
    top = module.partition(".")[0]
    if top in ("worker", "config", "index"):
        raise PackageError(f"WORKER_ROUTES={routes}: the plugin cannot be named {top!r}")
    spec = importlib.machinery.PathFinder.find_spec(top, [os.getcwd()])
    spec = spec or importlib.util.find_spec(top)
    location = _location(spec)
    if location is None:
        raise PackageError(f"WORKER_ROUTES={routes}: no package or module named {top!r} here")
    if not _has_module(location, module.split(".")[1:]):
        raise PackageError(f"WORKER_ROUTES={routes}: {location} has no module {module!r}")
    return location


def _location(spec: importlib.machinery.ModuleSpec | None) -> Path | None:
    if spec is None:
        return None
    if spec.submodule_search_locations:  # a package, or a namespace package in one folder
        folders = list(spec.submodule_search_locations)
        return Path(folders[0]).resolve() if len(folders) == 1 else None
    if spec.origin and spec.origin.endswith(".py"):
        return Path(spec.origin).resolve()
    return None  # built in, frozen or compiled: nothing to pack


def _has_module(location: Path, inner: list[str]) -> bool:
    if not inner:
        return True
    path = location.joinpath(*inner)
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def runtime_requirements() -> list[str]:
    """The project's runtime requirements, extras left out, as pip takes them."""
    pyproject = _WORKER.parent / "pyproject.toml"
    if pyproject.is_file():
        with pyproject.open("rb") as file:
            project = tomllib.load(file).get("project", {})
        if project.get("name") == DISTRIBUTION:
            return [str(requirement) for requirement in project.get("dependencies", [])]
    try:
        required = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        message = f"{DISTRIBUTION} is not installed and no pyproject.toml names it"
        raise PackageError(message) from None
    return [requirement for requirement in required if not _EXTRA.search(requirement)]


def index_source(routes: str) -> bytes:
    """``index.py``: :mod:`worker.deploy.lambda_index` serving ``routes``."""
    source, count = _ROUTES_LINE.subn(f'ROUTES = "{routes}"', _INDEX_SOURCE.read_text())
    if count != 1:
        raise PackageError(f"{_INDEX_SOURCE} has no single ROUTES line to fill in")
    return source.encode()


# ---------------------------------------------------------------- pip


def pip_command(
    requirements: Sequence[str], target: Path, minor: int, pip_options: Sequence[str]
) -> list[str]:
    """``python -m pip install`` of ``requirements`` as wheels for the target into ``target``."""
    options = [f"--platform={platform}" for platform in platforms(minor)]
    return [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--target",
        str(target),
        "--only-binary=:all:",
        "--implementation=cp",
        f"--python-version=3.{minor}",
        *options,
        "--no-compile",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar=off",
        *pip_options,
        *requirements,
    ]


def install_dependencies(
    requirements: Sequence[str], target: Path, minor: int, pip_options: Sequence[str]
) -> str:
    """Install with pip; pip's summary line, or :class:`PackageError` naming what failed."""
    command = pip_command(requirements, target, minor, pip_options)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PIP_NO_INPUT": "1"}
    try:
        done = subprocess.run(  # noqa: S603 - our own interpreter running pip
            command, capture_output=True, text=True, timeout=PIP_TIMEOUT, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        raise PackageError(f"pip did not finish within {PIP_TIMEOUT:.0f} s") from None
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise pip_failure(output, minor)
    installed = _INSTALLED.search(output)
    return f"pip: installed {installed.group(1)}" if installed else "pip: nothing to install"


def pip_failure(output: str, minor: int) -> PackageError:
    """pip's failure as one line: the package without a wheel, else pip's first error."""
    missing = _NO_WHEEL.search(output)
    if missing:
        name = re.split(r"[\[<>=!~;\s]", missing.group(1))[0]
        return PackageError(f"no wheel of {name} for {platform_text(minor)}", output)
    errors = [line for line in output.splitlines() if line.startswith("ERROR:")]
    lines = errors or [line for line in output.splitlines() if line.strip()] or ["no output"]
    return PackageError(f"pip failed: {lines[0].removeprefix('ERROR:').strip()}", output)


# ---------------------------------------------------------------- walking the trees


def _files(root: Path, skip: Skip) -> Entries:
    """The files under ``root`` by their path relative to it, minus what ``skip`` says."""
    found: Entries = {}
    for folder, dirs, names in os.walk(root):
        here = PurePosixPath(Path(folder).relative_to(root).as_posix())
        dirs[:] = [name for name in dirs if not skip(here / name, True)]
        for name in names:
            relative = here / name
            if not skip(relative, False):
                found[relative.as_posix()] = Path(folder) / name
    return found


def _skip_always(path: PurePosixPath, is_dir: bool) -> bool:
    if path.name.startswith(".") or path.name == "__pycache__":
        return True
    return not is_dir and path.suffix in (".pyc", ".pyo")


def _skip_in_dependencies(path: PurePosixPath, is_dir: bool) -> bool:
    if _skip_always(path, is_dir):
        return True
    top_level = len(path.parts) == 1
    if top_level and is_dir:
        return path.name == "bin" or path.suffix in (".dist-info", ".egg-info")
    return top_level and path.suffix == ".pth"


def _skip_in_worker(path: PurePosixPath, is_dir: bool) -> bool:
    return _skip_always(path, is_dir) or (len(path.parts) == 1 and path.name in _TOOLS)


def _skip_in_plugin(path: PurePosixPath, is_dir: bool) -> bool:
    if _skip_always(path, is_dir):
        return True
    if is_dir:
        return path.name == "tests"
    name = path.name
    return name == "conftest.py" or (
        name.endswith(".py") and (name.startswith("test_") or name.endswith("_test.py"))
    )


def _add(entries: Entries, found: Entries, prefix: str, what: str) -> None:
    """Add ``found`` under ``prefix``, refusing one path from two places (e.g. a dependency
    shipping a top-level ``config``)."""
    for relative, source in found.items():
        name = prefix + relative
        if name in entries:
            raise PackageError(f"{what} and an earlier part both hold {name}")
        entries[name] = source


# ---------------------------------------------------------------- the ZIP


def _date_time() -> tuple[int, int, int, int, int, int]:
    """Every entry's timestamp: SOURCE_DATE_EPOCH (UTC) if set, else 1980-01-01 00:00."""
    raw = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not raw:
        epoch = _ZIP_EPOCH
    elif raw.isdigit():
        epoch = max(int(raw), _ZIP_EPOCH)
    else:
        raise PackageError(f"SOURCE_DATE_EPOCH={raw!r}: expected whole seconds since 1970")
    year, month, day, hour, minute, second = time.gmtime(epoch)[:6]
    return year, month, day, hour, minute, second


def write_zip(
    entries: Entries, output: Path, date_time: tuple[int, int, int, int, int, int]
) -> PackageResult:
    """Write ``entries`` (path in the ZIP -> file or bytes) reproducibly; see the module doc."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.{os.getpid()}.partial")
    try:
        with zipfile.ZipFile(partial, "w") as zf:
            for name in sorted({*entries, *_folders(entries)}):
                source = entries.get(name)
                if source is None:
                    zf.writestr(_info(name + "/", 0o40755, date_time), b"")
                    continue
                data = source if isinstance(source, bytes) else source.read_bytes()
                mode = 0o100755 if _executable(source) else 0o100644
                zf.writestr(_info(name, mode, date_time), data, compresslevel=_COMPRESS_LEVEL)
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    data = output.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    return PackageResult(path=output, size=len(data), files=len(entries), sha256=digest)


def _folders(entries: Entries) -> set[str]:
    return {
        parent.as_posix()
        for name in entries
        for parent in PurePosixPath(name).parents
        if parent != PurePosixPath(".")
    }


def _info(name: str, mode: int, date_time: tuple[int, int, int, int, int, int]) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time)
    info.create_system = 3  # Unix, so that the mode below is read
    info.external_attr = mode << 16 | (0x10 if name.endswith("/") else 0)
    info.compress_type = zipfile.ZIP_STORED if name.endswith("/") else zipfile.ZIP_DEFLATED
    return info


def _executable(source: Path | bytes) -> bool:
    return isinstance(source, Path) and bool(source.stat().st_mode & 0o111)
