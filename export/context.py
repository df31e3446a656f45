"""What every runtime exporter shares: the error type, target names, and the per-export context.

The context holds the loaded checkpoint, the bundle's temp directory, and lazily built shared inputs: the fp32
ONNX "hub" file that OpenVINO and TensorRT are converted from, and the calibration images (real TRAIN images,
preprocessed exactly as the server will) used by every INT8 quantiser.
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.preprocessing import preprocess

if TYPE_CHECKING:
    from torch import nn

    from models.checkpoint import CheckpointMeta
    from train.data import ImageSet

PRECISIONS = ("fp32", "fp16", "int8")
# Target family -> (manifest runtime, precisions built when the family is named alone, precisions allowed).
FAMILIES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "torch": ("torch", ("fp32",), ("fp32",)),
    "onnx": ("onnxruntime", ("fp32",), ("fp32", "fp16", "int8")),
    "openvino": ("openvino", ("fp32", "fp16", "int8"), ("fp32", "fp16", "int8")),
    "tensorrt": ("tensorrt", ("fp16",), ("fp32", "fp16", "int8")),
}
INPUT_NAME = "input"
OUTPUT_NAME = "logits"

Runner = Callable[[np.ndarray], np.ndarray]  # (B, 3, H, W) float32 -> (B, classes) float32


class ExportError(ValueError):
    """A user-facing export failure: bad checkpoint, target, output path or missing runtime (CLI exit 2)."""


@dataclass(frozen=True)
class Target:
    """One artifact to build: a family ("onnx", "openvino", ...) at one precision."""

    family: str
    precision: str

    @property
    def id(self) -> str:
        return f"{self.family}-{self.precision}"

    @property
    def runtime(self) -> str:
        return FAMILIES[self.family][0]


def known_targets() -> list[str]:
    """Every accepted target name, for error messages and --help."""
    names = []
    for family, (_, _, allowed) in FAMILIES.items():
        names += [family] + [f"{family}-{p}" for p in allowed]
    return names


def parse_targets(names: Sequence[str]) -> list[Target]:
    """Target names ("openvino", "openvino-int8", ...) -> de-duplicated Targets; raises ExportError."""
    out: list[Target] = []
    for raw in names:
        name = raw.strip().lower()
        family, _, precision = name.partition("-")
        if family not in FAMILIES or (precision and precision not in FAMILIES[family][2]):
            raise ExportError(f"unknown target {raw!r}; known: {', '.join(known_targets())}")
        for p in (precision,) if precision else FAMILIES[family][1]:
            if Target(family, p) not in out:
                out.append(Target(family, p))
    if not out:
        raise ExportError(f"no targets given; known: {', '.join(known_targets())}")
    return out


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' stdout chatter and warnings (our own progress lines say what happens)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def import_nncf():  # noqa: ANN201 - the nncf module
    """Import NNCF without its torch backend's "no CUDA runtime" log line (irrelevant to ONNX/OpenVINO)."""
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import nncf

    return nncf


@dataclass
class ExportContext:
    """Inputs shared by the runtime exporters of one bundle."""

    model: nn.Module
    meta: CheckpointMeta
    workdir: Path  # the bundle's temp directory (renamed into place at the end)
    max_batch: int
    opset: int
    calibration_set: Callable[[], ImageSet]  # lazily loaded TRAIN images
    calibration_samples: int = 300
    threads: int | None = None  # CPU threads for the runtimes' parity sessions (None: their default)
    timings: dict[str, float] = field(default_factory=dict)
    _hub: Path | None = None
    _calibration: ImageSet | None = None

    @property
    def scratch(self) -> Path:
        """Intermediate files (removed before the bundle is finalised)."""
        path = self.workdir / ".scratch"
        path.mkdir(exist_ok=True)
        return path

    @property
    def image_size(self) -> int:
        return self.meta.config.image_size

    def hub_onnx(self) -> Path:
        """The fp32 ONNX every other format is converted from; exported once per bundle."""
        if self._hub is None:
            from export import onnx as onnx_export

            start = time.perf_counter()
            self._hub = onnx_export.export_torch(self.model, self.scratch / "hub.onnx", self.image_size, self.opset)
            self.timings["onnx_hub_seconds"] = round(time.perf_counter() - start, 3)
        return self._hub

    def calibration_images(self) -> ImageSet:
        """A deterministic subset of the TRAIN split (never validation images) for INT8 calibration."""
        if self._calibration is None:
            self._calibration = self.calibration_set().subset(self.calibration_samples, seed=1)
        return self._calibration

    def calibration_batches(self) -> Iterator[np.ndarray]:
        """Calibration images one at a time as (1, 3, H, W) float32, preprocessed like the server does."""
        images = self.calibration_images()
        for i in range(len(images)):
            yield preprocess([images.image(i)], self.meta.preprocessing)

    def calibration_info(self) -> dict[str, Any]:
        """What the INT8 artifacts were calibrated on, for the manifest."""
        images = self.calibration_images()
        return {"dataset": images.name, "split": images.split, "samples": len(images)}


@dataclass
class Built:
    """What a runtime exporter produced: the artifact's files (inside the bundle) and manifest extras."""

    files: list[Path]
    info: dict[str, Any] = field(default_factory=dict)
