"""What a study trains: its settings (presets + overrides) and the run lists of its three experiments.

Methodology (the paper's, at small scale):
- stability: for each optimizer, `samples` (lr, wd) pairs drawn log-uniformly from stated ranges; the SAME pairs
  are trained for every model, so the EDFs of ViT_C and ViT_P are paired.
- tuning: each model x optimizer takes the (lr, wd) of its lowest-error stability run (or the recipe's defaults
  with `tuning="recipe"`), the way the paper tunes each model before comparing.
- convergence: the tuned settings trained at each schedule length in `epochs`, for each training seed.
- optimizer: the SGD - AdamW error gap per model at the tuned settings, read from the convergence runs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.io import not_a_file, parse_strict_json, read_regular_file
from train.config import OPTIMIZERS
from train.sweep.sampling import sample_lr_wd
from train.sweep.spec import RunSpec

STUDIES = ("convergence", "optimizer", "stability", "all")
STUDY_FILE = "study.json"  # the study's settings and machine, written when it trains (never by --report-only)
MAX_STUDY_BYTES = 1 << 20
TUNINGS = ("sweep", "recipe")
METRICS = ("final", "best")

# Log-uniform search ranges (chosen before any study was run). AdamW's weight decay is decoupled (multiplied by
# lr at each step); SGD's is an L2 term, hence its much smaller range. Both bracket the paper's settings scaled to
# batch 128 (AdamW lr 1e-3 * 128/2048 = 6e-5 with wd 0.24; SGD Nesterov lr 2.54 * 128/2048 = 0.16 with wd
# 2.4e-5) and the higher rates short schedules on small models prefer, and reach into the unstable region on
# purpose: the EDF is about what happens away from the optimum.
DEFAULT_LR_RANGES: dict[str, tuple[float, float]] = {"adamw": (1e-4, 3e-2), "sgd": (1e-3, 1.0)}
DEFAULT_WD_RANGES: dict[str, tuple[float, float]] = {"adamw": (1e-3, 1.0), "sgd": (1e-5, 1e-2)}
# Used with tuning="recipe" (no stability sweep): moderate values from the middle of the ranges.
DEFAULT_RECIPE_SETTINGS: dict[str, tuple[float, float]] = {"adamw": (1e-3, 0.05), "sgd": (0.1, 5e-5)}


MAX_SAMPLES = 10_000
MAX_EPOCHS = 100_000  # the training CLI's own limit
MAX_SEED = 2**31 - 2  # the sampler adds the optimizer's index to sample_seed; training takes up to 2**31 - 1


def range_problem(bounds: tuple[float, float]) -> str | None:
    """Why (low, high) is not a log-uniform search range (finite, 0 < low < high), or None."""
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        return f"expected two numbers, got {bounds!r}"
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low < high):
        return f"must be finite with 0 < LOW < HIGH, got {low:g},{high:g}"
    return None


def _within(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value!r}")


def _check_pair(models: tuple[str, ...]) -> None:
    """Every claim compares ViT_C with ViT_P: a study without such a pair would train for nothing to report."""
    from models.registry import get_config
    from train.sweep.analysis import stem_pairs

    for m in models:
        get_config(m)  # KeyError naming an unknown model, before it is paired
    if not stem_pairs(models):
        raise ValueError(f"--models {','.join(models)}: the study compares ViT_C with ViT_P; give a conv-stem and a "
                         f"patchify model, e.g. vit_c_mini,vit_p_mini")


@dataclass(frozen=True)
class StudyConfig:
    """All settings of a study; stored in the study directory so a rerun can be checked against it."""

    preset: str
    models: tuple[str, ...]
    dataset: str
    epochs: tuple[int, ...]
    stability_epochs: int
    samples: int
    seeds: tuple[int, ...] = (0,)
    sample_seed: int = 0
    # The stability runs' training seed. Apart from `seeds`, so that no tuned run is the very stability run that won
    # the tuning (the lowest of `samples`: a winner's curse on that cell's mean); the report says so where they meet.
    stability_seed: int = 0
    optimizers: tuple[str, ...] = OPTIMIZERS
    train_args: tuple[str, ...] = ()
    tuning: str = "sweep"
    metric: str = "final"
    lr_ranges: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_LR_RANGES))
    wd_ranges: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_WD_RANGES))
    recipe_settings: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_RECIPE_SETTINGS))

    def __post_init__(self) -> None:
        for name in ("preset", "dataset"):  # a list or null here crashed the report (unhashable) or blamed --train-args
            value = getattr(self, name)
            if not (isinstance(value, str) and value):
                raise ValueError(f"{name} must be a non-empty string, got {value!r:.80}")
        if len(self.models) < 1:
            raise ValueError("a study needs at least one model")
        if not self.optimizers:
            raise ValueError(f"--optimizers: give at least one of {','.join(OPTIMIZERS)}")
        # A repeated entry would be trained once but counted twice: seed means, EDFs and standard errors would be
        # computed over copies of the same run.
        for name in ("models", "epochs", "seeds", "optimizers"):
            values = getattr(self, name)
            if repeated := [v for i, v in enumerate(values) if v in values[:i]]:
                raise ValueError(f"--{name} {','.join(map(str, values))}: {repeated[0]} is given twice")
        _check_pair(self.models)
        if not self.epochs or min(self.epochs) < 1:
            raise ValueError(f"schedule lengths must be positive integers, got {self.epochs}")
        if self.stability_epochs < 1 or self.samples < 1 or not self.seeds:
            raise ValueError("stability_epochs and samples must be >= 1 and seeds non-empty")
        # Bounded up front: the sampler allocates `samples` values per optimizer before any run starts.
        _within("samples", self.samples, 1, MAX_SAMPLES)
        _within("stability_epochs", self.stability_epochs, 1, MAX_EPOCHS)
        _within("sample_seed", self.sample_seed, 0, MAX_SEED)
        _within("stability_seed", self.stability_seed, 0, MAX_SEED)
        for e in self.epochs:
            _within("epochs", e, 1, MAX_EPOCHS)
        for s in self.seeds:
            _within("seeds", s, 0, MAX_SEED)
        for name in ("lr_ranges", "wd_ranges"):
            for opt, bounds in getattr(self, name).items():
                problem = range_problem(bounds)
                if problem:
                    raise ValueError(f"{name.replace('_ranges', '')} range of {opt}: {problem}")
        for opt in self.optimizers:
            if opt not in OPTIMIZERS:
                raise ValueError(f"unknown optimizer {opt!r}; expected one of {OPTIMIZERS}")
        if self.tuning not in TUNINGS:
            raise ValueError(f"unknown tuning {self.tuning!r}; expected one of {TUNINGS}")
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; expected one of {METRICS}")
        if problem := recipe_problem(self.recipe_settings, self.optimizers if self.tuning == "recipe" else ()):
            raise ValueError(problem)
        # Drawn now (milliseconds): ranges too narrow for `samples` distinct pairs are refused before any run starts.
        for opt in self.optimizers:
            try:
                sampled_pairs(self, opt)
            except ValueError as exc:
                (lr_lo, lr_hi), (wd_lo, wd_hi) = self.lr_ranges[opt], self.wd_ranges[opt]
                raise ValueError(f"--samples {self.samples}: the {opt} ranges (lr {lr_lo:g}..{lr_hi:g}, wd "
                                 f"{wd_lo:g}..{wd_hi:g}) give {exc}; widen them or lower --samples") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings."""
        d = dataclasses.asdict(self)
        for key in _LISTS:
            d[key] = list(d[key])
        for key in _RANGES:
            d[key] = {k: list(v) for k, v in d[key].items()}
        return d

    @classmethod
    def from_dict(cls, d: object) -> StudyConfig:
        """Inverse of `to_dict` (the config a study.json records); ValueError when it is not one."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a dict of settings, got {type(d).__name__}")
        unknown = sorted(map(str, d.keys() - {f.name for f in dataclasses.fields(cls)}))
        if unknown:
            raise ValueError(f"unknown settings {', '.join(unknown)}")
        if "stability_seed" not in d and isinstance(d.get("seeds"), list) and d["seeds"]:
            d = {**d, "stability_seed": d["seeds"][0]}  # recorded before the field: stability ran on the first seed
        if problem := _shape_problem(d):
            raise ValueError(problem)
        try:
            values = {**d, **{k: tuple(d[k]) for k in _LISTS if k in d},
                      **{k: {o: tuple(b) for o, b in d[k].items()} for k in _RANGES if k in d}}
            return cls(**values)
        except (TypeError, KeyError, AttributeError) as exc:  # a value of the wrong kind, an unknown model
            raise ValueError(f"{type(exc).__name__}: {exc}") from None


_LISTS = ("models", "epochs", "seeds", "optimizers", "train_args")
_RANGES = ("lr_ranges", "wd_ranges", "recipe_settings")
_ITEMS = {"models": str, "epochs": int, "seeds": int, "optimizers": str, "train_args": str}  # each list's entries
# The single settings, by type: "16" for samples was compared with an int and said as Python's TypeError.
_SCALARS = {"preset": str, "dataset": str, "stability_epochs": int, "samples": int, "sample_seed": int,
            "stability_seed": int, "tuning": str, "metric": str}


def _shape_problem(d: dict[str, Any]) -> str | None:
    """Which recorded setting has the wrong type or shape, or None: a string here was split into its letters
    (train_args "ab" was refused as --train-args 'a b'), a number crashed the report later."""
    for key in _LISTS:
        if key not in d:
            continue
        kind = _ITEMS[key]
        if not isinstance(d[key], list):
            return f"{key} must be a list, got {d[key]!r:.80}"
        if bad := [x for x in d[key] if not isinstance(x, kind) or isinstance(x, bool)]:
            return f"{key} must be a list of {'strings' if kind is str else 'integers'}, got {bad[0]!r:.80} in it"
    for key in _RANGES:
        if key not in d:
            continue
        if not isinstance(d[key], dict):
            return f"{key} must be an object of optimizer: [two numbers], got {d[key]!r:.80}"
        for opt, pair in d[key].items():
            if not (isinstance(pair, list) and len(pair) == 2 and all(_is_number(x) for x in pair)):
                return f"{key}.{opt} must be two numbers, got {pair!r:.80}"
    # After the lists: a stability_seed an old record lacks is taken from its seeds, named there if wrong.
    for key, kind in _SCALARS.items():
        if key in d and (not isinstance(d[key], kind) or isinstance(d[key], bool)):
            return f"{key} must be {'a string' if kind is str else 'an integer'}, got {d[key]!r:.80}"
    return None


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def recipe_problem(settings: dict[str, tuple[float, float]], needed: tuple[str, ...]) -> str | None:
    """Why the recipe (lr, wd) settings cannot train: an optimizer in `needed` without one, or an lr that is not
    finite and > 0 or a wd that is not finite and >= 0; or None."""
    if missing := [o for o in needed if o not in settings]:
        return f"recipe_settings has no (lr, wd) for {', '.join(missing)} (tuning \"recipe\" trains with them)"
    for opt, (lr, wd) in settings.items():
        if not (math.isfinite(lr) and math.isfinite(wd) and lr > 0 and wd >= 0):
            return f"recipe_settings.{opt} must be an lr > 0 and a weight decay >= 0, got {lr!r}, {wd!r}"
    return None


def sampled_pairs(cfg: StudyConfig, opt: str) -> list[tuple[float, float]]:
    """The optimizer's `samples` distinct (lr, wd) pairs; ValueError when its ranges cannot give that many."""
    # One seed per optimizer (offset by its place in OPTIMIZERS) so adding an optimizer does not change the others'.
    offset = OPTIMIZERS.index(opt) if opt in OPTIMIZERS else cfg.optimizers.index(opt)
    return sample_lr_wd(cfg.samples, cfg.lr_ranges[opt], cfg.wd_ranges[opt], cfg.sample_seed + offset)


