"""Two sweeps on one study: the second is refused up front (the first finishes and reports); a failing training is
one readable line with the training's own exit code; after a failure no queued training starts.

Two `python -m train.sweep` on one --out both failed (exit 1, each losing a run), left no summary.json or
claims.md, appended two trainings' output into one <run_id>.log, and said the log tail as one line of literal "\\n".
Trainings are stand-ins here (no torch training): what is tested is the sweep around them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from models.io import DirectoryBusy, writer_lock
from train.sweep import runner, study
from train.sweep.__main__ import main
from train.sweep.spec import RunSpec

ROOT = Path(__file__).resolve().parents[1]
# The smallest study: one (lr, wd) sample per model, so two runs.
STUDY = ["--preset", "reduced", "--study", "stability", "--models", "vit_c_micro,vit_p_micro", "--samples", "1",
         "--optimizers", "adamw", "--stability-epochs", "1", "--workers", "1", "--threads", "1"]

# A sweep in its own process whose training phase waits until `<gate>/go` exists (after touching `<gate>/started`).
HELD_SWEEP = """
import sys, time
from pathlib import Path
from models import cli
from train.sweep import runner, study
from train.sweep.__main__ import main

gate = Path(sys.argv[1])

def train(specs, study_dir, runs_root, slots, progress=None):
    (gate / "started").touch()
    while not (gate / "go").exists():
        time.sleep(0.02)
    return []

