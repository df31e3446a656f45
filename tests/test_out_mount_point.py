"""A mount point as --out (a Docker or Kubernetes volume, a bind mount): the kernel refuses to rename it (EBUSY) and
to rename anything into it from outside (EXDEV).

- `python -m export` swaps the whole bundle in by renaming --out: refused in one line, exit 2, before any work,
  naming a directory inside it to give instead; `models.io.atomic_dir` refuses it too, before its body runs, for
  every other writer (MountPointTarget, which `export.bundle.build` reports as bad input).
- `python -m export.triton` adds models to a repository by renaming each in: into a mount point it stages, and
  locks, inside --out (hidden names vitc's server skips), removes that staging on every way out, and the next run
  removes what a killed one left; into anything else it stages beside --out, as before.

Mounting needs root, so most tests fake the mount table (os.path.ismount, /proc/self/mountinfo); the last ones
bind-mount for real and skip, saying why, where that is not possible.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_serve_fixtures import micro_bundle, micro_checkpoint, one_line

from export import bundle as export_bundle
from export import cli as export_cli
from export import triton
from models import io
from models.io import DirectoryBusy, MountPointTarget, atomic_dir, is_mount_point, writer_lock
from runtimes import ExportError


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return micro_bundle(tmp_path_factory, ("onnx",))


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def _code(main, args: list[str]) -> int:  # noqa: ANN001 - a CLI entry point
    try:
        return main(args)
    except SystemExit as exc:
        return exc.code


# ------------------------------------------------------------------------------------------- telling a mount point
def test_the_mount_table_finds_bind_mounts_that_ismount_misses(tmp_path, monkeypatch):
    vol = tmp_path / "a volume"
    (vol / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(vol)
    table = tmp_path / "mountinfo"  # as the kernel writes it: a space in a path is \040
    escaped = str(vol.resolve()).replace(" ", "\\040")
    table.write_text(f"22 1 8:1 / / rw - ext4 /dev/sda1 rw\n45 22 8:1 /x {escaped} rw,relatime - ext4 /dev/sda1 rw\n")
    monkeypatch.setattr(io, "MOUNTINFO", str(table))
    assert not os.path.ismount(vol)  # one device, another inode: what a bind mount within a file system looks like
    assert is_mount_point(vol) and is_mount_point(f"{vol}/") and is_mount_point(f"{vol}/.")
    assert not is_mount_point(tmp_path / "link")  # a link: renaming it moves the link, not the mount
    assert not is_mount_point(vol / "sub") and not is_mount_point(tmp_path / "absent")
    monkeypatch.setattr(io, "MOUNTINFO", str(tmp_path / "none"))  # no mount table (not Linux): ismount alone
    assert not is_mount_point(vol)


# ----------------------------------------------------------------------------------------------- python -m export
def test_export_refuses_a_mount_point_in_one_line_before_any_work(tmp_path, mounts, monkeypatch, capsys):
    def slow(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the export started before --out was checked")

    monkeypatch.setattr(export_bundle, "build", slow)
    ckpt = micro_checkpoint(tmp_path)
    vol = tmp_path / "vol"
    vol.mkdir()
    mounts.add(str(vol))
    for out, name, example in ((str(vol), None, vol / "ckpt"), (f"{vol}/", None, vol / "ckpt"),
                               (str(vol), "animals-c", vol / "animals-c")):
        argv = ["--checkpoint", str(ckpt), "--out", out, "--targets", "onnx-fp32", *(["--name", name] if name else [])]
        assert _code(export_cli.main, argv) == 2
        assert one_line(capsys) == (
            f"python -m export: error: --out {out} is a mount point, which the bundle cannot replace (it is swapped "
            f"in by a rename): give a directory inside it, e.g. {example}")
    assert _listing(tmp_path) == ["ckpt", "vol"] and _listing(vol) == []


def test_atomic_dir_refuses_a_mount_point_before_its_body(tmp_path, mounts):
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "theirs.txt").write_text("kept")
    mounts.add(str(vol))
    ran = False
    with pytest.raises(MountPointTarget, match=rf"^{vol} is a mount point, .* e\.g\. {vol}/NAME$"), atomic_dir(vol):
        ran = True
    assert not ran and _listing(tmp_path) == ["vol"] and (vol / "theirs.txt").read_text() == "kept"
    assert issubclass(MountPointTarget, DirectoryBusy)  # what build() reports as bad input, one line


def test_build_refuses_a_mount_point_before_any_artifact(tmp_path, mounts, monkeypatch):
    def built(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("an artifact was built for an output that cannot be swapped in")

    monkeypatch.setattr(export_bundle, "_build_one", built)
    ckpt = micro_checkpoint(tmp_path)
    vol = tmp_path / "vol"
    vol.mkdir()
    mounts.add(str(vol))
    with pytest.raises(ExportError, match="is a mount point"):
        export_bundle.build_bundle(ckpt, vol, targets=("onnx-fp32",), parity_samples=4, log=lambda _: None)
    assert _listing(vol) == [] and _listing(tmp_path) == ["ckpt", "vol"]


# ----------------------------------------------------------------------------------------- python -m export.triton
@pytest.fixture()
def staged_in(monkeypatch) -> list[Path]:
    """The directories export.triton creates its staging directory in (tempfile.mkdtemp(..., suffix=".tmp"))."""
    where: list[Path] = []
    real = tempfile.mkdtemp

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if kwargs.get("suffix") == ".tmp":
            where.append(Path(kwargs["dir"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", spy)
    return where


def test_triton_stages_inside_a_mount_point_and_leaves_nothing(tmp_path, bundle, mounts, staged_in, capsys):
    vol = tmp_path / "vol"
    vol.mkdir()
    mounts.add(str(vol))
    assert _code(triton.main, [str(bundle), "--out", str(vol)]) == 0
    assert staged_in == [vol]  # beside it, the per-model renames would cross the mount (EXDEV)
    assert _listing(vol) == ["inferenceservice.yaml", "micro-onnx-fp32"]
    assert _listing(tmp_path) == ["vol"]  # nothing above --out: no lock, no staging (a container's / may be read-only)
    assert (vol / "micro-onnx-fp32" / "1" / "model.onnx").is_file()
    # a new version into the repository it now is: the same
    assert _code(triton.main, [str(bundle), "--out", f"{vol}/"]) == 0
    assert staged_in == [vol, vol] and _listing(vol / "micro-onnx-fp32") == ["1", "2", "config.pbtxt", "labels.txt"]
    assert _listing(vol) == ["inferenceservice.yaml", "micro-onnx-fp32"] and _listing(tmp_path) == ["vol"]
    assert "wrote" in capsys.readouterr().out


def test_triton_still_stages_beside_anything_else(tmp_path, bundle, staged_in):
    """Triton would take a hidden directory in the repository for a model: used only where it must be."""
    repo = tmp_path / "repo"
    repo.mkdir()
    triton.write_repository(bundle, repo)
    assert staged_in == [tmp_path]
    assert _listing(repo) == ["inferenceservice.yaml", "micro-onnx-fp32"] and _listing(tmp_path) == ["repo"]


def test_triton_removes_what_a_killed_run_left_inside_a_mount_point(tmp_path, bundle, mounts):
    vol = tmp_path / "vol"
    vol.mkdir()
    mounts.add(str(vol))
    # a run killed before its first model was renamed in: the volume holds its staging directory and lock file only
    (vol / ".export-triton.k1ll3d_x.tmp" / "micro-onnx-fp32" / "1").mkdir(parents=True)
    (vol / ".export-triton.lock").touch()
    assert triton.write_repository(bundle, vol) == [vol / "micro-onnx-fp32" / "1"]  # empty, not a foreign directory
    assert _listing(vol) == ["inferenceservice.yaml", "micro-onnx-fp32"]
    (vol / ".export-triton.k1ll3d_y.tmp" / ".publishing" / "old-abc").mkdir(parents=True)  # killed while publishing
    (vol / ".export-triton.k1ll3d_y.tmp" / "inferenceservice.yaml").touch()  # before its last rename
    (vol / ".export-triton.lock").touch()
    notes: list[str] = []
    assert triton.write_repository(bundle, vol, notes=notes) == [vol / "micro-onnx-fp32" / "2"]
    assert _listing(vol) == ["inferenceservice.yaml", "micro-onnx-fp32"]
    assert any(n.startswith(f"{vol}: a publish into it was stopped before it finished (killed)") for n in notes), notes
    notes.clear()
    assert triton.write_repository(bundle, vol, notes=notes) == [vol / "micro-onnx-fp32" / "3"]
    assert not any("stopped before it finished" in n for n in notes), notes  # nothing was left this time


def test_triton_into_a_mount_point_keeps_one_writer_and_writes_nothing_on_error(tmp_path, bundle, mounts, capsys):
    vol = tmp_path / "vol"
    vol.mkdir()
    mounts.add(str(vol))
    triton.write_repository(bundle, vol)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with writer_lock(vol, vol / ".export-triton.lock"):  # what a run writing into the volume holds
        assert _code(triton.main, [str(bundle), "--out", str(vol)]) == 2
        assert one_line(capsys) == (f"python -m export.triton: error: another process is writing {vol}: retry when it "
                                    "finishes")
    assert _code(triton.main, [str(bundle), "--out", str(vol), "--version", "1"]) == 2  # found once staged
    assert "already exists; versions are never overwritten" in one_line(capsys)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


# ------------------------------------------------------------------------------------------------ real bind mounts
@contextlib.contextmanager
def _bind(src: Path, dst: Path) -> Iterator[None]:
    """`mount --bind src dst` for the block; skips the test, saying why, where that cannot be done."""
    if os.geteuid() != 0:
        pytest.skip("a real bind mount needs root (the faked mount table above covers the logic)")
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    done = subprocess.run(["mount", "--bind", str(src), str(dst)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"mount --bind failed here ({done.stderr.strip()[:200] or done.returncode}): no mount namespace "
                    "rights in this container")
    try:
        yield
    finally:
        if subprocess.run(["umount", str(dst)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(dst)], capture_output=True, check=False)


def test_a_real_bind_mount(tmp_path, bundle, monkeypatch, capsys):
    def slow(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the export started before --out was checked")

    monkeypatch.setattr(export_bundle, "build", slow)
    ckpt = micro_checkpoint(tmp_path)
    (real := tmp_path / "real").mkdir()
    (vol := tmp_path / "vol").mkdir()
    with _bind(real, vol):
        assert not os.path.ismount(vol)  # one file system: ismount alone would let the export run into EBUSY
        assert _code(export_cli.main, ["--checkpoint", str(ckpt), "--out", str(vol), "--targets", "onnx-fp32"]) == 2
        assert f"--out {vol} is a mount point, which the bundle cannot replace" in one_line(capsys)
        assert _code(triton.main, [str(bundle), "--out", str(vol)]) == 0  # EXDEV before: staged beside it
        assert _listing(vol) == ["inferenceservice.yaml", "micro-onnx-fp32"] == _listing(real)
        assert _listing(tmp_path) == ["ckpt", "real", "vol"]
    assert (real / "micro-onnx-fp32" / "1" / "model.onnx").is_file()


def test_a_real_bind_mount_onto_itself(tmp_path, capsys):
    (vol := tmp_path / "vol").mkdir()
    with _bind(vol, vol):
        with pytest.raises(MountPointTarget), atomic_dir(vol):
            pass
        assert _code(export_cli.main, ["--checkpoint", str(tmp_path / "ckpt"), "--out", str(vol)]) == 2
        assert f"--out {vol} is a mount point" in one_line(capsys)
