"""Verdicts on the paper's claims from a study's numbers. The rules, stated once (the report prints this text):

A comparison is a difference between ViT_C and ViT_P or between one model's optimizers (or a sign test over paired
samples). A difference counts only beyond twice its standard error, which combines the binomial noise of a finite
val set with the spread over training seeds (the standard error of a seed mean); smaller differences are ties. A
claim with two halves has a comparison for each. SGD vs AdamW, per schedule length: ViT_C's own SGD-AdamW gap
supports "ViT_C trains as well with SGD" unless SGD is worse beyond 2 SE (then it contradicts), and ViT_P's gap
minus ViT_C's, beyond 2 SE, supports "ViT_P loses markedly". Stability, per optimizer: "lies left" is a one-sided
sign test over the paired (lr, wd) samples at p < 0.05, and "tighter" holds when ViT_C's error IQR is not larger
than ViT_P's (a larger one contradicts); an optimizer with fewer than 5 untied pairs is not judged, since the sign
test cannot reach p < 0.05 there. A claim is "yes" when every comparison supports it, "partial" when some support
it and more support it than contradict it (the rest ties or contradictions), "no" when none support it or
contradictions are at least as many as supports, "not run" without comparisons, and "not judged" when it has
numbers but none can be judged. Claims stated at equal flops (convergence, peak accuracy) are judged only on a pair
whose ViT_C/ViT_P flops ratio is within 3 %; any other pair is "not judged", with its ratio printed. Runtime
parity holds when the ViT_C/ViT_P time ratio is within 5 % or ViT_C is faster.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from math import comb
from typing import Any

NOISE_SE = 2.0  # a difference counts beyond this many standard errors (about 95 %)
FLOPS_PARITY = 0.03  # claims at equal flops are judged on pairs within this flops ratio of 1
RUNTIME_PARITY = 0.05  # time ratio above 1 still called parity

PAPER = {
    "convergence": "ViT_C converges faster: lower error than ViT_P at short schedules (50/100/200 epochs), "
    "with AdamW and with SGD.",
    "optimizer": "ViT_C trains as well with SGD as with AdamW; ViT_P loses accuracy markedly with SGD.",
    "stability": "ViT_C is more stable across learning rate and weight decay: over log-uniformly sampled "
    "(lr, wd), its error EDF is tighter and lies left of ViT_P's.",
    "peak": "ViT_C reaches 1-2 points lower top-1 error at equal flops, with flops and runtime at parity.",
    "runtime": "ViT_C and ViT_P run at parity: equal flops give equal time per training step and per inference batch.",
}


def se_error(err_pct: float, n_val: int) -> float:
    """Binomial standard error (points) of an error rate measured on n_val images."""
    p = min(max(err_pct / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1 - p) / n_val)


def se_diff(errs: Sequence[float], n_val: int) -> float:
    """Standard error of a sum/difference of independent error measurements."""
    return math.sqrt(sum(se_error(e, n_val) ** 2 for e in errs))


def se_cell(cell: dict[str, Any], n_val: int) -> float:
    """Standard error of a seed mean {"mean", "std", "n"}: the seeds' spread over sqrt(n), never below the val
    set's binomial noise of that mean (two or three seeds can agree by chance)."""
    n = max(1, int(cell.get("n") or 1))
    binomial = se_error(cell["mean"], n_val) / math.sqrt(n)
    std = cell.get("std")
    return max(binomial, std / math.sqrt(n)) if std is not None and n > 1 else binomial


def se_cells(cells: Sequence[dict[str, Any]], n_val: int) -> float:
    """Standard error of a sum/difference of independent seed means."""
    return math.sqrt(sum(se_cell(c, n_val) ** 2 for c in cells))


def flops_parity(ratio: float) -> bool:
    """Whether a ViT_C/ViT_P flops ratio is close enough to judge claims stated at equal flops."""
    return abs(ratio - 1.0) <= FLOPS_PARITY


def runtime_parity(ratio: float) -> bool:
    """Whether a ViT_C/ViT_P time ratio is at parity (within 5 %, or ViT_C faster)."""
    return ratio <= 1.0 + RUNTIME_PARITY


def sign_test_p(wins: int, n: int) -> float:
    """One-sided sign-test p-value: P(X >= wins) for X ~ Binomial(n, 1/2)."""
    return sum(comb(n, k) for k in range(wins, n + 1)) / 2**n if n else 1.0


def verdict(support: int, contradict: int, total: int) -> str:
    """'yes' / 'partial' / 'no' / 'not run' from counts of supporting and contradicting comparisons (module rules)."""
    if total == 0:
        return "not run"
    if support == total:
        return "yes"
    if support > contradict:
        return "partial"
    return "no"


