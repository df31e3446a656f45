"""`python -m export.triton` killed (SIGKILL: nothing of it runs after) at any step, and the run after it.

The kill is simulated in-process: right after the run's Nth file-system step (a mkdir, rename, replace, unlink or
rmdir: what stages, publishes and cleans up) the working directory is copied, as a SIGKILL arriving then would
leave it, and the run is stopped; the copy is put back and the same command is run again. Two real SIGKILLs, once a
publish had finished, check the same from the command line.

After every kill point the next run exits 0 and removes what the killed one left; its note about the killed run is
true: none when that run had published everything (only the removal of its staging directory was left), "killed
before it published anything" only when the repository is as it was (or none, when it had staged no file yet),
"stopped before it finished" otherwise; every version directory is a bundle; and it adds the next version, as any
run does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from test_serve_fixtures import micro_bundle

from export import triton
from models.bundle import read_manifest

ROOT = Path(__file__).resolve().parents[1]
MODEL = "micro-onnx-fp32"
STOPPED = "a publish into it was stopped before it finished (killed)"
NOTHING = "a run into it was killed before it published anything"
# Every file the run publishes differs from the repository's: each step of the publish shows in the repository.
CHANGED = {"instances": 2, "isvc_name": "vitc-other"}


class _Killed(BaseException):
    """Stops the run at the kill point (a BaseException, as nothing of a killed run may handle it)."""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return micro_bundle(tmp_path_factory, ("onnx",))


def _tree(repo: Path) -> dict[str, bytes | None]:
    """The repository as Triton sees it: its files' contents, a version directory by its name (it is published by
    one rename), hidden entries (a mount point's staging and lock) left out."""
    tree: dict[str, bytes | None] = {}
    for p in sorted(repo.rglob("*")):
        rel = p.relative_to(repo)
        if rel.parts[0].startswith(".") or (len(rel.parts) > 2 and rel.parts[1].isdigit()):
            continue
        tree[str(rel)] = p.read_bytes() if p.is_file() else None
    return tree


def _kill_after(monkeypatch: pytest.MonkeyPatch, n: int, snapshot: Callable[[], None]) -> None:
    """Copy the state (`snapshot`) right after the nth file-system step from now on, then stop the run."""
    count = [0]

    def wrap(real: Callable) -> Callable:
        def step(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - os's own signatures
            result = real(*args, **kwargs)
            count[0] += 1
            if count[0] == n:
                snapshot()
                raise _Killed
            return result
        return step

    for name in ("mkdir", "rename", "replace", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, wrap(getattr(os, name)))


def _run_killed(bundle: Path, work: Path, n: int, monkeypatch: pytest.MonkeyPatch, **options) -> bool:
    """Run into work/repo, killed right after its nth step: `work` is left as the kill left it. False when the run
    has fewer steps (it finished)."""
    killed = work.with_name(work.name + "-killed")
    with monkeypatch.context() as m:
        _kill_after(m, n, lambda: shutil.copytree(work, killed, symlinks=True))
        try:
            triton.write_repository(bundle, work / "repo", **options)
        except _Killed:
            pass
        else:
            return False
    shutil.rmtree(work)  # what the stopped run's own clean-up did: a SIGKILL runs none
    os.rename(killed, work)
    return True


def _versions(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())


def _edit_every_file(repo: Path) -> None:
    """Edit config.pbtxt, labels.txt and inferenceservice.yaml (all still fitting): a new version keeps them all."""
    config = repo / MODEL / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size: 32", "max_batch_size: 4").replace("[ 8, 32 ]",
                                                                                                   "[ 4 ]"))
    labels = repo / MODEL / "labels.txt"
    labels.write_text("edited " + labels.read_text())
    isvc = repo / triton.ISVC_FILE
    isvc.write_text(isvc.read_text() + "# edited\n")


