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


def _grid_index(x: float, digits: int = SIG_DIGITS) -> int:
    """Position of round_sig(x) on the grid of `digits`-significant-digit values (consecutive values differ by 1)."""
    mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
    steps = 10 ** (digits - 1)  # e.g. 100: 1.00, 1.01, ... 9.99 are 900 steps per decade
    return 9 * steps * int(exponent) + round(float(mantissa) * steps) - steps


def distinct_values(low: float, high: float, digits: int = SIG_DIGITS) -> int:
    """How many rounded values a log-uniform draw on [low, high] can give (rounding is monotone: every grid value
    from round_sig(low) to round_sig(high))."""
    return _grid_index(high, digits) - _grid_index(low, digits) + 1


# Repeated pairs are replaced by further rounds of n draws; this many rounds without n distinct pairs means some of
# them are all but unreachable (a range ending just past a rounding boundary), not bad luck.
MAX_REDRAWS = 1000


def sample_lr_wd(
    n: int, lr_range: tuple[float, float], wd_range: tuple[float, float], seed: int
) -> list[tuple[float, float]]:
    """n distinct (lr, wd) pairs, lr and wd independent and log-uniform, rounded; the same seed gives the same pairs.

    A pair drawn again is dropped and replaced by further draws of the same generator, so samples without repeats
    are exactly the first n drawn; ValueError when the ranges cannot give n distinct pairs at SIG_DIGITS."""
    available = distinct_values(*lr_range) * distinct_values(*wd_range)
    if n > available:
        raise ValueError(f"only {available} distinct (lr, wd) pairs at {SIG_DIGITS} significant digits")
    rng = np.random.default_rng(seed)
    pairs: dict[tuple[float, float], None] = {}  # insertion-ordered: the first n distinct pairs drawn
    for _ in range(MAX_REDRAWS):
        # Each round draws n lrs, then n wds: a first round without repeats is the whole plan, as before re-draws.
        for lr, wd in zip(log_uniform(rng, *lr_range, n), log_uniform(rng, *wd_range, n), strict=True):
            if len(pairs) < n:
                pairs.setdefault((round_sig(lr), round_sig(wd)))
        if len(pairs) == n:
            return list(pairs)
    raise ValueError(f"{n} distinct (lr, wd) pairs not found in {MAX_REDRAWS * n} draws: some of the "
                     f"{available} the ranges give at {SIG_DIGITS} significant digits are all but unreachable")
