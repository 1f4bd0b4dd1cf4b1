"""The pinned Python requirements of the module and which of them Slicer's Python still lacks.

``Resources/requirements.txt`` pins every package with ``name==version`` (one per line, ``#`` comments). Packages
Slicer already ships (numpy, SimpleITK) and PyTorch (installed by the PyTorch extension, which picks the CPU or
CUDA build for the machine) are deliberately left out; :data:`PROVIDED_BY_SLICER` lists them so that the installer
keeps pip from replacing them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

PROVIDED_BY_SLICER = ("torch", "numpy", "SimpleITK")
"""Never installed or replaced by this module: Slicer (or its PyTorch extension) provides them."""

_PINNED = re.compile(r"^(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*==\s*(?P<version>[A-Za-z0-9.+!_-]+)$")


class RequirementsError(ValueError):
    """A requirements file that is missing or holds a line that is not ``name==version``."""


def normalize_name(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-``, ``_`` and ``.`` become one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class PinnedRequirement:
    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}=={self.version}"


def parse_requirements(text: str, source: str = "requirements") -> list[PinnedRequirement]:
    """Pinned requirements from requirements-file text; every non-comment line must be ``name==version``."""
    found: list[PinnedRequirement] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _PINNED.match(line)
        if not match:
            raise RequirementsError(f"{source}, line {number}: {line!r} is not pinned as name==version")
        requirement = PinnedRequirement(match.group("name"), match.group("version"))
        key = normalize_name(requirement.name)
        if key in seen:
            raise RequirementsError(f"{source}, line {number}: {requirement.name} is listed twice")
        if key in {normalize_name(n) for n in PROVIDED_BY_SLICER}:
            raise RequirementsError(
                f"{source}, line {number}: {requirement.name} is provided by Slicer or its PyTorch extension; "
                "do not pin it here"
            )
        seen.add(key)
        found.append(requirement)
    return found


def read_requirements(path: str | Path) -> list[PinnedRequirement]:
    """Pinned requirements of a requirements file (see :func:`parse_requirements`)."""
    path = Path(path)
    if not path.is_file():
        raise RequirementsError(f"{path}: requirements file not found")
    return parse_requirements(path.read_text(encoding="utf-8"), source=str(path))


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _same_version(installed: str, pinned: str) -> bool:
    def strip(v: str) -> str:
        return v.strip().lower().lstrip("v")

    return strip(installed) == strip(pinned)


def unmet_requirements(
    requirements: Sequence[PinnedRequirement],
    installed_version: Callable[[str], str | None] = _installed_version,
) -> list[tuple[PinnedRequirement, str | None]]:
    """Requirements not installed at their pinned version, with the version found (``None``: not installed)."""
    unmet = []
    for requirement in requirements:
        found = installed_version(requirement.name)
        if found is None or not _same_version(found, requirement.version):
            unmet.append((requirement, found))
    return unmet


def describe_unmet(unmet: Sequence[tuple[PinnedRequirement, str | None]]) -> str:
    """One line per package for the confirmation dialog: ``name==version (installed: x)``."""
    lines = []
    for requirement, found in unmet:
        lines.append(f"{requirement} ({'not installed' if found is None else f'installed: {found}'})")
    return "\n".join(lines)
