"""Kill a run mid-epoch with SIGKILL, resume it, and get bit-for-bit the state of an uninterrupted run (CPU)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from models.checkpoint import read_checkpoint_meta

REPO = Path(__file__).resolve().parents[1]
# Mixing, AutoAugment and EMA on, so every source of randomness and every piece of state is exercised.
# 8 steps an epoch, a save every 4: the kill comes after the first mid-epoch save, the resume crosses into epoch 2.
ARGS = ["--device", "cpu", "--model", "vit_c_micro", "--dataset", "digits", "--epochs", "2", "--batch-size", "16",
        "--train-subset", "128", "--val-subset", "64", "--augment", "autoaugment", "--mixup", "0.8",
        "--cutmix", "1.0", "--ema-every", "2", "--threads", "1", "--seed", "3"]
TOTAL_STEPS = 2 * (128 // 16)


def _start(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "train", *ARGS, "--out", str(out), *extra], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _progress(out: Path) -> dict | None:
    try:
        return torch.load(out / "resume.pt", weights_only=True)["progress"]
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return None


def _assert_same(a, b, path: str = "") -> None:
    """Tensors bit-identical, plain values equal; timing fields excepted."""
    if any(k in path for k in ("time", "samples_per_s", "started", "segments", "out", "save_every_steps")):
        return
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, train_cli, capsys):
    from train.__main__ import main

    ref, killed = tmp_path / "ref", tmp_path / "killed"
    proc = _start(killed, "--save-every-steps", "4")  # its own process: SIGKILL takes it whole
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            p = _progress(killed)
            if p is not None and p["step_in_epoch"] > 0:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    at_kill = _progress(killed)
    assert at_kill is not None and at_kill["global_step"] < TOTAL_STEPS
    assert not (killed / "checkpoint.json").exists()  # nothing servable was half-written

    # The uninterrupted run and the resume, in this process (the CLI's own main, its state restored after each):
    # neither is killed, and a Python start with torch is most of a run this size.
    code, _, err = train_cli(main, [*ARGS, "--out", str(ref)], capsys)
    assert code == 0, err[-2000:]
    code, out, err = train_cli(main, [*ARGS, "--out", str(killed), "--resume", "--save-every-steps", "4"], capsys)
    assert code == 0, err[-2000:]
    assert "resuming" in out

    a = torch.load(ref / "resume.pt", weights_only=True)
    b = torch.load(killed / "resume.pt", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "ema", "rng"):
        _assert_same(a[key], b[key], key)
    _assert_same(a["progress"], b["progress"], "progress")
    assert b["progress"]["global_step"] == TOTAL_STEPS and b["progress"]["segments"] == 1

    meta_a, meta_b = read_checkpoint_meta(ref), read_checkpoint_meta(killed)
    wa, wb = load_file(str(meta_a.weights_path)), load_file(str(meta_b.weights_path))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ta, tb = meta_a.raw["training"], meta_b.raw["training"]
    for key in ("final_val_top1", "final_val_top1_ema", "best_val_top1", "weights_source", "steps"):
        assert ta[key] == tb[key], key
    assert tb["resumed_times"] == 1
    history = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]  # the repeated partial epoch is not logged twice


TINY = ["--device", "cpu", "--model", "vit_c_micro", "--dataset", "digits", "--epochs", "1", "--batch-size", "16",
        "--train-subset", "64", "--val-subset", "16", "--threads", "1", "--max-steps", "1"]


def _tamper(state: dict, case: str) -> None:
    """Damage `state` the way a hand edit or a file from another run would."""
    if case == "weights":
        state["model"]["head.weight"] = torch.zeros(3, 3)
    elif case == "optimizer":
        buffers = next(iter(state["optimizer"]["state"].values()))
        buffers["exp_avg"] = torch.zeros(7)
    elif case == "progress":
        state["progress"]["epoch"] = 99


def test_tampered_resume_state_is_one_line_exit_2_and_keeps_the_file(tmp_path, capsys):
    from train.__main__ import main

    run = tmp_path / "run"
    assert main([*TINY, "--out", str(run)]) == 0
    good = (run / "resume.pt").read_bytes()
    for case in ("weights", "optimizer", "progress"):  # the rate is a function of the step: no schedule state
        state = torch.load(run / "resume.pt", weights_only=True)
        _tamper(state, case)
        torch.save(state, run / "resume.pt")
        tampered = (run / "resume.pt").read_bytes()
        capsys.readouterr()
        assert main(["--out", str(run), "--resume", "--max-steps", "2"]) == 2, case
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "resume.pt is damaged or from another run" in err[0], (case, err)
        assert (run / "resume.pt").read_bytes() == tampered  # nothing rewritten on the way out
        (run / "resume.pt").write_bytes(good)
    assert main(["--out", str(run), "--resume", "--max-steps", "2"]) == 0


def test_a_run_started_with_overwrite_resumes(tmp_path):
    """`make demo` starts its runs with --overwrite: the saved config must not make every later --resume refuse
    ("--resume and --overwrite exclude each other"), leaving only a start from scratch; and the old run's
    evaluation results go with its weights."""
    from train.__main__ import main

    run = tmp_path / "run"
    run.mkdir()
    assert main([*TINY, "--out", str(run), "--overwrite"]) == 0
    (run / "eval-digits-val.json").write_text("{}")  # python -m train.eval's result for these weights
    assert main([*TINY, "--out", str(run), "--overwrite"]) == 0
    assert not (run / "eval-digits-val.json").exists()  # it described the weights --overwrite replaced
    assert main(["--out", str(run), "--resume", "--max-steps", "2"]) == 0
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps and torch.load(run / "resume.pt", weights_only=True)["progress"]["global_step"] == 2
