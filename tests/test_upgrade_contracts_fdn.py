"""Files of an earlier vitc met by this one (hDP -> fDN): a run whose variant the registry has since redefined resumes
with the definition it recorded (a note says so) or is refused in one line saying the definition changed, never as a
damaged resume.pt; a folder run that trained a class now skipped as a tool folder (@eaDir, __MACOSX) is refused
naming that class and what to do, not told to restore files nobody changed; and a checkpoint.json or manifest.json
missing a key of its preprocessing or model config (every release wrote all of them) is refused in one line naming
the key and the file, instead of being filled with ImageNet/RGB defaults or reported through a derived value.

The earlier definitions are made real for the run that needs them: the registry's entry (or the rule of skipped
directories) is what it was while that run trains, and today's when it resumes."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_serve_fixtures import LEGACY, legacy_with_manifest

import data.datasets as datasets
from models import registry
from models.bundle import BundleError, read_manifest
from models.checkpoint import META_FILE, CheckpointError, read_checkpoint_meta
from models.config import PatchifyStem, ViTConfig, conv_stem
from train.__main__ import main as train_main
from train.state import RESUME_FILE, save_resume

# vit_c_micro as an earlier vitc could have defined it: the same encoder, a wider stem (nano's widths).
EARLIER_MICRO = ViTConfig("vit_c_micro", conv_stem((3, 3, 1), (2, 2, 1), (24, 48, 32)), 2, 32, 64, 2,
                          patch_size=4, image_size=32, num_classes=10)


def _train(train_cli, argv: list[str], capsys) -> tuple[int, str, str]:
    """`python -m train argv` in-process: (exit code, stdout, stderr)."""
    return train_cli(train_main, argv, capsys)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / RESUME_FILE, weights_only=True)["model"]


def _without_checkpoint(run: Path) -> None:
    """The run as a kill before its first checkpoint leaves it: resume.pt alone."""
    (run / META_FILE).unlink()
    for f in run.glob("weights-*.safetensors"):
        f.unlink()


def _strip_resume(run: Path, *keys: str) -> None:
    """resume.pt without `keys`, as an earlier vitc wrote it (those records did not exist)."""
    state = torch.load(run / RESUME_FILE, weights_only=True)
    for key in ("version", *keys):
        state.pop(key, None)
    save_resume(run, state)


# ------------------------------------------------------------------- 2. a variant redefined since the run started


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory, train_cli, train_tiny) -> Path:
    """A TRAIN_TINY run stopped at step 2 while vit_c_micro had EARLIER_MICRO's stem (shared: tests copy it)."""
    run = tmp_path_factory.mktemp("earlier") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(registry._VARIANTS, "vit_c_micro", EARLIER_MICRO)
        code, _, err = train_cli(train_main, [*train_tiny, "--max-steps", "2", "--out", str(run)])
    assert code == 0, err
    assert _weights(run)["stem.body.0.weight"].shape[0] == 24  # not today's 16: the definitions differ
    return run


@pytest.fixture
def redefined(earlier_run, tmp_path) -> Path:
    return Path(shutil.copytree(earlier_run, tmp_path / "run"))


def _resumes_as_started(train_cli, run: Path, capsys, source: str) -> None:
    """The resume finishes the run with its own definition and says so in one note naming where it was recorded."""
    code, out, err = _train(train_cli, ["--out", str(run), "--resume", "--max-steps", "0"], capsys)
    assert code == 0, err
    notes = [line for line in out.splitlines() if line.startswith("note:") and "vit_c_micro" in line]
    assert len(notes) == 1 and "differs" in notes[0] and source in notes[0], out
    meta = read_checkpoint_meta(run)
    assert meta.config == EARLIER_MICRO and meta.training.steps == 4  # the whole epoch, on the run's own stem
    assert _weights(run)["stem.body.0.weight"].shape[0] == 24


