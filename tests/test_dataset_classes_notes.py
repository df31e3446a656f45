"""What a folder's class directories hold beside their images: subdirectories (not read, and said so once in the
training's console) and class names that differ from train/'s only in Unicode normalisation (pointed out)."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.datasets import DatasetError, load_dataset
from train.__main__ import main as train_main


def folder(root: Path, classes: str = "ab", n: int = 3) -> Path:
    """root/{train,val}/<class>/ with n 12x12 PNGs per class; returns root."""
    for split in ("train", "val"):
        for c in classes:
            _pngs(root / split / c, n, ord(c))
    return root


def _pngs(d: Path, n: int, seed: int) -> None:
    d.mkdir(parents=True)
    for i in range(n):
        pixels = np.random.default_rng(100 * seed + i).integers(0, 255, (12, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(d / f"{i}.png")


def test_subdirectories_of_class_directories_are_named_not_read(tmp_path):
    """train/a/more held 3 images nobody read, and nothing said so (only a class with no direct image was refused)."""
    from data.datasets import nested_note

    data = folder(tmp_path / "d")
    _pngs(data / "train" / "a" / "more", 3, 7)
    _pngs(data / "train" / "a" / "zz" / "deeper", 1, 8)
    _pngs(data / "val" / "b" / "extra", 1, 9)
    for tools in ("@eaDir", ".ipynb_checkpoints"):  # a tool's folder, as beside the classes: not worth a note
        _pngs(data / "train" / "b" / tools, 1, 10)
    train, val = load_dataset(data, "train"), load_dataset(data, "val")
    assert len(train) == 6 and len(val) == 6  # still direct children only
    assert train.nested_dirs == ("train/a/more",) and val.nested_dirs == ("val/b/extra",)
    assert train.subset(2).nested_dirs == train.nested_dirs
    assert nested_note(train, val) == ("note: 2 class directories hold subdirectories, which are not read (e.g. "
                                       "train/a/more, val/b/extra)")
    assert nested_note(load_dataset(folder(tmp_path / "flat"), "train")) == ""


def test_training_prints_the_subdirectory_note_once(tmp_path, capsys, train_cli):
    data = folder(tmp_path / "d")
    _pngs(data / "train" / "a" / "more", 3, 7)
    code, said, err = train_cli(train_main, ["--model", "vit_c_micro", "--dataset", str(data), "--epochs", "0",
                                             "--threads", "1", "--workers", "0", "--no-progress", "--out",
                                             str(tmp_path / "run")], capsys)
    assert code == 0, err
    notes = [line for line in said.splitlines() if line.startswith("note:")]
    assert notes == ["note: 1 class directory holds subdirectories, which are not read (e.g. train/a/more)"], said


@pytest.mark.skipif(os.uname().sysname == "Darwin", reason="macOS file systems may normalise names themselves")
def test_a_val_only_class_that_differs_in_normalisation_only_is_pointed_out(tmp_path):
    """val/café (NFD) beside train/café (NFC) was refused as a class train/ lacks, with no word of why."""
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    root = tmp_path / "d"
    for split, name in (("train", nfc), ("val", nfd)):
        _pngs(root / split / name, 2, 1)
        _pngs(root / split / "bar", 2, 2)
    with pytest.raises(DatasetError) as caught:
        load_dataset(root, "val")
    message = str(caught.value)
    assert "1 class(es) that train/ lacks" in message, message
    assert (f"; {nfd!r} and train/'s {nfc!r} differ only in Unicode normalisation (NFD vs NFC): rename the "
            "directory") in message, message
