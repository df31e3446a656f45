"""vitc used as a library: the public constructors and writers of the contracts refuse what their readers would, with
a ValueError subclass (never a raw TypeError, AttributeError or RecursionError), before anything is written."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest

import models
import runtimes
from data.datasets import ANIMAL_CLASSES, DatasetError, load_dataset
from models.bundle import BundleError, Manifest
from models.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_meta, save_checkpoint
from models.config import ConvLayer, ConvStem, ViTConfig
from models.io import atomic_write_json
from models.preprocessing import Preprocessing, preprocess

REPO = Path(__file__).resolve().parents[1]
LEGACY = REPO / "tests" / "data" / "legacy-bundle-v1"
NAMES = list(ANIMAL_CLASSES)
PRE = Preprocessing(resize=36, crop=32)


def _micro(seed: int = 0):  # noqa: ANN202 - a VisionTransformer (torch is imported lazily)
    import torch

    from models import build_model

    torch.manual_seed(seed)
    return build_model("vit_c_micro").eval()


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


# --- save_checkpoint refuses what load_checkpoint would, before it writes or removes anything ----------------------


def _nan_model():  # noqa: ANN202
    import torch

    model = _micro(1)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    return model


def _inf_model():  # noqa: ANN202
    import torch

    model = _micro(1)
    with torch.no_grad():
        model.pos_embed[0, 0, 0] = float("inf")
    return model


REFUSED = {
    "crop differs from image_size": (lambda: _micro(1), {"preprocessing": Preprocessing.imagenet()},
                                     "'preprocessing.crop' 224 differs from config.image_size 32"),
    "extra overrides model": (lambda: _micro(1), {"extra": {"model": "zzz"}}, "extra sets model"),
    "extra overrides config": (lambda: _micro(1), {"extra": {"config": {}, "weights": {}}},
                               "extra sets config, weights"),
    "NaN in extra": (lambda: _micro(1), {"extra": {"x": float("nan")}}, "not strict JSON"),
    "infinity in the summary": (lambda: _micro(1), {"extra": {"training": {"lr": math.inf}}}, "not strict JSON"),
    "unserialisable extra": (lambda: _micro(1), {"extra": {"x": object()}}, "not strict JSON"),
    "a set in extra": (lambda: _micro(1), {"extra": {"x": {1, 2}}}, "not strict JSON"),
    "a summary the reader refuses": (lambda: _micro(1), {"extra": {"dataset": "animals\n"}},
                                     "'dataset' must be a name or path"),
    "NaN weight": (_nan_model, {}, "head.weight holds NaN"),
    "infinite weight": (_inf_model, {}, "pos_embed holds an infinite value"),
    "fp16 weights": (lambda: _micro(1).half(), {}, "cls_token is float16, expected float32"),
    "float64 weights": (lambda: _micro(1).double(), {}, "expected float32"),
    "preprocessing as a dict": (lambda: _micro(1), {"preprocessing": {"resize": 36, "crop": 32}},
                                "preprocessing must be a models.preprocessing.Preprocessing"),
    "a module that is not a ViT": (lambda: __import__("torch").nn.Linear(2, 2), {},
                                   "model must be a models.vit.VisionTransformer"),
    "duplicate class names": (lambda: _micro(1), {"class_names": ["x"] * 10},
                              "'class_names[1]' repeats class_names[0] 'x'"),
    "class names as a str": (lambda: _micro(1), {"class_names": "abcdefghij"}, "'class_names' must be a list"),
    "too few class names": (lambda: _micro(1), {"class_names": NAMES[:3]}, "class_names lists 3"),
    "extra not a dict": (lambda: _micro(1), {"extra": [("dataset", "animals")]}, "extra must be a dict"),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    out = save_checkpoint(tmp_path_factory.mktemp("good") / "run", _micro(), class_names=NAMES, preprocessing=PRE,
                          extra={"dataset": "animals"})
    return out, _snapshot(out)


@pytest.mark.parametrize("case", list(REFUSED))
def test_save_refuses_before_touching_the_checkpoint_there(good, case):
    out, before = good
    build, kwargs, says = REFUSED[case]
    args = {"class_names": NAMES, "preprocessing": PRE, **kwargs}
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(out, build(), **args)
    assert says in str(info.value) and "\n" not in str(info.value), info.value
    assert _snapshot(out) == before  # no new weights, no leftover temporary, the old weights still there
    model, meta = load_checkpoint(out)
    assert meta.class_names == tuple(NAMES)


@pytest.mark.parametrize("case", ["crop differs from image_size", "NaN in extra", "unserialisable extra",
                                  "NaN weight", "fp16 weights"])
def test_save_refused_into_a_new_directory_creates_nothing(tmp_path, case):
    build, kwargs, _ = REFUSED[case]
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path / "new", build(), **{"class_names": NAMES, "preprocessing": PRE, **kwargs})
    assert list(tmp_path.iterdir()) == []


def test_what_save_accepts_loads(tmp_path):
    """A tuple of names and an extra summary with nulls and nesting: saved, and read back as written."""
    out = save_checkpoint(tmp_path / "run", _micro(), class_names=tuple(NAMES), preprocessing=PRE,
                          extra={"dataset": "animals", "training": {"final_val_loss": None, "data": {"val": "x"}}})
    model, meta = load_checkpoint(out)
    assert meta.class_names == tuple(NAMES) and meta.raw["training"]["final_val_loss"] is None


def test_a_diverged_runs_checkpoint_is_saved_and_its_reader_says_why(tmp_path):
    """Training records a diverged run's summary with its (NaN) weights; the reader refuses those weights by name."""
    out = save_checkpoint(tmp_path / "run", _nan_model(), class_names=NAMES, preprocessing=PRE,
                          extra={"training": {"diverged": True}})
    assert read_checkpoint_meta(out).raw["training"]["diverged"] is True
    with pytest.raises(CheckpointError, match=r"head.weight holds NaN \(the training run diverged\)"):
        load_checkpoint(out)


