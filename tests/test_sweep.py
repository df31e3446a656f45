"""The paper-claims study: sampling, run ids, EDF on hand-checkable numbers, claim rules, resume, report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from models import complexity, get_config
from models.io import atomic_write_json
from train.sweep import claims, edf, plan, presets, sampling
from train.sweep.spec import RunSpec

# ---------------------------------------------------------------- sampling


def test_log_uniform_is_reproducible_by_seed_and_in_range():
    a = sampling.log_uniform(np.random.default_rng(7), 1e-4, 1e-2, 50)
    b = sampling.log_uniform(np.random.default_rng(7), 1e-4, 1e-2, 50)
    c = sampling.log_uniform(np.random.default_rng(8), 1e-4, 1e-2, 50)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert a.min() >= 1e-4 and a.max() <= 1e-2


def test_log_uniform_is_uniform_in_log_space():
    x = np.log10(sampling.log_uniform(np.random.default_rng(0), 1e-5, 1e-1, 20000))
    # Each of the 4 decades holds a quarter of the samples (a linear-uniform sampler would put ~90 % in the last).
    counts = np.histogram(x, bins=[-5, -4, -3, -2, -1])[0] / x.size
    np.testing.assert_allclose(counts, 0.25, atol=0.02)
    assert abs(x.mean() - (-3.0)) < 0.03


@pytest.mark.parametrize("low,high", [(0.0, 1.0), (1e-2, 1e-3), (-1.0, 1.0), (1e-3, math.inf)])
def test_log_uniform_rejects_bad_ranges(low, high):
    with pytest.raises(ValueError, match="log-uniform range"):
        sampling.log_uniform(np.random.default_rng(0), low, high, 3)


def test_sample_lr_wd_reproducible_rounded_and_independent():
    pairs = sampling.sample_lr_wd(16, (1e-4, 1e-2), (1e-3, 1.0), seed=3)
    assert pairs == sampling.sample_lr_wd(16, (1e-4, 1e-2), (1e-3, 1.0), seed=3)
    assert pairs != sampling.sample_lr_wd(16, (1e-4, 1e-2), (1e-3, 1.0), seed=4)
    assert len(pairs) == 16 and len(set(pairs)) == 16
    for lr, wd in pairs:
        # Rounded to 3 significant digits, still inside the (slightly widened by rounding) range.
        assert lr == float(f"{lr:.3g}") and wd == float(f"{wd:.3g}")
        assert 1e-4 * 0.995 <= lr <= 1e-2 * 1.005 and 1e-3 * 0.995 <= wd <= 1.005


@pytest.mark.parametrize("preset", sorted(presets.PRESETS))
def test_every_preset_trains_a_pair_at_flops_parity(preset):
    """Otherwise the convergence and peak claims, stated at equal flops, would print "not judged"."""
    c, p = (complexity(get_config(m)).flops for m in presets.make_config(preset).models)
    assert claims.flops_parity(c / p)


def test_stability_plan_shares_samples_across_models_and_meets_default_count():
    cfg = presets.make_config("full")
    specs = plan.stability_specs(cfg)
    assert cfg.samples >= 16
    for opt in cfg.optimizers:
        per_model = {
            m: [(s.lr, s.weight_decay) for s in specs if s.model == m and s.optimizer == opt] for m in cfg.models
        }
        lists = list(per_model.values())
        assert all(len(v) == cfg.samples for v in lists)
        assert all(v == lists[0] for v in lists)  # paired: every model trains the same (lr, wd)
        lo, hi = cfg.lr_ranges[opt]
        assert all(lo * 0.995 <= lr <= hi * 1.005 for lr, _ in lists[0])
    # Adding a model does not change the samples the others get.
    bigger = presets.make_config("full", models=(*cfg.models, "vit_c_micro"))
    assert set(plan.stability_specs(cfg)) <= set(plan.stability_specs(bigger))


# ---------------------------------------------------------------- run ids


def test_run_id_is_stable_and_covers_every_parameter():
    spec = RunSpec("vit_c_mini", "animals", "sgd", 0.1, 5e-5, 10, 0, ("--batch-size", "64"))
    assert spec.run_id == RunSpec.from_dict(spec.to_dict()).run_id
    # Golden value: changing how ids are derived would orphan every finished run of existing studies.
    assert spec.run_id == "vit_c_mini-sgd-e10-lr0.1-wd5e-05-s0-1e7818e820"
    variants = [
        RunSpec("vit_p_mini", "animals", "sgd", 0.1, 5e-5, 10, 0, ("--batch-size", "64")),
        RunSpec("vit_c_mini", "mnist", "sgd", 0.1, 5e-5, 10, 0, ("--batch-size", "64")),
        RunSpec("vit_c_mini", "animals", "adamw", 0.1, 5e-5, 10, 0, ("--batch-size", "64")),
        RunSpec("vit_c_mini", "animals", "sgd", 0.2, 5e-5, 10, 0, ("--batch-size", "64")),
        RunSpec("vit_c_mini", "animals", "sgd", 0.1, 6e-5, 10, 0, ("--batch-size", "64")),
        RunSpec("vit_c_mini", "animals", "sgd", 0.1, 5e-5, 11, 0, ("--batch-size", "64")),
        RunSpec("vit_c_mini", "animals", "sgd", 0.1, 5e-5, 10, 1, ("--batch-size", "64")),
        RunSpec("vit_c_mini", "animals", "sgd", 0.1, 5e-5, 10, 0, ("--batch-size", "32")),
    ]
    ids = {v.run_id for v in variants} | {spec.run_id}
    assert len(ids) == len(variants) + 1


def test_run_spec_rejects_bad_parameters():
    with pytest.raises(ValueError, match="unknown optimizer"):
        RunSpec("vit_c_mini", "animals", "lamb", 0.1, 0.0, 1)
    with pytest.raises(ValueError, match="invalid run parameters"):
        RunSpec("vit_c_mini", "animals", "sgd", -0.1, 0.0, 1)


# ---------------------------------------------------------------- EDF


ERRS = [30.0, 10.0, 20.0, 50.0, 20.0]  # sorted: 10, 20, 20, 30, 50


@pytest.mark.parametrize(
    "e,expected",
    [(5, 0.0), (10, 0.0), (10.5, 0.2), (20, 0.2), (20.001, 0.6), (30, 0.6), (31, 0.8), (50, 0.8), (50.1, 1.0)],
)
def test_edf_counts_errors_strictly_below_e(e, expected):
    assert edf.edf(ERRS, e) == pytest.approx(expected)


def test_edf_vectorised_and_curve_steps():
    np.testing.assert_allclose(edf.edf(ERRS, [0, 15, 25, 100]), [0.0, 0.2, 0.6, 1.0])
    xs, ys = edf.edf_curve(ERRS)
    np.testing.assert_array_equal(xs, [10, 20, 20, 30, 50])
    np.testing.assert_allclose(ys, [0.2, 0.4, 0.6, 0.8, 1.0])
    with pytest.raises(ValueError, match="empty"):
        edf.edf([], 1.0)


def test_edf_stats_by_hand():
    st = edf.edf_stats(ERRS, good_margin=15.0)
    assert st["n"] == 5 and st["min"] == 10 and st["max"] == 50
    assert st["median"] == 20 and st["q25"] == 20 and st["q75"] == 30 and st["iqr"] == 10
    assert st["mean"] == pytest.approx(26.0)
    assert st["frac_good"] == pytest.approx(0.6)  # errors below 10 + 15 = 25: 10, 20, 20
    shared = edf.edf_stats(ERRS, good_margin=15.0, best=0.0)  # a better population sets the bar at 0
    assert shared["frac_good"] == pytest.approx(0.2)


# ---------------------------------------------------------------- claim rules


def test_sign_test_and_standard_errors_by_hand():
    # P(X >= 12), X ~ Bin(16, 1/2) = (1820 + 560 + 120 + 16 + 1) / 65536
    assert claims.sign_test_p(12, 16) == pytest.approx(2517 / 65536)
    assert claims.sign_test_p(0, 16) == pytest.approx(1.0)
    assert claims.se_error(20.0, 1000) == pytest.approx(100 * math.sqrt(0.2 * 0.8 / 1000))
    one_seed = {"mean": 20.0, "std": None, "n": 1}  # no seed spread: the binomial noise of each side
    assert claims.welch([one_seed, one_seed], 1000)[0] == pytest.approx(math.sqrt(2) * claims.se_error(20.0, 1000))


@pytest.mark.parametrize(
    "sup,con,total,expected",
    [(4, 0, 4, "yes"), (3, 0, 3, "yes"), (2, 0, 3, "partial"),  # 2 support + 1 tie is partial, not yes
     (1, 0, 4, "partial"), (2, 1, 4, "partial"), (0, 0, 4, "inconclusive"), (1, 1, 4, "no"), (1, 2, 4, "no"),
     (0, 3, 3, "no"), (0, 0, 0, "not run")],
)
def test_verdict_rules(sup, con, total, expected):
    assert claims.verdict(sup, con, total) == expected


def test_the_rules_text_is_the_one_the_code_applies():
    # The report prints the module's rules; they name the thresholds the code uses.
    rules = " ".join(claims.__doc__.split())
    assert "two-sided 95 % interval" in rules and "Welch's degrees of freedom" in rules and claims.LEVEL == 0.95
    assert "within 3 %" in rules and claims.FLOPS_PARITY == 0.03
    assert "wholly within 0.95..1.05 supports parity" in rules and claims.RUNTIME_PARITY == 0.05
    assert '"yes" when every comparison supports it' in rules


def _table(c: dict, p: dict) -> dict:
    return {"vit_c_x": {"adamw": c}, "vit_p_x": {"adamw": p}}


def test_claims_at_equal_flops_are_not_judged_off_parity():
    table = _table({4: {"mean": 20.0, "std": 0.5, "n": 3}}, {4: {"mean": 30.0, "std": 0.5, "n": 3}})
    judged = claims.convergence_claim(table, "vit_c_x", "vit_p_x", 1000, flops_ratio=1.007)
    # AdamW only: the claim's SGD half is not judged, and named.
    assert judged["reproduced"] == "partial" and judged["flops_ratio"] == pytest.approx(1.007)
    assert judged["not_judged"] == ["SGD (no results)"]
    off = claims.convergence_claim(table, "vit_c_x", "vit_p_x", 1000, flops_ratio=0.83)
    assert off["reproduced"] == "not judged" and off["supporting"] == 1  # the numbers are kept, not judged
    comp = {"vit_c_x": {"flops": 83}, "vit_p_x": {"flops": 100}}
    assert claims.peak_claim(table, "vit_c_x", "vit_p_x", 1000, comp, {})["reproduced"] == "not judged"
    comp["vit_c_x"]["flops"] = 102
    # 10 points: ViT_C lower in direction, beyond the paper's 1-2 in magnitude
    peak = claims.peak_claim(table, "vit_c_x", "vit_p_x", 1000, comp, {})
    assert peak["reproduced"] == "yes in direction; magnitude differs"


def test_seed_variance_turns_a_difference_into_a_tie():
    # 3 points apart: beyond the 95 % interval of the val set alone (n=3 seeds, ~0.9 each), within that of noisy
    # seeds (t at Welch's 4 degrees of freedom).
    steady = _table({4: {"mean": 20.0, "std": 0.2, "n": 3}}, {4: {"mean": 23.0, "std": 0.2, "n": 3}})
    noisy = _table({4: {"mean": 20.0, "std": 4.0, "n": 3}}, {4: {"mean": 23.0, "std": 4.0, "n": 3}})
    assert claims.convergence_claim(steady, "vit_c_x", "vit_p_x", 2000)["supporting"] == 1
    row = claims.convergence_claim(noisy, "vit_c_x", "vit_p_x", 2000)
    assert (row["supporting"], row["contradicting"], row["reproduced"]) == (0, 0, "inconclusive")
    assert claims.se_cell({"mean": 20.0, "std": 4.0, "n": 4}, 2000) == pytest.approx(2.0)
    # One seed: the val set's binomial noise only.
    assert claims.se_cell({"mean": 20.0, "std": None, "n": 1}, 1000) == pytest.approx(claims.se_error(20.0, 1000))


def _rt(what: str, layout: str, ratios: list[float]) -> dict:
    return {"what": what, "device": "cpu", "layout": layout, "compiled": False, "ratio": float(np.median(ratios)),
            "round_ratios": ratios}


def test_runtime_claim_counts_each_measured_setting():
    rows = [_rt("train_step", "nchw", [1.00, 1.01, 1.02, 1.02, 1.03, 1.01, 1.00, 1.02, 1.01]),
            _rt("inference", "nchw", [0.88, 0.90, 0.91, 0.89, 0.90, 0.92, 0.90, 0.91, 0.89]),
            _rt("inference", "channels_last", [1.10, 1.12, 1.13, 1.11, 1.12, 1.14, 1.12, 1.11, 1.13])]
    row = claims.runtime_claim(rows, flops_ratio=1.007)
    # Two-sided: 0.89..0.91 is "C faster", no parity.
    assert (row["supporting"], row["contradicting"], row["reproduced"]) == (1, 2, "no")
    assert "C/P 1.12 (95 % 1.11..1.13) C slower" in row["measured"] and row["flops_ratio"] == pytest.approx(1.007)
    assert "C/P 0.90 (95 % 0.89..0.91) C faster" in row["measured"]
    assert claims.runtime_claim(rows[:1], 1.007)["reproduced"] == "yes"
    assert claims.runtime_claim([], 1.007)["reproduced"] == "not run"


def test_convergence_claim_counts_only_differences_beyond_noise():
    table = {
        "vit_c_mini": {"adamw": {5: {"mean": 20.0}, 10: {"mean": 15.0}}, "sgd": {5: {"mean": 30.0}}},
        "vit_p_mini": {"adamw": {5: {"mean": 30.0}, 10: {"mean": 15.5}}, "sgd": {5: {"mean": 25.0}}},
    }
    row = claims.convergence_claim(table, "vit_c_mini", "vit_p_mini", n_val=1000)
    # 10 points (support), 0.5 points (tie: 1.96 SE ~3.1), -5 points (contradicts: beyond 1.96 SE ~3.7); no seed
    # spread, so the normal quantile.
    assert (row["supporting"], row["contradicting"], row["comparisons"]) == (1, 1, 3)
    assert row["reproduced"] == "no"  # as many contradictions as supports


# ---------------------------------------------------------------- runner: resume skips finished runs (real training)

TINY = ("--device", "cpu", "--max-steps", "1", "--train-subset", "64", "--val-subset", "32", "--batch-size", "32")


def _tiny(seed: int, train_args: tuple[str, ...] = TINY) -> RunSpec:
    return RunSpec("vit_c_micro", "digits", "adamw", 1e-3, 0.05, 1, seed, train_args)


def test_run_all_trains_only_unfinished_runs_and_resume_skips_them(tmp_path):
    from train.sweep import runner

    study, runs = tmp_path / "study", tmp_path / "runs"
    done, todo = _tiny(0), _tiny(1)
    # A finished run from an earlier (interrupted) invocation: its result file exists.
    marker = {"id": done.run_id, "spec": done.to_dict(), "final_val_error": 12.5, "wall_s": 1.0, "curve": []}
    atomic_write_json(runner.result_path(study, done), marker)
    slots = runner.make_slots(1, threads=1)

    trained = runner.run_all([done, todo], study, runs, slots)

    assert trained == [todo]
    assert not (runs / done.run_id).exists()  # never started
    assert runner.load_result(study, done) == marker  # untouched
    res = runner.load_result(study, todo)
    assert res["id"] == todo.run_id and res["spec"] == todo.to_dict()
    assert res["command"][:3] == ["python", "-m", "train"] and "--resume" in res["command"]
    assert 0.0 <= res["final_val_error"] <= 100.0 and res["val_images"] == 32
    assert [r["epoch"] for r in res["curve"]] == [1]
    before = runner.result_path(study, todo).stat().st_mtime_ns

    assert runner.run_all([done, todo], study, runs, slots) == []  # resume: everything is finished
    assert runner.result_path(study, todo).stat().st_mtime_ns == before


def test_failed_training_writes_no_result(tmp_path):
    from train.sweep import runner

    bad = _tiny(0, ("--batch-size", "0"))  # the training CLI rejects it (exit 2)
    with pytest.raises(runner.RunFailed, match="exited 2"):
        runner.run_all([bad], tmp_path / "study", tmp_path / "runs", runner.make_slots(1, threads=1))
    assert not runner.result_path(tmp_path / "study", bad).exists()
    assert not runner.is_done(tmp_path / "study", bad)


def test_is_done_rejects_a_result_of_another_run(tmp_path):
    from train.sweep import runner

    a, b = _tiny(0), _tiny(1)
    atomic_write_json(runner.result_path(tmp_path, a), {"id": b.run_id})
    assert not runner.is_done(tmp_path, a)
    runner.result_path(tmp_path, b).write_text("{truncated")
    assert not runner.is_done(tmp_path, b)


def test_worker_slots_split_threads_and_deal_devices():
    from train.sweep import runner

    slots = runner.make_slots(4, devices=("0", "1"), threads=2)
    assert [s.device for s in slots] == ["0", "1", "0", "1"]
    env = slots[1].env()
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["OMP_NUM_THREADS"] == "2"
    cmd = runner.build_command(_tiny(0), Path("r"), threads=2)
    assert cmd[1:3] == ["-m", "train"] and cmd[cmd.index("--threads") + 1] == "2"
    with pytest.raises(ValueError, match="workers"):
        runner.make_slots(0)


# ---------------------------------------------------------------- report from finished runs (no training)


def _fake_result(spec: RunSpec, err: float, n_val: int = 1000) -> dict:
    curve = [{"epoch": e, "val_error": err + 2 * (spec.epochs - e), "val_error_ema": None, "epoch_time_s": 1.0}
             for e in range(1, spec.epochs + 1)]
    return {"id": spec.run_id, "spec": spec.to_dict(), "wall_s": 2.0, "final_val_error": err,
            "val_images": n_val, "curve": curve}


def test_report_from_results_reproduces_a_clear_cut_study(tmp_path):
    from train.sweep import runner, study

    cfg = presets.make_config("reduced", epochs=(2, 4), samples=16)
    conv, patch = cfg.models
    assert study.plan_study(cfg, "all", tmp_path)[1] == []  # nothing tuned before the stability runs exist

    def error(s: RunSpec) -> float:
        # ViT_C 10 points better at every sample, both get worse away from lr 1e-3 (AdamW) / 0.1 (SGD).
        centre = 1e-3 if s.optimizer == "adamw" else 0.1
        return min(95.0, 20.0 + 8 * abs(math.log10(s.lr / centre)) + (0 if s.model == conv else 10) - s.epochs)

    for s in plan.stability_specs(cfg):
        atomic_write_json(runner.result_path(tmp_path, s), _fake_result(s, error(s)))
    _, tuned_runs, tuned = study.plan_study(cfg, "all", tmp_path)
    assert len(tuned_runs) == 2 * 2 * 2 * len(cfg.seeds)
    assert set(tuned) == {(m, o) for m in cfg.models for o in cfg.optimizers}
    for s in tuned_runs:
        atomic_write_json(runner.result_path(tmp_path, s), _fake_result(s, error(s)))

    summary = study.run_study(cfg, "all", tmp_path, tmp_path / "runs-unused", [], report_only=True)

    verdicts = {r["claim"]: r["reproduced"] for r in summary["claims"]}
    assert verdicts["convergence"] == "yes" and verdicts["peak"] == "yes in direction; magnitude differs"
    # C lies left at every sample (the sign test supports it), but its errors are P's shifted by 10 points: equal
    # IQRs are a tie, not "tighter".
    assert verdicts["stability"] == "partial"
    # Identical SGD-AdamW gaps for both stems (-0.6 points): on 1,000 val images the gap's 95 % interval (+-2.0)
    # reaches past the 1-point margin, so "as well" is a tie, and "ViT_P loses markedly" is a tie too: every
    # comparison a tie reads as inconclusive, not as "no".
    opt_row = next(r for r in summary["claims"] if r["claim"] == "optimizer")
    assert (opt_row["supporting"], opt_row["contradicting"], opt_row["comparisons"]) == (0, 0, 4)
    assert verdicts["optimizer"] == "inconclusive"
    # No runtime.json: the runtime claim is there, "not run", and says why.
    rt_row = next(r for r in summary["claims"] if r["claim"] == "runtime")
    assert rt_row["reproduced"] == "not run" and "no runtime.json" in rt_row["measured"]
    stab = summary["stability"]["adamw"]
    assert stab[conv]["n"] == 16 and stab[conv]["median"] == pytest.approx(stab[patch]["median"] - 10)
    for name in ("summary.json", "claims.md", "convergence.png", "optimizer.png", "stability_edf.png",
                 "stability_lr_wd.png"):
        assert (tmp_path / name).stat().st_size > 0
    md = (tmp_path / "claims.md").read_text()
    assert "| Claim | Paper | Measured here (seed mean ± standard error) | Flops C/P | Reproduced |" in md
    assert "**yes**" in md and "| 1.007 |" in md  # the nano pair's flops ratio beside its verdicts
    assert "pair vit_c_nano / vit_p_nano, seeds 1, 2, 3" in md and "2 epochs each, seed 0;" in md
    # The tuned seeds are not the stability seed: no tuned run is a stability run, so no winner's curse to confess.
    assert not {s.run_id for s in tuned_runs} & {s.run_id for s in plan.stability_specs(cfg)}
    assert "Selection bias" not in md and summary["runs"]["planned"] == 64 + len(tuned_runs)
    assert not (tmp_path / "runs-unused").exists()  # report-only trains nothing


# ---------------------------------------------------------------- CLI


def test_cli_bad_settings_exit_2_with_one_line(capsys):
    from train.sweep.__main__ import main

    assert main(["--models", "vit_c_nope,vit_p_mini", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown model 'vit_c_nope'" in err[0]
    with pytest.raises(SystemExit) as exc:  # refused as it is read, as --samples 0 is
        main(["--epochs", "0", "--dry-run"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("argument --epochs: expected integers in 1..100000, got '0'"), err


def test_cli_dry_run_prints_per_run_commands(tmp_path, capsys):
    from train.sweep.__main__ import main

    assert main(["--preset", "reduced", "--study", "stability", "--samples", "3", "--out", str(tmp_path / "s"),
                 "--dry-run"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("todo")]
    assert len(lines) == 3 * 2 * 2 and all(" -m train --model vit_" in ln for ln in lines)
    assert not (tmp_path / "s").exists()


def test_runtime_measures_both_layouts_for_training_and_inference():
    from train.sweep import runtime

    rows = runtime.measure("vit_c_nano", "vit_p_nano", "cpu", batch=4, rounds=2, target_s=0.005)
    assert [(r["what"], r["layout"], r["compiled"]) for r in rows] == [
        ("train_step", "nchw", False), ("train_step", "channels_last", False),
        ("inference", "nchw", False), ("inference", "channels_last", False)]
    for r in rows:
        # Timings only: a loaded machine can skew a 5 ms measurement by any factor (speed is for benchmarks).
        assert r["ms_vit_c"] > 0 and r["ms_vit_p"] > 0 and math.isfinite(r["ratio"]) and r["ratio"] > 0
        assert r["rounds"] == 2
    assert runtime.main(["--models", "vit_c_nano,vit_nope"]) == 2



# ---------------------------------------------------------------- --report-only: the recorded study


def _recorded_study(tmp_path: Path, study_name: str = "all") -> tuple[Path, bytes]:
    """A study directory as a finished small study leaves it: study.json and every run's result."""
    from train.sweep import runner, study

    cfg = presets.make_config("reduced", epochs=(2,), samples=2, seeds=(0,))
    record = json.dumps({"study": study_name, "config": cfg.to_dict(), "machine": {"cpu": "the training box"},
                         "workers": 2}).encode()
    (tmp_path / "study.json").write_bytes(record)
    for s in plan.stability_specs(cfg):
        atomic_write_json(runner.result_path(tmp_path, s), _fake_result(s, 30.0 if s.model == cfg.models[0] else 40))
    for s in study.plan_study(cfg, study_name, tmp_path)[1]:
        atomic_write_json(runner.result_path(tmp_path, s), _fake_result(s, 20.0))
    return tmp_path, record


