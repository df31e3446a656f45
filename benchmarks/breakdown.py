"""Where the time goes: a per-operation profile (runtimes that report one: OpenVINO), matmul-class ops vs the rest.

This explains a result far from the matmul limit. Nearly all analytic multiply-adds live in the matmul-class
ops (FullyConnected, MatMul, Convolution, attention), so 2 * MACs * batch / (their time) is the speed of the
GEMMs themselves; the remaining time is LayerNorm, Softmax, GELU, adds, transposes and reorders, which do few
flops and are bound by memory and per-op overhead. Profiling adds a little overhead: this is for shares, not
for the headline latency (which is measured without it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import runtimes
from models.bundle import Manifest, verify_files
from runtimes import BackendOptions, LoadSpec

MATMUL_OPS = ("FullyConnected", "MatMul", "Convolution", "ScaledDotProductAttention", "GroupConvolution")


def is_matmul_op(node_type: str) -> bool:
    """FullyConnected, FullyConnectedQuantizedLegacy, MatMul, Convolution, ... (GEMM-shaped work)."""
    return node_type.startswith(MATMUL_OPS)


def can_profile(runtime: str) -> bool:
    """Whether the runtime reports per-op times."""
    return runtimes.get(runtime).profile is not None


def op_profile(bundle: Path, manifest: Manifest, runtime: str, precision: str, batch: int, threads: int,
               reps: int = 5) -> dict[str, Any]:
    """Per-op-type milliseconds of the runtime's artifact at `batch`, split into matmul-class ops and the rest."""
    rt = runtimes.get(runtime)
    if rt.profile is None:
        raise ValueError(f"{runtime} reports no per-op times")
    artifact = runtimes.select(manifest, rt, precision)
    spec = LoadSpec(manifest, artifact, tuple(verify_files(bundle, artifact)), BackendOptions(threads=threads))
    by_type = rt.profile(spec, batch, reps)
    total = sum(by_type.values())
    matmul = sum(v for t, v in by_type.items() if is_matmul_op(t))
    top = dict(sorted(by_type.items(), key=lambda kv: -kv[1])[:8])
    return {"precision": precision, "batch": batch, "profiled_ms": total, "matmul_ms": matmul,
            "matmul_share": matmul / total if total > 0 else None, "top_ops_ms": top}


if __name__ == "__main__":
    from benchmarks.library import library_module

    library_module(__spec__)
