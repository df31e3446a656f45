"""Ctrl-C and SIGTERM around the moment a finished run publishes its checkpoint, metrics.jsonl and curves.png.

A signal while the outputs are renamed into place waits for them (a `note:`, exit 0); one before leaves the run
as it was, with no temporaries; the cleanup never deletes the weights a published checkpoint.json names.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from models import build_model
from models.checkpoint import META_FILE, load_checkpoint, read_checkpoint_meta, save_checkpoint
from models.cli import _on_sigterm

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = ("weights-", META_FILE, "metrics.jsonl", "curves.png")


@pytest.fixture(scope="module")
def stopped_run(train_stopped) -> Path:
    """A run stopped by --max-steps 1: resuming it with --max-steps 2 trains one step and publishes again."""
    return train_stopped(1)


def _signal_on_rename(monkeypatch, signum: int, name: str, nth: int = 1) -> list[str]:
    """Send this process `signum` just after the `nth` os.replace onto a file whose name starts with `name` (as a
    real signal arriving there would: Python runs its handler at the next bytecode)."""
    real, seen = os.replace, []

    def replace(src, dst, *args, **kwargs):
        result = real(src, dst, *args, **kwargs)
        if Path(dst).name.startswith(name):
            seen.append(Path(dst).name)
            if len(seen) == nth:
                os.kill(os.getpid(), signum)
        return result

    monkeypatch.setattr(os, "replace", replace)
    return seen


def _run(main: Callable[[list[str]], int], argv: list[str], capsys) -> tuple[object, str, str]:
    """main(argv) with the signal handlers `python -m train` runs under -> (exit code or the exception's name)."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code: object = main([*argv, "--device", "cpu"])
    except KeyboardInterrupt as exc:  # Terminated is one too
        code = type(exc).__name__
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    out, err = capsys.readouterr()
    return code, out, err


def _leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("signum, name, nth", [
    (signal.SIGTERM, META_FILE, 1),  # the report's finding: the cleanup deleted the weights checkpoint.json named
    (signal.SIGINT, META_FILE, 1),
    (signal.SIGTERM, "weights-", 1),
    (signal.SIGTERM, "metrics.jsonl", 2),  # the first is the epoch's line, written with resume.pt
    (signal.SIGINT, "curves.png", 1),
])
def test_a_signal_while_the_outputs_are_renamed_waits_for_them(stopped_run, tmp_path, monkeypatch, capsys, signum,
                                                                name, nth):
    from train.__main__ import main

    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    seen = _signal_on_rename(monkeypatch, signum, name, nth)
    code, out, err = _run(main, ["--out", str(run), "--resume", "--max-steps", "2"], capsys)
    monkeypatch.undo()
    assert len(seen) == nth, f"{len(seen)} renames onto {name}"
    assert code == 0, (code, err)
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and signal.Signals(signum).name in notes[0] and str(run) in notes[0], err
    assert "checkpoint " in out  # the run finished as it would have
    _, meta = load_checkpoint(run)  # the weights it names are there, and verify
    assert meta.raw["training"]["steps"] == 2
    assert len(list(run.glob("weights-*.safetensors"))) == 1
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 2
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _leftovers(run) == []
    code, out, _ = _run(main, ["--out", str(run), "--resume"], capsys)
    assert code == 0 and "stopped at --max-steps 2" in out


def test_a_signal_before_the_renames_leaves_the_run_as_it_was(stopped_run, tmp_path, monkeypatch, capsys):
    """Drawing the curves comes before the commit: a signal there stops the run, nothing of it published, the
    weights' temporary removed, and --resume finishes it."""
    from matplotlib.figure import Figure

    from train.__main__ import main

    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    published = ("checkpoint.json", "curves.png", *(p.name for p in run.glob("weights-*")))
    before = {name: (run / name).read_bytes() for name in published}
    real = Figure.savefig

    def savefig_then_terminated(self, *args, **kwargs):
        real(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Figure, "savefig", savefig_then_terminated)
    code, _, err = _run(main, ["--out", str(run), "--resume", "--max-steps", "2"], capsys)
    monkeypatch.undo()
    assert code == "Terminated" and "note:" not in err
    # resume.pt and metrics.jsonl have the epoch's end, as any signal after it leaves them; the rest is as it was.
    assert sorted(p.name for p in run.iterdir()) == sorted([*published, "resume.pt", "metrics.jsonl"])
    assert {name: (run / name).read_bytes() for name in published} == before
    assert _leftovers(run) == []
    code, _, err = _run(main, ["--out", str(run), "--resume", "--max-steps", "2"], capsys)
    assert code == 0, err
    assert read_checkpoint_meta(run).raw["training"]["steps"] == 2


@pytest.mark.parametrize("when", ["before", "after"])
def test_save_checkpoint_never_deletes_the_weights_a_published_checkpoint_names(tmp_path, monkeypatch, when):
    """Interrupted at the rename of checkpoint.json, save_checkpoint leaves the old checkpoint or the new one,
    whole: never a checkpoint.json whose weights its cleanup removed."""
    from data.datasets import ANIMAL_CLASSES, default_preprocessing

    out, pre = tmp_path / "ckpt", default_preprocessing("animals", 32)
    torch.manual_seed(0)
    save_checkpoint(out, build_model("vit_c_micro"), class_names=ANIMAL_CLASSES, preprocessing=pre)
    old = read_checkpoint_meta(out).weights_file
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == META_FILE and when == "before":
            raise KeyboardInterrupt
        real(src, dst, *args, **kwargs)
        if Path(dst).name == META_FILE:
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace)
    torch.manual_seed(1)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(out, build_model("vit_c_micro"), class_names=ANIMAL_CLASSES, preprocessing=pre)
    monkeypatch.undo()
    _, meta = load_checkpoint(out)  # whole, old or new
    assert (meta.weights_file == old) == (when == "before")
    assert _leftovers(out) == []


