"""Robust summaries of timing samples: percentiles, spread, a distribution-free median CI, and C/P ratios.

Pure numpy and hand-checkable, so the benchmark's statistics are unit-tested on numbers a reader can verify.
Percentiles use numpy's default linear interpolation; the median's 95 % confidence interval comes from order
statistics (no bootstrap, no normality assumption): ranks n/2 - 1.96 * sqrt(n) / 2 and
1 + n/2 + 1.96 * sqrt(n) / 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

# Beyond this relative distance from 1 the C/P latency ratio is flagged (the paper's parity claim, +-5 %).
PARITY_TOLERANCE = 0.05


def _array(samples: Sequence[float] | np.ndarray) -> np.ndarray:
    x = np.asarray(samples, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("no samples to summarise")
    if not np.all(np.isfinite(x)):
        raise ValueError("samples must be finite")
    return x


def median_ci(samples: Sequence[float] | np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """Distribution-free CI of the median from order statistics (the whole range when n is tiny)."""
    x = np.sort(_array(samples))
    n = x.size
    half = z * math.sqrt(n) / 2
    # 1-based ranks j = floor(n/2 - half) and k = ceil(1 + n/2 + half), clamped to the sample.
    lo = max(0, math.floor(n / 2 - half) - 1)
    hi = min(n - 1, math.ceil(1 + n / 2 + half) - 1)
    return float(x[lo]), float(x[hi])


def summarize(samples: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """p50/p90/p99, mean, min/max, IQR, MAD, median CI and relative spread (IQR / median) of the samples."""
    x = _array(samples)
    p25, p50, p75, p90, p99 = np.percentile(x, [25, 50, 75, 90, 99])
    lo, hi = median_ci(x)
    return {
        "n": int(x.size),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "mean": float(x.mean()),
        "min": float(x.min()),
        "max": float(x.max()),
        "iqr": float(p75 - p25),
        "mad": float(np.median(np.abs(x - p50))),
        "ci95": [lo, hi],
        "rel_spread": float((p75 - p25) / p50) if p50 > 0 else math.inf,
    }


def median_is_stable(samples: Sequence[float] | np.ndarray, rel_halfwidth: float) -> bool:
    """True when the median's 95 % CI half-width is within `rel_halfwidth` of the median (and n >= 5)."""
    x = _array(samples)
    if x.size < 5:
        return False
    lo, hi = median_ci(x)
    med = float(np.median(x))
    return med > 0 and (hi - lo) / 2 <= rel_halfwidth * med


def ratio_summary(
    c_samples: Sequence[float] | np.ndarray,
    p_samples: Sequence[float] | np.ndarray,
    round_ratios: Sequence[float] = (),
    tolerance: float = PARITY_TOLERANCE,
) -> dict[str, Any]:
    """ViT_C / ViT_P median-latency ratio, its interval, and whether it is flagged outside 1 +- tolerance.

    With interleaved rounds, the interval is the 95 % CI of the median per-round ratio (each round's C and P
    ran within a second of each other, so the machine's drift cancels in the ratio); without, it is the ratio
    of the two medians' CIs (conservative). The verdict is "parity" when the interval lies within 1 +- tolerance,
    "C slower" / "C faster" when it lies wholly outside, else "inconclusive".
    """
    c_med, p_med = float(np.median(_array(c_samples))), float(np.median(_array(p_samples)))
    ratio = c_med / p_med
    if len(round_ratios) >= 2:
        interval = list(median_ci(round_ratios))
    else:
        (c_lo, c_hi), (p_lo, p_hi) = median_ci(c_samples), median_ci(p_samples)
        interval = [c_lo / p_hi, c_hi / p_lo]
    flagged = abs(ratio - 1) > tolerance
    if interval[0] > 1 + tolerance:
        verdict = "C slower"
    elif interval[1] < 1 - tolerance:
        verdict = "C faster"
    elif 1 - tolerance <= interval[0] and interval[1] <= 1 + tolerance:
        verdict = "parity"
    else:
        verdict = "inconclusive"
    return {"ratio": ratio, "interval": interval, "flagged": flagged, "verdict": verdict, "tolerance": tolerance,
            "round_ratios": [float(x) for x in round_ratios]}


def achieved_gflops(macs_per_image: int, batch: int, latency_s: float) -> float:
    """Achieved GFLOP/s counting 2 flops per multiply-add, the same convention as the matmul limit."""
    if latency_s <= 0:
        raise ValueError(f"latency must be positive, got {latency_s}")
    return 2.0 * macs_per_image * batch / latency_s / 1e9
