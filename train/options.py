"""Command-line options of `python -m train`: every TrainConfig knob, documented with each recipe's default."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from models.cli import OneLineParser
from train.config import AMP_MODES, AUGMENTS, CORRUPT_POLICIES, DEVICES, OPTIMIZERS, RECIPES


def _recipe_defaults(key: str) -> str:
    values = {name: r[key] for name, r in RECIPES.items()}
    if len(set(map(str, values.values()))) == 1:
        return f"default {next(iter(values.values()))}"
    return "defaults: " + ", ".join(f"{n} {v}" for n, v in values.items())


def _knob(group: argparse._ArgumentGroup, flag: str, text: str = "", **kwargs: Any) -> None:
    """An option whose default the recipe gives: its help ends with each recipe's value of it."""
    defaults = f"({_recipe_defaults(flag.removeprefix('--').replace('-', '_'))})"
    group.add_argument(flag, help=f"{text} {defaults}" if text else defaults, **kwargs)


def build_parser() -> OneLineParser:
    """The `python -m train` parser; every default is None so explicitly given options are known."""
    p = OneLineParser(
        prog="python -m train",
        description="Train a ViT_P / ViT_C model and write a servable checkpoint directory (checkpoint.json + "
        "safetensors, metrics.jsonl, curves.png, resume.pt). Runs on one GPU, on the CPU, or under "
        "`torchrun --nproc_per_node N -m train ...` (DDP; NCCL on GPUs, gloo on CPU; multi-node through "
        "torchrun's --nnodes/--rdzv-* flags). --batch-size is per process; the global batch is batch x processes.",
        epilog="Results: checkpoint.json holds \"training\" with final_val_top1, final_val_top1_ema, best_val_top1, "
        "best_val_top1_ema (fractions), weights_source (raw or ema: the better final one is saved), wall_time_s, "
        "samples_per_s, corrupt_train_files (the distinct unreadable train files training met and replaced), "
        "command_line (a command that reruns it), versions. Bad input exits 2 with one line on stderr.",
        argument_default=None,
        # Options spelled in full only: the command line is recorded as the command that reruns the training, and
        # its --max-steps is replaced on a resume; `--max-step 20` would survive that and stop a rerun early.
        allow_abbrev=False,
    )
    g = p.add_argument_group("what to train")
    g.add_argument("--model", help="variant name (python -m models list), e.g. vit_c_mini, vit_p_1gf")
    g.add_argument("--dataset", help="animals, mnist, digits, or a folder in the ImageNet layout "
                   "(root/train/<class>/*.jpg, root/val/<class>/*.jpg)")
    g.add_argument("--out", help="run directory: checkpoint, metrics.jsonl, curves.png, resume.pt")
    g.add_argument("--recipe", choices=("auto", *RECIPES),
                   help="defaults for the optimisation knobs; auto (default): small for the embedded sets, "
                   "paper for folders")
    _knob(g, "--epochs", "epochs; 0 writes the untrained checkpoint after one evaluation", type=int)
    g.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in total (0: no limit); "
                   "the schedule still spans --epochs")
    g.add_argument("--train-subset", type=int, help="train on a random subset of this many images, drawn with "
                   "--seed (0: all)")
    g.add_argument("--val-subset", type=int, help="evaluate on a fixed random subset of this many images, the same "
                   "whatever --seed: the one `python -m train.eval --limit N` re-measures (0: all)")
    g.add_argument("--seed", type=int, help="seed of initialisation, data order, augmentation, mixing and the "
                   "--train-subset (default 0)")

    o = p.add_argument_group("optimisation")
    _knob(o, "--batch-size", "images per process and step", type=int)
    _knob(o, "--optimizer", choices=OPTIMIZERS)
    _knob(o, "--lr", "base learning rate at a global batch of --lr-ref-batch, scaled linearly to the actual global "
          "batch", type=float)
    _knob(o, "--lr-ref-batch", "global batch at which --lr applies", type=int)
    _knob(o, "--weight-decay", "decoupled (AdamW) or L2 (SGD) weight decay; never on biases and norm parameters",
          type=float)
    _knob(o, "--betas", "AdamW betas", type=float, nargs=2, metavar=("B1", "B2"))
    _knob(o, "--eps", "AdamW epsilon", type=float)
    _knob(o, "--momentum", "SGD momentum", type=float)
    _knob(o, "--nesterov", "SGD Nesterov", action=argparse.BooleanOptionalAction)
    _knob(o, "--warmup-epochs", "linear warm-up length", type=float)
    _knob(o, "--warmup-start", "warm-up starts at this fraction of the lr", type=float)
    _knob(o, "--min-lr-ratio", "cosine decays to this fraction of the lr", type=float)
    _knob(o, "--clip-grad", "clip the gradient norm to this (0: off)", type=float)

    a = p.add_argument_group("regularisation and augmentation")
    _knob(a, "--label-smoothing", type=float)
    _knob(a, "--mixup", "mixup alpha, 0 disables", type=float)
    _knob(a, "--cutmix", "CutMix alpha, 0 disables; with both on, one is picked per batch with p 0.5", type=float)
    _knob(a, "--mix-prob", "probability that a batch is mixed at all", type=float)
    _knob(a, "--augment", "none: the evaluation view alone (resize + centre crop, no flip unless --hflip is given); "
          "light: random-resized crop + flip; autoaugment: light + AutoAugment's ImageNet policy", choices=AUGMENTS)
    _knob(a, "--crop-scale", "smallest area fraction of the random-resized crop (ignored with --augment none)",
          type=float)
    # Not a _knob: under --augment none its default is 0 (train.config.resolve_config), whatever the recipe's.
    a.add_argument("--hflip", type=float, help="horizontal flip probability; 0 with --augment none unless given, "
                   f"and the run records the number it uses ({_recipe_defaults('hflip')})")
    _knob(a, "--ema", "keep an EMA of the weights", action=argparse.BooleanOptionalAction)
    _knob(a, "--ema-horizon", "EMA averaging length as a fraction of the run's steps; the paper's 1.6e-3 per 32 "
          "steps is 0.078 of its ImageNet run", type=float)
    _knob(a, "--ema-every", "update the EMA every N steps; during warm-up it copies the weights", type=int)

    s = p.add_argument_group("system")
    s.add_argument("--device", choices=DEVICES, help="auto: CUDA if available, else CPU (default auto)")
    s.add_argument("--amp", choices=AMP_MODES, help="bf16 autocast; auto: on for CUDA, off on CPU (default auto)")
    s.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="channels_last memory format (default: on for CUDA with a conv stem)")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model (default off)")
    s.add_argument("--workers", type=int, help="data-loading processes per rank (default: 0 for in-memory sets on "
                   "the CPU, else min(8, cores per rank))")
    s.add_argument("--threads", type=int, help="CPU threads per rank (default: cores / local ranks)")
    s.add_argument("--eval-batch-size", type=int, help="evaluation batch (0: 2 x --batch-size, at most 512)")
    s.add_argument("--eval-every", type=int, help="evaluate every N epochs; the last epoch always (default 1)")
    s.add_argument("--save-every-steps", type=int, help="also write resume.pt every N steps within an epoch "
                   "(0: at epoch ends only) (default 0)")
    s.add_argument("--corrupt", choices=CORRUPT_POLICIES, help="unreadable image files: skip them and count, or "
                   "fail (default skip)")
    s.add_argument("--progress", action=argparse.BooleanOptionalAction,
                   help="progress bar (default: only when stderr is a terminal)")
    s.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in --out from its resume.pt (optimizer, schedule, EMA, RNG and data "
                   "position) on the same data (a changed dataset is refused; the same files at a new path are "
                   "taken with --dataset NEW); starts fresh if there is none. Other options default to the saved "
                   "ones; a run with nothing left to train says so and exits 0")
    s.add_argument("--overwrite", action="store_true", default=None, help="start over in an --out that holds a run")
    return p


