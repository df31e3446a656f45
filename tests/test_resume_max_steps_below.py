"""`--resume --max-steps N` on a run whose resume.pt has already trained more than N steps (it was killed after a
periodic save): the run cannot be taken back to N, and it wrote a checkpoint whose weights were the saved step's
but whose command_line said `--max-steps N`, with stopped_by_max_steps true, an empty metrics.jsonl and no
curves.png. Below the saved step is refused (exit 2, nothing changed); at it, the checkpoint holds that step with
the record of the epoch it stopped in, as a run stopped there by --max-steps writes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from models.checkpoint import META_FILE, read_checkpoint_meta
from train.state import RESUME_FILE, load_resume

REPO = Path(__file__).resolve().parents[1]
# One epoch of 40 steps, resume.pt every 5: a kill lands mid-epoch.
KILLED_RUN = ["--device", "cpu", "--model", "vit_c_micro", "--dataset", "digits", "--epochs", "1", "--batch-size",
              "16", "--train-subset", "640", "--val-subset", "16", "--threads", "1", "--no-progress",
              "--save-every-steps", "5"]


def _train(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", *argv], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> tuple[Path, int]:
    """A run SIGKILLed just after its first periodic resume.pt (its step: 5, or 10 on a slow machine)."""
    out = tmp_path_factory.mktemp("killed") / "run"
    proc = subprocess.Popen([sys.executable, "-m", "train", *KILLED_RUN, "--out", str(out)],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (out / RESUME_FILE).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    state = load_resume(out)
    assert state is not None, "the run ended before its first resume.pt"
    progress = state["progress"]
    assert 0 < progress["step_in_epoch"] == progress["global_step"] < 40, progress  # mid-epoch, no record yet
    assert not (out / META_FILE).exists() and not progress["history"]
    return out, progress["global_step"]


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def test_resume_with_max_steps_below_the_saved_step_is_refused(killed):
    out, step = killed
    before = _files(out)
    done = _train("--out", str(out), "--resume", "--max-steps", str(step - 2))
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"python -m train: error: --max-steps {step - 2} is below the {step} steps resume.pt has already trained: "
        f"pass --max-steps {step} or more, or leave it out"], done.stderr
    assert _files(out) == before  # nothing written: no checkpoint of step-`step` weights claiming fewer


def test_resume_with_max_steps_at_the_saved_step_records_the_epoch_it_stopped_in(killed, tmp_path):
    saved, step = killed
    out = tmp_path / "run"
    out.mkdir()
    for name, data in _files(saved).items():
        (out / name).write_bytes(data)
    done = _train("--out", str(out), "--resume", "--max-steps", str(step))
    assert done.returncode == 0, done.stderr
    t = read_checkpoint_meta(out).raw["training"]
    assert t["steps"] == step and t["stopped_by_max_steps"] is True
    assert t["command_line"].endswith(f"--max-steps {step}"), t["command_line"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"], r["complete"]) for r in records] == [(1, step, False)], records
    assert records[0]["val_top1"] is not None and records[0]["train_loss"] is not None
    assert t["best_val_top1"] == records[0]["val_top1"] and t["best_val_top1_epoch"] == 1
    assert (out / "curves.png").is_file()
    assert load_resume(out)["progress"]["history"] == records  # resume.pt holds the record too
    # Resumed again, it has nothing left to do and says so.
    again = _train("--out", str(out), "--resume")
    assert again.returncode == 0 and f"stopped at --max-steps {step} (step {step} of 40)" in again.stdout, again
