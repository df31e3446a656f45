"""A study's outputs: summary.json, claims.md (the claims table and per-study tables) and the PNG plots."""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from models.io import atomic_write_bytes, atomic_write_json, not_a_file, parse_strict_json, read_regular_file
from train.sweep import analysis, claims, plots, presets
from train.sweep.plan import StudyConfig, tuned_epochs
from train.sweep.runner import load_result
from train.sweep.spec import RunSpec

SUMMARY_FORMAT = "vitc-sweep-summary"
RUNTIME_FILE = "runtime.json"  # the study's measured C/P step times (train.sweep.runtime)
MAX_RUNTIME_BYTES = 16 * 1024 * 1024  # a few KB per pair: never read a huge file whole
# The fields of every runtime row, measured or not, by type.
_ROW_FIELDS: dict[str, type] = {"what": str, "device": str, "layout": str, "compiled": bool}
FIGURES = ("convergence.png", "optimizer.png", "stability_edf.png", "stability_lr_wd.png")  # all write_report draws
REPORT_FILES = ("summary.json", "claims.md", *FIGURES)  # every file write_report replaces or removes
# Said under every claims table: what a rerun of the study can and cannot be expected to give.
REPRODUCIBILITY = (
    "Reproducibility: each run's error depends on the source commit and the CPU as well as on its seed (e943cba, "
    "which changed how training normalises its batches in the last float32 bit, moved a 2-epoch vit_c_nano run from "
    "30.1 to 25.3 % error; one run at one commit gave 29.9 % on an AMD EPYC and 27.5 % on an Intel Xeon), so a "
    "rerun at another commit or on another CPU gives other per-run numbers, by about the seeds' own spread; the "
    "verdicts, which count only differences beyond that spread, are what a rerun is expected to repeat.")
GOOD_MARGIN = 5.0  # points above the best sampled error that still count as a "good" run in the EDF stats


def load_results(study_dir: Path, specs: Sequence[RunSpec]) -> dict[str, dict[str, Any]]:
    """Finished results of `specs`, by run id."""
    out = {}
    for s in specs:
        r = load_result(study_dir, s)
        if r is not None:
            out[s.run_id] = r
    return out


def read_runtime(study_dir: Path, pairs: Sequence[tuple[str, str]] | None = None) -> dict[str, Any] | None:
    """The study's runtime measurement, None if it was not made; ValueError naming the file and what is wrong with
    it (not a regular file; the row and field; a row of none of `pairs`, the study's (conv, patch) pairs) when it
    cannot be reported."""
    path = Path(study_dir) / RUNTIME_FILE
    try:
        # A directory or a FIFO there is damage, not a study that stopped before its runtime step.
        if why := place_problem(path):
            raise ValueError(why)
        if not os.path.lexists(path):
            return None
        # Read from a regular file only: whatever was swapped in since is refused unread, a FIFO never waited on.
        doc = parse_strict_json(read_regular_file(path, MAX_RUNTIME_BYTES), MAX_RUNTIME_BYTES)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}") from None
    if problem := runtime_problem(doc, pairs):
        raise ValueError(f"{path}: {problem}")
    return doc


def place_problem(path: Path) -> str | None:
    """Why a study file's place holds something that is not a regular file (a directory, a FIFO, a device, a link to
    nothing or a link loop), from its stat alone (a FIFO is never opened: it would block), or None for a regular
    file (links to one are followed) or nothing at all; OSError when stat cannot tell."""
    why = not_a_file(path)
    if why is None or why == "is missing":
        return None
    if why.startswith("is not a regular file"):
        return why
    # not_a_file's words for a link to nothing, or the ELOOP reason of a link loop
    kind = why.removeprefix("is ") if why.startswith("is a symbolic link") else "a symbolic link loop"
    return f"is not a regular file ({kind})"


def output_problem(study_dir: Path) -> str | None:
    """Why the report cannot be written into `study_dir`, or None: a place of one of its files that holds something
    other than a regular file (the rename onto a directory fails, and whatever else is there would be lost), or a
    directory this process cannot write. Checked before any work: a refusal then leaves every file as it was."""
    study_dir = Path(study_dir)
    for name in REPORT_FILES:
        try:
            why = place_problem(study_dir / name)
        except OSError as exc:  # a directory on the way that cannot be searched
            return f"{study_dir / name}: {exc.strerror or exc}; nothing was changed"
        if why:
            return f"{study_dir / name} {why}, where the report writes a file; nothing was changed: move it away"
    if not os.access(study_dir, os.W_OK | os.X_OK):  # no permission, or a read-only file system
        return f"{study_dir} is not writable, the report cannot be written there; nothing was changed"
    return None


