"""Hostile checkpoints, configs and golden inputs: each is one clear error (CheckpointError, ValueError, BundleError)
before anything large is allocated, and the CLIs turn it into exit 2 with one line."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import runtimes
from models import bundle as bundle_contract
from models import config as config_bounds
from models.bundle import BundleError, Manifest, read_manifest, write_manifest
from models.checkpoint import (
    META_FILE,
    CheckpointError,
    TrainingRecord,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from models.complexity import complexity
from models.config import ConvLayer, ConvStem, ViTConfig
from models.registry import get_config, list_variants
from runtimes.loader import MAX_GOLDEN_BYTES, read_golden

REPO = Path(__file__).resolve().parents[1]
LEGACY = REPO / "tests" / "data" / "legacy-bundle-v1"


# --- checkpoints --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real vit_c_micro checkpoint (random init) as save_checkpoint writes it."""
    import torch

    from data.datasets import ANIMAL_CLASSES, default_preprocessing
    from models import build_model

    torch.manual_seed(0)
    model = build_model("vit_c_micro").eval()
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "run", model, class_names=ANIMAL_CLASSES,
                           preprocessing=default_preprocessing("animals", 32), extra={"dataset": "animals"})


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    out = tmp_path / "c"
    shutil.copytree(checkpoint, out)
    return out


def _with_meta(checkpoint: Path, tmp_path: Path, doc: object) -> Path:
    out = _copy(checkpoint, tmp_path)
    (out / META_FILE).write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return out


def _refused(path: Path, *words: str) -> str:
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        read_checkpoint_meta(path)
    message = str(info.value)
    assert "\n" not in message and time.perf_counter() - start < 5, message
    for w in words:
        assert w in message, message
    return message


def _edit(raw: dict, dotted: str, value: object) -> dict:
    doc = copy.deepcopy(raw)
    *parents, key = dotted.split(".")
    target = doc
    for p in parents:
        target = target[p]
    target[key] = value
    return doc


def test_a_saved_checkpoint_reads_and_loads(checkpoint):
    meta = read_checkpoint_meta(checkpoint)
    assert meta.model == meta.config.name == "vit_c_micro" and len(meta.class_names) == 10
    model, _ = load_checkpoint(checkpoint)
    assert model.cfg == meta.config
    assert load_checkpoint(checkpoint, image_size=64)[0].cfg.image_size == 64  # position embedding resized
    assert meta.dataset == "animals" and meta.training is None  # saved outside a training run


def test_the_training_summary_reads_typed(checkpoint, tmp_path):
    raw = json.loads((checkpoint / META_FILE).read_text())
    summary = {"steps": 12, "config": {"lr": 0.001}, "data": {"train": "ab12", "val": None}, "command_line": "x",
               "diverged": True, "notes": "kept in raw"}
    meta = read_checkpoint_meta(_with_meta(checkpoint, tmp_path, {**raw, "training": summary}))
    assert meta.training == TrainingRecord(command_line="x", config={"lr": 0.001}, data={"train": "ab12"},
                                           steps=12, diverged=True)
    assert meta.raw["training"]["notes"] == "kept in raw"


@pytest.mark.parametrize(("text", "says"), [
    ("[]", "must be an object, got list"),
    ("null", "must be an object, got null"),
    ('"hello"', "must be an object, got str"),
    ("5", "must be an object, got int"),
    ("[" * 100_000, "nested too deeply"),
    ("{" * 5 + "not json", "JSONDecodeError"),
])
def test_a_checkpoint_json_that_is_not_an_object_is_refused(checkpoint, tmp_path, text, says):
    _refused(_with_meta(checkpoint, tmp_path, text), "corrupt checkpoint metadata", says)


