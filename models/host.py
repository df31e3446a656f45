"""Facts about the host and the installed code that every stage records or sizes itself by: usable CPUs, the
vitc version, the source revision, library versions."""

from __future__ import annotations

import math
import os
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).resolve().parents[1]  # the vitc source tree (a git checkout in development)


CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus() -> int:
    """CPUs this process may use: its CPU set (container cpusets, taskset), capped by a CPU quota (a Kubernetes or
    `docker --cpus` limit is a CFS quota, not a CPU set: thread pools sized by the set alone oversubscribe it and
    are throttled), rounded up."""
    try:
        cpus = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
    quota = cpu_quota()
    return cpus if quota is None else max(1, min(cpus, math.ceil(quota - 1e-9)))


def quota_cpus() -> int | None:
    """usable_cpus() when a CPU quota caps it below the CPU set (what runtimes that size their own thread pools
    from the set must be told), else None."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        return None
    usable = usable_cpus()
    return usable if usable < cpus else None


def cpu_quota(root: Path = CGROUP_ROOT, self_cgroup: str | None = None) -> float | None:
    """CPUs' worth of time this process's cgroup (or an ancestor) may use per period, the tightest along its path;
    None when unlimited or unknown. Reads cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`."""
    limits = []
    for controllers, path in _memberships(self_cgroup):
        if controllers == "":  # v2: one hierarchy
            limits += [q for d in _ancestors(root, path) if (q := _v2_quota(d / "cpu.max")) is not None]
        elif "cpu" in controllers.split(","):
            base = next((root / n for n in (controllers, "cpu,cpuacct", "cpu") if (root / n).is_dir()), None)
            if base is not None:
                limits += [q for d in _ancestors(base, path) if (q := _v1_quota(d)) is not None]
    return min(limits, default=None)


def memory_limit(root: Path = CGROUP_ROOT, self_cgroup: str | None = None) -> int | None:
    """Bytes this process's cgroup (or an ancestor) may use, the tightest along its path (a container's memory
    limit); None when unlimited or unknown. Reads cgroup v2 `memory.max` or v1 `memory.limit_in_bytes`."""
    limits = []
    for controllers, path in _memberships(self_cgroup):
        if controllers == "":
            files = [d / "memory.max" for d in _ancestors(root, path)]
        elif "memory" in controllers.split(","):
            files = [d / "memory.limit_in_bytes" for d in _ancestors(root / "memory", path)]
        else:
            continue
        for f in files:
            try:
                value = f.read_text().strip()
            except OSError:
                continue
            if value.isdigit() and int(value) < 1 << 62:  # v1 says "unlimited" with a huge number
                limits.append(int(value))
    return min(limits, default=None)


def _memberships(self_cgroup: str | None) -> list[tuple[str, str]]:
    """(controllers, path) of each line of /proc/self/cgroup (or `self_cgroup`); "" controllers is cgroup v2; none
    when it cannot be read."""
    try:
        text = self_cgroup if self_cgroup is not None else Path("/proc/self/cgroup").read_text()
    except OSError:
        return []
    return [((parts := (line.split(":", 2) + ["", ""]))[1], parts[2]) for line in text.splitlines()]


def _ancestors(base: Path, path: str) -> list[Path]:
    """base/path and each directory above it up to base (a container sees its own cgroup as "/")."""
    parts = [p for p in path.strip().split("/") if p and p not in (".", "..")]
    return [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _v2_quota(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1_quota(d: Path) -> float | None:
    try:
        quota, period = int((d / "cpu.cfs_quota_us").read_text()), int((d / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


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
