"""Readers that label a dataset by a model's classes: the served-path check scores a folder holding some of the
model's classes by name (as train.eval and export's parity do); train.eval, export's parity, the served check and
serve.sample match val/ against the checkpoint's classes, not against an unrelated train/ beside it (training keeps
that rule); an embedded set's name that a directory here shadows is said in a note."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.datasets import DatasetError, load_dataset
from export import served
from models.bundle import read_manifest

CLASSES = ["a", "b", "c"]


def _pngs(d: Path, n: int, seed: int) -> None:
    """n 40x40 RGB PNGs of noise in d."""
    d.mkdir(parents=True)
    for i in range(n):
        pixels = np.random.default_rng(1000 * seed + i).integers(0, 255, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(d / f"{i}.png")


def _folder(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    """root/<split>/<class>/ with the given image counts (split -> class -> n); returns root."""
    for split, classes in layout.items():
        for k, (c, n) in enumerate(classes.items()):
            _pngs(root / split / c, n, 10 * len(split) + k)
    return root


def _always_c(where: Path) -> Path:
    """A vit_c_micro checkpoint for classes a, b, c whose head predicts c for every image (a small weight, so the
    logits still differ per image as export's parity needs, under a large bias for c): its accuracy on any folder is
    the share of c's images, whoever measures it."""
    import torch

    from data.datasets import default_preprocessing
    from models import build_model
    from models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model("vit_c_micro", num_classes=len(CLASSES)).eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.01)
        model.head.bias.copy_(torch.tensor([0.0, 0.0, 20.0]))
    return save_checkpoint(where / "ckpt", model, class_names=CLASSES,
                           preprocessing=default_preprocessing("folder", 32), extra={"dataset": "folder"})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _always_c(tmp_path_factory.mktemp("always-c"))


@pytest.fixture(scope="module")
def subset_bundle(ckpt, tmp_path_factory) -> Path:
    """An ONNX bundle of `ckpt` exported with --dataset a folder holding only val/{b, c} (2 of b, 3 of c): the
    folder's own indices of b and c are 0 and 1, the model's 1 and 2."""
    from export.bundle import build_bundle

    root = tmp_path_factory.mktemp("subset")
    data = _folder(root / "evsub", {"val": {"c": 3, "b": 2}})
    build_bundle(ckpt, root / "b", targets=("onnx",), name="b", dataset=str(data), max_batch=8, parity_samples=8,
                 log=lambda _: None)
    return root / "b"


# ------------------------------------------------------------------------------------------- 1. the served check


def test_served_check_scores_a_subset_folder_by_the_models_class_names(subset_bundle):
    """The served check compared the folder's indices (b=0, c=1) with the model's (b=1, c=2): 0 % everywhere,
    recorded in the manifest, where train.eval measures 60 % on the same images."""
    from train.evaluate import evaluate_checkpoint

    manifest = read_manifest(subset_bundle)
    evaluated = evaluate_checkpoint(manifest.source.checkpoint, manifest.source.dataset)
    assert evaluated["top1"] == pytest.approx(0.6) and evaluated["samples"] == 5
    record = served.measure(subset_bundle, "onnxruntime", log=lambda _: None)
    assert record.samples == 5 and record == read_manifest(subset_bundle).served
    assert record.reference_accuracy == pytest.approx(evaluated["top1"])
    for name, entry in record.encodings.items():
        assert entry["accuracy"] == pytest.approx(evaluated["top1"]), name
        assert entry["agreement"] == 1.0, name


def test_served_check_refuses_a_class_the_model_lacks_by_name(subset_bundle, tmp_path):
    manifest = read_manifest(subset_bundle)
    other = _folder(tmp_path / "other", {"val": {"b": 1, "zz": 1}})
    elsewhere = replace(manifest, source=replace(manifest.source, dataset=str(other)))
    with pytest.raises(DatasetError, match=r"not the model's \('zz'\)"):
        served.check(subset_bundle, elsewhere, "onnxruntime")


# ------------------------------------------------------------- 2. val/ matched against the checkpoint, not train/


