"""The layout's rules, read from the source: no import cycles, no upward imports, a runtime that
imports none of the tools (test kit, emulator, benchmark, CLI) nor the plugin, and settings
(``config``) that import nothing of the worker.

Every import counts: module level, inside functions, and under ``TYPE_CHECKING``, and an
``importlib.import_module``/``__import__`` of a string literal. One of a computed name would hide
its edge from these rules, so there is none, but for the modules a user names (the plugin of
``WORKER_ROUTES``, the benchmark's preloads): see :data:`DYNAMIC_IMPORTS`.
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
PACKAGES = (PACKAGE, ROOT / "config")
TOOLS = ("worker.testing", "worker.bench", "worker.deploy", "worker.cli", "worker.__main__")
BROKERS = ("redis", "aio_pika", "aiormq", "aiologger", "uvloop", "requests", "matplotlib")
# The functions allowed to import a module by a computed name: it is the user's, named at run
# time, so no edge of the project hides there.
DYNAMIC_IMPORTS = {
    ("worker.routing", "load_routes"),  # the plugin named by WORKER_ROUTES
    ("worker.bench.worker_proc", "main"),  # the benchmark's BENCH_PRELOAD modules
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {
        module_name(path): path for package in PACKAGES for path in sorted(package.rglob("*.py"))
    }


def imported(path: Path, known: set[str]) -> Iterator[str]:
    """The project modules ``path`` imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    tree = ast.parse(path.read_text(), str(path))
    yield from imported_by(tree, module_name(path), path.name == "__init__.py", known)


def imported_by(tree: ast.Module, own: str, is_package: bool, known: set[str]) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _known(alias.name, known)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, own, is_package)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield candidate if candidate in known else from_base(base, known)
    for _, _, target in dynamic_imports(tree, own, is_package):
        if target is not None:
            yield from _known(target, known)


def dynamic_imports(
    tree: ast.Module, own: str, is_package: bool
) -> list[tuple[str, int, str | None]]:
    """Each ``importlib.import_module(...)``/``__import__(...)`` call (aliases included) as
    (enclosing function, line, the module it imports or None when its name is computed)."""
    finder = _DynamicImports(own if is_package else own.rpartition(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in ("importlib", "builtins"):
                    finder.modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module in ("importlib", "builtins"):
            for alias in node.names:
                if alias.name in ("import_module", "__import__"):
                    finder.functions.add(alias.asname or alias.name)
    finder.visit(tree)
    return finder.found


class _DynamicImports(ast.NodeVisitor):
    def __init__(self, package: str) -> None:
        self.package = package
        self.modules = {"importlib"}
        self.functions = {"__import__"}
        self.scope: list[str] = []
        self.found: list[tuple[str, int, str | None]] = []

    def _scoped(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if (isinstance(func, ast.Name) and func.id in self.functions) or (
            isinstance(func, ast.Attribute)
            and func.attr in ("import_module", "__import__")
            and isinstance(func.value, ast.Name)
            and func.value.id in self.modules
        ):
            self.found.append((".".join(self.scope), node.lineno, self._target(node)))
        self.generic_visit(node)

    def _target(self, call: ast.Call) -> str | None:
        args = [*call.args, *(k.value for k in call.keywords if k.arg in ("package", "level"))]
        name = _literal(args[0]) if args else None
        if name is None or len(args) > 2 or not name.lstrip("."):
            return None
        if not name.startswith("."):
            return name if len(args) == 1 or _literal(args[1]) is not None else None
        if len(args) != 2:
            return None
        second = args[1]
        package = (
            self.package
            if isinstance(second, ast.Name) and second.id == "__package__"
            else _literal(second)
        )
        if package is None:
            return None
        dots = len(name) - len(name.lstrip("."))
        parts = package.split(".")
        return ".".join([*parts[: len(parts) - (dots - 1)], name.lstrip(".")])


def _literal(node: ast.expr) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


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
    assert "worker.adapters.redis_streams" in edges["worker.adapters"]  # inside open_source
    assert "config.settings" in edges["worker.adapters.queue"]


def test_config_imports_nothing_of_the_worker() -> None:
    table = modules()
    known = set(table)
    config = [name for name in table if name == "config" or name.startswith("config.")]
    assert "config.settings" in config
    upward = [
        f"{name} imports {target}"
        for name in config
        for target in imported(table[name], known)
        if target == "worker" or target.startswith("worker.")
    ]
    assert upward == []


def test_no_dynamic_import_hides_an_edge() -> None:
    computed = set()
    for name, path in modules().items():
        tree = ast.parse(path.read_text(), str(path))
        for function, line, target in dynamic_imports(tree, name, path.name == "__init__.py"):
            if target is None:
                computed.add((name, function, line))
    hidden = sorted(f"{name}:{line} in {function or 'the module'}()"
                    for name, function, line in computed
                    if (name, function) not in DYNAMIC_IMPORTS)  # fmt: skip
    assert hidden == []
    assert {(name, function) for name, function, _ in computed} == DYNAMIC_IMPORTS  # still used


def test_the_dynamic_import_finder_reads_literals_and_flags_computed_names() -> None:
    source = """
import importlib
import importlib as il
from importlib import import_module as load
import builtins

def literal():
    importlib.import_module("worker.adapters.memory")
    il.import_module(".rabbitmq", __package__)
    load("..client", package="worker.adapters")
    __import__("worker.tokens")

class Seam:
    def open(self, name):
        importlib.import_module(f"{__package__}.{name}")
        il.import_module("." + name, __package__)
        load(name)
        builtins.__import__(name)
"""
    found = dynamic_imports(ast.parse(source), "worker.adapters.queue", is_package=False)
    assert [(function, target) for function, _, target in found] == [
        ("literal", "worker.adapters.memory"),
        ("literal", "worker.adapters.rabbitmq"),
        ("literal", "worker.client"),
        ("literal", "worker.tokens"),
        ("Seam.open", None),
        ("Seam.open", None),
        ("Seam.open", None),
        ("Seam.open", None),
    ]
    known = set(modules())
    edges = set(imported_by(ast.parse(source), "worker.adapters.queue", False, known))
    assert {"worker.adapters.memory", "worker.adapters.rabbitmq", "worker.client"} <= edges


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
        f"{BROKERS!r} or m.startswith(('worker.testing', 'worker.bench', 'worker.deploy', "
        "'handlers')))\n"
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
        link for link in links if link not in outside and not (ROOT / link.split("#")[0]).exists()
    ]
    assert outside == []
    assert missing == []
