"""`python -m train ...` (or under `torchrun -m train ...`): parse the options and run one training.

Bad input (unknown model or dataset, unreadable folder, out-of-range option, an --out that is not a run, another
process training into it, a partial or malformed set of torchrun's variables) is one line on stderr, exit 2;
running out of memory is one line, exit 1. Under torchrun a data error met mid-training (a corrupt file met by one
rank) is said by the rank that met it, prefixed with its rank (exit 2), and the other ranks, which then lose it
mid-collective, say so in one line each, exit 1. A data error before the first step fails every rank alike (exit 2):
the first rank of each node says it, and an unreadable class or val split names the ranks that met it.
Nothing here imports torch at module level, so `quiet_openmp` takes effect.
"""

from __future__ import annotations

import models.cli  # noqa: F401 - first: a Ctrl-C or SIGTERM while the modules below load is one line (exit 130, 143)

# isort: split
import os

from data.datasets import EMBEDDED, DatasetError, UnreadableImage
from models.checkpoint import CheckpointError
from models.cli import InputError, command, error_reason, machine_failure, one_line, refuse_empty_paths, say
from models.extras import require
from train.config import ConfigError, config_from_options
from train.options import build_parser, explicit_options, ignored_note, quiet_openmp

PROG = "python -m train"
# How gloo and NCCL report a rank that died while the others waited for it in a collective.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
             "remote process exited or there was a network error", "Socket Timeout")

# How gloo reports a collective that waited the whole timeout (VITC_DIST_TIMEOUT_S) for a rank that hangs.
PEER_SILENT = ("Timed out waiting",)


def lost_peer(exc: BaseException) -> str | None:
    """How torch.distributed said it lost another rank (which failed or was stopped) mid-collective, or None."""
    text = str(exc)
    if sign := next((sign for sign in PEER_LOST if sign in text), None):
        return sign
    if any(c.__name__ == "DistError" for c in type(exc).__mro__):  # DistBackendError, DistNetworkError, ...
        return type(exc).__name__
    return None


def speaker() -> str:
    """The program's name in its lines, with this process's rank under torchrun (ranks share one stderr). Read
    before the variables are checked (`cli.run` needs it first): a malformed one names no rank."""
    world, rank = os.environ.get("WORLD_SIZE", "1").strip(), os.environ.get("RANK", "0").strip()
    distributed = world.isascii() and world.isdigit() and int(world) > 1
    return f"{PROG} (rank {int(rank)})" if distributed and rank.isascii() and rank.isdigit() else PROG


@command(PROG)  # said without the rank: every rank meets bad input alike
def main(argv: list[str] | None = None) -> int:
    """Run `python -m train`; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Refused by name before anything else: `--out " "` trained into a directory named " " here, and an empty
    # --out or --dataset (Path("") is the current directory) was only called "required".
    refuse_empty_paths(parser, (
        ("--dataset", args.dataset, f"give one of {', '.join(EMBEDDED)} or an ImageNet-layout folder"),
        ("--out", args.out, "give the run directory"),
    ))
    quiet_openmp()
    # Everything the run needs, up front: matplotlib draws the curves only after the last epoch.
    require("torch", "safetensors", "tqdm", "matplotlib")
    from train.distributed import TIMEOUT_ENV, DistSetupError, dist_env, watch_signals  # torch: after quiet_openmp

    try:
        # A partial or malformed set (WORLD_SIZE alone, RANK=x, WORLD_SIZE=-1) trained as one process, with a
        # negative learning rate, or failed mid-setup with a traceback: each process says it, before any work.
        env = dist_env()
    except ConfigError as exc:
        raise InputError(str(exc)) from None
    rank, world, who = env.rank, env.world_size, speaker()
    if env.launched:
        # A rank blocked in gloo or NCCL cannot run Python's signal handlers: SIGTERM and Ctrl-C waited for the
        # 30-minute timeout. This still stops it, with the same line and code, once they go unanswered.
        watch_signals(who)
    try:
        explicit = explicit_options(args, argv)
        cfg = config_from_options(explicit)
        if rank == 0 and (note := ignored_note(explicit, cfg.augment)):
            print(note, flush=True)  # stdout, as the run's other notes
        from train.trainer import train

        train(cfg)
    except DatasetError as exc:
        # A corrupt file met mid-epoch is one rank's: that rank says it (the others lose it, below). A dataset that
        # does not load, or fails a check the ranks agree on (the line names the ranks that met it), fails every rank
        # of a machine alike: its first rank says it (once per node).
        if isinstance(exc, UnreadableImage) or env.local_rank == 0:
            # A DataLoader worker's error arrives with its traceback text: error_reason takes its last line.
            say(f"{who}: error: {one_line(error_reason(exc))}")
        return 2
    except (ConfigError, CheckpointError) as exc:
        if rank == 0:  # every rank meets these alike: one line is enough
            raise InputError(error_reason(exc)) from None  # whole: a path it names may hold a newline
        return 2
    except DistSetupError as exc:  # every rank that waited in vain says so: the one missing says nothing
        say(f"{who}: error: {exc}")
        return 1
    except (MemoryError, RuntimeError) as exc:
        if world > 1 and any(sign in str(exc) for sign in PEER_SILENT):
            say(f"{who}: error: another rank did not answer within {env.timeout_s:g} s: it hangs or was stopped "
                f"(a slow one needs a longer {TIMEOUT_ENV}); what the run saved is kept and --resume continues from it")
            return 1
        if world > 1 and (how := lost_peer(exc)):
            say(f"{who}: error: lost another rank ({how}): it failed or was stopped, and its own message says why")
            return 1
        # Any rank may run out; each says so (resume.pt holds the last save, so --resume continues from it).
        code = machine_failure(exc, who, "try a smaller --batch-size (or --eval-batch-size); what the run saved is "
                                         "kept and --resume continues from it")
        if code is None:
            raise
        return code
    return 0


if __name__ == "__main__":
    from models import cli

    cli.run(main, speaker())  # "interrupted" and "terminated" say which rank, as the errors do
