"""Rows of the complexity table, as dicts (for --json) or as aligned text."""

from __future__ import annotations

from typing import Any

from models.complexity import complexity
from models.registry import get_config, list_variants

COLUMNS = ("name", "stem", "depth", "dim", "heads", "mlp_dim", "image_size", "patch_size")


def variant_rows(bookkeeping: str = "paper", num_classes: int = 1000) -> list[dict[str, Any]]:
    """One dict per variant: the config columns plus integer flops, params and acts."""
    rows = []
    for name in list_variants():
        cfg = get_config(name, num_classes=num_classes)
        c = complexity(cfg, bookkeeping)
        row = {col: getattr(cfg, col) for col in COLUMNS if col != "stem"}
        row["stem"] = cfg.stem.kind
        rows.append({**{k: row[k] for k in COLUMNS}, "flops": c.flops, "params": c.params, "acts": c.acts})
    return rows


def _amount(value: float) -> str:
    """Two decimals, or two significant digits below 0.1 (a micro model's 0.0041 GFLOPs is not 0.00)."""
    return f"{value:.2f}" if value >= 0.1 or value == 0 else f"{value:.2g}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Aligned text table with GFLOPs, M params and M acts."""
    head = ("name", "stem", "depth", "dim", "heads", "mlp", "image", "patch", "GFLOPs", "M params", "M acts")
    lines = [
        (
            r["name"], r["stem"], r["depth"], r["dim"], r["heads"], r["mlp_dim"], r["image_size"], r["patch_size"],
            _amount(r["flops"] / 1e9), _amount(r["params"] / 1e6), _amount(r["acts"] / 1e6),
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*map(str, line)) for line in (head, *lines))
