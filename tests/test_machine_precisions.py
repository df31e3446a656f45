"""The GPU's matmul limits are measured in the parity gates' precisions (models.tolerance.TOLERANCES), not in a
second list: a precision added there gets a limit of its own, or a record of why it has none."""

from __future__ import annotations

import pytest
import torch

from benchmarks import machine
from models import tolerance


@pytest.fixture(autouse=True)
def _keep_tf32():
    """cuda_matmul_limits turns tf32 off process-wide; the tests after these keep what they had."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32  # not monkeypatch: this is a property of torch's cuBLAS module, not deletable
    yield
    matmul.allow_tf32 = before


def _limits(monkeypatch: pytest.MonkeyPatch) -> dict:
    """cuda_matmul_limits without a GPU: each precision's GEMM is a stand-in, an unknown one fails as it would."""

    def fake_matmul(n: int, device: str, precision: str):
        if precision not in ("fp32", "fp16", "bf16", "int8"):
            raise KeyError(precision)  # what _torch_matmul's dtype table raises for a precision it lacks
        return (lambda: None), (lambda: None)

    monkeypatch.setattr(machine, "_torch_matmul", fake_matmul)
    monkeypatch.setattr(machine, "_timed_throughput", lambda fn, flops, seconds, sync: [100.0, 110.0, 120.0])
    return machine.cuda_matmul_limits(seconds=0.01, n=8)


def test_the_cuda_limits_are_the_parity_gates_precisions(monkeypatch):
    limits = _limits(monkeypatch)
    assert list(limits) == list(tolerance.TOLERANCES) == ["fp32", "fp16", "bf16", "int8"]
    assert all(v["native"] and v["gflops"] > 0 for v in limits.values())


def test_a_precision_added_to_the_gates_is_measured_or_says_why_not(monkeypatch):
    monkeypatch.setitem(tolerance.TOLERANCES, "fp8", tolerance.FP16_TOLERANCE)
    limits = _limits(monkeypatch)
    assert list(limits) == ["fp32", "fp16", "bf16", "int8", "fp8"]
    assert limits["fp8"] == {"gflops": None, "native": False, "error": "KeyError: 'fp8'"}
    # judged against the fp32 limit, and named so
    assert machine.limit_for({"cuda": limits}, "cuda", "fp8") == (limits["fp32"]["gflops"], "cuda fp32")
