"""`python benchmarks/latency.py`: ViT_C vs ViT_P latency on every available runtime, against the machine's limit.

With no arguments: the 1GF pair (224x224) and the mini pair (32x32), batch 1, 8 and 32, on every runtime and
precision this machine has (torch eager fp32/bf16, onnxruntime, OpenVINO fp32/bf16/INT8; with a GPU: torch on CUDA
in fp32/bf16/fp16, eager and compiled with CUDA graphs, channels_last and NCHW; TensorRT fp16/INT8 and
onnxruntime-CUDA where installed), about 10 minutes on 2 cores (plus a one-time export of the bundles, cached
under exports/bench/). `--pairs` takes any of the paper's pairs 1gf, 4gf, 18gf, 36gf, 72gf as well.
`--quick` (the micro pair, a few repetitions) takes well under a minute once its bundles are cached.
`--http URL` instead drives a running server (closed loop at several concurrencies, then Poisson arrivals) and
compares it with the bare runtime; `--http start --bundle DIR` serves DIR itself for the run, on a free loopback
port (`--port N` picks it).

Method: each model pair is loaded side by side; after a warm-up, C and P are timed in alternating rounds on a
rotating pool of inputs until both medians are stable (95 % CI within +-2 %) or the cell's time is up.
Reported: p50/p90/p99, IQR/median, the C/P ratio (the median per-round ratio, flagged outside +-5 %, with its
95 % CI and a verdict; under 6 rounds only their range and an indicative verdict; below the budget's minimum
rounds or calls, or from a single round, "inconclusive"), every call's latency (bounded), achieved GFLOP/s = 2 * MACs *
batch / p50 and its fraction of the sustained matmul limit measured in the same run, and cold start (load,
compile, first result). Outputs: a table on the terminal and <date>-<time>-<host>.json / .md / -latency.png / -ratio.png
in --out (checked writable before anything is measured). Exit codes: 0 done, 2 bad arguments or unusable inputs
(an end-to-end flag without --http; no target that can run here), 1 the machine failed (out of memory, or a full
disk or file-size limit while saving: the table is printed first), every target failed while it was timed, or an
end-to-end load level in which no request succeeded (its results are saved first); each failure is one line on
stderr.
"""

from __future__ import annotations

if __name__ == "__main__" and __spec__ is None:
    # Run as a script, Python puts benchmarks/ first on sys.path (or, under PYTHONSAFEPATH, nothing). This checkout's
    # root must lead instead, before the first import of vitc's own: else `models` comes from wherever vitc is
    # installed (another checkout), and the run mixes two source trees and records the other one's git commit. It
    # also keeps benchmarks/*.py from shadowing standard modules.
    import sys
    from pathlib import Path

    _here = Path(__file__).resolve().parent
    if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == _here:
        del sys.path[0]
    sys.path.insert(0, str(_here.parent))

# First of vitc's modules: a Ctrl-C or SIGTERM while the modules below load is one line (exit 130, 143).
import models.cli  # noqa: F401
from models.cli import InputError, WorkFailed, command, machine_error
from models.io import no_temp_dir
from models.oneline import first_line

# isort: split
import argparse
import os
import sys
import tempfile
from functools import partial
from pathlib import Path


