"""Run a study end to end: stability runs, tuning, tuned runs (convergence / optimizer), then the report.

Resumable by construction: every run is skipped when its result file already exists in the study directory.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from models.io import atomic_write_json
from models.oneline import first_line
from train.sweep import analysis, plan, report, runner
from train.sweep.plan import STUDY_FILE, StudyConfig
from train.sweep.spec import RunSpec

BATCH = 64  # images per timed step (runtime.measure's default)


def _run_phase(
    name: str, specs: Sequence[RunSpec], study_dir: Path, runs_root: Path, slots: Sequence[runner.WorkerSlot]
) -> int:
    """Train the specs without a result yet, with a progress bar; returns how many it trained."""
    for damaged in runner.damaged_results(study_dir, specs):
        print(f"[sweep] damaged run result, the run is trained again: {damaged}", file=sys.stderr)
    todo = [s for s in dict.fromkeys(specs) if not runner.is_done(study_dir, s)]
    skipped = len(set(specs)) - len(todo)
    if not todo:
        if specs:
            print(f"[sweep] {name}: all {skipped} runs already finished", file=sys.stderr)
        return 0
    print(f"[sweep] {name}: {len(todo)} runs to train, {skipped} already finished, {len(slots)} workers",
          file=sys.stderr)
    with tqdm(total=len(todo), desc=name, unit="run", dynamic_ncols=True) as bar:
        def progress(spec: RunSpec, result: dict[str, Any] | None) -> None:
            err = analysis.run_error(result) if result else float("nan")
            bar.set_postfix_str(f"{spec.model} {spec.optimizer} e{spec.epochs} err {err:.1f}", refresh=False)
            bar.update(1)

        return len(runner.run_all(todo, study_dir, runs_root, slots, progress))


def tuned_settings(
    cfg: StudyConfig, stab_specs: Sequence[RunSpec], study_dir: Path
) -> dict[tuple[str, str], tuple[float, float]]:
    """Each model x optimizer's (lr, wd): best stability run (tuning='sweep') or the recipe defaults. A pair is
    tuned only once every one of its stability runs has a result: with one lost (its winner, say), the best of the
    rest silently re-tuned it, orphaning its finished tuned runs and changing verdicts; now it waits for the rerun
    that trains the missing run."""
    if cfg.tuning == "recipe":
        return plan.recipe_tuning(cfg)
    results = report.load_results(study_dir, stab_specs)
    missing = {(s.model, s.optimizer) for s in stab_specs if s.run_id not in results}
    tuned = analysis.tune(stab_specs, analysis.errors_by_spec(stab_specs, results, cfg.metric))
    return {k: v for k, v in tuned.items() if k not in missing}


def plan_study(cfg: StudyConfig, study: str, study_dir: Path) -> tuple[list[RunSpec], list[RunSpec], dict]:
    """(stability specs, tuned specs, tuning); the tuned specs cover only model x optimizer pairs already tuned."""
    stab = plan.stability_specs(cfg) if plan.needs_stability(cfg, study) else []
    epochs = plan.tuned_epochs(cfg, study)
    tuned = tuned_settings(cfg, stab, study_dir) if epochs else {}
    return stab, plan.tuned_specs(cfg, tuned, epochs), tuned


def _recorded_machine(study_dir: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(the machine study.json says trained the study last, every machine it says trained runs)."""
    import json

    try:
        doc = json.loads((study_dir / STUDY_FILE).read_text())
        last = doc.get("machine")
        return last, doc.get("machines") or ([last] if last else [])
    except (OSError, ValueError, AttributeError):
        return None, []


