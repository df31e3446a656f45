"""Verdicts on the paper's claims from a study's numbers, with noise-aware rules stated in each row.

Noise: every error is measured on a finite val set, so a difference is only counted when it exceeds one
binomial standard error of that difference; smaller ones are ties. Stability uses a sign test over the paired
(lr, wd) samples. A claim "reproduces" when its comparisons support it and none contradict it, is "partial" when
support and ties (or contradictions) are mixed, and "no" when nothing supports it or contradictions dominate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from math import comb
from typing import Any

PAPER = {
    "convergence": "ViT_C converges faster: lower error than ViT_P at short schedules (50/100/200 epochs), "
    "with AdamW and with SGD.",
    "optimizer": "ViT_C trains as well with SGD as with AdamW; ViT_P loses accuracy markedly with SGD.",
    "stability": "ViT_C is more stable across learning rate and weight decay: over log-uniformly sampled "
    "(lr, wd), its error EDF is tighter and lies left of ViT_P's.",
    "peak": "ViT_C reaches 1-2 points lower top-1 error at equal flops, with flops and runtime at parity.",
}


def se_error(err_pct: float, n_val: int) -> float:
    """Binomial standard error (points) of an error rate measured on n_val images."""
    p = min(max(err_pct / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1 - p) / n_val)


def se_diff(errs: Sequence[float], n_val: int) -> float:
    """Standard error of a sum/difference of independent error measurements."""
    return math.sqrt(sum(se_error(e, n_val) ** 2 for e in errs))


def sign_test_p(wins: int, n: int) -> float:
    """One-sided sign-test p-value: P(X >= wins) for X ~ Binomial(n, 1/2)."""
    return sum(comb(n, k) for k in range(wins, n + 1)) / 2**n if n else 1.0


def verdict(support: int, contradict: int, total: int) -> str:
    """'yes' / 'partial' / 'no' from counts of supporting and contradicting comparisons."""
    if total == 0:
        return "not run"
    if support == 0 or contradict > support:
        return "no"
    if contradict == 0 and support * 2 >= total:
        return "yes"
    return "partial"


def _tally(margins: list[tuple[float, float]]) -> tuple[int, int]:
    """(supporting, contradicting) among (advantage, noise) pairs; |advantage| <= noise is a tie."""
    return sum(a > n for a, n in margins), sum(a < -n for a, n in margins)


def convergence_claim(table: dict, conv: str, patch: str, n_val: int) -> dict[str, Any]:
    """ViT_P error minus ViT_C error per optimizer x schedule length."""
    cells, margins = [], []
    for opt in ("adamw", "sgd"):
        c, p = table.get(conv, {}).get(opt, {}), table.get(patch, {}).get(opt, {})
        for e in sorted(set(c) & set(p)):
            adv = p[e]["mean"] - c[e]["mean"]
            noise = se_diff([p[e]["mean"], c[e]["mean"]], n_val)
            margins.append((adv, noise))
            cells.append({"optimizer": opt, "epochs": e, "vit_c": c[e]["mean"], "vit_p": p[e]["mean"],
                          "advantage": adv, "se": noise})
    sup, con = _tally(margins)
    measured = "; ".join(
        f"{opt_name(x['optimizer'])} {x['epochs']} ep: C {x['vit_c']:.1f} vs P {x['vit_p']:.1f}" for x in cells
    )
    return _row("convergence", "Convergence", measured, sup, con, len(cells), cells)


def optimizer_claim(gaps: dict[str, dict[int, float]], table: dict, conv: str, patch: str, n_val: int):
    """(ViT_P's SGD-AdamW gap) minus (ViT_C's) per schedule length."""
    cells, margins = [], []
    gc, gp = gaps.get(conv, {}), gaps.get(patch, {})
    for e in sorted(set(gc) & set(gp)):
        errs = [table[m][o][e]["mean"] for m in (conv, patch) for o in ("adamw", "sgd")]
        adv, noise = gp[e] - gc[e], se_diff(errs, n_val)
        margins.append((adv, noise))
        cells.append({"epochs": e, "gap_vit_c": gc[e], "gap_vit_p": gp[e], "advantage": adv, "se": noise})
    sup, con = _tally(margins)
    measured = "; ".join(
        f"{x['epochs']} ep: SGD-AdamW gap C {x['gap_vit_c']:+.1f} vs P {x['gap_vit_p']:+.1f}" for x in cells
    )
    return _row("optimizer", "SGD vs AdamW", measured, sup, con, len(cells), cells)


def stability_claim(stab: dict[str, dict[str, Any]], conv: str, patch: str, alpha: float = 0.05):
    """Per optimizer: sign test over the paired samples (ViT_C lower error at the same (lr, wd))."""
    cells, sup, con = [], 0, 0
    for opt, models in sorted(stab.items()):
        if conv not in models or patch not in models:
            continue
        c = {(r["lr"], r["weight_decay"]): r["error"] for r in models[conv]["runs"]}
        p = {(r["lr"], r["weight_decay"]): r["error"] for r in models[patch]["runs"]}
        pairs = [(c[k], p[k]) for k in set(c) & set(p) if c[k] != p[k]]  # exact ties (e.g. both diverged) drop
        wins, n = sum(ec < ep for ec, ep in pairs), len(pairs)
        p_c, p_p = sign_test_p(wins, n), sign_test_p(n - wins, n)
        sup += p_c < alpha
        con += p_p < alpha
        mc, mp = models[conv], models[patch]
        cells.append({
            "optimizer": opt, "wins": wins, "n": n, "p_vit_c_better": p_c, "p_vit_p_better": p_p,
            "median_vit_c": mc["median"], "median_vit_p": mp["median"], "iqr_vit_c": mc["iqr"],
            "iqr_vit_p": mp["iqr"], "frac_good_vit_c": mc["frac_good"], "frac_good_vit_p": mp["frac_good"],
            "good_margin": mc["good_margin"],
        })
    measured = "; ".join(
        f"{opt_name(x['optimizer'])}: median C {x['median_vit_c']:.1f} vs P {x['median_vit_p']:.1f}, "
        f"IQR {x['iqr_vit_c']:.1f} vs {x['iqr_vit_p']:.1f}, within {x['good_margin']:g} of best "
        f"{100 * x['frac_good_vit_c']:.0f}% vs {100 * x['frac_good_vit_p']:.0f}%, C better in {x['wins']}/{x['n']} "
        f"pairs (sign test p={x['p_vit_c_better']:.2g})"
        for x in cells
    )
    return _row("stability", "LR/WD stability (EDF)", measured, sup, con, len(cells), cells)


def peak_claim(table: dict, conv: str, patch: str, n_val: int, complexity: dict, runtime: dict):
    """Best tuned error per stem at the longest schedule, plus flops and runtime ratios."""
    def best(model: str) -> tuple[float, str] | None:
        rows = [(v[e]["mean"], o) for o, v in table.get(model, {}).items() for e in [max(v)] if v]
        return min(rows) if rows else None

    bc, bp = best(conv), best(patch)
    if bc is None or bp is None:
        return _row("peak", "Peak accuracy, flops/runtime parity", "not measured", 0, 0, 0, [])
    adv, noise = bp[0] - bc[0], se_diff([bc[0], bp[0]], n_val)
    flops_ratio = complexity[conv]["flops"] / complexity[patch]["flops"]
    rt_ratio = runtime[conv] / runtime[patch] if runtime.get(conv) and runtime.get(patch) else None
    sup, con = _tally([(adv, noise)])
    cell = {"vit_c": bc[0], "vit_c_optimizer": bc[1], "vit_p": bp[0], "vit_p_optimizer": bp[1],
            "advantage": adv, "se": noise, "flops_ratio": flops_ratio, "runtime_ratio": rt_ratio}
    rt = f"{rt_ratio:.2f}" if rt_ratio is not None else "n/a"
    # A pair off flops parity is reported, not judged: fewer flops for ViT_C only handicaps it.
    parity = "" if abs(flops_ratio - 1) <= 0.1 else " (not at parity: ViT_C has fewer flops)" if flops_ratio < 1 \
        else " (not at parity: ViT_C has more flops)"
    measured = (
        f"best error C {bc[0]:.1f} ({opt_name(bc[1])}) vs P {bp[0]:.1f} ({opt_name(bp[1])}), "
        f"diff {adv:+.1f} (SE {noise:.1f}); flops C/P {flops_ratio:.2f}{parity}, train time C/P {rt}"
    )
    return _row("peak", "Peak accuracy, flops/runtime parity", measured, sup, con, 1, [cell])


def opt_name(opt: str) -> str:
    """Display name of an optimizer."""
    return {"adamw": "AdamW", "sgd": "SGD"}.get(opt, opt)


def _row(key: str, title: str, measured: str, sup: int, con: int, total: int, cells: list) -> dict[str, Any]:
    return {
        "claim": key, "title": title, "paper": PAPER[key], "measured": measured or "not measured",
        "supporting": sup, "contradicting": con, "comparisons": total,
        "reproduced": verdict(sup, con, total), "cells": cells,
    }
