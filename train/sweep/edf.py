"""Error distribution functions (EDF) of a population of runs, as in the paper and pycls's sweep analysis.

F(e) is the fraction of runs whose error is strictly below e. A tighter EDF (a curve that rises steeply
and early) means a model is less sensitive to the sampled hyperparameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def edf(errors: Sequence[float], e: float | Sequence[float]) -> np.ndarray:
    """F(e) = fraction of `errors` strictly below e, for a scalar or an array of thresholds."""
    errs = np.sort(np.asarray(errors, dtype=float))
    if errs.size == 0:
        raise ValueError("EDF of an empty population")
    # searchsorted(side="left") counts the errors < e.
    return np.searchsorted(errs, np.asarray(e, dtype=float), side="left") / errs.size


def edf_curve(errors: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Step points for plotting: sorted errors and the fraction of runs at or below each (pycls's cumsum)."""
    errs = np.sort(np.asarray(errors, dtype=float))
    if errs.size == 0:
        raise ValueError("EDF of an empty population")
    return errs, np.arange(1, errs.size + 1) / errs.size


def edf_stats(errors: Sequence[float], good_margin: float = 5.0, best: float | None = None) -> dict[str, float]:
    """Summary of an EDF: n, min, quartiles, mean, spread, and the share of runs within `good_margin` of `best`.

    `best` defaults to the population's own minimum; pass a shared best to compare populations fairly.
    """
    errs = np.asarray(errors, dtype=float)
    if errs.size == 0:
        raise ValueError("EDF of an empty population")
    ref = float(errs.min()) if best is None else float(best)
    q10, q25, q50, q75, q90 = np.percentile(errs, [10, 25, 50, 75, 90])
    return {
        "n": int(errs.size),
        "min": float(errs.min()),
        "q10": float(q10),
        "q25": float(q25),
        "median": float(q50),
        "q75": float(q75),
        "q90": float(q90),
        "max": float(errs.max()),
        "mean": float(errs.mean()),
        "iqr": float(q75 - q25),
        "good_margin": float(good_margin),
        "good_reference": ref,
        "frac_good": float(edf(errs, ref + good_margin)),
    }
