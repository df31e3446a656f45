"""The training CLIs never replace what they did not write: --out checks, the writer lock, resume cross-checks,
Ctrl-C, out-of-memory and the sweep's up-front validation (each one line on stderr, exit 2)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.io import writer_lock
from train.__main__ import main as train_main
from train.eval import main as eval_main

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "tests" / "data" / "legacy-bundle-v1"
TINY = ["--dataset", "digits", "--epochs", "1", "--train-subset", "32", "--val-subset", "16", "--batch-size", "16",
        "--threads", "1"]
# What torch's CPU allocator raises when a tensor does not fit.
CPU_OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 400000000000 bytes. Error code 12 (Cannot allocate memory)")


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden ones too) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, train_cli) -> dict[str, Path]:
    """A finished two-step vit_c_micro run and a vit_p_micro run (each with checkpoint and resume.pt)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for model in ("vit_c_micro", "vit_p_micro"):
        out[model] = root / model
        code, _, err = train_cli(train_main, [*TINY, "--model", model, "--out", str(out[model])])
        assert code == 0, err
    return out


@pytest.fixture
def c_run(runs, tmp_path) -> Path:
    """A private copy of the vit_c_micro run."""
    return Path(shutil.copytree(runs["vit_c_micro"], tmp_path / "c"))


# ---------------------------------------------------------------------------------------------- train.eval --out
@pytest.mark.parametrize("victim", ["bundle/manifest.json", "run/checkpoint.json", "notes.json"])
def test_eval_never_replaces_a_file_it_did_not_write(victim, c_run, tmp_path, capsys, train_cli):
    shutil.copytree(BUNDLE, tmp_path / "bundle")
    (tmp_path / "notes.json").write_text('{"mine": true}\n')
    target = tmp_path / victim if not victim.startswith("run/") else c_run / "checkpoint.json"
    before = target.read_bytes()
    code, _, err = train_cli(eval_main, ["--checkpoint", str(c_run), "--limit", "8", "--out", str(target)], capsys)
    assert code == 2
    _one_line(err, "not a result of python -m train.eval")
    assert target.read_bytes() == before


def test_eval_out_directory_is_one_line(c_run, tmp_path, capsys, train_cli):
    code, _, err = train_cli(eval_main, ["--checkpoint", str(c_run), "--out", str(tmp_path)], capsys)
    assert code == 2
    _one_line(err, "is a directory")


def test_eval_replaces_its_own_results_old_and_new(c_run, tmp_path, capsys, train_cli):
    out = tmp_path / "eval.json"
    legacy = {"checkpoint": "x", "model": "vit_c_micro", "weights_sha256": "0" * 64, "dataset": "digits",
              "split": "val", "top1": 0.5, "top5": 0.9, "samples": 8}  # written before results carried "format"
    out.write_text(json.dumps(legacy))
    for _ in range(2):
        code, _, err = train_cli(eval_main, ["--checkpoint", str(c_run), "--limit", "8", "--out", str(out)], capsys)
        assert code == 0, err
        assert json.loads(out.read_text())["format"] == "vitc-eval"


def test_eval_out_of_memory_is_one_line(c_run, tmp_path, capsys, train_cli, monkeypatch):
    import train.evaluate

    def oom(*args, **kwargs):
        raise RuntimeError(CPU_OOM)

    monkeypatch.setattr(train.evaluate, "evaluate_checkpoint", oom)
    code, _, err = train_cli(eval_main, ["--checkpoint", str(c_run), "--out", str(tmp_path / "e.json")], capsys)
    assert code == 1
    _one_line(err, "out of memory", "--batch-size")


# ------------------------------------------------------------------------------------------------- train --out
@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("kind", ["user files", "bundle"])
def test_train_refuses_a_directory_that_is_not_a_run(kind, overwrite, tmp_path, capsys, train_cli):
    out = tmp_path / "out"
    if kind == "bundle":
        shutil.copytree(BUNDLE, out)
    else:
        out.mkdir()
        for name in ("metrics.jsonl", "curves.png", "notes.txt"):
            (out / name).write_text(f"the user's {name}\n")
    before = _snapshot(out)
    argv = [*TINY, "--epochs", "0", "--model", "vit_c_micro", "--out", str(out)]
    argv += ["--overwrite"] if overwrite else []
    code, _, err = train_cli(train_main, argv, capsys)
    assert code == 2
    _one_line(err, "is not a training run", "nothing was changed")
    assert _snapshot(out) == before


