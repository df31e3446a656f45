"""A failing disk while OpenVINO writes its IR is the machine failing, not the artifact; and an export never replaces
a bundle whose servable artifact it refused.

OpenVINO's C++ writer reports a failed write as RuntimeError "basic_ios::clear: iostream error" (and deletes what it
wrote): the export took that for a conversion failure, refused openvino-fp32, exited 0 and swapped in a bundle
without the old, servable IR. Here the write fails for real: under a file-size limit OpenVINO's own write meets
(EFBIG), and on a full tmpfs (ENOSPC, where a mount namespace can be made).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_serve_fixtures import micro_bundle

from export import cli
from models.bundle import read_manifest

ROOT = Path(__file__).resolve().parents[1]
EXPORT = ("--max-batch", "4", "--parity-samples", "16", "--threads", "1")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """vit_c_micro (random head) with a servable openvino-fp32 IR beside torch-fp32."""
    out = micro_bundle(tmp_path_factory, ("openvino-fp32",))
    assert [a.id for a in read_manifest(out).servable()] == ["torch-fp32", "openvino-fp32"]
    return out


@pytest.fixture(scope="module")
def checkpoint(bundle) -> Path:
    return bundle.parent / "ckpt"


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its content (None for directories)."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


def _leftovers(parent: Path, name: str) -> list[str]:
    """Temporary directories or lock files of an export of `parent/name` that outlived it."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("python -m export: error")]


# In a child: OpenVINO's save_model runs under a file-size limit just below its .bin (with SIGXFSZ ignored, as a
# shell's `ulimit -f` under a supervisor leaves it, so the write fails with EFBIG instead of killing the process).
# Each export starts without the limit: the ONNX hub and the safetensors before it are larger than the limit.
_LIMITED_SAVE = textwrap.dedent("""
    import json, resource, signal, sys
    import openvino
    from export import cli

    real, hard = openvino.save_model, resource.getrlimit(resource.RLIMIT_FSIZE)[1]

    def save_model(*args, **kwargs):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, hard))
        return real(*args, **kwargs)

    openvino.save_model = save_model
    codes = []
    for argv in json.loads(sys.argv[1]):
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        print("=== export", file=sys.stderr, flush=True)
        codes.append(cli.main(argv))
    print(json.dumps(codes))
""")


