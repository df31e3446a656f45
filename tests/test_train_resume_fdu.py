"""--augment none trains on the evaluation view alone (no flip unless --hflip asks for one, and a --crop-scale it
ignores is said), and a run resumes on its data at a new path when the data fingerprints it recorded match there."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train.config import ConfigError, resolve_config
from train.state import load_resume, save_resume

REPO = Path(__file__).resolve().parents[1]
# 3 classes x 8 images at batch 4: 6 steps an epoch, 12 in all.
BASE = ["--device", "cpu", "--model", "vit_c_micro", "--recipe", "small", "--epochs", "2", "--batch-size", "4",
        "--threads", "1", "--workers", "0", "--no-progress"]


def image_folder(root: Path, classes: tuple[str, ...] = ("a", "b", "c"), n: int = 8) -> Path:
    """root/{train,val}/<class>/ with n random 40x40 PNGs each, every class a brightness of its own (after the
    tester's /tmp/hDW_data/mk.py, seeded by position rather than by Python's salted str hash); returns root."""
    for s, split in enumerate(("train", "val")):
        for i, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True)
            for k in range(n):
                rng = np.random.default_rng([s, i, k])
                arr = (rng.integers(0, 255, (40, 40, 3)) // 4 + (i * 60) % 255).clip(0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{k}.png")
    return root


def _run(train_cli, capsys, *args: str) -> tuple[int, str, str]:
    from train.__main__ import main

    return train_cli(main, [*BASE, *args], capsys)


def _weights_digest(run: Path) -> str:
    meta = json.loads((run / "checkpoint.json").read_text())
    return hashlib.sha256((run / meta["weights"]["file"]).read_bytes()).hexdigest()


def _recorded(run: Path) -> dict:
    return json.loads((run / "checkpoint.json").read_text())["training"]


# ------------------------------------------------------------------------------------------- --augment none
def test_augment_none_resolves_to_no_flip_unless_hflip_is_given():
    from models.preprocessing import Preprocessing
    from train.augment import derive_seed, seeded, train_transform

    base = {"model": "vit_c_micro", "dataset": "digits", "out": "o"}
    none = resolve_config({**base, "augment": "none"})
    assert none.hflip == 0.0  # the evaluation view only: the number recorded is the one the run uses
    assert resolve_config({**base, "augment": "none", "hflip": 0.5}).hflip == 0.5  # an explicit one is honoured
    assert resolve_config({**base, "augment": "light"}).hflip == 0.5  # the recipe's, as before
    t = train_transform(none.augment, Preprocessing.imagenet(32), none.crop_scale, none.hflip, pil_input=True)
    a = np.zeros((37, 37, 3), np.uint8)
    a[:, :10] = 255  # bright on the left: a flipped view is bright on the right
    img = Image.fromarray(a)
    flipped = 0
    for i in range(20):
        with seeded(derive_seed(0, 0, i)):
            flipped += int(t(img)[0, :, -1].float().mean() > 128)
    assert flipped == 0, t


def test_a_fresh_augment_none_run_records_hflip_0(tmp_path, train_cli, capsys):
    data = image_folder(tmp_path / "ds")
    code, _, err = _run(train_cli, capsys, "--dataset", str(data), "--out", str(tmp_path / "run"),
                        "--augment", "none", "--max-steps", "1")
    assert code == 0, err
    assert _recorded(tmp_path / "run")["config"]["hflip"] == 0.0
    assert load_resume(tmp_path / "run")["config"]["hflip"] == 0.0


def test_a_run_recorded_with_augment_none_and_hflip_0_5_resumes_as_it_started(tmp_path, train_cli, capsys):
    """Such a run (what an earlier vitc recorded for --augment none) rerun by its job as it began, plus --resume:
    accepted, still flipping with p 0.5, and bit-identical to the uninterrupted run."""
    data = image_folder(tmp_path / "ds")
    ref, split = tmp_path / "ref", tmp_path / "split"
    code, _, err = _run(train_cli, capsys, "--dataset", str(data), "--out", str(ref), "--augment", "none",
                        "--hflip", "0.5")
    assert code == 0, err
    code, _, err = _run(train_cli, capsys, "--dataset", str(data), "--out", str(split), "--augment", "none",
                        "--hflip", "0.5", "--max-steps", "5")
    assert code == 0, err
    code, out, err = _run(train_cli, capsys, "--dataset", str(data), "--out", str(split), "--augment", "none",
                          "--resume", "--max-steps", "0")
    assert code == 0, err
    assert "resuming" in out
    assert _recorded(split)["config"]["hflip"] == 0.5
    assert _weights_digest(split) == _weights_digest(ref)


def test_an_untrained_augment_none_run_of_an_earlier_vitc_is_rerun_with_resume(tmp_path, train_cli, capsys):
    """An --epochs 0 run keeps no resume.pt: --resume compares checkpoint.json's config with the command's, and the
    hflip 0.5 an earlier vitc recorded for --augment none is the run's own, not a different run's."""
    data = image_folder(tmp_path / "ds")
    run = tmp_path / "run"
    code, _, err = _run(train_cli, capsys, "--dataset", str(data), "--out", str(run), "--augment", "none",
                        "--hflip", "0.5", "--epochs", "0")
    assert code == 0, err
    code, out, err = _run(train_cli, capsys, "--dataset", str(data), "--out", str(run), "--augment", "none",
                          "--epochs", "0", "--resume")
    assert code == 0, err
    assert _recorded(run)["config"]["hflip"] == 0.5


def test_crop_scale_with_augment_none_is_noted_as_ignored(tmp_path, train_cli, capsys):
    data = image_folder(tmp_path / "ds")
    code, out, err = _run(train_cli, capsys, "--dataset", str(data), "--out", str(tmp_path / "run"), "--augment",
                          "none", "--crop-scale", "0.3", "--epochs", "0")
    assert code == 0, err
    notes = [line for line in out.splitlines() if "--crop-scale" in line]
    assert notes == ["note: --crop-scale is ignored with --augment none (it sizes the random-resized crop, which "
                     "none does not take)"], out
    code, out, err = _run(train_cli, capsys, "--dataset", str(data), "--out", str(tmp_path / "light"), "--augment",
                          "light", "--crop-scale", "0.3", "--epochs", "0")
    assert code == 0 and "--crop-scale" not in out, err


def test_help_says_what_augment_none_does():
    from train.options import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "none: the evaluation view alone (resize + centre crop, no flip unless --hflip is given)" in text
    assert "horizontal flip probability; 0 with --augment none unless given" in text
    assert "ignored with --augment none" in text


# ---------------------------------------------------------------------------------------- data at a new path
@pytest.fixture
def moved(tmp_path, train_cli, capsys) -> tuple[Path, Path, Path]:
    """A run stopped at step 5 of 12 on tmp_path/old, whose folder then moved to tmp_path/new: (run, old, new)."""
    old, new, run = tmp_path / "old", tmp_path / "new", tmp_path / "run"
    image_folder(old)
    code, _, err = _run(train_cli, capsys, "--dataset", str(old), "--out", str(run), "--max-steps", "5")
    assert code == 0, err
    old.rename(new)
    return run, old, new


def test_resume_without_dataset_names_the_missing_recorded_folder(moved, train_cli, capsys):
    run, old, _ = moved
    code, _, err = _run(train_cli, capsys, "--out", str(run), "--resume", "--max-steps", "0")
    assert code == 2
    lines = err.strip().splitlines()
    assert lines == [f"python -m train: error: --resume: the run's data folder {old} (recorded in resume.pt) is "
                     "missing: pass --dataset with the data's new location"], err


@pytest.mark.parametrize("predates, missing", [
    ("content samples", "the sampled file contents that, with the file names and sizes, would show"),
    ("data fingerprints", "the data fingerprints that would show"),
])
def test_resume_state_that_cannot_move_says_put_the_data_back_at_once(moved, train_cli, capsys, predates, missing):
    """Its "pass --dataset" advice was always refused next ("cannot move this run"): the one way on, at once."""
    from data.datasets import content_key

    run, old, _ = moved
    state = load_resume(run)
    if predates == "content samples":
        for split in ("train", "val"):
            del state["data"][content_key(split)]
    else:
        del state["data"]
    save_resume(run, state)
    code, _, err = _run(train_cli, capsys, "--out", str(run), "--resume", "--max-steps", "0")
    assert code == 2
    assert err.strip().splitlines() == [
        f"python -m train: error: --resume: the run's data folder {old} (recorded in resume.pt) is missing, and its "
        f"resume.pt predates {missing} files elsewhere are the ones that were there: put the data back at {old} (or "
        "a link to it)"], err


def test_resume_on_the_same_data_at_a_new_path_goes_on_there(moved, tmp_path, train_cli, capsys):
    run, old, new = moved
    code, out, err = _run(train_cli, capsys, "--out", str(run), "--resume", "--max-steps", "8", "--dataset", str(new))
    assert code == 0, err
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert notes == [f"note: the run's data moved from {old} to {new} (the same file names, sizes and sampled "
                     f"contents): the run goes on with the data at {new}"], out
    # The new path is the run's now: recorded for the next resume, which needs no --dataset (and says nothing).
    assert load_resume(run)["config"]["dataset"] == str(new)
    assert _recorded(run)["dataset"] == str(new)
    assert str(new) in _recorded(run)["command_line"] and str(old) not in _recorded(run)["command_line"]
    code, out, err = _run(train_cli, capsys, "--out", str(run), "--resume", "--max-steps", "0")
    assert code == 0, err
    assert "resuming" in out and "note:" not in out
    # Exactly the weights of a run that never moved.
    shutil.copytree(new, old)
    code, _, err = _run(train_cli, capsys, "--dataset", str(old), "--out", str(tmp_path / "ref"))
    assert code == 0, err
    assert _weights_digest(run) == _weights_digest(tmp_path / "ref")


def test_resume_on_other_data_at_a_new_path_is_refused(moved, train_cli, capsys):
    run, old, new = moved
    shutil.copy(new / "train" / "a" / "0.png", new / "train" / "a" / "extra.png")
    code, _, err = _run(train_cli, capsys, "--out", str(run), "--resume", "--max-steps", "0", "--dataset", str(new))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"python -m train: error: --resume: the data at {new} are not the data this run "
                               f"started with at {old} (the train fingerprint "), err
    assert lines[0].endswith("): pass --dataset with the run's own data, or train into a new --out"), err
    assert load_resume(run)["config"]["dataset"] == str(old)  # nothing changed


def test_a_resume_state_without_data_fingerprints_cannot_move(moved, train_cli, capsys):
    run, old, new = moved
    state = load_resume(run)
    del state["data"]  # as a resume.pt from before vitc recorded the fingerprints
    save_resume(run, state)
    code, _, err = _run(train_cli, capsys, "--out", str(run), "--resume", "--max-steps", "0", "--dataset", str(new))
    assert code == 2
    assert err.strip().splitlines() == [
        f"python -m train: error: --resume cannot move this run to {new}: its resume.pt predates the data "
        f"fingerprints that would show the files are the ones at {old}; put them back there (or a link to them)"], err


def test_an_embedded_set_is_still_no_folder_to_move_to(tmp_path):
    saved = resolve_config({"model": "vit_c_micro", "dataset": "digits", "out": "r"}).to_dict()
    folder = image_folder(tmp_path / "ds")
    with pytest.raises(ConfigError, match="cannot change how the run trains"):
        resolve_config({"out": "r", "resume": True, "dataset": str(folder)}, saved, movable_data=True)


def test_torchrun_ranks_resume_on_moved_data_together(tmp_path):
    old, new, run = tmp_path / "old", tmp_path / "new", tmp_path / "run"
    image_folder(old)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def torchrun(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train",
               *BASE, "--batch-size", "2", "--out", str(run), *args]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)

    first = torchrun("--dataset", str(old), "--max-steps", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    old.rename(new)
    again = torchrun("--resume", "--max-steps", "0", "--dataset", str(new))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("note: the run's data moved from") == 1, again.stdout  # rank 0 says it
    training = _recorded(run)
    assert training["dataset"] == str(new) and training["steps"] == 12 and training["world_size"] == 2
    assert len(set(training["rank_state_sha256"])) == 1
