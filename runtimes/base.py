"""The runtime contract: what one runtime module declares (`Runtime`), what it opens (`Backend`), and with what.

Every runtime module (runtimes/onnxruntime.py, openvino.py, tensorrt.py, pytorch.py) defines one `RUNTIME` and
imports its own package only inside functions, so a CPU image without TensorRT or torch imports every module, and a
runtime that is not installed is one clear error when it is asked for. Export builds artifacts through
`Runtime.build` (runtimes/build.py: what it is handed); the parity gate, the server and the benchmarks all open
them through `Runtime.load`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np

from models.bundle import Artifact, Manifest
from models.cli import installed

if TYPE_CHECKING:
    from runtimes.build import Built, ExportContext

INPUT_NAME = "input"  # the tensor names export gives every artifact
OUTPUT_NAME = "logits"
DEVICE_RE = re.compile(r"^(cpu|cuda(:\d{1,2})?)$")
HINTS = ("throughput", "latency")


class BackendError(RuntimeError):
    """A runtime that is not installed, cannot run on the requested device, or cannot load its artifact."""


@runtime_checkable
class Backend(Protocol):
    """A loaded artifact: thread-safe `infer` for up to `max_batch` rows, `parallelism` calls at once."""

    runtime: str
    precision: str
    device: str
    max_batch: int
    parallelism: int

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(B, C, H, W) float32 -> (B, num_classes) float32 logits."""
        ...

    def describe(self) -> dict[str, Any]:
        """What really runs: effective threads, precision hint, providers (for reports and benchmarks)."""
        ...

    def close(self) -> None:
        """Release runtime resources."""
        ...


@dataclass(frozen=True)
class BackendOptions:
    """How to run an artifact; None means the runtime's own sensible default."""

    device: str = "cpu"  # cpu | cuda | cuda:N
    threads: int | None = None  # intra-op threads of one inference
    parallel: int | None = None  # concurrent infer calls (OpenVINO infer requests, onnxruntime CPU streams)
    # Performance hint: "throughput" splits the CPU into streams with several batches in flight (OpenVINO's
    # THROUGHPUT hint, onnxruntime's streams); "latency" runs one batch at a time on every core.
    hint: Literal["throughput", "latency"] = "throughput"
    # Compute precision beyond what the artifact stores: OpenVINO's INFERENCE_PRECISION_HINT ("bf16"), torch
    # autocast ("bf16", "fp16"). None: the precision the artifact's parity gate measured.
    inference_precision: str | None = None
    # torch: torch.compile (on CUDA with a CUDA graph per batch bucket, captured at load); NHWC activations for the
    # stem's convolutions (None: on CUDA, where cuDNN runs them fastest).
    compile: bool = False
    channels_last: bool | None = None
    # The batch sizes a compiled model is captured at (each call is padded up to one); None: powers of two up to
    # the bundle's max batch. Fewer buckets, shorter start: a benchmark captures only the sizes it times.
    buckets: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not DEVICE_RE.match(self.device):
            raise BackendError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.hint not in HINTS:
            raise BackendError(f"hint must be one of {', '.join(HINTS)}, got {self.hint!r}")
        if self.buckets is not None and not (self.buckets and all(
                isinstance(b, int) and 1 <= b <= 4096 for b in self.buckets)):
            raise BackendError(f"buckets must be batch sizes in 1..4096, got {self.buckets!r}")
        for name in ("threads", "parallel"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 1 <= value <= 1024):
                raise BackendError(f"{name} must be an integer in 1..1024, got {value!r}")

    @property
    def device_kind(self) -> str:
        """"cpu" or "cuda"."""
        return self.device.partition(":")[0]

    @property
    def device_index(self) -> int:
        """N of cuda:N (0 for plain cuda)."""
        return int(self.device.partition(":")[2] or 0)


@dataclass(frozen=True)
class LoadSpec:
    """Everything a runtime needs to open one artifact, its files already verified against the manifest."""

    manifest: Manifest  # during export: the bundle's header, before its artifacts are listed
    artifact: Artifact
    files: tuple[Path, ...]
    options: BackendOptions = field(default_factory=BackendOptions)

    @property
    def input_name(self) -> str:
        return self.manifest.input.name

    @property
    def output_name(self) -> str:
        return self.manifest.output.name

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.manifest.input.sample_shape

    @property
    def num_classes(self) -> int:
        return self.manifest.output.classes

    @property
    def max_batch(self) -> int:
        return self.manifest.input.max_batch

    @property
    def precision(self) -> str:
        return self.artifact.precision

    @property
    def device(self) -> str:
        return self.options.device

    def file(self, suffix: str) -> Path:
        """The artifact file ending in `suffix`; BackendError if the artifact has none."""
        for p in self.files:
            if p.name.endswith(suffix):
                return p
        raise BackendError(f"artifact {self.artifact.id!r} has no *{suffix} file")


