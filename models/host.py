"""Facts about the host and the installed code that every stage records or sizes itself by: usable CPUs, the
vitc version, the source revision, library versions."""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import subprocess
import time
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).resolve().parents[1]  # the vitc source tree (a git checkout in development)
GIT_TIMEOUT_S = 10.0  # for all the git commands of one source_revision() together
# The most intra-op threads any stage takes (serve, export, train, eval, the sweep, the benchmarks, a config.pbtxt's
# thread parameters): one bound for the one knob, so a count one stage takes is never one another refuses.
MAX_THREADS = 1024


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


def source_revision(source: Path = SOURCE) -> dict[str, Any]:
    """The git commit of the vitc source and whether tracked files differ from it; None, None unless `source` is
    a vitc checkout (an installed vitc lies in site-packages, which may sit in the user's own git repository)."""
    unknown: dict[str, Any] = {"commit": None, "dirty": None}
    if not _is_vitc_project(source):  # site-packages, an unrelated tree: never ask git, whose answer is not ours
        return unknown
    deadline = time.monotonic() + GIT_TIMEOUT_S
    top_and_head = _git(source, deadline, "rev-parse", "--show-toplevel", "HEAD")
    lines = (top_and_head or "").splitlines()
    # git walks up from `source`: an sdist unpacked inside another repository would report that repository's HEAD.
    if len(lines) != 2 or not _same_dir(lines[0], source) or not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", lines[1]):
        return unknown
    status = _git(source, deadline, "status", "--porcelain", "--untracked-files=no")
    return {"commit": lines[1], "dirty": None if status is None else bool(status)}


def _is_vitc_project(source: Path) -> bool:
    """Whether `source` holds vitc's own pyproject.toml (project name "vitc")."""
    try:
        with (source / "pyproject.toml").open("rb") as f:
            return tomllib.load(f).get("project", {}).get("name") == "vitc"
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        return False


def _same_dir(path: str, source: Path) -> bool:
    try:
        return Path(path).resolve() == source.resolve()
    except (OSError, RuntimeError):
        return False


def _git(source: Path, deadline: float, *args: str) -> str | None:
    """git's stdout for `args` run in `source`, or None when it fails or is past `deadline`. Only `source`'s own
    repository is read: GIT_DIR and the like from the caller's environment (a git hook, a CI job) are dropped. No
    fsmonitor hook is started, no index lock is taken (a concurrent git command of the user's would fail), nothing is
    prompted for, and the command's whole process group is killed at the deadline: a helper it started that holds the
    output pipe open would otherwise keep the wait going."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_OPTIONAL_LOCKS="0", GIT_TERMINAL_PROMPT="0")
    cmd = ["git", "-c", "core.fsmonitor=false", "-C", str(source), *args]
    timeout = deadline - time.monotonic()
    if timeout <= 0:
        return None
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                env=env, text=True, start_new_session=True)
    except OSError:  # no git
        return None
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError, AttributeError):  # AttributeError: no killpg (not POSIX)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()
        if proc.stdout is not None:
            proc.stdout.close()
        proc.wait()
        return None
    return out.strip() if proc.returncode == 0 else None