def test_a_run_resumes_with_the_model_config_its_checkpoint_recorded(redefined, train_cli, capsys):
    """An earlier vitc's run (the hDP repro: vit_c_mini from ee277b8): its resume.pt records no model config."""
    _strip_resume(redefined, "model_config", "class_names")
    _resumes_as_started(train_cli, redefined, capsys, META_FILE)


def test_a_run_killed_before_its_checkpoint_resumes_with_the_config_resume_pt_recorded(redefined, train_cli,
                                                                                        capsys):
    _without_checkpoint(redefined)
    _resumes_as_started(train_cli, redefined, capsys, RESUME_FILE)


def test_a_run_that_recorded_no_config_is_refused_as_redefined_not_damaged(redefined, train_cli, capsys):
    """An earlier resume.pt (no config record) without a checkpoint: nothing to go on with; the line says why."""
    _without_checkpoint(redefined)
    _strip_resume(redefined, "model_config", "class_names")
    before = (redefined / RESUME_FILE).read_bytes()
    code, out, err = _train(train_cli, ["--out", str(redefined), "--resume", "--max-steps", "0"], capsys)
    line = err.strip()
    assert code == 2 and "\n" not in line and "Traceback" not in line, err
    assert "damaged" not in line and "vit_c_micro" in line and "definition changed since the run started" in line
    assert (redefined / RESUME_FILE).read_bytes() == before


def test_a_run_whose_stem_kind_changed_is_refused_as_redefined(tmp_path, train_cli, train_tiny, capsys):
    """Its own definition cannot go on under that name: the checkpoint contract ties a registered name to its stem
    kind, so the run's checkpoint could not be saved (after the training)."""
    run = tmp_path / "run"
    patchify = ViTConfig("vit_c_micro", PatchifyStem(4), 2, 32, 64, 2, patch_size=4, image_size=32, num_classes=10)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(registry._VARIANTS, "vit_c_micro", patchify)
        assert train_cli(train_main, [*train_tiny, "--max-steps", "2", "--out", str(run)])[0] == 0
    _without_checkpoint(run)
    code, _, err = _train(train_cli, ["--out", str(run), "--resume", "--max-steps", "0"], capsys)
    line = err.strip()
    assert code == 2 and "\n" not in line and "Traceback" not in line, err
    assert "damaged" not in line and "definition changed since the run started" in line and "patchify" in line, line


def test_a_run_of_todays_definition_resumes_without_a_note(train_stopped, tmp_path, train_cli, capsys):
    run = Path(shutil.copytree(train_stopped(2), tmp_path / "run"))
    code, out, err = _train(train_cli, ["--out", str(run), "--resume", "--max-steps", "0"], capsys)
    assert code == 0, err
    assert "definition" not in out and read_checkpoint_meta(run).config == registry.get_config("vit_c_micro")


# ------------------------------------------------------------ 3. a class directory now skipped as a tool folder


