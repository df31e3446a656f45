"""The paper study's verdict rules on constructed tables (issue #16): t-based seed comparisons, the runtime claim's
flops gate and noise model, ties read as inconclusive, provisional verdicts of an incomplete study, noise-judged
"tighter" and "as well", and what a study records about the machines and code that trained it."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_sweep import _fake_result, _recorded_study

from models.io import atomic_write_json
from train.sweep import analysis, claims, plan, presets, report, runner, study
from train.sweep.__main__ import main
from train.sweep.spec import RunSpec

# Every verdict a claim can get (train.sweep.claims' rules text states them).
VERDICTS = ("yes", "partial", "no", "inconclusive", "not run", "not judged")


def _cell(mean: float, std: float | None, n: int) -> dict:
    return {"mean": mean, "std": std, "n": n}


# ---------------------------------------------------------------- 1. seed differences: Welch df, t at 95 %


def test_a_three_seed_difference_is_judged_with_t_not_two_standard_errors():
    """Cells like the committed study's ViT_C AdamW and SGD at 2 ep (27.0 and 38.5, SE 5.4): z = 2.1 passed the old
    "2 SE" rule, but with 2-3 degrees of freedom the 95 % critical value is 3.7, so the difference is a tie."""
    c, p = _cell(27.0, 2.9, 3), _cell(38.5, 8.9, 3)
    se, df = claims.welch([c, p], 1000)
    assert se == pytest.approx(math.sqrt(2.9**2 / 3 + 8.9**2 / 3))
    # Welch-Satterthwaite by hand.
    v1, v2 = 2.9**2 / 3, 8.9**2 / 3
    assert df == pytest.approx((v1 + v2) ** 2 / (v1**2 / 2 + v2**2 / 2))
    assert 11.5 / se > 2.0  # what the old rule counted
    table = {"vit_c_x": {"adamw": {2: c}}, "vit_p_x": {"adamw": {2: p}}}
    row = claims.convergence_claim(table, "vit_c_x", "vit_p_x", 1000, flops_ratio=1.0)
    assert (row["supporting"], row["contradicting"], row["reproduced"]) == (0, 0, "inconclusive")
    assert row["cells"][0]["half_width"] == pytest.approx(claims.t_critical(df) * se)


def test_t_critical_values_are_the_ones_the_rules_text_states():
    rules = " ".join(claims.__doc__.split())
    assert round(claims.t_critical(2), 2) == 4.30 and "4.30 at 2 degrees of freedom" in rules
    assert round(claims.t_critical(4), 2) == 2.78 and "2.78 at 4" in rules
    assert round(claims.t_critical(math.inf), 2) == 1.96 and "1.96 for a single seed" in rules


def test_binomial_noise_alone_uses_the_normal_quantile():
    """One seed per side: no seed spread, so no seed degrees of freedom (and the verdict is provisional)."""
    se, df = claims.welch([_cell(20.0, None, 1), _cell(30.0, None, 1)], 1000)
    assert math.isinf(df) and se == pytest.approx(math.hypot(claims.se_error(20.0, 1000), claims.se_error(30.0, 1000)))


# ---------------------------------------------------------------- the verdict vocabulary


@pytest.mark.parametrize("sup,con,total,expected", [
    (0, 0, 6, "inconclusive"), (0, 0, 1, "inconclusive"), (1, 0, 6, "partial"), (0, 1, 6, "no"), (2, 2, 6, "no"),
    (1, 3, 4, "no"), (6, 0, 6, "yes"), (0, 0, 0, "not run")])
def test_ties_only_are_inconclusive_not_no(sup, con, total, expected):
    assert claims.verdict(sup, con, total) == expected
    assert expected in VERDICTS and f'"{expected}"' in claims.__doc__  # the rules text names every verdict


def test_no_data_off_parity_is_not_run_rather_than_not_judged():
    assert claims.convergence_claim({}, "c", "p", 1000, 0.8)["reproduced"] == "not run"
    comp = {"c": {"flops": 0.8}, "p": {"flops": 1.0}}
    assert claims.peak_claim({}, "c", "p", 1000, comp, {})["reproduced"] == "not run"


# ---------------------------------------------------------------- 2 + 4. the runtime claim


def _rt(ratios: list[float], what: str = "train_step") -> dict:
    # Median times that agree with the rounds (a row whose times contradict them is flagged, not judged).
    return {"what": what, "device": "cpu", "layout": "nchw", "compiled": False, "batch": 64,
            "ms_vit_c": float(np.median(ratios)), "ms_vit_p": 1.0, "ratio": float(np.median(ratios)),
            "round_ratios": ratios}


PARITY = [0.95, 0.97, 0.96, 0.98, 0.96, 0.97, 0.95, 0.96, 0.97]


def test_runtime_claim_is_judged_only_at_flops_parity_with_the_ratio_beside_it():
    """ViT_C-micro has 17 % fewer flops than ViT_P-micro: its being faster is no evidence of parity."""
    off = claims.runtime_claim([_rt(PARITY)], flops_ratio=0.827)
    assert off["reproduced"] == "not judged" and off["flops_ratio"] == pytest.approx(0.827)
    assert claims.runtime_claim([_rt(PARITY)], flops_ratio=1.007)["reproduced"] == "yes"


def test_runtime_rows_are_judged_by_the_interval_of_their_round_ratios():
    straddles = [1.00, 1.02, 1.04, 1.05, 1.06, 1.07, 1.03, 1.08, 1.05]
    slower = [1.10, 1.12, 1.11, 1.13, 1.12, 1.14, 1.12, 1.11, 1.13]
    absurd = [0.25, 0.26, 0.27, 0.26, 0.25, 0.26, 0.27, 0.26, 0.26]  # hAY s4: "C/P 0.260 ... yes"
    judged = [claims.runtime_row(_rt(x))["judgement"] for x in (PARITY, straddles, slower, absurd, PARITY[:4])]
    assert judged[0] == "parity" and judged[1] == "inconclusive" and judged[2] == "C slower"
    assert judged[3].startswith("flagged, not judged: implausible") and judged[4].startswith("not judged: 4 rounds")
    # The interval is scipy's order-statistic interval of the median (9 rounds: ranks 2 and 8).
    ratio, interval, firm = claims.ratio_interval(slower)
    assert firm and ratio == pytest.approx(1.12) and interval == pytest.approx([1.11, 1.13])
    row = claims.runtime_claim([_rt(x) for x in (PARITY, straddles, absurd)], 1.0)
    assert (row["supporting"], row["contradicting"], row["comparisons"], row["reproduced"]) == (1, 0, 3, "partial")
    assert row["not_judged"] == ["train_step cpu nchw (implausible ratio)"]
    # A measurement from before per-round ratios were kept is not judged.
    legacy = {k: v for k, v in _rt(PARITY).items() if k != "round_ratios"}
    assert claims.runtime_claim([legacy], 1.0)["reproduced"] == "not judged"


def test_measure_keeps_the_per_round_ratios():
    from train.sweep import runtime

    rows = runtime.measure("vit_c_nano", "vit_p_nano", "cpu", batch=2, rounds=6, target_s=0.002)
    for r in rows:
        assert len(r["round_ratios"]) == 6 and r["ratio"] == pytest.approx(float(np.median(r["round_ratios"])))
    assert runtime.ROUNDS >= claims.MIN_CI_ROUNDS


def test_compiled_timings_use_the_recompile_guard_of_the_served_torch_backend(monkeypatch):
    """A plain torch.compile shares dynamo's 8-entry budget: a study's second pair ran eagerly, labelled compiled."""
    import torch

    from runtimes.pytorch import compile_options as served
    from train.sweep import runtime

    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.append(kw) or model)
    runtime._timer("vit_c_nano", "inference", "cpu", "nchw", True, 2)()
    guard = ("isolate_recompiles", "fullgraph")
    assert seen and all(seen[0][k] is True for k in guard) and seen[0]["recompile_limit"] >= 1
    assert all(served(False, 1)[k] == seen[0][k] for k in guard)


def test_compiled_timers_of_many_settings_each_compile_their_own_graph(monkeypatch):
    """hAX 2 on the CPU without inductor: more compiled settings than dynamo's shared limit (lowered to 2 here) each
    trace a graph of their own instead of running eagerly."""
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    from train.sweep import runtime

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend="eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    # config.patch, not monkeypatch: dynamo's config module keeps its values in a table, and monkeypatch's undo
    # would delete the attribute, breaking every later torch.compile in this process.
    with torch._dynamo.config.patch(recompile_limit=2):
        for model in ("vit_c_nano", "vit_p_nano"):
            for layout in runtime.LAYOUTS:
                runtime._timer(model, "inference", "cpu", layout, True, 2)()
    assert counters["stats"]["unique_graphs"] == 4
    torch._dynamo.reset()


# ---------------------------------------------------------------- 6. "tighter" and "as well" against noise


def _stab(c_errs: list[float], p_errs: list[float]) -> dict:
    specs, errs = [], {}
    for i, (ec, ep) in enumerate(zip(c_errs, p_errs, strict=True)):
        for model, e in (("vit_c_nano", ec), ("vit_p_nano", ep)):
            s = RunSpec(model, "animals", "adamw", 1e-3 * (i + 1), 1e-2, 2)
            specs.append(s)
            errs[s] = e
    return analysis.stability(specs, errs)


def test_an_iqr_difference_within_noise_is_a_tie():
    """hAY case F: IQR 10.01 vs 10.00 counted as "C wider", a contradiction."""
    c = [10 + 0.5 * i for i in range(16)]
    row = claims.stability_claim(_stab(c, [x + 20.05 for x in c]), "vit_c_nano", "vit_p_nano")
    cell = row["cells"][0]
    assert cell["tighter"] == "tie" and cell["iqr_diff_interval"][0] <= 0 <= cell["iqr_diff_interval"][1]
    assert (row["supporting"], row["contradicting"], row["reproduced"]) == (1, 0, "partial")
    tight = claims.stability_claim(_stab([20 + 0.1 * i for i in range(16)], [30 + 4 * i for i in range(16)]),
                                   "vit_c_nano", "vit_p_nano")
    assert tight["cells"][0]["tighter"] == "C tighter" and tight["reproduced"] == "yes"


def test_a_noisy_sgd_gap_does_not_support_as_well():
    """hAY case C: ViT_C 20 % (AdamW) vs 40 % (SGD) with a 20-point seed spread counted as "as well"."""
    table = {m: {o: {8: _cell(mu, 20.0, 3)} for o, mu in zip(("adamw", "sgd"), v, strict=True)}
             for m, v in {"c": (20, 40), "p": (20, 80)}.items()}
    row = claims.optimizer_claim(analysis.optimizer_gaps(table), table, "c", "p", 1000)
    assert row["cells"][0]["vit_c_as_well"] == "tie" and row["supporting"] == 0
    assert row["reproduced"] == "inconclusive"


# ---------------------------------------------------------------- 3 + 5. incomplete studies, labels, pairs


def test_an_incomplete_study_marks_its_verdicts_provisional_and_its_missing_runtime_not_run(tmp_path, capsys):
    """hAY s3: a killed study's --report-only printed final-looking verdicts from C n=3 against P n=1."""
    cfg = presets.make_config("reduced", epochs=(2,), samples=5, seeds=(0, 1, 2))
    record = {"study": "all", "config": cfg.to_dict(), "machine": {"cpu": "box"}, "workers": 1}
    (tmp_path / "study.json").write_text(json.dumps(record))
    conv = cfg.models[0]
    for s in plan.stability_specs(cfg):
        atomic_write_json(runner.result_path(tmp_path, s), _fake_result(s, 30.0 if s.model == conv else 60.0))
    for s in study.plan_study(cfg, "all", tmp_path)[1]:
        if s.model == conv or s.seed == 0:  # ViT_P's seeds 1 and 2 never finished
            atomic_write_json(runner.result_path(tmp_path, s), _fake_result(s, 20.0 if s.model == conv else 40.0))
    assert main(["--out", str(tmp_path), "--report-only"]) == 0
    out = capsys.readouterr().out
    assert "Convergence: yes (provisional: 24/28 runs; seeds C n=3, P n=1) - " in out, out
    assert "Runtime at parity: not run - not measured: no runtime.json" in out
    md = (tmp_path / "claims.md").read_text()
    assert "**yes**, provisional: 24/28 runs; seeds C n=3, P n=1 (" in md
    assert "| Runtime at parity |" in md and "**not run**" in md
    # --seeds 0,1,2 takes the stability seed back among the tuned ones: the winner's curse is confessed.
    assert "Selection bias: with tuning by the sweep, the tuned run with seed 0 at 2 epochs is the stability run" in md