def _tally(margins: list[tuple[float, float]]) -> tuple[int, int]:
    """(supporting, contradicting) among (advantage, standard error) pairs; |advantage| <= 2 SE is a tie."""
    return sum(a > NOISE_SE * n for a, n in margins), sum(a < -NOISE_SE * n for a, n in margins)


def convergence_claim(table: dict, conv: str, patch: str, n_val: int, flops_ratio: float | None = None
                      ) -> dict[str, Any]:
    """ViT_P error minus ViT_C error per optimizer x schedule length (seed means); judged at flops parity only."""
    cells, margins = [], []
    for opt in ("adamw", "sgd"):
        c, p = table.get(conv, {}).get(opt, {}), table.get(patch, {}).get(opt, {})
        for e in sorted(set(c) & set(p)):
            adv = p[e]["mean"] - c[e]["mean"]
            noise = se_cells([p[e], c[e]], n_val)
            margins.append((adv, noise))
            cells.append({"optimizer": opt, "epochs": e, "vit_c": c[e]["mean"], "vit_p": p[e]["mean"],
                          "seeds": min(c[e].get("n") or 1, p[e].get("n") or 1), "advantage": adv, "se": noise})
    sup, con = _tally(margins)
    measured = "; ".join(
        f"{opt_name(x['optimizer'])} {x['epochs']} ep: C {x['vit_c']:.1f} vs P {x['vit_p']:.1f} "
        f"(diff {x['advantage']:+.1f} ± {x['se']:.1f})" for x in cells
    )
    return _row("convergence", "Convergence", measured, sup, con, len(cells), cells, flops_ratio)


def optimizer_claim(gaps: dict[str, dict[int, float]], table: dict, conv: str, patch: str, n_val: int):
    """Per schedule length (seed means): ViT_C's own SGD-AdamW gap ("as well") and (ViT_P's gap) minus (ViT_C's)."""
    cells, sup, con = [], 0, 0
    gc, gp = gaps.get(conv, {}), gaps.get(patch, {})
    for e in sorted(set(gc) & set(gp)):
        se_c = se_cells([table[conv][o][e] for o in ("adamw", "sgd")], n_val)
        as_well = gc[e] <= NOISE_SE * se_c  # an equivalence: a tie (or SGD better) supports it
        adv = gp[e] - gc[e]
        noise = se_cells([table[m][o][e] for m in (conv, patch) for o in ("adamw", "sgd")], n_val)
        s, c = _tally([(adv, noise)])
        sup, con = sup + as_well + s, con + (not as_well) + c
        cells.append({"epochs": e, "gap_vit_c": gc[e], "gap_vit_c_se": se_c, "vit_c_as_well": as_well,
                      "gap_vit_p": gp[e], "advantage": adv, "se": noise})
    measured = "; ".join(
        f"{x['epochs']} ep: SGD-AdamW gap C {x['gap_vit_c']:+.1f} ± {x['gap_vit_c_se']:.1f} "
        f"({'as well' if x['vit_c_as_well'] else 'SGD worse'}) vs P {x['gap_vit_p']:+.1f} "
        f"(diff {x['advantage']:+.1f} ± {x['se']:.1f})" for x in cells
    )
    return _row("optimizer", "SGD vs AdamW", measured, sup, con, 2 * len(cells), cells)


def min_sign_pairs(alpha: float) -> int:
    """The fewest untied pairs with which the one-sided sign test can reach p < alpha (all pairs one way)."""
    n = 1
    while sign_test_p(n, n) >= alpha:
        n += 1
    return n


