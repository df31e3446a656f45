"""The shared command line of `python -m export` and the per-runtime `python -m export.<runtime>` entry points.

Exit codes: 0 bundle written (refused artifacts are reported on stderr), 1 with --strict when any artifact was
refused (the bundle is still written), or when the disk or memory failed (the previous bundle is kept; out of
memory names the sizes to lower), 2 bad input (checkpoint, target, datasets, unwritable output, missing runtime,
another export writing the same bundle): one line, before any slow work; 2 also when no artifact, not even the
torch-fp32 reference, passed its gate (a checkpoint whose logits certify nothing): one line, nothing written.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence

from data.datasets import EMBEDDED
from export.bundle import DEFAULT_PARITY_SAMPLES, MAX_SAMPLES, PARITY_MEMORY_BYTES, ExportConfig
from export.targets import QUANTIZER, Target, known_targets, missing_converters, parse_targets
from models.bundle import MAX_BATCH_LIMIT, valid_name
from models.checkpoint import CheckpointError, read_checkpoint_meta
from models.cli import (
    CommandError,
    InputError,
    OneLineParser,
    WorkFailed,
    int_in,
    refuse_empty_paths,
    report,
)
from models.extras import extras_hint, installed
from models.host import MAX_THREADS, distribution_versions
from models.io import mount_point_problem, out_inside_problem, out_name_problem
from runtimes import ExportError, by_target
from runtimes.registry import DEFAULT_TARGETS


def missing_problem(targets: Sequence[Target]) -> str | None:
    """Everything an export of `targets` needs and this environment lacks (the torch model every artifact comes
    from, the converters, the runtimes that run the parity gate), with one command that installs all of it; None
    when nothing is missing. Found before the checkpoint is loaded, and all at once: one rerun, not one per extra."""
    needed = dict.fromkeys([by_target("torch"), *(t.runtime for t in targets)])
    absent = [rt for rt in needed if rt is not None and not rt.installed()]
    converters = missing_converters(targets)
    if len(absent) == 1 and not converters:  # its own line, which names how to get it (TensorRT: where)
        return f"{absent[0].name} is not installed (needs {', '.join(absent[0].packages)}): {absent[0].install}"
    why, extras, others = [], [], []
    # The export extra brings the CPU onnxruntime: beside onnxruntime-gpu (the gpu extra) it would break both.
    gpu_ort = bool(distribution_versions(["onnxruntime-gpu"]))
    for rt in absent:
        lacking = ", ".join(p for p in rt.packages if not installed(p))
        role = "the model every artifact is exported from" if rt.target == "torch" else f"the {rt.target} targets"
        why.append(f"{lacking} ({role})")
        if rt.export_extra and not (gpu_ort and rt.export_extra == "export"):
            extras.append(rt.export_extra)
        else:
            others.append(f"for {rt.name}: {rt.install}")
    if graph := [m for m in converters if m != QUANTIZER]:
        why.append(f"{', '.join(graph)} (the ONNX graph every target but torch is built from)")
    if QUANTIZER in converters:
        why.append(f"{QUANTIZER} (int8 quantisation; or leave the int8 targets out)")
    if converters:
        extras.append("convert" if gpu_ort else "export")
    if not why:
        return None
    return "; ".join([f"not installed: {why[0]}", *why[1:], *([extras_hint(extras)] if extras else []), *others])


def out_problem(out: str, checkpoint: str, dataset: str | None, calibration_dataset: str | None,
                name: str | None = None) -> str | None:
    """Why the bundle cannot be written at `out`, found before the export's slow work (None when it can)."""
    # Refused: a name the file system refuses (its temporary directory's name included), a mount point (a volume:
    # the bundle is swapped in by renaming `out` itself, which the kernel refuses there), a path that is not UTF-8,
    # which the ONNX checker cannot take, or a place inside a dataset folder the export reads (the checkpoint's by
    # default). `name` (--name, when valid) is the directory the mount point advice suggests, else the checkpoint
    # directory's name.
    if problem := out_name_problem(out):
        return f"--out: {problem}"
    example = name if valid_name(name) else os.path.basename(os.path.abspath(checkpoint)) or "bundle"
    if problem := mount_point_problem(out, "the bundle", example):
        return f"--out {problem}"
    try:
        full = os.path.join(os.getcwd(), out)
    except OSError:  # the current directory was removed: export.bundle.build says so
        full = out
    try:
        full.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes come back from the file system as lone surrogates
        shown = os.fsencode(full).decode("utf-8", "backslashreplace")
        return f"--out {shown}: the path is not valid UTF-8, which the ONNX tools cannot open; give a UTF-8 path"
    if dataset is None:
        try:
            recorded = read_checkpoint_meta(checkpoint).dataset
        except (CheckpointError, OSError):  # export.bundle.build says why the checkpoint cannot be read
            recorded = None
        dataset = recorded if isinstance(recorded, str) else None
    harm = "the bundle's files would become part of the data; choose a directory outside it"
    for data in dict.fromkeys((dataset, calibration_dataset or dataset)):
        if data and data not in EMBEDDED and (why := out_inside_problem(out, data, "the dataset folder", harm)):
            return why
    return None