@pytest.mark.parametrize("value", [float("nan"), math.inf, -math.inf, {1, 2}, object()])
def test_atomic_write_json_writes_only_strict_json(tmp_path, value):
    path = tmp_path / "doc.json"
    with pytest.raises(ValueError, match="not strict JSON"):
        atomic_write_json(path, {"a": [1, {"b": value}]})
    assert list(tmp_path.iterdir()) == []
    atomic_write_json(path, {"a": [1, {"b": None}]})
    assert json.loads(path.read_text()) == {"a": [1, {"b": None}]}


def test_atomic_write_json_refuses_nesting_its_reader_refuses(tmp_path):
    deep: object = 0
    for _ in range(100):
        deep = [deep]
    with pytest.raises(ValueError, match="nested too deeply"):
        atomic_write_json(tmp_path / "doc.json", deep)
    assert list(tmp_path.iterdir()) == []


def test_a_zero_median_has_no_relative_spread_and_the_summary_is_strict_json(tmp_path):
    """A Server-Timing stage recorded as 0.000 ms gave rel_spread inf, which the strict writer refuses."""
    from benchmarks.stats import summarize

    s = summarize([0.0, 0.0, 0.0, 0.001])
    assert s["rel_spread"] is None
    atomic_write_json(tmp_path / "s.json", {"server_timing_ms": {"queue": s}})


# --- typed errors from the public constructors ---------------------------------------------------------------------


@pytest.mark.parametrize(("doc", "says"), [
    (None, "preprocessing must be an object, got NoneType"),
    ([36, 32], "preprocessing must be an object, got list"),
    ({"resize": 36, "crop": 32, "x": 1}, "unknown keys ['x']"),
    ({"resize": 36, "crop": 32, 5: 1}, "unknown keys ['5']"),
    ({"resize": 36}, "is missing crop"),
    ({}, "is missing crop, resize"),
])
def test_preprocessing_from_dict_raises_value_error(doc, says):
    with pytest.raises(ValueError) as info:
        Preprocessing.from_dict(doc)
    assert says in str(info.value)
    assert Preprocessing.from_dict(PRE.to_dict()) == PRE


