"""Training configuration: the recipes (paper, paper-sgd, small), every knob, and its range checks.

A recipe is a set of defaults; any knob given explicitly overrides it. `resolve_config` also merges a resumed
run's saved configuration, refusing explicit changes that would alter the training trajectory.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from data.datasets import EMBEDDED, content_key
from models.host import MAX_THREADS


class ConfigError(ValueError):
    """An out-of-range or inconsistent training option."""


# How an allocation failure reads: torch's CPU allocator, CUDA's caching allocator, and the OS's errno 12.
# The paper's recipe (ImageNet-1k, batch 2048). `lr` is the rate at `lr_ref_batch` and is scaled linearly to
# the global batch. EMA: the paper's 1.6e-3 per 32 steps averages over ~7.8 % of its 400-epoch run, stated
# here as that fraction of the run so it transfers to other dataset sizes.
_PAPER: dict[str, Any] = {
    "optimizer": "adamw", "lr": 1e-3, "lr_ref_batch": 2048, "batch_size": 256, "weight_decay": 0.24,
    "betas": (0.9, 0.999), "eps": 1e-8, "momentum": 0.9, "nesterov": True, "epochs": 400,
    "warmup_epochs": 5.0, "warmup_start": 0.1, "min_lr_ratio": 0.005, "label_smoothing": 0.1,
    "mixup": 0.8, "cutmix": 1.0, "mix_prob": 1.0, "augment": "autoaugment", "crop_scale": 0.08, "hflip": 0.5,
    "ema": True, "ema_horizon": 0.078, "ema_every": 32, "clip_grad": 0.0,
}
RECIPES: dict[str, dict[str, Any]] = {
    "paper": _PAPER,
    # The reference code's SGD: Nesterov momentum 0.9, lr 2.54 at batch 2048, weight decay 2.4e-5.
    "paper-sgd": {**_PAPER, "optimizer": "sgd", "lr": 2.54, "weight_decay": 2.4e-5},
    # Minutes on 2 CPU cores for the 32x32 embedded sets (vit_c_mini: 92 % on animals in 8 epochs): short
    # warm-up, light augmentation, no mixing, an EMA over the last tenth of the run.
    "small": {
        **_PAPER, "lr": 1e-3, "lr_ref_batch": 128, "batch_size": 128, "weight_decay": 0.05, "epochs": 6,
        "warmup_epochs": 1.0, "min_lr_ratio": 0.01, "mixup": 0.0, "cutmix": 0.0, "augment": "light",
        "crop_scale": 0.6, "ema_horizon": 0.1, "ema_every": 1,
    },
}
AUGMENTS = ("none", "light", "autoaugment")
OPTIMIZERS = ("adamw", "sgd")
AMP_MODES = ("auto", "bf16", "off")
DEVICES = ("auto", "cpu", "cuda")
CORRUPT_POLICIES = ("skip", "fail")
MAX_BATCH = 65536
# A batch allocated whole on one device, outside training's recipe (train.eval's --batch-size, the runtime
# measurement's --batch): bounded before it is asked for.
MAX_DEVICE_BATCH = 4096
MAX_WORKERS = 64  # data-loading processes (--workers, train.eval's too)

# Knobs a resumed run may change (and only these): none changes the training's trajectory, its data, schedule or
# randomness. Two change how float sums round, though: `threads` (the CPU's reduction order) and `compile` (fused
# kernels); a resume that changes either on the CPU says in a `note:` that its weights will not be bit-identical to an
# uninterrupted run's (`train.trainer.changed_numerics`), rather than refuse (a preempted job resumed on a node with
# another core count must go on).
RUNTIME_FIELDS = frozenset({
    "out", "resume", "overwrite", "max_steps", "workers", "threads", "progress", "eval_every",
    "save_every_steps", "corrupt", "compile", "eval_batch_size",
})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; `recipe` supplies the defaults of the optimisation knobs."""

    model: str
    dataset: str
    out: str
    recipe: str = "small"
    epochs: int = 6
    max_steps: int = 0
    batch_size: int = 128
    eval_batch_size: int = 0
    optimizer: str = "adamw"
    lr: float = 1e-3
    lr_ref_batch: int = 128
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9
    nesterov: bool = True
    warmup_epochs: float = 1.0
    warmup_start: float = 0.1
    min_lr_ratio: float = 0.01
    clip_grad: float = 0.0
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0
    augment: str = "light"
    crop_scale: float = 0.6
    hflip: float = 0.5
    ema: bool = True
    ema_horizon: float = 0.1
    ema_every: int = 1
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    workers: int | None = None
    threads: int | None = None
    train_subset: int = 0
    val_subset: int = 0
    eval_every: int = 1
    save_every_steps: int = 0
    corrupt: str = "skip"
    progress: bool | None = None
    resume: bool = False
    overwrite: bool = False
    command: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`; unknown keys are an error."""
        if not isinstance(d, dict):
            raise ConfigError(f"a configuration must be a dict, got {type(d).__name__}")
        unknown = sorted(str(k) for k in d.keys() - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown configuration keys: {', '.join(unknown)}")
        d = dict(d)
        for k in ("betas", "command"):
            if k in d:
                if not isinstance(d[k], list | tuple):
                    raise ConfigError(f"{k} must be a list, got {d[k]!r:.80}")
                d[k] = tuple(d[k])
        return cls(**d)

    def trajectory(self) -> dict[str, Any]:
        """The fields that determine the computation (what a resume must not change)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS and k != "command"}


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _finite(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def validate(c: TrainConfig) -> None:
    """Range-check every knob; raises ConfigError naming the option and the allowed range."""
    from models.registry import list_variants

    # A resumed run's model is the definition it recorded, registered in this process or not (a custom variant a
    # script registered): the trainer refuses one the run did not record (`Trainer._model_config`).
    _check(c.resume or c.model in list_variants(), f"unknown model {c.model!r}; known: {', '.join(list_variants())}")
    _check(c.recipe in RECIPES, f"unknown recipe {c.recipe!r}; known: {', '.join(RECIPES)}")
    _check(bool(c.dataset), "--dataset is required")
    _check(bool(c.out), "--out is required")
    for name, lo, hi in (
        ("epochs", 0, 100_000), ("max_steps", 0, 10**9), ("batch_size", 1, MAX_BATCH),
        ("eval_batch_size", 0, MAX_BATCH), ("lr_ref_batch", 1, 10**7), ("ema_every", 1, 10**6),
        ("seed", 0, 2**31 - 1), ("train_subset", 0, 10**9), ("val_subset", 0, 10**9), ("eval_every", 1, 100_000),
        ("save_every_steps", 0, 10**9),
    ):
        v = getattr(c, name)
        _check(isinstance(v, int) and lo <= v <= hi,
               f"--{name.replace('_', '-')} must be an integer in [{lo}, {hi}], got {v!r}")
    for name, lo, hi in (("workers", 0, MAX_WORKERS), ("threads", 1, MAX_THREADS)):
        v = getattr(c, name)
        _check(v is None or (isinstance(v, int) and lo <= v <= hi),
               f"--{name} must be an integer in [{lo}, {hi}], got {v!r}")
    for name, lo, hi, lo_open in (
        ("lr", 0.0, 100.0, True), ("weight_decay", 0.0, 10.0, False), ("eps", 0.0, 1.0, True),
        ("momentum", 0.0, 1.0, False), ("warmup_epochs", 0.0, 100_000.0, False), ("warmup_start", 0.0, 1.0, False),
        ("min_lr_ratio", 0.0, 1.0, False), ("clip_grad", 0.0, 1e6, False), ("label_smoothing", 0.0, 0.99, False),
        ("mixup", 0.0, 100.0, False), ("cutmix", 0.0, 100.0, False), ("mix_prob", 0.0, 1.0, False),
        ("crop_scale", 0.0, 1.0, True), ("hflip", 0.0, 1.0, False), ("ema_horizon", 0.0, 1.0, True),
    ):
        v = getattr(c, name)
        ok = _finite(v) and (lo < v if lo_open else lo <= v) and v <= hi
        _check(ok, f"--{name.replace('_', '-')} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")
    _check(len(c.betas) == 2 and all(_finite(b) and 0.0 <= b < 1.0 for b in c.betas),
           f"--betas must be two numbers in [0, 1), got {c.betas!r}")
    for name, choices in (("optimizer", OPTIMIZERS), ("augment", AUGMENTS), ("amp", AMP_MODES),
                          ("device", DEVICES), ("corrupt", CORRUPT_POLICIES)):
        v = getattr(c, name)
        _check(v in choices, f"--{name} must be one of {', '.join(choices)}, got {v!r}")
    _check(not (c.resume and c.overwrite), "--resume and --overwrite exclude each other")


def normalize_dataset(name: str) -> str:
    """Embedded names stay as they are; folders become absolute paths (checkpoints must find them later); an empty
    name stays empty (Path("") would be the current directory), for the "required" check to refuse."""
    return name if name in EMBEDDED or not name.strip() else str(Path(name).expanduser().resolve())


def _names(arg: str, flag: str, shortest: str) -> bool:
    """Whether `arg` named `flag`: in full, or abbreviated down to `shortest` (the shortest prefix no other option
    shares) as argparse took it before train's parser refused abbreviations, as a run recorded it then."""
    return len(arg) >= len(shortest) and flag.startswith(arg)


def _without(command: tuple[str, ...], flag: str, shortest: str) -> tuple[str, ...]:
    """`command` without its `flag VALUE` and `flag=VALUE` (however abbreviated, see `_names`)."""
    kept: list[str] = []
    skip = False
    for i, arg in enumerate(command):
        if skip:
            skip = False
            continue
        if _names(arg, flag, shortest) and i + 1 < len(command):
            skip = True
            continue
        if not (arg.startswith(shortest) and "=" in arg and _names(arg.partition("=")[0], flag, shortest)):
            kept.append(arg)
    return tuple(kept)


def with_max_steps(command: tuple[str, ...], steps: int) -> tuple[str, ...]:
    """`command` with its --max-steps set to `steps` (left out for 0: no limit)."""
    kept = _without(command, "--max-steps", "--ma")
    return (*kept, "--max-steps", str(steps)) if steps else kept


def with_dataset(command: tuple[str, ...], dataset: str) -> tuple[str, ...]:
    """`command` with its --dataset set to `dataset` (where a resumed run's data lie now)."""
    return (*_without(command, "--dataset", "--da"), "--dataset", dataset)


def _moved(old: object, new: object) -> bool:
    """Whether a resume names another folder than the one the run recorded (an embedded set moves nowhere)."""
    return old != new and isinstance(old, str) and old not in EMBEDDED and isinstance(new, str) and new not in EMBEDDED


def resolve_config(explicit: dict[str, Any], saved: dict[str, Any] | None = None, *,
                   movable_data: bool = False) -> TrainConfig:
    """Recipe defaults (or a resumed run's saved config) overridden by the explicitly given options. With
    `movable_data` (the resumed run recorded its data fingerprints and content samples) --dataset may name another
    folder: the trainer goes on there only when its files are the run's (`Trainer._check_same_data`)."""
    explicit = {k: v for k, v in explicit.items() if v is not None}
    if "dataset" in explicit:
        explicit["dataset"] = normalize_dataset(str(explicit["dataset"]))
    if saved is not None:
        # How the run was started is not how it goes on: a run begun with --overwrite resumes like any other.
        base = {k: v for k, v in saved.items() if k in {f.name for f in fields(TrainConfig)} and k != "overwrite"}
        base["resume"] = True  # read as the config of the run being resumed (whose model the run recorded)
        # The command that reruns the training is the one that began it, not the `--resume` one, with where the
        # run now stops (the one runtime option that decides the weights) and where its data lie now.
        kept = {}
        if base.get("command"):
            steps = explicit.get("max_steps", base.get("max_steps", 0))
            kept["command"] = with_max_steps(tuple(base["command"]), steps)
            if movable_data and _moved(base.get("dataset"), explicit.get("dataset", base.get("dataset"))):
                kept["command"] = with_dataset(kept["command"], explicit["dataset"])
        merged = TrainConfig.from_dict({**base, **explicit, **kept})
        old = TrainConfig.from_dict(base).trajectory()
        now = merged.trajectory()
        if movable_data and _moved(old.get("dataset"), now["dataset"]):
            old["dataset"] = now["dataset"]  # the same data elsewhere: its prints and samples decide, not its path
        changed = sorted(k for k, v in now.items() if old.get(k) != v)
        if changed:
            detail = ", ".join(f"--{k.replace('_', '-')} {old.get(k)!r} -> {now[k]!r}" for k in changed)
            raise ConfigError(f"--resume cannot change how the run trains ({detail}); use a new --out instead")
        return merged
    for req in ("model", "dataset", "out"):
        _check(req in explicit, f"--{req} is required")
    recipe = explicit.get("recipe", "auto")
    if recipe == "auto":
        recipe = "small" if explicit["dataset"] in EMBEDDED else "paper"
    _check(recipe in RECIPES, f"unknown recipe {recipe!r}; known: auto, {', '.join(RECIPES)}")
    values = {**RECIPES[recipe], **explicit, "recipe": recipe}
    if values["augment"] == "none" and "hflip" not in explicit:
        # none is the evaluation view alone: a flip the user did not ask for would train left/right-sensitive
        # classes (text, digits) on mirror images. Resolved here, once: the run records (and resumes with) 0.
        values["hflip"] = 0.0
    return TrainConfig(**values)


def checked_saved_config(saved: dict[str, Any]) -> dict[str, Any]:
    """`saved` when it is a valid configuration on its own; else CheckpointError (resume.pt is damaged)."""
    from train.state import damaged

    base = {k: v for k, v in saved.items() if k in {f.name for f in fields(TrainConfig)}}
    try:
        # Read as the run being resumed: its model need not be registered (the run recorded it), and a run begun
        # with --overwrite resumes like any other (as resolve_config reads it).
        TrainConfig.from_dict({**base, "resume": True, "overwrite": False})
    except (ConfigError, TypeError) as exc:  # TypeError: a value of the wrong kind (e.g. a list as a name)
        raise damaged(f"config: {exc}") from None
    return saved


def _differences(recorded: dict[str, Any], cfg: TrainConfig, same_data: bool = False) -> list[str]:
    """The trajectory fields in which `cfg` differs from a run's recorded configuration (keys both know); with
    `same_data` (both record the same data fingerprints) not the dataset's path, which may have moved."""
    return [f"{k}: {recorded[k]!r} vs {v!r}" for k, v in cfg.trajectory().items()
            if k in recorded and recorded[k] != v and not (same_data and k == "dataset")]


def check_same_run(cfg: TrainConfig, source: str, data: object = None) -> None:
    """With --resume, the checkpoint already in --out must be this very run's: a resume.pt copied from another
    run (or a fresh start where resume.pt is missing) would otherwise replace it. CheckpointError if it is not.
    `data`: the data fingerprints resume.pt recorded (the same as the checkpoint's: the data moved, not changed)."""
    from models.checkpoint import META_FILE, CheckpointError, read_checkpoint_meta

    out = Path(cfg.out)
    if not (out / META_FILE).exists():
        return
    meta = read_checkpoint_meta(out)
    recorded = meta.training.config if meta.training is not None else None
    if meta.model != cfg.model:
        diff = [f"model: {meta.model!r} vs {cfg.model!r}"]
    else:
        # checkpoint.json's record is read as the two fingerprints (models.checkpoint), resume.pt's has the samples too
        same_data = (isinstance(data, dict) and meta.training is not None and bool(meta.training.data)
                     and meta.training.data == {split: data.get(split) for split in ("train", "val")})
        diff = _differences(recorded, cfg, same_data) if isinstance(recorded, dict) else []
    if diff:
        raise CheckpointError(f"{source} does not belong to the run in {out} (checkpoint.json vs {source}: "
                              f"{'; '.join(diff[:3])}); nothing was changed, --overwrite starts that run over")


def recorded_hflip(explicit: dict[str, Any]) -> dict[str, Any]:
    """{"hflip": ...} that --out's checkpoint.json records for an --augment none run, for a --resume with no
    resume.pt and no --hflip (an --epochs 0 run keeps none): an earlier vitc recorded 0.5 there, today's default
    0, and the run is the same one. {} otherwise."""
    from models.checkpoint import META_FILE, CheckpointError, read_checkpoint_meta

    out = explicit.get("out")
    if "hflip" in explicit or not out or not (Path(out) / META_FILE).exists():
        return {}
    try:
        training = read_checkpoint_meta(out).training
    except CheckpointError:  # check_same_run says it, after the options' own checks
        return {}
    recorded = training.config if training is not None else None
    if not isinstance(recorded, dict) or recorded.get("augment") != "none" or "hflip" not in recorded:
        return {}
    return {"hflip": recorded["hflip"]}


def check_data_present(dataset: str, data: object) -> None:
    """ConfigError naming the folder a resumed run recorded when it is gone (moved, or its mount is elsewhere), with
    the one way on that works for its resume.pt's data record `data` (`unrecorded`)."""
    if dataset in EMBEDDED or Path(dataset).exists():
        return
    if (missing := unrecorded(data)) is not None:  # --dataset elsewhere would be refused by check_movable
        raise ConfigError(f"--resume: the run's data folder {dataset} (recorded in resume.pt) is missing, and its "
                          f"resume.pt predates {missing} files elsewhere are the ones that were there: put the data "
                          f"back at {dataset} (or a link to it)")
    raise ConfigError(f"--resume: the run's data folder {dataset} (recorded in resume.pt) is missing: pass "
                      "--dataset with the data's new location")


def samples_recorded(data: object) -> bool:
    """Whether a run's data record (resume.pt's `data`) holds both splits' content samples beside their
    fingerprints: what a move to another folder is checked by (names and sizes alone do not tell the files)."""
    return isinstance(data, dict) and all(isinstance(data.get(content_key(s)), str) for s in ("train", "val"))


def unrecorded(data: object) -> str | None:
    """What a resume.pt's data record `data` lacks to show that files in another folder are the run's ("the data
    fingerprints that would show", ...), or None when it can: the data fingerprints, or the content samples."""
    if data is None:
        return "the data fingerprints that would show"
    if not samples_recorded(data):
        return "the sampled file contents that, with the file names and sizes, would show"
    return None


def unmovable(data: object, old: object, new: str) -> str | None:
    """Why a run whose resume.pt recorded `data` cannot move from folder `old` to `new`, or None (`unrecorded`)."""
    if (missing := unrecorded(data)) is None:
        return None
    return (f"--resume cannot move this run to {new}: its resume.pt predates {missing} the files are the ones at "
            f"{old}; put them back there (or a link to them)")


def check_movable(explicit: dict[str, Any], saved: dict[str, Any], state: dict[str, Any]) -> None:
    """ConfigError for a --dataset naming another folder than a resume.pt without data fingerprints and content
    samples recorded: nothing could show that the files there are the run's."""
    old, new = saved.get("dataset"), explicit.get("dataset")
    if new is None or not _moved(old, normalize_dataset(str(new))):
        return
    if (why := unmovable(state.get("data"), old, normalize_dataset(str(new)))) is not None:
        raise ConfigError(why)


def config_from_options(explicit: dict[str, Any]) -> TrainConfig:
    """The run's config from explicit CLI options; with --resume, the saved run's config is the base (and must be
    the run whose checkpoint --out holds)."""
    saved = state = None
    if explicit.get("resume") and explicit.get("out"):
        from train.state import load_resume

        state = load_resume(explicit["out"], mmap=True)
        saved = None if state is None else checked_saved_config(state["config"])
        if saved is not None and explicit.get("recipe") == "auto":
            explicit = {k: v for k, v in explicit.items() if k != "recipe"}
        if saved is None:
            explicit = {**explicit, **recorded_hflip(explicit)}
    if saved is not None:
        check_movable(explicit, saved, state)
    cfg = resolve_config(explicit, saved, movable_data=state is not None and samples_recorded(state.get("data")))
    if saved is not None:
        if "dataset" not in explicit:
            check_data_present(cfg.dataset, state.get("data"))
        check_max_steps_reachable(cfg, state)
    if cfg.resume:
        check_same_run(cfg, "resume.pt" if saved is not None else "--resume without resume.pt",
                       None if state is None else state.get("data"))
        if saved is None:
            check_nothing_trained(cfg)
    return cfg


def check_max_steps_reachable(cfg: TrainConfig, state: dict[str, Any]) -> None:
    """ConfigError for a --max-steps below the steps resume.pt has already trained: the run cannot go back there,
    and its checkpoint recorded a command stopping at that step over the weights of the later one (with no epoch
    record). The step is read as saved; a malformed one is resume.pt's own check's, when it loads."""
    progress = state.get("progress")
    trained = progress.get("global_step") if isinstance(progress, dict) else None
    if type(trained) is int and 0 < cfg.max_steps < trained:
        raise ConfigError(f"--max-steps {cfg.max_steps} is below the {trained} steps resume.pt has already trained: "
                          f"pass --max-steps {trained} or more, or leave it out")


def check_nothing_trained(cfg: TrainConfig) -> None:
    """--resume without resume.pt starts the run at step 0 (a preempted job reruns its command before its first
    save): CheckpointError when --out holds a checkpoint that took training steps, which starting over would replace
    (and train again to a length --max-steps no longer records: only resume.pt passes it on). A run writes resume.pt
    before its checkpoint, so only a deleted resume.pt gets here."""
    from models.checkpoint import META_FILE, CheckpointError, read_checkpoint_meta

    out = Path(cfg.out)
    if not (out / META_FILE).exists():
        return
    training = read_checkpoint_meta(out).training
    if training is not None and training.steps == 0:  # an --epochs 0 run: nothing trained, nothing to lose
        return
    steps = "" if training is None or training.steps is None else f" of {training.steps} training steps"
    raise CheckpointError(f"--resume: {out} holds a checkpoint{steps} but no resume.pt to continue it from; "
                          "nothing was changed: --overwrite trains the run again from step 0")
