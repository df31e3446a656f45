"""Benchmark targets (runtime x compute precision x device), listed by the runtime registry and opened through the
same `runtimes.open_backend` the server uses, so the timed code is the code that serves. Variants the server does
not offer by default (torch and OpenVINO in bf16 on an fp32 artifact) are the same backends with a typed
`inference_precision` option.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import runtimes
from models.bundle import BundleError, Manifest
from runtimes import BackendOptions, Variant
from runtimes.registry import load_failures, shadowed


@dataclass(frozen=True)
class Target:
    """One runtime at one compute precision on one device (torch: eager or compiled, and its memory layout)."""

    runtime: str  # a registered runtime: torch | onnxruntime | openvino | tensorrt | ...
    precision: str  # fp32 | bf16 | fp16 | int8
    device: str = "cpu"
    compile: bool = False
    channels_last: bool | None = None

    @property
    def id(self) -> str:
        # "-cuda" only where the runtime runs on the CPU as well, so that ids stay unique and short.
        both = "cpu" in runtimes.get(self.runtime).devices
        where = "-cuda" if self.device.startswith("cuda") and both else ""
        return f"{self.runtime}{where}-{self.precision}{self.variant.suffix}"

    @property
    def variant(self) -> Variant:
        """The registry's description of this target (which artifact, which options)."""
        for v in runtimes.get(self.runtime).variants:
            if (v.precision, v.device, v.compile, v.channels_last) == (
                    self.precision, self.device.partition(":")[0], self.compile, self.channels_last):
                return v
        raise ValueError(f"{self.runtime} has no {self.precision} variant on {self.device}")


def all_targets() -> tuple[Target, ...]:
    """Every variant of every registered runtime, CPU targets first."""
    targets = [Target(rt.name, v.precision, v.device, v.compile, v.channels_last)
               for rt in runtimes.runtimes() for v in rt.variants]
    return tuple(sorted(targets, key=lambda t: t.device != "cpu"))


def parse_targets(spec: str) -> list[Target]:
    """"all" or comma-separated target ids (e.g. "openvino-int8,onnxruntime-fp32") -> Targets; ValueError."""
    known = all_targets()
    by_id = {t.id: t for t in known}
    out = list(known) if spec.strip() == "all" else []
    if not out:
        for raw in spec.split(","):
            name = raw.strip()
            if name not in by_id:
                raise ValueError(f"unknown target {name!r}{_artifact_hint(name, known)}; known: all, "
                                 f"{', '.join(by_id)}{load_failures()}")
            if by_id[name] not in out:
                out.append(by_id[name])
    if not out:
        raise ValueError("no targets given")
    for t in out:  # a plugin meant to be this runtime did not load: the other would be timed in its place
        if why := shadowed("name", t.runtime):
            raise ValueError(f"target {t.id!r}: {why}")
    return out


def _artifact_hint(name: str, known: list[Target]) -> str:
    """Where `name` is an export target ("onnx-fp16": an artifact), the benchmark targets that time its runtime."""
    rt = runtimes.by_target(name.lower().partition("-")[0])
    timing = [t.id for t in known if rt is not None and rt.name != rt.target and t.runtime == rt.name]
    return f" (an export artifact's name; the benchmark names the runtime that times it: {', '.join(timing)})" \
        if timing else ""


def export_targets(targets: list[Target], gpus: int, native_bf16: bool = True) -> list[str]:
    """The export targets (export.targets names) a bundle needs for these benchmark targets on this machine.

    The ONNX hub only when a runtime other than torch is timed (onnxruntime serves it, TensorRT falls back to it);
    nothing for a target that cannot run here (GPU artifacts are built on, and for, the GPU that runs them; torch
    bf16 weights are not worth a parity run on a CPU that only emulates bf16).
    """
    needed = [runtimes.get("onnxruntime").target] if any(t.runtime != "torch" for t in targets) else []
    for t in targets:
        rt = runtimes.get(t.runtime)
        if t.device.startswith("cuda") and not (gpus and rt.installed()):
            continue
        if t.precision == "bf16" and t.device == "cpu" and not native_bf16 and t.variant.artifact is None:
            continue
        needed.append(f"{rt.target}-{t.variant.artifact_precision}")
    return list(dict.fromkeys(needed))


def unavailable_here(target: Target, *, gpus: int, native_bf16: bool) -> str | None:
    """Why `target` cannot run on this machine whatever the bundle (one line), or None: known before any export."""
    rt = runtimes.get(target.runtime)
    if not rt.installed():
        return f"{rt.name} is not installed"
    if target.device.startswith("cuda") and gpus == 0:
        return "no CUDA GPU on this machine"
    reason = rt.unavailable(target.device)
    if reason:
        return reason
    if target.precision == "bf16" and target.device == "cpu" and not native_bf16:
        return ("CPU has no native bf16 (no AVX512_BF16/AMX): OpenVINO silently computes in fp32 and torch "
                "emulates bf16 several times slower than fp32")
    return None


def unavailable(target: Target, manifest: Manifest, *, gpus: int, native_bf16: bool) -> str | None:
    """Why `target` cannot run here (one line), or None when it can."""
    if reason := unavailable_here(target, gpus=gpus, native_bf16=native_bf16):
        return reason
    rt = runtimes.get(target.runtime)
    precision = target.variant.artifact_precision
    try:
        runtimes.select(manifest, rt, precision)
    except BundleError as exc:
        refused = manifest.artifact(rt.name, precision)
        return f"refused by its parity gate: {refused.refused_reason}" if refused and not refused.servable else str(exc)
    return None


@dataclass
class Opened:
    """A loaded target: its batch -> logits function, cold-start seconds and what it really runs."""

    target: Target
    infer: Callable[[np.ndarray], np.ndarray]
    close: Callable[[], None]
    cold_start_s: float
    info: dict[str, Any]


def open_target(target: Target, bundle: Path, manifest: Manifest, threads: int,
                batch_sizes: tuple[int, ...] | None = None) -> Opened:
    """Load `target` from the bundle with `threads` intra-op threads; cold start = verify + load + first result
    (a compiled target captures only `batch_sizes`, the ones it will be timed at)."""
    variant = target.variant
    options = BackendOptions(device=target.device, threads=threads, parallel=1, hint="latency",
                             inference_precision=variant.inference_precision, compile=variant.compile,
                             channels_last=variant.channels_last, buckets=batch_sizes if variant.compile else None)
    t0 = time.perf_counter()
    backend = runtimes.open_backend(bundle, manifest, target.runtime, variant.artifact_precision, options)
    cold = time.perf_counter() - t0
    info: dict[str, Any] = {"threads": threads, "backend_precision": backend.precision, **backend.describe()}
    return Opened(target, backend.infer, backend.close, cold, info)


if __name__ == "__main__":
    from benchmarks.library import library_module

    library_module(__spec__)
