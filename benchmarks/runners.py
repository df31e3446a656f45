"""Benchmark targets (runtime x precision x device) opened through the serving backends, so the timed code is
the code that serves. Two targets the server does not offer are thin wrappers around its backends: torch bf16
(the torch backend under `torch.autocast`) and OpenVINO bf16 (the fp32 IR compiled with a bf16 precision hint).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.manifest import BundleError, select_artifact


@dataclass(frozen=True)
class Target:
    """One runtime at one precision on one device."""

    runtime: str  # a serve backend: torch | onnxruntime | openvino | tensorrt
    precision: str  # fp32 | bf16 | fp16 | int8
    device: str = "cpu"

    @property
    def id(self) -> str:
        where = "-cuda" if self.device.startswith("cuda") and self.runtime in ("onnxruntime", "torch") else ""
        return f"{self.runtime}{where}-{self.precision}"


CPU_TARGETS = (
    Target("torch", "fp32"), Target("torch", "bf16"), Target("onnxruntime", "fp32"),
    Target("openvino", "fp32"), Target("openvino", "bf16"), Target("openvino", "int8"),
)
GPU_TARGETS = (Target("onnxruntime", "fp32", "cuda"), Target("tensorrt", "fp16", "cuda"),
               Target("tensorrt", "int8", "cuda"))
ALL_TARGETS = CPU_TARGETS + GPU_TARGETS


def parse_targets(spec: str) -> list[Target]:
    """"all" or comma-separated target ids (e.g. "openvino-int8,onnxruntime-fp32") -> Targets; ValueError."""
    if spec.strip() == "all":
        return list(ALL_TARGETS)
    by_id = {t.id: t for t in ALL_TARGETS}
    out = []
    for raw in spec.split(","):
        name = raw.strip()
        if name not in by_id:
            raise ValueError(f"unknown target {name!r}; known: all, {', '.join(by_id)}")
        if by_id[name] not in out:
            out.append(by_id[name])
    if not out:
        raise ValueError("no targets given")
    return out


def export_targets(targets: list[Target], gpus: int) -> list[str]:
    """The export targets (export.context names) a bundle needs for these benchmark targets on this machine."""
    from serve.backends.base import installed

    needed = ["onnx"]  # the hub: onnxruntime, and TensorRT's fallback
    if any(t.runtime == "openvino" for t in targets):
        needed.append("openvino-fp32")
    if any(t.runtime == "openvino" and t.precision == "int8" for t in targets):
        needed.append("openvino-int8")
    if gpus and installed("tensorrt"):  # engines are built on (and for) the GPU that runs them
        needed += [f"tensorrt-{t.precision}" for t in targets if t.runtime == "tensorrt"]
    return needed


def unavailable(target: Target, manifest: dict[str, Any], *, gpus: int, native_bf16: bool) -> str | None:
    """Why `target` cannot run here (one line), or None when it can."""
    from serve.backends.base import installed

    if not installed(target.runtime):
        return f"{target.runtime} is not installed"
    if target.device.startswith("cuda") and gpus == 0:
        return "no CUDA GPU on this machine"
    if target.runtime == "onnxruntime" and target.device.startswith("cuda"):
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CUDA provider (install onnxruntime-gpu)"
    if target.precision == "bf16" and target.device == "cpu" and not native_bf16:
        return ("CPU has no native bf16 (no AVX512_BF16/AMX): OpenVINO silently computes in fp32 and torch "
                "emulates bf16 several times slower than fp32")
    runtime, precision = target.runtime, target.precision
    if precision == "bf16":  # built from the fp32 artifact at load time
        precision = "fp32"
    if runtime == "tensorrt" and precision == "fp16":  # the backend builds fp16 engines from the ONNX hub
        runtime, precision = "onnxruntime", "fp32"
    try:
        select_artifact(manifest, runtime, precision)
    except BundleError as exc:
        refused = [a for a in manifest.get("artifacts", [])
                   if a.get("runtime") == runtime and a.get("precision") == precision and not a.get("servable")]
        return f"refused by its parity gate: {refused[0].get('refused_reason')}" if refused else str(exc)
    return None


@dataclass
class Opened:
    """A loaded target: its batch -> logits function, cold-start seconds and what it really runs."""

    target: Target
    infer: Callable[[np.ndarray], np.ndarray]
    close: Callable[[], None]
    cold_start_s: float
    info: dict[str, Any]


def _bf16_openvino_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """A copy of the manifest whose OpenVINO fp32 artifact compiles with the bf16 precision hint.

    The serve backend takes its hint from the artifact's parity record; this is the one place the benchmark
    overrides it (a BackendOptions field for the hint would make this unnecessary).
    """
    manifest = copy.deepcopy(manifest)
    for artifact in manifest["artifacts"]:
        if artifact.get("runtime") == "openvino" and artifact.get("precision") == "fp32":
            artifact.setdefault("parity", {})["inference_precision"] = "bf16"
    return manifest


def open_target(target: Target, bundle: Path, manifest: dict[str, Any], threads: int) -> Opened:
    """Load `target` from the bundle with `threads` intra-op threads; cold start = verify + load + first result."""
    from serve.backends import BackendOptions, load_backend

    options = BackendOptions(threads=threads, parallel=1, hint="latency")
    precision = {"bf16": "fp32"}.get(target.precision, target.precision)
    if target.runtime == "openvino" and target.precision == "bf16":
        manifest = _bf16_openvino_manifest(manifest)
    t0 = time.perf_counter()
    backend = load_backend(bundle, manifest, target.runtime, device=target.device, precision=precision,
                           options=options)
    infer = backend.infer
    info: dict[str, Any] = {"threads": threads, "backend_precision": backend.precision}
    if target.runtime == "torch" and target.precision == "bf16":
        import torch

        def infer(batch: np.ndarray) -> np.ndarray:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return backend.infer(batch)

        shape = manifest["input"]
        infer(np.zeros((1, shape.get("channels", 3), shape["height"], shape["width"]), np.float32))
        info["autocast"] = "bf16"
    cold = time.perf_counter() - t0
    if target.runtime == "torch":
        import torch

        info["threads_effective"] = torch.get_num_threads()
    compiled = getattr(backend, "compiled", None)
    if compiled is not None:  # OpenVINO reports what it really compiled
        info["threads_effective"] = int(compiled.get_property("INFERENCE_NUM_THREADS"))
        info["inference_precision"] = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    session = getattr(backend, "session", None)
    if session is not None and hasattr(session, "get_providers"):
        info["providers"] = session.get_providers()
    return Opened(target, infer, backend.close, cold, info)
