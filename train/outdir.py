"""The run directory's guards: --out is checked, locked and probed before the training starts, and a failed start
removes the directories it created."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from data.datasets import EMBEDDED
from models.checkpoint import META_FILE
from models.io import DirectoryBusy, ensure_dir, is_mount_point, out_inside_problem, resolve_path, writer_lock
from train.config import ConfigError, TrainConfig
from train.distributed import DistInfo, all_reduce_sum
from train.report import METRICS_FILE, PLOT_FILE
from train.state import RESUME_FILE, clear_stale_temporaries, is_run_dir, own_temporary

RUN_LOCK = ".vitc-run.lock"  # the run's writer lock inside a mount point --out (never cleared as a leftover)


def check_out_dir(cfg: TrainConfig) -> None:
    """--out must be absent, empty or this project's run directory; an existing run needs --resume or --overwrite.

    Anything else (a user's files, an export bundle) is refused untouched: the run would replace or mix into it.
    """
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if not out.is_dir():
        return
    try:  # vitc's own temporaries do not count; a `.tmpXXXXXX` does (safetensors' name is also a user's)
        entries = sorted(p.name for p in out.iterdir() if not own_temporary(p.name) and p.name != RUN_LOCK)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot read it: {exc.strerror or exc}") from None
    if not entries:
        return
    if not is_run_dir(out):
        raise ConfigError(f"--out {out} is not empty ({len(entries)} entries, e.g. {entries[0]!r}) and is not a "
                          f"training run (no valid {META_FILE} or {RESUME_FILE}); nothing was changed: choose a new "
                          f"or empty directory")
    if not (cfg.resume or cfg.overwrite):
        raise ConfigError(f"--out {out} already holds a run; pass --resume to continue it or --overwrite to start over")


def check_out_outside_data(cfg: TrainConfig) -> None:
    """--out may not lie inside a dataset folder: its directory would become a class, its plot an image."""
    if cfg.dataset in EMBEDDED:
        return
    harm = "the run's directory and files would become part of the data; choose a directory outside it"
    if problem := out_inside_problem(cfg.out, cfg.dataset, "the dataset folder", harm):
        raise ConfigError(problem)


def _lock_out_dir(out: Path, stack: contextlib.ExitStack) -> None:
    """Hold the project's writer lock on `out` until `stack` closes: a second run into it stops with one line.

    The lock lives beside `out`, or inside it (RUN_LOCK) where `out` is a mount point: a volume's parent is often
    read-only (a container's root) and holds nothing of the run."""
    try:
        ensure_dir(out.parent)
        # Resolved, so two spellings of one directory (a symlink, `.`) take the same lock.
        target = resolve_path(out)
        stack.enter_context(writer_lock(target, target / RUN_LOCK if is_mount_point(target) else None))
    except DirectoryBusy as exc:
        raise ConfigError(f"--out: {exc} (one run per directory)") from None
    except OSError as exc:  # read-only or virtual file system, a file in the path, no permission
        raise ConfigError(f"--out {out}: cannot use it as the run directory: {exc.strerror or exc}") from None


def check_out_files(out: Path) -> None:
    """ConfigError when a file the run writes into --out is a directory there (not a link, which a save replaces):
    its rename would fail at the first save, after training up to it."""
    for name in (RESUME_FILE, META_FILE, METRICS_FILE, PLOT_FILE):
        if (out / name).is_dir() and not (out / name).is_symlink():
            raise ConfigError(f"--out {out}: {name} is a directory, where the run writes a file; nothing was "
                              "changed: remove it, or choose a new --out")


def probe_writable(out: Path) -> None:
    """Create and remove a file in `out`: an existing read-only directory passes mkdir and the lock (which lives
    beside it), and would otherwise fail at the first save, after the training. Named as the resume writer's
    temporary, so a kill in between leaves a file the next run clears, not one that makes --out look foreign."""
    fd, tmp = tempfile.mkstemp(prefix=f".{RESUME_FILE}.", suffix=".tmp", dir=out)
    os.close(fd)
    os.unlink(tmp)


def prepare_out_dir(cfg: TrainConfig, info: DistInfo, stack: contextlib.ExitStack) -> None:
    """Rank 0 locks, checks and creates --out (the lock lives until `stack` closes); every rank learns the outcome.

    Nothing of an existing run is removed here: --overwrite replaces the old run once the new one first saves.
    """
    out, problem = Path(cfg.out), None
    if info.is_main:
        try:
            check_out_outside_data(cfg)  # before the lock, whose file would be written beside --out
            _lock_out_dir(out, stack)
            check_out_dir(cfg)
            try:
                ensure_dir(out)
                clear_stale_temporaries(out)
                check_out_files(out)
                probe_writable(out)
            except OSError as exc:
                raise ConfigError(f"--out {out}: cannot use it as the run directory: {exc.strerror or exc}") from None
        except ConfigError as exc:
            problem = exc
    # The other ranks would otherwise train on and fail later, at their first collective, with no reason given.
    if all_reduce_sum([float(problem is not None)], info)[0]:
        raise problem or ConfigError(f"--out {out}: refused by rank 0")


def missing_dirs(path: Path) -> list[Path]:
    """`path` and those of its ancestors that do not exist yet, deepest first (what mkdir(parents=True) makes)."""
    made = []
    with contextlib.suppress(OSError):
        while not path.exists() and path != path.parent:
            made.append(path)
            path = path.parent
    return made


def remove_if_empty(dirs: list[Path]) -> None:
    """Undo the run directory a failed start created: remove each still-empty directory, deepest first."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:  # not empty (something was written), already gone, or not ours to remove
            return