def runtime_problem(doc: object, pairs: Sequence[tuple[str, str]] | None = None) -> str | None:
    """Why a runtime.json document cannot be reported (its rows' fields and types, as claims.runtime_row and the
    runtime table read them; a row repeated; with `pairs`, a row of none of the study's (conv, patch) pairs), or
    None. The one check for a resumed study and for --report-only."""
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        return "no list of rows"
    for key in ("machine", "not_measured"):
        if doc.get(key) is not None and not isinstance(doc[key], dict):
            return f"{key} is not an object"
    if problem := _machine_problem(doc.get("machine") or {}):
        return f"machine: {problem}"
    known = None if pairs is None else [list(p) for p in pairs]
    seen: dict[tuple[object, ...], int] = {}
    for i, row in enumerate(doc["rows"], 1):
        if problem := _row_problem(row):
            return f"row {i}: {problem}"
        # Another pair (or this one reversed) was shown in the table but left out of the claim, without a word.
        if known is not None and row["pair"] not in known:
            return (f"row {i}: pair {' / '.join(row['pair'])} is not one of the study's (ViT_C / ViT_P) pairs "
                    f"({', '.join(' / '.join(p) for p in known)})")
        # A copy of a setting would be judged, and counted by the claim, as a second comparison.
        key = (*row["pair"], *(row[k] for k in _ROW_FIELDS))
        if key in seen:
            return f"row {i}: repeats row {seen[key]} (the same pair, what, device, layout and compiled)"
        seen[key] = i
    return None


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _positive(x: object) -> bool:
    return _number(x) and x > 0


def _machine_problem(mach: dict[str, Any]) -> str | None:
    """What the report cannot read in a runtime machine record (its load average and CPU count), or None."""
    load, cpus = mach.get("load_avg"), mach.get("usable_cpus")
    if load is not None and not (isinstance(load, list) and all(_number(x) and x >= 0 for x in load)):
        return "load_avg is not a list of numbers"
    if cpus is not None and not (isinstance(cpus, int) and not isinstance(cpus, bool) and cpus >= 1):
        return "usable_cpus is not a positive integer"
    return None


def _row_problem(row: object) -> str | None:
    """The first field of a measured runtime row that is missing or of the wrong type, or None."""
    if not isinstance(row, dict):
        return "not an object"
    pair = row.get("pair")
    if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(m, str) for m in pair)):
        return "pair is not two model names" if "pair" in row else "no pair"
    for key, kind in _ROW_FIELDS.items():
        if key not in row:
            return f"no {key}"
        if not isinstance(row[key], kind):
            return f"{key} is not a {kind.__name__}"
    if row.get("failed"):  # a setting that could not be measured: its reason instead of numbers
        return None if isinstance(row["failed"], str) else "failed is not a string"
    if not (isinstance(row.get("batch"), int) and not isinstance(row["batch"], bool) and row["batch"] >= 1):
        return "batch is not a positive integer" if "batch" in row else "no batch"
    for key in ("ms_vit_c", "ms_vit_p", "ratio"):
        if not _positive(row.get(key)):
            return f"{key} is not a positive number" if key in row else f"no {key}"
    ratios = row.get("round_ratios", [])  # absent in early files: the row is then a tie, said so
    if not (isinstance(ratios, list) and all(_positive(x) for x in ratios)):
        return "round_ratios is not a list of positive numbers"
    return None


def epoch_seconds(result: dict[str, Any]) -> float:
    """Training seconds per epoch of one run (the CLI's own timing when it reports one)."""
    times = [rec["epoch_time_s"] for rec in result.get("curve", []) if rec.get("epoch_time_s")]
    if times:
        return float(statistics.median(times))
    return float(result["wall_s"]) / max(1, int(result["spec"]["epochs"]))


def val_size(results: dict[str, dict[str, Any]], dataset: str) -> int:
    """Number of val images errors are measured on (from the runs, else from the dataset itself)."""
    for r in results.values():
        n = r.get("val_images")
        if n:
            return int(n)
    from data.datasets import load_dataset

    return len(load_dataset(dataset, "val"))