runner.run_all = train
study.measure_runtime = lambda *a, **k: None
cli.run(lambda: main(sys.argv[2:]), "python -m train.sweep")
"""


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _start_held_sweep(gate: Path, argv: list[str]) -> subprocess.Popen:
    gate.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HELD_SWEEP, str(gate), *argv], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    while not (gate / "started").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the first sweep did not reach its trainings: {proc.communicate()}")
        time.sleep(0.02)
    return proc


def test_a_second_sweep_on_the_study_is_refused_at_once_and_the_first_reports(tmp_path, capsys, monkeypatch):
    out, runs = tmp_path / "study", tmp_path / "runs"
    argv = [*STUDY, "--out", str(out), "--runs-dir", str(runs)]
    first = _start_held_sweep(tmp_path / "gate", argv)
    try:
        monkeypatch.setattr(runner, "run_all", lambda *a, **k: pytest.fail("a second sweep trained"))
        monkeypatch.setattr(study, "measure_runtime", lambda *a, **k: pytest.fail("a second sweep measured"))
        assert main(argv) == 2
        assert _one_line_error(capsys) == (f"python -m train.sweep: error: another sweep is writing {out} (one at a "
                                           f"time): wait for it, or give another --out")
        # The same study under another --runs-dir, and a report rebuilt in the middle of it, are refused the same.
        assert main([*STUDY, "--out", str(out), "--runs-dir", str(tmp_path / "other")]) == 2
        assert f"another sweep is writing {out} (one at a time)" in _one_line_error(capsys)
        assert main(["--out", str(out), "--report-only"]) == 2
        assert f"another sweep is writing {out} (one at a time)" in _one_line_error(capsys)
        # Another study training into the same runs directory would retrain the same runs into the same logs.
        assert main([*STUDY, "--out", str(tmp_path / "study2"), "--runs-dir", str(runs)]) == 2
        assert _one_line_error(capsys) == (f"python -m train.sweep: error: another sweep is training in {runs} (one "
                                           f"at a time): wait for it, or give another --runs-dir")
        assert not (out / "summary.json").exists()
        # A dry run writes nothing: it may look at a running study.
        assert main([*STUDY, "--out", str(out), "--runs-dir", str(runs), "--dry-run"]) == 0
    finally:
        (tmp_path / "gate" / "go").touch()
        said = first.communicate(timeout=120)
    assert first.returncode == 0, said
    assert (out / "summary.json").is_file() and (out / "claims.md").is_file()
    assert not (tmp_path / ".study.lock").exists() and not (tmp_path / ".runs.lock").exists()  # removed after


def test_a_killed_sweeps_lock_does_not_block_the_next_one_which_holds_it_while_it_trains(tmp_path, capsys,
                                                                                         monkeypatch):
    out, runs = tmp_path / "study", tmp_path / "runs"
    argv = [*STUDY, "--out", str(out), "--runs-dir", str(runs)]
    # A sweep SIGKILLed while it holds its locks (the same locks, taken in another process, that then dies).
    code = ("import sys, time\nfrom pathlib import Path\nfrom models.io import writer_lock\n"
            "with writer_lock(Path(sys.argv[1])), writer_lock(Path(sys.argv[2])):\n"
            "    print('held', flush=True)\n    time.sleep(600)\n")
    killed = subprocess.Popen([sys.executable, "-c", code, str(out.resolve()), str(runs.resolve())], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert killed.stdout.readline() == "held\n"
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.communicate(timeout=60)
    assert (tmp_path / ".study.lock").exists()  # what a killed sweep leaves: the file, not the lock

    held = []

    def train(specs, study_dir, runs_root, slots, progress=None):
        for place in (out, runs):  # both held for the whole training phase
            with pytest.raises(DirectoryBusy), writer_lock(place.resolve()):
                pass
        held.append(True)
        return []

    monkeypatch.setattr(runner, "run_all", train)
    monkeypatch.setattr(study, "measure_runtime", lambda *a, **k: None)
    assert main(argv) == 0, capsys.readouterr().err
    assert held and (out / "summary.json").is_file()
    assert not (tmp_path / ".study.lock").exists() and not (tmp_path / ".runs.lock").exists()


# ---------------------------------------------------------------- a failing training: one line, its own code

ERROR = "python -m train: error: --out: another process is writing /x/run (one run per directory)"


class Training:
    """A `python -m train` stand-in: writes `lines` to its log (stdout) and exits `rc`; records what started."""

    lines: tuple[str, ...] = ()
    rc = 0
    started: list[str] = []

    def __init__(self, cmd: list[str], stdout=None, **kw: object) -> None:
        self.pid = 2 ** 22 + len(self.started)  # no process: a kill of its group finds none
        type(self).started.append(Path(cmd[cmd.index("--out") + 1]).name)
        if stdout is not None:
            stdout.write("".join(f"{line}\n" for line in self.lines).encode())
            stdout.flush()

    def wait(self, timeout: float | None = None) -> int:
        return self.rc

    def poll(self) -> int:
        return self.rc


@pytest.fixture
def training(monkeypatch):
    """The Training class every `python -m train` of the test starts (other commands, git's, run for real)."""
    class Fake(Training):
        started: list[str] = []

    real = subprocess.Popen

    def popen(cmd, *args, **kwargs):
        return Fake(cmd, **kwargs) if list(cmd[1:3]) == ["-m", "train"] else real(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)
    return Fake


@pytest.mark.parametrize("rc", [2, 1])
def test_a_failing_training_is_one_line_with_its_error_its_log_and_its_exit_code(tmp_path, capsys, training, rc):
    training.lines = ("nothing to resume in /x/run (no resume.pt): starting at step 0",
                      "vit_c_micro on digits: 64 train / 16 val images", ERROR if rc == 2 else
                      "python -m train: error: cannot write /x/run/resume.pt: No space left on device",
                      "epoch 1/1  step 2  loss 2.3019")  # what a line after the error looks like (another writer)
    training.rc = rc
    runs = tmp_path / "runs"
    runs.mkdir()
    assert main([*STUDY, "--out", str(tmp_path / "study"), "--runs-dir", str(runs)]) == rc
    lines = capsys.readouterr().err.strip().splitlines()  # the progress bar's, then the error's
    err = lines[-1]
    assert [line for line in lines if "python -m train" in line] == [err], lines
    first = training.started[0]
    said = ("--out: another process is writing /x/run (one run per directory)" if rc == 2 else
            "cannot write /x/run/resume.pt: No space left on device")
    assert err == (f"python -m train.sweep: error: {first}: `python -m train` exited {rc}: {said} "
                   f"(log {runs / first}.log)")
    assert "\\n" not in err and "epoch 1/1" not in err
    assert training.started == [first]  # the other run never started


def test_a_killed_training_says_so_and_never_quotes_an_earlier_attempts_error(tmp_path, training):
    spec = RunSpec("vit_c_micro", "digits", "adamw", 1e-3, 0.05, 1)
    runs = tmp_path / "runs"
    runs.mkdir()
    runner.log_path(runs, spec).write_text(f"{ERROR}\n")  # an earlier attempt's refusal, long fixed
    training.lines, training.rc = ("epoch 1/1  step 2  loss 2.3019",), -9  # the OOM killer
    with pytest.raises(runner.RunFailed) as exc:
        runner.run_one(spec, tmp_path / "study", runs, runner.WorkerSlot(1))
    assert str(exc.value) == (f"{spec.run_id}: `python -m train` was killed by SIGKILL "
                              f"(log {runner.log_path(runs, spec)})")
    assert exc.value.code == 1
    training.lines, training.rc = ("Traceback (most recent call last):", "  File x", "RuntimeError: boom"), 1
    with pytest.raises(runner.RunFailed, match=r"exited 1; its last line: RuntimeError: boom \(log "):
        runner.run_one(spec, tmp_path / "study", runs, runner.WorkerSlot(1))


# ---------------------------------------------------------------- after a failure, nothing new starts


def test_no_queued_training_starts_after_a_failure(tmp_path, training, monkeypatch):
    """The failed task freed its slot before the main thread set `stop`: a queued run took it and started."""
    real_wait = runner.wait

    def slow_to_notice(*a, **k):  # the main thread notices the failure late (a busy machine, the GIL)
        done = real_wait(*a, **k)
        time.sleep(0.3)
        return done

    monkeypatch.setattr(runner, "wait", slow_to_notice)
    training.lines, training.rc = (ERROR,), 2
    specs = [RunSpec("vit_c_micro", "digits", "adamw", 1e-3, 0.05, 1, seed) for seed in range(3)]
    with pytest.raises(runner.RunFailed, match="exited 2"):
        runner.run_all(specs, tmp_path / "study", tmp_path / "runs", runner.make_slots(1, threads=1))
    assert training.started == [specs[0].run_id]
