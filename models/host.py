"""Facts about the host and the installed code that every stage records or sizes itself by: usable CPUs, the
vitc version, the source revision, library versions."""

from __future__ import annotations

import os
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).resolve().parents[1]  # the vitc source tree (a git checkout in development)


def usable_cpus() -> int:
    """CPUs this process may run on (respects container CPU sets and taskset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def distribution_versions(names: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Installed versions of the named distributions (those not installed are left out)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def vitc_version() -> str:
    """The installed vitc version."""
    return distribution_versions(["vitc"]).get("vitc", "unknown")


def source_revision() -> dict[str, Any]:
    """The git commit of the vitc source and whether tracked files differ from it (None, None outside git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(SOURCE), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD") or None
        return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if commit
                else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
