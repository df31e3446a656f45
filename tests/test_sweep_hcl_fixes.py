"""Paper-study statistics (hCL): no (lr, wd) sample is planned twice, a runtime.json with a row missing a field is
measured again or refused in one line, flops parity at exactly 3 %, a runtime row whose rounds disagree is flagged
rather than judged, and the stability cell's figures come from the paired runs its interval is drawn from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_sweep import _recorded_study

from models.io import atomic_write_json
from train.sweep import analysis, claims, plan, presets, report, runner, runtime, sampling, study
from train.sweep.__main__ import main
from train.sweep.edf import edf_stats

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "results" / "paper-reduced"
# Ranges so narrow that 3 significant digits leave 3 lr and 3 wd values per optimizer: 9 distinct pairs.
NARROW = {"lr_ranges": {"adamw": (0.001, 0.00102), "sgd": (0.01, 0.0102)},
          "wd_ranges": {"adamw": (0.1, 0.102), "sgd": (1e-4, 1.02e-4)}}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# ---------------------------------------------------------------- 1. no (lr, wd) sample planned twice


@pytest.mark.parametrize("overrides", [{"samples": 8, **NARROW}, {"samples": 1000}])
def test_the_stability_plan_never_holds_a_sample_twice(overrides):
    """A repeated (lr, wd) was trained once and counted twice by the EDF (n, quantiles, within-5) but once by the
    sign test; the default ranges repeated one AdamW pair at 1000 samples, the narrow ones most of theirs."""
    cfg = presets.make_config("reduced", **overrides)
    specs = plan.stability_specs(cfg)
    assert len(specs) == len(set(specs)) == len(cfg.models) * len(cfg.optimizers) * cfg.samples
    assert plan.stability_specs(cfg) == specs  # re-drawn from the seed: the same plan every time


def test_the_committed_studys_samples_are_kept_so_it_resumes():
    """Every stability run the committed study planned is still planned, in the same order (its samples were
    distinct, so nothing is re-drawn)."""
    cfg, name = plan.recorded_study(COMMITTED)
    specs = plan.stability_specs(cfg)
    assert all(runner.result_path(COMMITTED, s).is_file() for s in specs)
    assert name == "all" and len(set(specs)) == 64


def test_a_sample_count_the_ranges_cannot_give_is_refused(tmp_path, capsys):
    assert sampling.distinct_values(0.001, 0.00102) == 3 and sampling.distinct_values(1e-4, 3e-2) == 2001
    assert len(set(sampling.sample_lr_wd(9, (0.001, 0.00102), (0.1, 0.102), 0))) == 9  # every pair there is
    with pytest.raises(ValueError, match="only 9 distinct"):
        presets.make_config("reduced", samples=10, **NARROW)
    flags = [f"--{kind}-range={opt}={lo:g},{hi:g}" for kind in ("lr", "wd")
             for opt, (lo, hi) in NARROW[f"{kind}_ranges"].items()]
    assert main(["--preset", "reduced", "--out", str(tmp_path / "s"), "--dry-run", "--samples", "10", *flags]) == 2
    err = _one_line_error(capsys)
    assert "--samples 10" in err and "only 9 distinct (lr, wd) pairs" in err and "3 significant digits" in err, err


# ---------------------------------------------------------------- 2. a runtime.json row missing a field


def _runtime_doc(**row_changes) -> dict:
    doc = json.loads((COMMITTED / report.RUNTIME_FILE).read_text())
    doc["rows"][0].update(row_changes)
    return doc


def test_report_only_refuses_a_runtime_row_without_a_field_in_one_line(tmp_path, capsys):
    out, _ = _recorded_study(tmp_path)
    doc = _runtime_doc()
    del doc["rows"][0]["ms_vit_c"]
    (out / report.RUNTIME_FILE).write_text(json.dumps(doc))
    assert main(["--out", str(out), "--report-only"]) == 2
    err = _one_line_error(capsys)
    assert str(out / report.RUNTIME_FILE) in err and "ms_vit_c" in err, err
    assert not (out / "claims.md").exists()


@pytest.mark.parametrize("changes, field", [({"batch": "64"}, "batch"), ({"round_ratios": [1.0, None]}, "round_ratios"),
                                            ({"compiled": 0}, "compiled"), ({"pair": ["vit_c_nano"]}, "pair")])
def test_a_runtime_row_of_the_wrong_type_is_named(changes, field):
    assert field in report.runtime_problem(_runtime_doc(**changes))
    assert report.runtime_problem(json.loads((COMMITTED / report.RUNTIME_FILE).read_text())) is None


def test_a_study_run_measures_a_runtime_row_without_a_field_again(tmp_path, monkeypatch, capsys):
    """It was kept as complete (only pair and device were looked at) and the report then crashed on the row."""
    cfg = presets.make_config("reduced")
    doc = _runtime_doc()
    del doc["rows"][0]["ms_vit_c"]
    atomic_write_json(tmp_path / report.RUNTIME_FILE, doc)
    good = json.loads((COMMITTED / report.RUNTIME_FILE).read_text())["rows"]
    # The timing itself is runtime.measure's (tested there); here only whether the study asks for it again.
    monkeypatch.setattr(runtime, "measure", lambda *_a, **_k: [{k: v for k, v in r.items() if k != "pair"}
                                                              for r in good])
    study.measure_runtime(cfg, tmp_path, [])
    assert "ms_vit_c" in capsys.readouterr().err
    again = json.loads((tmp_path / report.RUNTIME_FILE).read_text())
    assert report.runtime_problem(again) is None and again["rows"][0]["ms_vit_c"] == good[0]["ms_vit_c"]


# ---------------------------------------------------------------- 3. flops parity at exactly 3 %


@pytest.mark.parametrize("c, p, at_parity", [(1030, 1000, True), (970, 1000, True), (1031, 1000, False),
                                              (969, 1000, False), (1000, 1000, True)])
def test_flops_exactly_three_percent_apart_are_at_parity(c, p, at_parity):
    assert claims.flops_parity(c / p) is at_parity
    table = {"c": {"adamw": {2: {"mean": 20.0}}}, "p": {"adamw": {2: {"mean": 30.0}}}}
    row = claims.convergence_claim(table, "c", "p", 1000, flops_ratio=c / p)
    assert (row["reproduced"] == "not judged") is not at_parity


# ---------------------------------------------------------------- 4. a runtime row whose rounds disagree


LOADED = {"what": "train_step", "device": "cpu", "layout": "channels_last", "compiled": False, "batch": 64,
          "ms_vit_c": 298.2117860001381, "ms_vit_p": 263.6626432000412, "ratio": 0.8096828130024297,
          "round_ratios": [0.9024792934647902, 0.8618677866253504, 0.6304941574012749, 0.8961555953935789,
                           0.5740501925956497, 0.8096828130024297, 0.49707891035000307, 0.5413952752640794,
                           1.6590676071137593], "rounds": 9, "steps_per_round": 10}
BUSY = {"usable_cpus": 2, "load_avg": [4.68, 3.91, 3.24]}


def test_a_row_whose_median_times_contradict_its_interval_is_flagged_not_parity():
    """hCL's loaded machine: C/P 0.810 (95 % 0.541..0.902) said "parity" beside ViT_C 298 ms vs ViT_P 264 ms."""
    j = claims.runtime_row(LOADED, BUSY)
    assert j["judgement"].startswith("flagged") and "parity" not in j["judgement"], j
    assert "1.131" in j["judgement"] and "0.541..0.902" in j["judgement"], j
    assert "load average 4.68 above its 2 CPUs" in j["judgement"], j
    assert "load average" not in claims.runtime_row(LOADED, {"usable_cpus": 2, "load_avg": [1.5]})["judgement"]


