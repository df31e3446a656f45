"""What a bundle or a checkpoint claims is held to what it holds before it costs anything, and what a CLI prints of
it cannot rewrite the terminal (security report hCK): `--backend torch` built the model a manifest's config
described (4.4 GB from a 107 KB bundle) before it read the weights; `provenance.training_command` holds free text
(control characters, escape sequences and lone surrogates among it), which export.report printed raw or crashed on:
it is now printed escaped. Refusing such text instead refused what earlier versions wrote (hCO 1): shlex.join keeps
an argument's tab, and a path's undecodable bytes come back as lone surrogates."""

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
                    "python -m train \ud800", "python -m train \x07", "python -m train --out 'runs/a\tb'"]
TOO_LONG = "x" * (2**16 + 1)
RULE = "must be at most 65536 characters"


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
def test_a_manifest_s_training_command_reads_as_written(tmp_path, command):
    assert read_manifest(_with_provenance(tmp_path, command)).provenance.training_command == command


def test_a_manifest_s_training_command_is_bounded(tmp_path):
    with pytest.raises(BundleError, match=rf"'provenance.training_command' {RULE}"):
        read_manifest(_with_provenance(tmp_path, TOO_LONG))


def test_a_plain_training_command_still_reads():
    command = "python -m train --model vit_c_micro --data '/data/Bären und Füchse' --out runs/a"
    doc = json.loads((LEGACY / "manifest.json").read_text())
    doc["provenance"] = {"vitc_version": "0.1.0", "parity_data_fingerprint": "ab" * 32, "training_command": command}
    from models.bundle import Manifest

    assert Manifest.from_dict(doc, "manifest.json").provenance.training_command == command


@pytest.mark.parametrize("command", HOSTILE_COMMANDS)
def test_export_report_prints_a_hostile_training_command_escaped(tmp_path, command):
    """It rewrote the terminal (ESC, CR) or crashed with a traceback on a lone surrogate."""
    manifest = read_manifest(_with_provenance(tmp_path, command))
    for markdown in (False, True):
        text = report.table(manifest, markdown)
        line = next(ln for ln in text.splitlines() if ln.startswith("provenance: "))
        assert line.endswith("training command: " + "".join(c if c.isprintable() else repr(c)[1:-1] for c in command))
        assert not any(c in text for c in "\x1b\x07\r\t\ud800"), text
        text.encode("utf-8")  # printable: no lone surrogate left


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


@pytest.mark.parametrize("command", HOSTILE_COMMANDS)
def test_a_checkpoint_keeps_the_command_line_training_wrote(tmp_path, command):
    """export copies training.command_line into the bundle's provenance: any text a command line can be is saved
    and read back (earlier versions wrote such checkpoints, and they stay readable), only its length is bounded."""
    ckpt = _save(tmp_path / "ckpt", command)
    assert read_checkpoint_meta(ckpt).training.command_line == command
    with pytest.raises(CheckpointError, match=rf"'training.command_line' {RULE}"):
        _save(tmp_path / "refused", TOO_LONG)
