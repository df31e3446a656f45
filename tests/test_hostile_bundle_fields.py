"""What a bundle or a checkpoint claims is held to what it holds before it costs anything, and what a CLI prints of
it cannot rewrite the terminal (security report hCK): `--backend torch` built the model a manifest's config
described (4.4 GB from a 107 KB bundle) before it read the weights; `provenance.training_command` took control
characters, escape sequences and lone surrogates, which export.report printed raw or crashed on."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

import runtimes
from export import report
from models.bundle import BundleError, Provenance, read_manifest
from models.checkpoint import CheckpointError, read_checkpoint_meta, save_checkpoint
from runtimes import BackendError, BackendOptions

LEGACY = Path(__file__).resolve().parent / "data" / "legacy-bundle-v1"  # vit_c_micro with a torch-fp32 artifact
HOSTILE_COMMANDS = ["python -m train \x1b[2J\x1b[32mALL ARTIFACTS VERIFIED OK\x1b[0m", "python -m train\n\rfake line",
                    "python -m train \ud800", "python -m train \x07", "x" * (2**16 + 1), ""]
RULE = "must be 1..65536 characters without control characters"


def _enlarged(config, depth: int):  # noqa: ANN001, ANN202 - a models.config.ViTConfig
    """`config` widened to dim 2048 (and deepened): at depth 20, about 10^9 parameters (4 GB of float32 once
    built), the report's bundle."""
    layers = (*config.stem.layers[:-1], replace(config.stem.layers[-1], width=2048))
    return replace(config, depth=depth, dim=2048, mlp_dim=8192, heads=16, stem=replace(config.stem, layers=layers))


@pytest.mark.parametrize(("depth", "says"), [(20, "do not fit vit_c_micro: missing ['blocks."),
                                             (2, "cls_token has shape [1, 1, 32], expected [1, 1, 2048]")])
def test_torch_refuses_weights_that_do_not_fit_the_config_before_it_builds_the_model(monkeypatch, depth, says):
    import torch

    from models.vit import VisionTransformer

    manifest = read_manifest(LEGACY)
    hostile = replace(manifest, config=_enlarged(manifest.config, depth))
    real_init = VisionTransformer.__init__

    def built_on_meta_only(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        # The order is the point: the header is compared with the config's tensors on the meta device (no memory);
        # a model built for real before that would allocate what the manifest claims.
        if torch.empty(0).device.type != "meta":
            raise AssertionError("the model was built before its weights' header was checked")
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(VisionTransformer, "__init__", built_on_meta_only)
    with pytest.raises(BackendError) as info:
        runtimes.open_backend(LEGACY, hostile, "torch", "fp32", BackendOptions(threads=1))
    message = str(info.value)
    assert "model.safetensors: weights do not fit the manifest's config (the file's weights" in message
    assert says in message
    assert "\n" not in message


def test_torch_still_opens_weights_that_fit():
    manifest = read_manifest(LEGACY)
    backend = runtimes.open_backend(LEGACY, manifest, "torch", "fp32", BackendOptions(threads=1))
    try:
        assert backend.max_batch >= 1
    finally:
        backend.close()


# ------------------------------------------------------------------------------------------ training command


def _with_provenance(tmp_path: Path, command: str) -> Path:
    bundle = tmp_path / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    shutil.copytree(LEGACY, bundle)
    doc = json.loads((bundle / "manifest.json").read_text())
    doc["provenance"] = {"vitc_version": "0.1.0", "parity_data_fingerprint": "ab" * 32, "training_command": command}
    # json.dumps escapes a lone surrogate as \ud800, as a hostile file would hold it
    (bundle / "manifest.json").write_text(json.dumps(doc))
    return bundle


@pytest.mark.parametrize("command", HOSTILE_COMMANDS)
def test_a_manifest_s_training_command_is_held_to_the_label_rule(tmp_path, command):
    with pytest.raises(BundleError, match=rf"'provenance.training_command' {RULE}"):
        read_manifest(_with_provenance(tmp_path, command))


def test_a_plain_training_command_still_reads():
    command = "python -m train --model vit_c_micro --data '/data/Bären und Füchse' --out runs/a"
    doc = json.loads((LEGACY / "manifest.json").read_text())
    doc["provenance"] = {"vitc_version": "0.1.0", "parity_data_fingerprint": "ab" * 32, "training_command": command}
    from models.bundle import Manifest

    assert Manifest.from_dict(doc, "manifest.json").provenance.training_command == command


@pytest.mark.parametrize("command", HOSTILE_COMMANDS[:3])
def test_export_report_refuses_a_hostile_training_command_in_one_line(tmp_path, capsys, command):
    assert report.main([str(_with_provenance(tmp_path, command))]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("python -m export.report: error: ") and err.count("\n") == 1
    assert RULE in err and "\x1b" not in err and "\r" not in err and "Traceback" not in err


def test_export_report_escapes_the_free_text_it_prints():
    """What a manifest's one-line fields may hold (a refusal reason, a runtime version: written from a runtime's
    own messages) is printed escaped: an escape sequence cannot clear the screen or forge a verdict."""
    manifest = read_manifest(LEGACY)
    onnx = manifest.select("onnxruntime", "fp32")
    refused = replace(onnx, servable=False, refused_reason="\x1b[2J\x1b[32mservable\x1b[0m", files=(),
                      refused_files=onnx.files, runtime_version="1.0\x1b[8m\t")
    provenance = Provenance(vitc_version="0.1\x1b[1A", git_commit="abc\x9b2J", git_dirty=False,
                            training_command="python -m train \x1b[2J", training_config_sha256=None,
                            training_data_fingerprint="\x1b]0;x\x07", parity_data_fingerprint="ab" * 32,
                            calibration_data_fingerprint=None)
    hostile = replace(manifest, artifacts=(refused,), provenance=provenance)
    for markdown in (False, True):
        text = report.table(hostile, markdown)
        assert not any(c in text for c in "\x1b\x07\x9b\t\r"), text
        assert "\\x1b[2J\\x1b[32mservable" in text and "python -m train \\x1b[2J" in text


# --------------------------------------------------------------------------------- the checkpoint's command line


def _save(where: Path, command: str) -> Path:
    from data.datasets import ANIMAL_CLASSES, default_preprocessing
    from models import build_model

    return save_checkpoint(where, build_model("vit_c_micro"), class_names=ANIMAL_CLASSES,
                           preprocessing=default_preprocessing("animals", 32),
                           extra={"dataset": "animals", "training": {"command_line": command}})


@pytest.mark.parametrize("command", HOSTILE_COMMANDS[:4])
def test_a_checkpoint_cannot_carry_a_hostile_command_line(tmp_path, command):
    """export copies training.command_line into the bundle's provenance: the checkpoint is held to the same rule,
    when it is saved (a training run checks it before its first step) and when it is read."""
    with pytest.raises(CheckpointError, match=rf"'training.command_line' {RULE}"):
        _save(tmp_path / "refused", command)
    ckpt = _save(tmp_path / "ckpt", "python -m train --model vit_c_micro")
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    meta["training"]["command_line"] = command
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"'training.command_line' {RULE}"):
        read_checkpoint_meta(ckpt)
