"""The layout's rules, read from the source: no import cycles, no upward imports, and a runtime
that imports none of the tools (test kit, emulator, benchmark, CLI) nor the plugin.

Every import counts: module level, inside functions, and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "worker"
TOOLS = ("worker.testing", "worker.bench", "worker.cli", "worker.__main__")
BROKERS = ("redis", "aio_pika", "aiormq", "aiologger", "uvloop", "requests", "matplotlib")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, known: set[str]) -> Iterator[str]:
    """The project modules ``path`` imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    own = module_name(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _known(alias.name, known)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, own, is_package)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield candidate if candidate in known else from_base(base, known)


def from_base(base: str, known: set[str]) -> str:
    return next(iter(_known(base, known)), base)


def _known(name: str, known: set[str]) -> Iterator[str]:
    while name:
        if name in known:
            yield name
            return
        name = name.rpartition(".")[0]


def _absolute(node: ast.ImportFrom, own: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    parts = own.split(".")
    if not is_package:
        parts.pop()
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, node.module] if node.module else parts)


def graph() -> dict[str, set[str]]:
    table = modules()
    known = set(table)
    return {
        name: {target for target in imported(path, known) if target != name}
        for name, path in table.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def is_tool(name: str) -> bool:
    return any(name == tool or name.startswith(tool + ".") for tool in TOOLS)


def test_the_graph_is_read() -> None:
    edges = graph()
    assert "worker.routing" in edges["worker.dispatch"]
    assert "worker.client" in edges["worker"]


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_a_package_above_it() -> None:
    upward = [
        f"{name} imports {target}"
        for name, targets in graph().items()
        for target in targets
        if name.startswith(target + ".")
    ]
    assert upward == []


def test_the_runtime_imports_no_tool_and_no_plugin() -> None:
    table = modules()
    known = set(table) | {"handlers"}
    leaks = [
        f"{name} imports {target}"
        for name, path in table.items()
        if not is_tool(name)
        for target in imported(path, known)
        if is_tool(target) or target == "handlers" or target.startswith("handlers.")
    ]
    assert leaks == []


@pytest.mark.parametrize("entry", ["worker", "worker.adapters.http", "worker.adapters.lambda_"])
def test_importing_the_runtime_loads_no_tool_or_broker(entry: str) -> None:
    probe = (
        f"import sys, {entry}\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{BROKERS!r} or m.startswith(('worker.testing', 'worker.bench', 'handlers')))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(  # noqa: S603 - a fresh interpreter, our own probe
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


# ---------------------------------------------------------------- the README's map of the tree

README = ROOT / "README.md"


def readme_section(heading: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def layout_paths() -> list[str]:
    rows = [line for line in readme_section("Project layout").splitlines() if line.startswith("|")]
    paths: list[str] = []
    for row in rows[2:]:
        first_cell = row.split("|")[1]
        paths += re.findall(r"`([^`]+)`", first_cell)
    return paths


def test_every_path_in_the_layout_table_exists() -> None:
    paths = layout_paths()
    assert paths, "the Project layout table lists no path"
    # handlers/ is the example plugin, which a plugin team deletes: its row may outlive it.
    missing = [
        path
        for path in paths
        if path.rstrip("/") != "handlers" and not (ROOT / path.rstrip("/")).exists()
    ]
    assert missing == []


def test_every_part_of_the_runtime_is_in_the_layout_table() -> None:
    listed = {path.rstrip("/") for path in layout_paths()}
    parts = {
        str(path.relative_to(ROOT))
        for path in PACKAGE.iterdir()
        if (path.suffix == ".py" and path.name != "__main__.py")
        or (path.is_dir() and (path / "__init__.py").exists())
    }
    assert sorted(parts - listed) == []


def test_the_readme_links_only_to_files_in_the_repository() -> None:
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    outside = [link for link in links if "://" in link or link.startswith("/")]
    missing = [
        link
        for link in links
        if link not in outside and not (ROOT / link.split("#")[0]).exists()
    ]
    assert outside == []
    assert missing == []
