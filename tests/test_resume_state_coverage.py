"""Each piece of state resume.pt holds is restored: checked where losing it would change what a resumed run does.

test_train_resume's bit-identity run cannot tell some restores from their absence: its EMA only copies the weights
(through the warm-up, and its decay rounds to 0 on a run that short), its kill usually lands before the first
epoch's history, no training step draws from the global generators (augmentation and mixing are seeded per sample
and per step, so the states a resumed process seeds afresh equal the saved ones), and its run is a first segment
that met no corrupt file and did not diverge. Each test here makes the restored state differ from a rebuilt one.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from data.datasets import load_dataset
from models.checkpoint import read_checkpoint_meta
from train.pipeline import epoch_permutation
from train.state import capture_rng, restore_rng

# No warm-up (the EMA copies the weights through it) and an EMA over the whole run: a decay of 1 - 1/8 on 2 epochs of
# TRAIN_TINY's 4 steps, so from step 1 on the EMA weights are their own state, not a copy of the model's.
EMA_FROM_STEP_1 = ("--epochs", "2", "--warmup-epochs", "0", "--ema-horizon", "1")
# A history record's wall-clock fields: the only ones a resumed run may record differently.
TIMED = ("epoch_time_s", "samples_per_s")


def _state(run: Path) -> dict:
    return torch.load(run / "resume.pt", weights_only=True)


def _train(train_cli, argv: list[str], capsys=None) -> str:
    """Run `python -m train argv` in-process; its stdout, given capsys (it must succeed)."""
    from train.__main__ import main

    code, out, err = train_cli(main, argv, capsys)
    assert code == 0, err[-2000:]
    return out


def _training(run: Path) -> dict:
    return read_checkpoint_meta(run).raw["training"]


def _unequal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """The keys whose tensors differ in any bit (the unshared ones, when the two hold different names)."""
    if a.keys() != b.keys():
        return sorted(a.keys() ^ b.keys())
    return [k for k in a if not (a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]))]


def _history(run: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock fields."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMED} for line in lines]


def test_a_resumed_run_ends_with_the_ema_and_history_of_an_uninterrupted_one(tmp_path, train_cli, train_tiny):
    """Stopped mid-epoch 2, after an epoch's record and with an EMA that is no copy of the weights."""
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    _train(train_cli, [*train_tiny, *EMA_FROM_STEP_1, "--out", str(ref)])
    _train(train_cli, [*train_tiny, *EMA_FROM_STEP_1, "--max-steps", "6", "--out", str(resumed)])
    stopped = _state(resumed)
    ema_at_stop = {k.removeprefix("module."): v for k, v in stopped["ema"].items()}
    assert _unequal(ema_at_stop, stopped["model"]), "the EMA equals the weights at the resume point: nothing to test"
    assert [h["epoch"] for h in stopped["progress"]["history"]] == [1, 2]  # epoch 1's, and where epoch 2 stopped

    _train(train_cli, ["--out", str(resumed), "--resume", "--max-steps", "0"])
    a, b = _state(ref), _state(resumed)
    assert a["progress"]["global_step"] == b["progress"]["global_step"] == 8
    assert not _unequal(a["ema"], b["ema"]), "EMA weights"
    assert not _unequal(a["model"], b["model"]), "model weights"
    assert not _unequal(load_file(str(read_checkpoint_meta(ref).weights_path)),
                        load_file(str(read_checkpoint_meta(resumed).weights_path))), "checkpoint weights"
    assert _history(resumed) == _history(ref)
    ta, tb = _training(ref), _training(resumed)
    for key in ("final_val_top1_ema", "final_val_top5_ema", "weights_source", "best_val_top1", "best_val_top1_epoch",
                "best_val_top1_ema", "best_val_top1_ema_epoch"):
        assert ta[key] == tb[key], key


@pytest.fixture()
def global_rngs() -> Iterator[None]:
    """The test changes the process's torch, numpy and Python generators and torch's thread count: put them back."""
    rng, threads = capture_rng(), torch.get_num_threads()
    try:
        yield
    finally:
        restore_rng(rng)
        torch.set_num_threads(threads)


def _elsewhere() -> dict:
    """Generator states no run of seed 0 is in: seeded otherwise, and drawn from."""
    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    torch.rand(3)
    np.random.rand(3)
    random.random()
    return capture_rng()


def _rng_differences(a: dict, b: dict) -> list[str]:
    """Which of the torch, numpy and Python generator states differ between two `capture_rng` results."""
    diff = [] if torch.equal(a["torch"], b["torch"]) else ["torch"]
    na, nb = a["numpy"], b["numpy"]
    if not (torch.equal(na["keys"], nb["keys"])
            and (na["pos"], na["has_gauss"], na["gauss"]) == (nb["pos"], nb["has_gauss"], nb["gauss"])):
        diff.append("numpy")
    if a["python"] != b["python"]:
        diff.append("python")
    return diff