def _same_session(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two machine records name the same machine and code (the load average and the like aside)."""
    keys = ("host", "cpu", "usable_cpus", "gpu", "torch", "git")
    return all(a.get(k) == b.get(k) for k in keys)


def _machines(study_dir: Path, current: dict[str, Any]) -> list[dict[str, Any]]:
    """Every machine (and commit) that trained runs of the study: those study.json lists, plus `current`."""
    import json

    try:
        doc = json.loads((study_dir / STUDY_FILE).read_text())
        known = doc.get("machines") or ([doc["machine"]] if doc.get("machine") else [])
        known = [m for m in known if isinstance(m, dict)]
    except (OSError, ValueError, AttributeError, KeyError):
        known = []
    return known if any(_same_session(m, current) for m in known) else [*known, current]


def measure_runtime(cfg: StudyConfig, study_dir: Path, slots: Sequence[runner.WorkerSlot]) -> None:
    """C/P time per training step and inference batch of every pair, once per study (runtime.json), on the
    study's first GPU or else the CPU, after the trainings so nothing else runs beside it."""
    from torch._dynamo.exc import FailOnRecompileLimitHit

    from train.sweep import runtime

    path = study_dir / report.RUNTIME_FILE
    device = f"cuda:{slots[0].device}" if slots and slots[0].device is not None else "cpu"
    pairs = analysis.stem_pairs(list(cfg.models))
    if why := report.place_problem(path):  # refused before minutes of measuring end in a rename onto a directory
        raise runner.DamagedResult(damaged_runtime(f"{path}: {why}"))
    try:  # a row missing a field was once kept as measured, and the report then failed on it
        readable = report.read_runtime(study_dir, pairs) is not None
    except ValueError as exc:
        print(f"[sweep] runtime: damaged {exc}: measured again", file=sys.stderr)
        readable = False
    if readable and _measured(path, pairs, device.split(":")[0]):
        return
    rows, skipped = [], {}
    for conv, patch in pairs:
        # The standalone command's check, before anything is allocated: a batch that cannot fit is recorded as not
        # measured (the trainings are kept, and the report says why) rather than run out of memory.
        if problem := runtime.batch_problem((conv, patch), device, BATCH):
            print(f"[sweep] runtime: {conv} vs {patch} not measured: {problem}", file=sys.stderr)
            skipped[f"{conv},{patch}"] = problem
            continue
        print(f"[sweep] runtime: {conv} vs {patch} on {device}", file=sys.stderr)
        try:
            rows += [{"pair": [conv, patch], **r} for r in runtime.measure(conv, patch, device, BATCH)]
        # Out of memory, or a compiled model refusing to run eagerly (fullgraph: a graph break is a RuntimeError,
        # the recompile limit an Exception of dynamo's own).
        except (RuntimeError, FailOnRecompileLimitHit) as exc:
            why = f"{type(exc).__name__}: {first_line(exc)}"[:300]
            print(f"[sweep] runtime: {conv} vs {patch} not measured: {why}", file=sys.stderr)
            skipped[f"{conv},{patch}"] = why
    doc: dict[str, Any] = {"rows": rows, "machine": runtime.machine(device)}
    if skipped:
        doc["not_measured"] = skipped
    atomic_write_json(path, doc)


def damaged_runtime(problem: str, report_only: bool = False) -> str:
    """The refusal of a runtime.json that cannot be reported (`problem`: "<path>: <why>")."""
    rerun = "rerun the study (without --report-only)" if report_only else "rerun the study"
    return f"damaged runtime measurement {problem}: delete it and {rerun} to measure it again"


def _measured(path: Path, pairs: Sequence[tuple[str, str]], kind: str) -> bool:
    """Whether runtime.json already holds every pair measured on this kind of device (a study resumed on a GPU,
    or one whose file is damaged, is measured again rather than reported with stale or missing numbers)."""
    from models.io import parse_strict_json, read_regular_file

    most = report.MAX_RUNTIME_BYTES
    try:  # a regular file only: a FIFO swapped in is never waited on
        rows = parse_strict_json(read_regular_file(path, most), most).get("rows")
        have = {(tuple(r["pair"]), str(r["device"]).split(":")[0]) for r in rows}
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        return False
    return all((tuple(p), kind) in have for p in pairs)


def _all_keys(cfg: StudyConfig) -> list[tuple[str, str]]:
    return [(m, o) for m in cfg.models for o in cfg.optimizers]


def run_study(
    cfg: StudyConfig,
    study: str,
    study_dir: Path,
    runs_root: Path,
    slots: Sequence[runner.WorkerSlot],
    dry_run: bool = False,
    report_only: bool = False,
) -> dict[str, Any]:
    """Train what is missing (unless dry_run/report_only), then write the report; returns the summary."""
    study_dir = Path(study_dir)
    if study not in plan.STUDIES:
        raise ValueError(f"unknown study {study!r}; expected one of {plan.STUDIES}")
    if dry_run:
        stab, tuned_runs, _ = plan_study(cfg, study, study_dir)
        # The commands the workers run: every slot has the same threads (only its GPU differs, in the environment).
        threads = slots[0].threads if slots else None
        for s in list(dict.fromkeys((*stab, *tuned_runs))):
            state = "done" if runner.is_done(study_dir, s) else "todo"
            # Shell-quoted: a path with spaces pastes as one argument.
            print(state, shlex.join(runner.build_command(s, Path(runs_root) / s.run_id, threads)))
        pending = len(_all_keys(cfg)) - len({(s.model, s.optimizer) for s in tuned_runs})
        if plan.tuned_epochs(cfg, study) and pending:
            print(f"(+ tuned runs for {pending} model/optimizer pairs, planned once their stability runs finish)")
        return {}
    if not report_only:  # a report-only rebuild never rewrites the record of the study it reports
        from train.sweep.runtime import machine

        device = f"cuda:{slots[0].device}" if slots and slots[0].device is not None else "cpu"
        record = {"study": study, "config": cfg.to_dict(), "machine": machine(device), "workers": len(slots)}
        if not (study_dir / STUDY_FILE).is_file():  # written first, so an interrupted study is still reportable
            atomic_write_json(study_dir / STUDY_FILE, {**record, "machines": [record["machine"]]})
        stab = plan.stability_specs(cfg) if plan.needs_stability(cfg, study) else []
        trained = _run_phase("stability", stab, study_dir, runs_root, slots)
        _, tuned_runs, _ = plan_study(cfg, study, study_dir)
        trained += _run_phase("tuned", tuned_runs, study_dir, runs_root, slots)
        # The caller checked that a recorded study has these settings; its machine and commit name the session
        # that trained last, "machines" every session that trained runs, and a resume that trains nothing must not
        # claim the study for this machine.
        if trained:
            atomic_write_json(study_dir / STUDY_FILE, {**record, "machines": _machines(study_dir, record["machine"])})
        measure_runtime(cfg, study_dir, slots)
    stab, tuned_runs, tuned = plan_study(cfg, study, study_dir)
    if report_only and (damaged := runner.damaged_results(study_dir, [*stab, *tuned_runs])):
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        raise runner.DamagedResult(f"damaged run result {damaged[0]}{more}: delete it and rerun the study (without "
                                   f"--report-only) to train that run again")
    try:
        runtime_doc = report.read_runtime(study_dir, analysis.stem_pairs(list(cfg.models)))
    except ValueError as exc:  # only --report-only meets one: a study run has just measured a damaged file again
        raise runner.DamagedResult(damaged_runtime(str(exc), report_only)) from None
    results = report.load_results(study_dir, [*stab, *tuned_runs])
    summary = report.build_summary(cfg, study, stab, tuned_runs, tuned, results, runtime_doc)
    summary["machine"], summary["machines"] = _recorded_machine(study_dir)
    report.write_report(study_dir, summary)
    return summary