def _command() -> tuple[str, ...]:
    """How this run was started, for the results: `python -m benchmarks.latency` or `python benchmarks/latency.py`."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if getattr(spec, "name", None) == "benchmarks.latency":
        return ("python", "-m", "benchmarks.latency")
    return ("python", "benchmarks/latency.py")


PROG = " ".join(_command())  # its errors and usage name the form it was started with
# The end-to-end mode's own flags: without --http nothing reads them (the suite would run and ignore them).
HTTP_ONLY = ("--model", "--concurrency", "--rate", "--duration", "--bundle", "--runtime", "--server-args",
             "--port", "--image-format", "--image-size", "--api-key")
MAX_CELL_S = 3600.0
MAX_LIMIT_S = 600.0
MAX_DURATION_S = 3600.0
MAX_RATE = 100_000.0
# Each cell stops at --cell-seconds whatever this asks for: a bound far above any use, so that a typo (an extra digit
# or twenty) is refused, not recorded as the run's setting.
MAX_MIN_REPS = 1_000_000


def build_parser() -> argparse.ArgumentParser:
    """Every option, documented."""
    from benchmarks.bundles import DEFAULT_CACHE, PAIRS
    from benchmarks.loadgen import MAX_CONCURRENCY
    from benchmarks.runners import all_targets
    from models.bundle import MAX_BATCH_LIMIT
    from models.cli import OneLineParser, float_in, int_in, int_list
    from models.host import MAX_THREADS

    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                      epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_argument_group("latency benchmark")
    run.add_argument("--quick", action="store_true",
                     help="CI smoke run: the micro pair, batch 1 and 8, few repetitions, results under "
                          "exports/bench/results unless --out is given")
    run.add_argument("--pairs", default=None,
                     help=f"comma-separated pairs of {', '.join(PAIRS)} (default 1gf,mini; --quick: micro)")
    run.add_argument("--batch-sizes", type=int_list(1, MAX_BATCH_LIMIT), default=None,
                     help="comma-separated (default 1,8,32; --quick: 1,8)")
    run.add_argument("--targets", default="all",
                     help=f"'all' or comma-separated of {', '.join(t.id for t in all_targets())}; unavailable "
                          "ones are listed as skipped with the reason (default all)")
    run.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=DIR",
                     help="weights for one model of a pair, e.g. vit_c_mini=runs/animals-vit_c (repeatable; default: "
                          "the demo's trained mini checkpoints when present, else a seeded random init)")
    run.add_argument("--threads", type=int_in(1, MAX_THREADS), default=None,
                     help="intra-op threads per inference (default: usable CPUs)")
    run.add_argument("--cell-seconds", type=float_in(0, MAX_CELL_S), default=None,
                     help="time cap per (pair, target, batch) cell, both models (default 20; --quick 0.6)")
    run.add_argument("--min-reps", type=int_in(1, MAX_MIN_REPS), default=None,
                     help=f"repetitions per model before stopping, 1..{MAX_MIN_REPS} (default 20)")
    run.add_argument("--limit-seconds", type=float_in(0, MAX_LIMIT_S), default=None,
                     help="matmul-limit timing per precision, at start and end (default 3; --quick 0.3)")
    run.add_argument("--parity-samples", type=int, default=None,
                     help="validation images of each bundle's parity gates (default 512; --quick 64)")
    run.add_argument("--cache", default=DEFAULT_CACHE,
                     help="bundle cache directory (default exports/bench, under the current directory)")
    run.add_argument("--out", default=None,
                     help="results directory, created if missing (default benchmarks/results under the current "
                          "directory; --quick: exports/bench/results)")
    run.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    http = p.add_argument_group("end-to-end mode (--http)")
    http.add_argument("--http", metavar="URL",
                      help="benchmark a running server at URL (e.g. http://127.0.0.1:8000), or 'start': serve "
                           "--bundle with --runtime on a loopback port (default settings) for the run")
    http.add_argument("--model", help="served model name (default: the server's first model)")
    http.add_argument("--concurrency", type=int_list(1, MAX_CONCURRENCY), default=(1, 4, 16),
                      help="closed-loop concurrencies (default 1,4,16)")
    http.add_argument("--rate", type=float_in(0, MAX_RATE), default=None,
                      help="open-loop Poisson arrival rate, requests/s (default: 70 %% of the best closed-loop rate)")
    http.add_argument("--duration", type=float_in(0, MAX_DURATION_S), default=None,
                      help="seconds per load level (default 15; --quick 2)")
    http.add_argument("--bundle", default=None,
                      help="the served bundle, timed bare in-process for the overhead comparison")
    http.add_argument("--runtime", default=None,
                      help="backend of the server --http start launches (default onnxruntime)")
    http.add_argument("--server-args", default=None, metavar="FLAGS",
                      help="more `python -m serve` flags for --http start: --server-args='--device cuda --compile'")
    http.add_argument("--port", type=int_in(1, 65535), default=None,
                      help="loopback port of the server --http start starts (default: a free port), as "
                           "`benchmarks.load --start --port`")
    http.add_argument("--image-format", choices=("png", "jpeg"), default="png",
                      help="request images: PNG (default) or JPEG (quality 90)")
    http.add_argument("--image-size", type=int, default=None,
                      help="resize the request images to N x N (default: their own size), e.g. 224")
    http.add_argument("--api-key", default=os.environ.get("VITC_API_KEY"), help="bearer token (default $VITC_API_KEY)")
    return p


def _config(args: argparse.Namespace, argv: list[str]):  # noqa: ANN202 - a SuiteConfig
    """Arguments -> SuiteConfig; ValueError on a bad value."""
    from dataclasses import replace

    from benchmarks.bundles import PAIRS
    from benchmarks.measure import FULL, QUICK
    from benchmarks.runners import parse_targets
    from benchmarks.suite import SuiteConfig
    from models.checkpoint import read_checkpoint_meta
    from models.cli import redact_secrets, repeated
    from models.host import MAX_THREADS, usable_cpus

    spec = args.pairs if args.pairs is not None else "micro" if args.quick else "1gf,mini"
    pairs = tuple(x.strip() for x in spec.split(",") if x.strip())
    if not pairs:  # an empty --pairs would otherwise mean the full default run
        raise ValueError(f"--pairs {args.pairs!r} names nothing; known pairs: {', '.join(PAIRS)}")
    for pair in pairs:
        if pair not in PAIRS:
            raise ValueError(f"unknown pair {pair!r}; known: {', '.join(PAIRS)}")
    if twice := repeated(pairs):
        raise ValueError(f"--pairs {args.pairs!r} names {', '.join(twice)} more than once: give each pair once")
    checkpoints = []
    for spec in args.checkpoint:
        model, sep, path = spec.partition("=")
        if not sep or model not in {m for pair in pairs for m in PAIRS[pair]}:
            raise ValueError(f"--checkpoint {spec!r}: expected MODEL=DIR, MODEL one of the benchmarked pairs' models")
        meta = read_checkpoint_meta(path)  # CheckpointError (a ValueError) names what is wrong
        if meta.model != model:
            raise ValueError(f"--checkpoint {spec!r}: that checkpoint is a {meta.model}, not a {model}")
        checkpoints.append((model, Path(path)))
    budget = QUICK if args.quick else FULL
    if args.cell_seconds is not None:
        budget = replace(budget, max_s=args.cell_seconds)
    if args.min_reps is not None:
        budget = replace(budget, min_reps=args.min_reps)
    if args.parity_samples is not None and not 1 <= args.parity_samples <= 100_000:
        raise ValueError(f"--parity-samples must be in 1..100000, got {args.parity_samples}")
    threads = args.threads if args.threads is not None else min(usable_cpus(), MAX_THREADS)
    return SuiteConfig(
        pairs=pairs, batch_sizes=args.batch_sizes or ((1, 8) if args.quick else (1, 8, 32)),
        targets=tuple(parse_targets(args.targets)), threads=threads, budget=budget,
        limit_seconds=args.limit_seconds or (0.3 if args.quick else 3.0), cache=args.cache, quick=args.quick,
        parity_samples=args.parity_samples or (64 if args.quick else 512),
        calibration_samples=32 if args.quick else 300,
        checkpoints=tuple(checkpoints),
        progress=not args.no_progress, argv=(*_command(), *redact_secrets(argv)),
    )


def _http_only_given(p: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The end-to-end flags on the command line (whatever their value: an explicit default counts too)."""
    actions = [a for a in p._actions if set(a.option_strings) & set(HTTP_ONLY)]
    defaults = [a.default for a in actions]
    try:
        for a in actions:  # absent from the namespace unless given
            a.default = argparse.SUPPRESS
        given = vars(p.parse_args(argv))
    finally:
        for a, default in zip(actions, defaults, strict=True):
            a.default = default
    return [a.option_strings[0] for a in actions if a.dest in given]


