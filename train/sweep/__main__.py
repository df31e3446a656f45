"""`python -m train.sweep`: reproduce the paper's claims (convergence, SGD vs AdamW, lr/wd stability) at small scale.

Examples:
  python -m train.sweep --preset reduced --out results/paper-reduced --workers 2
  python -m train.sweep --study stability --models vit_c_micro,vit_p_micro --samples 16 --dry-run
  python -m train.sweep --out results/paper-reduced --report-only   # rebuild summary, plots (study.json's settings)
  python -m train.sweep --preset full --workers 4 --devices 0,1,2,3 --train-args='--batch-size 256'

Rerunning the same command resumes: runs whose result file exists are skipped.
"""

from __future__ import annotations

import models.cli  # noqa: F401 - first: a Ctrl-C or SIGTERM while the modules below load is one line (exit 130, 143)

# isort: split
import argparse
import contextlib
import dataclasses
import io
import re
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from data.datasets import EMBEDDED, SPLITS
from models.cli import InputError, OneLineParser, Terminated, WorkFailed, command, int_in, int_list, refuse_empty_paths
from models.device import is_gpu_index
from models.host import MAX_THREADS
from models.io import DirectoryBusy, ensure_dir, resolve_path, writer_lock
from train.config import OPTIMIZERS
from train.sweep.claims import MIN_SEEDS
from train.sweep.plan import (
    MAX_EPOCHS,
    MAX_SAMPLES,
    MAX_SEED,
    METRICS,
    STUDIES,
    STUDY_FILE,
    TUNINGS,
    StudyConfig,
    range_problem,
    recorded_study,
)
from train.sweep.presets import PRESETS, make_config
from train.sweep.runner import DamagedResult, RunFailed, WorkerSlot, make_slots
from train.sweep.spec import train_args_text

PROG = "python -m train.sweep"
MAX_WORKERS = 256  # each worker is a training process
# Set by the sweep for every run (from the study and the run's spec): a copy in --train-args would silently win
# over them, and the result would be filed under settings it was not trained with.
# lr_ref_batch rescales the lr a run uses away from the sampled lr the tables print.
SWEEP_SETS = ("model", "dataset", "epochs", "optimizer", "lr", "lr_ref_batch", "weight_decay", "seed", "threads",
              "out", "resume", "overwrite")
# What a stop of --report-only says: it trains nothing, and what it stopped is the report, each file replaced whole.
REPORT_STOPPED = ("the report may be only partly rewritten (summary.json is written last); rerun the same command to "
                  "write it")
# Cut every run short of the epochs the study files it under: the curves and verdicts would name a schedule that
# never ran (the reduced preset is how a study is made shorter).
SWEEP_REFUSES = {"max_steps": "it stops every run before the epochs the study files it under; use --preset reduced "
                              "or --epochs for a shorter study"}


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _devices(text: str) -> tuple[str, ...]:
    """GPU indices, e.g. 0,1 (each worker's CUDA_VISIBLE_DEVICES; the study's first one is measured as cuda:N)."""
    ids = _names(text)
    if bad := [d for d in ids if not is_gpu_index(d)]:
        raise argparse.ArgumentTypeError(f"expected GPU indices 0 to 99 such as 0,1, got {bad[0]!r}")
    return ids


