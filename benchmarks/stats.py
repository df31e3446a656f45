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
# Fewest samples (or rounds) from which median_ci covers the median with >= 95 % probability: below 11 it is their
# whole range, which covers it with probability 1 - 2 * 0.5**n (0.97 at 6, but 0.94 at 5 and 0.5 at 2).
MIN_CI_ROUNDS = 6


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
        # null for a zero median (a Server-Timing stage recorded as 0.000 ms): no ratio, and strict JSON has no inf.
        "rel_spread": float((p75 - p25) / p50) if p50 > 0 else None,
    }


# Fewest samples a percentile needs to be printed unmarked: from fewer, numpy's linear interpolation puts p90 / p99
# between the two largest samples (p99 of 1..10 is 9.91), so it says nothing about the tail beyond the maximum.
MIN_SAMPLES_FOR = {"p90": 10, "p99": 100}
THIN_MARK = "†"
THIN_NOTE = (f"{THIN_MARK} p90 from fewer than {MIN_SAMPLES_FOR['p90']} samples, p99 from fewer than "
             f"{MIN_SAMPLES_FOR['p99']}: it lies between the two largest samples, not a measured tail")


def thin(key: str, n: int | None) -> bool:
    """Whether percentile `key` ("p50", "p90", "p99") of `n` samples is too thin to mean anything (n unknown: no)."""
    return n is not None and n < MIN_SAMPLES_FOR.get(key, 0)


def marked(text: str, key: str, n: int | None) -> str:
    """`text` (a printed percentile) with THIN_MARK when it comes from too few samples."""
    return text + THIN_MARK if thin(key, n) else text


# Raw samples kept per series in a results file: all of them up to this many, else an even subset (every k-th).
MAX_RAW_SAMPLES = 1000


def raw_samples(samples: Sequence[float] | np.ndarray, cap: int = MAX_RAW_SAMPLES) -> dict[str, Any]:
    """The samples themselves, bounded, so a results file's percentiles can be recomputed: `values` holds them in
    their original order at 5 significant digits as one space-separated string (one line of JSON, not thousands),
    every `every`-th of the `n` when there are more than `cap` (then the percentiles are recomputed approximately)."""
    x = _array(samples)
    every = max(1, math.ceil(x.size / cap))
    kept = x[::every]
    return {"n": int(x.size), "every": every, "kept": int(kept.size),
            "values": " ".join(f"{v:.5g}" for v in kept)}


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
    *,
    min_rounds: int = 2,
    min_reps: int = 1,
) -> dict[str, Any]:
    """ViT_C / ViT_P latency ratio, its interval, and a verdict against 1 +- tolerance, all from one estimator.

    With interleaved rounds the ratio is the median per-round ratio (each round's C and P ran within a second of
    each other, so the machine's drift cancels) and the interval that median's CI; without, the ratio of the two
    medians and the ratio of their CIs (conservative). The verdict is "parity" when the interval lies within
    1 +- tolerance, "C slower" / "C faster" when it lies wholly outside, else "inconclusive". Under MIN_CI_ROUNDS
    rounds (or samples) the interval is only their range, so the verdict is "indicative: ..." (not firm). Under
    `min_rounds` rounds (at least 2: one value is no interval) or `min_reps` calls of either model (the timing
    budget's minimums, which a cell that ran out of time misses) the verdict is "inconclusive" whatever the
    interval, and "too_few" says what was missing.
    """
    c, p = _array(c_samples), _array(p_samples)
    if len(round_ratios) >= 1:
        ratios = _array(round_ratios)
        ratio, interval, n = float(np.median(ratios)), list(median_ci(ratios)), int(ratios.size)
        estimator = "median per-round ratio"
        kind = "95% CI" if n >= MIN_CI_ROUNDS else f"range of {n} round{'s' if n > 1 else ''}"
        unit = "round"
    else:
        ratio = float(np.median(c)) / float(np.median(p))
        (c_lo, c_hi), (p_lo, p_hi) = median_ci(c), median_ci(p)
        interval, n = [c_lo / p_hi, c_hi / p_lo], int(min(c.size, p.size))
        estimator = "ratio of medians"
        kind = "from the medians' 95% CIs" if n >= MIN_CI_ROUNDS else f"from the ranges of {n} samples"
        unit = "sample"
    too_few = []
    if n < max(2, min_rounds):
        too_few.append(f"{n} {unit}{'s' if n != 1 else ''} of {max(2, min_rounds)}")
    if min(c.size, p.size) < min_reps:
        too_few.append(f"{c.size}/{p.size} calls of {min_reps}")
    firm = n >= MIN_CI_ROUNDS and not too_few
    verdict = "inconclusive" if too_few else _verdict(interval, tolerance)
    if not firm and verdict != "inconclusive":
        verdict = f"indicative: {verdict}"
    return {"ratio": ratio, "interval": interval, "interval_kind": kind, "estimator": estimator, "firm": firm,
            "flagged": abs(ratio - 1) > tolerance, "verdict": verdict, "tolerance": tolerance,
            "too_few": "too few: " + ", ".join(too_few) if too_few else None,
            "round_ratios": [float(x) for x in round_ratios]}


def _verdict(interval: list[float], tolerance: float) -> str:
    lo, hi = interval
    if lo > 1 + tolerance:
        return "C slower"
    if hi < 1 - tolerance:
        return "C faster"
    if 1 - tolerance <= lo and hi <= 1 + tolerance:
        return "parity"
    return "inconclusive"


def achieved_gflops(macs_per_image: int, batch: int, latency_s: float) -> float:
    """Achieved GFLOP/s counting 2 flops per multiply-add, the same convention as the matmul limit."""
    if latency_s <= 0:
        raise ValueError(f"latency must be positive, got {latency_s}")
    return 2.0 * macs_per_image * batch / latency_s / 1e9


if __name__ == "__main__":
    from benchmarks.library import library_module

    library_module(__spec__)
