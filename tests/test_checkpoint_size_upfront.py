"""Class names that would make checkpoint.json larger than its limit are refused before the first step (one line,
exit 2, naming their count and the limit), not at the first save after the training, which a --resume met again."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from models import checkpoint
from models.checkpoint import MAX_META_BYTES, CheckpointError
from models.preprocessing import Preprocessing
from models.registry import get_config

CAT = "\U0001F431" * 60  # 240 bytes on disk; 720 bytes of "\ud83d\udc31" escapes in checkpoint.json


def _check(n: int) -> None:
    from models.checkpoint import check_metadata

    cfg = dataclasses.replace(get_config("vit_c_micro"), num_classes=n)
    check_metadata("run", cfg, class_names=[f"{CAT}{i:05d}" for i in range(n)],
                   preprocessing=Preprocessing.imagenet(cfg.image_size))


def test_the_limit_is_measured_on_the_names_as_written():
    assert MAX_META_BYTES == 16 << 20
    _check(21_000)  # fits, with the training summary's reserve to spare
    with pytest.raises(CheckpointError) as refused:
        _check(23_000)  # the report's: trained an epoch, then "not saved: ... larger than 16 MiB"
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("run/checkpoint.json would be larger than 16 MiB, the most it may hold: 23,000 class "
                              "names take 16.1 MiB of it"), message
    assert "refused before training" in message and "could not be saved" not in message


def _many_classes(root: Path, n: int) -> Path:
    """train/ with n emoji-named classes of one (linked) image each, val/ with the first two."""
    image = root / "one.png"
    root.mkdir(parents=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(image)
    for split, k in (("train", n), ("val", 2)):
        for i in range(k):
            d = root / split / f"{CAT}{i:05d}"
            d.mkdir(parents=True)
            os.symlink(image, d / "0.png")
    return root


ARGS = ["--device", "cpu", "--model", "vit_c_micro", "--epochs", "1", "--batch-size", "8", "--threads", "1",
        "--workers", "0", "--no-progress"]


def test_a_run_whose_checkpoint_could_not_be_saved_stops_before_its_first_step(tmp_path, capsys, train_cli,
                                                                               monkeypatch):
    from train.__main__ import main

    data = _many_classes(tmp_path / "data", 1_600)  # 1.2 MB of names: over a limit of 1 MiB
    run = tmp_path / "run"
    # Trained at the real limit, one step; then left as the report's run was: its save refused, resume.pt kept.
    code, _, err = train_cli(main, [*ARGS, "--dataset", str(data), "--out", str(run), "--max-steps", "1"], capsys)
    assert code == 0, err
    for name in ("checkpoint.json", *(p.name for p in run.glob("weights-*"))):
        (run / name).unlink()
    resume = (run / "resume.pt").read_bytes()
    monkeypatch.setattr(checkpoint, "MAX_META_BYTES", 1 << 20)
    for argv in ([*ARGS, "--dataset", str(data), "--out", str(tmp_path / "new")],
                 ["--out", str(run), "--resume", "--max-steps", "0", "--no-progress"]):
        code, out, err = train_cli(main, argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert "would be larger than 1 MiB" in lines[0] and "1,600 class names take 1.1 MiB" in lines[0], lines
        assert "epoch" not in out and "resuming" not in out  # refused before any step
    assert not (tmp_path / "new").exists()
    assert (run / "resume.pt").read_bytes() == resume  # a --resume is refused too, and keeps the run as it was
    assert torch.load(run / "resume.pt", weights_only=True)["progress"]["global_step"] == 1
