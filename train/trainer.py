"""The training run: data, model, recipe, DDP, the epoch loop, evaluation, resume state and the checkpoint.

Every rank computes; only rank 0 writes (run directory, progress bar, logs). The step loop is deterministic
given the seed (see train.augment), so a run resumed from resume.pt continues bit for bit on the CPU, with the same
thread count and --compile setting (`changed_numerics` notes a resume that changes either).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import math
import random
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.datasets import (
    EVAL_SUBSET_SEED,
    DatasetError,
    ImageSet,
    UnreadableImage,
    content_key,
    decode_checked,
    default_preprocessing,
    load_dataset,
    nested_note,
    not_a_class,
    skipped_classes_text,
    skipped_note,
    stray_note,
    unreadable_text,
)
from models.checkpoint import (
    META_FILE,
    CheckpointError,
    check_metadata,
    read_checkpoint_meta,
    staged_checkpoint,
)
from models.cli import CommandError, InputError, WorkFailed, fill_closed_std_streams, raise_discarded_signal
from models.config import MIN_CLASSES, ViTConfig
from models.failures import out_of_memory, storage_failure
from models.host import usable_cpus
from models.io import atomic_write_bytes, committing
from models.jsonfields import finite_or_none
from models.oneline import first_line
from models.preprocessing import Preprocessing, affine
from models.registry import get_config, list_variants
from models.vit import VisionTransformer
from train.augment import BatchMixer, derive_seed
from train.config import ConfigError, TrainConfig, unmovable
from train.distributed import (
    DistInfo,
    all_reduce_sum,
    broadcast_buffers,
    gather_digests,
    setup,
    teardown,
    union_over_ranks,
)
from train.evaluate import eval_loader, evaluate
from train.optim import build_ema, build_optimizer, build_scheduler, scaled_lr, warmup_steps
from train.outdir import missing_dirs, prepare_out_dir, remove_if_empty
from train.pipeline import EpochBatches, TrainImages, loader, predecode, train_collate
from train.report import METRICS_FILE, PLOT_FILE, best_of, draw_curves, metrics_bytes, versions, write_metrics
from train.state import (
    RESUME_FILE,
    all_finite,
    as_this_run,
    capture_rng,
    damaged,
    load_resume,
    optimizer_problem,
    optimizer_settings,
    restore_rng,
    save_resume,
    settings_problem,
)

# What a failed write of metrics.jsonl or curves.png after the checkpoint leaves: a --resume of the finished run writes
# them.
HISTORY_KEPT = "the checkpoint is saved: --resume writes them"


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def replaced_text(files: int) -> str:
    """"3 unreadable train files replaced by other images of their class", for the console."""
    if files == 1:
        return "1 unreadable train file replaced by another image of its class"
    return f"{files} unreadable train files replaced by other images of their class"


def skipped_val_text(files: int) -> str:
    """"3 unreadable val files skipped" (left out of the val scores), for the console."""
    return f"{files} unreadable val file{'s' * (files != 1)} skipped"


def changed_numerics(before: dict[str, Any], threads: int, compiled: bool, dev: torch.device) -> str:
    """"note: ..." when a run resumed on the CPU computes with another thread count or --compile setting than its
    earlier steps (`before`: their "threads" and "compile", None where not known), else "": either changes how float
    sums round, so the weights are not bit-identical to an uninterrupted run's. Not refused: a preempted job resumed
    on a node with another core count must go on."""
    if dev.type != "cpu":  # bit-identity is promised on the CPU only
        return ""
    was, now, keep = [], [], []
    if before.get("threads") is not None and before["threads"] != threads:
        was.append(f"{before['threads']} CPU thread{'s' * (before['threads'] != 1)}")
        now.append(f"{threads} CPU thread{'s' * (threads != 1)}")
        keep.append(f"--threads {before['threads']}")
    if before.get("compile") is not None and bool(before["compile"]) != compiled:
        was.append("--compile" if before["compile"] else "no --compile")
        now.append("--compile" if compiled else "no --compile")
        keep.append(was[-1])
    if not was:
        return ""
    return (f"note: this run was trained with {' and '.join(was)} and goes on with {' and '.join(now)}: its weights "
            f"will not be bit-identical to an uninterrupted run's (float sums round differently; resume with "
            f"{' and '.join(keep)} for that)")


def input_affine(spec: Preprocessing, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (1, 3, 1, 1) on `dev`: uint8 * scale - shift is models.preprocessing.normalize, bitwise."""
    # normalize's own float32 arithmetic, so a training batch holds exactly the values evaluation and the server feed
    # the model (1/std first and then /255 differed in the last bit on half the values).
    scale, shift = affine(spec.mean, spec.std)
    return torch.from_numpy(scale).view(1, 3, 1, 1).to(dev), torch.from_numpy(shift).view(1, 3, 1, 1).to(dev)


def _no_readable(listing: ImageSet, bad: list[int]) -> str:
    """The one line for the classes `bad` of a split, none of whose files decodes: the first named in full."""
    others = ", ".join(repr(listing.class_names[c]) for c in bad[1:6]) + (", ..." if len(bad) > 6 else "")
    return listing.no_readable_image(bad[0]) + (
        f"; {len(bad) - 1} other class(es) have none either ({others})" if len(bad) > 1 else "")


def met_by(marks: list[float], world_size: int) -> str:
    """" (met by rank 1)", " (met by ranks 0, 1)": the ranks whose marks (rank + 1, summed over the ranks, of which
    one alone reads each item) say they met a failed check; "" for a single process, which has no rank to name."""
    if world_size < 2:
        return ""
    ranks = sorted({int(m) - 1 for m in marks if m})
    return f" (met by rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))})"


def other_world_text(was: int, was_world: object, now: int, now_world: int) -> str:
    """The one line for a resume whose global batch (`--batch-size` x processes) is not the run's: README quotes it."""
    return (f"resume.pt was written with a global batch of {was} ({was_world} process(es)), this run has {now} "
            f"({now_world}): resume with the same --batch-size and number of processes")


# What a run whose variant this vitc defines differently, and that cannot go on with its own definition, can do.
REDEFINED_ADVICE = ("finish it with the vitc release that started it, or start a new run (a new --out, or "
                    "--overwrite)")


