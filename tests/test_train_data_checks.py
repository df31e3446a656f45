"""What training checks about its data and its run directory: the val subset (the same images whatever --seed, and
the ones train.eval re-measures), a resume on changed data, classes only val has, fewer than two classes, class
names that are not UTF-8, an --out inside the dataset, a resumed run that has nothing left to train, the recorded
command line and the count of corrupt train files."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.datasets import DatasetError, load_dataset
from train.__main__ import main as train_main
from train.eval import main as eval_main
from train.pipeline import epoch_permutation

DIGITS = ["--model", "vit_c_micro", "--dataset", "digits", "--batch-size", "32", "--train-subset", "64",
          "--val-subset", "40", "--threads", "1", "--no-ema"]


def folder(root: Path, classes: dict[str, str] | None = None, n: int = 6) -> Path:
    """root/{train,val}/<class>/ with n 36x36 PNGs per class (classes: split -> class letters); returns root."""
    for split, letters in (classes or {"train": "ab", "val": "ab"}).items():
        for c in letters:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                pixels = np.random.default_rng(100 * ord(c) + i).integers(0, 255, (36, 36, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")
    return root


def _folder_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", "vit_c_micro", "--dataset", str(root), "--batch-size", "4", "--threads", "1",
            "--workers", "0", "--out", str(out), *extra]


def _training(out: Path) -> dict:
    return json.loads((out / "checkpoint.json").read_text())["training"]


def _one_line(err: str, needle: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err


# ------------------------------------------------------------------------------------------- val subset (#3)


def test_val_subset_is_the_same_images_whatever_the_seed_and_train_eval_re_measures_them(tmp_path, capsys,
                                                                                          train_cli):
    out = tmp_path / "s3"
    code, _, err = train_cli(train_main, [*DIGITS, "--epochs", "1", "--seed", "3", "--out", str(out)], capsys)
    assert code == 0, err
    t = _training(out)
    # Drawn with seed 0, as train.eval --limit and export draw theirs, not with the run's --seed.
    assert t["data"]["val"] == load_dataset("digits", "val").subset(40, seed=0).fingerprint()
    code, said, err = train_cli(eval_main, ["--checkpoint", str(out), "--limit", "40"], capsys)
    assert code == 0, err
    res = json.loads((out / "eval-digits-val.json").read_text())
    assert res["same_images_as_training"] is True and "the images the run reported on" in said
    assert res["top1"] == t["final_val_top1"] and res["samples"] == 40


def test_a_resume_state_from_before_keeps_the_val_subset_its_run_began_with(tmp_path, capsys, train_cli):
    out = tmp_path / "old"
    code, _, err = train_cli(train_main, [*DIGITS, "--epochs", "2", "--max-steps", "1", "--seed", "3",
                                          "--out", str(out)], capsys)
    assert code == 0, err
    state = torch.load(out / "resume.pt", weights_only=True)
    del state["data"], state["progress"]["corrupt_files"]  # as resume.pt was written before it held them
    torch.save(state, out / "resume.pt")
    code, _, err = train_cli(train_main, ["--out", str(out), "--resume", "--max-steps", "0"], capsys)
    assert code == 0, err
    assert _training(out)["data"]["val"] == load_dataset("digits", "val").subset(40, seed=3).fingerprint()


# ------------------------------------------------------------------------------------- resume on changed data (#5)


def test_resume_refuses_a_dataset_that_changed_since_the_run_started(tmp_path, capsys, train_cli):
    data, out = folder(tmp_path / "d"), tmp_path / "run"
    code, _, err = train_cli(train_main, _folder_args(data, out, "--epochs", "2", "--max-steps", "2"), capsys)
    assert code == 0, err
    before = (out / "resume.pt").read_bytes()
    (data / "train" / "a" / "new.png").write_bytes((data / "train" / "a" / "1.png").read_bytes())  # 13: 3 steps still
    code, _, err = train_cli(train_main, ["--out", str(out), "--resume", "--max-steps", "0"], capsys)
    assert code == 2
    _one_line(err, "--resume: the train data of ")
    assert "differ from what the run started with" in err and (out / "resume.pt").read_bytes() == before
    # A resume.pt written before it recorded its data is resumed as it always was.
    state = torch.load(out / "resume.pt", weights_only=True)
    del state["data"]
    torch.save(state, out / "resume.pt")
    code, _, err = train_cli(train_main, ["--out", str(out), "--resume", "--max-steps", "0"], capsys)
    assert code == 0, err


# ----------------------------------------------------------------------------------- folder layout (#6, #7, #8)


def test_a_class_only_val_has_is_refused_by_name(tmp_path, capsys, train_cli):
    extra = folder(tmp_path / "extra", {"train": "ab", "val": "abc"})
    code, _, err = train_cli(train_main, _folder_args(extra, tmp_path / "o1", "--epochs", "1"), capsys)
    assert code == 2
    _one_line(err, "has 1 class(es) that train/ lacks ('c')")
    only = folder(tmp_path / "only", {"train": "ab", "val": "c"})
    code, _, err = train_cli(train_main, _folder_args(only, tmp_path / "o2", "--epochs", "1"), capsys)
    assert code == 2
    _one_line(err, "that train/ lacks ('c')")  # not "contains no images": it does, of a class train/ lacks
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_a_resumed_run_keeps_the_command_that_reruns_it(tmp_path, capsys, train_cli):
    """The checkpoint's training.command_line (and the export manifest's training command) became the `--resume`
    command, which cannot rerun anything (`--model is required`)."""
    out = tmp_path / "run"
    code, _, err = train_cli(train_main, [*DIGITS, "--epochs", "2", "--max-steps", "1", "--out", str(out)], capsys)
    assert code == 0, err
    code, _, err = train_cli(train_main, ["--out", str(out), "--resume", "--max-steps", "0"], capsys)
    assert code == 0, err
    line = json.loads((out / "checkpoint.json").read_text())["training"]["command_line"]
    assert "--model vit_c_micro" in line and "--resume" not in line, line
    # ... and says where the run now stops: resumed to the end, the rerun has no --max-steps 1 (it trained 2 epochs)
    assert "--max-steps" not in line, line


def test_the_command_line_of_a_run_resumed_further_stops_where_it_stopped():
    from train.config import with_max_steps

    began = ("python", "-m", "train", "--model", "m", "--max-steps", "5", "--out", "r")
    assert with_max_steps(began, 8) == ("python", "-m", "train", "--model", "m", "--out", "r", "--max-steps", "8")
    assert with_max_steps(began, 0) == ("python", "-m", "train", "--model", "m", "--out", "r")
    assert with_max_steps(("python", "-m", "train", "--max-steps=5"), 7) == ("python", "-m", "train", "--max-steps",
                                                                              "7")


def test_a_train_class_without_images_is_refused_by_name(tmp_path, capsys, train_cli):
    """It became a class the model has an output for but never saw (and images only in a subdirectory were
    skipped without a word); torchvision's ImageFolder refuses it too."""
    root = folder(tmp_path / "d", {"train": "ab", "val": "ab"})
    (root / "train" / "empty").mkdir()
    (root / "train" / "nested" / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "train" / "nested" / "sub" / "0.png")
    code, _, err = train_cli(train_main, _folder_args(root, tmp_path / "o", "--epochs", "1"), capsys)
    assert code == 2 and not (tmp_path / "o").exists()
    _one_line(err, "2 class director(ies) with no image file directly inside ('empty', 'nested'")
    assert load_dataset(root, "val").class_names == ["a", "b", "empty", "nested"]  # val may lack a class