def test_train_takes_an_empty_directory_and_a_killed_runs_temporaries(tmp_path, capsys, train_cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".resume.pt.abcd1234.tmp").write_bytes(b"half a state")  # a first save that was killed mid-write
    code, _, err = train_cli(train_main, [*TINY, "--epochs", "0", "--model", "vit_c_micro", "--out", str(out)], capsys)
    assert code == 0, err
    assert (out / "checkpoint.json").is_file() and not (out / ".resume.pt.abcd1234.tmp").exists()


def test_a_second_writer_of_the_same_run_is_refused(tmp_path, capsys, train_cli):
    out = tmp_path / "out"
    with writer_lock(out.resolve()):  # what a running `python -m train --out out` holds
        code, _, err = train_cli(train_main, [*TINY, "--model", "vit_c_micro", "--out", str(out)], capsys)
    assert code == 2
    _one_line(err, "another process is writing")
    assert not out.exists()


def test_a_foreign_resume_state_cannot_take_over_a_run(runs, c_run, capsys, train_cli):
    shutil.copy(runs["vit_p_micro"] / "resume.pt", c_run / "resume.pt")
    before = _snapshot(c_run)
    code, _, err = train_cli(train_main, ["--out", str(c_run), "--resume"], capsys)
    assert code == 2
    _one_line(err, "resume.pt does not belong to the run", "vit_p_micro")
    assert _snapshot(c_run) == before


def test_resume_without_state_cannot_start_another_run_over_a_checkpoint(c_run, capsys, train_cli):
    (c_run / "resume.pt").unlink()
    before = _snapshot(c_run)
    code, _, err = train_cli(train_main, [*TINY, "--model", "vit_c_micro", "--seed", "7", "--out", str(c_run),
                                          "--resume"], capsys)
    assert code == 2
    _one_line(err, "does not belong to the run", "seed")
    assert _snapshot(c_run) == before


