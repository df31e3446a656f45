"""The backend contract: `infer(NCHW float32) -> logits float32`, and a loader that verifies before it loads.

Every runtime lives in its own module and imports its package inside `load`, so a CPU image without
TensorRT or torch still imports this package, and choosing a runtime that is not installed is one clear error.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from export.manifest import BundleError, select_artifact, verify_files

# runtime -> (module implementing it, package it imports, how to install it)
_RUNTIMES: dict[str, tuple[str, str, str]] = {
    "onnxruntime": ("serve.backends.onnxruntime", "onnxruntime", "pip install 'vitc[serve]'"),
    "openvino": ("serve.backends.openvino", "openvino", "pip install 'vitc[serve]'"),
    "tensorrt": ("serve.backends.tensorrt", "tensorrt", "pip install 'vitc[gpu]' on a machine with an NVIDIA GPU"),
    "torch": ("serve.backends.torch_backend", "torch", "pip install 'vitc[train]'"),
}
# TensorRT engines are specific to one GPU: without a prebuilt engine the backend builds one from the ONNX hub.
_FALLBACK_ARTIFACT = {"tensorrt": "onnxruntime"}
RUNTIMES = tuple(_RUNTIMES)


class BackendError(RuntimeError):
    """A backend that is not installed, cannot run on the requested device, or cannot load its artifact."""


@runtime_checkable
class Backend(Protocol):
    """A loaded model: thread-safe `infer` for up to `max_batch` rows, `parallelism` calls at once."""

    runtime: str
    precision: str
    device: str
    max_batch: int
    parallelism: int

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(B, C, H, W) float32 -> (B, num_classes) float32 logits."""
        ...

    def close(self) -> None:
        """Release runtime resources."""
        ...


@dataclass(frozen=True)
class BackendOptions:
    """Runtime knobs; None means the backend's own sensible default."""

    threads: int | None = None  # intra-op threads of one inference
    parallel: int | None = None  # concurrent infer calls (OpenVINO infer requests)
    hint: str = "throughput"  # OpenVINO performance hint: throughput | latency


@dataclass(frozen=True)
class LoadSpec:
    """Everything a runtime module needs to build its backend, already verified."""

    bundle: Path
    manifest: dict[str, Any]
    artifact: dict[str, Any]
    files: list[Path]
    device: str
    options: BackendOptions = field(default_factory=BackendOptions)
    requested_precision: str | None = None

    @property
    def input_name(self) -> str:
        return self.manifest["input"].get("name", "input")

    @property
    def output_name(self) -> str:
        return self.manifest.get("output", {}).get("name", "logits")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample."""
        spec = self.manifest["input"]
        return int(spec.get("channels", 3)), int(spec["height"]), int(spec["width"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["class_names"])

    @property
    def max_batch(self) -> int:
        return int(self.manifest["input"].get("max_batch", 64))

    @property
    def precision(self) -> str:
        return str(self.artifact.get("precision", "fp32"))

    def file(self, suffix: str) -> Path:
        """The artifact file ending in `suffix`; BackendError if the artifact has none."""
        for p in self.files:
            if p.name.endswith(suffix):
                return p
        raise BackendError(f"artifact {self.artifact.get('id')!r} has no *{suffix} file")


def default_threads() -> int:
    """CPUs this process may run on (respects container CPU sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def check_device(device: str, supported: tuple[str, ...], runtime: str) -> None:
    """Raise BackendError unless `device` ("cpu", "cuda" or "cuda:N") is one the runtime serves."""
    if device.split(":")[0] not in supported:
        raise BackendError(f"the {runtime} backend runs on {' or '.join(supported)}, not {device!r}")


def installed(runtime: str) -> bool:
    """Whether the runtime's package can be imported (without importing it)."""
    return runtime in _RUNTIMES and importlib.util.find_spec(_RUNTIMES[runtime][1]) is not None


def _select(manifest: dict[str, Any], runtime: str, precision: str | None) -> dict[str, Any]:
    try:
        return select_artifact(manifest, runtime, precision)
    except BundleError:
        fallback = _FALLBACK_ARTIFACT.get(runtime)
        if fallback is None:
            raise
        return select_artifact(manifest, fallback, "fp32")


def load_backend(
    bundle_dir: str | os.PathLike,
    manifest: dict[str, Any],
    runtime: str,
    device: str = "cpu",
    precision: str | None = None,
    options: BackendOptions | None = None,
) -> Backend:
    """Pick the servable artifact, verify its sha256, load it, and check one warm-up inference."""
    if runtime not in _RUNTIMES:
        raise BackendError(f"unknown backend {runtime!r}; known: {', '.join(_RUNTIMES)}")
    module_name, package, install = _RUNTIMES[runtime]
    if not installed(runtime):
        raise BackendError(f"backend {runtime!r} is not installed (no {package!r} package): {install}")
    artifact = _select(manifest, runtime, precision)
    files = verify_files(bundle_dir, artifact)
    spec = LoadSpec(Path(bundle_dir), manifest, artifact, files, device, options or BackendOptions(), precision)
    module = importlib.import_module(module_name)
    try:
        backend = module.load(spec)
    except (BackendError, BundleError):
        raise
    except Exception as exc:  # runtimes raise their own types; the caller needs one readable line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendError(f"{runtime} cannot load {artifact.get('id')!r} from {bundle_dir}: {first}") from exc
    warm_up(backend, spec)
    return backend


def warm_up(backend: Backend, spec: LoadSpec) -> float:
    """Run one batch-1 inference (first-call allocations happen now) and check the output shape; seconds."""
    x = np.zeros((1, *spec.input_shape), np.float32)
    t0 = time.perf_counter()
    y = backend.infer(x)
    dt = time.perf_counter() - t0
    if y.shape != (1, spec.num_classes):
        backend.close()
        raise BackendError(
            f"{spec.artifact.get('id')!r} returns shape {tuple(y.shape)} for one image, "
            f"but the manifest lists {spec.num_classes} classes"
        )
    return dt