def test_restore_leaves_the_global_generators_as_resume_pt_saved_them(tmp_path, train_stopped, global_rngs):
    """The trainer seeds every generator as it builds the run; the restore must then put back the saved states
    (what a library that draws from them left), not keep the freshly seeded ones."""
    from train.config import config_from_options
    from train.distributed import setup
    from train.trainer import Trainer

    run = tmp_path / "run"
    shutil.copytree(train_stopped(1), run)
    state = _state(run)
    state["rng"] = _elsewhere()
    torch.save(state, run / "resume.pt")

    cfg = config_from_options({"out": str(run), "resume": True, "device": "cpu", "threads": 1, "progress": False})
    trainer = Trainer(cfg, setup("cpu"))
    assert _rng_differences(capture_rng(), state["rng"]) == ["torch", "numpy", "python"]  # seeded afresh
    assert trainer.restore()["global_step"] == 1
    assert _rng_differences(capture_rng(), state["rng"]) == []


def test_a_resumed_run_keeps_its_start_time_segments_and_running_times(tmp_path, train_cli, train_stopped):
    """As a run saves them after 4 resumes and 2000 s since 2020: the summary adds to them, it does not restart."""
    run = tmp_path / "run"
    shutil.copytree(train_stopped(1), run)
    state = _state(run)
    state["progress"] |= {"started": "2020-01-02T03:04:05Z", "segments": 4, "wall_time_s": 2000.0,
                          "train_time_s": 1000.0, "cpu_time_s": 3000.0}
    torch.save(state, run / "resume.pt")

    _train(train_cli, ["--out", str(run), "--resume", "--max-steps", "2"])
    t = _training(run)
    assert t["steps"] == 2 and t["started"] == "2020-01-02T03:04:05Z" and t["resumed_times"] == 5
    assert t["wall_time_s"] >= 2000 and t["train_time_s"] >= 1000 and t["cpu_time_s"] >= 3000
    assert t["samples_per_s"] < 1  # 32 samples over the whole run's training time


def test_a_diverged_run_stays_diverged_on_resume(tmp_path, train_cli, train_tiny, capsys):
    run = tmp_path / "run"
    # A constant lr (--min-lr-ratio 1): under the cosine decay the loss peaked near 1e14, finite, on some CPUs.
    said = _train(train_cli, [*train_tiny, "--epochs", "3", "--optimizer", "sgd", "--lr", "100", "--momentum", "0.99",
                              "--warmup-epochs", "0", "--min-lr-ratio", "1", "--out", str(run)], capsys)
    assert "diverged" in said and _training(run)["diverged"] is True and _training(run)["steps"] < 12
    files = {p.name: p.read_bytes() for p in run.iterdir()}
    said = _train(train_cli, ["--out", str(run), "--resume", "--max-steps", "0"], capsys)
    assert "the run diverged at step" in said and "nothing to resume" in said and "resuming" not in said, said
    assert {p.name: p.read_bytes() for p in run.iterdir()} == files


def _folder(root: Path) -> Path:
    """root/{train,val}/{a,b}/ with 6 random 36x36 PNGs each, and one empty (corrupt) train/a/x.png."""
    for split in ("train", "val"):
        for c in "ab":
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(6):
                pixels = np.random.default_rng(100 * ord(c) + i).integers(0, 255, (36, 36, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")
    (root / "train" / "a" / "x.png").write_bytes(b"")
    return root


def test_a_resumed_run_counts_the_corrupt_files_met_before_it(tmp_path, train_cli):
    """One epoch meets every file once: the corrupt one, met in step 1 before the stop, counts in the summary."""
    data = _folder(tmp_path / "data")
    paths = [str(p) for p in load_dataset(data, "train").paths]
    bad = paths.index(str(data / "train" / "a" / "x.png"))
    seed = next(s for s in range(500) if bad in epoch_permutation(len(paths), s, 0)[:2].tolist())
    run = tmp_path / "run"
    _train(train_cli, ["--model", "vit_c_micro", "--dataset", str(data), "--batch-size", "2", "--epochs", "1",
                       "--no-ema", "--threads", "1", "--workers", "0", "--seed", str(seed), "--no-progress",
                       "--max-steps", "1", "--out", str(run)])
    assert _training(run)["corrupt_train_files"] == 1

    _train(train_cli, ["--out", str(run), "--resume", "--max-steps", "0"])
    t = _training(run)
    assert t["steps"] == len(paths) // 2 and t["corrupt_train_files"] == 1