def provisional(row: dict[str, Any], finished: int, planned: int) -> str | None:
    """Why a claim's verdict is provisional (the study is incomplete, or a compared cell has fewer than
    claims.MIN_SEEDS seeds), naming the runs finished and the seeds per side; None when it is final."""
    seeds = {side: sorted({c[f"seeds_vit_{side}"] for c in row["cells"] if f"seeds_vit_{side}" in c})
             for side in ("c", "p")}
    few = any(n < claims.MIN_SEEDS for ns in seeds.values() for n in ns)
    if finished >= planned and not few:
        return None
    said = [f"{finished}/{planned} runs"]
    if seeds["c"] or seeds["p"]:
        said.append(f"seeds C n={_span(seeds['c'])}, P n={_span(seeds['p'])}")
    return "provisional: " + "; ".join(said)


def _span(ns: Sequence[int]) -> str:
    if not ns:
        return "0"
    return str(ns[0]) if ns[0] == ns[-1] else f"{ns[0]}-{ns[-1]}"


def trained_on(results: dict[str, dict[str, Any]], specs: Sequence[RunSpec]) -> list[dict[str, Any]]:
    """The machines and source commits the finished runs record, with how many runs each (runs from before runs
    recorded it are counted as "unrecorded")."""
    seen: dict[tuple, dict[str, Any]] = {}
    for s in specs:
        if s.run_id not in results:
            continue
        m = results[s.run_id].get("machine") or {}
        git = m.get("git") or {}
        key = (m.get("host"), m.get("cpu"), git.get("commit"), git.get("dirty"))
        entry = seen.setdefault(key, {"host": key[0], "cpu": key[1], "commit": key[2], "dirty": key[3], "runs": 0})
        entry["runs"] += 1
    return list(seen.values())


def _origin(result: dict[str, Any]) -> str:
    """The commit (with its dirty flag) and CPU a run records, as claims.md names them."""
    m = result.get("machine") or {}
    git = m.get("git") or {}
    if not (git.get("commit") or m.get("cpu")):
        return "on an unrecorded machine and commit"
    return f"{(git.get('commit') or '?')[:12]}{' (dirty)' if git.get('dirty') else ''} on {m.get('cpu') or '?'}"


def mixed_cells(specs: Sequence[RunSpec], results: dict[str, dict[str, Any]]) -> list[str]:
    """Each tuned cell (model, optimizer, schedule) whose seeds ran at different commits or on different CPUs, said
    with the seeds of each: per-run numbers depend on both, so such a mean mixes two setups."""
    cells: dict[tuple[str, str, int], dict[str, list[int]]] = {}
    for s in specs:
        if s.run_id in results:
            by = cells.setdefault((s.model, s.optimizer, s.epochs), {})
            by.setdefault(_origin(results[s.run_id]), []).append(s.seed)
    return [f"{m}/{claims.opt_name(o)} {e} ep: " + "; ".join(
                f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, sorted(seeds)))} {origin}"
                for origin, seeds in by.items())
            for (m, o, e), by in sorted(cells.items()) if len(by) > 1]


