"""The bundle contract (models/bundle.py): typed, validated, one readable line per problem, old bundles still read.

tests/data/legacy-bundle-v1 was exported by vitc before the runtime layer existed (commit 5a4e206: vit_c_micro,
random head, onnx + torch artifacts): it must keep reading and serving unchanged.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_serve_fixtures import LEGACY, legacy_with_manifest

import runtimes
from export import report
from models.bundle import MAX_MANIFEST_BYTES, BundleError, Manifest, read_manifest
from runtimes import BackendOptions

REPORT_ERROR = "python -m export.report: error: "

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw() -> dict:
    return json.loads((LEGACY / "manifest.json").read_text())


def _refused(tmp_path: Path, manifest: dict | str, *words: str) -> str:
    with pytest.raises(BundleError) as info:
        read_manifest(legacy_with_manifest(tmp_path, manifest))
    message = str(info.value)
    assert "\n" not in message and "manifest.json" in message, message
    for w in words:
        assert w in message, message
    return message


def test_a_bundle_exported_before_the_runtime_layer_reads_and_round_trips(raw):
    m = read_manifest(LEGACY)
    assert (m.name, m.model, m.stem, m.format_version) == ("legacy", "vit_c_micro", "conv", 1)
    assert [a.id for a in m.servable()] == ["torch-fp32", "onnx-fp32"]
    assert m.input.sample_shape == (3, 32, 32) and m.output.classes == len(m.class_names) == 10
    # Writing it back gives the same JSON document, field for field.
    assert json.loads(json.dumps(m.to_dict())) == raw


def test_a_bundle_exported_before_the_runtime_layer_still_serves():
    m = read_manifest(LEGACY)
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    outs = {}
    for runtime in ("onnxruntime", "torch", "tensorrt"):
        rt = runtimes.get(runtime)
        if not rt.installed():
            continue
        device = "cuda" if "cpu" not in rt.devices else "cpu"
        if rt.unavailable(device):
            continue
        backend = runtimes.open_backend(LEGACY, m, runtime, options=BackendOptions(device=device, threads=1))
        outs[runtime] = backend.infer(x)
        backend.close()
    assert {"onnxruntime", "torch"} <= set(outs)
    for y in outs.values():
        np.testing.assert_allclose(y, outs["torch"], atol=1e-4)
    assert outs["torch"].std(axis=0).max() > 1e-3  # the logits depend on the input: the comparison means something


REQUIRED = ["format_version", "name", "model", "config", "class_names", "input", "output", "preprocessing",
            "source", "artifacts", "input.name", "input.height", "input.max_batch", "output.shape", "source.sha256",
            "artifacts[1].id", "artifacts[1].runtime", "artifacts[1].precision", "artifacts[1].servable",
            "artifacts[1].files[0].sha256", "artifacts[1].parity.top1_agreement", "config.stem"]


def _pop(doc: dict, path: str) -> None:
    *parents, last = path.replace("[", ".").replace("]", "").split(".")
    for key in parents:
        doc = doc[int(key)] if isinstance(doc, list) else doc[key]
    del doc[last]


def _set(doc: dict, path: str, value) -> None:  # noqa: ANN001
    *parents, last = path.replace("[", ".").replace("]", "").split(".")
    for key in parents:
        doc = doc[int(key)] if isinstance(doc, list) else doc[key]
    doc[int(last) if isinstance(doc, list) else last] = value


@pytest.mark.parametrize("field", REQUIRED)
def test_a_missing_field_is_named_in_one_line(raw, tmp_path, field):
    doc = copy.deepcopy(raw)
    _pop(doc, field)
    expect = field if not field.startswith("config.") else "config"
    _refused(tmp_path, doc, f"'{expect}'")


@pytest.mark.parametrize(("field", "value", "says"), [
    ("name", 7, "must be a string, got int"),
    ("name", "", "'name' must be one path component"),
    ("name", "..", "'name' must be one path component"),
    ("name", "../escaped", "'name' must be one path component"),
    ("name", "a/b", "'name' must be one path component"),
    ("name", "micro\n", "'name' must be one path component"),
    ("name", "x" * 257, "'name' must be one path component"),
    ("input.max_batch", "32", "must be an integer, got str"),
    ("input.max_batch", True, "must be an integer, got bool"),
    ("input.max_batch", 10**9, "must be 1..1024"),
    ("input.height", 0, "must be 1..4096"),
    ("input.height", 64, "differs from config.image_size"),
    ("input.channels", 1, "is 1, config.in_chans 3"),
    ("input.layout", "NHWC", 'must be "NCHW"'),
    ("output.shape", [-1, 11], "has 11 classes, class_names lists 10"),
    ("output.shape", [-1], "must be [-1, classes]"),
    ("class_names", "abc", "must be a list"),
    ("class_names", ["a"] * 9 + [3], "'class_names[9]' must be a string"),
    ("config.num_classes", 1000, "'config.num_classes' is 1000"),
    ("config.depth", -1, "'config' is invalid"),
    ("preprocessing.crop", 16, "'preprocessing.crop' 16 does not match the input size 32x32"),
    ("preprocessing.crop", 64, "'preprocessing' is invalid: preprocessing needs 1 <= crop <= resize"),
    ("preprocessing.mode", "CMYK", "'preprocessing' is invalid"),
    ("artifacts", {}, "'artifacts' must be a list"),
    ("artifacts[1].servable", "yes", "'artifacts[1].servable' must be true or false"),
    ("artifacts[1].files", [], "'artifacts[1].files' is empty, but the artifact is marked servable"),
    ("artifacts[1].files[0].sha256", "abc", "must be 64 lowercase hex digits"),
    ("artifacts[1].files[0].bytes", -1, "must be non-negative"),
    ("artifacts[1].files[0].path", "/etc/passwd", "must be a plain relative path inside the bundle"),
    ("artifacts[1].files[0].path", "../../victim.txt", "'artifacts[1].files[0].path' must be a plain relative path"),
    ("artifacts[1].files[0].path", "sub/../../x", "must be a plain relative path"),
    ("artifacts[1].files[0].path", "..\\x.onnx", "must be a plain relative path"),
    ("artifacts[1].files[0].path", "", "must be a plain relative path"),
    ("artifacts[1].files[0].path", "model\x00.onnx", "must be a plain relative path"),
    ("artifacts[1].files[0].path", "./model.onnx", "must be a plain relative path"),
    ("artifacts[1].files[0].path", "a//model.onnx", "must be a plain relative path"),
    ("artifacts[1].id", "x/../../../idescaped", "'artifacts[1].id' must be 1..128 of A-Z a-z 0-9 _ . -"),
    ("artifacts[1].id", ".hidden", "'artifacts[1].id' must be 1..128"),
    ("artifacts[1].refused_files", [{"path": "../x", "sha256": "0" * 64, "bytes": 1}],
     "'artifacts[1].refused_files[0].path' must be a plain relative path"),
    ("golden", {"file": {"path": "../../victim.txt", "sha256": "0" * 64, "bytes": 1}, "samples": 8},
     "'golden.file.path' must be a plain relative path"),
    ("artifacts[1].id", "torch-fp32", "lists an id twice"),
    ("artifacts[1].parity.accuracy", "high", "'artifacts[1].parity.accuracy' must be a number"),
    ("format_version", 2, "newer than this vitc reads"),
    ("format_version", 0, "re-export"),
    ("format", "something-else", "not a vitc-bundle manifest"),
])
def test_an_ill_typed_field_is_named_in_one_line(raw, tmp_path, field, value, says):
    doc = copy.deepcopy(raw)
    _set(doc, field, value)
    _refused(tmp_path, doc, says)


def test_corrupt_oversized_and_hostile_manifests_are_refused(raw, tmp_path):
    _refused(tmp_path, "{not json", "corrupt manifest", "re-export")
    _refused(tmp_path, "[" * 100_000 + "]" * 100_000, "corrupt manifest")
    _refused(tmp_path, json.dumps(raw)[:-40], "corrupt manifest")
    _refused(tmp_path, "[1, 2]", "must be an object")
    _refused(tmp_path, " " * (MAX_MANIFEST_BYTES + 1), "larger than")
    # NaN/Infinity (non-standard JSON) are refused like in checkpoint.json, never read as null.
    text = json.dumps(raw).replace('"max_rel_err": ' + json.dumps(raw["artifacts"][1]["parity"]["max_rel_err"]),
                                   '"max_rel_err": Infinity')
    assert "Infinity" in text
    _refused(tmp_path, text, "non-finite number Infinity", "re-export")


def test_the_manifest_is_typed_and_written_as_strict_json(raw, tmp_path):
    m = Manifest.from_dict(raw)
    assert m.select("onnxruntime").files[0].path == "model.onnx"
    with pytest.raises(BundleError, match="no servable openvino artifact; servable: onnxruntime/fp32, torch/fp32"):
        m.select("openvino")
    from models.bundle import write_manifest

    out = tmp_path / "w"
    out.mkdir()
    write_manifest(out, m)
    text = (out / "manifest.json").read_text()
    assert "NaN" not in text and "Infinity" not in text and read_manifest(out) == m


def test_report_and_server_refuse_a_bad_manifest_with_one_line(raw, tmp_path, capsys):
    doc = copy.deepcopy(raw)
    doc["input"]["max_batch"] = "many"
    bundle = legacy_with_manifest(tmp_path, doc)
    assert report.main([str(bundle)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(REPORT_ERROR) and "'input.max_batch' must be an integer" in err and "\n" not in err
    proc = subprocess.run([sys.executable, "-m", "serve", "--model", str(bundle)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "'input.max_batch' must be an integer" in lines[0], proc.stderr
