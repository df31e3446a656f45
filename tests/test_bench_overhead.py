"""The serving-overhead benchmark, run for real on the micro bundle with tiny budgets: every system answers, the
ratios are computed from interleaved rounds, and the report states the verdicts. And the load test's record of what
it measured."""

from __future__ import annotations

import errno
import json

import pytest
from test_serve_fixtures import micro_bundle

from benchmarks import overhead
from serve.launch import REPO


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    # Two saturation rounds of 0.2 s a server: each round also runs the runtimes alone and OpenVINO's benchmark_app
    # (a process of its own, timed for at least 1 s), which most of the fixture's time goes to.
    return overhead.run(micro_bundle(tmp_path_factory), rounds=2, slice_s=0.2, saturation_s=0.4, concurrency=4,
                        cold_starts=1, backends=["onnxruntime", "openvino"], log=lambda _: None, saturation_rounds=2)


def test_every_system_is_measured_side_by_side(doc):
    s1 = doc["single_stream"]
    assert set(s1) == {"bare-onnxruntime", "naive", "vitc-onnxruntime", "vitc-openvino"}
    assert all(v["latency_ms"]["n"] > 5 and v["latency_ms"]["p50"] > 0 for v in s1.values())
    stages = s1["vitc-onnxruntime"]["server_timing_ms"]
    assert {"receive", "decode", "queue", "compute", "encode", "total"} <= set(stages)
    assert stages["total"]["p50"] <= s1["vitc-onnxruntime"]["latency_ms"]["p50"]
    sat, bare = doc["saturation"], doc["bare_saturation"]
    assert all(v["throughput_rps"] > 0 and len(v["rounds_rps"]) == 2 for v in sat.values())
    assert len(bare["onnxruntime_round_ratios"]) == 2 and bare["onnxruntime_ips"] > 0
    assert sat["vitc-onnxruntime"]["mean_batch"] >= 1
    # CPU accounting: every server's CPU per request (from /proc), the runtime's own per image, in both layouts.
    assert all(v["server_cpu_ms_per_request"] > 0 and v["client_cpu_ms_per_request"] > 0 for v in sat.values())
    assert bare["onnxruntime_streams_cpu_ms_per_image"] > 0 and bare["onnxruntime_one_session_cpu_ms_per_image"] > 0
    # The reference is the better layout each round, so at least either layout's median.
    assert bare["onnxruntime_ips"] >= max(bare["onnxruntime_streams_ips"], bare["onnxruntime_one_session_ips"]) - 1e-9
    for backend in ("onnxruntime", "openvino"):
        run = doc["cold_start"][backend]["runs"][0]
        assert 0 < run["ready_s"] < 60 and {"verify", "load", "golden"} <= set(run["steps_s"])


def test_the_report_states_the_verdicts(doc):
    v = doc["verdict"]
    assert v["vitc_minus_bare_ms"] == pytest.approx(v["c1_p50_ms"]["vitc-onnxruntime"]
                                                    - v["c1_p50_ms"]["bare-onnxruntime"])
    text = overhead.markdown(doc)
    assert "| **vitc, onnxruntime** |" in text and "Where vitc's time goes" in text
    assert "CPU per request at saturation" in text and "| vitc-onnxruntime |" in text and "CPU-bound estimate" in text
    assert ("within 5 ms" in text) == v["within_5_ms_of_bare"]


def test_the_load_test_records_the_build_it_measured(tmp_path, capsys):
    """A load-test JSON had no library versions, git commit or bundle identity: its figures could not be traced."""
    from fake_runtime import LEGACY

    from benchmarks.load import main
    from models.bundle import read_manifest
    from models.io import sha256_file

    out = tmp_path / "load.json"
    assert main(["--start", "--model", f"old={LEGACY}", "--concurrency", "1", "--duration", "0.3", "--warmup", "0",
                 "--images", "2", "--server-arg=--threads=1", "--out", str(out)]) == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    env = doc["environment"]
    assert {"python", "onnxruntime", "numpy"} <= env["versions"].keys()
    assert len(env["git"]["commit"] or "") == (40 if (REPO / ".git").exists() else 0)  # an sdist has no commit
    (model,) = doc["models"]
    manifest = read_manifest(LEGACY)
    artifact = manifest.artifact("onnxruntime", "fp32")
    assert model["name"] == "old" and model["bundle"]["path"] == str(LEGACY)
    assert model["bundle"]["manifest_sha256"] == sha256_file(LEGACY / "manifest.json")
    assert model["bundle"]["weights_sha256"] == manifest.source.sha256
    assert model["bundle"]["artifact"] == {"id": artifact.id, "files": [f.to_dict() for f in artifact.files]}


def test_a_full_disk_while_saving_the_load_test_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    from benchmarks import load

    doc = {"models": [{"name": "m", "runtime": "onnxruntime", "precision": "fp32", "levels": [
        {"concurrency": 1, "p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0, "throughput_rps": 9.0, "http_503": 0,
         "mean_batch_size": 1.0}]}], "machine": {"cpus": 2}}
    monkeypatch.setattr(load, "_measure", lambda *_: doc)

    def full(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("benchmarks.report.stage", full)
    out = tmp_path / "load.json"
    assert load.main(["--url", "http://127.0.0.1:9", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "| m | onnxruntime fp32 | 1 | 1.0 |" in captured.out  # the figures were printed first
    assert captured.err.strip().splitlines() == [
        f"python -m benchmarks.load: error: No space left on device: {out}: the measurements are printed above"]
