"""Parity tolerances per compute precision: how far an artifact's logits may move from torch fp32 and still be
served. On the ground floor because export gates artifacts with them and a runtime re-checks the bundle's golden
inputs with them when it computes in a lower precision than the artifact stores (OpenVINO bf16 on fp32 IR).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    """A precision's gate. Bounds follow np.allclose: |err| <= atol + rtol * max|reference logit|."""

    atol: float | None  # logit error vs torch; None = reported, not gated
    rtol: float | None
    min_top1_agreement: float  # fraction of samples whose top-1 equals torch's
    max_accuracy_drop: float  # torch top-1 accuracy minus the artifact's, as a fraction (0.01 = 1 point)
    batch_atol: float  # a sample alone vs inside a batch, same artifact
    batch_rtol: float

    def logit_bound(self, scale: float) -> float | None:
        return None if self.atol is None else self.atol + (self.rtol or 0.0) * scale

    def batch_bound(self, scale: float) -> float:
        return self.batch_atol + self.batch_rtol * scale


# fp32 must reproduce torch: other kernels only reorder sums. fp16 keeps ~3 significant digits, bf16 ~2 (8-bit
# mantissa; measured on the demo's mini models under torch autocast: 0.5-1.9 % of the logit scale, top-1 agreement
# >= 99.4 %, so its bounds are 2.5x that). INT8 is judged by what users see (accuracy at most 1 point below torch,
# top-1 mostly agreeing): its logits legitimately move by a quantisation step, so their error is reported, not
# gated. Batch invariance is gated for every precision; reduced precisions allow one rounding flip's worth.
FP32_TOLERANCE = Tolerance(atol=1e-4, rtol=1e-4, min_top1_agreement=1.0, max_accuracy_drop=0.0,
                           batch_atol=1e-4, batch_rtol=1e-4)
FP16_TOLERANCE = Tolerance(atol=1e-3, rtol=2e-2, min_top1_agreement=0.99, max_accuracy_drop=0.005,
                           batch_atol=1e-4, batch_rtol=1e-3)
BF16_TOLERANCE = Tolerance(atol=1e-2, rtol=5e-2, min_top1_agreement=0.98, max_accuracy_drop=0.01,
                           batch_atol=1e-3, batch_rtol=1e-2)
INT8_TOLERANCE = Tolerance(atol=None, rtol=None, min_top1_agreement=0.80, max_accuracy_drop=0.01,
                           batch_atol=1e-3, batch_rtol=5e-2)
TOLERANCES: dict[str, Tolerance] = {"fp32": FP32_TOLERANCE, "fp16": FP16_TOLERANCE, "bf16": BF16_TOLERANCE,
                                    "int8": INT8_TOLERANCE}