def test_an_out_inside_the_dataset_is_refused_and_nothing_is_written_there(tmp_path, capsys, train_cli):
    data = folder(tmp_path / "d")
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    for out in (data / "train" / "run1", data / "runs" / "x", data):
        code, _, err = train_cli(train_main, _folder_args(data, out, "--epochs", "1"), capsys)
        assert code == 2
        _one_line(err, "lies inside the dataset folder")
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before  # no run directory, no lock file


def test_fewer_than_two_classes_is_refused_before_training(tmp_path, capsys, train_cli):
    data = folder(tmp_path / "d", {"train": "a", "val": "a"})
    code, _, err = train_cli(train_main, _folder_args(data, tmp_path / "o", "--epochs", "1"), capsys)
    assert code == 2
    _one_line(err, "1 class (a); a classifier needs at least 2")


def test_a_class_name_that_is_not_utf8_says_so(tmp_path):
    data = folder(tmp_path / "d")
    bad = os.fsencode(data / "train") + b"/caf\xe9"
    os.mkdir(bad)
    Image.new("RGB", (8, 8)).save(os.fsdecode(bad + b"/0.png"))
    with pytest.raises(DatasetError, match=r"class directory b'caf\\xe9' .*is not valid UTF-8"):
        load_dataset(data, "train")


