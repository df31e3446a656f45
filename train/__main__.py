"""`python -m train ...` (or under `torchrun -m train ...`): parse the options and run one training.

Bad input (unknown model or dataset, unreadable folder, out-of-range option) is one line on stderr, exit 2.
Nothing here imports torch at module level, so `quiet_openmp` takes effect.
"""

from __future__ import annotations

import os
import sys

from data.datasets import DatasetError
from models.checkpoint import CheckpointError
from train.config import ConfigError, config_from_options
from train.options import build_parser, explicit_options, quiet_openmp


def main(argv: list[str] | None = None) -> int:
    """Run `python -m train`; returns the exit code."""
    args = build_parser().parse_args(argv)
    quiet_openmp()
    try:
        cfg = config_from_options(explicit_options(args, argv))
        from train.trainer import train

        train(cfg)
    except (ConfigError, DatasetError, CheckpointError) as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            # A DataLoader worker's error arrives with its traceback text: its last line is the reason.
            print(f"python -m train: error: {str(exc).strip().splitlines()[-1]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from models.cli import run

    run(main, "python -m train")
