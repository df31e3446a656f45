"""The timing loop: warm-up, then interleaved rounds of ViT_C and ViT_P calls until the medians are stable.

Why interleaved: on a shared 2-core machine throughput drifts by 15-25 % over seconds. Timing C and P in
alternating short rounds (C then P, then P then C, ...) exposes both to the same drift, so their ratio is far
steadier than either latency, and the spread of the per-round ratios is an honest interval for it.
Inputs rotate through a small pool of distinct batches so no run re-reads the previous call's cache lines.
Every backend returns host memory, so a call's end is its result being ready (GPU backends synchronise).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from benchmarks.stats import MIN_CI_ROUNDS, median_is_stable

Infer = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Budget:
    """How long to warm up and when to stop timing one (target, batch) cell of a pair."""

    warmup_calls: int = 2
    warmup_s: float = 0.5
    min_reps: int = 20  # per model
    min_rounds: int = MIN_CI_ROUNDS  # fewer give the C/P ratio only a range, no firm verdict
    round_s: float = 0.5  # per model per round
    max_s: float = 20.0  # both models together, after warm-up
    rel_ci: float = 0.02  # stop early once each median's 95 % CI half-width is within this fraction


# Four warm-up calls: the estimate that sizes the rounds is the median of the last three, not one call that a
# preemption can make 100x slow (which left one model with a few samples and the other with thousands).
QUICK = Budget(warmup_calls=4, warmup_s=0.0, min_reps=5, min_rounds=2, round_s=0.05, max_s=0.6, rel_ci=0.05)
FULL = Budget()


@dataclass
class PairTiming:
    """Per-call seconds of each model, the per-round C/P ratios, and what it took."""

    c: list[float] = field(default_factory=list)
    p: list[float] = field(default_factory=list)
    round_ratios: list[float] = field(default_factory=list)
    rounds: int = 0
    seconds: float = 0.0
    hit_time_limit: bool = False


def input_pool(batch: int, shape: tuple[int, int, int], pool: int = 4, seed: int = 0) -> list[np.ndarray]:
    """`pool` distinct, contiguous (batch, C, H, W) float32 arrays of N(0, 1) values (normalised-image range)."""
    rng = np.random.default_rng(seed)
    return [np.ascontiguousarray(rng.standard_normal((batch, *shape), dtype=np.float32)) for _ in range(pool)]


def time_calls(infer: Infer, inputs: list[np.ndarray], n: int, start: int = 0) -> list[float]:
    """Seconds of each of `n` calls, cycling through `inputs` from index `start`."""
    out = []
    for i in range(n):
        x = inputs[(start + i) % len(inputs)]
        t0 = time.perf_counter()
        infer(x)
        out.append(time.perf_counter() - t0)
    return out


def warm_up(infer: Infer, inputs: list[np.ndarray], budget: Budget) -> float:
    """Run until both the call count and the time of the warm-up are reached; the median call's seconds."""
    start = time.perf_counter()
    times = time_calls(infer, inputs, max(1, budget.warmup_calls))
    while time.perf_counter() - start < budget.warmup_s:
        times += time_calls(infer, inputs, 1, len(times))
    return float(np.median(times[1:] if len(times) > 1 else times))


def time_pair(c_infer: Infer, p_infer: Infer, inputs: list[np.ndarray], budget: Budget) -> PairTiming:
    """Interleaved rounds of C and P calls on the same inputs until stable or out of time."""
    est_c, est_p = warm_up(c_infer, inputs, budget), warm_up(p_infer, inputs, budget)
    out = PairTiming()
    start = time.perf_counter()
    while True:
        # Calls per round from the median of every call so far: a warm-up estimate thrown off by a preemption
        # is corrected after one round, so both models get about round_s of calls each round.
        k_c = max(1, round(budget.round_s / max(float(np.median(out.c)) if out.c else est_c, 1e-6)))
        k_p = max(1, round(budget.round_s / max(float(np.median(out.p)) if out.p else est_p, 1e-6)))
        order = ((c_infer, k_c, out.c), (p_infer, k_p, out.p))
        for infer, k, sink in order if out.rounds % 2 == 0 else order[::-1]:
            sink += time_calls(infer, inputs, k, len(sink))
        out.rounds += 1
        out.round_ratios.append(float(np.median(out.c[-k_c:]) / np.median(out.p[-k_p:])))
        out.seconds = time.perf_counter() - start
        enough = out.rounds >= budget.min_rounds and min(len(out.c), len(out.p)) >= budget.min_reps
        if enough and median_is_stable(out.c, budget.rel_ci) and median_is_stable(out.p, budget.rel_ci):
            return out
        # Stop before a round that would overrun the limit (at least one round always runs).
        if out.seconds + out.seconds / out.rounds > budget.max_s:
            out.hit_time_limit = True
            return out


if __name__ == "__main__":
    from benchmarks.library import library_module

    library_module(__spec__)