def stability_claim(stab: dict[str, dict[str, Any]], conv: str, patch: str, alpha: float = 0.05):
    """Per optimizer: sign test over the paired samples ("lies left") and the IQRs ("tighter"); judged only with
    enough untied pairs for the sign test to reach alpha."""
    cells, sup, con, total = [], 0, 0, 0
    need = min_sign_pairs(alpha)
    for opt, models in sorted(stab.items()):
        if conv not in models or patch not in models:
            continue
        c = {(r["lr"], r["weight_decay"]): r["error"] for r in models[conv]["runs"]}
        p = {(r["lr"], r["weight_decay"]): r["error"] for r in models[patch]["runs"]}
        pairs = [(c[k], p[k]) for k in set(c) & set(p) if c[k] != p[k]]  # exact ties (e.g. both diverged) drop
        wins, n = sum(ec < ep for ec, ep in pairs), len(pairs)
        p_c, p_p = sign_test_p(wins, n), sign_test_p(n - wins, n)
        mc, mp = models[conv], models[patch]
        tighter = mc["iqr"] <= mp["iqr"]
        judged = n >= need
        if judged:
            sup, con, total = sup + (p_c < alpha) + tighter, con + (p_p < alpha) + (not tighter), total + 2
        cells.append({
            "optimizer": opt, "wins": wins, "n": n, "p_vit_c_better": p_c, "p_vit_p_better": p_p,
            "judged": judged, "tighter": tighter,
            "median_vit_c": mc["median"], "median_vit_p": mp["median"], "iqr_vit_c": mc["iqr"],
            "iqr_vit_p": mp["iqr"], "frac_good_vit_c": mc["frac_good"], "frac_good_vit_p": mp["frac_good"],
            "good_margin": mc["good_margin"],
        })
    measured = "; ".join(
        f"{opt_name(x['optimizer'])}: median C {x['median_vit_c']:.1f} vs P {x['median_vit_p']:.1f}, "
        f"IQR {x['iqr_vit_c']:.1f} vs {x['iqr_vit_p']:.1f} ({'C tighter' if x['tighter'] else 'C wider'}), "
        f"within {x['good_margin']:g} of best {100 * x['frac_good_vit_c']:.0f}% vs {100 * x['frac_good_vit_p']:.0f}%, "
        f"C better in {x['wins']}/{x['n']} pairs "
        + (f"(sign test p={x['p_vit_c_better']:.2g})" if x["judged"] else
           f"(not judged: too few samples, the sign test needs at least {need} untied pairs)")
        for x in cells
    )
    row = _row("stability", "LR/WD stability (EDF)", measured, sup, con, total, cells)
    if cells and not total:
        row["reproduced"] = "not judged"
    return row


def peak_claim(table: dict, conv: str, patch: str, n_val: int, complexity: dict, runtime: dict):
    """Best tuned error per stem at the longest schedule both stems have results for (seed means; a partial study
    never compares one stem's 4 epochs with the other's 8); judged at flops parity only."""
    epochs = {m: {e for v in table.get(m, {}).values() for e in v} for m in (conv, patch)}
    longest = max(epochs[conv] & epochs[patch], default=None)

    def best(model: str) -> tuple[dict, str] | None:
        rows = [(v[longest], o) for o, v in table.get(model, {}).items() if longest in v]
        return min(rows, key=lambda r: r[0]["mean"]) if rows else None

    flops_ratio = complexity[conv]["flops"] / complexity[patch]["flops"]
    bc, bp = best(conv), best(patch)
    if bc is None or bp is None:
        return _row("peak", "Peak accuracy at equal flops", "not measured", 0, 0, 0, [], flops_ratio)
    adv, noise = bp[0]["mean"] - bc[0]["mean"], se_cells([bc[0], bp[0]], n_val)
    rt_ratio = runtime[conv] / runtime[patch] if runtime.get(conv) and runtime.get(patch) else None
    sup, con = _tally([(adv, noise)])
    cell = {"vit_c": bc[0]["mean"], "vit_c_optimizer": bc[1], "vit_p": bp[0]["mean"], "vit_p_optimizer": bp[1],
            "advantage": adv, "se": noise, "flops_ratio": flops_ratio, "train_epoch_time_ratio": rt_ratio}
    rt = f"{rt_ratio:.2f}" if rt_ratio is not None else "n/a"
    measured = (
        f"best error at {longest} ep C {bc[0]['mean']:.1f} ({opt_name(bc[1])}) vs P {bp[0]['mean']:.1f} "
        f"({opt_name(bp[1])}), "
        f"diff {adv:+.1f} ± {noise:.1f}; train time per epoch C/P {rt} (shared CPU, indicative)"
    )
    return _row("peak", "Peak accuracy at equal flops", measured, sup, con, 1, [cell], flops_ratio)


def runtime_claim(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Runtime parity: one comparison per measured setting (train step / inference batch, layout, compilation)."""
    sup = sum(runtime_parity(r["ratio"]) for r in rows)
    measured = "; ".join(f"{r['what']} {r['device']} {r['layout']}{' compiled' if r.get('compiled') else ''}: "
                         f"C/P {r['ratio']:.2f}" for r in rows)
    return _row("runtime", "Runtime at parity", measured, sup, len(rows) - sup, len(rows), list(rows))


def opt_name(opt: str) -> str:
    """Display name of an optimizer."""
    return {"adamw": "AdamW", "sgd": "SGD"}.get(opt, opt)


def _row(key: str, title: str, measured: str, sup: int, con: int, total: int, cells: list,
         flops_ratio: float | None = None) -> dict[str, Any]:
    judged = flops_ratio is None or flops_parity(flops_ratio)
    row = {
        "claim": key, "title": title, "paper": PAPER[key], "measured": measured or "not measured",
        "supporting": sup, "contradicting": con, "comparisons": total,
        "reproduced": verdict(sup, con, total) if judged else "not judged", "cells": cells,
    }
    if flops_ratio is not None:
        row["flops_ratio"] = flops_ratio
    return row