def _png(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def eadir_run(tmp_path_factory, train_cli) -> tuple[Path, list[str]]:
    """A folder run started while '@eaDir' was a class (before 8802a02): its classes '@eaDir', 'a', 'b'."""
    root = tmp_path_factory.mktemp("fold") / "data"
    seed = 0
    for split, counts in (("train", (2, 20, 20)), ("val", (2, 4, 4))):
        for cls, n in zip(("@eaDir", "a", "b"), counts, strict=True):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                seed += 1
                _png(root / split / cls / f"{i}.png", seed)
    run = root.parent / "run"
    argv = ["--device", "cpu", "--model", "vit_c_micro", "--dataset", str(root), "--epochs", "2", "--batch-size",
            "8", "--threads", "1", "--workers", "0", "--no-progress", "--max-steps", "2", "--out", str(run)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets, "SYSTEM_DIRS", frozenset())
        code, _, err = train_cli(train_main, argv)
    assert code == 0, err
    assert read_checkpoint_meta(run).class_names == ("@eaDir", "a", "b")
    return run, argv


@pytest.mark.parametrize("left", ["as saved", "resume.pt without fingerprints", "no checkpoint"])
def test_a_class_now_skipped_as_a_tool_folder_is_named_when_resuming(eadir_run, tmp_path, train_cli, capsys, left):
    saved, argv = eadir_run
    run = Path(shutil.copytree(saved, tmp_path / "run"))
    if left == "resume.pt without fingerprints":  # as the first release wrote it: the head's size was the tell
        _strip_resume(run, "data", "class_names", "model_config")
    if left == "no checkpoint":  # killed before its checkpoint: resume.pt's own record names the classes
        _without_checkpoint(run)
    code, _, err = _train(train_cli, [*argv[:-4], "--resume", "--max-steps", "0", "--out", str(run)], capsys)
    line = err.strip()
    assert code == 2 and "\n" not in line and "Traceback" not in line, err
    assert "'@eaDir'" in line and "tool folder" in line, line
    assert "new run" in line and "rename" in line, line  # what to do
    assert "restore them" not in line and "damaged" not in line and "steps per epoch" not in line, line


@pytest.mark.parametrize("reader", ["train.eval", "export"])
def test_a_model_class_now_skipped_as_a_tool_folder_is_refused_by_its_readers(eadir_run, tmp_path, train_cli, capsys,
                                                                               reader):
    """train.eval and export measured such a model on its other classes alone (8 of 12 val images), and export
    certified it: refused in the resume refusal's words instead."""
    from export.cli import main as export_main
    from train.eval import main as eval_main

    run, argv = eadir_run
    dataset = argv[argv.index("--dataset") + 1]
    out = tmp_path / "out"
    if reader == "train.eval":
        code, _, err = train_cli(eval_main, ["--checkpoint", str(run), "--dataset", dataset, "--out",
                                             str(out / "eval.json")], capsys)
    else:
        capsys.readouterr()
        code = export_main(["--checkpoint", str(run), "--dataset", dataset, "--out", str(out), "--targets", "torch",
                            "--threads", "1"])
        err = capsys.readouterr().err
    line = err.strip()
    assert code == 2 and "\n" not in line and "Traceback" not in line, err
    assert f"this model's class '@eaDir' of {dataset} is now skipped as a tool folder" in line, line
    assert "train a new model; to keep it as a class, rename the directory first" in line, line
    assert not out.exists()


# ------------------------------------------------- 4. missing keys of the preprocessing and the model config


@pytest.fixture(scope="module")
def saved(micro_checkpoint, tmp_path_factory) -> Path:
    return micro_checkpoint(tmp_path_factory.mktemp("keys"))


def _edited_checkpoint(saved: Path, tmp_path: Path, edit: Callable[[dict], None]) -> Path:
    ckpt = Path(shutil.copytree(saved, tmp_path / "ckpt"))
    doc = json.loads((ckpt / META_FILE).read_text())
    edit(doc)
    (ckpt / META_FILE).write_text(json.dumps(doc, indent=2))
    return ckpt


def _refused_checkpoint(ckpt: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        read_checkpoint_meta(ckpt)
    message = str(info.value)
    assert "\n" not in message and str(ckpt / META_FILE) in message, message
    return message


PREPROCESSING_KEYS = ("resize", "crop", "mean", "std", "interpolation", "mode", "channels", "layout")


@pytest.mark.parametrize("key", PREPROCESSING_KEYS)
def test_a_checkpoint_missing_a_preprocessing_key_is_refused_naming_it(saved, tmp_path, key):
    ckpt = _edited_checkpoint(saved, tmp_path, lambda d: d["preprocessing"].pop(key))
    message = _refused_checkpoint(ckpt)
    assert "preprocessing" in message and f"missing {key}" in message, message


@pytest.mark.parametrize("key", PREPROCESSING_KEYS)
def test_a_manifest_missing_a_preprocessing_key_is_refused_naming_it(tmp_path, key):
    doc = json.loads((LEGACY / "manifest.json").read_text())
    del doc["preprocessing"][key]
    with pytest.raises(BundleError) as info:
        read_manifest(legacy_with_manifest(tmp_path, doc))
    message = str(info.value)
    assert "\n" not in message and "manifest.json" in message, message
    assert "preprocessing" in message and f"missing {key}" in message, message


# Keys with a dataclass default: filled in without a word before. The others were refused as Python's "missing 1
# required positional argument" (test_every_config_key_is_named_when_missing pins them too).
DEFAULTED_CONFIG_KEYS = ("patch_size", "image_size", "num_classes", "in_chans", "ln_eps", "description")
CONFIG_KEYS = ("name", "stem", "depth", "dim", "mlp_dim", "heads", *DEFAULTED_CONFIG_KEYS)


@pytest.mark.parametrize("key", DEFAULTED_CONFIG_KEYS)
def test_a_checkpoint_missing_a_defaulted_config_key_is_refused_naming_it(saved, tmp_path, key):
    """Named as missing: not a derived value's mismatch ("product of stem strides must equal patch_size: expected
    16", "preprocessing.crop 32 differs from config.image_size 224") computed from the dataclass default."""
    message = _refused_checkpoint(_edited_checkpoint(saved, tmp_path, lambda d: d["config"].pop(key)))
    assert f"config is missing {key}" in message, message
    assert "stem strides" not in message and "differs from config" not in message, message


@pytest.mark.parametrize("key", CONFIG_KEYS)
def test_every_config_key_is_named_when_missing(saved, tmp_path, key):
    message = _refused_checkpoint(_edited_checkpoint(saved, tmp_path, lambda d: d["config"].pop(key)))
    assert "missing" in message and repr(key).strip("'") in message, message


@pytest.mark.parametrize(("where", "key"), [("stem", "kind"), ("stem", "layers"), ("layer", "kernel"),
                                            ("layer", "stride"), ("layer", "width")])
def test_a_checkpoint_missing_a_stem_key_is_refused_naming_it(saved, tmp_path, where, key):
    def edit(doc: dict) -> None:
        (doc["config"]["stem"] if where == "stem" else doc["config"]["stem"]["layers"][1]).pop(key)

    message = _refused_checkpoint(_edited_checkpoint(saved, tmp_path, edit))
    assert f"missing {key}" in message and "stem" in message, message


def test_a_manifest_missing_config_image_size_is_named_not_compared(tmp_path):
    doc = json.loads((LEGACY / "manifest.json").read_text())
    edited = copy.deepcopy(doc)
    del edited["config"]["image_size"]
    with pytest.raises(BundleError) as info:
        read_manifest(legacy_with_manifest(tmp_path, edited))
    assert "missing image_size" in str(info.value) and "differs" not in str(info.value), info.value
    assert read_manifest(legacy_with_manifest(tmp_path / "whole", doc)).config.image_size == 32


def test_an_ln_eps_too_large_for_a_float_is_refused_in_one_line():
    """A 400-digit JSON number (or a pickled 2**1500) is not finite: a ValueError, never an OverflowError."""
    d = EARLIER_MICRO.to_dict() | {"ln_eps": 10**400}
    with pytest.raises(ValueError, match="ln_eps must be a finite number"):
        ViTConfig.from_dict(d)


def test_an_edited_model_config_in_resume_pt_is_named_as_such(train_stopped, tmp_path, train_cli, capsys):
    """Not "the definition changed since the run started" (with advice to use an older release) for a hand edit."""
    run = Path(shutil.copytree(train_stopped(2), tmp_path / "run"))
    _without_checkpoint(run)
    state = torch.load(run / RESUME_FILE, weights_only=True)
    state["model_config"]["ln_eps"] = 2**1500
    save_resume(run, state)
    code, _, err = _train(train_cli, ["--out", str(run), "--resume", "--max-steps", "0"], capsys)
    line = err.strip()
    assert code == 2 and "\n" not in line and "Traceback" not in line, err
    assert "cannot be used" in line and "ln_eps" in line and "edited" in line and "definition changed" not in line