def test_report_only_reports_the_recorded_study_and_never_rewrites_its_record(tmp_path, capsys):
    from train.sweep.__main__ import main

    out, record = _recorded_study(tmp_path)
    assert main(["--out", str(out), "--report-only"]) == 0, capsys.readouterr().err
    assert (out / "study.json").read_bytes() == record
    md = (out / "claims.md").read_text()
    assert "preset `reduced`" in md and "Runs: 8/8 finished" in md and "the training box" in md, md
    # A study setting that agrees with the record is accepted; one that does not is named, and nothing is written.
    assert main(["--out", str(out), "--report-only", "--samples", "2", "--preset", "reduced"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["--out", str(out), "--report-only", "--samples", "3", "--models", "vit_c_micro,vit_p_micro"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--models vit_c_micro,vit_p_micro (recorded vit_c_nano,vit_p_nano)" in err[0], err
    assert "--samples 3 (recorded 2)" in err[0] and "study.json" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_report_only_removes_figures_it_no_longer_draws(tmp_path, capsys):
    from train.sweep.__main__ import main

    out, _ = _recorded_study(tmp_path, "stability")
    for stale in ("convergence.png", "optimizer.png"):
        (out / stale).write_bytes(b"\x89PNG\r\n\x1a\n an earlier study's figure")
    assert main(["--out", str(out), "--report-only"]) == 0, capsys.readouterr().err
    assert not (out / "convergence.png").exists() and not (out / "optimizer.png").exists()
    assert (out / "stability_edf.png").stat().st_size > 0
    assert "optimizer.png" not in (out / "claims.md").read_text()


def test_devices_that_cannot_train_are_one_line_before_anything_runs(tmp_path, capsys, monkeypatch):
    import torch

    from train.sweep.__main__ import main

    args = ["--preset", "reduced", "--study", "stability", "--samples", "1", "--out", str(tmp_path / "s"),
            "--runs-dir", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as exc:  # refused as argparse refuses a bad value
        main([*args, "--devices", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expected GPU indices 0 to 99 such as 0,1, got 'x'" in err[0], err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*args, "--devices", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--devices 0: GPU 0: CUDA is not available on this machine" in err[0], err
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists()


def test_a_diverged_run_counts_as_getting_nothing_right():
    """Its NaN logits' argmax scored one constant class (91.5 % error on 10 classes), so it could beat a finite
    worse-than-chance run in the paired sign test; under "best" it kept its best epoch before diverging."""
    from train.sweep.analysis import MISSING_ERROR, run_error

    curve = [{"epoch": 1, "val_error": 40.0, "val_error_ema": 41.0}, {"epoch": 2, "val_error": 91.5}]
    diverged = {"final_val_error": 91.5, "curve": curve, "training": {"diverged": True}}
    assert run_error(diverged) == run_error(diverged, "best") == MISSING_ERROR
    finished = {**diverged, "training": {"diverged": False}}
    assert (run_error(finished), run_error(finished, "best")) == (91.5, 40.0)


def test_a_partial_study_compares_peak_accuracy_at_one_schedule_length():
    """With ViT_C's 8-epoch runs missing, its 4-epoch error was compared with ViT_P's 8-epoch error (the verdict
    flipped): both stems are judged at the longest schedule they both have."""
    cell = {"std": 0.5, "n": 3}
    table = _table({2: {"mean": 40.0, **cell}, 4: {"mean": 19.7, **cell}},
                   {2: {"mean": 50.0, **cell}, 4: {"mean": 28.6, **cell}, 8: {"mean": 20.4, **cell}})
    comp = {"vit_c_x": {"flops": 100}, "vit_p_x": {"flops": 100}}
    row = claims.peak_claim(table, "vit_c_x", "vit_p_x", 1000, comp, {})
    assert row["cells"][0]["vit_c"] == 19.7 and row["cells"][0]["vit_p"] == 28.6
    assert "at 4 ep" in row["measured"] and row["reproduced"] == "yes in direction; magnitude differs"


def test_a_lost_stability_result_leaves_its_pair_untuned_not_silently_retuned(tmp_path):
    """Deleting ViT_C's AdamW winner re-tuned it to the best of the rest, orphaned its finished tuned runs and
    changed verdicts without a word: the pair now waits for the rerun, and the report names it."""
    from train.sweep import runner, study

    cfg = presets.make_config("reduced", epochs=(2, 4), samples=8)
    conv = cfg.models[0]
    specs = plan.stability_specs(cfg)
    for i, s in enumerate(specs):
        atomic_write_json(runner.result_path(tmp_path, s), _fake_result(s, 30.0 + i))
    tuned_before = study.plan_study(cfg, "all", tmp_path)[2]
    winner = next(s for s in specs if (s.model, s.optimizer) == (conv, "adamw")
                  and (s.lr, s.weight_decay) == tuned_before[(conv, "adamw")])
    runner.result_path(tmp_path, winner).unlink()
    _, tuned_runs, tuned = study.plan_study(cfg, "all", tmp_path)
    assert (conv, "adamw") not in tuned and all((s.model, s.optimizer) != (conv, "adamw") for s in tuned_runs)
    assert {k: v for k, v in tuned_before.items() if k != (conv, "adamw")} == tuned  # the others stay
    summary = study.run_study(cfg, "all", tmp_path, tmp_path / "runs-unused", [], report_only=True)
    assert summary["not_tuned"] == [f"{conv}/adamw"]
    overlap = cfg.stability_epochs in cfg.epochs and cfg.stability_seed in cfg.seeds  # False: fresh tuned seeds
    per_pair = len(cfg.epochs) * len(cfg.seeds) - overlap
    assert summary["runs"]["planned"] == len(specs) + len(tuned_runs) + per_pair - sum(
        s in specs for s in tuned_runs)
    assert f"Not tuned yet, a stability run without a result (rerun the study to train it): {conv}/adamw." in (
        tmp_path / "claims.md").read_text()