def test_a_file_size_limit_while_openvino_writes_exits_1_and_keeps_the_old_bundle(bundle, checkpoint, tmp_path):
    out = shutil.copytree(bundle, tmp_path / "b")
    before = _tree(out)
    assert (out / "openvino-fp32.bin").stat().st_size > 50_000 and (out / "openvino-fp32.xml").stat().st_size > 50_000
    runs = [["--checkpoint", str(checkpoint), "--out", str(path), "--targets", "openvino-fp32", *EXPORT]
            for path in (out, tmp_path / "new")]
    proc = subprocess.run([sys.executable, "-c", _LIMITED_SAVE, json.dumps(runs)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # Over the old bundle, and into a new --out (where CI saw a success with the IR refused): exit 1, one line.
    assert json.loads(proc.stdout.splitlines()[-1]) == [1, 1], proc.stderr[-3000:]
    for log in proc.stderr.split("=== export\n")[1:]:
        assert "REFUSED" not in log and "refused" not in log, log
        errors = _errors(log)
        assert len(errors) == 1, log
        too_large = "python -m export: error: openvino-fp32: OSError: [Errno 27] File too large"
        assert errors[0].startswith(too_large), errors
        assert "unchanged" in errors[0], errors
    assert _tree(out) == before
    assert not (tmp_path / "new").exists()
    assert _leftovers(tmp_path, "b") == [] and _leftovers(tmp_path, "new") == []


def _can_mount_tmpfs(where: Path) -> bool:
    """Whether a private mount namespace (a user namespace, or root) can mount a tmpfs here."""
    if not shutil.which("unshare"):
        return False
    where.mkdir()
    try:
        probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                               capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


# In a private mount namespace (the tmpfs is gone with it): the old bundle on a tmpfs with room left for the ONNX
# hub and the safetensors, not for the IR; the export over it, then what it left, as JSON.
_FULL_DISK = textwrap.dedent("""
    import json, os, shutil, subprocess, sys
    from pathlib import Path

    old, mnt, cmd = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    out = shutil.copytree(old, mnt / "b")
    tree = lambda: {p.relative_to(out).as_posix(): p.read_bytes().hex() for p in sorted(out.rglob("*"))}
    before = tree()
    room = 2 * (out / "model.safetensors").stat().st_size + 48 * 1024  # hub + safetensors fit, the IR does not
    st = os.statvfs(mnt)
    (mnt / "fill").write_bytes(bytes(st.f_bavail * st.f_frsize - room))
    proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True)
    print(json.dumps({"rc": proc.returncode, "stderr": proc.stderr, "same": tree() == before,
                      "left": sorted(p.name for p in mnt.iterdir() if p.name not in ("b", "fill"))}))
""")


def test_a_full_disk_while_openvino_writes_exits_1_and_keeps_the_old_bundle(bundle, checkpoint, tmp_path):
    mnt = tmp_path / "mnt"
    if not _can_mount_tmpfs(mnt):
        pytest.skip("no mount namespace here (unshare -rm) to make a small tmpfs in")
    cmd = [sys.executable, "-m", "export", "--checkpoint", str(checkpoint), "--targets", "openvino-fp32", *EXPORT]
    proc = subprocess.run(["unshare", "-rm", sys.executable, "-c", _FULL_DISK, str(bundle), str(mnt), json.dumps(cmd)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    log = got["stderr"]
    assert got["rc"] == 1 and "Traceback" not in log and "REFUSED" not in log, log
    errors = _errors(log)
    assert len(errors) == 1, log
    assert errors[0].startswith("python -m export: error: openvino-fp32: OSError: [Errno 28] No space left"), log
    assert "unchanged" in errors[0], errors
    assert got["same"] and got["left"] == [], got


def test_a_refused_rebuild_never_replaces_the_servable_artifact_it_was_to_replace(bundle, checkpoint, tmp_path,
                                                                               capsys, monkeypatch):
    """A conversion failure (here a save_model error that is not the disk: the disk has room) still refuses only
    its artifact; but over a bundle that serves that artifact, the old bundle is kept (exit 2, one line) unless
    --replace."""
    import openvino

    def broken_save(*_args, **_kwargs) -> None:
        raise RuntimeError("Unsupported operation in the IR serializer")

    monkeypatch.setattr(openvino, "save_model", broken_save)
    out = shutil.copytree(bundle, tmp_path / "b")
    before = _tree(out)
    argv = ["--checkpoint", str(checkpoint), "--out", str(out), "--targets", "openvino-fp32", *EXPORT]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(_errors(err)) == 1, err
    assert _errors(err)[0] == (
        f"python -m export: error: output {out} holds servable artifacts this export refused: openvino-fp32 (export "
        "failed: RuntimeError: Unsupported operation in the IR serializer); the bundle is unchanged (pass --replace "
        "to replace it without them, or give another --out)")
    assert _tree(out) == before and _leftovers(tmp_path, "b") == []
    # Into a new --out the refusal is reported and the bundle written (exit 0), as before.
    assert cli.main([*argv[:2], "--out", str(tmp_path / "new"), *argv[4:]]) == 0
    assert "refused openvino-fp32: export failed: RuntimeError: Unsupported operation" in capsys.readouterr().err
    # --replace replaces it as asked: the refused artifact is listed without files.
    assert cli.main([*argv, "--replace"]) == 0
    ov = read_manifest(out).artifacts[-1]
    assert ov.id == "openvino-fp32" and not ov.servable and not list(out.glob("openvino-fp32*"))