def test_a_row_whose_rounds_disagree_beyond_the_bound_is_flagged():
    # The median times agree with the interval, but one round is twice as slow as another.
    ratios = [1.0, 0.98, 1.01, 0.99, 1.0, 0.97, 1.02, 0.66, 1.0]
    row = {**LOADED, "ms_vit_c": 10.0, "ms_vit_p": 10.0, "ratio": 1.0, "round_ratios": ratios}
    j = claims.runtime_row(row)
    assert j["judgement"].startswith("flagged") and f"{claims.MAX_ROUND_SPREAD:g}" in j["judgement"], j
    steady = {**row, "round_ratios": [1.0, 0.98, 1.01, 0.99, 1.0, 0.97, 1.02, 0.96, 1.0]}
    assert claims.runtime_row(steady)["judgement"] == "parity"


def test_a_flagged_row_is_not_judged_but_named_and_the_committed_rows_keep_their_verdicts():
    doc = json.loads((COMMITTED / report.RUNTIME_FILE).read_text())
    judged = ["inconclusive"] * 3 + ["C faster"]  # two-sided: 0.84..0.95 is not parity, 0.857..0.913 is C faster
    assert [claims.runtime_row(r, doc["machine"])["judgement"] for r in doc["rows"]] == judged
    row = claims.runtime_claim([*doc["rows"], LOADED], 1.007, machine=doc["machine"])
    assert (row["supporting"], row["contradicting"], row["comparisons"], row["reproduced"]) == (0, 1, 5, "no")
    assert row["not_judged"] == ["train_step cpu channels_last (its rounds disagree)"]
    only = claims.runtime_claim([LOADED], 1.007, machine=BUSY)
    assert (only["comparisons"], only["reproduced"]) == (1, "not judged") and "flagged" in only["measured"]


