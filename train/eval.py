"""`python -m train.eval --checkpoint runs/x [--dataset animals]`: top-1/top-5 of a checkpoint, printed and as JSON.

It uses the checkpoint's own preprocessing (the serving path), so the numbers match what the server sees. The JSON
goes to a new path or replaces an earlier result of this tool; any other existing file is refused untouched.
"""

from __future__ import annotations

import models.cli  # noqa: F401 - first: a Ctrl-C or SIGTERM while the modules below load is one line (exit 130, 143)

# isort: split
import argparse
import json
import os
from pathlib import Path
from typing import Any

from data.datasets import EMBEDDED, SPLITS, DatasetError
from models.checkpoint import CheckpointError, read_checkpoint_meta
from models.cli import (
    InputError,
    OneLineParser,
    command,
    error_reason,
    int_in,
    machine_error,
    refuse_empty_paths,
    write_failed,
)
from models.host import MAX_THREADS
from models.io import atomic_write_json, out_file_problem
from train.config import DEVICES, MAX_DEVICE_BATCH, MAX_WORKERS, ConfigError
from train.options import quiet_openmp

PROG = "python -m train.eval"
RESULT_FORMAT = "vitc-eval"
RESULT_VERSION = 1
MAX_RESULT_BYTES = 1 << 20  # a result is a few hundred bytes; this bounds reading a file we may replace
# What every result has carried since the first release (older ones have no "format" field).
LEGACY_KEYS = frozenset({"checkpoint", "model", "weights_sha256", "dataset", "split", "top1", "top5", "samples"})


class OutputRefused(ValueError):
    """--out names something this tool must not replace."""


def is_eval_result(path: Path) -> bool:
    """Whether the regular file `path` holds a result this tool wrote (by its JSON content)."""
    try:
        if path.stat().st_size > MAX_RESULT_BYTES:
            return False
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    if not isinstance(doc, dict):
        return False
    if "format" in doc:
        return doc["format"] == RESULT_FORMAT
    return LEGACY_KEYS <= doc.keys()


def check_out(path: Path, dataset: str | None = None) -> None:
    """OutputRefused unless `path` is new or an earlier result of this tool (the only file it may replace), with a
    name the file system takes ending in .json, outside the folder of `dataset` (the data evaluated)."""
    harm = "the result would become part of the data; choose a path outside it"
    inside = (dataset, "the dataset folder", harm) if dataset and dataset not in EMBEDDED else None
    if problem := out_file_problem(path, "eval.json", inside=inside, existing=_not_ours, links=False,
                                   noun="file path"):
        raise OutputRefused(problem)
    # As serve.sample and serve.tensor name their format: `--out -` (stdout by convention) must not become a file
    # named '-'; the result is printed anyway.
    if Path(path).name.lower() == ".json":  # a hidden file: its suffix is empty, and it has no name but .json
        raise OutputRefused(f"--out {str(path)!r} is a hidden file named {Path(path).name!r}: give a file name such "
                            "as eval.json")
    if Path(path).suffix.lower() != ".json":
        raise OutputRefused(f"--out {str(path)!r} must end in .json (the result is a JSON file; the scores are "
                            "printed too)")
    try:
        _check_parents(path)
    except OSError as exc:  # a directory on the way that cannot be searched
        raise OutputRefused(f"--out {path}: {exc.strerror or exc}") from None


def _not_ours(path: Path) -> str | None:
    """Why the existing `path` must not be replaced: anything but an earlier result of this tool."""
    if not path.is_file() or not is_eval_result(path):
        return f"--out {path} exists and is not a result of {PROG}; nothing was changed: give a new path"
    return None