def _range(text: str) -> tuple[str, tuple[float, float]]:
    """OPT=LOW,HIGH, e.g. adamw=1e-4,1e-2."""
    try:
        opt, bounds = text.split("=", 1)
        low, high = (float(x) for x in bounds.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected OPT=LOW,HIGH (e.g. adamw=1e-4,1e-2), got {text!r}") from None
    if opt not in OPTIMIZERS:
        raise argparse.ArgumentTypeError(f"unknown optimizer {opt!r} in {text!r}; expected one of {OPTIMIZERS}")
    problem = range_problem((low, high))
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return opt, (low, high)


def dataset_problem(name: str) -> str | None:
    """Why `python -m train --dataset name` would fail to find the data (checked without loading it), or None."""
    if name in EMBEDDED:
        return None
    root = Path(name).expanduser()
    if not root.is_dir():
        return f"unknown dataset {name!r}: not one of {', '.join(EMBEDDED)} and not a directory"
    missing = [split for split in SPLITS if not (root / split).is_dir()]
    if missing:
        return f"dataset folder {root} has no {'/, '.join(missing)}/ directory (expected root/<split>/<class>/*.jpg)"
    return None


def train_args_problem(train_args: tuple[str, ...], model: str, dataset: str) -> str | None:
    """Why `python -m train` would refuse --train-args (unknown flag, bad value, one the sweep sets), or None."""
    from train.config import ConfigError, resolve_config
    from train.options import build_parser

    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(io.StringIO()):
            given = {k: v for k, v in vars(build_parser().parse_args(list(train_args))).items() if v is not None}
    except SystemExit as exc:
        lines = said.getvalue().strip().splitlines()
        reason = lines[-1].split(" error: ", 1)[-1] if exc.code and lines else "give training flags, not --help"
        return f"--train-args {train_args_text(train_args)}: {reason}"
    clash = [k for k in SWEEP_SETS if k in given]
    if clash:
        return (f"--train-args: --{clash[0].replace('_', '-')} is set by the sweep for every run (from the study's "
                f"settings); use the sweep's own options")
    refused = [k for k in SWEEP_REFUSES if k in given]
    if refused:
        return f"--train-args: --{refused[0].replace('_', '-')}: {SWEEP_REFUSES[refused[0]]}"
    try:
        resolve_config({**given, "model": model, "dataset": dataset, "out": "-", "epochs": 1})
    except ConfigError as exc:
        return f"--train-args: {exc}"
    return None


def ranges_problem(cfg: StudyConfig) -> str | None:
    """Why `python -m train` would refuse an lr or weight decay the study can sample (checked at both ends of each
    range, with the study's training flags), or None: otherwise the study fails hours in, at that sample's turn."""
    from train.config import ConfigError, resolve_config
    from train.options import build_parser

    given = {k: v for k, v in vars(build_parser().parse_args(list(cfg.train_args))).items() if v is not None}
    base = {**given, "model": cfg.models[0], "dataset": cfg.dataset, "out": "-", "epochs": 1}
    for opt in cfg.optimizers:
        for flag, key, (low, high) in (("--lr-range", "lr", cfg.lr_ranges[opt]),
                                       ("--wd-range", "weight_decay", cfg.wd_ranges[opt])):
            for value in (low, high):
                try:
                    resolve_config({**base, "optimizer": opt, key: value})
                except ConfigError as exc:
                    return f"{flag} {opt}={low:g},{high:g}: {exc}"
    return None


def out_problem(path: Path, option: str) -> str | None:
    """Why `path` cannot be a study directory (a file, or a file in its path), or None."""
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else f"{option} {path}: {p} exists and is not a directory"
    return None


def study_dir_problem(out: Path) -> str | None:
    """Why the sweep may not write into `out`: an existing directory that is neither empty nor a study (it holds no
    study.json), whose same-named files (a user's summary.json, an export bundle) the study would replace or mix
    into; None for an absent or empty directory or a study, as `train --out` and export refuse what is not theirs."""
    if not out.is_dir() or (out / STUDY_FILE).is_file():
        return None
    try:  # the sweep's own leftover from a first study.json killed mid-write does not count
        entries = sorted(p.name for p in out.iterdir() if not _STUDY_TEMPORARY.fullmatch(p.name))
    except OSError as exc:
        return f"--out {out}: cannot read it: {exc.strerror or exc}"
    if not entries:
        return None
    return (f"--out {out} is not empty ({len(entries)} entries, e.g. {entries[0]!r}) and is not a study directory "
            f"(no {STUDY_FILE}); nothing was changed: choose a new or empty directory")


_STUDY_TEMPORARY = re.compile(rf"\.{re.escape(STUDY_FILE)}\..+\.tmp")  # atomic_write_json's name for it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = OneLineParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="study size (default: full; with --report-only, the "
                   "recorded one)")
    p.add_argument("--study", choices=STUDIES, help="which experiment(s) to run (default: all; with --report-only, "
                   "the recorded one)")
    p.add_argument("--out", help="study directory for results (default: results/paper-<preset>)")
    p.add_argument("--runs-dir", help="training directories (default: runs/sweep/<out name>)")
    g = p.add_argument_group("study settings (override the preset)")
    g.add_argument("--models", type=_names, help="comma-separated variants, e.g. vit_c_mini,vit_p_mini")
    g.add_argument("--dataset", help="embedded set (animals, mnist, digits) or an ImageNet-layout folder")
    g.add_argument("--epochs", type=int_list(1, MAX_EPOCHS), help="schedule lengths for convergence, e.g. 5,10,20,40")
    g.add_argument("--stability-epochs", type=int_in(1, MAX_EPOCHS), help="epochs of each sampled stability run")
    g.add_argument("--samples", type=int_in(1, MAX_SAMPLES),
                   help=f"(lr, wd) samples per model x optimizer, 1..{MAX_SAMPLES}")
    g.add_argument("--seeds", type=int_list(0, MAX_SEED), help="training seeds of the tuned runs, e.g. 1,2,3 (keep "
                   "them apart from --stability-seed: a tuned run on it is the stability run that won the tuning)")
    g.add_argument("--stability-seed", type=int_in(0, MAX_SEED), help="training seed of the stability runs")
    g.add_argument("--sample-seed", type=int_in(0, MAX_SEED), help="seed of the lr/wd sampler")
    g.add_argument("--optimizers", type=_names, help=f"subset of {','.join(OPTIMIZERS)}")
    g.add_argument("--lr-range", type=_range, action="append", metavar="OPT=LOW,HIGH", help="log-uniform lr range")
    g.add_argument("--wd-range", type=_range, action="append", metavar="OPT=LOW,HIGH", help="log-uniform wd range")
    g.add_argument("--tuning", choices=TUNINGS, help="tuned lr/wd from the stability sweep or recipe defaults")
    g.add_argument("--metric", choices=METRICS, help="judge runs by final or best-epoch val error")
    g.add_argument("--train-args", help="extra flags for every `python -m train`, e.g. --train-args='--batch-size 64' "
                   "(part of every run's id)")
    x = p.add_argument_group("execution")
    x.add_argument("--workers", type=int_in(1, MAX_WORKERS), default=1,
                   help=f"parallel training processes, 1..{MAX_WORKERS} (default 1)")
    x.add_argument("--threads", type=int_in(1, MAX_THREADS), help="torch threads per worker (default: cores / workers)")
    x.add_argument("--devices", type=_devices, default=(), help="GPU indices dealt to workers, e.g. 0,1,2,3")
    x.add_argument("--dry-run", action="store_true", help="print the per-run commands, train nothing")
    x.add_argument("--report-only", action="store_true", help="rebuild summary and plots from finished runs, with "
                   "the settings the study's study.json records (a study setting given too must match them)")
    args = p.parse_args(argv)
    # Path("") is the current directory: `--out "$DIR"` with DIR unset must not fill it with a study (and an empty
    # --dataset reached --train-args' check, which named the wrong flag).
    refuse_empty_paths(p, (
        ("--out", args.out, "give the study directory, or omit --out for results/paper-<preset>"),
        ("--runs-dir", args.runs_dir, "give a directory, or omit --runs-dir for runs/sweep/<out name>"),
        ("--dataset", args.dataset, f"give one of {', '.join(EMBEDDED)} or an ImageNet-layout folder, or omit "
         "--dataset for the preset's"),
    ))
    args.out, args.runs_dir = (None if a is None else Path(a) for a in (args.out, args.runs_dir))
    return args