@pytest.mark.parametrize(("old", "new", "says"), [
    ('"ln_eps": 1e-06', '"ln_eps": NaN', "non-finite number NaN"),
    ('"ln_eps": 1e-06', '"ln_eps": Infinity', "non-finite number Infinity"),
    ('"ln_eps": 1e-06', '"ln_eps": 1e400', "out of range"),
    ('"num_classes": 10,\n  "class_names"', f'"num_classes": {"9" * 5000},\n  "class_names"', "ValueError"),
])
def test_non_finite_or_overflowing_numbers_are_refused(checkpoint, tmp_path, old, new, says):
    text = (checkpoint / META_FILE).read_text()
    assert old in text
    _refused(_with_meta(checkpoint, tmp_path, text.replace(old, new)), says)


@pytest.mark.parametrize(("field", "value", "says"), [
    ("model", 5, "'model' must be a string, got int"),
    ("model", "zzz", "'model' 'zzz' differs from config.name 'vit_c_micro'"),
    ("model", "vit_p_micro", "differs from config.name"),
    ("stem", "patchify", "'stem' 'patchify' differs from config.stem.kind 'conv'"),
    ("class_names", "abcdefghij", "'class_names' must be a list, got str"),
    ("class_names", list(range(10)), "'class_names[0]' must be a string, got int"),
    ("class_names", ["a"] * 9, "config.num_classes' is 10, class_names lists 9"),
    ("num_classes", 11, "'num_classes' is 11"),
    ("config", [], "'config' must be an object"),
    ("config.depth", 10**9, "depth must be at most 256"),
    ("config.depth", True, "depth must be a positive integer"),
    ("config.num_classes", 10**9, "num_classes must be at most 100000"),
    ("config.ln_eps", 0, "ln_eps must be a finite number in (0, 1]"),
    ("config.stem", "conv", "config.stem must be an object"),
    ("config.stem.layers", [{"kernel": 3, "stride": 2, "width": 16}] * 100, "1..16 layers"),
    ("config.extra", 1, "field 'config.extra' is not one this vitc knows"),
    ("preprocessing", None, "'preprocessing' must be an object"),
    ("preprocessing.mean", ["nan", 0.5, 0.5], "'preprocessing' is invalid: mean must hold 3 finite numbers"),
    ("preprocessing.resize", 10**9, "'preprocessing' is invalid: preprocessing needs 1 <= crop <= resize, "
                                    "integers, crop at most 4096, resize at most 8192; got crop 32, resize 1000000000"),
    ("preprocessing.crop", 16, "'preprocessing.crop' 16 differs from config.image_size 32"),
    ("weights", "x.safetensors", "'weights' must be an object"),
    ("weights.file", "../../etc/passwd", "'weights.file' must be a file name inside the checkpoint"),
    ("weights.sha256", "00", "'weights.sha256' must be 64 lowercase hex digits"),
    ("weights.format", "pickle", "'weights.format' must be \"safetensors\""),
])
def test_ill_typed_or_inconsistent_fields_are_named(checkpoint, tmp_path, field, value, says):
    raw = json.loads((checkpoint / META_FILE).read_text())
    _refused(_with_meta(checkpoint, tmp_path, _edit(raw, field, value)), says)


def test_preprocessing_must_match_the_config_and_stay_bounded(checkpoint, tmp_path):
    raw = json.loads((checkpoint / META_FILE).read_text())
    doc = _edit(raw, "config.image_size", 64)  # a valid model whose input the 32-pixel crop does not fill
    _refused(_with_meta(checkpoint, tmp_path / "a", doc), "'preprocessing.crop' 32 differs from config.image_size 64")
    huge = _edit(_edit(raw, "preprocessing.crop", 10**5), "preprocessing.resize", 10**9)
    _refused(_with_meta(checkpoint, tmp_path / "b", huge), "'preprocessing' is invalid", "crop at most 4096")
    huge_model = _edit(raw, "config.image_size", 4096)
    _refused(_with_meta(checkpoint, tmp_path / "c", huge_model), "largest tensor per image")