@pytest.mark.parametrize("mount", [False, True], ids=["beside", "inside-a-mount-point"])
@pytest.mark.parametrize("edited", [False, True], ids=["files-replaced", "files-kept"])
def test_the_run_after_a_kill_at_any_step_says_only_what_is_true(bundle, tmp_path, monkeypatch, mounts, mount,
                                                                 edited):
    base = tmp_path / "base"
    (base / "repo").mkdir(parents=True)
    options = {} if edited else CHANGED
    if mount:
        mounts.update((str(base / "repo"), str(tmp_path / "done" / "repo")))
    triton.write_repository(bundle, base / "repo")  # version 1
    if edited:
        _edit_every_file(base / "repo")
    before = _tree(base / "repo")
    shutil.copytree(base, tmp_path / "done", symlinks=True)
    triton.write_repository(bundle, tmp_path / "done" / "repo", **options)
    after = _tree(tmp_path / "done" / "repo")
    assert after != before
    seen: dict[str, int] = {"nothing staged": 0, "nothing": 0, "marker only": 0, "part": 0, "all": 0, "left": 0}
    n = 0
    while True:
        n += 1
        work = tmp_path / f"k{n}"
        shutil.copytree(base, work, symlinks=True)
        if mount:
            mounts.add(str(work / "repo"))
        if not _run_killed(bundle, work, n, monkeypatch, **options):
            break
        repo = work / "repo"
        staged_in = work if not mount else repo  # where the killed run left its staging directory, if anywhere
        seen["left"] += any(p.name.endswith(".tmp") for p in staged_in.iterdir())
        killed = _tree(repo)
        highest = max(_versions(repo / MODEL))
        notes: list[str] = []
        written = triton.write_repository(bundle, repo, notes=notes, **options)
        said = [note for note in notes if "killed" in note]
        where = f"killed after step {n}: {said}"
        if killed == after:  # everything was published: only the staging directory's removal was left
            assert said == [], where
            seen["all"] += 1
        elif killed == before:
            assert len(said) <= 1 and all(x.startswith(f"{repo}: ") for x in said), where
            if not said:  # it had staged no file yet: nothing to say
                assert seen["nothing"] == 0, where
                seen["nothing staged"] += 1
            elif NOTHING in said[0]:
                seen["nothing"] += 1
            else:  # between the mark that publishing began and its first rename: still true, with nothing published
                assert STOPPED in said[0], where
                seen["marker only"] += 1
        else:
            assert len(said) == 1 and said[0].startswith(f"{repo}: {STOPPED}"), where
            seen["part"] += 1
        assert written == [repo / MODEL / str(highest + 1)], where  # the next version, as after any run
        for v in _versions(repo / MODEL):
            read_manifest(repo / MODEL / str(v))
        if mount:  # the lock file is the running writer's, removed as it ends
            assert not [p.name for p in repo.iterdir() if p.name.startswith(".")], where
        assert sorted(p.name for p in work.iterdir()) == ["repo"], where
        shutil.rmtree(work)
    assert n > 10 and seen["left"] >= n - 4, seen  # stopped at every step; its staging directory (in the mount) left
    assert seen["nothing"] > 1 and seen["marker only"] <= 1 and seen["all"] > 1, seen
    # Kept files are not published: the version's rename is then the whole publish.
    assert seen["part"] == 0 if edited else seen["part"] >= 3, seen  # each step of the publish


def test_a_new_repository_is_one_rename_so_a_kill_leaves_it_absent_or_whole(bundle, tmp_path, monkeypatch):
    seen = []
    n = 0
    while True:
        n += 1
        work = tmp_path / f"k{n}"
        work.mkdir()
        if not _run_killed(bundle, work, n, monkeypatch):
            break
        notes: list[str] = []
        repo = work / "repo"
        whole = repo.exists()
        assert triton.write_repository(bundle, repo, notes=notes) == [repo / MODEL / str(2 if whole else 1)]
        said = [note for note in notes if "killed" in note]
        if whole:
            assert said == [], (n, said)
            seen.append("whole")
        elif said:
            assert said == [f"{repo}: {NOTHING}: its staging directory was removed"], (n, said)
            seen.append("nothing")
        else:  # it had staged no file yet: nothing to say
            seen.append("nothing staged")
        assert sorted(p.name for p in work.iterdir()) == ["repo"]
    # Absent (a staging directory without files, then with them) until the last step, the rename.
    assert seen[-1] == "whole" and "nothing" in seen, seen
    assert seen == sorted(seen, key=["nothing staged", "nothing", "whole"].index), seen


_PUBLISH_THEN_SIGKILL = """
import os, signal, sys
from export import triton
mount = sys.argv.pop(1)
if mount:  # --out taken for a mount point: the run stages inside it
    real_ismount = os.path.ismount
    os.path.ismount = lambda p: os.path.realpath(p) == mount or real_ismount(p)
real = triton.publish
def publish_then_sigkill(*args, **kwargs):
    written = real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # every version, labels, config and service in place; the staging not removed
triton.publish = publish_then_sigkill
sys.exit(triton.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("mount", [False, True], ids=["beside", "inside-a-mount-point"])
def test_a_rerun_after_a_sigkill_once_all_was_published_is_like_any_rerun(bundle, tmp_path, mounts, mount, capsys):
    """Finding: it said a publish "was stopped before it finished" and added a version after that one: the version
    as any rerun adds (the same command run again adds the next one), the note untrue."""
    repo = tmp_path / "repo"
    repo.mkdir()
    if mount:
        mounts.add(str(repo))
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    killed = subprocess.run([sys.executable, "-c", _PUBLISH_THEN_SIGKILL, str(repo) if mount else "", str(bundle),
                             "--out", str(repo), "--instances", "2"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == -9, killed.stderr
    left = [p.name for p in (repo.iterdir() if mount else tmp_path.iterdir()) if p.name.endswith(".tmp")]
    assert len(left) == 1, left  # its staging directory, which a SIGKILL does not remove
    assert _versions(repo / MODEL) == [1, 2] and "count: 2" in (repo / MODEL / "config.pbtxt").read_text()
    capsys.readouterr()
    assert triton.main([str(bundle), "--out", str(repo), "--instances", "2"]) == 0
    out = capsys.readouterr().out
    assert "note:" not in out, out
    assert f"wrote {repo / MODEL / '3'} " in out, out
    assert _versions(repo / MODEL) == [1, 2, 3]
    assert not [p for p in (repo.iterdir() if mount else tmp_path.iterdir()) if p.name.startswith(".")]