def parser(family: str | None = None) -> argparse.ArgumentParser:
    """Arguments for the multi-target CLI, or for one runtime family's CLI when `family` is given."""
    prog = f"python -m export.{family}" if family else "python -m export"
    p = OneLineParser(prog=prog, description="Export a checkpoint to a parity-checked bundle.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (models.checkpoint format)")
    p.add_argument("--out", required=True, help="bundle directory to write: absent, empty, or a bundle holding only "
                                                "its own files (replaced atomically; see --replace)")
    if family:
        runtime = by_target(family)
        p.add_argument("--precision", default=",".join(runtime.default_precisions),
                       help=f"comma-separated, of {', '.join(runtime.precisions)} (default %(default)s)")
    else:
        p.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                       help=f"comma-separated, of: {', '.join(known_targets())} (default %(default)s; a torch-fp32 "
                            "artifact, the checkpoint's weights, is always added)")
    p.add_argument("--name", help="the bundle's name, served by `serve --model BUNDLE`; A-Z a-z 0-9 _ . - (default: "
                                  "the --out directory name, other characters replaced by '-'; `serve --model-dir` "
                                  "serves a bundle under its directory's name)")
    p.add_argument("--max-batch", type=int_in(1, MAX_BATCH_LIMIT), default=ExportConfig.max_batch,
                   help=f"largest batch (engine profile, parity), 1..{MAX_BATCH_LIMIT} [%(default)s]")
    p.add_argument("--parity-samples", type=int_in(1, MAX_SAMPLES), default=ExportConfig.parity_samples,
                   help="validation images for parity, a seeded draw (more than the split holds: all of it) "
                        f"[the whole val split, up to {DEFAULT_PARITY_SAMPLES} images and "
                        f"{PARITY_MEMORY_BYTES >> 30} GiB of preprocessed pixels: "
                        f"{PARITY_MEMORY_BYTES // (4 * 3 * 224 * 224)} at 3x224x224]")
    p.add_argument("--calibration-samples", type=int_in(1, MAX_SAMPLES), default=ExportConfig.calibration_samples,
                   help="train images for INT8 calibration [%(default)s]")
    p.add_argument("--dataset", help="parity/calibration dataset (default: the checkpoint's)")
    p.add_argument("--calibration-dataset", help="INT8 calibration dataset, train split (default: --dataset)")
    p.add_argument("--threads", type=int_in(1, MAX_THREADS),
                   help="CPU threads for torch and the runtimes (default: theirs)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when any artifact is refused (with none servable: exit 2, nothing written, with or "
                        "without --strict)")
    p.add_argument("--replace", action="store_true",
                   help="replace a bundle at --out even when this export does not build all of its servable "
                        "artifacts (without it, that is refused)")
    return p


