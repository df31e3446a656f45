"""What a run leaves for people and tools: metrics.jsonl, the curves PNG, versions and the summary."""

from __future__ import annotations

import io
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

from models.host import distribution_versions
from models.io import atomic_write_bytes, not_a_file, parse_strict_json

METRICS_FILE = "metrics.jsonl"
MAX_METRICS_BYTES = 64 << 20  # a line of about 400 bytes per epoch: far beyond any schedule, bounds the read
PLOT_FILE = "curves.png"


def metrics_bytes(history: list[dict[str, Any]]) -> bytes:
    """metrics.jsonl's content: one JSON object per epoch of the run's history."""
    return "".join(json.dumps(rec, sort_keys=False) + "\n" for rec in history).encode()


def write_metrics(out_dir: str | os.PathLike, history: list[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl (one JSON object per epoch) from the run's history, atomically.

    Rewriting rather than appending keeps the file exact after a resume that repeats a partial epoch.
    """
    atomic_write_bytes(Path(out_dir) / METRICS_FILE, metrics_bytes(history))


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """metrics.jsonl's records ([] when there is none): ValueError (one line, naming the line) unless it holds at
    most MAX_METRICS_BYTES, each line a strict-JSON object (no NaN, no repeated key); OSError when unreadable."""
    if (problem := not_a_file(path)) == "is missing":
        return []
    if problem is not None:  # never opened: a FIFO would block the reader
        raise ValueError(f"{path} {problem}")
    with open(path, "rb") as f:
        data = f.read(MAX_METRICS_BYTES + 1)  # never more than the cap, even when the file grows while we read
    if len(data) > MAX_METRICS_BYTES:
        raise ValueError(f"{path} is larger than {MAX_METRICS_BYTES >> 20} MiB")
    records = []
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            record = parse_strict_json(line, MAX_METRICS_BYTES)
        except ValueError as exc:
            raise ValueError(f"{path} line {number}: {exc}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def draw_curves(history: list[dict[str, Any]], title: str) -> bytes | None:
    """Loss and top-1 per epoch (raw and EMA) as PNG bytes, drawn in memory; None when there is nothing to plot."""
    rows = [h for h in history if "train_loss" in h]
    if not rows:
        return None
    from models.plotting import pyplot

    plt = pyplot()

    def num(h: dict[str, Any], key: str) -> float:
        return math.nan if h.get(key) is None else h[key]  # null (diverged) -> a gap in the curve

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    try:
        ax_loss.plot([h["epoch"] for h in rows], [num(h, "train_loss") for h in rows], "o-",
                     label="train (augmented)")
        evald = [h for h in rows if h.get("val_top1") is not None]
        if evald:
            ax_loss.plot([h["epoch"] for h in evald], [num(h, "val_loss") for h in evald], "s-", label="val")
            ax_acc.plot([h["epoch"] for h in evald], [100 * h["val_top1"] for h in evald], "s-", label="val top-1")
            ema = [h for h in evald if h.get("val_top1_ema") is not None]
            if ema:
                ax_acc.plot([h["epoch"] for h in ema], [100 * h["val_top1_ema"] for h in ema], "^-",
                            label="val top-1 (EMA)")
        ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
        ax_acc.set(xlabel="epoch", ylabel="%", title="accuracy")
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(title)
        fig.tight_layout()
        # Into memory, not a temporary beside the plot: drawing takes a good part of a second, and a Ctrl-C or
        # SIGTERM meanwhile would leave a half-written file in the run directory.
        png = io.BytesIO()
        fig.savefig(png, dpi=110, format="png")
    finally:
        plt.close(fig)
    return png.getvalue()


def versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape the result."""
    return {"python": platform.python_version(),
            **distribution_versions(("vitc", "torch", "torchvision", "timm", "numpy", "pillow", "safetensors"))}


def best_of(history: list[dict[str, Any]], key: str) -> tuple[float | None, int | None]:
    """The highest value of `key` over the evaluated epochs and its epoch."""
    rows = [h for h in history if h.get(key) is not None]
    if not rows:
        return None, None
    best = max(rows, key=lambda h: h[key])
    return best[key], best["epoch"]