@pytest.fixture(scope="module")
def raw() -> dict:
    return json.loads((LEGACY / "manifest.json").read_text())


def _deep(levels: int) -> object:
    deep: object = 0
    for _ in range(levels):
        deep = [deep]
    return deep


@pytest.mark.parametrize(("where", "value", "says"), [
    ("input", float("nan"), "not strict JSON"),
    ("input", math.inf, "not strict JSON"),
    ("artifact", {1, 2}, "not strict JSON"),
    ("artifact", object(), "not strict JSON"),
    ("top", _deep(5000), "nested too deeply"),  # json.dumps alone would raise RecursionError
])
def test_manifest_from_dict_refuses_extra_fields_strict_json_cannot_hold(raw, where, value, says):
    doc = copy.deepcopy(raw)
    {"input": doc["input"], "artifact": doc["artifacts"][0], "top": doc}[where]["extra"] = value
    with pytest.raises(BundleError) as info:
        Manifest.from_dict(doc)
    assert says in str(info.value) and "\n" not in str(info.value)
    assert Manifest.from_dict(copy.deepcopy(raw)).contract == Manifest.from_dict(raw).contract


@pytest.mark.parametrize("layers", [None, (x for x in ()), 5, "abc", {ConvLayer(1, 1, 32)}])
def test_conv_stem_needs_a_list_or_tuple_of_layers(layers):
    with pytest.raises(ValueError, match="conv stem layers must be a list or tuple"):
        ConvStem(layers)


def test_a_conv_stem_from_a_list_is_frozen_hashable_and_equals_the_tuple_one():
    layers = [ConvLayer(3, 2, 24), ConvLayer(3, 2, 48), ConvLayer(1, 1, 32)]
    cfg = ViTConfig("x", ConvStem(layers), 2, 32, 64, 2, patch_size=4, image_size=32, num_classes=10)
    same = ViTConfig("x", ConvStem(tuple(layers)), 2, 32, 64, 2, patch_size=4, image_size=32, num_classes=10)
    layers.append(ConvLayer(3, 1, 32))  # after validation: must not reach the config
    assert isinstance(cfg.stem.layers, tuple) and len(cfg.stem.layers) == 3
    assert cfg == same and hash(cfg) == hash(same)
    assert ViTConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("call", ["get_config", "build_model"])
@pytest.mark.parametrize("name", ["nope", ["vit_c_micro"], None])
def test_an_unknown_variant_is_a_value_error_naming_the_known_ones(call, name):
    import models

    with pytest.raises(ValueError) as info:
        getattr(models, call)(name)
    assert "unknown model" in str(info.value) and "vit_c_micro" in str(info.value)
    assert not str(info.value).startswith('"')  # not KeyError's quoted repr
    assert isinstance(info.value, KeyError)  # callers that caught KeyError still do


# --- preprocessing numbers that normalise every input to NaN or infinity ------------------------------------------