def _check_parents(path: Path) -> None:
    """OutputRefused for a file in the way of `path`'s directory (found now, not after the evaluation)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputRefused(f"--out {path}: {parent} is not a directory")
            break


def write_result(path: Path, res: dict[str, Any]) -> None:
    """Check `path` again (evaluating took a while) and write the result atomically; OSError when the machine fails
    the write (a full disk: `main` says so, naming the file)."""
    check_out(path, res.get("dataset"))
    try:
        atomic_write_json(path, {"format": RESULT_FORMAT, "format_version": RESULT_VERSION, **res})
    except OSError as exc:  # read-only file system, no permission (a full disk is the machine: exit 1)
        if write_failed(exc, path):
            raise
        raise OutputRefused(f"--out {path}: cannot write it: {exc.strerror or exc} (nothing was written)") from None


def recorded_dataset(checkpoint: str) -> str | None:
    """The dataset the checkpoint was trained on (evaluated when --dataset is not given), or None when it records
    none or cannot be read (evaluating it then says why)."""
    try:
        dataset = read_checkpoint_meta(checkpoint).dataset
    except (CheckpointError, OSError):  # OSError: a directory on the way that cannot be searched
        return None
    return dataset if isinstance(dataset, str) else None


def default_out(checkpoint: Path, dataset: str, split: str) -> Path:
    """<checkpoint directory>/eval-<dataset>-<split>.json (--checkpoint may name checkpoint.json itself)."""
    folder = checkpoint.parent if checkpoint.is_file() else checkpoint
    return folder / f"eval-{Path(dataset).name}-{split}.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = OneLineParser(prog=PROG, description=__doc__)
    p.add_argument("--checkpoint", required=True, help="run directory holding checkpoint.json")
    p.add_argument("--dataset", help="animals, mnist, digits or an ImageNet-layout folder (default: the "
                   "checkpoint's training dataset)")
    p.add_argument("--split", choices=SPLITS, default="val", help="split to evaluate (default val)")
    p.add_argument("--batch-size", type=int_in(1, MAX_DEVICE_BATCH), default=256,
                   help=f"images per batch, 1..{MAX_DEVICE_BATCH} (default 256)")
    p.add_argument("--workers", type=int_in(0, MAX_WORKERS), default=0,
                   help=f"decoding processes, 0..{MAX_WORKERS} (default 0)")
    p.add_argument("--threads", type=int_in(1, MAX_THREADS),
                   help=f"CPU threads, 1..{MAX_THREADS} (default: torch's, all cores)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA if available (default auto)")
    p.add_argument("--corrupt", choices=("skip", "fail"), default="skip",
                   help="unreadable files: leave out and count, or fail (default skip)")
    p.add_argument("--limit", type=int_in(0, 10**9), default=0,
                   help="evaluate a fixed random subset of this many images: the one `python -m train "
                   "--val-subset N` validated on, whatever its --seed")
    p.add_argument("--out", help="JSON path ending in .json: new, or an earlier result of this tool "
                   "(default <checkpoint>/eval-<dataset>-<split>.json)")
    args = p.parse_args(argv)
    # Before anything is read: Path("") is the current directory, and an empty --dataset used to mean the
    # checkpoint's own: `--dataset "$DATA"` with DATA unset must not quietly evaluate something else.
    refuse_empty_paths(p, (
        ("--checkpoint", args.checkpoint, "give the run directory holding checkpoint.json"),
        ("--dataset", args.dataset, f"give one of {', '.join(EMBEDDED)} or an ImageNet-layout folder, or omit "
         "--dataset to evaluate on the checkpoint's training dataset"),
        ("--out", args.out, "give a JSON path, or omit --out for <checkpoint>/eval-<dataset>-<split>.json"),
    ))
    if args.out is not None and args.out.endswith(("/", "/.")):
        # Path() drops the '/' that says "a directory": `--out runs/evals.json/` then wrote a file runs/evals.json.
        p.error(f"--out {args.out!r} ends in '/', so it names a directory: give a file path such as "
                f"{os.path.join(os.path.normpath(args.out), 'eval.json')!r}")
    args.out = Path(args.out) if args.out is not None else None
    return args


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    """Parse, evaluate, print and write the JSON; returns the exit code."""
    args = parse_args(argv)
    quiet_openmp()
    try:
        if args.out is not None:  # before minutes of evaluation, not after
            check_out(args.out, args.dataset or recorded_dataset(args.checkpoint))
        import torch

        from models.host import quota_cpus
        from train.evaluate import evaluate_checkpoint

        if threads := args.threads or quota_cpus():  # torch sizes itself by the CPU set, not a CPU limit
            torch.set_num_threads(threads)

        res = evaluate_checkpoint(args.checkpoint, args.dataset, args.split, batch_size=args.batch_size,
                                  workers=args.workers, corrupt=args.corrupt, device=args.device, limit=args.limit)
        out = args.out or default_out(Path(args.checkpoint), res["dataset"], args.split)
        try:
            write_result(out, res)
        except OSError as exc:  # the machine: one line naming the file, exit 1
            if failed := write_failed(exc, out):
                raise failed from None
            raise
    except (ConfigError, DatasetError, CheckpointError, OutputRefused) as exc:
        raise InputError(error_reason(exc)) from None  # whole: a path it names may hold a newline
    except (MemoryError, RuntimeError) as exc:
        if failed := machine_error(exc, "try a smaller --batch-size"):
            raise failed from None
        raise
    skipped = f", {res['skipped_corrupt']} corrupt skipped" if res["skipped_corrupt"] else ""
    same = ", the images the run reported on" if res["same_images_as_training"] else ""
    print(f"{res['model']} on {res['dataset']} ({args.split}, {res['samples']} images{skipped}{same}): "
          f"top-1 {100 * res['top1']:.2f} %  top-5 {100 * res['top5']:.2f} %  -> {out}")
    return 0


if __name__ == "__main__":
    from models import cli

    cli.run(main, PROG)