def test_the_readme_states_the_consistency_rule_where_the_runtime_rule_is():
    text = " ".join((ROOT / "README.md").read_text().split())
    rule = text[text.index("runtime: the median per-round C/P ratio"):]
    assert f"more than {claims.MAX_ROUND_SPREAD:g} times" in rule[:1500]
    assert "ratio of the two median times" in rule[:1500]


# ---------------------------------------------------------------- 5. the stability cell's figures, paired runs


def test_the_stability_cell_prints_the_paired_runs_figures(tmp_path):
    """With one ViT_P run missing, the cell printed the median and IQR of every run beside the bootstrap interval of
    the paired runs (an IQR difference outside its own interval)."""
    cfg = presets.make_config("reduced", samples=8, optimizers=("sgd",))
    conv, patch = cfg.models
    specs = plan.stability_specs(cfg)
    errors = {s: 20.0 + 10 * i % 37 + (10 if s.model == patch else 0) for i, s in enumerate(specs)}
    lost = next(s for s in specs if s.model == patch)
    errors.pop(lost)
    stab = analysis.stability(specs, errors)
    cell = claims.stability_claim(stab, conv, patch)["cells"][0]
    paired = [s for s in specs if s in errors and s.model == conv and (s.lr, s.weight_decay) != (lost.lr,
                                                                                                  lost.weight_decay)]
    want = edf_stats([errors[s] for s in paired], 5.0, stab["sgd"][conv]["good_reference"])
    assert (cell["median_vit_c"], cell["iqr_vit_c"], cell["frac_good_vit_c"]) == pytest.approx(
        (want["median"], want["iqr"], want["frac_good"]))
    assert stab["sgd"][conv]["n"] == 8 and len(paired) == 7
    measured = claims.stability_claim(stab, conv, patch)["measured"]
    assert "over the 7 paired samples" in measured, measured


def test_the_committed_study_reports_byte_identical(tmp_path, capsys):
    out = tmp_path / "paper-reduced"
    shutil.copytree(COMMITTED, out)
    assert main(["--out", str(out), "--report-only"]) == 0, capsys.readouterr().err
    assert (out / "claims.md").read_bytes() == (COMMITTED / "claims.md").read_bytes()
    assert (out / "summary.json").read_bytes() == (COMMITTED / "summary.json").read_bytes()
