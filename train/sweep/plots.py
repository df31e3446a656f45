"""PNG figures of a study (matplotlib, Agg): convergence curves, optimizer gaps, stability EDFs and scatters."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from models.io import atomic_write_bytes
from models.plotting import pyplot
from train.sweep.claims import EQUIVALENCE_MARGIN, OPTIMIZERS, diff_interval, opt_name, se_cell

plt = pyplot()
from train.sweep.edf import edf_curve  # noqa: E402

# pycls's palette; one colour per model, one line style per optimizer.
COLORS = ["#0072BD", "#D95319", "#EDB120", "#7E2F8E", "#77AC30", "#4DBEEE"]
STYLES = {"adamw": "-", "sgd": "--"}
MARKERS = {"adamw": "o", "sgd": "s"}


def _color(models: list[str], model: str) -> str:
    return COLORS[models.index(model) % len(COLORS)]


def _save(fig: plt.Figure, path: Path) -> Path:
    """Render to memory, then replace the file atomically: a full disk leaves the previous figure whole."""
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, dpi=120, format="png")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_convergence(table: dict[str, dict[str, dict[int, Any]]], models: list[str], n_val: int, path: Path
                     ) -> Path:
    """Val error vs schedule length (log2 axis), one line per model x optimizer, error bars ± the standard error the
    tables print (claims.se_cell)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for model in models:
        for opt, cells in table.get(model, {}).items():
            es = sorted(cells)
            ys = [cells[e]["mean"] for e in es]
            yerr = [se_cell(cells[e], n_val) if (cells[e].get("n") or 1) > 1 else 0.0 for e in es]
            ax.errorbar(es, ys, yerr=yerr if any(yerr) else None, color=_color(models, model), ls=STYLES[opt],
                        marker=MARKERS[opt], capsize=3, label=f"{model} {opt_name(opt)}")
    ax.set_xscale("log", base=2)
    all_e = sorted({e for m in table.values() for c in m.values() for e in c})
    ax.set_xticks(all_e, [str(e) for e in all_e])
    ax.set_xlabel("schedule length (epochs)")
    ax.set_ylabel("val top-1 error (%)")
    ax.set_title("Convergence at tuned lr/wd (seed mean ± standard error)", fontsize=10)
    ax.grid(alpha=0.4)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_optimizer(table: dict, gaps: dict[str, dict[int, float]], models: list[str], n_val: int, path: Path
                   ) -> Path:
    """Left: error per model x optimizer at the longest schedule (± standard error); right: SGD - AdamW gap vs
    schedule length with its 95 % interval and the equivalence margin the verdict uses."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
    width = 0.38
    # One schedule length for every bar: the longest every model has a result for (a partial study otherwise drew
    # one model's 4 epochs under an "8 epochs" title).
    have = [{e for c in table.get(m, {}).values() for e in c} for m in models]
    longest = max(set.intersection(*have), default=0) if have else 0
    for j, opt in enumerate(("adamw", "sgd")):
        xs, ys, se = [], [], []
        for i, model in enumerate(models):
            cells = table.get(model, {}).get(opt, {})
            if longest in cells:
                xs.append(i + (j - 0.5) * width)
                ys.append(cells[longest]["mean"])
                se.append(se_cell(cells[longest], n_val) if (cells[longest].get("n") or 1) > 1 else 0.0)
        bars = ax1.bar(xs, ys, width, yerr=se if any(se) else None, capsize=3, label=opt_name(opt), color=COLORS[j],
                       alpha=0.85)
        ax1.bar_label(bars, fmt="%.1f", fontsize=8)
    ax1.set_xticks(range(len(models)), models)
    ax1.set_ylabel("val top-1 error (%)")
    ax1.set_title(f"Tuned AdamW vs SGD ({longest} epochs, ± standard error)", fontsize=10)
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.4, axis="y")
    for model in models:
        g = gaps.get(model, {})
        if g:
            es = sorted(g)
            half = [diff_interval([table[model][o][e] for o in OPTIMIZERS], n_val)[2] for e in es]
            ax2.errorbar(es, [g[e] for e in es], yerr=half, marker="o", capsize=3, color=_color(models, model),
                         label=f"{model} (95 % interval)")
    ax2.axhline(0, color="k", lw=0.8)
    # The verdict's line: ViT_C works "as well" with SGD only when its whole interval lies below it.
    ax2.axhline(EQUIVALENCE_MARGIN, color="grey", ls="--", lw=1,
                label=f"{EQUIVALENCE_MARGIN:g}-point margin (as well: interval wholly below)")
    ax2.set_xscale("log", base=2)
    all_e = sorted({e for g in gaps.values() for e in g})
    if all_e:
        ax2.set_xticks(all_e, [str(e) for e in all_e])
    ax2.set_xlabel("schedule length (epochs)")
    ax2.set_ylabel("SGD error - AdamW error (points)")
    ax2.set_title("Optimizer gap, SGD - AdamW", fontsize=10)
    ax2.grid(alpha=0.4)
    ax2.legend(fontsize=8)
    return _save(fig, path)


def plot_edf(stab: dict[str, dict[str, Any]], models: list[str], path: Path) -> Path:
    """pycls-style EDFs: one panel per optimizer, one step curve per model, legend n|min|mean."""
    opts = [o for o in ("adamw", "sgd") if o in stab]
    fig, axes = plt.subplots(1, max(1, len(opts)), figsize=(4.8 * max(1, len(opts)), 3.8), squeeze=False)
    for ax, opt in zip(axes[0], opts, strict=False):
        for model in models:
            if model not in stab[opt]:
                continue
            errs = [r["error"] for r in stab[opt][model]["runs"]]
            xs, ys = edf_curve(errs)
            st = stab[opt][model]
            label = f"{model}  {st['n']}|{st['min']:.1f}|{st['mean']:.1f}"
            # Start the staircase at 0 on the lowest error so each curve visibly rises from nothing.
            ax.step([xs[0], *xs], [0.0, *ys], where="post", color=_color(models, model), label=label, alpha=0.9)
        ax.set_xlabel("val top-1 error (%)")
        ax.set_ylabel("cumulative prob.")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{opt_name(opt)}: EDF over sampled lr, wd")
        ax.grid(alpha=0.4)
        ax.legend(fontsize=8, loc="lower right", title="n|min|mean", title_fontsize=8)
    return _save(fig, path)


def plot_stability_scatter(stab: dict[str, dict[str, Any]], models: list[str], path: Path) -> Path:
    """Error vs log10(lr) and log10(wd) per optimizer (pycls plot_values): where each stem breaks down."""
    opts = [o for o in ("adamw", "sgd") if o in stab]
    fig, axes = plt.subplots(len(opts) or 1, 2, figsize=(9, 3.4 * max(1, len(opts))), squeeze=False)
    for row, opt in enumerate(opts):
        for col, key in enumerate(("lr", "weight_decay")):
            ax = axes[row][col]
            for model in models:
                runs = stab[opt].get(model, {}).get("runs", [])
                ax.scatter([math.log10(r[key]) for r in runs], [r["error"] for r in runs],
                           color=_color(models, model), alpha=0.75, s=22, label=model)
            ax.set_xlabel(f"log10({'lr' if key == 'lr' else 'wd'})")
            ax.set_ylabel("val top-1 error (%)")
            ax.set_title(f"{opt_name(opt)}: error vs {'lr' if key == 'lr' else 'wd'}")
            ax.grid(alpha=0.4)
            ax.legend(fontsize=8)
    return _save(fig, path)
