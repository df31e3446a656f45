"""Parity of an exported artifact against the PyTorch model, on real validation images, with per-precision gates.

Measured on the checkpoint's own validation split (never random tensors):
- logits error vs torch fp32: max abs, and max abs relative to the reference logit scale (max |logit|);
- top-1 agreement with torch, and top-1 accuracy of the artifact vs torch's on the same images;
- batch sizes 1, 2, an odd one and the max all run, and every sample's output in a batch must match its
  output when sent alone (batch invariance).
An artifact passes when every number is inside its precision's Tolerance; otherwise it is refused.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np

from models.bundle import Parity
from models.jsonfields import finite_or_none
from models.tolerance import (  # noqa: F401 - the gates' home; re-exported for export's callers
    BF16_TOLERANCE,
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    INT8_TOLERANCE,
    TOLERANCES,
    Tolerance,
)
from runtimes.base import check_logits

Runner = Callable[[np.ndarray], np.ndarray]  # (B, 3, H, W) float32 -> (B, classes) float32
ODD_BATCH = 7
Z95 = 1.96  # the normal quantile of a two-sided 95 % interval


def batch_sizes(max_batch: int) -> list[int]:
    """1, 2, an odd size and the max (deduplicated, within 1..max_batch)."""
    odd = min(ODD_BATCH, max_batch)
    odd -= 0 if odd % 2 else 1
    return sorted({b for b in (1, 2, odd, max_batch) if 1 <= b <= max_batch})


def run_batched(run: Runner, x: np.ndarray, batch: int, classes: int) -> np.ndarray:
    """Logits of every row of x, in chunks of `batch`, each checked as the server checks a batch (`check_logits`:
    BackendError, one line, unless float logits of shape (rows, classes))."""
    # Unchecked, a Backend answering one row per batch failed the gate with numpy's broadcasting error.
    return np.concatenate([check_logits(run(x[i : i + batch]), len(x[i : i + batch]), classes)
                           for i in range(0, len(x), batch)])


@dataclass
class ParityData:
    """Preprocessed validation images, their labels, and the torch fp32 reference logits."""

    x: np.ndarray  # (N, 3, H, W) float32
    labels: np.ndarray  # (N,) int64
    reference: np.ndarray  # (N, classes) float32
    dataset: str
    split: str = "val"

    @property
    def reference_accuracy(self) -> float:
        return float((self.reference.argmax(1) == self.labels).mean())

    def fingerprint(self) -> str:
        """sha256 of the exact preprocessed images and labels the gates measure on."""
        h = hashlib.sha256(np.ascontiguousarray(self.x, "<f4").tobytes())
        h.update(np.ascontiguousarray(self.labels, "<i8").tobytes())
        return h.hexdigest()


def measure(run: Runner, data: ParityData, precision: str, max_batch: int,
            tolerance: Tolerance | None = None) -> Parity:
    """All parity numbers for one artifact, `passed`, and, if it failed, `failures` (one line each)."""
    tol = tolerance or TOLERANCES[precision]
    ref = data.reference
    classes = ref.shape[1]
    out = run_batched(run, data.x, max_batch, classes)
    sizes = batch_sizes(max_batch)
    # The batch-size check reuses the first images (cycled when fewer than the max batch were given).
    idx = np.resize(np.arange(len(data.x)), max(sizes))
    xs, ref_s = data.x[idx], ref[idx]
    alone = run_batched(run, xs, 1, classes)
    invariance: float | None = 0.0
    max_abs = float(np.abs(out - ref).max()) if len(out) else 0.0
    finite = bool(np.isfinite(out).all() and np.isfinite(alone).all())
    for b in sizes:
        batched = run_batched(run, xs[:b], b, classes)
        finite &= bool(np.isfinite(batched).all())
        invariance = _worst(invariance, _max_diff(batched, alone[:b]))
        max_abs = max(max_abs, float(np.abs(batched - ref_s[:b]).max()))
    scale = float(np.abs(ref).max())
    right, reference_right = out.argmax(1) == data.labels, ref.argmax(1) == data.labels
    accuracy = float(right.mean())
    # JSON has no NaN/inf: a non-finite error is recorded as null (and `gate` fails it as non-finite logits).
    finite_err = finite_or_none(max_abs) if finite else None
    result = Parity(
        dataset=data.dataset, split=data.split, val_samples=len(data.x), batch_sizes=tuple(sizes),
        max_abs_err=finite_err,
        max_rel_err=None if finite_err is None or scale <= 0 else finite_err / scale,
        reference_logit_scale=scale, top1_agreement=float((out.argmax(1) == ref.argmax(1)).mean()),
        accuracy=accuracy, reference_accuracy=data.reference_accuracy,
        accuracy_delta=accuracy - data.reference_accuracy, batch_invariance_max_abs=invariance,
        tolerance=asdict(tol), passed=False, accuracy_delta_ci95=paired_ci95(right, reference_right),
    )
    failures = degenerate(ref) + gate(result, tol)
    return replace(result, passed=not failures, failures=tuple(failures))


def _max_diff(a: np.ndarray, b: np.ndarray) -> float | None:
    """max |a - b|; None (not measurable) where either holds a non-finite value: inf - inf is NaN, and a NaN lost in
    `max` recorded an artifact of infinite logits as perfectly batch-invariant."""
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return None
    return float(np.abs(a.astype(np.float64) - b).max()) if a.size else 0.0  # in float64: no overflow either


def _worst(so_far: float | None, new: float | None) -> float | None:
    """The larger of two differences; None once either was not measurable."""
    return None if so_far is None or new is None else max(so_far, new)


def paired_ci95(right: np.ndarray, reference_right: np.ndarray) -> float | None:
    """Half-width of the 95 % interval of accuracy(`right`) - accuracy(`reference_right`), both per image of the
    same images (None for no images)."""
    # Paired: the artifact and torch answer the same images, so only the images where exactly one of them is right
    # (b: the artifact, c: torch) move the delta; the interval of two independent accuracies would be far wider.
    n = len(right)
    if n == 0:
        return None
    b = int(np.count_nonzero(right & ~reference_right))
    c = int(np.count_nonzero(reference_right & ~right))
    return Z95 * math.sqrt(max(0.0, b + c - (b - c) ** 2 / n)) / n


def degenerate(reference: np.ndarray) -> list[str]:
    """Why torch's reference logits cannot certify anything (empty when they can): the same logits for every
    image (an untrained, zero-initialised head), or every class tied for most images. Against such a reference
    any artifact would agree 100 %, which would mean nothing."""
    if len(reference) == 0:
        return ["no reference images"]
    tol = 1e-6 * max(1.0, float(np.abs(reference).max()))
    if len(reference) > 1 and float(np.ptp(reference, axis=0).max()) <= tol:
        return ["torch's logits are the same for every image (an untrained head?): parity cannot be certified"]
    if float((np.ptp(reference, axis=1) <= tol).mean()) > 0.5:
        return ["torch's logits tie every class for most images: parity cannot be certified"]
    return []


def gate(r: Parity, tol: Tolerance) -> list[str]:
    """Reasons the numbers in `r` fail `tol` (empty when they pass)."""
    if r.max_abs_err is None or r.batch_invariance_max_abs is None:
        return ["non-finite logits"]
    scale = r.reference_logit_scale
    bound, batch_bound = tol.logit_bound(scale), tol.batch_bound(scale)
    failures = []
    if bound is not None and not r.max_abs_err <= bound:
        failures.append(f"max abs logit error {r.max_abs_err:.3g} > {bound:.3g}")
    if r.top1_agreement < tol.min_top1_agreement:
        failures.append(f"top-1 agreement {r.top1_agreement:.2%} < {tol.min_top1_agreement:.2%}")
    drop = r.reference_accuracy - r.accuracy
    # A tiny epsilon so an exact tie is not refused by float rounding of the two means.
    if drop > tol.max_accuracy_drop + 1e-9:
        failures.append(f"accuracy {r.accuracy:.2%} is {drop * 100:.2f} points below torch's "
                        f"{r.reference_accuracy:.2%} (allowed {tol.max_accuracy_drop * 100:.2f})")
    if not r.batch_invariance_max_abs <= batch_bound:
        failures.append(f"batch invariance error {r.batch_invariance_max_abs:.3g} > {batch_bound:.3g}")
    return failures