def test_a_registered_name_must_not_label_another_stem(checkpoint, tmp_path):
    raw = json.loads((checkpoint / META_FILE).read_text())
    doc = _edit(_edit(raw, "model", "vit_p_micro"), "config.name", "vit_p_micro")  # a conv stem under a ViT_P name
    _refused(_with_meta(checkpoint, tmp_path, doc), "vit_p_micro is a patchify-stem variant, but config.stem is conv")


def _rewrite_weights(checkpoint: Path, tmp_path: Path, change) -> Path:  # noqa: ANN001 - dict -> dict
    from safetensors.numpy import load_file, save_file

    out = _copy(checkpoint, tmp_path)
    meta = json.loads((out / META_FILE).read_text())
    wpath = out / meta["weights"]["file"]
    save_file(change(load_file(str(wpath))), str(wpath), metadata={"format": "vitc-checkpoint"})
    meta["weights"]["sha256"] = hashlib.sha256(wpath.read_bytes()).hexdigest()
    (out / META_FILE).write_text(json.dumps(meta))
    return out


@pytest.mark.parametrize(("dtype", "says"), [(np.float64, "F64"), (np.int8, "I8"), (np.float16, "F16")])
def test_weights_of_another_dtype_are_refused_not_cast(checkpoint, tmp_path, dtype, says):
    def cast(state: dict) -> dict:
        return {k: v.astype(dtype) if v.dtype == np.float32 else v for k, v in state.items()}

    path = _rewrite_weights(checkpoint, tmp_path, cast)
    with pytest.raises(CheckpointError, match=f"is {says}, expected float32"):
        load_checkpoint(path)


def test_weights_of_another_shape_or_set_are_refused_before_loading(checkpoint, tmp_path):
    def reshape(state: dict) -> dict:
        return {**state, "head.weight": np.zeros((10, 64), np.float32)}

    with pytest.raises(CheckpointError, match=r"head.weight has shape \[10, 64\], expected \[10, 32\]"):
        load_checkpoint(_rewrite_weights(checkpoint, tmp_path / "a", reshape))

    def extra(state: dict) -> dict:
        return {**state, "huge": np.zeros(1, np.float32)}

    with pytest.raises(CheckpointError, match=r"unexpected \['huge'\]"):
        load_checkpoint(_rewrite_weights(checkpoint, tmp_path / "b", extra))


