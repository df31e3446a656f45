"""Hostile bundle manifests: strict JSON like checkpoint.json, the same model contract as the checkpoint (model and
stem name the config, the preprocessing fits it, sizes bounded), and every field that export, the reports and the
server act on typed and bounded. Each is one BundleError line naming the field; the report and the server exit 2."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_serve_fixtures import LEGACY, legacy_with_manifest

from export import report
from models.bundle import MAX_ARTIFACTS, BundleError, Manifest, read_manifest, write_manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw() -> dict:
    return json.loads((LEGACY / "manifest.json").read_text())


def _refused(tmp_path: Path, manifest: dict | str, *words: str) -> str:
    start = time.perf_counter()
    with pytest.raises(BundleError) as info:
        read_manifest(legacy_with_manifest(tmp_path, manifest))
    message = str(info.value)
    assert "\n" not in message and "manifest.json" in message and time.perf_counter() - start < 5, message
    for w in words:
        assert w in message, message
    return message


def _set(doc: dict, path: str, value: object) -> dict:
    """A copy of `doc` with the dotted/indexed field `path` ("artifacts[1].parity.accuracy") set to `value`."""
    doc = copy.deepcopy(doc)
    *parents, last = path.replace("[", ".").replace("]", "").split(".")
    target: object = doc
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    target[int(last) if isinstance(target, list) else last] = value
    return doc


# --- strict JSON ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("old", "new", "says"), [
    ('"max_abs_err": 3.337860107421875e-06', '"max_abs_err": NaN', "non-finite number NaN"),
    ('"max_rel_err": 4.225554803272656e-07', '"max_rel_err": Infinity', "non-finite number Infinity"),
    ('"onnx_hub_seconds": 6.562', '"onnx_hub_seconds": -Infinity', "non-finite number -Infinity"),
    ('"top1_agreement": 1.0', '"top1_agreement": NaN', "non-finite number NaN"),
    ('"ln_eps": 1e-06', '"ln_eps": 1e400', "out of range"),
    ('"max_batch": 8', f'"max_batch": {"9" * 5000}', "ValueError"),
])
def test_non_finite_or_overflowing_numbers_are_refused_not_read_as_null(raw, tmp_path, old, new, says):
    text = json.dumps(raw, indent=2)
    assert old in text
    _refused(tmp_path, text.replace(old, new, 1), "corrupt manifest", says, "re-export the bundle")


def test_deep_nesting_is_refused_below_and_above_the_parser_limit(raw, tmp_path):
    deep: object = 0
    for _ in range(80):  # the parser accepts this; the contract's bound does not
        deep = {"x": deep}
    _refused(tmp_path / "a", _set(raw, "artifacts[0].notes", deep), "corrupt manifest", "nested too deeply")
    _refused(tmp_path / "b", "[" * 100_000 + "]" * 100_000, "corrupt manifest", "nested too deeply")


def test_report_and_server_refuse_a_nan_manifest_with_one_line(raw, tmp_path, capsys):
    text = json.dumps(raw).replace('"max_abs_err": 3.337860107421875e-06', '"max_abs_err": NaN')
    bundle = legacy_with_manifest(tmp_path, text)
    assert report.main([str(bundle)]) == 2
    err = capsys.readouterr().err.strip()
    assert "non-finite number NaN" in err and "\n" not in err, err
    proc = subprocess.run([sys.executable, "-m", "serve", "--model", str(bundle), "--port", "0"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "non-finite number NaN" in lines[0], proc.stderr


# --- the model contract, as in checkpoint.json --------------------------------------------------------------------


@pytest.mark.parametrize(("edits", "says"), [
    ({"model": "vit_p_micro"}, "'model' 'vit_p_micro' differs from config.name 'vit_c_micro'"),
    ({"model": "vit_p_micro", "config.name": "vit_p_micro"},
     "'model' vit_p_micro is a patchify-stem variant, but config.stem is conv"),
    ({"stem": "patchify"}, "'stem' 'patchify' differs from config.stem.kind 'conv'"),
    ({"stem": 5}, "'stem' must be a string, got int"),
    ({"model": "x" * 10_000}, "differs from config.name"),
    ({"config.name": "vit_c_micro\r\nforged"}, "config name must be a string of 1..200 characters without control"),
])
def test_model_and_stem_must_name_the_config(raw, tmp_path, edits, says):
    doc = raw
    for field, value in edits.items():
        doc = _set(doc, field, value)
    _refused(tmp_path, doc, says)


@pytest.mark.parametrize(("field", "value", "says"), [
    ("preprocessing.resize", 1_000_000_000, "resize at most 8192; got crop 32, resize 1000000000"),
    ("preprocessing.resize", 32.0, "preprocessing needs 1 <= crop <= resize, integers"),
    ("preprocessing.resize", True, "preprocessing needs 1 <= crop <= resize, integers"),
    ("preprocessing.mean", ["nan", 0.5, 0.5], "mean must hold 3 finite numbers"),
    ("preprocessing.std", [0.4, 0.4, -1], "std must be > 0"),
    ("preprocessing.std", [0.4, 0.4, 1e300, 1], "std must hold 3 finite numbers"),
    ("preprocessing.channels", 1, "channels and layout must be 3 and 'NCHW'"),
    ("preprocessing.layout", "NHWC", "channels and layout must be 3 and 'NCHW'"),
    ("preprocessing.mode", ["L"], "mode must be 'RGB' or 'L'"),
])
def test_preprocessing_is_bounded_on_read(raw, tmp_path, field, value, says):
    _refused(tmp_path, _set(raw, field, value), "'preprocessing' is invalid", says)


def test_a_consistent_but_huge_model_is_refused_on_read(raw, tmp_path):
    doc = raw
    for field, value in (("config.image_size", 4096), ("input.height", 4096), ("input.width", 4096),
                         ("preprocessing.crop", 4096), ("preprocessing.resize", 4096)):
        doc = _set(doc, field, value)
    _refused(tmp_path, doc, "'config' is invalid", "largest tensor per image")


# --- every other field the code acts on ---------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "says"), [
    ("class_names[3]", "Cow\nDog", "'class_names[3]' must be 1..1024 characters without control characters"),
    ("class_names[3]", "\ud800", "'class_names[3]' must be 1..1024 characters"),  # JSON answers cannot encode it
    ("class_names[0]", "", "'class_names[0]' must be 1..1024 characters"),
    ("class_names[0]", "x" * 1025, "'class_names[0]' must be 1..1024 characters"),
    ("input.name", "in\nput", "'input.name' must be 1..256 characters without control characters"),
    ("output.name", "", "'output.name' must be 1..256 characters"),
    ("output.shape", [8, 10], "'output.shape' must be [-1, classes]"),
    ("input.min_batch", 9, "'input.min_batch' 9 is above max_batch 8"),
    ("source.sha256", "not a hash", "'source.sha256' must be 64 lowercase hex digits"),
    ("source.checkpoint", "/tmp/x\nERROR forged", "'source.checkpoint' must be one line"),
    ("source.dataset", 7, "'source.dataset' must be a string, got int"),
    ("created", "2026\n", "'created' must be one line of at most 256 characters"),
    ("timings", {f"t{i}": 1.0 for i in range(300)}, "'timings' has 300 keys, at most 256 allowed"),
    ("timings", {"a\nb": 1.0}, "'timings' has key 'a\\nb'"),
    ("artifacts[1].runtime", "x" * 65, "'artifacts[1].runtime' must be 1..64 characters"),
    ("artifacts[1].precision", "fp32\n", "'artifacts[1].precision' must be 1..64 characters"),
    ("artifacts[1].format", 5, "'artifacts[1].format' must be a string, got int"),
    ("artifacts[1].refused_reason", "failed\nINFO ready", "'artifacts[1].refused_reason' must be one line"),
    ("artifacts[1].runtime_version", "1.0" * 100, "'artifacts[1].runtime_version' must be one line of at most 256"),
    ("artifacts[1].export_seconds", -1, "'artifacts[1].export_seconds' must be non-negative"),
    ("artifacts[1].inference_precision", {"f32": True}, "'artifacts[1].inference_precision' must be a string"),
    ("artifacts[1].files", [{"path": f"f{i}", "sha256": "0" * 64, "bytes": 1} for i in range(65)],
     "'artifacts[1].files' lists 65 entries, at most 64 allowed"),
    ("artifacts[1].parity.accuracy", 2.0, "'artifacts[1].parity.accuracy' must be a fraction in 0..1"),
    ("artifacts[1].parity.top1_agreement", -0.5, "'artifacts[1].parity.top1_agreement' must be a fraction"),
    ("artifacts[1].parity.accuracy_delta", 3, "'artifacts[1].parity.accuracy_delta' must be -1..1"),
    ("artifacts[1].parity.max_abs_err", -1, "'artifacts[1].parity.max_abs_err' must be non-negative"),
    ("artifacts[1].parity.val_samples", -32, "'artifacts[1].parity.val_samples' must be non-negative"),
    ("artifacts[1].parity.batch_sizes", [1, 0], "'artifacts[1].parity.batch_sizes' must list at most 256 batch"),
    ("artifacts[1].parity.batch_sizes", [10**9], "'artifacts[1].parity.batch_sizes' must list at most 256 batch"),
    ("artifacts[1].parity.tolerance.atol", -1, "'artifacts[1].parity.tolerance.atol' must be non-negative"),
    ("artifacts[1].parity.failures", ["a\nb"], "'artifacts[1].parity.failures[0]' must be one line"),
    ("artifacts[1].parity.failures", ["x"] * 300, "'artifacts[1].parity.failures' lists 300 entries"),
    ("artifacts[1].parity.split", "", "'artifacts[1].parity.split' must be 1..64 characters"),
    ("provenance", {"vitc_version": "1", "parity_data_fingerprint": "f", "libraries": {"onnx": 1}},
     "'provenance.libraries.onnx' must be a string, got int"),
    ("provenance", {"vitc_version": "1\n2", "parity_data_fingerprint": "f"}, "'provenance.vitc_version' must be one"),
    ("served", {"runtime": "onnxruntime", "samples": 8, "reference_accuracy": 5, "encodings": {},
                "jpeg_draft_cost_points": 0, "jpeg_draft": True}, "'served.reference_accuracy' must be a fraction"),
    ("served", {"runtime": "onnxruntime", "samples": -8, "reference_accuracy": 1, "encodings": {},
                "jpeg_draft_cost_points": 0, "jpeg_draft": True}, "'served.samples' must be non-negative"),
])
def test_fields_the_code_acts_on_are_typed_and_bounded(raw, tmp_path, field, value, says):
    _refused(tmp_path, _set(raw, field, value), says)


@pytest.mark.parametrize(("field", "value", "says"), [
    ("format_version", 0, "format_version 0 is not supported; re-export the bundle"),
    ("format_version", 2, "format_version 2 is newer than this vitc reads (1); upgrade vitc or re-export"),
    # A newer vitc's config field: it was "ViTConfig.__init__() got an unexpected keyword argument 'x_future'"
    ("config.x_future", 1, "field 'config.x_future' is not one this vitc knows: the bundle may come from a newer "
                           "vitc"),
    ("config.stem.x_future", 1, "field 'config.stem.x_future' is not one this vitc knows"),
    # A newer vitc's preprocessing key was "corrupt", its precision a free tag that was served.
    ("preprocessing.antialias", True, "field 'preprocessing.antialias' is not one this vitc knows: the bundle may "
                                      "come from a newer vitc (upgrade vitc"),
    ("artifacts[1].precision", "fp8", "precision 'fp8' of artifact 'onnx-fp32' is not one this vitc knows: the "
                                      "bundle may come from a newer vitc (upgrade vitc"),
    # An unhashable stem kind: it was "TypeError: unhashable type: 'list'", a traceback in every command (hDG).
    ("config.stem.kind", ["conv"], "unknown stem kind ['conv']"),
    ("config.stem.kind", {"x": 1}, "unknown stem kind {'x': 1}"),
])
def test_format_version_and_unknown_config_fields_follow_the_checkpoint_rule(raw, tmp_path, field, value, says):
    _refused(tmp_path, _set(raw, field, value), says)


def test_a_long_artifact_list_is_refused_before_it_is_read(raw, tmp_path):
    # 4 MB of one refused artifact repeated: the old reader read them all, then spent n^2 looking for the twins.
    many = [{"id": "a", "runtime": "x", "format": "x", "precision": "x", "servable": False}] * 60_000
    _refused(tmp_path / "a", _set(raw, "artifacts", many), f"lists 60000 entries, at most {MAX_ARTIFACTS} allowed")
    twice = [copy.deepcopy(raw["artifacts"][0]) for _ in range(MAX_ARTIFACTS)]
    _refused(tmp_path / "b", _set(raw, "artifacts", twice), "lists an id twice: ['torch-fp32']")


# --- what still reads ---------------------------------------------------------------------------------------------


def test_the_legacy_bundle_reads_round_trips_and_is_not_mutated(raw, tmp_path):
    before = copy.deepcopy(raw)
    m = Manifest.from_dict(raw)
    assert raw == before and m.model == m.config.name == "vit_c_micro" and m.stem == "conv"
    out = tmp_path / "w"
    out.mkdir()
    write_manifest(out, m)
    assert read_manifest(out) == m and json.loads((out / "manifest.json").read_text()) == raw


def test_optional_numbers_may_still_be_null(raw):
    doc = _set(_set(raw, "artifacts[1].parity.max_rel_err", None), "artifacts[1].parity.tolerance.atol", None)
    parity = Manifest.from_dict(doc).artifacts[1].parity
    assert parity.max_rel_err is None and parity.tolerance["atol"] is None


def test_a_runtime_this_vitc_does_not_know_is_said_not_listed_as_servable(raw, tmp_path, capsys):
    """A newer vitc's runtime was reported `servable` and listed as such by a server that could not open it."""
    import runtimes

    doc = _set(raw, "artifacts[1].runtime", "coreml")
    bundle = legacy_with_manifest(tmp_path, doc)
    manifest = read_manifest(bundle)
    with pytest.raises(BundleError, match=r"no servable onnxruntime artifact; servable: torch/fp32; "
                                          r"runtime 'coreml' is not one this vitc knows$"):
        runtimes.select(manifest, runtimes.get("onnxruntime"))
    row = next(r for r in report.rows(manifest) if r[0] == doc["artifacts"][1]["id"])
    assert row[-1] == "runtime coreml is not one this vitc knows"
