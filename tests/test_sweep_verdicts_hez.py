"""hEZ's findings on the paper study's verdicts (issue #16), on constructed tables: peak accuracy judged in direction
and magnitude, two-sided runtime parity, comparisons that cannot be judged named and capping a verdict at partial, a
binomial floor that only widens intervals, and the report's machine, commit and reproducibility lines."""

from __future__ import annotations

import math
from pathlib import Path

from train.sweep import claims, report
from train.sweep.spec import RunSpec

COMP = {"c": {"flops": 1007}, "p": {"flops": 1000}}


def _cell(mean: float, std: float | None = 0.5, n: int = 3) -> dict:
    return {"mean": mean, "std": std, "n": n}


def _peak(c: float, p: float, std: float = 0.5) -> dict:
    table = {"c": {"adamw": {8: _cell(c, std)}}, "p": {"adamw": {8: _cell(p, std)}}}
    return claims.peak_claim(table, "c", "p", 1_000_000, COMP, {})


def test_peak_is_judged_in_direction_and_magnitude_apart():
    """hEZ 1: +7.8 with 95 % 5.9..9.7 lies wholly outside the paper's 1-2 points: not a plain "yes"."""
    far = _peak(13.5, 21.3)
    assert far["reproduced"] == "yes in direction; magnitude differs"
    lo, hi = 7.8 - far["cells"][0]["half_width"], 7.8 + far["cells"][0]["half_width"]
    assert far["verdict_detail"] == f"+7.8 [{lo:.1f}, {hi:.1f}] vs the paper's 1-2"
    assert (far["supporting"], far["contradicting"], far["comparisons"]) == (1, 1, 2)
    assert "**yes in direction; magnitude differs**: +7.8 [" in report.verdict_text(far)
    assert _peak(20.0, 21.5, std=0.05)["reproduced"] == "yes"  # 1.5 ± ~0.2: inside 1..2
    assert _peak(20.0, 22.0, std=0.5)["reproduced"] == "yes in direction; magnitude undetermined"  # across 2
    assert _peak(20.0, 20.1)["reproduced"] == "inconclusive in direction; magnitude undetermined"
    assert _peak(22.0, 15.0)["reproduced"] == "no in direction; magnitude differs"