def stability_specs(cfg: StudyConfig) -> list[RunSpec]:
    """The sampled runs: the same `samples` (lr, wd) pairs per optimizer for every model, none of them twice (a
    repeat would be trained once but counted twice by the EDF)."""
    specs = []
    for opt in cfg.optimizers:
        pairs = sampled_pairs(cfg, opt)
        for model in cfg.models:
            for lr, wd in pairs:
                specs.append(_spec(cfg, model, opt, lr, wd, cfg.stability_epochs, cfg.stability_seed))
    return specs


def tuned_specs(
    cfg: StudyConfig, tuned: dict[tuple[str, str], tuple[float, float]], epochs: tuple[int, ...]
) -> list[RunSpec]:
    """Runs at each tuned model x optimizer's (lr, wd), for every schedule length in `epochs` and every seed."""
    return [
        _spec(cfg, model, opt, *tuned[(model, opt)], e, seed)
        for model in cfg.models
        for opt in cfg.optimizers
        if (model, opt) in tuned
        for e in epochs
        for seed in cfg.seeds
    ]


def tuned_epochs(cfg: StudyConfig, study: str) -> tuple[int, ...]:
    """Schedule lengths the tuned runs need: all of `epochs` for convergence, only the longest for optimizer."""
    if study == "stability":
        return ()
    if study == "optimizer":
        return (max(cfg.epochs),)
    return tuple(sorted(set(cfg.epochs)))


