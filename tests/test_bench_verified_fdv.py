"""The benchmarks run what vitc verified: the hand-written server opens the bundle's ONNX only after the checks the
server makes (a tampered file, or a link out of the bundle, is one line and exit 2), and OpenVINO's benchmark_app
is handed the listed, verified .xml and .bin (never the file named after the .xml beside it); a benchmark_app that
gives no figure is said in the result, not dropped."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fake_runtime import LEGACY
from test_hostile_bundles import _artifact, _copy, _raw, _reseal
from test_serve_fixtures import micro_bundle

from benchmarks import naive_server, overhead
from models.bundle import BundleError, read_manifest

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return micro_bundle(tmp_path_factory)


def _flip_a_weight(onnx: Path) -> None:
    """Change one byte inside the model's largest weight tensor: still a model onnxruntime loads, not the one the
    manifest lists."""
    import onnx as onnx_lib

    raw = max((t.raw_data for t in onnx_lib.load(onnx).graph.initializer), key=len)
    data = bytearray(onnx.read_bytes())
    data[data.find(raw) + len(raw) // 2] ^= 0x40
    onnx.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["tampered", "linked-out"])
def test_the_hand_written_server_refuses_what_the_server_refuses(tmp_path, capsys, kind):
    b = Path(shutil.copytree(LEGACY, tmp_path / "b"))
    naive_server.create_app(str(b))  # the bundle as it is: served
    if kind == "tampered":
        _flip_a_weight(b / "model.onnx")
        says = "model.onnx does not match its sha256"
    else:  # the same bytes, outside the bundle
        shutil.move(b / "model.onnx", tmp_path / "outside.onnx")
        (b / "model.onnx").symlink_to(tmp_path / "outside.onnx")
        says = "'model.onnx' points outside the bundle"
    with pytest.raises(BundleError, match=says):
        naive_server.create_app(str(b))
    port = _free_port()
    assert naive_server.main([str(b), "--port", str(port)]) == 2  # refused before it listens
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listed_bin_renamed(bundle: Path, tmp_path: Path) -> Path:
    """A copy of `bundle` whose IR lists its weights as w.bin, with a file under the name OpenVINO would look for
    beside the .xml: a link to nothing (read, it fails)."""
    b = _copy(bundle, tmp_path)
    raw = _raw(b)
    (b / "openvino-fp32.bin").rename(b / "w.bin")
    (b / "openvino-fp32.bin").symlink_to(tmp_path / "outside" / "weights.bin")
    next(f for f in _artifact(raw, "openvino-fp32")["files"] if f["path"].endswith(".bin"))["path"] = "w.bin"
    _reseal(b, raw)
    return b


def test_benchmark_app_runs_the_listed_verified_weights(bundle, tmp_path):
    b = _listed_bin_renamed(bundle, tmp_path)
    manifest = read_manifest(b)
    shape = (1, *manifest.input.sample_shape)
    with overhead.verified_ir(b, manifest) as xml:
        assert xml.with_suffix(".bin").read_bytes() == (b / "w.bin").read_bytes()
        assert xml.read_bytes() == (b / "openvino-fp32.xml").read_bytes()
        fps, cpu_ms = overhead.benchmark_app(xml, 1, shape)
        assert fps > 0 and cpu_ms > 0
    assert not xml.parent.exists()  # the copies are removed


@pytest.mark.parametrize("kind", ["tampered", "linked-out"])
def test_benchmark_app_is_never_handed_an_ir_that_fails_the_checks(bundle, tmp_path, kind):
    b = _listed_bin_renamed(bundle, tmp_path)
    if kind == "tampered":
        data = bytearray((b / "w.bin").read_bytes())
        data[len(data) // 2] ^= 0x40
        (b / "w.bin").write_bytes(bytes(data))
        says = "w.bin does not match its sha256"
    else:
        shutil.move(b / "w.bin", tmp_path / "w.bin")
        (b / "w.bin").symlink_to(tmp_path / "w.bin")
        says = "'w.bin' points outside the bundle"
    with pytest.raises(BundleError, match=says), overhead.verified_ir(b, read_manifest(b)):
        pass


def test_a_benchmark_app_that_fails_says_why(bundle, tmp_path):
    shutil.copy(bundle / "openvino-fp32.xml", tmp_path / "model.xml")  # no weights beside it
    with pytest.raises(overhead.ReferenceFailed) as failed:  # it returned None: the figure silently dropped
        overhead.benchmark_app(tmp_path / "model.xml", 1, (1, *read_manifest(bundle).input.sample_shape))
    why = str(failed.value)
    assert why.startswith("benchmark_app exited with code 1: ") and "\n" not in why, why
    assert "Traceback" not in why and not why.endswith(":"), why  # the cause, not where it arose


def _doc(fps: float | None, failures: list[str]) -> dict:
    """An overhead result document of made-up figures whose benchmark_app rounds gave `fps` and failed `failures`."""
    systems = ("bare-onnxruntime", "naive", "vitc-onnxruntime", "vitc-openvino")
    timing = {s: {"p50": 1.0} for s in ("receive", "decode", "queue", "compute", "encode", "total")}
    doc = {
        "model": "micro", "created": "now", "image": "256x256 PNG", "image_bytes": 1,
        "environment": {"cpu": {"model": "cpu", "usable_cpus": 2, "flags": []}, "versions": {}, "git": None},
        "config": {"rounds": 1, "slice_s": 1, "concurrency": 1, "saturation_s": 1, "saturation_rounds": 1},
        "cold_start": {},
        "single_stream": {s: {"latency_ms": {"p50": 10.0}, "server_timing_ms": timing} for s in systems},
        "saturation": {s: {"throughput_rps": 50.0, "mean_batch": 2.0, "server_cpu_ms_per_request": 9.0,
                           "client_cpu_ms_per_request": 1.0} for s in systems[1:]},
        "bare_saturation": {"onnxruntime_ips": 60.0, "onnxruntime_batch": 2, "onnxruntime_round_ratios": [0.8],
                            "onnxruntime_streams_cpu_ms_per_image": 5.0, "benchmark_app_fps": fps,
                            "benchmark_app_cpu_ms_per_image": 5.0 if fps else None,
                            "openvino_round_ratios": [50.0 / fps] if fps else [],
                            "benchmark_app_failures": failures},
    }
    doc["verdict"] = overhead.verdict(doc)
    return doc


def test_the_report_says_why_benchmark_app_gave_no_figure():
    why = "benchmark_app exited with code 1: [ ERROR ] Cannot read the weights"
    text = overhead.markdown(_doc(None, [why, why]))
    row = "| OpenVINO benchmark_app on the same IR (throughput hint, no HTTP, no decoding) | – |"
    assert f"{row} not measured: {why} |" in text, text
    assert "vitc OpenVINO = not compared: benchmark_app gave no figure." in text
    text = overhead.markdown(_doc(100.0, [why]))  # one round of two failed
    assert f"| 100.0 img/s (1 round(s) failed: {why}) |" in text and "vitc OpenVINO = 0.50 of benchmark_app" in text