def test_eval_and_export_exit_2_with_one_line(checkpoint, tmp_path, train_cli, capsys):
    from export.cli import main as export_main
    from train.eval import main as eval_main

    bad = _with_meta(checkpoint, tmp_path / "list", "[]")
    code, _, err = train_cli(eval_main, ["--checkpoint", str(bad)], capsys)
    assert code == 2 and "must be an object, got list" in err and len(err.strip().splitlines()) == 1, err
    text = (checkpoint / META_FILE).read_text().replace('"ln_eps": 1e-06', '"ln_eps": NaN')
    nan = _with_meta(checkpoint, tmp_path / "nan", text)
    assert export_main(["--checkpoint", str(nan), "--out", str(tmp_path / "bundle"), "--targets", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "non-finite number NaN" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bundle").exists()


def _poison(key: str, value: float):  # noqa: ANN202 - a state-dict edit for _rewrite_weights
    """Set one element in the middle of tensor `key` (a reduction that skips elements would miss it)."""
    def change(state: dict) -> dict:
        tensor = state[key].copy()
        tensor.reshape(-1)[tensor.size // 2] = value
        return {**state, key: tensor}

    return change


@pytest.mark.parametrize(("key", "value", "says"), [
    ("head.weight", float("nan"), "head.weight holds NaN"),
    ("stem.body.1.running_var", float("nan"), "stem.body.1.running_var holds NaN"),  # a buffer, not a parameter
    ("pos_embed", float("inf"), "pos_embed holds an infinite value"),
    ("blocks.0.attn.qkv.bias", float("-inf"), "blocks.0.attn.qkv.bias holds an infinite value"),
])
def test_non_finite_weights_are_refused_naming_the_tensor(checkpoint, tmp_path, key, value, says):
    path = _rewrite_weights(checkpoint, tmp_path, _poison(key, value))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert says in message and "cannot be used" in message and "\n" not in message, message


def test_non_finite_weights_of_a_diverged_run_say_so(checkpoint, tmp_path):
    path = _rewrite_weights(checkpoint, tmp_path, _poison("head.weight", float("nan")))
    meta = json.loads((path / META_FILE).read_text())
    (path / META_FILE).write_text(json.dumps({**meta, "training": {"diverged": True}}))
    with pytest.raises(CheckpointError, match=r"head.weight holds NaN \(the training run diverged\)"):
        load_checkpoint(path)


def test_eval_and_export_refuse_non_finite_weights_with_one_line(checkpoint, tmp_path, train_cli, capsys):
    from export.cli import main as export_main
    from train.eval import main as eval_main

    nan = _rewrite_weights(checkpoint, tmp_path / "nan", _poison("head.weight", float("nan")))
    code, _, err = train_cli(eval_main, ["--checkpoint", str(nan)], capsys)
    assert code == 2 and "head.weight holds NaN" in err and len(err.strip().splitlines()) == 1, err
    assert export_main(["--checkpoint", str(nan), "--out", str(tmp_path / "bundle"), "--targets", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "head.weight holds NaN" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bundle").exists()


def test_saved_weights_get_the_umask_default_mode_like_every_other_file(tmp_path):
    import os

    from data.datasets import ANIMAL_CLASSES, default_preprocessing
    from models import build_model

    old = os.umask(0o022)
    try:
        out = save_checkpoint(tmp_path / "run", build_model("vit_c_micro"), class_names=ANIMAL_CLASSES,
                              preprocessing=default_preprocessing("animals", 32))
    finally:
        os.umask(old)
    (weights,) = out.glob("weights-*.safetensors")
    assert weights.stat().st_mode & 0o777 == (out / META_FILE).stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(("name", "says"), [("cat\ndog", "got 'cat\\ndog'"), ("", "got ''"),
                                            ("\udcff", "got '\\udcff'")])
def test_a_checkpoint_is_not_saved_with_class_names_its_reader_refuses(tmp_path, name, says):
    from data.datasets import default_preprocessing
    from models import build_model

    with pytest.raises(ValueError) as info:
        save_checkpoint(tmp_path / "run", build_model("vit_c_micro"), class_names=[name] + list("abcdefghi"),
                        preprocessing=default_preprocessing("animals", 32))
    message = str(info.value)
    assert says in message and "'class_names[0]' must be 1..1024 characters without control characters" in message
    assert not (tmp_path / "run").exists()  # refused before anything, the directory included, was made


@pytest.mark.parametrize(("field", "value", "says"), [
    ("class_names", ["a\nb"] + list("bcdefghij"), "'class_names[0]' must be 1..1024 characters without control"),
    ("class_names", list("abcdefghi") + ["\ud800"], "'class_names[9]' must be 1..1024 characters"),
    ("class_names", list("abcdefghi") + [""], "'class_names[9]' must be 1..1024 characters"),
    ("class_names", list("abcdefghi") + ["x" * 1025], "'class_names[9]' must be 1..1024 characters"),
    ("config.name", "vit_c_micro\nINFO forged", "config name must be a string of 1..200 characters without control"),
    ("weights.file", "weights\n.safetensors", "'weights.file' must be a file name inside the checkpoint"),
    ("dataset", 5, "'dataset' must be a string, got int"),
    ("dataset", "animals\n", "'dataset' must be a name or path of 1..4096 characters without control"),
    ("training", "summary", "'training' must be an object, got str"),
    ("training", {"command_line": ["python", "-m", "train"]}, "'training.command_line' must be a string, got list"),
    ("training", {"data": "abc"}, "'training.data' must be an object, got str"),
    ("training", {"data": {"train": 5}}, "'training.data.train' must be a string, got int"),
    ("training", {"steps": "12"}, "'training.steps' must be an integer, got str"),
    ("training", {"steps": -1}, "'training.steps' must be a count of steps"),
    ("training", {"diverged": "no"}, "'training.diverged' must be true or false, got str"),
    ("training", {"config": [1]}, "'training.config' must be an object, got list"),
    ("preprocessing.std", [0.5, 0.5, 0], "'preprocessing' is invalid: std must be > 0"),
    ("preprocessing.mean", [0.5, 0.5], "'preprocessing' is invalid: mean must hold 3 finite numbers"),
    ("preprocessing.mean", "abc", "'preprocessing' is invalid: mean must hold 3 finite numbers"),
    ("preprocessing.resize", 40.5, "'preprocessing' is invalid: preprocessing needs 1 <= crop <= resize"),
    ("preprocessing.crop", True, "'preprocessing' is invalid: preprocessing needs 1 <= crop <= resize"),
    ("preprocessing.channels", 1, "'preprocessing' is invalid: channels and layout must be 3 and 'NCHW'"),
    ("preprocessing.layout", "NHWC", "'preprocessing' is invalid: channels and layout must be 3 and 'NCHW'"),
    ("preprocessing.interpolation", ["bilinear"], "'preprocessing' is invalid: interpolation must be one of"),
])
def test_fields_the_export_and_serving_code_trust_are_typed_and_bounded(checkpoint, tmp_path, field, value, says):
    raw = json.loads((checkpoint / META_FILE).read_text())
    _refused(_with_meta(checkpoint, tmp_path, _edit(raw, field, value)), says)


def test_checkpoint_json_nested_beyond_the_bound_is_refused(checkpoint, tmp_path):
    raw = json.loads((checkpoint / META_FILE).read_text())
    deep: object = 0
    for _ in range(80):  # deep enough to refuse, shallow enough that the parser itself would accept it
        deep = [deep]
    _refused(_with_meta(checkpoint, tmp_path, {**raw, "training": {"notes": deep}}), "nested too deeply")


def test_the_checkpoint_reader_mutates_nothing(checkpoint):
    before = (checkpoint / META_FILE).read_bytes()
    meta = read_checkpoint_meta(checkpoint)
    assert meta.raw == json.loads(before) and (checkpoint / META_FILE).read_bytes() == before


# --- configs ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "says"), [
    ({"depth": 257}, "depth must be at most 256"),
    ({"num_classes": 100_001}, "num_classes must be at most 100000"),
    ({"image_size": 8192}, "image_size must be at most 4096"),
    ({"in_chans": 5}, "in_chans must be 3, got 5"),
    ({"depth": True}, "depth must be a positive integer"),
    ({"ln_eps": float("nan")}, "ln_eps must be a finite number"),
    ({"ln_eps": 0.0}, "ln_eps must be a finite number"),
    ({"name": ""}, "config name must be a string"),
])
def test_config_fields_are_bounded(overrides, says):
    with pytest.raises(ValueError, match=says.replace("(", r"\(")):
        dataclasses.replace(get_config("vit_p_micro"), **overrides)


def test_the_parameter_count_is_bounded_before_a_model_is_built():
    with pytest.raises(ValueError, match=r"vit_p_1gf: about [\d,]+ parameters is more than the 4,294,967,296 allowed"):
        get_config("vit_p_1gf", depth=64, dim=16384, heads=16, mlp_dim=65536)
    with pytest.raises(ValueError, match="largest tensor per image holds [\\d,]+ values, more than"):
        get_config("vit_p_micro", image_size=4096)  # a million tokens: terabytes of attention maps
    # The peak is bounded, not the sum over layers: the paper's largest models still build at 1024 pixels.
    for name in ("vit_p_72gf", "vit_c_72gf", "vit_p_18gf"):
        assert get_config(name, image_size=1024).peak_activations() < 2**31


@pytest.mark.parametrize(("layers", "says"), [
    ((ConvLayer(2, 2, 16), ConvLayer(3, 2, 32), ConvLayer(1, 1, 32)), "odd kernel"),
    ((ConvLayer(17, 2, 16), ConvLayer(3, 2, 32), ConvLayer(1, 1, 32)), "odd kernel up to 15"),
    ((ConvLayer(3, 2, 10**6), ConvLayer(3, 2, 32), ConvLayer(1, 1, 32)), "width up to 16384"),
    ((ConvLayer(3, 2, "16"), ConvLayer(3, 2, 32), ConvLayer(1, 1, 32)), "positive integers"),
    ((), "1..16 layers"),
])
def test_conv_stem_layers_are_bounded(layers, says):
    with pytest.raises(ValueError, match=says):
        ViTConfig("bad", ConvStem(layers), 2, 32, 64, 2, patch_size=4, image_size=32)


def test_every_registered_variant_is_within_the_bounds():
    for name in list_variants():
        cfg = get_config(name)
        assert ViTConfig.from_dict(cfg.to_dict()) == cfg
        assert complexity(cfg).params <= config_bounds.MAX_PARAMS
    assert 350e6 < complexity(get_config("vit_p_72gf")).params < config_bounds.MAX_PARAMS


def test_config_limits_agree_with_the_bundle_contract():
    assert config_bounds.MAX_IMAGE_SIDE == bundle_contract.MAX_IMAGE_SIDE
    assert config_bounds.MAX_CLASSES == bundle_contract.MAX_CLASSES


def test_a_manifest_with_a_huge_config_is_refused():
    raw = json.loads((LEGACY / "manifest.json").read_text())
    with pytest.raises(BundleError, match="depth must be at most 256"):
        Manifest.from_dict(_edit(raw, "config.depth", 10**9))


# --- golden inputs ------------------------------------------------------------------------------------------------


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _header_only(members: dict[str, tuple[str, tuple[int, ...]]]) -> bytes:
    """An .npz whose arrays declare dtype and shape but carry 64 bytes: what a hostile header looks like."""
    from numpy.lib import format as npy

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, (descr, shape) in members.items():
            head = io.BytesIO()
            npy.write_array_header_1_0(head, {"descr": descr, "fortran_order": False, "shape": shape})
            z.writestr(f"{name}.npy", head.getvalue() + b"\0" * 64)
    return buf.getvalue()


def _golden_bundle(tmp_path: Path, data: bytes, samples: int = 8) -> Path:
    """The legacy bundle with `data` as its golden.npz, listed (with its true sha256) in the manifest."""
    bundle = tmp_path / "g"
    shutil.copytree(LEGACY, bundle)
    (bundle / "golden.npz").write_bytes(data)
    m = read_manifest(bundle)
    golden = bundle_contract.Golden(bundle_contract.file_entries(bundle, [bundle / "golden.npz"])[0], samples)
    write_manifest(bundle, dataclasses.replace(m, golden=golden))
    return bundle


def _pixels(n: int = 8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _corrupt_deflate() -> bytes:
    """A well-formed zip whose compressed pixels stream is damaged."""
    data = bytearray(_npz({"pixels": np.zeros((8, 32, 32, 3), np.uint8), "logits": GOOD_LOGITS}))
    data[60:80] = b"\xff" * 20
    return bytes(data)


GOOD_LOGITS = np.zeros((8, 10), np.float32)
HOSTILE_GOLDEN = {
    "garbage": (b"garbage" * 100, "unreadable (BadZipFile"),
    "object array": (_npz({"pixels": np.array([object()] * 3, dtype=object), "logits": GOOD_LOGITS}),
                     "array 'pixels' is object[3], expected uint8[8, 32, 32, 3]"),
    "huge header": (_header_only({"pixels": ("|u1", (100_000, 4096, 4096, 3)), "logits": ("<f4", (8, 10))}),
                    "array 'pixels' is uint8[100000, 4096, 4096, 3], expected uint8[8, 32, 32, 3]"),
    "truncated data": (_header_only({"pixels": ("|u1", (8, 32, 32, 3)), "logits": ("<f4", (8, 10))}),
                       "array 'pixels' holds 64 bytes of data, expected 24576"),
    "float64 logits": (_npz({"pixels": _pixels(), "logits": GOOD_LOGITS.astype(np.float64)}),
                       "array 'logits' is float64[8, 10], expected float32[8, 10]"),
    "missing logits": (_npz({"pixels": _pixels()}), "no 'logits' array"),
    "wrong sample count": (_npz({"pixels": _pixels(4), "logits": GOOD_LOGITS[:4]}), "expected uint8[8, 32, 32, 3]"),
    "NaN logits": (_npz({"pixels": _pixels(), "logits": np.full((8, 10), np.nan, np.float32)}),
                   "reference logits are not finite"),
    "corrupt deflate": (_corrupt_deflate(), "while decompressing data"),
    "a plain .npy": (b"\x93NUMPY\x01\x00" + b"\0" * 100, "unreadable (BadZipFile"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_GOLDEN))
def test_hostile_golden_inputs_are_one_bundle_error(tmp_path, case):
    data, says = HOSTILE_GOLDEN[case]
    bundle = _golden_bundle(tmp_path, data)
    with pytest.raises(BundleError) as info:
        read_golden(bundle / "golden.npz", read_manifest(bundle))
    message = str(info.value)
    assert says in message and "\n" not in message and "re-export the bundle" in message, message


def test_golden_inputs_beyond_the_byte_cap_are_refused_before_reading(tmp_path):
    bundle = _golden_bundle(tmp_path, b"")
    raw = json.loads((bundle / "manifest.json").read_text())
    side = 4096  # 1024 samples of 4096x4096x3: 48 GiB if believed
    for key, value in (("config.image_size", side), ("config.patch_size", 256), ("preprocessing.crop", side),
                       ("preprocessing.resize", side), ("input.height", side), ("input.width", side),
                       ("golden.samples", 1024)):
        raw = _edit(raw, key, value)
    raw["config"]["stem"] = {"kind": "patchify", "patch": 256}
    raw["config"]["name"] = raw["model"] = "custom"
    raw["stem"] = "patchify"
    manifest = Manifest.from_dict(raw)
    with pytest.raises(BundleError, match=f"more than the {MAX_GOLDEN_BYTES:,} allowed"):
        read_golden(bundle / "golden.npz", manifest)


def test_valid_golden_inputs_pass_through_the_real_runtime(tmp_path):
    if not runtimes.get("onnxruntime").installed():
        pytest.skip("onnxruntime is not installed")
    from models.preprocessing import normalize

    legacy = read_manifest(LEGACY)
    backend = runtimes.open_backend(LEGACY, legacy, "onnxruntime")
    try:
        logits = np.asarray(backend.infer(normalize(_pixels(), legacy.preprocessing)), np.float32)
    finally:
        backend.close()
    bundle = _golden_bundle(tmp_path / "ok", _npz({"pixels": _pixels(), "logits": logits}))
    runtimes.open_backend(bundle, read_manifest(bundle), "onnxruntime").close()
    bad = _golden_bundle(tmp_path / "bad", HOSTILE_GOLDEN["object array"][0])
    with pytest.raises(BundleError, match="array 'pixels' is object"):
        runtimes.open_backend(bad, read_manifest(bad), "onnxruntime")


def test_serve_exits_2_with_one_line_on_a_corrupt_golden_file(tmp_path):
    bundle = _golden_bundle(tmp_path, HOSTILE_GOLDEN["huge header"][0])
    proc = subprocess.run([sys.executable, "-m", "serve", "--model", str(bundle), "--port", "0",
                           "--backend", "onnxruntime"], cwd=REPO, capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "expected uint8[8, 32, 32, 3]" in err, err
