"""The paper-claims study refuses what would corrupt its numbers or its record: repeated list entries, ranges the
training CLI refuses, damaged run results, another study's directory; verdicts say when they cannot be judged."""

from __future__ import annotations

import errno
import json
import shlex
from pathlib import Path

import pytest
from test_sweep import _fake_result, _recorded_study

from train.sweep import analysis, claims, plan, plots, presets, runner
from train.sweep.__main__ import main, parse_args, report_conflicts, study_differences
from train.sweep.spec import RunSpec, train_args_text


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# ---------------------------------------------------------------- settings refused up front


@pytest.mark.parametrize("flags,said", [
    (["--seeds", "0,1,1"], "--seeds: 1 given more than once in '0,1,1'"),  # models.cli.int_list
    (["--seeds", "0,0"], "--seeds: 0 given more than once in '0,0'"),
    (["--optimizers", "adamw,sgd,sgd"], "--optimizers adamw,sgd,sgd: sgd is given twice"),
    (["--models", "vit_c_nano,vit_p_nano,vit_p_nano"], "vit_p_nano is given twice"),
    (["--epochs", "2,4,2"], "--epochs: 2 given more than once in '2,4,2'"),
    (["--optimizers", ""], "--optimizers: give at least one of adamw,sgd"),
    (["--optimizers", ","], "--optimizers: give at least one of adamw,sgd"),
    (["--lr-range", "adamw=1e-3,1e-2", "--lr-range", "adamw=1e-4,1e-2"], "--lr-range is given twice for adamw"),
])
def test_repeated_or_empty_list_settings_exit_2(tmp_path, capsys, flags, said):
    """A repeated entry is trained once but would be counted twice in seed means, EDFs and standard errors."""
    try:
        code = main(["--preset", "reduced", "--out", str(tmp_path / "s"), "--dry-run", *flags])
    except SystemExit as exc:  # a list flag's own repeat is argparse's refusal (models.cli.int_list)
        code = exc.code
    assert code == 2
    assert said in _one_line_error(capsys)


@pytest.mark.parametrize("flags,said", [
    (["--lr-range", "sgd=1e6,1e7"], "--lr-range sgd=1e+06,1e+07: --lr must be in (0.0, 100.0], got 1000000.0"),
    (["--lr-range", "sgd=10,200"], "--lr-range sgd=10,200: --lr must be in (0.0, 100.0], got 200.0"),
    (["--wd-range", "sgd=1,20"], "--wd-range sgd=1,20: --weight-decay must be in [0.0, 10.0], got 20.0"),
])
def test_ranges_the_training_cli_refuses_exit_2_before_anything_runs(tmp_path, capsys, monkeypatch, flags, said):
    """Otherwise the study fails (exit 1, a multi-line log tail) only when an out-of-range sample's turn comes."""
    monkeypatch.setattr(runner, "run_all", lambda *a, **k: pytest.fail("a study with a range it cannot train ran"))
    assert main(["--preset", "reduced", "--study", "stability", "--out", str(tmp_path / "s"), *flags]) == 2
    assert said in _one_line_error(capsys)
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------- damaged run results

SPEC = RunSpec("vit_c_nano", "animals", "adamw", 1e-3, 0.05, 2)


def _damaged(edit: str, spec: RunSpec = SPEC) -> str:
    good = _fake_result(spec, 20.0)
    if edit == "list":
        return json.dumps([good])
    if edit == "truncated":
        return json.dumps(good)[:40]
    if edit == "no wall_s":
        return json.dumps({**{k: v for k, v in good.items() if k != "wall_s"}, "curve": []})
    if edit == "string error":
        return json.dumps({**good, "final_val_error": "12.5"})
    if edit == "null curve":
        return json.dumps({**good, "curve": None})
    if edit == "curve of strings":
        return json.dumps({**good, "curve": ["x"]})
    if edit == "NaN val_images":
        return json.dumps({**good, "val_images": float("nan")})
    assert edit == "another spec"
    return json.dumps({**good, "spec": {**spec.to_dict(), "lr": 0.5}})


EDITS = ["list", "truncated", "no wall_s", "string error", "null curve", "curve of strings", "NaN val_images",
         "another spec"]


@pytest.mark.parametrize("edit", EDITS)
def test_a_damaged_result_is_not_finished_and_says_why(tmp_path, edit):
    """A resume trains such a run again instead of stopping with a traceback."""
    path = runner.result_path(tmp_path, SPEC)
    path.parent.mkdir(parents=True)
    path.write_text(_damaged(edit))
    assert not runner.is_done(tmp_path, SPEC) and runner.load_result(tmp_path, SPEC) is None
    (why,) = runner.damaged_results(tmp_path, [SPEC, SPEC])
    assert why.startswith(f"{path}: ") and "\n" not in why
    path.write_text(json.dumps(_fake_result(SPEC, 20.0)))  # a diverged run's NaN error is a result like any
    assert runner.is_done(tmp_path, SPEC) and runner.damaged_results(tmp_path, [SPEC]) == []


