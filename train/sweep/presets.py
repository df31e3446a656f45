"""Named study sizes: `full` (the default study: hours on 2 CPU cores, minutes on a GPU) and `reduced`
(<= 60 min on 2 cores)."""

from __future__ import annotations

import dataclasses
from typing import Any

from train.sweep.plan import StudyConfig

# Sizes measured on the 2-core dev machine (1 training thread per worker, 2 workers): vit_c/p_micro train at
# ~500 img/s (18 s per animals epoch) and vit_c/p_mini at ~77-79 img/s (~115 s per epoch, C/P 0.98); every run
# also pays ~10-20 s of interpreter, torch and data start-up.
PRESETS: dict[str, dict[str, Any]] = {
    # The default study: the mini pair (flops C/P 1.009) on animals, 112 runs: 64 stability runs x 3 epochs (seed 0)
    # + 2 models x 2 optimizers x 3 fresh seeds x (3 + 6 + 12 + 24) tuned epochs = 732 epochs, ~12 h on 2 cores at
    # ~115 s per epoch per worker; a GPU runs several workers at once (--workers N --devices 0). It resumes where it
    # stopped. The tuned seeds are not the stability seed: no tuned run is the stability run that won the tuning.
    "full": {
        "models": ("vit_c_mini", "vit_p_mini"),
        "dataset": "animals",
        "epochs": (3, 6, 12, 24),
        "stability_epochs": 3,
        "samples": 16,
        "seeds": (1, 2, 3),
        "stability_seed": 0,
        "train_args": (),
    },
    # <= 60 min on 2 cores: the same methodology and sample count on the nano pair (micro-sized, at flops parity:
    # C/P 1.007), on the full train set with shorter schedules, three training seeds per tuned schedule run.
    "reduced": {
        "models": ("vit_c_nano", "vit_p_nano"),
        "dataset": "animals",
        "epochs": (2, 4, 8),
        "stability_epochs": 2,
        "samples": 16,
        "seeds": (1, 2, 3),
        "stability_seed": 0,
        "train_args": (),
    },
}


def make_config(preset: str, **overrides: Any) -> StudyConfig:
    """The preset's settings with every non-None override applied (validated by StudyConfig)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    cfg = StudyConfig(preset=preset, **PRESETS[preset])
    changes = {k: v for k, v in overrides.items() if v is not None}
    for key in ("lr_ranges", "wd_ranges"):
        if key in changes:
            changes[key] = {**getattr(cfg, key), **changes[key]}
    return dataclasses.replace(cfg, **changes)


def overrides(cfg: StudyConfig) -> list[str]:
    """The flags (--seeds, --train-args, ...) of the settings in which `cfg` differs from its preset (a report on a
    study with any of them is not "the reduced preset"); every setting when the preset is unknown."""
    fields = [f.name for f in dataclasses.fields(StudyConfig) if f.name != "preset"]
    base = StudyConfig(preset=cfg.preset, **PRESETS[cfg.preset]) if cfg.preset in PRESETS else None
    flags = {"lr_ranges": "--lr-range", "wd_ranges": "--wd-range", "recipe_settings": "recipe settings"}
    return [flags.get(k, "--" + k.replace("_", "-")) for k in fields
            if base is None or getattr(cfg, k) != getattr(base, k)]
