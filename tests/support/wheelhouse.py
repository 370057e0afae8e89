"""Wheels of what this environment has installed, so a fresh virtualenv installs offline.

A test that installs the project's wheel into a new virtualenv needs its
dependencies as wheels. Downloading them takes minutes; this environment has
them installed already, each with the list of its files (RECORD) and its wheel
tags (WHEEL). `wheelhouse` re-packs the ones some requirements need,
transitively, with `wheel`'s own WheelFile, so that `pip install --no-index
--find-links` resolves the requirements exactly as it would against an index
holding the same versions.
"""

from __future__ import annotations

import importlib.metadata
import shutil
from collections.abc import Iterable
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from wheel.wheelfile import WheelFile

__all__ = ["wheelhouse"]

_REGENERATED = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
"""What pip writes into an installed dist-info beyond the wheel's (RECORD is written anew)."""


def wheelhouse(requirements: Iterable[str], into: Path) -> list[Path]:
    """The installed distributions that `requirements` need (their dependencies followed,
    markers evaluated for this interpreter), each re-packed as a wheel into `into`."""
    into.mkdir(parents=True, exist_ok=True)
    wanted: dict[str, set[str]] = {}
    pending = [Requirement(raw) for raw in requirements]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        extras = set(requirement.extras)
        if name in wanted and extras <= wanted[name]:
            continue
        wanted[name] = wanted.get(name, set()) | extras
        dist = importlib.metadata.distribution(name)
        for raw in dist.requires or ():
            dependency = Requirement(raw)
            marker = dependency.marker
            if marker is None or any(
                marker.evaluate({"extra": extra}) for extra in wanted[name] or {""}
            ):
                pending.append(dependency)
    return [_repack(importlib.metadata.distribution(name), into) for name in sorted(wanted)]


def _repack(dist: importlib.metadata.Distribution, into: Path) -> Path:
    files = dist.files or []
    dist_info = next(f.parent for f in files if f.name == "METADATA" and len(f.parts) == 2)
    tags = [
        line.split(":", 1)[1].strip()
        for line in (dist.read_text("WHEEL") or "").splitlines()
        if line.startswith("Tag:")
    ]
    python, abi, platform = (
        ".".join(sorted({tag.split("-")[part] for tag in tags})) for part in range(3)
    )
    # Named after its dist-info folder, as WheelFile expects its contents to be.
    path = into / f"{dist_info.name.removesuffix('.dist-info')}-{python}-{abi}-{platform}.whl"
    staging = into / f".{path.stem}"
    for file in files:
        # Scripts (outside site-packages) pip makes anew from the entry points.
        if file.parts[0] == ".." or "__pycache__" in file.parts:
            continue
        if file.parent == dist_info and file.name in _REGENERATED:
            continue
        target = staging / file
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(dist.locate_file(file), target)
    with WheelFile(path, "w") as wheel:
        wheel.write_files(str(staging))
    shutil.rmtree(staging)
    return path