@pytest.mark.parametrize("edit", ["list", "no wall_s", "string error", "null curve"])
def test_report_only_names_a_damaged_result_and_writes_nothing(tmp_path, capsys, edit):
    out, _ = _recorded_study(tmp_path)
    victim = sorted((out / runner.RESULTS_DIR).iterdir())[0]
    victim.write_text(_damaged(edit, RunSpec.from_dict(json.loads(victim.read_text())["spec"])))
    assert main(["--out", str(out), "--report-only"]) == 2
    err = _one_line_error(capsys)
    assert f"damaged run result {victim}: " in err and "rerun the study" in err, err
    assert not (out / "summary.json").exists() and not (out / "claims.md").exists()


# ---------------------------------------------------------------- the study's record


def test_report_only_without_a_study_record_is_refused(tmp_path, capsys):
    """It used to report the `full` preset over another study's results and delete its figures."""
    out, _ = _recorded_study(tmp_path)
    (out / "study.json").unlink()
    (out / "convergence.png").write_bytes(b"\x89PNG the study's figure")
    assert main(["--out", str(out), "--report-only"]) == 2
    assert f"no study.json in {out}: not a study directory, or run the study first" in _one_line_error(capsys)
    assert (out / "convergence.png").read_bytes() == b"\x89PNG the study's figure"
    assert not (out / "summary.json").exists()


def test_train_args_are_shown_as_the_shell_reads_them_back():
    """The refusals showed them as a comma-joined token list, "--batch-size,32 (recorded --batch-size,64)", which
    no command takes back."""
    recorded = presets.make_config("reduced", train_args=("--batch-size", "64"))
    given = presets.make_config("reduced", train_args=("--batch-size", "32", "--train-subset", "1000"))
    assert study_differences((recorded, "all"), (given, "all")) == [
        "--train-args '--batch-size 32 --train-subset 1000' (recorded '--batch-size 64')"]
    args = parse_args(["--report-only", "--out", "s", "--train-args=--batch-size 32"])
    assert report_conflicts(recorded, "all", args) == ["--train-args '--batch-size 32' (recorded '--batch-size 64')"]
    assert train_args_text(()) == "''"  # none given: an empty word, not nothing
    odd = ("--hflip", "0.5", "--x", "it's a b")  # pasted back into a command, the same tokens arrive
    assert shlex.split(shlex.split(f"--train-args {train_args_text(odd)}")[1]) == list(odd)


def test_a_run_with_other_settings_never_overwrites_the_record(tmp_path, capsys, monkeypatch):
    out, record = _recorded_study(tmp_path)
    monkeypatch.setattr(runner, "run_all", lambda *a, **k: pytest.fail("trained into another study's directory"))
    # The recorded study is reduced with samples 2; this one forgot --preset and the overrides.
    assert main(["--out", str(out), "--runs-dir", str(tmp_path / "r")]) == 2
    err = _one_line_error(capsys)
    assert f"--out {out} holds another study" in err and "--preset full (recorded reduced)" in err, err
    assert "--samples 16 (recorded 2)" in err and "--models vit_c_mini,vit_p_mini (recorded" in err, err
    assert (out / "study.json").read_bytes() == record
    assert main(["--preset", "reduced", "--epochs", "2", "--samples", "2", "--seeds", "0", "--study", "stability",
                 "--out", str(out), "--dry-run"]) == 2
    assert "--study stability (recorded all)" in _one_line_error(capsys)


def _finished_runtime(pairs: list[tuple[str, str]]) -> str:
    """runtime.json as a finished study's runtime step leaves it on the CPU: one row per pair (as measure writes)."""
    rows = [{"pair": list(pair), "what": "train_step", "device": "cpu", "layout": "nchw", "compiled": False,
             "batch": 64, "ms_vit_c": 10.0, "ms_vit_p": 10.0, "ratio": 1.0, "round_ratios": [1.0] * 9, "rounds": 9,
             "steps_per_round": 25} for pair in pairs]
    return json.dumps({"rows": rows, "machine": {"cpu": "the runtime box"}})


