"""The benchmark's statistics, limits bookkeeping, target parsing and timing loop, on hand-checkable inputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.machine import limit_for
from benchmarks.measure import Budget, input_pool, time_pair
from benchmarks.runners import Target, all_targets, export_targets, parse_targets
from benchmarks.stats import (
    MIN_CI_ROUNDS,
    achieved_gflops,
    median_ci,
    median_is_stable,
    ratio_summary,
    summarize,
)


def test_summarize_one_to_hundred():
    s = summarize(range(1, 101))
    assert s["n"] == 100
    assert s["p50"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(90.1)  # linear interpolation: 1 + 0.9 * 99
    assert s["p99"] == pytest.approx(99.01)
    assert (s["min"], s["max"], s["mean"]) == (1.0, 100.0, 50.5)
    assert s["iqr"] == pytest.approx(75.25 - 25.75)
    assert s["mad"] == pytest.approx(25.0)
    assert s["ci95"] == [40.0, 61.0]  # 1-based ranks floor(50 - 9.8) = 40 and ceil(1 + 50 + 9.8) = 61
    assert s["rel_spread"] == pytest.approx(49.5 / 50.5)


def test_median_ci_small_samples_span_the_range_and_reject_bad_input():
    assert median_ci([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 5.0)
    with pytest.raises(ValueError, match="no samples"):
        summarize([])
    with pytest.raises(ValueError, match="finite"):
        summarize([1.0, float("nan")])


def test_median_is_stable():
    assert median_is_stable([10.0] * 20, 0.01)
    assert not median_is_stable([10.0] * 4, 0.5)  # too few samples to judge
    assert not median_is_stable([1.0, 10.0] * 10, 0.05)
    assert median_is_stable(np.linspace(99, 101, 200), 0.02)


def test_ratio_summary_verdicts():
    slower = ratio_summary([2.0] * 10, [1.0] * 10)
    assert slower["ratio"] == 2.0 and slower["flagged"] and slower["verdict"] == "C slower" and slower["firm"]
    assert slower["interval"] == [2.0, 2.0] and slower["estimator"] == "ratio of medians"
    parity = ratio_summary([1.0] * 10, [1.0] * 10, round_ratios=[0.99, 1.0, 1.01, 1.02, 0.98, 1.0])
    assert parity["ratio"] == 1.0 and not parity["flagged"] and parity["verdict"] == "parity"
    unsure = ratio_summary([1.0] * 10, [1.0] * 10, round_ratios=[0.8, 1.2, 0.9, 1.1])
    assert unsure["verdict"] == "inconclusive" and not unsure["flagged"]


def test_the_ratio_and_its_interval_come_from_the_rounds():
    """A committed run printed C/P 1.022 beside the interval 0.85-0.93 and the verdict "C faster": the ratio was the
    ratio of the two medians, the interval and verdict came from the per-round ratios."""
    rounds = [0.85, 0.86, 0.88, 0.89, 0.9, 0.9, 0.91, 0.92, 0.93]
    r = ratio_summary([1.2, 1.1, 1.0] * 5, [1.0, 1.05, 1.1] * 5, round_ratios=rounds)
    assert r["ratio"] == 0.9 and r["interval"] == [0.85, 0.93] and r["verdict"] == "C faster"
    assert r["estimator"] == "median per-round ratio" and r["interval_kind"] == "95% CI" and r["firm"]


def test_few_rounds_give_their_range_and_only_an_indicative_verdict():
    """The quick run's 2 rounds: their range covers the median half the time, it is no 95 % CI."""
    r = ratio_summary([0.5] * 5, [1.0] * 5, round_ratios=[0.648, 0.767])
    assert r["ratio"] == pytest.approx(0.7075) and r["interval"] == [0.648, 0.767]
    assert r["interval_kind"] == "range of 2 rounds" and not r["firm"] and r["verdict"] == "indicative: C faster"
    one = ratio_summary([1.0], [1.0], round_ratios=[1.3])  # one round is no interval: no direction either
    assert one["verdict"] == "inconclusive" and one["too_few"] == "too few: 1 round of 2" and not one["firm"]
    assert ratio_summary([1.0], [1.0], round_ratios=[0.9, 1.1])["verdict"] == "inconclusive"
    few_samples = ratio_summary([2.0] * 5, [1.0] * 5)  # no rounds: the samples' count decides
    assert few_samples["verdict"] == "indicative: C slower"
    assert few_samples["interval_kind"] == "from the ranges of 5 samples"
    six = ratio_summary([1.0], [1.0], round_ratios=[0.6, 0.62, 0.64, 0.66, 0.68, 0.7])
    assert six["firm"] and six["verdict"] == "C faster" and six["interval"] == [0.6, 0.7]
    assert median_ci([0.6, 0.7, 0.62, 0.68, 0.64]) == (0.6, 0.7) and MIN_CI_ROUNDS == 6  # 1 - 2/2**6 >= 0.95


_timing = st.floats(min_value=1e-3, max_value=1e3)


@settings(max_examples=300, deadline=None)
@given(c=st.lists(_timing, min_size=1, max_size=30), p=st.lists(_timing, min_size=1, max_size=30),
       rounds=st.lists(st.floats(min_value=0.05, max_value=20.0), max_size=30))
