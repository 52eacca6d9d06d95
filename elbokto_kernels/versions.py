"""The oldest versions of the dependencies that are tested (docs/versions.md); an older one is
refused at import with one line naming what to install, rather than failing later inside it.

Versions are read from the installed distributions' metadata, which imports nothing."""

from __future__ import annotations

import re
from importlib import metadata

# distribution -> oldest tested version
MINIMUM = {"torch": "2.7.1", "triton": "3.3.1"}


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: "2.11.0+cu130" -> (2, 11, 0), "3.0.0rc1" ->
    (3, 0, 0)."""
    numbers = []
    for part in version.split("."):
        match = re.match(r"\d+", part)
        if match is None:
            break
        numbers.append(int(match.group()))
        if match.end() < len(part):
            break
    return tuple(numbers)


def installed(distribution: str) -> str | None:
    """The installed version of ``distribution``, or None."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def require_version(distribution: str, minimum: str, needed_by: str) -> None:
    """ImportError unless ``distribution`` is installed at ``minimum`` or later."""
    found = installed(distribution)
    if found is None:
        raise ImportError(
            f"{needed_by} needs {distribution} >= {minimum}, which is not "
            f"installed: pip install '{distribution}>={minimum}'"
        )
    if release(found) < release(minimum):
        raise ImportError(
            f"{needed_by} needs {distribution} >= {minimum}, found {found}: "
            f"pip install '{distribution}>={minimum}'"
        )