@dataclass(frozen=True)
class Variant:
    """One way to run a runtime, as the benchmarks time it: a compute precision on a device."""

    precision: str
    device: str = "cpu"
    artifact: str | None = None  # artifact precision it runs (default: `precision`)
    inference_precision: str | None = None  # the BackendOptions.inference_precision it needs
    compile: bool = False  # BackendOptions.compile
    channels_last: bool | None = None  # BackendOptions.channels_last (None: the runtime's default)

    @property
    def artifact_precision(self) -> str:
        return self.artifact or self.precision

    @property
    def suffix(self) -> str:
        """What tells it apart from the plain variant of its precision: "-compiled", "-nchw", "-nhwc"."""
        layout = {None: "", False: "-nchw", True: "-nhwc"}[self.channels_last]
        return f"{'-compiled' if self.compile else ''}{layout}"


@dataclass(frozen=True)
class Runtime:
    """Everything the project knows about one runtime. Each runtime module defines one as `RUNTIME`."""

    name: str  # manifest "runtime" and the server's --backend value
    target: str  # export target family: `python -m export --targets <target>[-<precision>]`
    packages: tuple[str, ...]  # importable modules it needs
    install: str  # how to get them (printed when they are missing)
    format: str  # manifest "format" of its artifacts
    triton_platform: str  # Open Inference Protocol / Triton platform name
    precisions: tuple[str, ...]  # artifact precisions `build` makes
    default_precisions: tuple[str, ...]  # built when the target is named without a precision
    devices: tuple[str, ...]  # device kinds `load` runs on
    build: Callable[[ExportContext, str], Built]
    load: Callable[[LoadSpec], Backend]
    version: Callable[[], str]
    variants: tuple[Variant, ...] = ()  # benchmark targets
    export_device: str = "cpu"  # where the export's parity gate runs its artifacts
    needs_hub: bool = False  # `build` converts from the fp32 ONNX hub (ExportContext.hub_onnx)
    # An artifact of another runtime it can open when the bundle has none of its own (TensorRT: the ONNX file).
    fallback: tuple[str, str] | None = None
    unavailable: Callable[[str], str | None] = lambda _device: None  # why it cannot run on a device, or None
    # Per-op-type milliseconds of one artifact at a batch size (spec, batch, reps), where the runtime can tell.
    profile: Callable[[LoadSpec, int, int], dict[str, float]] | None = None
    # Triton: the backend that serves this runtime's artifacts, the file names it expects (artifact file suffix ->
    # name in the version directory; other files keep theirs).
    triton_backend: str | None = None  # None: Triton cannot serve these artifacts
    triton_files: tuple[tuple[str, str], ...] = ()
    # The server's tuning settings it honours beyond the device (of threads, parallel, openvino_hint, compile,
    # channels_last): the server refuses the others for it rather than let them silently do nothing.
    tunes: tuple[str, ...] = ()

    def installed(self) -> bool:
        """Whether every package it needs can be imported (checked without importing them)."""
        return all(installed(p) for p in self.packages)

    def require(self, device: str) -> None:
        """Raise BackendError unless this runtime is installed and can run on `device` here."""
        if not self.installed():
            raise BackendError(f"{self.name} is not installed (needs {', '.join(self.packages)}): {self.install}")
        check_device(device, self.devices, self.name)
        reason = self.unavailable(device)
        if reason:
            raise BackendError(f"{self.name} cannot run on {device}: {reason}")


def check_device(device: str, supported: tuple[str, ...], runtime: str) -> None:
    """Raise BackendError unless `device` ("cpu", "cuda" or "cuda:N") is one the runtime serves."""
    if not DEVICE_RE.match(device):
        raise BackendError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if device.partition(":")[0] not in supported:
        raise BackendError(f"the {runtime} backend runs on {' or '.join(supported)}, not {device!r}")


# OpenVINO's messages start with where in its sources they were raised ("Exception from src/.../core.cpp:117:"),
# and the reason follows on the next lines.
_SOURCE_LOCATION = re.compile(r"^(Exception from \S+:\d+:?|Check '.*' failed at \S+:\d+:?)$")


def first_line(exc: BaseException) -> str:
    """An exception as one readable line (the first that is not a source location): its type when it has no
    message."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    reason = next((ln for ln in lines if not _SOURCE_LOCATION.match(ln)), lines[0] if lines else "")
    return reason or type(exc).__name__