def _flat(value: object, path: str = "") -> dict[str, object]:
    """A config's JSON as dotted paths ("stem.layers[0].width") -> values."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{path}.{key}" if path else key).items()}
    if isinstance(value, list | tuple):
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{path}[{i}]").items()}
    return {path: value}


def config_differences(run: ViTConfig, now: ViTConfig, limit: int = 3) -> str:
    """"stem.layers[0].width 24 -> 16, ...": where a run's recorded config differs from the variant's definition now
    (its description aside, which changes nothing computed)."""
    was, new = _flat(run.to_dict()), _flat(now.to_dict())
    keys = [k for k in {**was, **new} if k != "description" and was.get(k, "-") != new.get(k, "-")]
    shown = ", ".join(f"{k} {was.get(k, '-')} -> {new.get(k, '-')}" for k in keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


class Trainer:
    """One run of `cfg` on this process (a DDP rank or the only process)."""

    def __init__(self, cfg: TrainConfig, info: DistInfo) -> None:
        self.cfg, self.info = cfg, info
        self.t_start, self.cpu_start = time.perf_counter(), time.process_time()
        self.dev = info.device
        self.threads = cfg.threads or max(1, usable_cpus() // max(1, info.local_world_size))
        torch.set_num_threads(self.threads)
        if self.dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        self.amp = cfg.amp == "bf16" or (cfg.amp == "auto" and self.dev.type == "cuda")
        self.show = info.is_main and (cfg.progress if cfg.progress is not None else sys.stderr.isatty())
        # --overwrite: the old run stays whole until this one's first file is written (then it is removed).
        self.replacing = cfg.overwrite and info.is_main
        # Read before the data: which val subset a run validates on depends on when its resume.pt was written.
        self.resume_state = load_resume(cfg.out) if cfg.resume else None
        self.resumed = False
        self.numerics_note = ""  # a resume's `changed_numerics`
        self.model_note = ""  # a resume's note that the run goes on with its own model definition (`_model_config`)
        self.data_note = ""  # a resume's note that the run goes on with its data at a new path (`_check_same_data`)
        self.saved_step: int | None = None  # the step of the resume.pt of this run in --out, once there is one
        self.corrupt_seen: set[str] = set()  # distinct corrupt train files replaced so far (this rank's, until synced)
        self._load_data()
        recorded, names, source = self._recorded_run()
        self._check_same_classes(names)
        # A resumed run goes on with the model it started with, whatever the registry defines under its name now.
        self.own_definition = recorded is not None
        self.model_cfg = self._model_config(recorded, source)
        self._build()

    # ----------------------------------------------------------------------------------------------- setup
    def log(self, msg: str) -> None:
        """A line on stdout, from rank 0 only."""
        if self.info.is_main:
            print(msg, flush=True)

    def _load_data(self) -> None:
        cfg = self.cfg
        # Every file of the train split: a --train-subset's classes are checked readable on it, and an unreadable
        # file of the subset is replaced from it (the subset may draw only broken files of a class that has good ones).
        listing = self.train_listing = load_dataset(cfg.dataset, "train")
        self.train_picked = listing.subset_indices(cfg.train_subset or len(listing), seed=cfg.seed)
        self.train_set = listing if len(self.train_picked) == len(listing) else listing.take(self.train_picked)
        # Every file of the val split: a class of the subset is checked readable on it, as a train class is.
        self.val_listing = self.val_set = load_dataset(cfg.dataset, "val")
        if cfg.val_subset:
            # Drawn as train.eval --limit and export draw theirs, whatever --seed: the seeds of a study are scored on
            # the same images. A run whose resume.pt predates that (no data fingerprints in it) keeps its own.
            legacy = self.resume_state is not None and "data" not in self.resume_state
            self.val_set = self.val_set.subset(cfg.val_subset, seed=cfg.seed if legacy else EVAL_SUBSET_SEED)
        if self.val_set.class_names != self.train_set.class_names:
            raise DatasetError(f"{cfg.dataset}: train and val class lists differ")
        self.class_names = list(self.train_set.class_names)
        skipped = skipped_note(self.train_set, self.val_set)
        if len(self.class_names) < MIN_CLASSES:  # nothing to learn: the loss is 0 from the first step
            raise DatasetError(f"{cfg.dataset}: {len(self.class_names)} class ({', '.join(self.class_names)}); a "
                               f"classifier needs at least {MIN_CLASSES} (one directory per class under train/ and "
                               f"val/)"
                               + (f"; {skipped}" if skipped else ""))
        self._check_readable()
        # Said in the run's summary line: a class directory that starts with "." is not trained on.
        self.skipped_dirs = f" ({skipped})" if skipped else ""
        # What the weights are fitted and selected on: recorded in resume.pt (a resume must see the same data) and
        # in the checkpoint (bundles carry it as their provenance).
        self.data_prints = {"train": self.train_set.fingerprint(), "val": self.val_set.fingerprint()}
        # A folder's fingerprints hold names and sizes: a bounded sample of its bytes (8 MiB a split at most) is
        # what a move to another path is checked by too (`_check_same_data`).
        for split, images in (("train", self.train_set), ("val", self.val_set)):
            if (sample := images.content_sample()) is not None:
                self.data_prints[content_key(split)] = sample
        self.global_batch = cfg.batch_size * self.info.world_size
        self.steps_per_epoch = len(self.train_set) // self.global_batch
        if cfg.epochs and self.steps_per_epoch == 0:
            raise DatasetError(
                f"{cfg.dataset}: the train split has {len(self.train_set)} images, fewer than one global batch of "
                f"{self.global_batch} (--batch-size {cfg.batch_size} x {self.info.world_size} processes)")
        self.total_steps = cfg.epochs * self.steps_per_epoch

    def _check_readable(self) -> None:
        """DatasetError (one line) for a train class with files of which none decodes (its samples could only be
        replaced by nothing: an output never trained), a val split with no readable file, or a val class with files
        of which none decodes (left out of the val scores, it would leave them measuring the other classes only: an
        untrained model scored 100 %). A class the run trains or validates on is read in its full listing, the
        subset's draw aside. The ranks share the classes to read and agree through one sum: each raises the same
        error, naming the ranks that met it (the first rank of each node prints it), or none does."""
        train, val, info = self.train_listing, self.val_set, self.info
        if train.paths is None:
            return
        n = len(train.class_names)
        present = set(np.unique(self.train_set.labels).tolist())  # a class the subset drew none of has no sample
        measured = set(np.unique(val.labels).tolist())
        flags = [0.0] * (2 * n + 1)  # one per train class, one per val class, then the val split
        # A flag holds the rank that set it, plus 1: one rank alone reads each item, so the sum still names it, and
        # the rank that prints the error (its node's first) is not taken for the one that met it.
        mark = info.rank + 1.0
        for c in train.unreadable_classes(c for c in range(info.rank, n, info.world_size) if c in present):
            flags[c] = mark
        for c in self.val_listing.unreadable_classes(c for c in range(info.rank, n, info.world_size) if c in measured):
            flags[n + c] = mark
        if info.is_main and val.paths and not any(decode_checked(path) is not None for path in val.paths):
            flags[2 * n] = mark
        flags = all_reduce_sum(flags, info)
        world = info.world_size
        if bad := [c for c in range(n) if flags[c]]:
            raise DatasetError(_no_readable(train, bad) + met_by([flags[c] for c in bad], world))
        if flags[2 * n]:
            raise DatasetError(f"{val.name}: none of the {len(val)} files of the val split is a readable image "
                               f"(e.g. {val.paths[0]})" + met_by(flags[2 * n:], world))
        if bad := [c for c in range(n) if flags[n + c]]:
            raise DatasetError(_no_readable(self.val_listing, bad) + met_by([flags[n + c] for c in bad], world))

    def _recorded_run(self) -> tuple[ViTConfig | None, list[str] | None, str]:
        """What --out recorded of the run this one resumes: its model config, its class names and the file the
        config came from. resume.pt's own records first (a run killed before its first checkpoint has them too), else
        its checkpoint.json's (read as export reads it). (None, None, "") without
        resume.pt; None for what neither file recorded (a resume.pt of an earlier vitc alone)."""
        state = self.resume_state
        if state is None:
            return None, None, ""
        names, raw = state.get("class_names"), state.get("model_config")
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise damaged("class_names: expected a list of names")
        if raw is not None and names is not None:
            return self._resume_config(raw), names, RESUME_FILE
        meta = read_checkpoint_meta(self.cfg.out) if (Path(self.cfg.out) / META_FILE).exists() else None
        names = names if names is not None or meta is None else list(meta.class_names)
        if raw is not None:
            return self._resume_config(raw), names, RESUME_FILE
        return (None if meta is None else meta.config), names, META_FILE

    def _resume_config(self, raw: object) -> ViTConfig:
        """resume.pt's record of the run's model config, validated as a checkpoint's config is. One this vitc refuses
        was edited, or written under rules this vitc no longer accepts (a bound added since): the line says both."""
        try:
            recorded = ViTConfig.from_dict(raw)
        except ValueError as exc:
            raise ConfigError(f"--resume: the model config recorded in {RESUME_FILE} cannot be used "
                              f"({first_line(exc, 200)}): the file was edited, or a vitc with other rules for "
                              f"{self.cfg.model} wrote it; start a new run (a new --out, or --overwrite)") from None
        if recorded.name != self.cfg.model:
            raise damaged(f"model_config: names {recorded.name!r:.80}, the run's model is {self.cfg.model!r}")
        return recorded

    def _check_same_classes(self, recorded: list[str] | None) -> None:
        """ConfigError (one line) when classes the run started with are left out of the folder now as tool or hidden
        folders (`not_a_class`: @eaDir and __MACOSX were classes before vitc skipped them). Nothing changed on disk,
        so the data check's "restore them" could not be done; other differences are the data fingerprints' to say."""
        if recorded is None or recorded == self.class_names:
            return
        skipped = [c for c in recorded if c not in self.class_names and not_a_class(c)]
        if skipped:
            raise ConfigError(skipped_classes_text(
                skipped, "--resume: this run's", self.cfg.dataset,
                f"the run cannot go on with the {len(recorded)} classes it started with",
                "start a new run (a new --out, or --overwrite)"))

    def _model_config(self, recorded: ViTConfig | None, source: str) -> ViTConfig:
        """The model this run trains: the variant's definition, or for a resumed run the one it recorded (in
        `source`), with a note when they differ (the registry changed since the run started: vit_c_mini's stem in
        bed0a07). ConfigError (one line) for a recorded one this vitc cannot save a checkpoint of."""
        cfg, classes = self.cfg, len(self.class_names)
        if cfg.model not in list_variants():  # only a resume gets here (train.config.validate): a custom variant
            if recorded is None:
                raise ConfigError(self._unregistered_text())
            self.model_note = (f"note: {cfg.model} is not a registered model in this process: the run goes on with "
                               f"its definition, recorded in {source}")
            return dataclasses.replace(recorded, num_classes=classes)
        now = get_config(cfg.model, num_classes=classes)
        if recorded is None:
            return now
        run = dataclasses.replace(recorded, num_classes=classes)  # another class count: the data checks refuse it
        if run == now:
            return now
        if run.stem.kind != now.stem.kind:  # the checkpoint contract ties a registered name to its stem kind
            raise ConfigError(f"--resume: {cfg.model} is a {now.stem.kind}-stem variant in this vitc, but this run "
                              f"started with a {run.stem.kind} stem: its definition changed since the run started, "
                              f"and no checkpoint of the run's own could be saved under that name: {REDEFINED_ADVICE}")
        self.model_note = (f"note: {cfg.model}'s definition in this vitc differs from the one this run started with "
                           f"({config_differences(run, now)}): the run goes on with its own, recorded in {source}")
        return run

    def _unregistered_text(self) -> str:
        """Why a resume of a model this process has not registered cannot go on: no definition of it recorded."""
        model, known = self.cfg.model, ", ".join(list_variants())
        if self.resume_state is None:  # --resume with no resume.pt starts a new run: the model a new run names
            return f"unknown model {model!r}; known: {known}"
        return (f"--resume: model {model!r} is not registered in this process, and this run recorded no definition "
                f"of it ({RESUME_FILE} predates that record and {META_FILE} is missing): register it "
                f"(models.register) before the training starts, as the run's first start did; known: {known}")

    def _build(self) -> None:
        cfg, info = self.cfg, self.info
        # Identical initial weights on every rank; numpy and Python seeded too so the whole RNG state is a
        # function of the seed (library code may draw from them).
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        self.net = VisionTransformer(self.model_cfg).to(self.dev)
        self.spec: Preprocessing = default_preprocessing(cfg.dataset, self.net.cfg.image_size)
        self.channels_last = (cfg.channels_last if cfg.channels_last is not None
                              else self.dev.type == "cuda" and self.net.cfg.stem.kind == "conv")
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self._check_checkpoint_fits()
        embedded = self.train_set.arrays is not None
        per_rank = max(1, usable_cpus() // max(1, info.local_world_size))
        self.workers = cfg.workers if cfg.workers is not None else (
            0 if embedded and self.dev.type == "cpu" else min(8, per_rank))
        val_cache = predecode(self.val_set, self.spec) if embedded else None
        batch = cfg.eval_batch_size or min(512, 2 * cfg.batch_size)
        self.val_batches = eval_loader(self.val_set, self.spec, info, batch_size=batch, workers=self.workers,
                                       cache=val_cache)
        self.lr = scaled_lr(cfg, self.global_batch)
        self.scale, self.shift = input_affine(self.spec, self.dev)
        self.ema = None
        if cfg.epochs == 0:
            return
        train_cache = predecode(self.train_set, self.spec, progress=self.show) if embedded else None
        self.train_images = TrainImages(self.train_set, self.spec, cfg.augment, cfg.crop_scale, cfg.hflip, cfg.seed,
                                        train_cache, source=(self.train_listing, self.train_picked))
        self.mixer = BatchMixer(cfg.mixup, cfg.cutmix, cfg.mix_prob, len(self.class_names))
        self.optimizer = build_optimizer(self.net, cfg, self.lr)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.steps_per_epoch, self.total_steps)
        self.warmup = warmup_steps(cfg, self.steps_per_epoch, self.total_steps)
        self.ema = build_ema(self.net, cfg, self.total_steps)
        self.model: nn.Module = self.net
        if info.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[info.local_rank] if self.dev.type == "cuda" else None)
        if cfg.compile:
            self.model = torch.compile(self.model)

    def _check_checkpoint_fits(self) -> None:
        """DatasetError (one line) when the checkpoint this run ends with could not be saved: its class names (up to
        100,000 of 1,024 characters) could make checkpoint.json larger than its limit. Measured now, with the
        summary's strings as `finish` records them, not at the first save after the training."""
        cfg = self.cfg
        known = {"dataset": cfg.dataset, "model": cfg.model, "recipe": cfg.recipe, "ddp_backend": self.info.backend,
                 "device": str(self.dev), "rank_state_sha256": ["0" * 64] * self.info.world_size,
                 "command_line": shlex.join(cfg.command), "config": cfg.to_dict(), "versions": versions(),
                 "data": self.data_prints}
        try:
            check_metadata(cfg.out, self.net.cfg, class_names=self.class_names, preprocessing=self.spec,
                           extra={"dataset": cfg.dataset, "weights_source": "raw", "training": known})
        except CheckpointError as exc:
            raise DatasetError(f"{cfg.dataset}: {exc}") from None

    # ---------------------------------------------------------------------------------------- resume state
    def _fresh_progress(self) -> dict[str, Any]:
        return {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "history": [], "train_time_s": 0.0,
                "wall_time_s": 0.0, "cpu_time_s": 0.0, "samples_seen": 0, "segments": 0,
                "epoch_acc": None, "last_eval": None, "started": _now(), "corrupt_files": []}

    def restore(self) -> dict[str, Any]:
        """Load resume.pt into the model, optimizer, schedule, EMA and RNG; returns the progress counters."""
        state, self.resume_state = self.resume_state, None  # its tensors are not needed once loaded
        if state is None:
            return self._fresh_progress()
        self._check_same_data(state.get("data"), state["config"].get("dataset"))
        # The global batch is what each step trains on (and what the rate was scaled by): resuming under another
        # number of processes whose steps per epoch happen to match would change it mid-run without a word.
        was = state.get("global_batch")
        if isinstance(was, int) and was != self.global_batch:
            raise ConfigError(other_world_text(was, state.get("world_size", "?"), self.global_batch,
                                               self.info.world_size))
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise ConfigError(f"resume.pt was written with {state['steps_per_epoch']} steps per epoch, this run has "
                              f"{self.steps_per_epoch} (dataset or world size changed?)")
        self._check_definition(state["model"])
        try:
            self._apply_state(state)
        except CheckpointError:
            raise
        except Exception as exc:  # a tampered or foreign file fails in many ways; each is the same one-line error
            raise damaged(f"{type(exc).__name__}: {exc}") from None
        self.resumed = True
        self.saved_step = state["progress"]["global_step"]
        # The thread count the run computed with so far: recorded since resume.pt has it, else its --threads (None,
        # "cores / ranks", is not known).
        before = {"threads": state.get("threads", state["config"].get("threads")),
                  "compile": state["config"].get("compile")}
        self.numerics_note = changed_numerics(before, self.threads, self.cfg.compile, self.dev)
        return state["progress"]

    def _check_definition(self, saved: dict[str, torch.Tensor]) -> None:
        """ConfigError (one line) for a run that recorded no model config (an earlier vitc's resume.pt, no
        checkpoint.json) whose weights are not the variant's tensors now, the head aside (its size is the class
        count's, which the data checks cover): the variant's definition changed since the run started."""
        if self.own_definition:
            return
        own = {k: list(v.shape) for k, v in self.net.state_dict().items()}
        held = {k: list(v.shape) for k, v in saved.items()}
        unfit = next((k for k in {**held, **own} if not k.startswith("head.") and held.get(k) != own.get(k)), None)
        if unfit is not None:
            raise ConfigError(f"--resume: {RESUME_FILE}'s weights do not fit {self.cfg.model} as this vitc defines it "
                              f"({unfit}: {held.get(unfit, 'none')}, now {own.get(unfit, 'none')}): its definition "
                              f"changed since the run started, and the run recorded none of its own to go on with "
                              f"({META_FILE} is missing and {RESUME_FILE} predates that record): {REDEFINED_ADVICE}")

    def _check_same_data(self, saved: dict[str, str] | None, was: object) -> None:
        """ConfigError unless the dataset is the one the run started on (resume.pt from before it recorded its data
        fingerprints: not checked). Data at another path than resume.pt's (`was`) are the run's when their
        fingerprints (each file's path within the dataset and its size) and content samples match: the run goes on
        there, says so, and records the new path; else the refusal names both paths."""
        if saved is None:
            return
        changed = [split for split in ("train", "val") if saved.get(split) != self.data_prints[split]]
        moved = isinstance(was, str) and was != self.cfg.dataset
        if changed and moved:
            raise ConfigError(f"--resume: the data at {self.cfg.dataset} are not the data this run started with at "
                              f"{was} (the {changed[0]} fingerprint {str(saved.get(changed[0]))[:12]} -> "
                              f"{self.data_prints[changed[0]][:12]}): pass --dataset with the run's own data, or "
                              "train into a new --out")
        if changed:
            raise ConfigError(f"--resume: the {' and '.join(changed)} data of {self.cfg.dataset} differ from what the "
                              f"run started with (files added, removed or resized; fingerprint "
                              f"{str(saved.get(changed[0]))[:12]} -> {self.data_prints[changed[0]][:12]}); a resumed "
                              f"run must see the same images: restore them, or train into a new --out")
        if moved:
            self._check_same_contents(saved, was)
            self.data_note = (f"note: the run's data moved from {was} to {self.cfg.dataset} (the same file names, "
                              f"sizes and sampled contents): the run goes on with the data at {self.cfg.dataset}")

    def _check_same_contents(self, saved: dict[str, str], was: object) -> None:
        """ConfigError unless the data at the new path hold the content samples the run recorded at `was`: the same
        names and sizes are not the same files (fixed-size BMPs, a re-rendered copy). A run recorded before the
        samples may not move (`unmovable`)."""
        if (why := unmovable(saved, was, self.cfg.dataset)) is not None:
            raise ConfigError(why)
        keys = {split: content_key(split) for split in ("train", "val")}
        differ = [split for split, key in keys.items() if saved[key] != self.data_prints.get(key)]
        if differ:
            key = keys[differ[0]]
            raise ConfigError(f"--resume: the data at {self.cfg.dataset} are not the data this run started with at "
                              f"{was} (the same file names and sizes, but the sampled contents of the "
                              f"{' and '.join(differ)} data differ: {saved[key][:12]} -> "
                              f"{str(self.data_prints.get(key))[:12]}): pass --dataset with the run's own data, or "
                              "train into a new --out")

    def _left_to_do(self, progress: dict[str, Any]) -> bool:
        """Whether a restored run still has steps to train (not finished, diverged or stopped by --max-steps)."""
        cfg = self.cfg
        return not (progress.get("diverged") or progress["epoch"] >= cfg.epochs
                    or (cfg.max_steps and progress["global_step"] >= cfg.max_steps))

    def _already_written(self, progress: dict[str, Any]) -> dict[str, Any] | None:
        """The training summary of --out's checkpoint when it was written at this very step (rank 0 reads it, every
        rank learns whether it was), else None: a run killed before its checkpoint still writes it."""
        recorded = None
        if self.info.is_main:
            with contextlib.suppress(CheckpointError):
                meta = read_checkpoint_meta(self.cfg.out)
                if meta.training is not None and meta.training.steps == progress["global_step"]:
                    recorded = meta.raw["training"]
        if not all_reduce_sum([float(recorded is not None)], self.info)[0]:
            return None
        return recorded or {}

    def _history_files(self, progress: dict[str, Any]) -> dict[str, bytes]:
        """metrics.jsonl and curves.png (when there is something to plot) from the run's history, ready to write."""
        files = {METRICS_FILE: metrics_bytes(progress["history"])}
        title = f"{self.cfg.model} on {Path(self.cfg.dataset).name}"
        if (png := draw_curves(progress["history"], title)) is not None:
            files[PLOT_FILE] = png
        return files

    def _write_history(self, progress: dict[str, Any]) -> None:
        """metrics.jsonl and curves.png from the run's history: drawn first, then put in place together."""
        files = self._history_files(progress)
        with committing(f"the metrics and curves in {self.cfg.out}"):
            self._put_in_place(files)

    def _put_in_place(self, files: dict[str, bytes]) -> None:
        """Write each file (name -> content) into --out atomically, in order."""
        out = Path(self.cfg.out)
        for name, data in files.items():
            atomic_write_bytes(out / name, data)

    def _publish(self, chosen: nn.Module, summary: dict[str, Any], progress: dict[str, Any]) -> None:
        """The run's outputs: the checkpoint first (a run killed before it is still resumable, or, with --epochs 0,
        the old run), then metrics.jsonl and curves.png.

        The slow parts (the weights' file and hash, drawing the curves) come first; a Ctrl-C or SIGTERM meanwhile
        stops the run with nothing of it published. The renames that follow are one commit: a signal during them
        waits for them, then is noted (`committing`), and the command ends as it would have.
        """
        cfg = self.cfg
        with self._saving("the checkpoint"), staged_checkpoint(
                cfg.out, chosen, class_names=self.class_names, preprocessing=self.spec,
                extra={"dataset": cfg.dataset, "weights_source": summary["weights_source"],
                       "training": summary}) as publish:
            files = self._history_files(progress)
            with committing(f"the checkpoint in {cfg.out}"):
                publish()
                self._forget_old_run(META_FILE)
                with self._saving(" and ".join(files), HISTORY_KEPT):
                    self._put_in_place(files)

    def _record_stopped_epoch(self, progress: dict[str, Any]) -> None:
        """A run resumed at the very step its --max-steps stops at, mid-epoch (killed after a periodic save there):
        the record of the epoch, evaluated and "complete": false, that a run stopped there by --max-steps writes
        (and resume.pt with it). Without it the checkpoint had no epoch record: empty metrics, no best_val_top1."""
        step, done = progress["step_in_epoch"], progress["global_step"]
        if (not step or self.cfg.max_steps != done or progress.get("diverged")
                or any(h.get("step") == done for h in progress["history"])):
            return
        acc = dict(progress["epoch_acc"])  # every rank's sums, at rank 0 (as `run_epoch` resumes them)
        if not self.info.is_main:
            acc |= {"loss_sum": 0.0, "samples": 0, "corrupt": 0}
        self._end_epoch(progress["epoch"], step, acc, progress)

    def _resuming_line(self, progress: dict[str, Any]) -> str:
        """Where a resumed run continues: the epoch and step it trains from, or, for one with nothing left to train
        (killed after its last resume.pt, before its checkpoint), that it only writes the checkpoint."""
        cfg, step = self.cfg, progress["global_step"]
        if self._left_to_do(progress):
            return f"resuming {cfg.out} at epoch {progress['epoch'] + 1}, step {step}"
        if progress["epoch"] >= cfg.epochs and not progress.get("diverged"):
            return f"resuming {cfg.out} after its last epoch ({cfg.epochs}/{cfg.epochs}): writing the checkpoint"
        return f"resuming {cfg.out} where it stopped (step {step} of {self.total_steps}): writing the checkpoint"

    def _summary_line(self) -> str:
        """What the run trains, on what, and how: its first line."""
        cfg, known = self.cfg, len(self.corrupt_seen)
        # The train images are the files listed: those a resumed run already found unreadable are said.
        unreadable = (f" ({known} train file{'s' * (known != 1)} unreadable so far, replaced by other images of "
                      "their class)" if known else "")
        return (f"{cfg.model} on {cfg.dataset}: {len(self.train_set)} train / {len(self.val_set)} val images"
                f"{self.skipped_dirs}{unreadable}, "
                f"{self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs, global batch {self.global_batch}, "
                f"lr {self.lr:.3g}, recipe {cfg.recipe}, {self.dev}"
                f"{f' x {self.info.world_size} ranks' if self.info.distributed else ''}, {self.threads} threads, "
                f"amp {'bf16' if self.amp else 'off'}")

    def _stopped_line(self, progress: dict[str, Any]) -> str:
        """Why a restored run has nothing left to train, and what would continue it."""
        cfg, step = self.cfg, progress["global_step"]
        if progress.get("diverged"):
            return f"{cfg.out}: the run diverged at step {step}; nothing to resume (train anew with a lower --lr)"
        if progress["epoch"] >= cfg.epochs:
            return (f"{cfg.out}: the run is finished ({cfg.epochs} epoch{'s' * (cfg.epochs != 1)}, {step} steps); "
                    f"nothing to resume (--overwrite or a new --out trains again)")
        return (f"{cfg.out}: the run stopped at --max-steps {cfg.max_steps} (step {step} of {self.total_steps}); "
                f"--resume --max-steps 0 continues it to the end")

    def _apply_state(self, state: dict[str, Any]) -> None:
        """Load a structurally checked resume state into this run; raises on anything that does not fit it."""
        progress = state["progress"]
        if progress["epoch"] > self.cfg.epochs or progress["step_in_epoch"] > self.steps_per_epoch:
            raise damaged(f"progress (epoch {progress['epoch']}, step {progress['step_in_epoch']}) is beyond this "
                          f"run's {self.cfg.epochs} epochs of {self.steps_per_epoch} steps")
        if progress["epoch_acc"] is None and progress["step_in_epoch"]:  # the trainer saves the sums mid-epoch:
            # without them the epoch's loss and samples would restart from nothing (and skip the samples check)
            raise damaged(f"progress.epoch_acc is None at step {progress['step_in_epoch']} of epoch "
                          f"{progress['epoch']}, not its start")
        self.net.load_state_dict(state["model"])
        if self.cfg.epochs:
            # The optimizer this run's configuration builds, setting by setting and buffer by buffer: torch's
            # load_state_dict takes a saved group's settings over the run's, and a buffer that does not fit fails
            # only at the first step (or at the save after the training, for a NaN).
            run = optimizer_settings(self.optimizer)
            if problem := optimizer_problem(state["optimizer"], self.optimizer, progress["global_step"],
                                            weights_finite=all_finite(state["model"])):
                raise damaged(problem)
            self.optimizer.load_state_dict(as_this_run(state["optimizer"], self.optimizer))
            # What the load filled in, and a setting a step reads that it left out (a KeyError at the first step).
            if problem := settings_problem(self.optimizer.param_groups, run, required=self.optimizer.defaults):
                raise damaged(problem)
            # The rate is a function of the step, set from it here: a saved schedule, of this or of an earlier
            # scheduler, is not needed, and neither is the saved rate (the same number, unless edited).
            self.scheduler.step_update(progress["global_step"])
            if self.ema is not None:
                if state["ema"] is None:
                    raise damaged("ema: missing, but this run keeps an EMA")
                self.ema.load_state_dict(state["ema"])
        restore_rng(state["rng"])

    def save_state(self, progress: dict[str, Any]) -> None:
        """Write resume.pt (rank 0) with everything needed to continue exactly here; every rank calls it."""
        if self.cfg.epochs == 0:
            return
        # A signal Python discarded since the last batch (in a DataLoader iterator's __del__) stops the run before it
        # saves, as it would have where it came.
        raise_discarded_signal()
        # Each rank replaces the corrupt files of its own shard: rank 0 records them all.
        self.corrupt_seen = union_over_ranks(self.corrupt_seen, self.info)
        if not self.info.is_main:
            return
        progress = {**progress, "wall_time_s": progress["wall_time_s"] + time.perf_counter() - self.t_start,
                    "cpu_time_s": progress["cpu_time_s"] + time.process_time() - self.cpu_start,
                    "corrupt_files": sorted(self.corrupt_seen)}
        with self._saving(RESUME_FILE):
            save_resume(self.cfg.out, {
                "config": self.cfg.to_dict(), "steps_per_epoch": self.steps_per_epoch, "data": self.data_prints,
                # The model and the classes the run trains: a resume goes on with them whatever this vitc's registry
                # and folder rules say by then (`_recorded_run`), also before the run's first checkpoint.
                "model_config": self.net.cfg.to_dict(), "class_names": list(self.class_names),
                "global_batch": self.global_batch, "world_size": self.info.world_size,
                "model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "ema": None if self.ema is None else self.ema.state_dict(),
                "rng": capture_rng(), "progress": progress,
                # The CPU threads the steps so far were computed with (`changed_numerics`): "--threads" may be unset.
                "threads": self.threads,
            })
            self.saved_step = progress["global_step"]
            self._forget_old_run(RESUME_FILE)

    @contextlib.contextmanager
    def _saving(self, what: str, kept: str = "") -> Iterator[None]:
        """An OSError while `what` is written into --out ends the run in one line that says what is kept (`kept`,
        else what resume.pt holds): exit 1 for the machine failing (a full disk, an I/O error, a file system gone
        read-only), exit 2 for what the user can fix (a permission). Not a traceback after hours of training."""
        try:
            yield
        except OSError as exc:
            if out_of_memory(exc) is not None:  # said as the run's out-of-memory line, with its advice
                raise
            raise self._save_failed(what, exc, kept) from exc

    def _save_failed(self, what: str, exc: OSError, kept: str) -> CommandError:
        """The one-line error for `exc`, raised while saving `what` (see `_saving`)."""
        out = self.cfg.out
        if not kept:
            if self.saved_step is not None:
                kept = f"{RESUME_FILE} keeps step {self.saved_step}: --resume continues from there"
            elif self.replacing:  # --overwrite removes the old run only once this one has saved
                kept = f"the run that was in {out} is unchanged"
            else:
                kept = "nothing of this run was saved"
        failed = WorkFailed if storage_failure(exc) else InputError
        return failed(f"cannot save {what} in {out}: {exc.strerror or exc}; {kept}")

    def _forget_old_run(self, written: str) -> None:
        """--overwrite: once the new run has written `written`, remove the old run's other files.

        Until then an interrupted start leaves the old run as it was; from then on the new run is resumable.
        """
        if not self.replacing:
            return
        self.replacing = False
        out = Path(self.cfg.out)
        for name in (META_FILE, RESUME_FILE, METRICS_FILE, PLOT_FILE):
            if name != written:
                (out / name).unlink(missing_ok=True)
        if written != META_FILE:  # save_checkpoint removes the weights it replaced itself
            for old in out.glob("weights-*.safetensors"):
                old.unlink(missing_ok=True)
        for old in out.glob("eval-*.json"):  # python -m train.eval's results: of the old weights
            old.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------ training
    def _inputs(self, xb: torch.Tensor) -> torch.Tensor:
        # uint8 -> normalised float, bitwise what models.preprocessing.normalize gives (`input_affine`)
        x = xb.to(self.dev, non_blocking=True).float().mul_(self.scale).sub_(self.shift)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _batches(self, epoch: int, start: int):  # noqa: ANN202 - a generator of collated batches
        plan = EpochBatches(len(self.train_images), self.cfg.batch_size, self.info.rank, self.info.world_size,
                            self.cfg.seed, epoch, start)
        it = iter(loader(self.train_images, plan, workers=self.workers, collate=train_collate,
                         pin=self.dev.type == "cuda"))
        inline = self.workers == 0
        while True:
            # Tiny per-image ops run faster on one thread than on an OpenMP team.
            if inline:
                torch.set_num_threads(1)
            try:
                batch = next(it, None)
            finally:
                if inline:
                    torch.set_num_threads(self.threads)
            if batch is None:
                return
            yield batch

    def _step(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.cfg.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.clip_grad > 0:
            nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.clip_grad)
        self.optimizer.step()
        return loss.detach()

    def _update_ema(self, global_step: int) -> None:
        if self.ema is None:
            return
        if global_step <= self.warmup:  # the paper's EMA copies the weights during warm-up: at every step, so a run
            self.ema.set(self.net)      # shorter than ema_every steps never reports its untrained initial weights
        elif global_step % self.cfg.ema_every == 0:
            self.ema.update(self.net)

    def _eval_all(self) -> dict[str, Any]:
        broadcast_buffers(self.net, self.info)
        fail = self.cfg.corrupt == "fail"
        raw = evaluate(self.net, self.val_batches, self.info, self.channels_last, fail)
        res: dict[str, Any] = {"raw": raw, "ema": None}
        if self.ema is not None:
            broadcast_buffers(self.ema.module, self.info)
            res["ema"] = evaluate(self.ema.module, self.val_batches, self.info, self.channels_last, fail)
        return res

    def run_epoch(self, epoch: int, progress: dict[str, Any]) -> bool:
        """Train one epoch (or its remainder); True when --max-steps or divergence ends the run here."""
        from tqdm import tqdm

        cfg, start = self.cfg, progress["step_in_epoch"]
        acc = dict(progress["epoch_acc"] or {"loss_sum": 0.0, "samples": 0, "time": 0.0, "corrupt": 0})
        if not self.info.is_main:  # a saved epoch's sums are every rank's together (`_global_acc`): rank 0 holds them
            acc |= {"loss_sum": 0.0, "samples": 0, "corrupt": 0}
        loss_sum = torch.tensor(acc["loss_sum"], dtype=torch.float64, device=self.dev)
        bar = tqdm(total=self.steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not self.show, leave=False, dynamic_ncols=True, unit="step")
        self.model.train()
        t0, step, stopped = time.perf_counter(), start, False

        def snapshot() -> dict[str, Any]:
            # Counters as they stand now: epoch time so far and the exact running loss sum.
            seg = time.perf_counter() - t0
            return {**acc, "loss_sum": float(loss_sum), "time": acc["time"] + seg}

        for batch in self._batches(epoch, start):
            if batch.corrupt and cfg.corrupt == "fail":
                raise UnreadableImage(unreadable_text(Path(batch.corrupt[0]),
                                                      hint="--corrupt skip replaces such files"))
            if batch.lost:  # checked readable when the run started: its files changed underneath it
                raise UnreadableImage(self.train_listing.no_readable_image(batch.lost[0], during_run=True))
            self.corrupt_seen.update(batch.corrupt)
            yb = batch.labels
            x, y = self._inputs(batch.images), yb.to(self.dev, non_blocking=True)
            x, targets = self.mixer(x, y, derive_seed(cfg.seed, epoch, step, self.info.rank, 0x313))
            loss = self._step(x, targets)
            step += 1
            progress["global_step"] += 1
            self.scheduler.step_update(progress["global_step"])
            self._update_ema(progress["global_step"])
            loss_sum += loss.double() * len(yb)
            acc["samples"] += len(yb)
            progress["samples_seen"] += self.global_batch
            acc["corrupt"] += batch.replaced  # samples replaced, one each: at most acc["samples"]
            if self.show and (step % 10 == 0 or step == self.steps_per_epoch):
                snap = snapshot()
                bar.set_postfix(loss=f"{snap['loss_sum'] / snap['samples']:.3f}", lr=f"{self._lr():.2e}",
                                img_s=f"{snap['samples'] * self.info.world_size / max(snap['time'], 1e-9):.0f}")
            bar.update(1)
            stopped = bool(cfg.max_steps) and progress["global_step"] >= cfg.max_steps
            if stopped or step == self.steps_per_epoch:
                break
            if cfg.save_every_steps and progress["global_step"] % cfg.save_every_steps == 0:
                seg = time.perf_counter() - t0
                self.save_state({**progress, "step_in_epoch": step, "epoch_acc": self._global_acc(snapshot()),
                                 "train_time_s": progress["train_time_s"] + seg})
        bar.close()
        acc = snapshot()
        progress["train_time_s"] += acc["time"] - (progress["epoch_acc"] or {"time": 0.0})["time"]
        return self._end_epoch(epoch, step, acc, progress) or stopped

    def _global_acc(self, acc: dict[str, Any]) -> dict[str, Any]:
        """An epoch's running sums over every rank (all ranks call this at the same step): what resume.pt keeps, so
        that rank 0 alone resumes with them and the end-of-epoch sum counts each rank's part once."""
        loss_sum, n, corrupt = all_reduce_sum([acc["loss_sum"], acc["samples"], acc["corrupt"]], self.info)
        return {**acc, "loss_sum": loss_sum, "samples": int(n), "corrupt": int(corrupt)}

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _end_epoch(self, epoch: int, step: int, acc: dict[str, Any], progress: dict[str, Any]) -> bool:
        """Log, evaluate and save at the end of an epoch (or where it stopped); True if training diverged."""
        cfg, complete = self.cfg, step == self.steps_per_epoch
        loss_sum, n, corrupt = all_reduce_sum([acc["loss_sum"], acc["samples"], acc["corrupt"]], self.info)
        train_loss = loss_sum / max(n, 1)
        # A non-finite loss never recovers (weights are NaN): stop, so lr/wd sweeps do not burn the budget.
        diverged = not math.isfinite(train_loss)
        last = epoch + 1 == cfg.epochs or (cfg.max_steps and progress["global_step"] >= cfg.max_steps)
        rec: dict[str, Any] = {
            "epoch": epoch + 1, "step": progress["global_step"], "complete": complete,
            "train_loss": finite_or_none(train_loss), "lr": self._lr(),
            "epoch_time_s": round(acc["time"], 3), "samples_per_s": round(n / max(acc["time"], 1e-9), 1),
        }
        if diverged:
            rec["diverged"] = progress["diverged"] = True
        if last or diverged or not complete or (epoch + 1) % cfg.eval_every == 0:
            ev = self._eval_all()
            progress["last_eval"] = {"global_step": progress["global_step"], **ev}
            rec |= {"val_top1": ev["raw"]["top1"], "val_top5": ev["raw"]["top5"], "val_loss": ev["raw"]["loss"],
                    "corrupt_val_skipped": ev["raw"]["skipped_corrupt"]}
            if ev["ema"] is not None:
                rec |= {"val_top1_ema": ev["ema"]["top1"], "val_top5_ema": ev["ema"]["top5"],
                        "val_loss_ema": ev["ema"]["loss"]}
        rec["corrupt_train_replaced"] = int(corrupt)
        progress["history"] = [h for h in progress["history"] if h["epoch"] != epoch + 1] + [rec]
        progress["epoch"] = epoch + 1 if complete else epoch
        progress["step_in_epoch"] = 0 if complete else step
        progress["epoch_acc"] = None if complete else {**acc, "loss_sum": loss_sum, "samples": int(n),
                                                       "corrupt": int(corrupt)}  # every rank's, as _global_acc
        # resume.pt first: a run killed between the two writes is still a (resumable) run directory.
        self.save_state(progress)
        if self.info.is_main:
            with self._saving(METRICS_FILE):
                write_metrics(self.cfg.out, progress["history"])
            val = "" if "val_top1" not in rec else f"  val top-1 {100 * rec['val_top1']:.2f}%" + (
                f" (EMA {100 * rec['val_top1_ema']:.2f}%)" if "val_top1_ema" in rec else "") + (
                f"  {skipped_val_text(rec['corrupt_val_skipped'])}" if rec.get("corrupt_val_skipped") else "")
            loss = "diverged (non-finite)" if diverged else f"{train_loss:.4f}"
            print(f"epoch {epoch + 1}/{cfg.epochs}  step {rec['step']}  loss {loss}  "
                  f"lr {rec['lr']:.2e}  {rec['samples_per_s']:.0f} img/s{val}", flush=True)
        return diverged

    # ------------------------------------------------------------------------------------------- finish
    def finish(self, progress: dict[str, Any]) -> dict[str, Any]:
        """Final evaluation, rank-consistency check, checkpoint of the better of raw/EMA, plot; the summary."""
        cfg, info = self.cfg, self.info
        last = progress["last_eval"]
        if last is None or last["global_step"] != progress["global_step"]:
            ev = self._eval_all()
            if cfg.epochs == 0:
                progress["history"] = [{"epoch": 0, "step": 0, "val_top1": ev["raw"]["top1"],
                                        "val_top5": ev["raw"]["top5"], "val_loss": ev["raw"]["loss"]}]
        else:
            ev = last
        broadcast_buffers(self.net, info)
        digests = gather_digests(self.net, info)
        if len(set(digests)) != 1:
            raise RuntimeError(f"DDP ranks ended with different weights: {digests}")
        raw, ema = ev["raw"], ev["ema"]
        corrupt = len(union_over_ranks(self.corrupt_seen, info))
        if progress.get("corrupt_files") is None:  # resumed from a resume.pt that did not list them: at least
            corrupt = max([corrupt, *(h.get("corrupt_train_replaced", 0) for h in progress["history"])])
        use_ema = ema is not None and ema["top1"] > raw["top1"]
        chosen = self.ema.module if use_ema else self.net
        best_raw, best_raw_ep = best_of(progress["history"], "val_top1")
        best_ema, best_ema_ep = best_of(progress["history"], "val_top1_ema")
        wall = progress["wall_time_s"] + time.perf_counter() - self.t_start
        summary = {
            "dataset": cfg.dataset, "model": cfg.model, "recipe": cfg.recipe, "epochs": cfg.epochs,
            "epochs_completed": progress["epoch"], "steps": progress["global_step"],
            "steps_per_epoch": self.steps_per_epoch,
            # Exactly there: a --max-steps below the steps resume.pt had trained is refused (train.config).
            "stopped_by_max_steps": bool(cfg.max_steps) and cfg.max_steps == progress["global_step"] < self.total_steps,
            "train_images": len(self.train_set), "val_images": raw["samples"],
            "global_batch": self.global_batch, "world_size": info.world_size, "ddp_backend": info.backend,
            "lr": self.lr,
            "final_val_top1": raw["top1"], "final_val_top5": raw["top5"], "final_val_loss": raw["loss"],
            "final_val_top1_ema": None if ema is None else ema["top1"],
            "final_val_top5_ema": None if ema is None else ema["top5"],
            "best_val_top1": best_raw, "best_val_top1_epoch": best_raw_ep,
            "best_val_top1_ema": best_ema, "best_val_top1_ema_epoch": best_ema_ep,
            "weights_source": "ema" if use_ema else "raw", "diverged": bool(progress.get("diverged")),
            "wall_time_s": round(wall, 2), "train_time_s": round(progress["train_time_s"], 2),
            # CPU seconds of this (rank 0) process, all threads: on a shared machine wall time overstates cost.
            "cpu_time_s": round(progress["cpu_time_s"] + time.process_time() - self.cpu_start, 2),
            "samples_per_s": round(progress["samples_seen"] / progress["train_time_s"], 1)
            if progress["train_time_s"] > 0 else None,
            # The distinct train files training met and replaced (drop_last and --max-steps may leave some unmet).
            "corrupt_train_files": corrupt,
            "corrupt_val_skipped": raw["skipped_corrupt"],
            "device": str(self.dev), "device_name": torch.cuda.get_device_name(self.dev)
            if self.dev.type == "cuda" else "cpu", "threads": self.threads, "amp": "bf16" if self.amp else "off",
            "channels_last": self.channels_last, "compile": cfg.compile, "resumed_times": progress["segments"],
            "rank_state_sha256": digests, "started": progress["started"], "finished": _now(),
            "command_line": shlex.join(cfg.command), "config": cfg.to_dict(), "versions": versions(),
            "data": self.data_prints,
        }
        raise_discarded_signal()  # as before a save: the evaluation's iterator has just been shut down
        if info.is_main:
            self._publish(chosen, summary, progress)
            ema_txt = "" if ema is None else f", EMA {100 * ema['top1']:.2f}%"
            skipped = raw["skipped_corrupt"]
            print(f"checkpoint {cfg.out}: val top-1 {100 * raw['top1']:.2f}%{ema_txt} "
                  f"(saved {summary['weights_source']}), {summary['wall_time_s']:.0f} s"
                  f"{f'; {replaced_text(corrupt)}' if corrupt else ''}"
                  f"{f'; {skipped_val_text(skipped)}' if skipped else ''}", flush=True)
        return summary

    def run(self) -> dict[str, Any]:
        """Train from scratch or from resume.pt to the end (or --max-steps) and write the checkpoint; a resumed run
        with nothing left to train whose checkpoint is written says so and returns that checkpoint's summary."""
        progress = self.restore()
        cfg = self.cfg
        self.corrupt_seen = set(progress.get("corrupt_files") or [])
        if self.resumed:
            if not self._left_to_do(progress) and (summary := self._already_written(progress)) is not None:
                if self.info.is_main and not all((Path(cfg.out) / f).is_file() for f in (METRICS_FILE, PLOT_FILE)):
                    with self._saving(f"{METRICS_FILE} and {PLOT_FILE}", HISTORY_KEPT):
                        self._write_history(progress)  # killed after its checkpoint, before these: written now
                self.log(self._stopped_line(progress))
                return summary
            progress["segments"] += 1
            self.log(self._resuming_line(progress))
            for note in (self.data_note, self.model_note, self.numerics_note):
                if note:
                    self.log(note)
        elif cfg.resume:  # a preempted job reruns its command with --resume, also before its first save
            self.log(f"nothing to resume in {cfg.out} (no {RESUME_FILE}): starting at step 0")
        for note in (nested_note(self.train_set, self.val_set), stray_note(self.train_set, self.val_set)):
            if note:
                self.log(note)
        self.log(self._summary_line())
        if self.resumed:
            self._record_stopped_epoch(progress)
        for epoch in range(progress["epoch"], cfg.epochs):
            if progress.get("diverged") or (cfg.max_steps and progress["global_step"] >= cfg.max_steps):
                break
            if self.run_epoch(epoch, progress):
                break
        return self.finish(progress)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the training `cfg` describes on this process (joining torchrun's group if any); returns the summary."""
    fill_closed_std_streams()
    info = setup(cfg.device)
    ok = False
    created = missing_dirs(Path(cfg.out)) if info.is_main else []
    lock = contextlib.ExitStack()
    try:
        prepare_out_dir(cfg, info, lock)
        summary = Trainer(cfg, info).run()
        ok = True
        return summary
    finally:
        lock.close()  # before an empty run directory (and the lock file's parent) is removed
        if ok:
            teardown(info)
        else:
            # A bad --dataset (or any failure before the first write) leaves no empty run directory behind.
            remove_if_empty(created)
            if info.distributed:
                with contextlib.suppress(Exception):
                    torch.distributed.destroy_process_group()
