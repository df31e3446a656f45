"""Log-uniform sampling of learning rate and weight decay, reproducible from a seed (pycls-style random search)."""

from __future__ import annotations

import math

import numpy as np

# Sampled values are rounded so run ids and tables stay readable; 3 significant digits keep the
# distribution log-uniform to within 0.5 % of a decade.
SIG_DIGITS = 3


def round_sig(x: float, digits: int = SIG_DIGITS) -> float:
    """Round a positive float to `digits` significant digits."""
    return float(f"{x:.{digits}g}")


def log_uniform(rng: np.random.Generator, low: float, high: float, n: int) -> np.ndarray:
    """n values whose log10 is uniform on [log10 low, log10 high]."""
    if not (0 < low <= high) or not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"log-uniform range must satisfy 0 < low <= high, got [{low}, {high}]")
    if n < 0:
        raise ValueError(f"sample count must be >= 0, got {n}")
    return 10.0 ** rng.uniform(math.log10(low), math.log10(high), size=n)


def sample_lr_wd(
    n: int, lr_range: tuple[float, float], wd_range: tuple[float, float], seed: int
) -> list[tuple[float, float]]:
    """n (lr, wd) pairs, lr and wd independent and log-uniform, rounded; the same seed gives the same pairs."""
    rng = np.random.default_rng(seed)
    lrs = log_uniform(rng, *lr_range, n)
    wds = log_uniform(rng, *wd_range, n)
    return [(round_sig(lr), round_sig(wd)) for lr, wd in zip(lrs, wds, strict=True)]
