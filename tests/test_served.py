"""Served-path parity: encoded validation images through a real server against the evaluation pipeline, recorded
in the manifest, and the per-model JPEG draft decision that follows from it."""

from __future__ import annotations

import shutil

import pytest
from test_serve_fixtures import micro_bundle

from export import report, served
from models.bundle import read_manifest


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    copy = tmp_path_factory.mktemp("served") / "micro"
    shutil.copytree(micro_bundle(tmp_path_factory), copy)
    return copy


def test_the_served_path_is_measured_and_recorded(bundle, capsys):
    record = served.measure(bundle, "onnxruntime", samples=40, log=lambda _: None)
    assert record == read_manifest(bundle).served
    expected = {"png-native"} | {f"jpeg{q}-{32 * s}" for q in served.QUALITIES for s in served.SCALES}
    assert set(record.encodings) == expected and record.samples == 40
    # PNG carries the pixels exactly: through the whole server it must agree with the evaluation pipeline.
    assert record.encodings["png-native"]["agreement"] == 1.0
    assert record.encodings["png-native"]["accuracy"] == record.reference_accuracy
    for name, e in record.encodings.items():
        assert 0.0 <= e["accuracy"] <= 1.0 and ("accuracy_no_draft" in e) == name.startswith("jpeg")
    worst = max(100 * (e["accuracy_no_draft"] - e["accuracy"]) for e in record.encodings.values()
                if "accuracy_no_draft" in e)
    assert record.jpeg_draft_cost_points == pytest.approx(max(worst, 0.0), abs=1e-3)
    # 40 images cannot show a 0.1-point cost (one image is 2.5 points): draft stays off whatever they show.
    assert record.jpeg_draft is False
    assert report.main([str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "Served path (onnxruntime, 40 val images" in out and "40 images cannot show that, 1000 can" in out


def test_a_model_decodes_jpegs_in_draft_only_when_measured_safe(bundle):
    from dataclasses import replace

    from serve.registry import ServedModel
    from serve.settings import Settings

    m = read_manifest(bundle)
    unmeasured = ServedModel("m", bundle, replace(m, served=None), backend=None, max_batch=1)
    assert not unmeasured.jpeg_draft("measured") and unmeasured.jpeg_draft("always")
    for ok in (True, False):
        model = ServedModel("m", bundle, replace(m, served=replace(m.served, jpeg_draft=ok)), backend=None,
                            max_batch=1)
        assert model.jpeg_draft("measured") is ok and not model.jpeg_draft("never")
    # The boolean of earlier releases still reads: false is never, true is measured.
    assert Settings(jpeg_draft=False).jpeg_draft == "never" and Settings(jpeg_draft="true").jpeg_draft == "measured"


@pytest.mark.parametrize("edit, says", [
    (lambda s: s.update(jpeg_draft=True), "is true, but draft decoding costs 4 points on 1000 images"),
    (lambda s: next(iter(s["encodings"].values())).update(agreement=1.51), "a fraction in 0..1"),
    (lambda s: s["encodings"].update(jpeg={"accuracy": 0.2}), "agreement"),  # export.report's table needs it
])
def test_the_served_record_is_refused_when_it_contradicts_itself(bundle, tmp_path, edit, says):
    """A `jpeg_draft: true` written over a record that says draft costs points turned draft decoding on (and an
    agreement of 151 % read as measured): the verdict must follow from the record's own numbers."""
    import json
    import shutil

    from models.bundle import BundleError

    copy = shutil.copytree(bundle, tmp_path / "b")
    doc = json.loads((copy / "manifest.json").read_text())
    doc["served"] = {"runtime": "onnxruntime", "samples": 1000, "reference_accuracy": 0.2, "jpeg_draft": False,
                     "encodings": {"png": {"accuracy": 0.2, "agreement": 1.0}}, "jpeg_draft_cost_points": 4.0}
    path = copy / "manifest.json"
    path.write_text(json.dumps(doc))
    assert read_manifest(copy).served is not None  # as measured: reads
    edit(doc["served"])
    (copy / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match=says):
        read_manifest(copy)