def build_summary(
    cfg: StudyConfig,
    study: str,
    stab_specs: Sequence[RunSpec],
    tuned_specs: Sequence[RunSpec],
    tuned: dict[tuple[str, str], tuple[float, float]],
    results: dict[str, dict[str, Any]],
    runtime_doc: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every number of the study, JSON-ready, including the claim verdicts."""
    from models.complexity import complexity
    from models.registry import get_config

    stab_err = analysis.errors_by_spec(stab_specs, results, cfg.metric)
    tuned_err = analysis.errors_by_spec(tuned_specs, results, cfg.metric)
    stab = analysis.stability(stab_specs, stab_err, GOOD_MARGIN)
    table = analysis.schedule_table(tuned_specs, tuned_err)
    gaps = analysis.optimizer_gaps(table)
    comp = {m: vars(complexity(get_config(m))) for m in cfg.models}
    runtime = {
        m: statistics.median(epoch_seconds(results[s.run_id]) for s in (*stab_specs, *tuned_specs)
                             if s.model == m and s.run_id in results)
        for m in cfg.models
        if any(s.model == m and s.run_id in results for s in (*stab_specs, *tuned_specs))
    }
    n_val = val_size(results, cfg.dataset) if results else 0
    rows = []
    runtime_doc = runtime_doc or {}
    measured_runtime = runtime_doc.get("rows", [])
    pairs = analysis.stem_pairs(list(cfg.models))
    epochs = tuned_epochs(cfg, study)
    for conv, patch in pairs:
        pair_rows = []
        flops_ratio = comp[conv]["flops"] / comp[patch]["flops"]
        if study in ("convergence", "all"):
            pair_rows.append(claims.convergence_claim(table, conv, patch, n_val, flops_ratio, epochs))
        if study in ("optimizer", "convergence", "all"):
            pair_rows.append(claims.optimizer_claim(gaps, table, conv, patch, n_val, epochs))
        if study in ("stability", "all"):
            pair_rows.append(claims.stability_claim(stab, conv, patch))
        if tuned_specs:
            pair_rows.append(claims.peak_claim(table, conv, patch, n_val, comp, runtime))
        # Every study measures runtime after its trainings: a pair without rows says so ("not run", and why).
        pair_runtime = [r for r in measured_runtime if r.get("pair") == [conv, patch]]
        skipped = (runtime_doc.get("not_measured") or {}).get(f"{conv},{patch}") or (
            None if runtime_doc else "no runtime.json (the study stopped before its runtime step)")
        pair_rows.append(claims.runtime_claim(pair_runtime, flops_ratio, skipped, runtime_doc.get("machine")))
        for row in pair_rows:
            row["pair"] = [conv, patch]
            if len(pairs) > 1:  # several pairs: every row names its own
                row["title"] = f"{row['title']} ({conv} / {patch})"
        rows += pair_rows
    all_specs = list(dict.fromkeys((*stab_specs, *tuned_specs)))
    # Pairs whose tuning waits for a stability result: their tuned runs are planned, not yet specified.
    untuned = [f"{m}/{o}" for m in cfg.models for o in cfg.optimizers if (m, o) not in tuned] if epochs else []
    # An untuned pair's tuned runs: every schedule and seed, less the one its stability winner already is (if any).
    per_untuned = len(epochs) * len(cfg.seeds) - (cfg.stability_epochs in epochs and cfg.stability_seed in cfg.seeds)
    runs = {"planned": len(all_specs) + len(untuned) * per_untuned,
            "finished": sum(s.run_id in results for s in all_specs),
            "train_wall_s": round(sum(results[s.run_id]["wall_s"] for s in all_specs if s.run_id in results))}
    for row in rows:
        if row["claim"] != "runtime" and (why := provisional(row, runs["finished"], runs["planned"])):
            row["provisional"] = why
    return {
        "format": SUMMARY_FORMAT,
        "format_version": 1,
        "study": study,
        "config": cfg.to_dict(),
        "error_metric": {"final": "val top-1 error (%) of the raw weights after the last epoch",
                         "best": "lowest val top-1 error (%) over epochs (pycls's min_top1_err)"}[cfg.metric],
        "val_images": n_val,
        **({"not_tuned": untuned} if untuned else {}),
        "runs": runs,
        "trained_on": trained_on(results, all_specs),
        "mixed_cells": mixed_cells(tuned_specs, results),
        "tuned": {f"{m}/{o}": {"lr": lr, "weight_decay": wd} for (m, o), (lr, wd) in sorted(tuned.items())},
        "stability": stab,
        "convergence": {m: {o: {str(e): v for e, v in c.items()} for o, c in t.items()} for m, t in table.items()},
        "optimizer_gap": {m: {str(e): v for e, v in g.items()} for m, g in gaps.items()},
        "complexity": comp,
        "seconds_per_epoch": runtime,
        "runtime": runtime_doc or None,
        "claims": rows,
    }


class NotWritten(RuntimeError):
    """A report file that could not be written (a full disk, an I/O error), said with its name; the earlier file
    stays whole (each is replaced atomically)."""


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Say an OSError while `path` is written as NotWritten naming `path` (what failed is the temporary beside it,
    or no file at all for a full disk)."""
    try:
        yield
    except OSError as exc:
        raise NotWritten(f"{exc.strerror or exc}: {path} was not written (the finished runs are kept: rerun with "
                         "--report-only to write the report)") from None


def write_report(study_dir: Path, summary: dict[str, Any]) -> list[Path]:
    """Write summary.json, claims.md and the plots that have data; returns the paths written; NotWritten naming the
    file whose write failed."""
    study_dir = Path(study_dir)
    models = summary["config"]["models"]
    table = {m: {o: {int(e): v for e, v in c.items()} for o, c in t.items()}
             for m, t in summary["convergence"].items()}
    gaps = {m: {int(e): v for e, v in g.items()} for m, g in summary["optimizer_gap"].items()}
    # Each file is replaced atomically, and summary.json (what tools read) last: a failed write (a full disk) never
    # leaves it newer than claims.md and the figures.
    figures = []
    n_val = summary["val_images"]
    if table:
        figures.append((plots.plot_convergence, (table, models, n_val), "convergence.png"))
    if gaps:
        figures.append((plots.plot_optimizer, (table, gaps, models, n_val), "optimizer.png"))
    if summary["stability"]:
        figures.append((plots.plot_edf, (summary["stability"], models), "stability_edf.png"))
        figures.append((plots.plot_stability_scatter, (summary["stability"], models), "stability_lr_wd.png"))
    written = []
    for plot, args, name in figures:
        with _writing(study_dir / name):
            written.append(plot(*args, study_dir / name))
    for name in FIGURES:  # a figure with no data now would show an earlier report's results beside this one
        if study_dir / name not in written:
            with _writing(study_dir / name):
                (study_dir / name).unlink(missing_ok=True)
    md = study_dir / "claims.md"
    with _writing(md):
        atomic_write_bytes(md, markdown(summary, [p.name for p in written]).encode())
    with _writing(study_dir / "summary.json"):
        atomic_write_json(study_dir / "summary.json", summary)
    return [*written, md, study_dir / "summary.json"]


def verdict_text(row: dict[str, Any]) -> str:
    """A claim's verdict as the claims table shows it: the verdict, provisional or not, and its counts."""
    said = f"**{row['reproduced']}**"
    if row.get("verdict_detail"):
        said += f": {row['verdict_detail']}"
    if row.get("provisional"):
        said += f", {row['provisional']}"
    unjudged = f"; not judged: {', '.join(row['not_judged'])}" if row.get("not_judged") else ""
    return (f"{said} ({row['supporting']} of {row['comparisons']} comparisons support, "
            f"{row['contradicting']} contradict{unjudged})")


def preset_label(cfg: dict[str, Any]) -> str:
    """"preset `x`", or "custom: preset `x` with --a, --b changed" when study settings override the preset."""
    changed = presets.overrides(StudyConfig.from_dict(cfg))
    if not changed:
        return f"preset `{cfg['preset']}`"
    return f"custom: preset `{cfg['preset']}` with {', '.join(changed)} changed"


def _machine_text(host: str | None, cpu: str | None, commit: str | None, dirty: bool | None) -> str:
    if not (cpu or commit):
        return "an unrecorded machine"
    where = cpu or "an unrecorded machine"
    if host:
        where += f" (host {host})"
    tree = " (dirty tree)" if dirty else ""
    return f"{where}, commit {(commit or '?')[:12]}{tree}"


def machines_text(summary: dict[str, Any]) -> str:
    """Every machine and commit that trained the study: the runs' own records, else those study.json keeps."""
    runs = [m for m in summary.get("trained_on") or [] if m.get("commit") or m.get("cpu")]
    recorded = summary.get("machines") or [summary.get("machine") or {}]
    if runs:
        unrecorded = sum(m["runs"] for m in summary["trained_on"] if m not in runs)
        text = "; ".join(f"{_machine_text(m['host'], m['cpu'], m['commit'], m['dirty'])}: {m['runs']} runs"
                         for m in runs)
        if not unrecorded:
            return text
        # Runs from before runs recorded their machine: study.json's machines that no run names trained them.
        named = {(m["cpu"], m["commit"]) for m in runs}
        others = [m for m in recorded if (m.get("cpu"), (m.get("git") or {}).get("commit")) not in named]
        return text + f"; unrecorded: {unrecorded} runs" + (
            f" (study.json names {'; '.join(map(_recorded_text, others))})" if others else "")
    return "; ".join(map(_recorded_text, recorded))


def _recorded_text(mach: dict[str, Any]) -> str:
    """A machine as study.json records it."""
    git = mach.get("git") or {}
    cpus = f" ({mach['usable_cpus']} CPUs)" if mach.get("usable_cpus") else ""
    return _machine_text(None, (mach.get("gpu") or mach.get("cpu") or "an unrecorded machine") + cpus,
                         git.get("commit"), git.get("dirty"))


def winners_curse(cfg: dict[str, Any]) -> str | None:
    """The selection bias of a sweep-tuned study, said where it applies (the tuned run on the stability runs' seed at
    the stability length is the very stability run that won the tuning)."""
    seed = cfg.get("stability_seed", cfg["seeds"][0])
    if cfg["tuning"] != "sweep" or cfg["stability_epochs"] not in cfg["epochs"] or seed not in cfg["seeds"]:
        return None
    return (f"Selection bias: with tuning by the sweep, the tuned run with seed {seed} at "
            f"{cfg['stability_epochs']} epochs is the stability run that won the tuning (the lowest of "
            f"{cfg['samples']} samples), so the {cfg['stability_epochs']}-epoch means lean towards the selected value "
            f"(a winner's curse) and their seed spread can widen; the other seeds and schedules are fresh runs.")


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def _mean_se(cell: dict[str, Any] | None, n_val: int) -> str:
    if not cell:
        return "n/a"
    if (cell.get("n") or 1) < 2:
        return f"{cell['mean']:.1f}"
    return f"{cell['mean']:.1f} ± {claims.se_cell(cell, n_val):.1f}"


def markdown(summary: dict[str, Any], figures: Sequence[str]) -> str:
    """The claims table plus one small table per experiment, with the settings that produced them."""
    cfg = summary["config"]
    label = preset_label(cfg)
    pairs = analysis.stem_pairs(list(cfg["models"]))
    lines = [
        f"# Paper claims at small scale ({label}, study `{summary['study']}`)",
        "",
        f"{label[0].upper()}{label[1:]}, pair{'s' if len(pairs) > 1 else ''} "
        f"{', '.join(' / '.join(p) for p in pairs)}, seeds {', '.join(map(str, cfg['seeds']))}; "
        f"trained on {machines_text(summary)}.",
        "",
        f"Models {', '.join(cfg['models'])} on `{cfg['dataset']}` ({summary['val_images']} val images); error = "
        f"{summary['error_metric']}. Runs: {summary['runs']['finished']}/{summary['runs']['planned']} finished, "
        f"{summary['runs']['train_wall_s'] / 60:.0f} min of training summed over runs (workers run in parallel)."
        + (f" Not tuned yet, a stability run without a result (rerun the study to train it): "
           f"{', '.join(summary['not_tuned'])}." if summary.get("not_tuned") else ""),
        f"Stability: {cfg['samples']} (lr, wd) samples per optimizer, shared by all models, "
        f"{cfg['stability_epochs']} epochs each, seed {cfg.get('stability_seed', cfg['seeds'][0])}; "
        "ranges (log-uniform): "
        + "; ".join(f"{claims.opt_name(o)} lr {cfg['lr_ranges'][o][0]:g}..{cfg['lr_ranges'][o][1]:g}, "
                    f"wd {cfg['wd_ranges'][o][0]:g}..{cfg['wd_ranges'][o][1]:g}" for o in cfg["optimizers"])
        + f". Tuning: {cfg['tuning']}. Schedules: {', '.join(map(str, cfg['epochs']))} epochs, "
        f"seeds {', '.join(map(str, cfg['seeds']))}. Extra training flags: `{shlex.join(cfg['train_args']) or '-'}`.",
        "",
        "| Claim | Paper | Measured here (seed mean ± standard error) | Flops C/P | Reproduced |",
        "|---|---|---|---|---|",
    ]
    for row in summary["claims"]:
        ratio = row.get("flops_ratio")
        flops = "–" if ratio is None else f"{ratio:.3f}" + ("" if claims.flops_parity(ratio) else " (off parity)")
        lines.append(f"| {row['title']} | {row['paper']} | {row['measured']} | {flops} | {verdict_text(row)} |")
    lines += ["", "Rules: " + " ".join(claims.__doc__.split("\n\n", 1)[1].split()), "", REPRODUCIBILITY, ""]
    if summary.get("mixed_cells"):
        lines += ["Warning: these cells mix commits or CPUs across their seeds, so their means mix setups: "
                  + "; ".join(summary["mixed_cells"]) + ".", ""]
    if (bias := winners_curse(cfg)) is not None:
        lines += [bias, ""]
    if summary["tuned"]:
        lines += ["## Tuned settings", "", "| model / optimizer | lr | weight decay |", "|---|---|---|"]
        lines += [f"| {k} | {v['lr']:g} | {v['weight_decay']:g} |" for k, v in summary["tuned"].items()]
        lines.append("")
    if summary["convergence"]:
        es = sorted({int(e) for t in summary["convergence"].values() for c in t.values() for e in c})
        lines += ["## Convergence (val error %, tuned settings, mean ± standard error over seeds)", "",
                  "| model | optimizer | " + " | ".join(f"{e} ep" for e in es) + " |",
                  "|---|---|" + "---|" * len(es)]
        for m, t in summary["convergence"].items():
            for o, c in t.items():
                lines.append(f"| {m} | {claims.opt_name(o)} | "
                             + " | ".join(_mean_se(c.get(str(e)), summary["val_images"]) for e in es) + " |")
        lines.append("")
    if summary["optimizer_gap"]:
        lines += ["## Optimizer gap (SGD error - AdamW error, points)", ""]
        for m, g in summary["optimizer_gap"].items():
            lines.append(f"- {m}: " + ", ".join(f"{e} ep {v:+.1f}" for e, v in g.items()))
        lines.append("")
    if summary["stability"]:
        lines += ["## Stability EDF statistics (val error %)", "",
                  "| optimizer | model | n | min | q25 | median | q75 | max | IQR | within 5 of best |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for o, ms in summary["stability"].items():
            for m, st in ms.items():
                lines.append(f"| {claims.opt_name(o)} | {m} | {st['n']} | {st['min']:.1f} | {st['q25']:.1f} | "
                             f"{st['median']:.1f} | {st['q75']:.1f} | {st['max']:.1f} | {st['iqr']:.1f} | "
                             f"{100 * st['frac_good']:.0f}% |")
        lines.append("")
    if summary["seconds_per_epoch"]:
        lines += ["## Cost", ""]
        for m, c in summary["complexity"].items():
            spe = summary["seconds_per_epoch"].get(m)
            lines.append(f"- {m}: {c['flops'] / 1e6:.1f} MFLOPs (multiply-adds), {c['params'] / 1e6:.2f} M params, "
                         f"{_fmt(spe)} s per training epoch (median over runs; shared CPU, indicative only)")
        lines.append("")
    if summary.get("runtime"):
        rt = summary["runtime"]
        mach = rt.get("machine") or {}
        load = mach.get("load_avg")
        git = mach.get("git") or {}
        lines += ["## Runtime (measured: median of interleaved rounds, 95 % interval of the per-round C/P ratios)",
                  "",
                  f"Machine: {mach.get('gpu') or mach.get('cpu', '?')}"
                  + (f" (host {mach['host']})" if mach.get("host") else "")
                  + f", {mach.get('usable_cpus', '?')} CPUs, torch {mach.get('torch', '?')}, commit "
                  + f"{(git.get('commit') or 'unrecorded')[:12]}"
                  + {True: " (dirty tree)", False: " (clean tree)"}.get(git.get("dirty"), "")
                  + (f", load average {load[0]:.1f} before measuring" if load else "") + ". "
                  "The intervals cover the variation between one measurement's rounds, not between measurements: "
                  "a rerun at another time, load or machine can land outside them.", "",
                  "| pair | what | device | layout | mode | batch | ViT_C ms | ViT_P ms | C/P | 95 % interval "
                  "| parity |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rt.get("rows", []):
            j = claims.runtime_row(r, mach)
            mode = "compiled" if r["compiled"] else "eager"
            if j["ratio"] is None:
                lines.append(f"| {' / '.join(r['pair'])} | {r['what']} | {r['device']} | {r['layout']} | {mode} | "
                             f"{r.get('batch', '?')} | – | – | – | – | {j['judgement']} |")
                continue
            ci = f"{j['interval'][0]:.3f}..{j['interval'][1]:.3f}" if j["interval"] else "–"
            if j["interval"] and j["interval_label"] != "95 %":  # too few rounds for the column's 95 % interval
                ci += f" ({j['interval_label']})"
            lines.append(f"| {' / '.join(r['pair'])} | {r['what']} | {r['device']} | {r['layout']} | {mode} | "
                         f"{r['batch']} | {r['ms_vit_c']:.2f} | {r['ms_vit_p']:.2f} | {j['ratio']:.3f} | {ci} | "
                         f"{j['judgement']} |")
        lines.append("")
        lines += [f"Not measured, {pair.replace(',', ' / ')}: {why}." for pair, why in
                  (rt.get("not_measured") or {}).items()]
        if rt.get("not_measured"):
            lines.append("")
    if figures:
        lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    return "\n".join(lines)
