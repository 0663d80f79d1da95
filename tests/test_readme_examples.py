"""Every ```python block of the README's "Writing a handler" and "Testing a handler with
worker.testing" sections runs, as a plugin team would run it.

A block whose first line is ``# name.py`` goes to that file (later blocks without a name go to
the same file as the block before); the files are written to a temporary directory and pytest
runs them there, with this project on the path and the kit's pytest plugin registered by the
README's own ``conftest.py`` block. The sections are read from README.md; their drafts in
``docs/readme-*.md``, while they exist, are checked the same way (README.md falls back to them
for a section it lacks).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {
    "## Writing a handler": ROOT / "docs" / "readme-writing-handlers.md",
    "## Testing a handler with worker.testing": ROOT / "docs" / "readme-testing-handlers.md",
}
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
FILE_NAME = re.compile(r"^# ([\w/]+\.py)\n")
PYTEST_INI = """\
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
filterwarnings = error
"""


def section(text: str, heading: str) -> str | None:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    start = text.find(heading + "\n")
    if start < 0:
        return None
    level = len(heading.split(" ")[0])
    lines = text[start + len(heading) + 1 :].splitlines(keepends=True)
    fenced = False
    for index, line in enumerate(lines):
        fenced ^= line.startswith("```")
        marks = line.split(" ")[0]
        if not fenced and marks and set(marks) == {"#"} and len(marks) <= level:
            return "".join(lines[:index])
    return "".join(lines)


def sources() -> list[str]:
    """README.md, and the docs/ drafts while any exists."""
    drafts = any(path.exists() for path in SECTIONS.values())
    return ["README.md", *(["docs"] if drafts else [])]


def section_text(heading: str, source: str) -> str:
    """The section from README.md (or its draft while README lacks it), or from the draft."""
    found = section((ROOT / "README.md").read_text(), heading) if source == "README.md" else None
    draft = SECTIONS[heading]
    if found is None and draft.exists():
        found = section(draft.read_text(), heading)
    assert found is not None, f"{heading!r} is in neither README.md nor {draft}"
    return found


def files_of(blocks: list[str], default: str) -> dict[str, str]:
    files: dict[str, str] = {}
    name = default
    for block in blocks:
        named = FILE_NAME.match(block)
        if named:
            name = named.group(1)
        files[name] = files.get(name, "") + block + "\n"
    return files


def example_files(source: str) -> dict[str, str]:
    files: dict[str, str] = {}
    for heading, default in zip(SECTIONS, ("my_plugin.py", "test_my_plugin.py"), strict=True):
        blocks = BLOCK.findall(section_text(heading, source))
        assert blocks, f"no python block under {heading!r}"
        for name, code in files_of(blocks, default).items():
            files[name] = files.get(name, "") + code
    return files


def test_the_section_finder_stops_at_the_next_heading() -> None:
    text = "# T\n## A\na\n### A.1\n```python\n# x.py\n```\n## B\nc\n"
    assert section(text, "## A") == "a\n### A.1\n```python\n# x.py\n```\n"
    assert section(text, "## B") == "c\n"
    assert section(text, "## C") is None


@pytest.mark.parametrize("source", sources())
def test_the_examples_are_a_plugin_its_tests_and_a_conftest(source: str) -> None:
    files = example_files(source)
    assert set(files) == {"my_plugin.py", "test_my_plugin.py", "conftest.py"}
    assert "def build_routes" in files["my_plugin.py"]
    assert "from tests" not in files["test_my_plugin.py"]  # only worker.testing and worker


@pytest.mark.parametrize("source", sources())
def test_the_examples_run_and_their_tests_pass(tmp_path: Path, source: str) -> None:
    files = example_files(source)
    for name, code in files.items():
        (tmp_path / name).write_text(code)
    (tmp_path / "pytest.ini").write_text(PYTEST_INI)
    compile(files["my_plugin.py"], "my_plugin.py", "exec")
    expected = len(re.findall(r"^async def test_|^def test_", files["test_my_plugin.py"], re.M))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH")])
        ),
        "WORKER_ROUTES": "my_plugin:build_routes",
    }
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    report = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert f"{expected} passed" in result.stdout, report
