"""Where the time goes: OpenVINO per-operation profile of a bundle, split into matmul-class ops and the rest.

This explains a result far from the matmul limit. Nearly all analytic multiply-adds live in the matmul-class
ops (FullyConnected, MatMul, Convolution, attention), so 2 * MACs * batch / (their time) is the speed of the
GEMMs themselves; the remaining time is LayerNorm, Softmax, GELU, adds, transposes and reorders, which do few
flops and are bound by memory and per-op overhead. Profiling adds a little overhead: this is for shares, not
for the headline latency (which is measured without it).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from export.manifest import select_artifact, verify_files

MATMUL_OPS = ("FullyConnected", "MatMul", "Convolution", "ScaledDotProductAttention", "GroupConvolution")


def is_matmul_op(node_type: str) -> bool:
    """FullyConnected, FullyConnectedQuantizedLegacy, MatMul, Convolution, ... (GEMM-shaped work)."""
    return node_type.startswith(MATMUL_OPS)


def openvino_profile(bundle: Path, manifest: dict[str, Any], precision: str, batch: int, threads: int,
                     reps: int = 5) -> dict[str, Any]:
    """Per-op-type milliseconds (median over `reps` profiled calls) of the OpenVINO artifact at `batch`."""
    import openvino as ov

    artifact = select_artifact(manifest, "openvino", precision)
    xml = next(p for p in verify_files(bundle, artifact) if p.suffix == ".xml")
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(xml)), "CPU", {
        "PERF_COUNT": True, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": (artifact.get("parity") or {}).get("inference_precision", "f32"),
    })
    request = compiled.create_infer_request()
    shape = manifest["input"]
    x = np.random.default_rng(0).standard_normal(
        (batch, shape.get("channels", 3), shape["height"], shape["width"]), dtype=np.float32)
    request.infer({0: x})
    runs: list[Counter] = []
    for _ in range(reps):
        request.infer({0: x})
        per_type: Counter = Counter()
        for p in request.get_profiling_info():
            per_type[p.node_type] += p.real_time.total_seconds() * 1e3
        runs.append(per_type)
    types = sorted({t for r in runs for t in r})
    by_type = {t: float(np.median([r.get(t, 0.0) for r in runs])) for t in types}
    total = sum(by_type.values())
    matmul = sum(v for t, v in by_type.items() if is_matmul_op(t))
    top = dict(sorted(by_type.items(), key=lambda kv: -kv[1])[:8])
    return {"precision": precision, "batch": batch, "profiled_ms": total, "matmul_ms": matmul,
            "matmul_share": matmul / total if total > 0 else None, "top_ops_ms": top}