def _targets(p: argparse.ArgumentParser, args: argparse.Namespace, family: str | None) -> list[str]:
    """The export targets the command line names (`--precision` of `family`, else `--targets`); exit 2 on none."""
    if family:
        # Case-blind like --targets (parse_targets): `--precision FP16` is what `--targets ONNX-FP16` accepts.
        precisions = [x.strip().lower() for x in args.precision.split(",") if x.strip()]
        known = by_target(family).precisions
        if bad := [x for x in precisions if x not in known]:
            p.error(f"--precision {bad[0][:40]!r} is not a precision of {family}; known: {', '.join(known)}")
        targets = [f"{family}-{x}" for x in precisions]
    else:
        targets = [t for t in args.targets.split(",") if t.strip()]
    if not targets:  # an empty list would silently ship a torch-only bundle
        flag, known = ("precision", by_target(family).precisions) if family else ("targets", known_targets())
        p.error(f"--{flag} names nothing; known: {', '.join(known)}")
    return targets


def _check_paths(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit 2 on an empty path flag."""
    # Path("") is the current directory: `--checkpoint "$RUN"` with RUN unset exported whatever checkpoint lay here,
    # and an empty --dataset or --calibration-dataset quietly meant the default one.
    refuse_empty_paths(p, (
        ("--checkpoint", args.checkpoint, "give the checkpoint directory"),
        ("--out", args.out, "give the bundle directory to write"),
        ("--dataset", args.dataset, f"give one of {', '.join(EMBEDDED)} or an ImageNet-layout folder, or omit "
         "--dataset for the checkpoint's"),
        ("--calibration-dataset", args.calibration_dataset, f"give one of {', '.join(EMBEDDED)} or an "
         "ImageNet-layout folder, or omit --calibration-dataset for --dataset"),
    ))


def setup_problem(args: argparse.Namespace, targets: Sequence[str]) -> str | None:
    """Why the export cannot start, found before the checkpoint is loaded (None when it can): an unknown target,
    a missing package, an output that cannot be written."""
    try:
        if missing := missing_problem(parse_targets(targets)):  # before the checkpoint is loaded and measured
            return missing
    except ExportError as exc:
        return str(exc)
    return out_problem(args.out, args.checkpoint, args.dataset, args.calibration_dataset, args.name)


def main(argv: Sequence[str] | None = None, family: str | None = None) -> int:
    """Parse, build the config, export, report; returns the exit code."""
    p = parser(family)
    try:
        return _export(p, p.parse_args(argv), family)
    except CommandError as exc:  # the prog is the family's: `python -m export.onnx: error: ...`
        return report(p.prog, exc)


def _export(p: argparse.ArgumentParser, args: argparse.Namespace, family: str | None) -> int:
    """Check the arguments, export, say what was written; InputError or WorkFailed for one line."""
    from export.bundle import ExportIOError, ExportMemoryError, build

    _check_paths(p, args)
    targets = _targets(p, args, family)
    if problem := setup_problem(args, targets):
        raise InputError(problem)
    try:
        manifest = build(ExportConfig(
            args.checkpoint, args.out, targets, name=args.name, max_batch=args.max_batch,
            parity_samples=args.parity_samples, calibration_samples=args.calibration_samples, dataset=args.dataset,
            calibration_dataset=args.calibration_dataset, threads=args.threads, drop_artifacts=args.replace,
        ))
    except ExportError as exc:
        raise InputError(str(exc)) from None
    except (ExportIOError, MemoryError) as exc:
        reason = str(exc) if isinstance(exc, ExportIOError) else "out of memory"
        if isinstance(exc, ExportMemoryError | MemoryError):  # what sizes the export's memory, and its values
            parity = args.parity_samples or "the default"
            reason += (f"; lower --max-batch ({args.max_batch}), --parity-samples ({parity})"
                       f" or --calibration-samples ({args.calibration_samples})")
        raise WorkFailed(f"{reason} (the previous bundle, if any, is unchanged)") from None
    refused = [a for a in manifest.artifacts if not a.servable]
    for a in refused:
        print(f"refused {a.id}: {a.refused_reason}", file=sys.stderr)
    # The hint is a command to paste: a path with spaces or shell characters is quoted.
    print(f"bundle written: {args.out} (python -m export.report {shlex.quote(str(args.out))})")
    return 1 if refused and args.strict else 0