# ----------------------------------------------------------------------------------- resuming a done run (#8)


def test_resume_of_a_finished_or_stopped_run_says_so_and_changes_nothing(tmp_path, capsys, train_cli):
    done = tmp_path / "done"
    code, _, err = train_cli(train_main, [*DIGITS, "--epochs", "1", "--out", str(done)], capsys)
    assert code == 0, err
    files = {p.name: p.read_bytes() for p in done.iterdir()}
    code, said, err = train_cli(train_main, ["--out", str(done), "--resume"], capsys)
    assert code == 0, err
    assert "the run is finished (1 epoch, 2 steps); nothing to resume" in said and "resuming" not in said, said
    assert {p.name: p.read_bytes() for p in done.iterdir()} == files
    # Killed after its checkpoint, before its metrics and curves: the resume writes them (the run stays finished).
    (done / "metrics.jsonl").unlink()
    (done / "curves.png").unlink()
    code, said, err = train_cli(train_main, ["--out", str(done), "--resume"], capsys)
    assert code == 0 and "nothing to resume" in said, err
    assert (done / "metrics.jsonl").read_bytes() == files["metrics.jsonl"] and (done / "curves.png").stat().st_size

    stopped = tmp_path / "stopped"
    code, _, err = train_cli(train_main, [*DIGITS, "--epochs", "2", "--max-steps", "1", "--out", str(stopped)],
                             capsys)
    assert code == 0, err
    files = {p.name: p.read_bytes() for p in stopped.iterdir()}
    code, said, err = train_cli(train_main, ["--out", str(stopped), "--resume"], capsys)  # --max-steps 1 inherited
    assert code == 0 and "the run stopped at --max-steps 1 (step 1 of 4); --resume --max-steps 0 continues" in said
    assert {p.name: p.read_bytes() for p in stopped.iterdir()} == files
    code, said, err = train_cli(train_main, ["--out", str(stopped), "--resume", "--max-steps", "0"], capsys)
    assert code == 0 and "resuming" in said, err
    t = _training(stopped)
    assert t["steps"] == 4 and t["resumed_times"] == 1


# ------------------------------------------------------------------------------ what the checkpoint records (#8)


def test_the_recorded_command_line_reruns_the_training(tmp_path, capsys, train_cli, monkeypatch):
    from train.options import command_line

    data = folder(tmp_path / "my data")
    argv = _folder_args(data, tmp_path / "run", "--epochs", "0")
    code, _, err = train_cli(train_main, argv, capsys)
    assert code == 0, err
    assert shlex.split(_training(tmp_path / "run")["command_line"]) == ["python", "-m", "train", *argv, "--device",
                                                                         "cpu"]
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("sys.argv", ["/somewhere/train/__main__.py", "--model", "vit_c_micro"])
    assert command_line(["--model", "vit_c_micro"]) == ("python", "-m", "train", "--model", "vit_c_micro")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_ADDR", "h")
    monkeypatch.setenv("MASTER_PORT", "1")
    assert command_line(["--out", "r"]) == ("torchrun", "--nnodes", "2", "--nproc_per_node", "4", "-m", "train",
                                            "--out", "r")


def test_corrupt_train_files_counts_every_file_training_skipped(tmp_path, capsys, train_cli):
    data = folder(tmp_path / "d")
    for name in ("x1.png", "x2.png"):  # side by side in the file order: one replaces the other's replacement
        (data / "train" / "a" / name).write_bytes(b"")
    paths = [str(p) for p in load_dataset(data, "train").paths]
    first, n = paths.index(str(data / "train" / "a" / "x1.png")), len(paths)
    # A seed whose first batch of 2 holds x1 but not x2: x1's replacement x2 is skipped there too.
    seed = next(s for s in range(200) if first in (b := epoch_permutation(n, s, 0)[:2].tolist()) and first + 1 not in b
                and first - 1 not in b)
    out = tmp_path / "run"
    code, _, err = train_cli(train_main, [*_folder_args(data, out, "--epochs", "1", "--max-steps", "1"),
                                          "--batch-size", "2", "--seed", str(seed)], capsys)
    assert code == 0, err
    assert _training(out)["corrupt_train_files"] == 2
