"""The serving-overhead benchmark, run for real on the micro bundle with tiny budgets: every system answers, the
ratios are computed from interleaved rounds, and the report states the verdicts."""

from __future__ import annotations

import pytest
from test_serve_fixtures import micro_bundle

from benchmarks import overhead


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    return overhead.run(micro_bundle(tmp_path_factory), rounds=2, slice_s=0.2, saturation_s=1.5, concurrency=4,
                        cold_starts=1, backends=["onnxruntime", "openvino"], log=lambda _: None, saturation_rounds=3)


def test_every_system_is_measured_side_by_side(doc):
    s1 = doc["single_stream"]
    assert set(s1) == {"bare-onnxruntime", "naive", "vitc-onnxruntime", "vitc-openvino"}
    assert all(v["latency_ms"]["n"] > 5 and v["latency_ms"]["p50"] > 0 for v in s1.values())
    stages = s1["vitc-onnxruntime"]["server_timing_ms"]
    assert {"receive", "decode", "queue", "compute", "encode", "total"} <= set(stages)
    assert stages["total"]["p50"] <= s1["vitc-onnxruntime"]["latency_ms"]["p50"]
    sat, bare = doc["saturation"], doc["bare_saturation"]
    assert all(v["throughput_rps"] > 0 and len(v["rounds_rps"]) == 3 for v in sat.values())
    assert len(bare["onnxruntime_round_ratios"]) == 3 and bare["onnxruntime_ips"] > 0
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
    assert "CPU per request at saturation" in text and "| vitc-onnxruntime |" in text and "Ceiling" in text
    assert ("within 5 ms" in text) == v["within_5_ms_of_bare"]