def test_resuming_a_finished_study_keeps_who_trained_it(tmp_path, capsys, monkeypatch):
    out, record = _recorded_study(tmp_path)
    # Its runtime measured too: a resume that finds every pair measured on this kind of device measures nothing.
    measured = _finished_runtime(analysis.stem_pairs(list(presets.make_config("reduced").models)))
    (out / "runtime.json").write_text(measured)
    monkeypatch.setattr(runner, "run_all", lambda *a, **k: pytest.fail("nothing is left to train"))
    assert main(["--preset", "reduced", "--epochs", "2", "--samples", "2", "--seeds", "0", "--out", str(out),
                 "--runs-dir", str(tmp_path / "r"), "--workers", "3"]) == 0, capsys.readouterr().err
    assert (out / "study.json").read_bytes() == record
    assert (out / "runtime.json").read_text() == measured
    assert "trained on the training box" in (out / "claims.md").read_text()


# ---------------------------------------------------------------- verdicts


def _stab(c_errs: list[float], p_errs: list[float]) -> dict:
    """analysis.stability over constructed paired samples: ViT_C's i-th error and ViT_P's at the same (lr, wd)."""
    specs, errs = [], {}
    for i, (ec, ep) in enumerate(zip(c_errs, p_errs, strict=True)):
        for model, e in (("vit_c_nano", ec), ("vit_p_nano", ep)):
            s = RunSpec(model, "animals", "adamw", 1e-3 * (i + 1), 1e-2, 2)
            specs.append(s)
            errs[s] = e
    return analysis.stability(specs, errs)


def test_stability_with_too_few_untied_pairs_is_not_judged():
    """1/2**4 = 0.0625: four pairs cannot reach p < 0.05 however clear, so "no" would be a verdict by construction."""
    assert claims.min_sign_pairs(0.05) == 5
    four = claims.stability_claim(_stab([20, 21, 22, 23], [80, 81, 82, 83]), "vit_c_nano", "vit_p_nano")
    assert four["reproduced"] == "not judged" and four["comparisons"] == 2
    assert four["not_judged"] == ["AdamW lies left and tighter (4 untied pairs, the sign test needs 5)"]
    assert "C better in 4/4 pairs (not judged: too few samples, the sign test needs at least 5 untied pairs)" in \
        four["measured"]
    # Ties drop out of the sign test: five samples, one tied, is still too few.
    tied = claims.stability_claim(_stab([20, 21, 22, 23, 50], [80, 81, 82, 83, 50]), "vit_c_nano", "vit_p_nano")
    assert tied["reproduced"] == "not judged"
    five = claims.stability_claim(_stab([20, 20.1, 20.2, 20.3, 20.4], [40, 50, 60, 70, 80]), "vit_c_nano",
                                  "vit_p_nano")
    # Judged: the sign test supports "left"; five samples cannot resolve an IQR difference (a tie, not support).
    assert (five["supporting"], five["contradicting"], five["comparisons"]) == (1, 0, 2)
    assert five["reproduced"] == "partial"


def test_stability_judges_tighter_as_well_as_left():
    """C's EDF lies left of P's at every pair but is wider: the claim "tighter and left" holds only in part."""
    row = claims.stability_claim(_stab([10, 20, 30, 40, 50, 60], [61, 62, 63, 64, 65, 66]), "vit_c_nano",
                                 "vit_p_nano")
    assert (row["supporting"], row["contradicting"], row["comparisons"]) == (1, 1, 2)
    assert row["reproduced"] == "no" and ": C wider)" in row["measured"]
    cell = row["cells"][0]
    assert cell["iqr_vit_c"] > cell["iqr_vit_p"] and cell["tighter"] == "C wider" and cell["p_vit_c_better"] < 0.05


def _cell(mean: float, std: float = 0.5) -> dict:
    return {"mean": mean, "std": std, "n": 3}


@pytest.mark.parametrize("c_sgd,n_val,expected", [(10.2, 100_000, (2, 0, "yes")), (10.5, 1000, (1, 0, "partial")),
                                                   (20.0, 1000, (1, 1, "no"))])
def test_sgd_vs_adamw_judges_vit_c_s_own_gap(c_sgd, n_val, expected):
    """"ViT_C trains as well with SGD": C's own SGD-AdamW gap surely below the 1-point margin supports it, surely
    above it contradicts it, whatever P does; a gap that noise cannot place is a tie."""
    table = {"vit_c_x": {"adamw": {8: _cell(10.0, 0.1)}, "sgd": {8: _cell(c_sgd, 0.1)}},
             "vit_p_x": {"adamw": {8: _cell(10.0, 0.1)}, "sgd": {8: _cell(40.0, 0.1)}}}
    row = claims.optimizer_claim(analysis.optimizer_gaps(table), table, "vit_c_x", "vit_p_x", n_val)
    assert (row["supporting"], row["contradicting"], row["reproduced"]) == expected
    assert row["comparisons"] == 2