def check_places(dataset: str, out: Path, runs_dir: Path, report_only: bool, dry_run: bool) -> None:
    """ValueError before any run starts when the data cannot be found or an output directory cannot be made."""
    # A report-only rebuild reads finished results and never opens the data (which may since have moved).
    problem = None if report_only else dataset_problem(dataset)
    problem = problem or out_problem(out, "--out") or (None if report_only else study_dir_problem(out)
                                                        or out_problem(runs_dir, "--runs-dir"))
    if problem:
        raise ValueError(problem)
    if dry_run:  # a dry run writes nothing
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # read-only or virtual file system, no permission
        raise ValueError(f"--out {out}: cannot create the study directory: {exc.strerror or exc}") from None
    if problem := report_places_problem(out, report_only):
        raise ValueError(problem)


def report_places_problem(out: Path, report_only: bool) -> str | None:
    """Why the study in `out` cannot be reported, before any training or measuring: a runtime.json that is not a
    regular file (damaged: neither read as absent nor measured again onto), or a place of the report's files that
    cannot take one (a study would otherwise train for hours, then fail with half its figures replaced)."""
    from train.sweep import report
    from train.sweep.study import damaged_runtime

    path = out / report.RUNTIME_FILE
    try:
        why = report.place_problem(path)
    except OSError as exc:  # a directory on the way that cannot be searched
        why = exc.strerror or str(exc)
    return damaged_runtime(f"{path}: {why}", report_only) if why else report.output_problem(out)


