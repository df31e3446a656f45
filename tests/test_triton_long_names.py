"""Triton model names stay unique and recognisable past 128 characters: the bundle name is cut and a hash of the
whole name added, the artifact id kept whole (a bare cut made openvino-fp32 and openvino-fp16 one model and failed
with "cannot write REPO: File exists", or named a lone ONNX model '...-onnx-fp'); two artifacts that would still
share a name are refused as such, never blamed on the repository."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_serve_fixtures import micro_bundle

from export import triton
from models.bundle import as_name, valid_name

IDS = ("onnx-fp32", "openvino-fp16", "openvino-fp32")
MAX_NAME_CHARS = 128  # Triton's and serve's model names (models.bundle.NAME_RE)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return micro_bundle(tmp_path_factory)


def _renamed(bundle: Path, where: Path, name: str, edit=None) -> Path:  # noqa: ANN001
    copy = shutil.copytree(bundle, where)
    doc = json.loads((copy / "manifest.json").read_text())
    doc["name"] = name
    if edit is not None:
        edit(doc)
    (copy / "manifest.json").write_text(json.dumps(doc))
    return copy


def _models(repo: Path) -> list[str]:
    return sorted(d.name for d in repo.iterdir() if d.is_dir())


def test_a_long_bundle_name_keeps_every_artifact_suffix(bundle, tmp_path, capsys):
    long = _renamed(bundle, tmp_path / "long", "x" * 120)
    assert triton.main([str(long), "--out", str(tmp_path / "repo")]) == 0
    out = capsys.readouterr().out
    models = _models(tmp_path / "repo")
    assert len(models) == 3 and len(set(models)) == 3, models
    for aid in IDS:
        [name] = [m for m in models if m.endswith(f"-{aid}")]
        assert name.startswith("xxxx") and valid_name(name) and len(name) == MAX_NAME_CHARS, name
    assert "note: bundle xxxx" in out and "<hash of the whole name>" in out and models[0] in out
    # Each version directory is the model's own bundle: the name in config.pbtxt is the directory's.
    for name in models:
        assert f'name: "{name}"' in (tmp_path / "repo" / name / "config.pbtxt").read_text()


def test_a_bundle_name_that_fits_is_unchanged_and_gets_no_note(bundle, tmp_path, capsys):
    fits = _renamed(bundle, tmp_path / "fits", "y" * (MAX_NAME_CHARS - len("-openvino-fp16")))
    assert triton.main([str(fits), "--out", str(tmp_path / "repo")]) == 0
    assert "note:" not in capsys.readouterr().out
    assert _models(tmp_path / "repo") == [f"{'y' * 114}-{aid}" for aid in IDS]


def test_an_older_bundle_name_long_only_in_odd_characters_is_made_valid_without_a_note(bundle, tmp_path, capsys):
    older = _renamed(bundle, tmp_path / "older", "my" + " " * 150 + "bundle")  # older exports kept such names
    assert triton.main([str(older), "--out", str(tmp_path / "repo")]) == 0
    assert "note:" not in capsys.readouterr().out
    assert _models(tmp_path / "repo") == [f"my-bundle-{aid}" for aid in IDS]


def test_a_lone_artifact_is_not_named_like_its_bundle(bundle, tmp_path):
    long = _renamed(bundle, tmp_path / "long", "z" * 128)
    assert triton.main([str(long), "--out", str(tmp_path / "repo"), "--skip", "openvino-fp16,openvino-fp32"]) == 0
    [name] = _models(tmp_path / "repo")
    assert name.endswith("-onnx-fp32") and name != "z" * 128 and len(name) == MAX_NAME_CHARS


def test_two_long_bundles_sharing_a_prefix_stay_two_models(bundle, tmp_path):
    repo = tmp_path / "repo"
    for i, suffix in enumerate(("-a", "-b")):
        b = _renamed(bundle, tmp_path / f"b{i}", "w" * 125 + suffix)
        assert triton.main([str(b), "--out", str(repo), "--skip", "openvino-fp16,openvino-fp32"]) == 0
    models = _models(repo)
    assert len(models) == 2 and all(m.endswith("-onnx-fp32") for m in models), models
    assert all(_models(repo / m) == ["1"] for m in models)  # not version 2 of the other bundle's model


def test_artifacts_that_would_share_a_model_name_are_refused_as_such(bundle, tmp_path, capsys):
    def clash(doc: dict) -> None:  # "openvino-fp32-" is a valid id; made a model name it loses its trailing '-'
        for a in doc["artifacts"]:
            if a["id"] == "openvino-fp16":
                a["id"] = "openvino-fp32-"

    b = _renamed(bundle, tmp_path / "clash", "micro", clash)
    assert triton.main([str(b), "--out", str(tmp_path / "repo")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "'openvino-fp32-'" in err and "would both be the Triton model 'micro-openvino-fp32'" in err, err
    assert "cannot write" not in err and "File exists" not in err
    assert not (tmp_path / "repo").exists()


def test_as_name_keeps_the_suffix_and_hashes_the_whole():
    assert as_name("my bundle-", "onnx-fp32") == "my-bundle-onnx-fp32"  # short: only made valid, as before
    a, b = as_name("v" * 130 + "-", "onnx-fp32"), as_name("v" * 129 + "u-", "onnx-fp32")
    assert a != b and len(a) == len(b) == MAX_NAME_CHARS and a.endswith("-onnx-fp32") and valid_name(a)
    assert as_name("v" * 130 + "-", "onnx-fp32") == a  # stable
    assert len(as_name("q" * 300)) == MAX_NAME_CHARS and as_name("q" * 300) != as_name("q" * 299)
    odd = as_name("-" * 200, "s" * 128)  # nothing of the text left, an over-long suffix: still a valid name
    assert valid_name(odd) and len(odd) == MAX_NAME_CHARS