def test_the_rules_text_states_the_two_halves_and_the_sign_test_minimum():
    rules = " ".join(claims.__doc__.split())
    assert "fewer than 5 untied pairs (the sign test cannot reach p < 0.05 there) is not judged" in rules
    assert claims.min_sign_pairs(0.05) == 5
    assert "ViT_C's IQR minus ViT_P's, from 2000 bootstrap resamples" in rules and claims.BOOTSTRAP == 2000
    assert "ViT_C's own SGD-AdamW gap supports" in rules and "below 1 point" in rules
    assert claims.EQUIVALENCE_MARGIN == 1.0


# ---------------------------------------------------------------- figures


def test_a_figure_that_fails_to_write_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def full_disk(self, fname, *args, **kwargs):  # writes part of the image, then the disk is full
        if hasattr(fname, "write"):
            fname.write(b"\x89PNG partial")
        else:
            Path(fname).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    path = tmp_path / "convergence.png"
    path.write_bytes(b"\x89PNG the previous figure")
    monkeypatch.setattr(Figure, "savefig", full_disk)
    table = {"vit_c_nano": {"adamw": {2: {"mean": 20.0, "std": None, "n": 1}}}}
    with pytest.raises(OSError, match="No space left"):
        plots.plot_convergence(table, ["vit_c_nano"], 1000, path)
    assert path.read_bytes() == b"\x89PNG the previous figure"
    assert [p.name for p in tmp_path.iterdir()] == ["convergence.png"]  # no temp file left behind


def test_duplicates_are_refused_by_the_config_itself():
    with pytest.raises(ValueError, match="0 is given twice"):
        presets.make_config("reduced", seeds=(0, 0))
    assert plan.StudyConfig.from_dict(presets.make_config("reduced").to_dict()) == presets.make_config("reduced")


def test_a_training_does_not_outlive_a_killed_sweep(tmp_path):
    """kill -9 of the sweep left its trainings running in their own sessions (and holding their locks against the
    rerun): each now gets SIGTERM when the sweep dies (Linux's parent-death signal)."""
    import signal
    import subprocess
    import sys
    import time

    from serve.launch import REPO

    sweep = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "from train.sweep.runner import _stop_with_parent\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True,\n"
        "                     preexec_fn=_stop_with_parent)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(120)\n")], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        child = int(sweep.stdout.readline())
        sweep.send_signal(signal.SIGKILL)
        sweep.wait(timeout=30)

        def alive() -> bool:
            try:
                return Path(f"/proc/{child}/status").read_text().split("State:")[1].split()[0] not in ("Z", "X")
            except (FileNotFoundError, IndexError):
                return False
        deadline = time.monotonic() + 20
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(), "the training outlived the sweep"
    finally:
        sweep.kill()
        sweep.wait()


def test_runtime_is_measured_again_when_the_file_lacks_a_pair_or_this_device(tmp_path):
    """A runtime.json measured on the CPU stayed when the study was resumed on a GPU (and one for another pair hid
    the runtime claim): only a file holding every pair on this kind of device is kept."""
    from models.io import atomic_write_json
    from train.sweep.study import _measured

    path = tmp_path / "runtime.json"
    pair = ("vit_c_nano", "vit_p_nano")
    assert not _measured(path, [pair], "cpu")  # no file
    atomic_write_json(path, {"rows": [{"pair": list(pair), "device": "cpu", "ratio": 0.9}]})
    assert _measured(path, [pair], "cpu")
    assert not _measured(path, [pair], "cuda")
    assert not _measured(path, [pair, ("vit_c_mini", "vit_p_mini")], "cpu")
    path.write_text("{not json")
    assert not _measured(path, [pair], "cpu")


def test_sigterm_and_sighup_stop_a_sweep_as_terminated():
    """They took Ctrl-C's path but said "interrupted" and exited 130, where every other command says "terminated"
    and exits 143."""
    from models.cli import Terminated
    from train.sweep.__main__ import _interrupt

    with pytest.raises(Terminated):
        _interrupt(15, None)


def test_a_missing_train_extra_writes_nothing(tmp_path):
    """The extra was found missing only after --out had been created: an empty study directory was left behind."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['tqdm'] = None\n"  # tqdm not installed, as in a serve-only environment
            "from models import cli\nfrom train.sweep.__main__ import main\n"
            "cli.run(lambda: main(['--preset', 'reduced', '--out', 'study']), 'python -m train.sweep')")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and "tqdm is not installed" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []
