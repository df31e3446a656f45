"""The paper-study sweep's contract (hDF-1, hDH-1..5): --out is a study directory or nothing of the user's, a stop
never lets a training start unseen, run records and study.json with impossible or ill-typed fields are one-line
refusals before any file is replaced, --dry-run prints the commands as run, and the README's margin is the one the
study measured."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from test_sweep import _fake_result, _recorded_study

from models.cli import Terminated
from models.host import usable_cpus
from train.sweep import runner, study
from train.sweep.__main__ import main
from train.sweep.presets import make_config
from train.sweep.spec import RunSpec

ROOT = Path(__file__).resolve().parents[1]
SPEC = RunSpec("vit_c_nano", "animals", "adamw", 1e-3, 0.05, 2)
STUDY = ["--preset", "reduced", "--study", "stability", "--models", "vit_c_micro,vit_p_micro", "--samples", "1",
         "--optimizers", "adamw", "--stability-epochs", "1", "--workers", "1"]
OUTPUTS = ("summary.json", "claims.md", "convergence.png", "optimizer.png", "stability_edf.png",
           "stability_lr_wd.png")


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _no_training(monkeypatch) -> None:
    monkeypatch.setattr(runner, "run_all", lambda *a, **k: pytest.fail("a run was trained"))
    monkeypatch.setattr(study, "measure_runtime", lambda *a, **k: pytest.fail("the runtime was measured"))


# ---------------------------------------------------------------- hDF-1: --out is the sweep's or nothing


@pytest.mark.parametrize("dry_run", [False, True])
def test_an_out_holding_the_users_files_is_refused_untouched(tmp_path, capsys, monkeypatch, dry_run):
    """The sweep wrote its summary.json, claims.md, runtime.json and figures over the user's files of those names."""
    _no_training(monkeypatch)
    out = tmp_path / "mydocs"
    out.mkdir()
    mine = {"summary.json": b"my precious summary\n", "claims.md": b"my notes\n", "runtime.json": b"keep\n"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    argv = [*STUDY, "--out", str(out), "--runs-dir", str(tmp_path / "runs"), *(["--dry-run"] if dry_run else [])]
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert f"--out {out} is not empty (3 entries, e.g. 'claims.md') and is not a study directory" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == mine
    assert not (tmp_path / "runs").exists()


def test_an_export_bundle_is_not_filled_with_a_study(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    assert main([*STUDY, "--out", str(bundle), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "is not a study directory (no study.json)" in _one_line_error(capsys)
    assert [p.name for p in bundle.iterdir()] == ["manifest.json"]


def test_an_absent_empty_or_study_out_is_accepted(tmp_path, capsys):
    for out in (tmp_path / "absent", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        assert main([*STUDY, "--out", str(out), "--dry-run"]) == 0, capsys.readouterr().err
    (tmp_path / "study").mkdir()
    out, _ = _recorded_study(tmp_path / "study")
    assert main(["--preset", "reduced", "--epochs", "2", "--samples", "2", "--seeds", "0", "--out", str(out),
                 "--dry-run"]) == 0, capsys.readouterr().err


# ---------------------------------------------------------------- hDH-1: a stop while a training is forked


def test_a_stop_while_a_training_starts_stops_that_training_too(tmp_path, monkeypatch):
    """SIGTERM (or Ctrl-C) just as a training was forked: the sweep's stop took its snapshot of the running
    trainings before the new one was registered, missed it, and then waited for that whole run."""

    real_popen, real_terminate = subprocess.Popen, runner._terminate
    main_thread = threading.main_thread().ident
    stop_passed = threading.Event()
    started: list[subprocess.Popen] = []

    def terminate(*args, **kwargs):
        try:
            return real_terminate(*args, **kwargs)
        finally:
            stop_passed.set()

    def popen(cmd, *args, **kwargs):
        if list(cmd[1:3]) != ["-m", "train"]:
            return real_popen(cmd, *args, **kwargs)
        signal.pthread_kill(main_thread, signal.SIGTERM)  # `kill` of the sweep while this training is forked
        # The fork happens after the sweep's stop has gone by where the stop can go by (at most 2 s later); a sweep
        # whose stop waits for this start to be registered runs out the 2 s, which changes nothing there.
        stop_passed.wait(timeout=2)
        proc = real_popen(["sleep", "20"], *args, **kwargs)  # a training that would run on for 20 s
        started.append(proc)
        return proc

    monkeypatch.setattr(runner, "_terminate", terminate)
    monkeypatch.setattr(subprocess, "Popen", popen)
    _stopped_sweep(tmp_path, started, "the training being started was not stopped")
    assert not any((tmp_path / "study").glob("run-results/*.json"))


def test_a_stop_the_kernel_gives_a_worker_thread_stops_the_sweep(tmp_path, monkeypatch):
    """kill(2) of the sweep hands the signal to any of its threads: one that landed on the worker thread (forking
    the next training as the previous one's result appeared) only flagged it, and the main thread, asleep until a
    run failed or all had finished, trained every remaining run before it said "interrupted"."""

    real_popen = subprocess.Popen
    started: list[subprocess.Popen] = []

    def popen(cmd, *args, **kwargs):
        if list(cmd[1:3]) != ["-m", "train"]:
            return real_popen(cmd, *args, **kwargs)
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # delivered here, to the worker thread
        proc = real_popen(["sleep", "20"], *args, **kwargs)
        started.append(proc)
        return proc

    monkeypatch.setattr(subprocess, "Popen", popen)
    _stopped_sweep(tmp_path, started, "the sweep trained on")


def _stopped_sweep(tmp_path, started: list[subprocess.Popen], why: str) -> None:
    """Two runs through run_all, one slot, SIGTERM handled as the CLI does: it must end in Terminated with the one
    training started (the queued one never) ended by that SIGTERM."""
    from train.sweep.__main__ import _interrupt

    specs = [RunSpec("vit_c_micro", "digits", "adamw", 1e-3, 0.05, 1, seed) for seed in range(2)]
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with pytest.raises(Terminated):
            runner.run_all(specs, tmp_path / "study", tmp_path / "runs", runner.make_slots(1, threads=1))
        assert len(started) == 1 and started[0].poll() == -signal.SIGTERM, why
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc in started:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- hDH-2: impossible numbers in a run record


def _edited(**fields: object) -> dict:
    return {**_fake_result(SPEC, 20.0), **fields}


def _with_training(**training: object) -> dict:
    return _edited(training={"diverged": False, "final_val_top1": 0.8, "val_images": 1000, **training})


def _curve(**fields: object) -> list[dict]:
    return [{**rec, **fields} for rec in _fake_result(SPEC, 20.0)["curve"]]


@pytest.mark.parametrize("record,field", [
    (_edited(final_val_error=-50.0), "final_val_error"),
    (_edited(final_val_error=1e300), "final_val_error"),
    (_edited(final_val_error=100.5), "final_val_error"),
    (_edited(final_val_error=float("nan")), "final_val_error"),
    (_edited(final_val_error=float("inf")), "final_val_error"),
    (_edited(final_val_error=None), "final_val_error"),
    (_edited(final_val_error_ema=-1.0), "final_val_error_ema"),
    (_edited(wall_s=float("inf")), "wall_s"),
    (_edited(val_images=0), "val_images"),
    (_edited(val_images=True), "val_images"),
    (_edited(curve=_curve(epoch_time_s=float("nan"))), "epoch_time_s"),
    (_edited(curve=_curve(epoch_time_s=-5.0)), "epoch_time_s"),
    (_edited(curve=_curve(val_error=-3.0)), "val_error"),
    (_edited(curve=_curve(val_error=float("nan"))), "val_error"),
    (_edited(training="x"), "training"),
    (_with_training(diverged="yes"), "training.diverged"),
    (_with_training(final_val_top1=0.9), "final_val_error"),  # the trainer measured 10 %, the record says 20
    (_with_training(val_images=500), "val_images"),
])
def test_a_record_with_an_impossible_number_is_damaged(tmp_path, record, field):
    """-50 flipped two verdicts to yes, 1e300 printed a 300-digit number, and NaN/null/Infinity counted as 100 %
    without a word (the record's own curve and training summary said otherwise)."""
    problem = runner.result_problem(json.loads(json.dumps(record)), SPEC)
    assert problem is not None and field in problem, problem
    path = runner.result_path(tmp_path, SPEC)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))
    assert not runner.is_done(tmp_path, SPEC)  # a resume trains it again
    (why,) = runner.damaged_results(tmp_path, [SPEC])
    assert why.startswith(f"{path}: ") and "\n" not in why


@pytest.mark.parametrize("record", [
    _fake_result(SPEC, 20.0),
    _with_training(),
    _fake_result(SPEC, 0.0),
    _edited(final_val_error=100.0),
    # A run the trainer recorded as diverged counts as getting nothing right, whatever its error field says.
    {**_with_training(diverged=True, final_val_top1=0.0), "final_val_error": 100.0},
    _edited(final_val_error=float("nan"), training={"diverged": True}),
    _edited(final_val_error=None, training={"diverged": True}, curve=_curve(val_error=None)),
])
def test_a_plausible_or_diverged_record_is_a_result(record):
    assert runner.result_problem(json.loads(json.dumps(record)), SPEC) is None


def test_a_diverged_record_still_counts_as_getting_nothing_right():
    from train.sweep.analysis import MISSING_ERROR, run_error

    record = _edited(final_val_error=float("nan"), training={"diverged": True})
    assert run_error(record) == run_error(record, "best") == MISSING_ERROR


@pytest.mark.parametrize("value", [-50.0, float("nan"), None, 1e300])
def test_report_only_names_a_record_with_an_impossible_error(tmp_path, capsys, value):
    out, _ = _recorded_study(tmp_path)
    victim = sorted((out / runner.RESULTS_DIR).iterdir())[0]
    victim.write_text(json.dumps({**json.loads(victim.read_text()), "final_val_error": value}))
    assert main(["--out", str(out), "--report-only"]) == 2
    err = _one_line_error(capsys)
    assert f"damaged run result {victim}: final_val_error" in err, err
    assert not any((out / name).exists() for name in OUTPUTS)


# ---------------------------------------------------------------- hDH-3: ill-typed records are one line


@pytest.mark.parametrize("machine,field", [
    ("x", "machine"),
    (["x"], "machine"),
    ({"git": "abc"}, "machine.git"),
    ({"git": {"commit": 5}}, "machine.git.commit"),
    ({"git": {"dirty": "no"}}, "machine.git.dirty"),
    ({"host": ["a"]}, "machine.host"),
    ({"cpu": 5}, "machine.cpu"),
])
def test_a_record_with_an_ill_typed_machine_is_damaged(tmp_path, capsys, machine, field):
    """`"machine": "x"` passed as a result and every resume and report then died in trained_on's traceback."""
    assert field in (runner.result_problem(_edited(machine=machine), SPEC) or "")
    out, _ = _recorded_study(tmp_path)
    victim = sorted((out / runner.RESULTS_DIR).iterdir())[0]
    victim.write_text(json.dumps({**json.loads(victim.read_text()), "machine": machine}))
    spec = RunSpec.from_dict(json.loads(victim.read_text())["spec"])
    assert not runner.is_done(out, spec)  # a resume trains it again
    assert main(["--out", str(out), "--report-only"]) == 2
    assert f"damaged run result {victim}: {field}" in _one_line_error(capsys)
    assert not any((out / name).exists() for name in OUTPUTS)


def test_a_record_with_a_full_machine_is_a_result():
    machine = {"host": "vm", "cpu": "Xeon", "usable_cpus": 2, "git": {"commit": "ab" * 20, "dirty": False}}
    assert runner.result_problem(_edited(machine=machine), SPEC) is None
    assert runner.result_problem(_edited(machine=None), SPEC) is None
    assert runner.result_problem(_edited(machine={"git": None}), SPEC) is None


def _set(doc: dict, key: str, value: object) -> None:
    """Set `key` (config.<name> for a setting) in a study.json document."""
    if key.startswith("config."):
        doc["config"][key.removeprefix("config.")] = value
    else:
        doc[key] = value


@pytest.mark.parametrize("edits,field", [
    ({"machines": ["x"]}, "machines"),
    ({"machines": "abc"}, "machines"),
    ({"machines": {"a": 1}}, "machines"),
    ({"machines": [{"cpu": 5, "git": "zz"}]}, "machines[1].cpu"),
    ({"machines": [{"cpu": "c", "git": "zz"}]}, "machines[1].git"),
    ({"machine": "x"}, "machine"),
    ({"machine": {"git": "abc"}}, "machine.git"),
    ({"config.preset": ["reduced"]}, "preset"),
    ({"config.preset": {"a": 1}}, "preset"),
    ({"config.tuning": "recipe", "config.recipe_settings": {}}, "recipe_settings"),
    ({"config.recipe_settings": {"adamw": [1e-3], "sgd": [0.1, 5e-5]}}, "recipe_settings"),
    ({"config.recipe_settings": {"adamw": [-1.0, 0.05], "sgd": [0.1, 5e-5]}}, "recipe_settings"),
    ({"config.dataset": None}, "dataset"),
    ({"config.dataset": 5}, "dataset"),
    ({"config.dataset": ""}, "dataset"),
    ({"config.train_args": "ab"}, "train_args"),
    ({"config.train_args": [5]}, "train_args"),
    ({"config.models": "vit_c_nano"}, "models"),
    ({"config.models": [5, "vit_p_nano"]}, "models"),
    ({"config.epochs": ["2"]}, "epochs"),
    ({"config.lr_ranges": [1e-4, 3e-2]}, "lr_ranges"),
    ({"config.wd_ranges": {"adamw": 5}}, "wd_ranges"),
])
def test_an_ill_typed_study_record_is_one_line_naming_it_before_anything_is_written(tmp_path, capsys, monkeypatch,
                                                                                    edits, field):
    """Tracebacks (AttributeError, unhashable type, KeyError), some after write_report had replaced the figures,
    and two refusals that blamed --train-args, which nobody had given."""
    _no_training(monkeypatch)
    out, _ = _recorded_study(tmp_path)
    doc = json.loads((out / "study.json").read_text())
    for key, value in edits.items():
        _set(doc, key, value)
    (out / "study.json").write_text(json.dumps(doc))
    (out / "stability_edf.png").write_bytes(b"\x89PNG the study's figure")
    for argv in (["--out", str(out), "--report-only"],
                 ["--preset", "reduced", "--epochs", "2", "--samples", "2", "--seeds", "0", "--out", str(out),
                  "--runs-dir", str(tmp_path / "runs")]):
        assert main(argv) == 2
        err = _one_line_error(capsys)
        assert f"{out / 'study.json'}: " in err and field in err and "--train-args" not in err, err
        assert not any((out / name).exists() for name in OUTPUTS if name != "stability_edf.png")
        assert (out / "stability_edf.png").read_bytes() == b"\x89PNG the study's figure"


# ---------------------------------------------------------------- hDH-4: --dry-run prints the commands as run


@pytest.mark.parametrize("threads", [["--threads", "3"], []])
def test_dry_run_prints_the_commands_the_runs_are_started_with(tmp_path, capsys, threads):
    """Its commands lacked `--threads N`, which every run's command (and its record) has."""
    assert main([*STUDY, *threads, "--out", str(tmp_path / "s"), "--runs-dir", str(tmp_path / "r"),
                 "--dry-run"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("todo ")]
    n = int(threads[1]) if threads else max(1, usable_cpus())
    cfg = make_config("reduced", models=("vit_c_micro", "vit_p_micro"), samples=1, optimizers=("adamw",),
                      stability_epochs=1)
    specs = study.plan_study(cfg, "stability", tmp_path / "s")[0]
    expected = [f"todo {shlex.join(runner.build_command(s, tmp_path / 'r' / s.run_id, n))}" for s in specs]
    assert lines == expected and all(f"--threads {n} --out" in ln for ln in lines)


def test_dry_run_commands_paste_into_a_shell_where_paths_hold_spaces(tmp_path, capsys):
    """They were joined with spaces: `--out /x/sw dir/runs/...` ran as `--out /x/sw` and a stray argument."""
    runs = tmp_path / "sw dir" / "ru ns"
    assert main([*STUDY, "--out", str(tmp_path / "st udy"), "--runs-dir", str(runs), "--dry-run"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("todo ")]
    assert lines
    for line in lines:
        argv = shlex.split(line.removeprefix("todo "))
        assert argv[argv.index("--out") + 1].startswith(str(runs) + "/"), line


# ---------------------------------------------------------------- hDH-5: the README's smallest margin


def test_the_readme_names_the_convergence_claims_smallest_margin():
    """It named SGD 2 ep (+15.6 against ±9.2, 6.4 clear), the smallest under neither measure: AdamW 8 ep is the
    closest to its interval (+7.8 against ±1.9, 5.9 clear)."""
    readme = (ROOT / "README.md").read_text()
    row = next(ln for ln in readme.splitlines() if ln.startswith("| Faster convergence |"))
    said = re.search(r"smallest margin beyond its 95 % interval, (AdamW|SGD) (\d+) ep, \+([\d.]+) ± ([\d.]+) "
                     r"against 95 % ±([\d.]+), ([\d.]+) points clear", row)
    assert said, row
    summary = json.loads((ROOT / "results" / "paper-reduced" / "summary.json").read_text())
    cells = next(c for c in summary["claims"] if c["claim"] == "convergence")["cells"]
    smallest = min(cells, key=lambda c: c["advantage"] - c["half_width"])
    assert said.groups() == ({"adamw": "AdamW", "sgd": "SGD"}[smallest["optimizer"]], str(smallest["epochs"]),
                             f"{smallest['advantage']:.1f}", f"{smallest['se']:.1f}", f"{smallest['half_width']:.1f}",
                             f"{smallest['advantage'] - smallest['half_width']:.1f}")