def needs_stability(cfg: StudyConfig, study: str) -> bool:
    """Stability runs are trained for the stability study and, with tuning="sweep", to tune the others."""
    return study in ("stability", "all") or cfg.tuning == "sweep"


def recipe_tuning(cfg: StudyConfig) -> dict[tuple[str, str], tuple[float, float]]:
    """tuning="recipe": every model uses the optimizer's default (lr, wd)."""
    return {(m, o): cfg.recipe_settings[o] for m in cfg.models for o in cfg.optimizers}


def _spec(cfg: StudyConfig, model: str, opt: str, lr: float, wd: float, epochs: int, seed: int) -> RunSpec:
    return RunSpec(model, cfg.dataset, opt, lr, wd, epochs, seed, cfg.train_args)


def recorded_study(study_dir: Path) -> tuple[StudyConfig, str] | None:
    """(config, study) that study.json in `study_dir` records, None without one; ValueError when it is damaged."""
    path = study_dir / STUDY_FILE
    # A directory or a FIFO there is damage, not a study never started: "no study.json" would have the user start
    # the study again onto it. (OSError: a directory on the way that cannot be searched, said by the caller.)
    if (why := not_a_file(path)) == "is missing":
        return None
    if why:
        raise ValueError(f"{path}: not a readable study record ({why})")
    try:
        # A regular file (one swapped for a FIFO is not waited on), a few KB: never more than MAX_STUDY_BYTES of it
        # read, its nesting bounded.
        doc = parse_strict_json(read_regular_file(path, MAX_STUDY_BYTES), MAX_STUDY_BYTES, non_finite=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable study record ({type(exc).__name__}: {exc})") from None
    if problem := _record_problem(doc):
        raise ValueError(f"{path}: not a readable study record ({problem})")
    study, config = doc["study"], doc["config"]
    try:
        cfg = StudyConfig.from_dict(config)
    except (ValueError, KeyError) as exc:  # the setting at fault, named as the file spells it
        raise ValueError(f"{path}: not a readable study record (config: {exc.args[0] if exc.args else exc})") from None
    if study not in STUDIES:
        raise ValueError(f"{path}: unknown study {study!r}")
    if problem := machines_problem(doc):
        raise ValueError(f"{path}: {problem}")
    return cfg, study


_JSON_TYPES = ((bool, "a boolean"), (str, "a string"), (int | float, "a number"), (list, "a list"), (dict, "an object"))


def _record_problem(doc: object) -> str | None:
    """Why a parsed study.json is not an object with a study and a config, said in words (not a TypeError), or None."""
    if not isinstance(doc, dict):
        kind = next((name for t, name in _JSON_TYPES if isinstance(doc, t)), "null")
        return f"the top level must be a JSON object with a study and a config, got {kind}"
    missing = [key for key in ("study", "config") if key not in doc]
    return f"no {missing[0]}" if missing else None


def machines_problem(doc: dict[str, Any]) -> str | None:
    """Why the machines a study.json names cannot be reported (the claims' "trained on" line reads them), or None."""
    from train.sweep.runner import machine_problem

    if doc.get("machine") is not None and (problem := machine_problem(doc["machine"])):
        return problem
    machines = doc.get("machines")
    if machines is None:
        return None
    if not isinstance(machines, list):
        return f"machines must be a list of machine objects, got {machines!r:.80}"
    for i, mach in enumerate(machines, 1):
        if problem := machine_problem(mach, f"machines[{i}]"):
            return problem
    return None
