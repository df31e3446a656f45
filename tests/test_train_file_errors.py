"""Files the training side cannot read or write, and closed output streams: a checkpoint or resume state without
read permission is one line naming it (exit 2) from every command that reads it, an --out training cannot write
into is refused before the training, and a closed stdout or stderr does not stop a run.

Permissions are tested for real: as root (CI), the commands run under setpriv without the privilege to bypass
them; where that cannot be done the tests say so and skip. Every command runs as its own process (no DataLoader
workers are forked from this one)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data.datasets import default_preprocessing
from models.checkpoint import save_checkpoint
from models.registry import build_model

ROOT = Path(__file__).resolve().parents[1]
DENIED = "Permission denied"
TINY = ["--model", "vit_c_micro", "--dataset", "digits", "--epochs", "1", "--max-steps", "1", "--train-subset", "32",
        "--val-subset", "16", "--batch-size", "16", "--threads", "1", "--device", "cpu"]

# Run under the unprivileged prefix: each command's main() in this one process (one torch import for all of them),
# its exit code and what it printed, as JSON; an exception escaping main() is what would be a traceback.
DRIVER = r"""
import contextlib, io, json, sys
from export.cli import main as export_main
from train.__main__ import main as train_main
from train.eval import main as eval_main

mains = {"train.eval": eval_main, "export": export_main, "train": train_main}
results = []
for name, argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = mains[name](argv)
        except SystemExit as exc:
            code = exc.code
        except BaseException as exc:
            code = f"raised {type(exc).__name__}: {exc}"
    results.append({"command": name, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""


def _unprivileged() -> list[str] | None:
    """A command prefix under which file permissions apply (root bypasses them: setpriv drops that), or None."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if shutil.which("setpriv") else None


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _checkpoint(dest: Path) -> Path:
    """An untrained vit_c_micro checkpoint for digits (the readers refuse its files before its weights matter),
    with a resume.pt that is never reached."""
    model = build_model("vit_c_micro", num_classes=10)
    pre = default_preprocessing("digits", model.cfg.image_size)
    save_checkpoint(dest, model, class_names=[str(i) for i in range(10)], preprocessing=pre,
                    extra={"dataset": "digits"})
    (dest / "resume.pt").write_bytes(b"never read")
    return dest


@pytest.fixture(scope="module")
def denied(tmp_path_factory) -> dict[str, object]:
    """Every command run once, in one unprivileged process, on a file or directory it may not read or write:
    {"paths": what was denied, "results": call name -> exit code, stdout, stderr}."""
    root = tmp_path_factory.mktemp("denied")
    prefix = _unprivileged()
    probe = root / "probe"
    probe.write_text("x")
    probe.chmod(0)
    stopped = prefix is not None and subprocess.run([*prefix, "cat", str(probe)], capture_output=True).returncode
    probe.unlink()
    if not stopped:
        pytest.skip("running as root without setpriv (util-linux): cannot run a process that permissions stop")
    files, folder, ro = _checkpoint(root / "files"), _checkpoint(root / "folder"), root / "ro"
    weights = next(files.glob("weights-*.safetensors"))
    ro.mkdir()
    calls = {
        "eval weights": ("train.eval", ["--checkpoint", str(files), "--limit", "8", "--out", str(root / "e1.json"),
                                        "--device", "cpu"]),
        "export weights": ("export", ["--checkpoint", str(files), "--targets", "onnx", "--out", str(root / "b1")]),
        "resume file": ("train", ["--out", str(files), "--resume", "--device", "cpu"]),
        "eval folder": ("train.eval", ["--checkpoint", str(folder), "--limit", "8", "--out", str(root / "e2.json"),
                                       "--device", "cpu"]),
        "export folder": ("export", ["--checkpoint", str(folder), "--targets", "onnx", "--out", str(root / "b2")]),
        "resume folder": ("train", ["--out", str(folder), "--resume", "--device", "cpu"]),
        "read-only out": ("train", [*TINY, "--out", str(ro)]),
    }
    modes = [(weights, 0), (files / "resume.pt", 0), (folder, 0), (ro, 0o555)]
    for path, mode in modes:
        path.chmod(mode)
    try:
        run = subprocess.run([*prefix, sys.executable, "-c", DRIVER, json.dumps(list(calls.values()))], cwd=root,
                             env=_env(), capture_output=True, text=True, timeout=300)
    finally:
        for path, _ in modes:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert run.returncode == 0, run.stderr
    results = dict(zip(calls, json.loads(run.stdout.strip().splitlines()[-1]), strict=True))
    return {"paths": {"root": root, "files": files, "weights": weights, "folder": folder, "ro": ro},
            "results": results}


def _one_line(result: dict, expected: str) -> None:
    assert result["code"] == 2, result
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result


@pytest.mark.parametrize("call", ["eval weights", "export weights"])
def test_unreadable_weights_are_one_line_from_every_reader(denied, call):
    _one_line(denied["results"][call], f"cannot read weights {denied['paths']['weights']}: {DENIED}")
    root = denied["paths"]["root"]
    assert not (root / "e1.json").exists() and not (root / "b1").exists()


def test_an_unreadable_resume_state_says_permission_not_a_bad_archive(denied):
    result = denied["results"]["resume file"]
    _one_line(result, f"cannot read resume state {denied['paths']['files'] / 'resume.pt'}: {DENIED}")
    assert "torch.save" not in result["stderr"]


@pytest.mark.parametrize("call", ["eval folder", "export folder", "resume folder"])
def test_an_unsearchable_checkpoint_directory_is_one_line_from_every_reader(denied, call):
    folder = denied["paths"]["folder"]
    expected = f"cannot read resume state {folder / 'resume.pt'}" if call == "resume folder" \
        else f"cannot read checkpoint directory {folder}"
    _one_line(denied["results"][call], f"{expected}: {DENIED}")


def test_a_read_only_out_directory_is_refused_before_training(denied):
    result, ro = denied["results"]["read-only out"], denied["paths"]["ro"]
    _one_line(result, f"--out {ro}: cannot use it as the run directory: {DENIED}")
    assert result["stdout"] == ""  # refused before the data loaded: no run line, no epoch
    assert list(ro.iterdir()) == []


def test_a_closed_stderr_does_not_stop_training(tmp_path):
    """`2>&-`: the progress bar's and the run's lines go nowhere; the run trains and saves as usual."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train", *TINY, "--out", str(out)]
    run = subprocess.run(["sh", "-c", '"$@" 2>&-', "sh", *cmd], cwd=tmp_path, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout
    assert "checkpoint" in run.stdout  # stdout still says what was written
    assert json.loads((out / "checkpoint.json").read_text())["training"]["steps"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the lock is gone, nothing else was written
