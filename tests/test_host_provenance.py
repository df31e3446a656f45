"""models/host.py source_revision(): vitc's git commit is recorded only when vitc runs from its own checkout, never
the commit of a git repository that merely contains an installed vitc; git is bounded in time and in what it reads."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_gpu_check_static import _alive

from models import host
from models.host import source_revision

PYPROJECT = '[project]\nname = "vitc"\nversion = "0.1.0"\n'
UNKNOWN = {"commit": None, "dirty": None}


def _git(repo: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-C", str(repo), *args],
                          check=True, capture_output=True, text=True, env=env).stdout.strip()


def _repo(path: Path, files: dict[str, str]) -> str:
    """A git repository at `path` with `files` committed; its HEAD."""
    path.mkdir(parents=True, exist_ok=True)
    _git(path, "init", "-q")
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    _git(path, "add", "-A")
    _git(path, "commit", "-qm", "init")
    return _git(path, "rev-parse", "HEAD")


@pytest.fixture(autouse=True)
def _needs_git():
    try:
        subprocess.run(["git", "--version"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not installed")


def test_an_installed_vitc_inside_the_users_repository_records_no_commit(tmp_path):
    # the usual myproject/.venv: site-packages sits inside the user's own (here modified) repository
    _repo(tmp_path / "proj", {"app.py": "hi\n"})
    (tmp_path / "proj" / "app.py").write_text("modified\n")
    site = tmp_path / "proj" / ".venv" / "lib" / "python3.11" / "site-packages"
    (site / "models").mkdir(parents=True)
    (site / "models" / "host.py").write_text("")
    assert source_revision(site) == UNKNOWN


def test_an_unpacked_sdist_inside_another_repository_records_no_commit(tmp_path):
    # vitc's own pyproject.toml, but git's top level is the enclosing repository, whose HEAD is not vitc's
    _repo(tmp_path / "outer", {"README": "x\n", "vendor/vitc-0.1.0/pyproject.toml": PYPROJECT})
    assert source_revision(tmp_path / "outer" / "vendor" / "vitc-0.1.0") == UNKNOWN


def test_a_repository_of_another_project_records_no_commit(tmp_path):
    _repo(tmp_path / "other", {"pyproject.toml": PYPROJECT.replace('"vitc"', '"models"')})
    assert source_revision(tmp_path / "other") == UNKNOWN


def test_a_vitc_checkout_records_its_commit_and_whether_it_is_dirty(tmp_path):
    head = _repo(tmp_path / "vitc", {"pyproject.toml": PYPROJECT, "models/host.py": "x = 1\n"})
    assert source_revision(tmp_path / "vitc") == {"commit": head, "dirty": False}
    (tmp_path / "vitc" / "untracked.txt").write_text("new\n")  # untracked files do not count
    assert source_revision(tmp_path / "vitc") == {"commit": head, "dirty": False}
    (tmp_path / "vitc" / "models" / "host.py").write_text("x = 2\n")
    assert source_revision(tmp_path / "vitc") == {"commit": head, "dirty": True}


def test_the_callers_git_environment_does_not_redirect_git(tmp_path, monkeypatch):
    head = _repo(tmp_path / "vitc", {"pyproject.toml": PYPROJECT})
    _repo(tmp_path / "hooked", {"other.txt": "y\n"})
    # as inside a git hook or a CI job of another repository
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "hooked" / ".git"))
    monkeypatch.setenv("GIT_WORK_TREE", str(tmp_path / "hooked"))
    assert source_revision(tmp_path / "vitc") == {"commit": head, "dirty": False}


def test_a_configured_fsmonitor_hook_is_not_run(tmp_path):
    head = _repo(tmp_path / "vitc", {"pyproject.toml": PYPROJECT})
    hook = tmp_path / "fsmonitor-hook"
    ran = tmp_path / "hook-ran"
    hook.write_text(f"#!/bin/sh\ntouch {ran}\nsleep 30\n")
    hook.chmod(0o755)
    _git(tmp_path / "vitc", "config", "core.fsmonitor", str(hook))
    t0 = time.monotonic()
    assert source_revision(tmp_path / "vitc") == {"commit": head, "dirty": False}
    assert time.monotonic() - t0 < 5 and not ran.exists()


def test_a_hung_git_is_stopped_at_the_timeout_with_what_it_started(tmp_path, monkeypatch):
    (tmp_path / "vitc").mkdir()
    (tmp_path / "vitc" / "pyproject.toml").write_text(PYPROJECT)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pid_file = tmp_path / "helper.pid"
    # a git whose helper keeps the output pipe open after git itself is killed (what an fsmonitor daemon or a
    # filter process could do): waiting for the pipe to close would wait for the helper
    (bin_dir / "git").write_text(f"#!/bin/sh\n{sys.executable} -c 'import time; time.sleep(30)' &\n"
                                 f"echo $! > {pid_file}\nsleep 30\n")
    (bin_dir / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(host, "GIT_TIMEOUT_S", 1.0)
    t0 = time.monotonic()
    assert source_revision(tmp_path / "vitc") == UNKNOWN
    assert time.monotonic() - t0 < 5
    helper = int(pid_file.read_text())
    end = time.monotonic() + 5
    while time.monotonic() < end and _alive(helper):
        time.sleep(0.05)
    assert not _alive(helper)


def test_without_git_the_commit_is_unknown(tmp_path, monkeypatch):
    (tmp_path / "vitc").mkdir()
    (tmp_path / "vitc" / "pyproject.toml").write_text(PYPROJECT)
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    assert source_revision(tmp_path / "vitc") == UNKNOWN


def test_this_checkout_records_its_own_commit():
    rev = source_revision()
    if (host.SOURCE / ".git").exists():
        assert rev["commit"] == _git(host.SOURCE, "rev-parse", "HEAD") and rev["dirty"] in (True, False)
    else:  # an unpacked sdist
        assert rev == UNKNOWN