def test_fewer_than_three_seeds_are_warned_and_provisional(tmp_path, capsys):
    out, _ = _recorded_study(tmp_path)  # seeds (0,)
    assert main(["--out", str(out), "--report-only"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    conv = next(r for r in summary["claims"] if r["claim"] == "convergence")
    assert conv["provisional"] == "provisional: 8/8 runs; seeds C n=1, P n=1"
    capsys.readouterr()
    assert main(["--preset", "reduced", "--seeds", "0", "--out", str(tmp_path / "s"), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "warning: --seeds 0: fewer than 3 seeds per tuned run" in err


def test_the_preset_label_names_overrides():
    assert report.preset_label(presets.make_config("reduced").to_dict()) == "preset `reduced`"
    label = report.preset_label(presets.make_config("full", seeds=(0,), samples=2).to_dict())
    assert label == "custom: preset `full` with --samples, --seeds changed"


def test_a_study_of_two_pairs_names_the_pair_in_every_row(tmp_path):
    cfg = presets.make_config("reduced", models=("vit_c_nano", "vit_p_nano", "vit_c_micro", "vit_p_micro"),
                              epochs=(2,), samples=5)
    stab = plan.stability_specs(cfg)
    for s in stab:
        atomic_write_json(runner.result_path(tmp_path, s), _fake_result(s, 30.0 if "_c_" in s.model else 60.0))
    _, tuned_runs, tuned = study.plan_study(cfg, "all", tmp_path)
    results = report.load_results(tmp_path, [*stab, *tuned_runs])
    summary = report.build_summary(cfg, "all", stab, tuned_runs, tuned, results, None)
    titles = [r["title"] for r in summary["claims"]]
    assert "Convergence (vit_c_nano / vit_p_nano)" in titles
    assert "Runtime at parity (vit_c_micro / vit_p_micro)" in titles
    micro_rt = next(r for r in summary["claims"] if r["title"] == "Runtime at parity (vit_c_micro / vit_p_micro)")
    assert micro_rt["flops_ratio"] == pytest.approx(0.827, abs=1e-3)
    md = report.markdown({**summary, "machine": None}, [])
    assert "pairs vit_c_nano / vit_p_nano, vit_c_micro / vit_p_micro" in md


# ---------------------------------------------------------------- 5. machines and commits


def test_run_results_record_host_cpu_and_commit(tmp_path, monkeypatch):
    from data.datasets import ANIMAL_CLASSES, default_preprocessing
    from models import build_model
    from models.checkpoint import save_checkpoint

    spec = RunSpec("vit_c_nano", "animals", "adamw", 1e-3, 0.05, 1)

    class Done:
        pid = 1

        def __init__(self, cmd, **kw):
            run_dir = Path(cmd[cmd.index("--out") + 1])
            # The checkpoint a training writes (read through the checkpoint contract), with its summary.
            save_checkpoint(run_dir, build_model("vit_c_micro"), class_names=ANIMAL_CLASSES,
                            preprocessing=default_preprocessing("animals", 32),
                            extra={"training": {"final_val_top1": 0.8}})

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Done)
    monkeypatch.setattr(runner, "host_facts", lambda: {"host": "h1", "cpu": "cpu1", "usable_cpus": 2,
                                                       "git": {"commit": "abc", "dirty": True}})
    result = runner.run_one(spec, tmp_path / "study", tmp_path / "runs", runner.WorkerSlot(1))
    assert result["machine"]["git"] == {"commit": "abc", "dirty": True} and result["machine"]["host"] == "h1"
    assert result["final_val_error"] == 20.0 and result["training"] == {"final_val_top1": 0.8}
    assert json.loads(runner.result_path(tmp_path / "study", spec).read_text())["machine"]["cpu"] == "cpu1"


def test_host_facts_name_the_machine_and_the_commit():
    facts = runner.host_facts()
    assert facts["cpu"] and facts["usable_cpus"] >= 1 and "commit" in (facts["git"] or {"commit": None})


def test_a_resumed_study_keeps_every_machine_and_the_header_says_dirty(tmp_path, capsys, monkeypatch):
    out, _ = _recorded_study(tmp_path)
    first = {"host": "machineA", "cpu": "the training box", "usable_cpus": 2, "gpu": None, "torch": "x",
             "git": {"commit": "b5e3291eef995cffb", "dirty": False}}
    doc = json.loads((out / "study.json").read_text())
    (out / "study.json").write_text(json.dumps({**doc, "machine": first}))
    (out / "runtime.json").write_text(json.dumps({"rows": [], "machine": {}, "not_measured": {}}))
    cfg = presets.make_config("reduced", epochs=(2,), samples=2, seeds=(0,))
    lost = study.plan_study(cfg, "all", out)[1][0]
    runner.result_path(out, lost).unlink()

    def train(specs, study_dir, runs_root, slots, progress=None):
        for s in specs:
            atomic_write_json(runner.result_path(study_dir, s), {**_fake_result(s, 20.0), "machine": {
                "host": "machineB", "cpu": "cpuB", "git": {"commit": "defd5b7ef764aa", "dirty": True}}})
        return list(specs)

    monkeypatch.setattr(runner, "run_all", train)
    monkeypatch.setattr(study, "measure_runtime", lambda *a, **k: None)
    assert main(["--preset", "reduced", "--epochs", "2", "--samples", "2", "--seeds", "0", "--out", str(out),
                 "--runs-dir", str(tmp_path / "r")]) == 0, capsys.readouterr().err
    machines = json.loads((out / "study.json").read_text())["machines"]
    assert machines[0]["host"] == "machineA" and len(machines) == 2
    md = (out / "claims.md").read_text()
    assert "cpuB (host machineB), commit defd5b7ef764 (dirty tree): 1 runs; unrecorded: 7 runs" in md


def test_the_header_shows_a_dirty_tree_from_the_study_record():
    summary = {"trained_on": [], "machine": {"cpu": "AMD EPYC", "usable_cpus": 2,
                                             "git": {"commit": "b5e3291eef995cffb", "dirty": True}}}
    assert report.machines_text(summary) == "AMD EPYC (2 CPUs), commit b5e3291eef99 (dirty tree)"


# ---------------------------------------------------------------- 7. the study's runtime step checks memory


def test_the_study_runtime_step_checks_the_batch_against_free_memory(tmp_path, monkeypatch):
    from train.sweep import runtime

    cfg = presets.make_config("reduced")
    monkeypatch.setattr(runtime, "batch_problem", lambda models, device, batch: f"--batch {batch}: too big")
    monkeypatch.setattr(runtime, "measure", lambda *a, **k: pytest.fail("measured without the memory check"))
    study.measure_runtime(cfg, tmp_path, [])
    doc = json.loads((tmp_path / "runtime.json").read_text())
    assert doc["rows"] == [] and doc["not_measured"] == {"vit_c_nano,vit_p_nano": "--batch 64: too big"}
    row = claims.runtime_claim([], 1.007, doc["not_measured"]["vit_c_nano,vit_p_nano"])
    assert row["reproduced"] == "not run" and row["measured"] == "not measured: --batch 64: too big"


def test_runs_without_a_machine_record_are_credited_to_the_machine_study_json_names():
    """A study resumed with a new setting: its older runs predate per-run records, and study.json's earlier machine
    trained them; the report named only the new machine and called the rest "unrecorded"."""
    old = {"cpu": "AMD EPYC", "usable_cpus": 2, "git": {"commit": "b5e3291eef99aa", "dirty": True}}
    new = {"cpu": "Xeon", "usable_cpus": 2, "git": {"commit": "6cf666752bc7bb", "dirty": False}}
    summary = {"machines": [old, new],
               "trained_on": [{"host": "vm", "cpu": "Xeon", "commit": "6cf666752bc7bb", "dirty": False, "runs": 12},
                              {"host": None, "cpu": None, "commit": None, "dirty": None, "runs": 88}]}
    assert report.machines_text(summary) == (
        "Xeon (host vm), commit 6cf666752bc7: 12 runs; unrecorded: 88 runs "
        "(study.json names AMD EPYC (2 CPUs), commit b5e3291eef99 (dirty tree))")
    summary["machines"] = [new]  # nothing else on record: only the count
    assert report.machines_text(summary).endswith("12 runs; unrecorded: 88 runs")


def test_the_stability_seed_is_a_study_setting_on_the_command_line(tmp_path, capsys):
    """--stability-seed sets the stability runs' training seed; giving it makes the study custom, and a resume with
    another value is refused like any other setting."""
    from train.sweep.__main__ import parse_args, study_settings

    cfg, _ = study_settings(parse_args(["--preset", "reduced", "--stability-seed", "7"]), tmp_path / "s")
    assert cfg.stability_seed == 7 and {s.seed for s in plan.stability_specs(cfg)} == {7}
    assert report.preset_label(cfg.to_dict()) == "custom: preset `reduced` with --stability-seed changed"
    with pytest.raises(SystemExit) as stop:
        main(["--preset", "reduced", "--stability-seed", "-1", "--dry-run", "--out", str(tmp_path / "t")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--stability-seed" in err[0]