def test_overwrite_keeps_the_old_run_until_the_new_one_first_saves(c_run, capsys, train_cli, monkeypatch):
    from train.trainer import Trainer

    before = _snapshot(c_run)

    def interrupted(self, epoch, progress):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Trainer, "run_epoch", interrupted)
        with pytest.raises(KeyboardInterrupt):  # models.cli.run turns it into one line and exit 130
            train_cli(train_main, [*TINY, "--model", "vit_c_micro", "--out", str(c_run), "--overwrite"])
    assert _snapshot(c_run) == before
    # Carried through, the old run is replaced whole: no weights, resume state or curves of it are left.
    code, _, err = train_cli(train_main, [*TINY, "--epochs", "0", "--model", "vit_p_micro", "--out", str(c_run),
                                          "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads((c_run / "checkpoint.json").read_text())["model"] == "vit_p_micro"
    left = sorted(p.name for p in c_run.iterdir())
    assert left == ["checkpoint.json", "metrics.jsonl", next(n for n in left if n.startswith("weights-"))], left


def test_train_out_of_memory_is_one_line(tmp_path, capsys, train_cli, monkeypatch):
    from train.trainer import Trainer

    def oom(self):
        raise RuntimeError(CPU_OOM)

    monkeypatch.setattr(Trainer, "run", oom)
    code, _, err = train_cli(train_main, [*TINY, "--model", "vit_c_micro", "--out", str(tmp_path / "o")], capsys)
    assert code == 1
    _one_line(err, "out of memory", "--batch-size")


def _resume_progress(out: Path) -> dict | None:
    try:
        return torch.load(out / "resume.pt", weights_only=True)["progress"]
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return None


def _wait_mid_epoch(proc: subprocess.Popen, out: Path) -> None:
    """Until the training `proc` has saved a step inside an epoch (a resumable state), or fail if it ended first."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (p := _resume_progress(out)) is not None and p["step_in_epoch"] > 0:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped"


@pytest.mark.parametrize("stop, status, says",
                         [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_running_training_locks_its_directory_and_ctrl_c_leaves_it_resumable(tmp_path, capsys, train_cli, stop,
                                                                               status, says):
    """Ctrl-C, and SIGTERM (kill, timeout, Kubernetes, Slurm: it used to end the run silently with 143), stop the
    run with one line and leave it resumable."""
    out = tmp_path / "run"
    # Many epochs: the run must still be going when the second process has tried and SIGINT arrives.
    argv = ["--model", "vit_c_micro", "--dataset", "digits", "--epochs", "50", "--batch-size", "16", "--threads", "1",
            "--val-subset", "16", "--save-every-steps", "2", "--device", "cpu", "--out", str(out)]
    # SIGINT back to its default in the child: a test run started in the background (nohup, `&` in a script) ignores
    # it, and Python then never turns it into KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, "-m", "train", *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_mid_epoch(proc, out)
        code, _, err = train_cli(train_main, ["--out", str(out), "--resume"], capsys)
        assert code == 2
        _one_line(err, "another process is writing")
        proc.send_signal(stop)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == status
    _one_line(err, says)
    step = _resume_progress(out)["global_step"]
    code, out_text, err = train_cli(train_main, ["--out", str(out), "--resume", "--max-steps", str(step + 1)], capsys)
    assert code == 0, err
    assert "resuming" in out_text and (out / "checkpoint.json").is_file()


# ------------------------------------------------------------------------------------------------ train.sweep
@pytest.mark.parametrize("args, needle", [
    (["--train-args=--bogus 1"], "unrecognized arguments: --bogus"),
    (["--train-args=--batch-size 0"], "--batch-size"),
    (["--train-args=--lr 0.5"], "--lr is set by the sweep"),
    (["--train-args=--out elsewhere"], "--out is set by the sweep"),
    (["--train-args=--lr-ref-batch 32"], "--lr-ref-batch is set by the sweep"),  # it rescales the sampled lr
    (["--train-args=--max-steps 3"], "--max-steps: it stops every run before the epochs"),
    (["--models", "vit_c_micro"], "compares ViT_C with ViT_P"),
    (["--models", "vit_c_micro,vit_c_nano"], "compares ViT_C with ViT_P"),
])
def test_sweep_refuses_bad_settings_before_any_run(args, needle, tmp_path, capsys):
    from train.sweep.__main__ import main

    assert main([*args, "--out", str(tmp_path / "s"), "--dry-run"]) == 2
    _one_line(capsys.readouterr().err, needle)


def test_sweep_report_only_needs_results(tmp_path, capsys):
    from train.sweep.__main__ import main

    assert main(["--report-only", "--out", str(tmp_path / "none")]) == 2
    _one_line(capsys.readouterr().err, "no study.json in")
    assert not (tmp_path / "none").exists()


def test_sweep_moves_a_legacy_log_out_of_the_run_directory(tmp_path):
    from train.sweep.runner import _adopt_legacy_log

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "train.log").write_text("first attempt\n")
    log = tmp_path / "runs" / "r.log"
    _adopt_legacy_log(run, log)
    assert log.read_text() == "first attempt\n" and not any(run.iterdir())  # an empty directory: train takes it


def test_runtime_identifies_each_model_by_its_stem(capsys):
    from train.sweep.runtime import conv_and_patch, main

    assert conv_and_patch("vit_p_micro,vit_c_micro") == ("vit_c_micro", "vit_p_micro")
    assert conv_and_patch("vit_c_micro, vit_p_micro") == ("vit_c_micro", "vit_p_micro")
    for models in ("vit_p_micro,vit_p_nano", "vit_c_micro", "vit_c_micro,vit_p_micro,vit_p_nano"):
        assert main(["--models", models]) == 2
        _one_line(capsys.readouterr().err, "--models")


def test_runtime_bounds_the_batch_before_allocating(capsys, monkeypatch):
    from train.sweep import runtime

    assert runtime.available_memory("cpu") > 0  # known here (Linux), so the bound applies
    monkeypatch.setattr(runtime, "available_memory", lambda device: 64 << 30)  # the same on a bigger machine

    def must_not_run(*args, **kwargs):
        raise AssertionError("measured a batch that cannot fit")

    monkeypatch.setattr(runtime, "measure", must_not_run)
    assert runtime.main(["--models", "vit_c_18gf,vit_p_18gf", "--batch", "4096"]) == 2
    _one_line(capsys.readouterr().err, "--batch 4096", "vit_c_18gf needs about", "GiB")
    assert runtime.memory_needed("vit_c_nano", 64) < 1 << 30  # the default batch of the small pair fits anywhere


def test_runtime_out_of_memory_is_one_line(capsys, monkeypatch):
    from train.sweep import runtime

    def oom(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(runtime, "measure", oom)
    assert runtime.main(["--models", "vit_c_micro,vit_p_micro", "--batch", "2"]) == 1
    _one_line(capsys.readouterr().err, "out of memory", "--batch")


def test_sigterm_to_the_whole_process_group_with_loader_workers_is_one_line(tmp_path):
    """`timeout`, Slurm and systemd signal the whole group: the DataLoader workers died of SIGTERM first and torch
    raised "DataLoader worker is killed by signal" over the run's own clean stop (a traceback, exit 1)."""
    import os

    out = tmp_path / "run"
    argv = ["--model", "vit_c_micro", "--dataset", "digits", "--epochs", "50", "--batch-size", "16", "--threads", "1",
            "--val-subset", "16", "--save-every-steps", "2", "--device", "cpu", "--workers", "2", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "train", *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_mid_epoch(proc, out)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 143, err
    _one_line(err, "terminated")