def test_the_ratio_lies_in_its_interval_and_the_verdict_follows_the_interval(c, p, rounds):
    r = ratio_summary(c, p, rounds)
    lo, hi = r["interval"]
    assert lo <= r["ratio"] <= hi
    if rounds:
        assert r["ratio"] == float(np.median(rounds))
    assert r["firm"] == ((len(rounds) or min(len(c), len(p))) >= MIN_CI_ROUNDS)
    word = r["verdict"].removeprefix("indicative: ")
    assert r["verdict"].startswith("indicative: ") == (not r["firm"] and word != "inconclusive")
    single = (len(rounds) or min(len(c), len(p))) < 2  # one value: no interval, so no direction
    assert (r["too_few"] is not None) == single
    assert word == ("inconclusive" if single else "C slower" if lo > 1.05 else "C faster" if hi < 0.95 else
                    "parity" if 0.95 <= lo and hi <= 1.05 else "inconclusive")


def test_achieved_gflops_counts_two_flops_per_mac():
    assert achieved_gflops(1_000_000_000, 2, 0.1) == pytest.approx(40.0)
    with pytest.raises(ValueError):
        achieved_gflops(1, 1, 0.0)


def test_limit_for_falls_back_to_fp32_where_a_precision_is_not_native():
    limits = {"cpu": {"fp32": {"gflops": 100.0, "native": True}, "bf16": {"gflops": None, "native": False},
                      "int8": {"gflops": 300.0, "native": True}}}
    assert limit_for(limits, "cpu", "int8") == (300.0, "cpu int8")
    assert limit_for(limits, "cpu", "bf16") == (100.0, "cpu fp32")
    assert limit_for(limits, "cpu", "fp32") == (100.0, "cpu fp32")
    assert limit_for(limits, "cuda", "fp16") == (None, "cuda fp32")


def test_parse_targets_and_the_exports_they_need():
    # The targets users have scripted against stay, listed by the registry's runtimes (CPU ones first).
    ids = [t.id for t in parse_targets("all")]
    assert ids == [t.id for t in all_targets()]
    assert ids == ["onnxruntime-fp32", "openvino-fp32", "openvino-bf16", "openvino-int8", "torch-fp32", "torch-bf16",
                   "onnxruntime-cuda-fp32", "tensorrt-fp16", "tensorrt-int8", "torch-cuda-fp32",
                   *(f"torch-cuda-{p}{c}{layout}" for p in ("bf16", "fp16") for c in ("", "-compiled")
                     for layout in ("", "-nchw"))]
    assert parse_targets("openvino-int8, onnxruntime-fp32") == [Target("openvino", "int8"),
                                                                Target("onnxruntime", "fp32")]
    assert Target("onnxruntime", "fp32", "cuda").id == "onnxruntime-cuda-fp32"
    compiled = parse_targets("torch-cuda-bf16-compiled-nchw")[0]
    assert (compiled.compile, compiled.channels_last, compiled.variant.artifact_precision) == (True, False, "bf16")
    with pytest.raises(ValueError, match="unknown target 'openvino-fp64'; known: all, "):
        parse_targets("openvino-fp64")
    with pytest.raises(ValueError, match=r"unknown target 'onnx-fp16' \(an export artifact's name; the benchmark "
                                         r"names the runtime that times it: onnxruntime-fp32, onnxruntime-cuda-fp32\)"):
        parse_targets("onnx-fp16")
    assert export_targets([Target("openvino", "int8")], gpus=0) == ["onnx", "openvino-int8"]
    # OpenVINO bf16 runs the fp32 IR with a precision hint; torch bf16 has its own weights, exported only where
    # the CPU runs bf16 natively (elsewhere the target is skipped, so its parity run would be wasted).
    assert export_targets([Target("openvino", "bf16"), Target("torch", "bf16")], gpus=0, native_bf16=False) == [
        "onnx", "openvino-fp32"]
    assert export_targets([Target("openvino", "bf16"), Target("torch", "bf16")], gpus=0, native_bf16=True) == [
        "onnx", "openvino-fp32", "torch-bf16"]
    assert export_targets([Target("tensorrt", "fp16", "cuda")], gpus=0) == ["onnx"]  # no GPU: no engine
    # torch alone needs no ONNX; on a GPU its CUDA targets need their precision's weights.
    assert export_targets([Target("torch", "fp16", "cuda", compile=True)], gpus=1) == ["torch-fp16"]
    assert export_targets([Target("torch", "fp16", "cuda", compile=True)], gpus=0) == []


def test_time_pair_interleaves_rounds_and_rotates_inputs():
    calls: list[tuple[str, int]] = []
    inputs = input_pool(2, (3, 4, 4), pool=3)
    assert len({x.tobytes() for x in inputs}) == 3 and all(x.flags.c_contiguous for x in inputs)
    ids = {id(x): i for i, x in enumerate(inputs)}

    def runner(tag: str):
        def infer(x: np.ndarray) -> np.ndarray:
            calls.append((tag, ids[id(x)]))
            return x
        return infer

    budget = Budget(warmup_calls=2, warmup_s=0.0, min_reps=6, min_rounds=3, round_s=0.0, max_s=60.0, rel_ci=1.0)
    t = time_pair(runner("c"), runner("p"), inputs, budget)
    assert t.rounds >= 3 and len(t.c) >= 6 and len(t.p) >= 6 and len(t.round_ratios) == t.rounds
    timed = calls[4:]  # after 2 warm-up calls each
    tags = [tag for tag, _ in timed]
    # round_s=0 means one call per model per round; the order flips each round: c p | p c | c p ...
    assert tags[:6] == ["c", "p", "p", "c", "c", "p"]
    c_inputs = [i for tag, i in timed if tag == "c"]
    assert c_inputs[:4] == [0, 1, 2, 0]