@pytest.mark.parametrize(("mean", "std", "says"), [
    ((0.5, 0.5, 0.5), (1e-300, 1, 1), "std must be at least"),  # float32 0: division by zero
    ((0.5, 0.5, 0.5), (1e-40, 1, 1), "std must be at least"),  # float32 subnormal: 1/std overflows
    ((0.5, 0.5, 0.5), (1e-7, 1, 1), "std must be at least 1e-06"),
    ((1e39, 0, 0), (1, 1, 1), "mean must hold 3 finite numbers (within float32's range)"),
    ((0, 0, 0), (1, 1, 1e39), "std must hold 3 finite numbers (within float32's range)"),
    ((3e38, 0, 0), (0.5, 1, 1), "beyond float32's range"),  # each finite, mean / std is not
    ({0.1, 0.2, 0.3}, (1, 1, 1), "mean must hold 3 finite numbers (a list"),  # a set has no channel order
    ((0.5, 0.5, 0.5), frozenset({0.2, 0.3, 0.4}), "std must hold 3 finite numbers (a list"),
    ({"r": 0.1, "g": 0.2, "b": 0.3}, (1, 1, 1), "mean must hold 3 finite numbers"),
    (np.zeros((3, 1)), (1, 1, 1), "mean must hold 3 finite numbers"),
])
def test_preprocessing_refuses_numbers_that_overflow_float32(mean, std, says):
    with pytest.raises(ValueError) as info:
        Preprocessing(resize=36, crop=32, mean=mean, std=std)
    assert says in str(info.value), info.value
    doc = {**PRE.to_dict(), "mean": list(mean) if isinstance(mean, tuple) else mean, "std": list(std)
           if isinstance(std, tuple) else std}
    with pytest.raises(ValueError):
        Preprocessing.from_dict(doc)


def test_preprocessing_still_takes_lists_arrays_and_extreme_but_finite_values():
    from PIL import Image

    for mean, std in (([0.1, 0.2, 0.3], np.array([0.2, 0.3, 0.4])), ((-100.0, 0, 100), (1e-6, 1e-6, 1e-6)),
                      ((3e38, 0, 0), (1, 1, 1))):
        spec = Preprocessing(resize=36, crop=32, mean=mean, std=std)
        assert spec.mean == tuple(float(v) for v in mean)
        out = preprocess([Image.new("RGB", (40, 40), (255, 0, 128))], spec)
        assert np.isfinite(out).all()


# --- class names the answers could not tell apart -----------------------------------------------------------------


def test_a_manifest_with_a_repeated_class_name_is_refused_naming_it(raw):
    doc = copy.deepcopy(raw)
    doc["class_names"][3] = doc["class_names"][1]
    with pytest.raises(BundleError, match=rf"'class_names\[3\]' repeats class_names\[1\] '{doc['class_names'][1]}'"):
        Manifest.from_dict(doc)


def test_a_checkpoint_with_a_repeated_class_name_is_refused_naming_it(good, tmp_path):
    out, before = good
    doc = json.loads(before["checkpoint.json"])
    doc["class_names"][9] = doc["class_names"][0]
    (tmp_path / "checkpoint.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"'class_names\[9\]' repeats class_names\[0\]"):
        read_checkpoint_meta(tmp_path)


# --- datasets ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [-1, -1000, 2.5, True, "3"])
def test_a_subset_of_a_negative_or_non_integer_size_is_refused(n):
    images = load_dataset("digits", "val")
    with pytest.raises(DatasetError, match="a subset needs a whole number of images >= 0"):
        images.subset(n)


def test_subset_sizes_that_make_sense_still_work():
    images = load_dataset("digits", "val")
    assert len(images.subset(5)) == 5 and len(images.subset(np.int64(7))) == 7
    assert images.subset(len(images) + 10) is images and len(images.subset(0)) == 0


@pytest.mark.parametrize(("call", "why"), [
    (lambda: runtimes.open_backend("b", "b", "onnxruntime"),
     "manifest must be a models.bundle.Manifest (models.bundle.read_manifest(bundle)), got str"),
    (lambda: models.register("vit_z"), "register takes a models.ViTConfig, got str"),
    (lambda: models.complexity("vit_c_micro"),
     "complexity takes a models.ViTConfig (models.get_config(name)), got str"),
])
def test_public_functions_given_the_wrong_type_name_the_type_they_take(call, why):
    """Each was a bare AttributeError ("'str' object has no attribute 'select'")."""
    with pytest.raises(TypeError) as err:
        call()
    assert str(err.value) == why
