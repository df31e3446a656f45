"""Turn finished runs into the study's numbers: EDFs, tuned settings, convergence, optimizer gaps, claims."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from train.sweep.edf import edf_stats
from train.sweep.spec import RunSpec

Result = dict[str, Any]
MISSING_ERROR = 100.0  # a run without a usable val error counts as getting nothing right


def _finite_or_chance(err: float | None) -> float:
    return MISSING_ERROR if err is None or not math.isfinite(err) else float(err)


def run_error(result: Result, metric: str = "final") -> float:
    """The error (%) a run is judged by.

    "final": val error of the raw weights after the last epoch (no selection of any kind).
    "best": lowest val error over epochs and over raw/EMA weights (pycls's min_top1_err, optimistic).
    A run that diverged counts as getting nothing right under either (its NaN logits' argmax would otherwise be
    scored as one constant class, near chance, and could "beat" a finite run in a paired comparison).
    """
    training = result.get("training")
    if isinstance(training, dict) and training.get("diverged"):
        return MISSING_ERROR
    if metric == "final":
        return _finite_or_chance(result.get("final_val_error"))
    errs = [e for rec in result.get("curve", []) for e in (rec.get("val_error"), rec.get("val_error_ema"))
            if e is not None]
    return min((_finite_or_chance(e) for e in errs), default=_finite_or_chance(result.get("final_val_error")))


def stem_pairs(models: Sequence[str]) -> list[tuple[str, str]]:
    """(ViT_C, ViT_P) pairs among `models`: vit_c_X with vit_p_X, else the single conv and patchify models."""
    pairs = [(m, "vit_p_" + m[len("vit_c_"):]) for m in models if m.startswith("vit_c_")]
    pairs = [(c, p) for c, p in pairs if p in models]
    if pairs:
        return pairs
    from models.registry import get_config

    conv = [m for m in models if get_config(m).stem.kind == "conv"]
    patch = [m for m in models if get_config(m).stem.kind == "patchify"]
    return [(conv[0], patch[0])] if len(conv) == 1 and len(patch) == 1 else []


def errors_by_spec(specs: Sequence[RunSpec], results: dict[str, Result], metric: str) -> dict[RunSpec, float]:
    """Error of every finished spec (unfinished ones are left out)."""
    return {s: run_error(results[s.run_id], metric) for s in specs if s.run_id in results}


def stability(
    specs: Sequence[RunSpec], errors: dict[RunSpec, float], good_margin: float = 5.0
) -> dict[str, dict[str, Any]]:
    """Per optimizer: EDF stats per model (with a shared 'best' so frac_good compares fairly) and the raw errors."""
    by: dict[str, dict[str, list[tuple[RunSpec, float]]]] = defaultdict(lambda: defaultdict(list))
    for s in specs:
        if s in errors:
            by[s.optimizer][s.model].append((s, errors[s]))
    out: dict[str, dict[str, Any]] = {}
    for opt, models in by.items():
        best = min(e for runs in models.values() for _, e in runs)
        out[opt] = {
            m: {
                **edf_stats([e for _, e in runs], good_margin, best),
                "runs": [{"lr": s.lr, "weight_decay": s.weight_decay, "error": round(e, 3)} for s, e in runs],
            }
            for m, runs in models.items()
        }
    return out


def tune(specs: Sequence[RunSpec], errors: dict[RunSpec, float]) -> dict[tuple[str, str], tuple[float, float]]:
    """Each model x optimizer's (lr, wd) of its lowest-error run among `specs` (ties: the first sampled)."""
    best: dict[tuple[str, str], tuple[float, RunSpec]] = {}
    for s in specs:
        if s not in errors:
            continue
        key = (s.model, s.optimizer)
        if key not in best or errors[s] < best[key][0]:
            best[key] = (errors[s], s)
    return {k: (s.lr, s.weight_decay) for k, (_, s) in best.items()}


def schedule_table(specs: Sequence[RunSpec], errors: dict[RunSpec, float]) -> dict[str, dict[str, dict[int, Any]]]:
    """model -> optimizer -> epochs -> {mean, std, n, lr, weight_decay}: error over the training seeds."""
    groups: dict[tuple[str, str, int], list[tuple[RunSpec, float]]] = defaultdict(list)
    for s in specs:
        if s in errors:
            groups[(s.model, s.optimizer, s.epochs)].append((s, errors[s]))
    out: dict[str, dict[str, dict[int, Any]]] = defaultdict(lambda: defaultdict(dict))
    for (model, opt, epochs), runs in sorted(groups.items()):
        errs = np.array([e for _, e in runs])
        out[model][opt][epochs] = {
            "mean": float(errs.mean()),
            "std": float(errs.std(ddof=1)) if errs.size > 1 else None,
            "n": int(errs.size),
            "lr": runs[0][0].lr,
            "weight_decay": runs[0][0].weight_decay,
        }
    return {m: dict(v) for m, v in out.items()}


def optimizer_gaps(table: dict[str, dict[str, dict[int, Any]]]) -> dict[str, dict[int, float]]:
    """model -> epochs -> SGD error minus AdamW error (positive: SGD is worse)."""
    gaps: dict[str, dict[int, float]] = {}
    for model, opts in table.items():
        if "sgd" in opts and "adamw" in opts:
            common = sorted(set(opts["sgd"]) & set(opts["adamw"]))
            gaps[model] = {e: opts["sgd"][e]["mean"] - opts["adamw"][e]["mean"] for e in common}
    return gaps
