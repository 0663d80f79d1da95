"""A local wheelhouse for offline packaging tests, made from what this venv has installed.

:func:`build_wheelhouse` repacks the distributions the project needs at run time (its
dependencies without extras, and theirs, recursively, markers evaluated for this interpreter)
into ``.whl`` files: a wheel is a ZIP of the files its ``RECORD`` lists plus its
``.dist-info``, named ``{name}-{version}-{python}-{abi}-{platform}.whl`` from the ``Tag:``
lines of its ``WHEEL`` file. Byte code, scripts outside the package (``../../bin``) and the
installer's own files (``INSTALLER``, ``REQUESTED``, ``direct_url.json``) are left out, and
``RECORD`` is written again for what the wheel holds. pip then installs from the folder with
``--no-index --find-links``: no network.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = "biot-worker"
_INSTALLER_FILES = frozenset({"INSTALLER", "REQUESTED", "direct_url.json", "RECORD"})


def build_wheelhouse(folder: Path) -> list[Path]:
    """Repack the project's runtime distributions into ``folder``; the wheels written."""
    folder.mkdir(parents=True, exist_ok=True)
    return [repack(dist, folder) for dist in runtime_distributions()]


def runtime_distributions() -> list[importlib.metadata.Distribution]:
    """The installed distributions :data:`PROJECT` needs at run time, sorted by name."""
    found: dict[str, importlib.metadata.Distribution] = {}
    pending = [(PROJECT, frozenset[str]())]
    while pending:
        name, extras = pending.pop()
        dist = importlib.metadata.distribution(name)
        for text in dist.requires or []:
            requirement = Requirement(text)
            if not _applies(requirement, extras):
                continue
            key = canonicalize_name(requirement.name)
            if key not in found:
                found[key] = importlib.metadata.distribution(requirement.name)
                pending.append((requirement.name, frozenset(requirement.extras)))
            elif requirement.extras:  # a second path asking for more: follow its extras too
                pending.append((requirement.name, frozenset(requirement.extras)))
    return [found[key] for key in sorted(found)]


def _applies(requirement: Requirement, extras: frozenset[str]) -> bool:
    marker = requirement.marker
    return marker is None or any(marker.evaluate({"extra": e}) for e in ("", *sorted(extras)))


def repack(dist: importlib.metadata.Distribution, folder: Path) -> Path:
    """``dist`` as a wheel in ``folder``."""
    files = [path for path in dist.files or [] if _belongs(path.parts)]
    info = next(path.parts[0] for path in files if path.parts[0].endswith(".dist-info"))
    wheel = folder / f"{info.removesuffix('.dist-info')}-{_tags(dist)}.whl"
    record: list[str] = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in files:
            source = Path(str(dist.locate_file(path)))
            if not source.is_file():
                continue
            data = source.read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{path.as_posix()},sha256={digest.decode()},{len(data)}")
            zf.write(source, path.as_posix())
        record.append(f"{info}/RECORD,,")
        zf.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return wheel


def _belongs(parts: tuple[str, ...]) -> bool:
    if parts[0] == ".." or "__pycache__" in parts or parts[-1].endswith((".pyc", ".pyo")):
        return False
    return not (parts[0].endswith(".dist-info") and parts[-1] in _INSTALLER_FILES)


def _tags(dist: importlib.metadata.Distribution) -> str:
    """The compressed tag set of the ``WHEEL`` file's ``Tag:`` lines (``cp311-cp311-a.b``)."""
    lines = (dist.read_text("WHEEL") or "").splitlines()
    tags = [line.partition(":")[2].strip().split("-") for line in lines if line.startswith("Tag:")]
    if not tags:
        raise ValueError(f"{dist.metadata['Name']} has no Tag in its WHEEL file")
    return "-".join(".".join(sorted({tag[part] for tag in tags})) for part in range(3))


def platform_tags(wheels: list[Path]) -> set[str]:
    """The platform tags the wheels are built for (``any`` included)."""
    return {tag for wheel in wheels for tag in wheel.stem.rsplit("-", 1)[1].split(".")}