def _rt(ratios: list[float], layout: str = "nchw") -> dict:
    med = sorted(ratios)[len(ratios) // 2]
    return {"pair": ["c", "p"], "what": "train_step", "device": "cpu", "layout": layout, "compiled": False,
            "batch": 64, "ms_vit_c": med, "ms_vit_p": 1.0, "ratio": med, "round_ratios": ratios, "rounds": 9}


PARITY = [0.99, 1.0, 1.01, 1.0, 0.98, 1.02, 1.0, 0.99, 1.01]
FASTER = [0.86, 0.85, 0.87, 0.86, 0.88, 0.85, 0.86, 0.87, 0.86]
BELOW = [0.92, 0.94, 0.96, 0.93, 0.95, 0.94, 0.97, 0.93, 0.95]  # 0.93..0.96: under 1.05 but across 0.95
SPREAD = [0.6, 0.9, 1.2, 0.95, 1.0, 0.7, 1.1, 0.65, 1.15]


def test_runtime_parity_is_two_sided():
    """hEZ 2: an interval wholly below 0.95 is "C faster" (the benchmarks' rule), one across 0.95 inconclusive."""
    assert [claims.runtime_row(_rt(x))["judgement"] for x in (PARITY, FASTER, BELOW)] == [
        "parity", "C faster", "inconclusive"]
    row = claims.runtime_claim([_rt(PARITY), _rt(FASTER, "channels_last")], 1.007)
    assert (row["supporting"], row["contradicting"], row["reproduced"]) == (1, 1, "no")
    assert "interval covers the variation between the rounds of one measurement, not between measurements" in \
        " ".join(claims.__doc__.split())


def test_runtime_rows_that_cannot_be_judged_are_counted_and_named():
    """hEZ 3: one parity row and three whose rounds disagree was "yes" (1 of 1); implausible rows were ties."""
    row = claims.runtime_claim([_rt(PARITY), *(_rt(SPREAD, lay) for lay in ("a", "b", "c"))], 1.007)
    assert (row["supporting"], row["comparisons"], row["reproduced"]) == (1, 4, "partial")
    assert row["not_judged"] == [f"train_step cpu {lay} (its rounds disagree)" for lay in ("a", "b", "c")]
    assert "not judged: train_step cpu a (its rounds disagree)" in report.verdict_text(row)
    broken = claims.runtime_claim([_rt(PARITY), _rt([0.3] * 9, "x")], 1.007)
    assert broken["reproduced"] == "partial" and broken["not_judged"] == ["train_step cpu x (implausible ratio)"]
    assert claims.runtime_claim([_rt(SPREAD)], 1.007)["reproduced"] == "not judged"
    assert claims.runtime_claim([], 1.007)["reproduced"] == "not run"


def _stab_runs(errs: list[float]) -> dict:
    from train.sweep.edf import edf_stats

    return {"runs": [{"lr": 10.0**-i, "weight_decay": 0.1, "error": e} for i, e in enumerate(errs)],
            **edf_stats(errs, 5.0)}


def test_an_optimizer_with_too_few_pairs_is_named_and_caps_the_verdict():
    """hEZ 3: AdamW supports both halves, SGD has 4 untied pairs and a bootstrap saying "C wider": not "yes"."""
    stab = {"adamw": {"c": _stab_runs([10, 11, 12, 13, 14, 15, 16, 17]),
                      "p": _stab_runs([30, 31, 40, 50, 60, 70, 80, 90])},
            "sgd": {"c": _stab_runs([50, 60, 70, 80]), "p": _stab_runs([40, 45, 50, 55])}}
    row = claims.stability_claim(stab, "c", "p")
    assert (row["supporting"], row["contradicting"], row["comparisons"], row["reproduced"]) == (2, 0, 4, "partial")
    assert row["not_judged"] == ["SGD lies left and tighter (4 untied pairs, the sign test needs 5)"]
    assert "C wider" in row["measured"]  # shown, but counted for neither side


def test_a_missing_optimizer_half_of_convergence_is_named():
    """hEZ 3: with ViT_P's SGD runs missing, AdamW alone made "Convergence: yes"."""
    adamw = {e: (_cell(40.0 - e), _cell(50.0 - e)) for e in (2, 4, 8)}
    table = {"c": {"adamw": {e: c for e, (c, _) in adamw.items()}, "sgd": {2: _cell(30.0)}},
             "p": {"adamw": {e: p for e, (_, p) in adamw.items()}}}
    row = claims.convergence_claim(table, "c", "p", 1000, 1.007, epochs=(2, 4, 8))
    assert (row["supporting"], row["comparisons"], row["reproduced"]) == (3, 6, "partial")
    assert row["not_judged"] == ["SGD at 2 ep (no p result)", "SGD at 4, 8 ep (no c or p result)"]
    full = {m: {"adamw": t["adamw"], "sgd": t["adamw"]} for m, t in table.items()}
    assert claims.convergence_claim(full, "c", "p", 1000, 1.007, epochs=(2, 4, 8))["reproduced"] == "yes"
    only_adamw = {m: {"adamw": t["adamw"]} for m, t in table.items()}
    row = claims.convergence_claim(only_adamw, "c", "p", 1000, 1.007)
    assert row["reproduced"] == "partial" and row["not_judged"] == ["SGD (no results)"]
    opt = claims.optimizer_claim({"c": {2: 1.0}}, {}, "c", "p", 1000, epochs=(2,))
    assert (opt["comparisons"], opt["reproduced"]) == (2, "not judged")


def test_the_binomial_floor_never_narrows_an_interval_below_plain_welch():
    """hEZ 4: flooring one cell with infinite degrees of freedom raised Welch's df and shrank t more than the SE."""
    for a, b in ((3.0, 0.05), (0.1, 0.1), (5.0, 5.0), (1.0, 0.2)):
        cells = [_cell(20.0, a), _cell(30.0, b)]
        v = [a**2 / 3, b**2 / 3]
        plain = claims.t_critical(sum(v) ** 2 / sum(x * x / 2 for x in v)) * math.sqrt(sum(v))
        assert claims.diff_interval(cells, 1000)[2] >= plain - 1e-12
    assert claims.cell_noise(_cell(20.0, 0.05), 1000)[1] == 2.0  # floored, still the seeds' degrees of freedom


def _result(commit: str, cpu: str | None) -> dict:
    return {"machine": {"host": "h", "cpu": cpu, "git": {"commit": commit, "dirty": False}} if cpu else {}}


def test_a_cell_mixing_commits_or_cpus_is_named():
    """hEZ 7: seeds 1-2 at one commit on AMD, seed 3 at another on Intel, averaged without a word."""
    specs = [RunSpec("vit_c_nano", "animals", "adamw", 0.01, 0.001, 8, seed=s) for s in (1, 2, 3)]
    results = {specs[0].run_id: _result("b5e3291eef99aa", "AMD"), specs[1].run_id: _result("b5e3291eef99aa", "AMD"),
               specs[2].run_id: _result("6cf666752bc7bb", "Intel")}
    assert report.mixed_cells(specs, results) == [
        "vit_c_nano/AdamW 8 ep: seeds 1, 2 b5e3291eef99 on AMD; seed 3 6cf666752bc7 on Intel"]
    results[specs[2].run_id] = _result("b5e3291eef99aa", "AMD")
    assert report.mixed_cells(specs, results) == []
    results[specs[2].run_id] = {}
    assert report.mixed_cells(specs, results)[0].endswith("seed 3 on an unrecorded machine and commit")


def test_the_committed_claims_name_the_runtime_commit_and_the_mixed_cells():
    """hEZ 6 and 7, on the committed report (rebuilt by --report-only, which test_sweep_hcl_fixes pins)."""
    text = (Path(__file__).parent.parent / "results" / "paper-reduced" / "claims.md").read_text()
    runtime = text[text.index("## Runtime"):]
    assert "commit bf6fce883402 (dirty tree)" in runtime and "(host vm)" in runtime
    assert "not between measurements" in runtime
    assert report.REPRODUCIBILITY in text and "e943cba" in text
    assert "Warning: these cells mix commits or CPUs" in text and "seed 3 6cf666752bc7 on Intel" in text