def _refuse_empty_paths(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit 2 on a path given empty or blank: Path("") is the current directory, so `--cache "$DIR"` with DIR unset
    would export the bundles here, and `--checkpoint MODEL=` time whatever checkpoint lies here."""
    from models.cli import refuse_empty_paths

    checkpoints = [spec.partition("=") for spec in args.checkpoint if "=" in spec]
    refuse_empty_paths(p, (
        ("--cache", str(args.cache), "give the bundle cache directory, or omit --cache for exports/bench"),
        ("--out", args.out, "give the results directory, or omit --out"),
        ("--bundle", args.bundle, "give the served bundle's directory"),
        *((f"--checkpoint {model}=", path, "give MODEL=DIR, DIR the run's checkpoint directory")
          for model, _, path in checkpoints),
    ))


def _paths_problem(args: argparse.Namespace, out: Path) -> str | None:
    """Why the bundle cache or the results could not be written, found before anything is measured."""
    from benchmarks.report import out_dir_problem

    if not args.http and (problem := out_dir_problem(args.cache)):
        return f"--cache {args.cache}: {problem}; give a directory for the exported bundles (default exports/bench)"
    if problem := out_dir_problem(out):
        where = f"--out {out}" if args.out else f"the results directory {out}"
        return f"{where}: {problem}; give --out DIR (the results go into it as <date>-<time>-<host>.json, .md, .png)"
    return None


def _port_problem(args: argparse.Namespace) -> str | None:
    """Why --port cannot be used as given: it sets the port of the server --http start starts, once."""
    import shlex

    if args.port is None:
        return None
    if args.http != "start":
        return "--port applies to --http start only (the server it starts); give a running server's port in its URL"
    try:
        flags = [t.partition("=")[0] for t in shlex.split(args.server_args or "")]
    except ValueError:
        return None  # unbalanced quotes: e2e_config refuses --server-args itself
    # `python -m serve` takes an abbreviation too (--po, --por): argparse's prefix matching
    if any(len(f) >= 4 and "--port".startswith(f) for f in flags):
        return "--port and --server-args='--port ...' both set the started server's port: give one of them"
    return None


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    """Parse, run the benchmark (or the end-to-end mode), print the table, write the files."""
    from benchmarks.report import save_failed
    from export.bundle import ExportIOError
    from models.bundle import BundleError
    from runtimes import BackendError, ExportError

    argv = sys.argv[1:] if argv is None else list(argv)
    p = build_parser()
    args = p.parse_args(argv)
    if not args.http and (flags := _http_only_given(p, argv)):
        one = len(flags) == 1
        p.error(f"{', '.join(flags)} {'applies' if one else 'apply'} to the end-to-end mode only: add --http URL "
                f"(or --http start --bundle DIR), or leave {'it' if one else 'them'} out")
    _refuse_empty_paths(p, args)
    if problem := _port_problem(args):
        p.error(problem)
    if args.port is not None:  # one more flag of the started server, as --server-args='--port N' gives it
        args.server_args = f"{args.server_args or ''} --port {args.port}".strip()
    args.cache, args.out, args.bundle = (None if v is None else Path(v) for v in (args.cache, args.out, args.bundle))
    out = args.out or (args.cache / "results" if args.quick else Path("benchmarks") / "results")
    if problem := _paths_problem(args, out):
        raise InputError(problem)
    # The exports and torch need a temporary directory: find none before the work, not after it (cli.run says so).
    tempfile.gettempdir()
    try:
        if args.http:
            from benchmarks.e2e import e2e_config, format_e2e, run_e2e, write_e2e_reports

            doc = run_e2e(e2e_config(args, argv, _command()))
            print(format_e2e(doc))
            save = partial(write_e2e_reports, doc, out, plots=not args.no_plots)
            failed = _failed_levels(doc)
        else:
            from benchmarks.report import format_table, write_reports
            from benchmarks.suite import run_suite

            doc = run_suite(_config(args, argv))
            print(format_table(doc))
            if not doc["results"]:  # every runnable target failed while it was timed: the table lists why
                raise WorkFailed("nothing was measured: every target failed (listed above as skipped); nothing "
                                 "written")
            save = partial(write_reports, doc, out, suffix="-quick" if args.quick else "", plots=not args.no_plots)
            failed = None
    except (ValueError, BundleError, BackendError, ExportError, ExportIOError, OSError) as exc:
        if isinstance(exc, OSError) and (failure := machine_error(exc)):
            raise failure from None  # a full disk while exporting the bundles: the machine failed, not the input
        if no_temp_dir(exc):  # cli.run names TMPDIR
            raise
        raise InputError(first_line(exc)) from None
    try:
        paths = save()
    except OSError as exc:  # --out was writable when the run began: the disk filled up, or a file limit
        raise save_failed(exc) from None
    print("wrote " + ", ".join(str(p) for p in paths))
    if failed:  # saved first: the errors are the finding
        raise WorkFailed(failed)
    return 0


def _failed_levels(doc: dict) -> str | None:
    """One line naming the end-to-end load levels in which no request succeeded, or None."""
    levels = [*doc.get("closed", []), *([doc["open"]] if doc.get("open") else [])]
    bad = [f"{'c=' + str(r['concurrency']) if r['mode'] == 'closed' else 'Poisson'}: {r['problem']}"
           for r in levels if r.get("problem")]
    return f"{len(bad)} of {len(levels)} load levels failed: " + "; ".join(bad) if bad else None


if __name__ == "__main__":
    from models import cli  # the repository root leads sys.path since the top of this file

    cli.run(main, PROG)
