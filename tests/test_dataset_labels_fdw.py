"""Readers of a trained model (train.eval, export's parity, the served check: `load_labelled`) accept the val/ that
training accepted: a directory holding no images beside the classes is not read, so its name (a tab in it, bytes
that are not UTF-8) is not refused either; a directory that holds images is still refused for such a name, and
training's rules are unchanged."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.datasets import DatasetError, load_dataset, load_labelled

CLASSES = ["a", "b", "c"]
ODD = "x\ty"  # a name `is_label` refuses: a tab
NAME_REFUSED = "a class name must be 1..1024 characters without control characters or line breaks; rename it"


def _pngs(d: Path, n: int, seed: int) -> None:
    """n 40x40 RGB PNGs of noise in d, each class a brightness of its own."""
    d.mkdir(parents=True)
    for i in range(n):
        pixels = np.random.default_rng([seed, i]).integers(0, 64, (40, 40, 3)) + 60 * seed
        Image.fromarray(pixels.astype(np.uint8)).save(d / f"{i}.png")


def _folder(root: Path, n: int = 8) -> Path:
    """root/{train,val}/{a,b,c}/ with n PNGs each; returns root."""
    for split in ("train", "val"):
        for k, c in enumerate(CLASSES):
            _pngs(root / split / c, n, k)
    return root


def _odd_dirs(val: Path) -> None:
    """Directories beside val/'s classes that hold no image: a tab in one's name, a readme in another, and a name
    whose bytes are not UTF-8."""
    (val / ODD).mkdir()
    (val / "zz_notes").mkdir()
    (val / "zz_notes" / "readme.txt").write_text("hi")
    os.mkdir(os.fsencode(val) + b"/caf\xe9")


def test_a_reader_labels_val_as_training_does_beside_empty_directories_of_odd_names(tmp_path):
    """The review's repro, in the library: `load_labelled` refused 'x\\ty' (holding nothing) by its name, which
    training never read (its val/ takes train/'s classes)."""
    root = _folder(tmp_path / "ds")
    _odd_dirs(root / "val")
    training = load_dataset(str(root), "val")  # training's rule: accepted, before and after
    read = load_labelled(str(root), "val", CLASSES)
    assert read.class_names == CLASSES and len(read) == 24
    assert read.fingerprint() == training.fingerprint()  # train.eval's "the images the run reported on"
    own = load_dataset(str(root), "val", match_train=False)  # val/'s own classes (serve.sample)
    assert len(own) == 24 and {own.class_names[i] for i in own.labels} == set(CLASSES)


def test_an_odd_name_that_holds_images_is_still_refused_and_training_is_unchanged(tmp_path):
    """What changes is a directory holding no image: one that holds images (a file listed as an image, readable or
    not) is refused by its name as before, and training refuses an odd name beside train/'s classes, empty or not."""
    root = _folder(tmp_path / "ds")
    _odd_dirs(root / "val")
    assert len(load_labelled(str(root), "val", CLASSES)) == 24  # empty: not read, not refused
    (root / "val" / ODD / "0.png").write_bytes(b"not an image")  # listed as an image, as training lists it
    with pytest.raises(DatasetError) as caught:
        load_labelled(str(root), "val", CLASSES)
    assert str(caught.value) == f"class directory {ODD!r} in {root}: {NAME_REFUSED}"
    (root / "val" / ODD / "0.png").unlink()
    Image.new("RGB", (8, 8)).save(os.fsdecode(os.fsencode(root / "val") + b"/caf\xe9/0.png"))
    with pytest.raises(DatasetError, match=r"b'caf\\xe9' in .*: the name is not valid UTF-8"):
        load_labelled(str(root), "val", CLASSES)
    os.unlink(os.fsencode(root / "val") + b"/caf\xe9/0.png")
    # Training: val/ takes train/'s classes (its odd directories are not read), train/'s own are all checked.
    assert load_dataset(str(root), "val").class_names == CLASSES
    (root / "train" / ODD).mkdir()
    with pytest.raises(DatasetError) as caught:
        load_dataset(str(root), "train")
    assert str(caught.value) == f"class directory {ODD!r} in {root}: {NAME_REFUSED}"


def test_train_eval_scores_the_folder_the_run_trained_on(tmp_path, train_cli, capsys):
    """End to end: a run trains on the folder, val/ gets an empty 'x\\ty' (training still accepts the folder), and
    train.eval reports on the images the run reported on (it refused the folder, exit 2)."""
    from train.__main__ import main as train_main
    from train.eval import main as eval_main

    root = _folder(tmp_path / "ds")
    run = tmp_path / "run"
    base = ["--device", "cpu", "--model", "vit_c_micro", "--recipe", "small", "--epochs", "1", "--batch-size", "4",
            "--threads", "1", "--workers", "0", "--no-progress", "--dataset", str(root)]
    code, _, err = train_cli(train_main, [*base, "--out", str(run), "--max-steps", "1"], capsys)
    assert code == 0, err
    _odd_dirs(root / "val")
    code, _, err = train_cli(train_main, [*base, "--out", str(tmp_path / "again"), "--max-steps", "1"], capsys)
    assert code == 0, err  # training accepts the folder as it is now
    report = tmp_path / "eval.json"
    code, out, err = train_cli(eval_main, ["--checkpoint", str(run), "--threads", "1", "--out", str(report)], capsys)
    assert code == 0, out + err
    result = json.loads(report.read_text())
    assert result["same_images_as_training"] is True and result["samples"] == 24, result
