"""`python -m train.eval --checkpoint runs/x [--dataset animals]`: top-1/top-5 of a checkpoint, printed and as JSON.

It uses the checkpoint's own preprocessing (the serving path), so the numbers match what the server sees.
"""

from __future__ import annotations

import sys
from pathlib import Path

from data.datasets import SPLITS, DatasetError
from models.checkpoint import CheckpointError
from models.cli import OneLineParser
from models.io import atomic_write_json
from train.config import DEVICES, ConfigError
from train.options import quiet_openmp


def main(argv: list[str] | None = None) -> int:
    """Parse, evaluate, print and write the JSON; returns the exit code."""
    p = OneLineParser(prog="python -m train.eval", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="run directory holding checkpoint.json")
    p.add_argument("--dataset", help="animals, mnist, digits or an ImageNet-layout folder (default: the "
                   "checkpoint's training dataset)")
    p.add_argument("--split", choices=SPLITS, default="val", help="split to evaluate (default val)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (default 0)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA if available (default auto)")
    p.add_argument("--corrupt", choices=("skip", "fail"), default="skip",
                   help="unreadable files: leave out and count, or fail (default skip)")
    p.add_argument("--limit", type=int, default=0, help="evaluate a fixed random subset of this many images")
    p.add_argument("--out", help="JSON path (default <checkpoint>/eval-<dataset>-<split>.json)")
    args = p.parse_args(argv)
    quiet_openmp()
    for name, lo, hi in (("batch_size", 1, 4096), ("workers", 0, 64), ("limit", 0, 10**9)):
        if not lo <= getattr(args, name) <= hi:
            p.error(f"--{name.replace('_', '-')} must be in [{lo}, {hi}], got {getattr(args, name)}")
    try:
        from train.evaluate import evaluate_checkpoint

        res = evaluate_checkpoint(args.checkpoint, args.dataset, args.split, batch_size=args.batch_size,
                                  workers=args.workers, corrupt=args.corrupt, device=args.device, limit=args.limit)
    except (ConfigError, DatasetError, CheckpointError) as exc:
        print(f"{p.prog}: error: {str(exc).strip().splitlines()[-1]}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.checkpoint) / f"eval-{Path(res['dataset']).name}-{args.split}.json"
    atomic_write_json(out, res)
    skipped = f", {res['skipped_corrupt']} corrupt skipped" if res["skipped_corrupt"] else ""
    print(f"{res['model']} on {res['dataset']} ({args.split}, {res['samples']} images{skipped}): "
          f"top-1 {100 * res['top1']:.2f} %  top-5 {100 * res['top5']:.2f} %  -> {out}")
    return 0


if __name__ == "__main__":
    from models.cli import run

    run(main, "python -m train.eval")