def explicit_options(args: argparse.Namespace, argv: list[str] | None = None) -> dict[str, Any]:
    """The options the user gave (non-None), plus the command line for the training summary."""
    opts = {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(args).items() if v is not None}
    opts["command"] = command_line(sys.argv[1:] if argv is None else argv)
    return opts


def ignored_note(explicit: dict[str, Any], augment: str) -> str:
    """"note: ..." for an explicit option the run's --augment does not use, else ""."""
    if augment == "none" and "crop_scale" in explicit:
        return ("note: --crop-scale is ignored with --augment none (it sizes the random-resized crop, which none "
                "does not take)")
    return ""


def command_line(argv: list[str]) -> tuple[str, ...]:
    """The command that reruns this training: `python -m train ...`, under torchrun when it launched this one
    (sys.argv[0] is the path of train/__main__.py, which no one can rerun as it is)."""
    env = os.environ
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return ("python", "-m", "train", *argv)
    world = int(env["WORLD_SIZE"])
    local = int(env.get("LOCAL_WORLD_SIZE", world))
    nodes = ("--nnodes", str(world // local)) if world > local else ()
    return ("torchrun", *nodes, "--nproc_per_node", str(local), "-m", "train", *argv)


def quiet_openmp() -> None:
    """Let idle OpenMP threads sleep rather than spin (before torch loads; an explicit setting wins).

    On a CPU shared with other work, spinning threads that wait at every op's barrier for a descheduled peer
    cost 2-4x in training throughput here; on an idle machine sleeping costs a few per cent.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