def lock_study(out: Path, runs_dir: Path | None) -> contextlib.ExitStack:
    """Hold the project's writer lock on the study directory and, when it trains, on its training directories,
    until the returned stack closes; ValueError when another sweep holds one (a second sweep would retrain the
    same runs into the same logs, and the two would fail each other). A killed sweep's lock is free again: the
    kernel drops a flock with its process, and the file it leaves is reused."""
    stack = contextlib.ExitStack()
    held: set[Path] = set()
    places = [(out, "--out", "is writing")]
    if runs_dir is not None:
        places.append((runs_dir, "--runs-dir", "is training in"))
    try:
        for path, option, doing in places:
            try:
                ensure_dir(path.parent)
                real = resolve_path(path)  # two spellings of one directory (a symlink, `.`) take the same lock
                if real not in held:
                    stack.enter_context(writer_lock(real))
                    held.add(real)
            except DirectoryBusy:
                raise ValueError(f"another sweep {doing} {path} (one at a time): wait for it, or give another "
                                 f"{option}") from None
            except OSError as exc:  # read-only or virtual file system, no permission: the lock lives beside it
                raise ValueError(f"{option} {path}: cannot take the sweep's lock beside it: "
                                 f"{exc.strerror or exc}") from None
    except BaseException:
        stack.close()
        raise
    return stack


def devices_problem(devices: tuple[str, ...]) -> str | None:
    """Why the GPUs `devices` cannot train here (no CUDA, no such GPU), or None."""
    from train.sweep.runtime import device_problem

    for d in devices:
        if problem := device_problem(f"cuda:{d}"):
            return f"--devices {','.join(devices)}: GPU {d}: {problem}"
    return None


def _per_optimizer(given: list[tuple[str, tuple[float, float]]] | None, flag: str
                   ) -> dict[str, tuple[float, float]] | None:
    """--lr-range/--wd-range values by optimizer; ValueError when one optimizer is given twice (which would win?)."""
    if not given:
        return None
    opts = [opt for opt, _ in given]
    if repeated := [o for i, o in enumerate(opts) if o in opts[:i]]:
        raise ValueError(f"{flag} is given twice for {repeated[0]}")
    return dict(given)


def study_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The study settings given on the command line (None: not given), as make_config takes them."""
    return {
        "models": args.models, "dataset": args.dataset, "epochs": args.epochs,
        "stability_epochs": args.stability_epochs, "samples": args.samples, "seeds": args.seeds,
        "stability_seed": args.stability_seed, "sample_seed": args.sample_seed, "optimizers": args.optimizers,
        "tuning": args.tuning, "metric": args.metric,
        "lr_ranges": _per_optimizer(args.lr_range, "--lr-range"),
        "wd_ranges": _per_optimizer(args.wd_range, "--wd-range"),
        "train_args": tuple(shlex.split(args.train_args)) if args.train_args is not None else None,
    }


_RANGE_FLAGS = {"lr_ranges": "--lr-range", "wd_ranges": "--wd-range"}  # settings whose flag is not --<name>


def _shown(value: object, key: str = "") -> str:
    if key == "train_args":  # one shell word, as --train-args takes it: a comma-joined token list cannot be copied
        return train_args_text(value)
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return "; ".join(f"{k}={_shown(v)}" for k, v in value.items())
    return str(value)


def report_conflicts(recorded: StudyConfig, study: str, args: argparse.Namespace) -> list[str]:
    """The study settings on the command line that differ from those study.json records, as "--flag given
    (recorded ...)"."""
    flags = _RANGE_FLAGS
    given: dict[str, object] = {"preset": args.preset, "study": args.study, **study_overrides(args)}
    out = []
    for key, value in given.items():
        if value is None:
            continue
        old = study if key == "study" else getattr(recorded, key)
        if key in flags:
            value = {**old, **value}  # a range given for one optimizer leaves the others as they are
        if value != old:
            out.append(f"{flags.get(key, '--' + key.replace('_', '-'))} {_shown(value, key)} "
                       f"(recorded {_shown(old, key)})")
    return out


def study_differences(recorded: tuple[StudyConfig, str], given: tuple[StudyConfig, str]) -> list[str]:
    """The settings in which `given` differs from the `recorded` (config, study), as "--flag given (recorded ...)"."""
    flags = _RANGE_FLAGS
    out = [f"--study {given[1]} (recorded {recorded[1]})"] if given[1] != recorded[1] else []
    for f in dataclasses.fields(StudyConfig):
        old, new = getattr(recorded[0], f.name), getattr(given[0], f.name)
        if new != old:
            out.append(f"{flags.get(f.name, '--' + f.name.replace('_', '-'))} {_shown(new, f.name)} "
                       f"(recorded {_shown(old, f.name)})")
    return out


