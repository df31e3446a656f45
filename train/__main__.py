"""`python -m train ...` (or under `torchrun -m train ...`): parse the options and run one training.

Bad input (unknown model or dataset, unreadable folder, out-of-range option, an --out that is not a run, another
process training into it) is one line on stderr, exit 2; running out of memory is one line, exit 1.
Nothing here imports torch at module level, so `quiet_openmp` takes effect.
"""

from __future__ import annotations

import os
import sys

from data.datasets import DatasetError
from models.checkpoint import CheckpointError
from models.cli import machine_failure
from train.config import ConfigError, config_from_options
from train.options import build_parser, explicit_options, quiet_openmp

PROG = "python -m train"


def main(argv: list[str] | None = None) -> int:
    """Run `python -m train`; returns the exit code."""
    args = build_parser().parse_args(argv)
    quiet_openmp()
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = config_from_options(explicit_options(args, argv))
        from train.trainer import train

        train(cfg)
    except (ConfigError, DatasetError, CheckpointError) as exc:
        if rank == 0:
            # A DataLoader worker's error arrives with its traceback text: its last line is the reason.
            print(f"{PROG}: error: {str(exc).strip().splitlines()[-1]}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        # Any rank may run out; each says so (resume.pt holds the last save, so --resume continues from it).
        code = machine_failure(exc, f"{PROG} (rank {rank})" if rank else PROG,
                               "try a smaller --batch-size (or --eval-batch-size); what the run saved is kept and "
                               "--resume continues from it")
        if code is None:
            raise
        return code
    return 0


if __name__ == "__main__":
    from models import cli

    cli.run(main, PROG)
