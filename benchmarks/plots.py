"""PNG plots of a latency results document: latency vs batch per runtime (C vs P), and the C/P ratios."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

from benchmarks.stats import MIN_CI_ROUNDS

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

_COLOURS = {"conv": "tab:orange", "patchify": "tab:blue"}


def figure(rows: int, cols: int, size: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    """A figure with a rows x cols grid of axes, `size` inches per panel (Agg backend, no display)."""
    from models.plotting import pyplot

    plt = pyplot()  # files only, no display

    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    return fig, axes


def png(fig: Any) -> bytes:
    """The figure as PNG bytes (written with the rest of the results, `report.publish`); the figure closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def batch_axis(ax: Any, xs: list[int]) -> None:
    """Log2 x axis labelled with the plain values (1, 8, 32), no minor ticks."""
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log", base=2)
    ticks = sorted(set(xs))
    ax.set_xticks(ticks, [str(x) for x in ticks])
    ax.xaxis.set_minor_locator(NullLocator())


def _grid(doc: dict[str, Any]) -> tuple[list[str], list[str]]:
    pairs = [p for p in doc["config"]["pairs"] if any(r["pair"] == p for r in doc["results"])]
    targets = list(dict.fromkeys(r["target"] for r in doc["results"]))
    return pairs or ["-"], targets or ["-"]


def plot_latency(doc: dict[str, Any]) -> bytes:
    """Median latency (bars to p90) vs batch size, one panel per (pair, runtime), ViT_C vs ViT_P."""
    pairs, targets = _grid(doc)
    fig, axes = figure(len(pairs), len(targets), (3.2, 2.8))
    for i, pair in enumerate(pairs):
        for j, target in enumerate(targets):
            ax = axes[i][j]
            cells = [r for r in doc["results"] if r["pair"] == pair and r["target"] == target]
            for model in sorted({c["model"] for c in cells}):
                pts = sorted((c for c in cells if c["model"] == model), key=lambda c: c["batch"])
                xs = [c["batch"] for c in pts]
                p50 = [c["latency_ms"]["p50"] for c in pts]
                up = [c["latency_ms"]["p90"] - c["latency_ms"]["p50"] for c in pts]
                stem = pts[0]["stem"]
                ax.errorbar(xs, p50, yerr=[[0] * len(up), up], marker="o" if stem == "conv" else "s",
                            linestyle="-" if stem == "conv" else "--", color=_COLOURS.get(stem), capsize=3,
                            label=model)
            batch_axis(ax, [c["batch"] for c in cells] or [1])
            ax.set_yscale("log")
            ax.set_title(f"{pair}: {target}", fontsize=9)
            ax.set_xlabel("batch")
            ax.set_ylabel("ms (p50, bar to p90)")
            ax.grid(True, which="both", alpha=0.3)
            if cells:
                ax.legend(fontsize=7)
    fig.suptitle(f"Latency vs batch, ViT_C vs ViT_P ({doc['host']}, {doc['config']['threads']} threads)")
    return png(fig)


# The y axis of the ratio plot, by the estimator the results used (results before schema 2 do not say: theirs was
# the ratio of the two medians).
_RATIO_LABELS = {"median per-round ratio": "C/P latency: median of per-round ratios",
                 "ratio of medians": "C/P latency: ratio of the p50s"}
CI = "95% CI"


def plot_ratios(doc: dict[str, Any]) -> bytes:
    """C/P latency ratio vs batch per runtime, the +-5 % parity band, and each ratio's interval: a capped bar for a
    95 % CI, a dotted bar without caps on a hollow marker for the mere range of a few rounds (no CI)."""
    pairs, _ = _grid(doc)
    estimators = {r.get("estimator", "ratio of medians") for r in doc["ratios"]}
    ylabel = _RATIO_LABELS.get(next(iter(estimators)), "C/P latency") if len(estimators) == 1 else "C/P latency"
    fig, axes = figure(1, len(pairs), (5.0, 3.4))
    for i, pair in enumerate(pairs):
        ax = axes[0][i]
        ax.axhspan(0.95, 1.05, color="tab:green", alpha=0.12, label="parity +-5 %")
        ax.axhline(1.0, color="tab:green", lw=0.8)
        ratios = [r for r in doc["ratios"] if r["pair"] == pair]
        targets = list(dict.fromkeys(r["target"] for r in ratios))
        ranges = False
        for k, target in enumerate(targets):
            pts = sorted((r for r in ratios if r["target"] == target), key=lambda r: r["batch"])
            xs = [r["batch"] * (1 + 0.04 * (k - len(targets) / 2)) for r in pts]  # dodge overlapping bars
            (line,) = ax.plot(xs, [r["ratio"] for r in pts], lw=1, label=target)
            for ci in (True, False):
                sel = [(x, r) for x, r in zip(xs, pts, strict=True) if (r.get("interval_kind", CI) == CI) == ci]
                if not sel:
                    continue
                ranges |= not ci
                below = [max(0.0, r["ratio"] - r["interval"][0]) for _, r in sel]
                above = [max(0.0, r["interval"][1] - r["ratio"]) for _, r in sel]
                _, _, (bars,) = ax.errorbar([x for x, _ in sel], [r["ratio"] for _, r in sel], yerr=[below, above],
                                            fmt="o", color=line.get_color(), capsize=3 if ci else 0,
                                            mfc=None if ci else "none")
                bars.set_linestyle("-" if ci else ":")
                bars.set_gid("ci95" if ci else "range")
        batch_axis(ax, [r["batch"] for r in ratios] or [1])
        ax.set_title(f"{pair}: ViT_C / ViT_P latency", fontsize=10)
        ax.set_xlabel("batch")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        if ranges:
            ax.text(0.01, 0.01, f"capped bar: 95 % CI; dotted, hollow: range of < {MIN_CI_ROUNDS} rounds (no CI)",
                    transform=ax.transAxes, fontsize=6, va="bottom")
    return png(fig)


if __name__ == "__main__":
    from benchmarks.library import library_module

    library_module(__spec__)
