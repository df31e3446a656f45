"""Training on an ImageNet-layout folder of real JPEG/PNG files: classes, preprocessing, corrupt files, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.checkpoint import read_checkpoint_meta
from models.preprocessing import Preprocessing
from train.__main__ import main as train_main
from train.eval import main as eval_main

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "fox")
COLOURS = {"cat": (200, 60, 40), "dog": (40, 180, 60), "fox": (50, 70, 220)}


def _write_image(path: Path, cls: str, i: int) -> None:
    rng = np.random.default_rng(100 * CLASSES.index(cls) + i)
    h, w = 40 + 3 * i, 48 - 2 * i  # odd sizes: resize and crop do real work
    arr = np.clip(rng.normal(COLOURS[cls], 30, size=(h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    if path.suffix == ".png" and i % 2:
        img = img.convert("L")  # grey PNG in an RGB dataset
    elif path.suffix == ".png":
        img = img.convert("RGBA")  # alpha channel
    img.save(path)


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory) -> Path:
    """root/{train,val}/{cat,dog,fox}/ with JPEGs and PNGs, plus one corrupt file in each split."""
    root = tmp_path_factory.mktemp("folder") / "tiny"
    for split, n in (("train", 8), ("val", 2)):
        for cls in CLASSES:
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                _write_image(d / f"{i}.{'jpg' if i % 3 else 'png'}", cls, i)
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "val" / "dog" / "broken.jpg").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root




def test_folder_training_checkpoint_and_eval(train_folder, tmp_path, capsys, train_cli):
    out = tmp_path / "run"
    argv = ["--model", "vit_p_micro", "--dataset", str(train_folder), "--epochs", "2", "--batch-size", "4",
            "--workers", "1", "--out", str(out), "--ema-every", "1"]
    code, stdout, err = train_cli(train_main, argv, capsys)
    assert code == 0, err
    meta = read_checkpoint_meta(out)
    assert meta.class_names == CLASSES and meta.config.num_classes == 3
    assert meta.preprocessing == Preprocessing.imagenet(32)  # ImageNet's test transform at the model size
    assert meta.raw["dataset"] == str(train_folder.resolve())
    t = meta.raw["training"]
    assert t["recipe"] == "paper" and t["epochs_completed"] == 2 and t["steps"] == 2 * (25 // 4)
    assert t["corrupt_train_files"] == 1 and t["corrupt_val_skipped"] == 1 and t["val_images"] == 6
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2] and all("val_top1_ema" in h for h in history)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Served accuracy == validation accuracy: train.eval goes through the same preprocessing.
    code, _, err = train_cli(eval_main, ["--checkpoint", str(out)], capsys)
    assert code == 0, err
    res = json.loads((out / "eval-tiny-val.json").read_text())
    saved = t["final_val_top1_ema"] if t["weights_source"] == "ema" else t["final_val_top1"]
    assert res["top1"] == saved and res["samples"] == 6 and res["skipped_corrupt"] == 1


def test_corrupt_file_fails_clearly_when_asked(train_folder, tmp_path):
    # A real process with a DataLoader worker: the error is one line naming the file, no traceback.
    proc = subprocess.run(
        [sys.executable, "-m", "train", "--device", "cpu", "--model", "vit_c_micro", "--dataset", str(train_folder),
         "--epochs", "1", "--batch-size", "4", "--workers", "1", "--corrupt", "fail", "--out", str(tmp_path / "run")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "broken.jpg" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoint.json").exists()


def test_empty_or_unreadable_folders_exit_2(tmp_path, capsys, train_cli):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_images = tmp_path / "no_images"
    (no_images / "train" / "a").mkdir(parents=True)
    (no_images / "val" / "a").mkdir(parents=True)
    unreadable = tmp_path / "unreadable"
    for split in ("train", "val"):
        (unreadable / split / "a").mkdir(parents=True)
        for i in range(3):
            (unreadable / split / "a" / f"{i}.jpg").write_bytes(b"garbage")
    for root, needle in ((empty, "no train/"), (no_images, "no images"), (unreadable, "readable")):
        argv = ["--model", "vit_c_micro", "--dataset", str(root), "--epochs", "1", "--out", str(tmp_path / "o")]
        code, _, err = train_cli(train_main, argv, capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_a_decompression_bomb_counts_as_unreadable(tmp_path):
    from data.datasets import decode_checked

    bomb = tmp_path / "bomb.png"
    Image.new("1", (14_000, 14_000)).save(bomb)  # 196 M pixels in a few kB: beyond PIL's bound
    assert bomb.stat().st_size < 1 << 20
    assert decode_checked(bomb) is None


def test_a_class_name_no_checkpoint_could_hold_is_refused_when_the_dataset_loads(tmp_path):
    from data.datasets import DatasetError, load_dataset

    for split in ("train", "val"):
        (tmp_path / split / "line\nbreak").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / "line\nbreak" / "a.png")
    with pytest.raises(DatasetError, match="rename it"):
        load_dataset(tmp_path, "train")


def test_eval_maps_a_folder_with_some_of_the_classes_onto_the_checkpoints(train_folder, tmp_path, capsys, train_cli):
    out = tmp_path / "run"
    code, _, err = train_cli(train_main, ["--model", "vit_p_micro", "--dataset", str(train_folder), "--epochs", "1",
                                          "--batch-size", "8", "--out", str(out)], capsys)
    assert code == 0, err
    # The same val images of two classes: beside train/ (class indices from train/) and alone, listed in another
    # order than the checkpoint's (fox, cat sort as cat, fox; without dog every index after cat shifts).
    with_train, alone = tmp_path / "with_train", tmp_path / "alone"
    for root in (with_train, alone):
        for cls in ("fox", "cat"):
            (root / "val" / cls).mkdir(parents=True)
            for f in (train_folder / "val" / cls).iterdir():
                (root / "val" / cls / f.name).write_bytes(f.read_bytes())
    (with_train / "train").symlink_to(train_folder / "train", target_is_directory=True)
    results = []
    for root in (with_train, alone):
        code, _, err = train_cli(eval_main, ["--checkpoint", str(out), "--dataset", str(root),
                                             "--out", str(tmp_path / f"{root.name}.json")], capsys)
        assert code == 0, err
        results.append(json.loads((tmp_path / f"{root.name}.json").read_text()))
    assert results[0]["samples"] == results[1]["samples"] == 4
    assert (results[0]["top1"], results[0]["top5"]) == (results[1]["top1"], results[1]["top5"])
    # A class the checkpoint does not have is named, not evaluated as errors.
    (alone / "val" / "wolf").mkdir()
    _write_image(alone / "val" / "wolf" / "0.jpg", "fox", 0)
    code, _, err = train_cli(eval_main, ["--checkpoint", str(out), "--dataset", str(alone)], capsys)
    assert code == 2 and "1 of its 3 classes are not the model's ('wolf')" in err


def test_a_class_name_in_another_unicode_normalisation_is_pointed_out():
    import unicodedata

    from data.datasets import DatasetError, ImageSet

    nfd = unicodedata.normalize("NFD", "café")
    images = ImageSet("root", "val", ["bar", nfd], np.asarray([0, 1, 1]))
    with pytest.raises(DatasetError, match="differ only in Unicode normalisation"):
        images.labelled_as(["café", "bar"])
    relabelled = ImageSet("root", "val", ["bar", "café"], np.asarray([0, 1, 1])).labelled_as(["café", "bar"])
    assert relabelled.class_names == ["café", "bar"] and relabelled.labels.tolist() == [1, 0, 0]
    # a class directory with no image, unknown to the model, holds nothing to evaluate: not refused
    extra = ImageSet("root", "val", ["bar", "empty", "café"], np.asarray([0, 2])).labelled_as(["café", "bar"])
    assert extra.labels.tolist() == [1, 0]