def study_settings(args: argparse.Namespace, out: Path) -> tuple[StudyConfig, str]:
    """(config, study): from the command line, or with --report-only from the study.json in `out` (a study setting
    given too must agree with it: the report would otherwise describe another study than the one that ran)."""
    recorded = recorded_study(out)
    if args.report_only:
        if recorded is None:
            raise ValueError(out_problem(out, "--out") or
                             f"no study.json in {out}: not a study directory, or run the study first")
        if conflicts := report_conflicts(*recorded, args):
            raise ValueError(f"--report-only reports the study recorded in {out / 'study.json'}, and "
                             f"{'; '.join(conflicts)} differ from it: drop them (or run without --report-only)")
        return recorded
    given = make_config(args.preset or "full", **study_overrides(args)), args.study or "all"
    # Checked before anything is written: the record (and the report built on it) would otherwise describe a study
    # other than the one whose results lie beside it.
    if recorded is not None and (diffs := study_differences(recorded, given)):
        raise ValueError(f"--out {out} holds another study: {'; '.join(diffs)}; give the recorded settings to "
                         f"resume it, or another --out")
    return given


def _interrupt(signum: int, frame: object) -> None:
    raise Terminated  # SIGTERM or SIGHUP: Ctrl-C's path, said as "terminated" with exit 143


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    """Entry point; exit 2 with one line on stderr for bad settings."""
    args = parse_args(argv)
    try:
        from models.registry import get_config

        out = args.out or Path("results") / f"paper-{args.preset or 'full'}"
        cfg, study = study_settings(args, out)
        for m in cfg.models:
            get_config(m)
        problem = train_args_problem(cfg.train_args, cfg.models[0], cfg.dataset) or ranges_problem(cfg)
        if not (problem or args.dry_run or args.report_only) and args.devices:  # where runs train and time
            problem = devices_problem(args.devices)
        if problem:
            raise ValueError(problem)
        slots = make_slots(args.workers, args.devices, args.threads)
        runs_dir = args.runs_dir or Path("runs") / "sweep" / out.name
        # Before --out is made: a missing train extra (tqdm, torch) is one line (models.cli.run), nothing written.
        import train.sweep.study  # noqa: F401
        check_places(cfg.dataset, out, runs_dir, args.report_only, args.dry_run)
        # Last before the work, so nothing below fails with the lock taken outside the `with` that releases it; a
        # dry run writes nothing and may watch a running sweep.
        locks = contextlib.ExitStack() if args.dry_run else lock_study(out, None if args.report_only else runs_dir)
    except (ValueError, KeyError) as exc:
        raise InputError(exc.args[0] if exc.args else str(exc)) from None
    with locks:
        return _sweep(args, cfg, study, out, runs_dir, slots)


def _sweep(args: argparse.Namespace, cfg: StudyConfig, study: str, out: Path, runs_dir: Path,
           slots: Sequence[WorkerSlot]) -> int:
    """Train what is missing and report, with the study's lock held; the exit code."""
    from train.sweep.report import NotWritten
    from train.sweep.study import run_study

    if len(cfg.seeds) < MIN_SEEDS and not args.report_only:
        print(f"{PROG}: warning: --seeds {','.join(map(str, cfg.seeds))}: fewer than {MIN_SEEDS} "
              f"seeds per tuned run: seed variance is barely counted, and the verdicts are marked provisional",
              file=sys.stderr)
    # SIGTERM (e.g. `kill` of a nohup'd sweep) takes the same path as Ctrl-C: trainings are stopped, results kept.
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # nohup asked to outlive the terminal: keep that
        signal.signal(signal.SIGHUP, _interrupt)  # the terminal closed: the same, rather than orphaned trainings
    try:
        summary = run_study(cfg, study, out, runs_dir, slots, args.dry_run, args.report_only)
    except RunFailed as exc:  # the training's own verdict: it refused its input (2), or the machine failed (1)
        raise (InputError if exc.code == 2 else WorkFailed)(str(exc)) from None
    except DamagedResult as exc:
        raise InputError(str(exc)) from None
    except NotWritten as exc:  # a full disk or an I/O error while the report was written: the machine (exit 1)
        raise WorkFailed(str(exc)) from None
    except KeyboardInterrupt as exc:  # models.cli.run says it (exit 130, or 143 for SIGTERM and SIGHUP) with this
        exc.add_note(REPORT_STOPPED if args.report_only else "finished runs are kept; rerun the same command to resume")
        raise
    for row in summary.get("claims", []):
        said = row["reproduced"] + (f": {row['verdict_detail']}" if row.get("verdict_detail") else "") + (
            f" ({row['provisional']})" if row.get("provisional") else "")
        if row.get("not_judged"):
            said += f" (not judged: {', '.join(row['not_judged'])})"
        print(f"{row['title']}: {said} - {row['measured']}")
    if summary:
        print(f"results in {out}/ (summary.json, claims.md, *.png)")
    return 0


if __name__ == "__main__":
    from models import cli

    cli.run(main, PROG)