def test_curves_interrupted_while_drawn_leave_no_file_and_no_figure(tmp_path, monkeypatch):
    """The curves are drawn into memory (the trainer puts the bytes in place with the other files): an interrupt
    while drawing writes nothing, here or in the current directory, and leaves no figure open."""
    from matplotlib.figure import Figure

    from models.plotting import pyplot
    from train.report import draw_curves

    real = Figure.savefig

    def savefig_then_interrupted(self, *args, **kwargs):
        real(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Figure, "savefig", savefig_then_interrupted)
    history = [{"epoch": 1, "train_loss": 2.0, "val_top1": 0.5, "val_loss": 1.9}]
    with pytest.raises(KeyboardInterrupt):
        draw_curves(history, "t")
    assert list(tmp_path.iterdir()) == [] and pyplot().get_fignums() == []
    monkeypatch.undo()
    assert draw_curves(history, "t").startswith(b"\x89PNG\r\n\x1a\n") and pyplot().get_fignums() == []
    assert draw_curves([{"epoch": 0, "step": 0, "val_top1": 0.1}], "t") is None  # no epoch trained: nothing to plot


HOOK = """
import os, signal
from pathlib import Path
_real = os.replace
_name = os.environ["VITC_TEST_SIGNAL_AT"]
def _replace(src, dst, *args, **kwargs):
    result = _real(src, dst, *args, **kwargs)
    if Path(dst).name == _name:
        os.kill(os.getpid(), signal.SIGTERM)
    return result
os.replace = _replace
"""


def test_python_m_train_sigterm_after_checkpoint_json_notes_and_exits_0(stopped_run, tmp_path):
    """The command itself (its own handlers in models.cli.run): the report's reproduction, exit 0 with a note."""
    run, hook = tmp_path / "run", tmp_path / "hook"
    shutil.copytree(stopped_run, run)
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(REPO)]), "VITC_TEST_SIGNAL_AT": META_FILE}
    proc = subprocess.run([sys.executable, "-m", "train", "--out", str(run), "--resume", "--max-steps", "2",
                           "--device", "cpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "terminated" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("note: SIGTERM")], proc.stderr
    _, meta = load_checkpoint(run)
    assert meta.raw["training"]["steps"] == 2 and (run / "curves.png").is_file() and _leftovers(run) == []
