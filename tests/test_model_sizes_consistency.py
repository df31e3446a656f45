"""One image size throughout: `--augment none` trains on the evaluation view, a checkpoint loaded at another size
comes with metadata for that size, and a model refuses an input of another size by name."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.datasets import ANIMAL_CLASSES, decode_checked, default_preprocessing, load_dataset
from models import build_model
from models.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from models.preprocessing import Preprocessing, preprocess, to_uint8
from models.registry import get_config
from train.pipeline import TrainImages, predecode


def _folder(root: Path) -> Path:
    """A two-class ImageNet-layout folder of non-square images (landscape and portrait, RGB, grey and RGBA)."""
    rng = np.random.default_rng(0)
    shapes = [((40, 57, 3), "RGB"), ((71, 45, 3), "RGB"), ((50, 64), "L"), ((45, 38, 4), "RGBA")]
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            d = root / split / c
            d.mkdir(parents=True)
            for i, (shape, mode) in enumerate(shapes):
                Image.fromarray(rng.integers(0, 256, shape, np.uint8), mode).save(d / f"{i}.png")
    return root


def _eval_view(path: Path, spec: Preprocessing) -> torch.Tensor:
    """What evaluation, export parity and the server feed the model for a file, as a (3, S, S) uint8 tensor."""
    return torch.tensor(to_uint8(decode_checked(path), spec)).permute(2, 0, 1)


def test_augment_none_trains_a_folder_on_the_evaluation_view(tmp_path):
    root = _folder(tmp_path / "ds")
    images, spec = load_dataset(root, "train"), default_preprocessing(root, 32)
    assert (spec.resize, spec.crop) == (37, 32)  # a folder's view: shorter side 8/7 of the crop, then the crop
    samples = TrainImages(images, spec, "none", 1.0, 0.0, 0)
    for i, path in enumerate(images.paths):
        sample = samples[(0, i)]
        assert sample.found and torch.equal(sample.image, _eval_view(path, spec)), path


def test_augment_none_flips_the_evaluation_view(tmp_path):
    root = _folder(tmp_path / "ds")
    images, spec = load_dataset(root, "train"), default_preprocessing(root, 32)
    samples = TrainImages(images, spec, "none", 1.0, 1.0, 0)  # every sample flipped
    for i, path in enumerate(images.paths):
        assert torch.equal(samples[(3, i)].image, _eval_view(path, spec).flip(-1)), path


def test_augment_none_keeps_an_embedded_set_as_decoded():
    images = load_dataset("animals", "train")
    spec = default_preprocessing("animals", 32)
    cache = predecode(images, spec)
    samples = TrainImages(images, spec, "none", 1.0, 0.0, 0, cache=cache)
    for i in range(0, len(images), 97):
        assert torch.equal(samples[(0, i)].image, torch.from_numpy(cache[i]).permute(2, 0, 1))


def _saved(where: Path, preprocessing: Preprocessing) -> Path:
    """A seeded vit_c_micro at 32 px (head drawn wide) saved with `preprocessing`."""
    torch.manual_seed(0)
    model = build_model("vit_c_micro").eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5)
    return save_checkpoint(where, model, class_names=ANIMAL_CLASSES, preprocessing=preprocessing,
                           extra={"dataset": "animals"})


@pytest.mark.parametrize(("trained", "size", "resize"), [
    (default_preprocessing("animals", 32), 64, 64),  # embedded: resize == crop
    (Preprocessing.imagenet(32), 64, Preprocessing.imagenet(64).resize),  # a folder: what training at 64 saves
    (Preprocessing.imagenet(32), 96, Preprocessing.imagenet(96).resize),
    (Preprocessing(resize=48, crop=32, mode="L"), 64, 96),  # another ratio: kept
])
def test_load_checkpoint_at_another_size_describes_that_size(tmp_path, trained, size, resize):
    path = _saved(tmp_path / "ckpt", trained)
    model, meta = load_checkpoint(path, image_size=size)
    saved = read_checkpoint_meta(path)
    assert model.cfg.image_size == meta.config.image_size == size
    assert meta.config == model.cfg == dataclasses.replace(saved.config, image_size=size)
    assert meta.preprocessing == dataclasses.replace(trained, crop=size, resize=resize)
    assert dataclasses.replace(meta, config=saved.config, preprocessing=saved.preprocessing) == saved  # the rest kept
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70, 3), np.uint8))
    with torch.no_grad():  # the documented way: preprocess by the metadata, then run the model
        logits = model(torch.from_numpy(preprocess([image], meta.preprocessing)))
    assert logits.shape == (1, len(ANIMAL_CLASSES)) and torch.isfinite(logits).all()


def test_load_checkpoint_at_its_own_size_changes_nothing(tmp_path):
    path = _saved(tmp_path / "ckpt", Preprocessing.imagenet(32))
    plain = load_checkpoint(path)[1]
    assert load_checkpoint(path, image_size=32)[1] == plain == read_checkpoint_meta(path)


@pytest.mark.parametrize(("height", "width"), [(48, 48), (32, 48), (48, 32)])
def test_a_model_refuses_an_input_of_another_size_by_name(height, width):
    model = build_model("vit_c_micro").eval()
    with torch.no_grad(), pytest.raises(ValueError, match=rf"{height}x{width}.*32x32"):
        model(torch.zeros(1, 3, height, width))


def test_a_model_takes_its_own_size_at_any_batch():
    model = build_model("vit_p_micro").eval()
    with torch.no_grad():
        assert model(torch.zeros(3, 3, 32, 32)).shape == (3, 10)


def test_get_config_takes_a_numpy_integer_size():
    cfg = get_config("vit_c_micro", image_size=np.int64(64), num_classes=np.int32(5))
    assert cfg == get_config("vit_c_micro", image_size=64, num_classes=5)
    assert type(cfg.image_size) is int and type(cfg.num_classes) is int  # JSON-ready, as a checkpoint writes it
    for bad in (True, np.float64(64), 64.0, "64"):
        with pytest.raises(ValueError, match="image_size must be a positive integer"):
            get_config("vit_c_micro", image_size=bad)
