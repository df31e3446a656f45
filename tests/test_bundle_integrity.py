"""A bundle whose manifest.json was edited after export (relabelled classes, another resize, filter or colour
mode) is refused at load: golden.npz records the manifest's model contract, and its own sha256 is in the
manifest. Edits outside the contract (the batch range, the served-path record) still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_serve_fixtures import micro_bundle

import runtimes
from models.bundle import BundleError, read_manifest

pytestmark = pytest.mark.skipif(not runtimes.get("onnxruntime").installed(), reason="onnxruntime is not installed")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return micro_bundle(tmp_path_factory)


def _edited(bundle: Path, tmp_path: Path, edit) -> Path:  # noqa: ANN001 - a function of the manifest dict
    out = tmp_path / "b"
    shutil.copytree(bundle, out)
    raw = json.loads((out / "manifest.json").read_text())
    edit(raw)
    (out / "manifest.json").write_text(json.dumps(raw))
    return out


def _load(path: Path) -> None:
    runtimes.open_backend(path, read_manifest(path), "onnxruntime").close()


@pytest.mark.parametrize("edit", [
    lambda m: m["class_names"].reverse(),
    lambda m: m["preprocessing"].update(resize=48),
    lambda m: m["preprocessing"].update(interpolation="nearest"),
    lambda m: m["config"].update(depth=m["config"]["depth"] - 1),
], ids=["relabelled", "resize", "interpolation", "depth"])
def test_an_edited_model_contract_is_refused_at_load(bundle, tmp_path, edit):
    edited = _edited(bundle, tmp_path, edit)
    with pytest.raises(BundleError, match="manifest.json was edited after export") as info:
        _load(edited)
    assert "\n" not in str(info.value)


def test_edits_outside_the_contract_still_load(bundle, tmp_path):
    _load(bundle)

    def outside(m: dict) -> None:
        m["input"]["max_batch"] = 16
        m["created"] = "2020-01-01T00:00:00Z"
        m["name"] = "renamed"
    _load(_edited(bundle, tmp_path, outside))


def test_the_report_checks_the_files_it_reports_on(bundle, tmp_path, capsys):
    from export.report import main

    assert main([str(bundle)]) == 0
    capsys.readouterr()
    broken = _edited(bundle, tmp_path, lambda m: m["class_names"].reverse())
    with open(broken / "model.onnx", "ab") as f:  # one artifact corrupt, the others sound
        f.write(b"x")
    assert main([str(broken)]) == 2
    out, err = capsys.readouterr()
    assert "CORRUPT: manifest.json was edited after export" in out
    onnx = next(line for line in out.splitlines() if line.startswith("onnx-fp32"))
    assert "CORRUPT: artifact file" in onnx and "(tampered or corrupt)" in onnx
    openvino = [line for line in out.splitlines() if line.startswith("openvino-")]
    assert openvino and all("CORRUPT" not in line for line in openvino)
    assert all(line.rstrip().endswith("not servable: the golden inputs (above)") for line in openvino)  # none loads
    assert err.strip() == f"python -m export.report: error: corrupt, will not load: {broken}: golden, onnx-fp32"


def test_the_report_reads_the_golden_file_as_a_server_does(bundle, tmp_path, capsys):
    """golden.samples is outside the contract and every sha256 still matches: the report passed a bundle that every
    server refuses; and a wrong size is called a wrong size."""
    from export.report import main

    fewer = _edited(bundle, tmp_path, lambda m: m["golden"].update(samples=4))
    assert main([str(fewer)]) == 2
    assert "expected uint8[4, 32, 32, 3]" in capsys.readouterr().out
    with pytest.raises(BundleError, match="expected uint8"):
        _load(fewer)
    shutil.rmtree(fewer)
    resized = _edited(bundle, tmp_path, lambda m: m["artifacts"][1]["files"][0].update(bytes=1))
    assert main([str(resized)]) == 2
    assert "bytes, the manifest says 1 (tampered or corrupt)" in capsys.readouterr().out


def test_a_golden_file_of_countless_entries_is_refused_before_its_directory_is_read(bundle, tmp_path):
    """1.5 million empty zip entries (133 MB, under the size bound) took 30 s and 0.9 GB to check."""
    import time
    import zipfile

    from models.bundle import file_entries

    many = _edited(bundle, tmp_path, lambda m: None)
    golden = many / "golden.npz"
    with zipfile.ZipFile(golden, "a") as z:
        for i in range(2_000):  # more than MAX_GOLDEN_MEMBERS
            z.writestr(f"e{i}", b"")
    raw = json.loads((many / "manifest.json").read_text())
    entry = file_entries(many, [golden])[0]
    raw["golden"]["file"].update(sha256=entry.sha256, bytes=entry.bytes)
    (many / "manifest.json").write_text(json.dumps(raw))
    start = time.perf_counter()
    with pytest.raises(BundleError, match="zip directory holds 2,0.. entries"):
        _load(many)
    assert time.perf_counter() - start < 5
    # An end record that lies about the count: zipfile reads the directory's size, not its count.
    data = bytearray(golden.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    data[end + 8:end + 12] = (3).to_bytes(2, "little") * 2
    golden.write_bytes(bytes(data))
    entry = file_entries(many, [golden])[0]
    raw["golden"]["file"].update(sha256=entry.sha256, bytes=entry.bytes)
    (many / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="zip directory holds 3 entries in"):
        _load(many)


def test_a_machine_that_preprocesses_differently_is_told_at_load(bundle, monkeypatch, caplog):
    """golden.npz keeps its inputs' sources as decoded: a server re-runs its own preprocessing on them (another
    Pillow may resize differently), which the golden pixels, preprocessed already, cannot reveal."""
    import logging
    import zipfile

    import numpy as np

    from models import preprocessing
    from runtimes.loader import preprocessing_drift
    from serve.registry import load_model
    from serve.settings import Settings

    assert "source.0.npy" in zipfile.ZipFile(bundle / "golden.npz").namelist()
    assert preprocessing_drift(bundle, read_manifest(bundle)) is None
    real = preprocessing.to_uint8
    monkeypatch.setattr(preprocessing, "to_uint8", lambda img, spec: np.minimum(real(img, spec), 254) + 1)
    drift = preprocessing_drift(bundle, read_manifest(bundle))
    assert drift is not None and drift["max_levels"] == 1 and drift["pixels"] > 0
    with caplog.at_level(logging.WARNING, logger="vitc.serve"):
        load_model(str(bundle), Settings(models=[str(bundle)], access_log=False)).backend.close()
    warned = [r for r in caplog.records if r.msg == "preprocessing differs from the export's"]
    assert warned and warned[0].max_levels == 1 and warned[0].export_pillow


def _artifact(m: dict, artifact_id: str) -> dict:
    return next(a for a in m["artifacts"] if a["id"] == artifact_id)


def _swap_files(m: dict, a: str, b: str) -> None:
    """Serve one artifact's files under the other's id (every file still matches its own sha256)."""
    first, second = _artifact(m, a), _artifact(m, b)
    first["files"], second["files"] = second["files"], first["files"]


@pytest.mark.parametrize("edit, where", [
    (lambda m: _artifact(m, "onnx-fp32")["parity"].update(top1_agreement=0.095), "onnx-fp32"),
    (lambda m: _artifact(m, "onnx-fp32")["parity"].update(accuracy=0.9), "onnx-fp32"),
    (lambda m: _artifact(m, "onnx-fp32")["parity"]["tolerance"].update(atol=1.0), "onnx-fp32"),
    (lambda m: _artifact(m, "openvino-fp16").update(precision="fp32"), "openvino-fp16"),
    (lambda m: _artifact(m, "openvino-fp32").update(runtime_version="9.9"), "openvino-fp32"),
    (lambda m: m["provenance"].update(git_commit="0" * 40), "golden"),
    (lambda m: m["source"].update(sha256="0" * 64), "golden"),
    (lambda m: _artifact(m, "openvino-fp16").update(id="openvino-fp16q"), "openvino-fp16, openvino-fp16q"),
    (lambda m: _swap_files(m, "openvino-fp32", "openvino-fp16"), "openvino-fp32, openvino-fp16"),
    (lambda m: m.update(artifacts=[a for a in m["artifacts"] if a["id"] != "openvino-fp32"]), "openvino-fp32"),
], ids=["agreement", "accuracy", "tolerance", "precision", "version", "commit", "source", "renamed", "swapped",
        "removed"])
def test_every_recorded_number_and_label_is_checked_not_only_the_contract(bundle, tmp_path, capsys, edit, where):
    """`export.report` showed a one-byte edit of a parity number (9.50 % top-1 agreement, which the gate refuses)
    next to "servable", and a relabelled precision or provenance passed: golden.npz now records every artifact's
    record and the bundle's origin, and the report marks what differs CORRUPT; a server refuses that artifact."""
    from export.report import main

    edited = _edited(bundle, tmp_path, edit)
    assert main([str(edited)]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == f"python -m export.report: error: corrupt, will not load: {edited}: {where}", err
    assert "manifest.json was edited after export" in out
    if where in ("onnx-fp32", "golden"):
        with pytest.raises(BundleError, match="manifest.json was edited after export"):
            _load(edited)


def test_a_triton_version_directory_keeps_its_records_true(bundle, tmp_path, capsys):
    """export.triton renames an artifact's files in a version directory: the record leaves the file list out."""
    from export import report, triton

    assert triton.main([str(bundle), "--out", str(tmp_path / "repo")]) == 0
    capsys.readouterr()
    for version in sorted((tmp_path / "repo").glob("*/1")):
        assert report.main([str(version)]) == 0, capsys.readouterr()


def test_the_report_of_a_manifest_listing_no_artifacts_is_a_table_not_a_traceback(bundle, tmp_path, capsys):
    from export.report import main

    edited = _edited(bundle, tmp_path, lambda m: m.update(artifacts=[]))
    main([str(edited)])  # TypeError in the column widths before
    assert "artifact  runtime" in capsys.readouterr().out


def test_a_removed_artifact_refuses_the_bundle_rather_than_letting_a_server_fall_back(bundle, tmp_path):
    """Deleting openvino-fp32 from the manifest made `--backend openvino` serve the fp16 IR without a word."""
    edited = _edited(bundle, tmp_path, lambda m: m.update(
        artifacts=[a for a in m["artifacts"] if a["id"] != "openvino-fp32"]))
    with pytest.raises(BundleError, match="'openvino-fp32', which the golden file records, is not listed"):
        runtimes.open_backend(edited, read_manifest(edited), "openvino")
