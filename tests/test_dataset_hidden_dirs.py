"""Directories of a folder dataset that are not classes (hidden ones, `__MACOSX`, `@eaDir`): skipped by one rule
for every reader, and never silently: training's summary line and its refusals name them, with the images they
held (a class named `.NET` would otherwise vanish with half the data, the model trained on the rest)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from data.datasets import DatasetError, load_dataset
from models.checkpoint import read_checkpoint_meta

ARGS = ["--device", "cpu", "--model", "vit_c_micro", "--epochs", "0", "--batch-size", "4", "--threads", "1",
        "--workers", "0", "--no-progress"]


def _class(root: Path, split: str, name: str, n: int) -> Path:
    d = root / split / name
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (40 * i % 256, 90, 160)).save(d / f"{i}.png")
    return d


def _dotted(root: Path, *classes: str) -> Path:
    """The report's folder: classes '.22 caliber' and '.NET' (4 train / 2 val images each) beside `classes`."""
    for name in (".22 caliber", ".NET", *classes):
        _class(root, "train", name, 4)
        _class(root, "val", name, 2)
    return root


def test_hidden_and_system_directories_are_skipped_and_counted(tmp_path):
    from data.datasets import not_a_class, skipped_note

    root = _dotted(tmp_path / "d", "pistol", "rifle")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    apple = root / "train" / "__MACOSX" / "rifle"  # what unzipping a macOS zip of the class folders leaves
    apple.mkdir(parents=True)
    (apple / "._0.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    (root / "train" / "@eaDir").mkdir()
    train, val = load_dataset(root, "train"), load_dataset(root, "val")
    assert train.class_names == val.class_names == ["pistol", "rifle"]
    assert len(train) == 8 and len(val) == 4
    assert train.skipped_dirs == ((".22 caliber", 4), (".NET", 4), (".ipynb_checkpoints", 0), ("@eaDir", 0),
                                  ("__MACOSX", 0))
    assert val.skipped_dirs == ((".22 caliber", 2), (".NET", 2))
    assert train.subset(3).skipped_dirs == train.skipped_dirs  # a --train-subset still says what was skipped
    note = skipped_note(train, val)
    assert note.startswith("5 directories skipped as hidden or system ones, not classes: ")
    assert "'.22 caliber' (in train/ and val/, 6 images)" in note and "'.NET' (in train/ and val/, 6 images)" in note
    assert "'__MACOSX' (in train/)" in note and "must not start with '.'" in note
    assert skipped_note(load_dataset("digits", "val")) == ""
    assert [not_a_class(n) for n in (".NET", "__MACOSX", "@eaDir", "NET", "_x", "macosx")] == [True] * 3 + [False] * 3


def test_fewer_than_two_classes_left_names_the_skipped_directories(tmp_path, capsys, train_cli):
    from train.__main__ import main

    root = _dotted(tmp_path / "d", "rifle")
    code, out, err = train_cli(main, [*ARGS, "--dataset", str(root), "--out", str(tmp_path / "run")], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "1 class (rifle); a classifier needs at least 2" in lines[0]
    assert "'.22 caliber' (in train/ and val/, 6 images), '.NET' (in train/ and val/, 6 images)" in lines[0]
    assert not (tmp_path / "run").exists()


def test_the_summary_line_names_the_skipped_directories(tmp_path, capsys, train_cli):
    from train.__main__ import main

    root = _dotted(tmp_path / "d", "pistol", "rifle")
    run = tmp_path / "run"
    code, out, err = train_cli(main, [*ARGS, "--dataset", str(root), "--out", str(run)], capsys)
    assert code == 0, err
    summary = next(line for line in out.splitlines() if " train / " in line)
    assert "8 train / 4 val images (2 directories skipped as hidden ones, not classes: '.22 caliber' " \
           "(in train/ and val/, 6 images), '.NET' (in train/ and val/, 6 images)" in summary
    assert read_checkpoint_meta(run).class_names == ("pistol", "rifle")


def test_refusals_of_a_split_name_the_directories_it_skipped(tmp_path):
    root = tmp_path / "d"
    _class(root, "train", "rifle", 2)
    _class(root, "train", ".pistol", 2)
    _class(root, "val", "rifle", 1)
    _class(root, "val", "pistol", 1)  # what train/ has as .pistol
    with pytest.raises(DatasetError, match=r"train/ lacks \('pistol'\).*'\.pistol' \(in train/, 2 images\)"):
        load_dataset(root, "val")
    only = tmp_path / "only"
    _class(only, "train", ".NET", 2)
    with pytest.raises(DatasetError, match=r"has no class directories; 1 directory skipped .*'\.NET' \(in train/, "
                                           r"2 images\)"):
        load_dataset(only, "train")
