"""Prove that the project's tests do not depend on the example plugin.

Copies the repository (tracked and untracked, non-ignored files) to a temporary directory,
deletes ``handlers/`` there (with the example's own tests, as a plugin team does), puts
``tests/other_plugin`` in their place as the package ``other_plugin``, sets
``WORKER_ROUTES=other_plugin:build_routes`` and runs ``./dev test`` (ruff, mypy --strict,
pytest) in the copy with this checkout's ``.venv``, the copy first on ``PYTHONPATH``. An
editable install of this repository would still find the original ``handlers`` package, so the
copy's interpreter is given a ``sitecustomize`` that makes importing ``handlers`` fail, as it
would in a real swap.

Usage: ``python scripts/check_swapped_plugin.py [--keep] [pytest args...]``; exits with
``./dev test``'s status (non-zero if any test fails or the swap itself is wrong).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "other_plugin"
BLOCK_HANDLERS = '''\
"""Written by check_swapped_plugin.py: the example plugin is gone from this copy."""
import sys


class _Deleted:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "handlers" or name.startswith("handlers."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Deleted)
'''
CHECK = """\
import os, sys
import worker
from worker.routing import load_routes
assert worker.__file__.startswith(os.getcwd()), f"worker imported from {worker.__file__}"
try:
    import handlers
except ModuleNotFoundError:
    pass
else:
    sys.exit(f"handlers is still importable from {handlers.__file__}")
routes = load_routes(os.environ["WORKER_ROUTES"])
print(f"check_swapped_plugin: WORKER_ROUTES={os.environ['WORKER_ROUTES']}: {len(routes)} routes")
"""


def repository_files(root: Path) -> list[str]:
    """Tracked files and untracked ones not ignored, as git lists them (present on disk)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],  # noqa: S607
        cwd=root, check=True, capture_output=True,
    ).stdout.decode()  # fmt: skip
    return sorted({name for name in listed.split("\0") if name and (root / name).is_file()})


def make_copy(root: Path, target: Path) -> None:
    """The repository at ``target``, with ``tests/other_plugin`` in place of ``handlers``."""
    for name in repository_files(root):
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, destination)
    shutil.rmtree(target / "handlers", ignore_errors=True)
    shutil.copytree(target / "tests" / "other_plugin", target / PLUGIN)


def environment(copy: Path, site: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(copy), str(site), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env["WORKER_ROUTES"] = f"{PLUGIN}:build_routes"
    return env


def main(argv: list[str]) -> int:
    keep = "--keep" in argv
    pytest_args = [arg for arg in argv if arg != "--keep"]
    base = Path(tempfile.mkdtemp(prefix="biot-swapped-plugin-"))
    try:
        copy, site = base / "repo", base / "site"
        make_copy(ROOT, copy)
        site.mkdir()
        (site / "sitecustomize.py").write_text(BLOCK_HANDLERS)
        env = environment(copy, site)
        run = [sys.executable, "-c", CHECK]
        checked = subprocess.run(run, cwd=copy, env=env, check=False)  # noqa: S603
        if checked.returncode != 0:
            sys.stderr.write("check_swapped_plugin: the swap itself is wrong\n")
            return 1
        # The copy runs the README's test command (ruff, mypy --strict, pytest) with this
        # checkout's environment, so the swapped plugin is linted and type-checked as well.
        (copy / ".venv").symlink_to(ROOT / ".venv", target_is_directory=True)
        command = ["bash", "dev", "test", "-q", "-p", "no:cacheprovider", *pytest_args]
        sys.stderr.write(f"check_swapped_plugin: {' '.join(command)} in {copy}\n")
        return subprocess.run(command, cwd=copy, env=env, check=False).returncode  # noqa: S603
    finally:
        if keep:
            sys.stderr.write(f"check_swapped_plugin: kept {base}\n")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