@pytest.fixture()
def unrelated_train(tmp_path) -> Path:
    """val/{a, b, c} (1, 1, 2 images) beside a train/ of another task (one class, zz)."""
    return _folder(tmp_path / "ev2", {"train": {"zz": 1}, "val": {"a": 1, "b": 1, "c": 2}})


def test_train_eval_matches_val_against_the_checkpoint_not_an_unrelated_train(ckpt, unrelated_train):
    from train.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(ckpt, str(unrelated_train))
    assert result["samples"] == 4 and result["top1"] == pytest.approx(0.5)


def test_export_parity_matches_val_against_the_checkpoint_not_an_unrelated_train(ckpt, unrelated_train):
    from export.bundle import parity_images
    from models.checkpoint import read_checkpoint_meta

    chosen = parity_images(read_checkpoint_meta(ckpt), str(unrelated_train), 100).images
    assert chosen.class_names == CLASSES and sorted(chosen.labels.tolist()) == [0, 1, 2, 2]


def test_served_check_matches_val_against_the_model_not_an_unrelated_train(subset_bundle, unrelated_train):
    manifest = read_manifest(subset_bundle)
    served.check(subset_bundle, replace(manifest, source=replace(manifest.source, dataset=str(unrelated_train))),
                 "onnxruntime")


def test_serve_sample_names_a_val_class_that_train_lacks(tmp_path):
    from serve.sample import write_sample

    data = _folder(tmp_path / "d", {"train": {"a": 1}, "val": {"b": 1}})
    assert write_sample(str(data), 0, str(tmp_path / "s.png")) == (0, "b")


def test_a_class_the_checkpoint_lacks_is_refused_as_the_checkpoints_not_train_s(ckpt, tmp_path):
    from train.evaluate import evaluate_checkpoint

    data = _folder(tmp_path / "d", {"train": {"a": 1, "b": 1, "c": 1}, "val": {"a": 1, "zz": 1}})
    with pytest.raises(DatasetError) as caught:
        evaluate_checkpoint(ckpt, str(data))
    message = str(caught.value)
    assert "not the model's ('zz')" in message and "train/" not in message and "\n" not in message, message


def test_training_still_refuses_a_class_only_val_has(unrelated_train):
    with pytest.raises(DatasetError, match=r"3 class\(es\) that train/ lacks \('a', 'b', 'c'\)"):
        load_dataset(unrelated_train, "val")


def test_train_eval_fingerprints_the_images_as_training_did_when_val_lacks_a_class(ckpt, tmp_path):
    """Labelled by the checkpoint's classes, a val/ of the very folder the model was trained on (lacking one of its
    classes) is the set training fingerprinted: train.eval still says these are the run's images."""
    from train.evaluate import evaluate_checkpoint

    data = _folder(tmp_path / "d", {"train": {"a": 1, "b": 1, "c": 1}, "val": {"a": 2, "c": 1}})
    result = evaluate_checkpoint(ckpt, str(data))
    assert result["images_fingerprint"] == load_dataset(data, "val").fingerprint()


# ------------------------------------------------------------------ 5. an embedded name a directory here shadows


def test_an_embedded_name_shadowing_a_directory_here_is_noted_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _folder(tmp_path / "digits", {"train": {"x": 1, "y": 1}, "val": {"x": 1, "y": 1}})
    train, val = load_dataset("digits", "train"), load_dataset("digits", "val")
    assert train.class_names == val.class_names == [str(i) for i in range(10)]  # still the embedded set
    out, err = capsys.readouterr()
    notes = err.strip().splitlines()
    assert out == "" and len(notes) == 1, err
    assert notes[0].startswith("note: ") and "embedded" in notes[0] and "./digits" in notes[0], err


def test_an_embedded_name_with_no_directory_here_says_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mnist.txt").write_text("not a directory")
    load_dataset("digits", "val")
    assert capsys.readouterr().err == ""


def test_serve_sample_notes_the_shadowed_folder(tmp_path, monkeypatch, capsys):
    from serve.sample import main

    monkeypatch.chdir(tmp_path)
    _folder(tmp_path / "animals", {"val": {"x": 1}})
    assert main(["--dataset", "animals", "--out", str(tmp_path / "s.png")]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("wrote ") and err.count("note: ") == 1 and "./animals" in err, (out, err)
