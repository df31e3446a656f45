"""The sweep's report step (hDV-1..4): a runtime.json that is not a regular file is damaged, not absent; every output
place is checked before anything is written, and a write that fails names its file; a repeated or foreign runtime
row is damaged; an ill-typed study.json names its field; a stop during --report-only says what it stopped."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_sweep import _recorded_study

from models import cli
from train.sweep import report, runner, runtime, study
from train.sweep.__main__ import PROG, main
from train.sweep.presets import make_config

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "results" / "paper-reduced"
PAIR = ("vit_c_nano", "vit_p_nano")  # the reduced preset's, which _recorded_study records
OUTPUTS = ("summary.json", "claims.md", *report.FIGURES)
# A resume of _recorded_study's study: every run has its result, so nothing trains.
RESUME = ["--preset", "reduced", "--epochs", "2", "--samples", "2", "--seeds", "0"]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _no_work(monkeypatch) -> None:
    """Guards: a refusal comes before any training or runtime measurement."""
    monkeypatch.setattr(runner, "run_all", lambda *a, **k: pytest.fail("a run was trained"))
    monkeypatch.setattr(runtime, "measure", lambda *a, **k: pytest.fail("the runtime was measured"))


def _earlier_report(out: Path) -> dict[str, bytes]:
    """An earlier report's files in `out` (what a refusal must leave as they are)."""
    files = {name: f"an earlier {name}\n".encode() for name in OUTPUTS}
    for name, data in files.items():
        (out / name).write_bytes(data)
    return files


def _not_regular(path: Path, kind: str) -> None:
    """Make `path` something other than a regular file."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "dangling link":
        path.symlink_to(path.parent / "nowhere.json")
    else:  # a link loop
        path.symlink_to(path.name)


def _committed_runtime() -> dict:
    return json.loads((COMMITTED / report.RUNTIME_FILE).read_text())


KINDS = ["fifo", "directory", "dangling link", "link loop"]


# ---------------------------------------------------------------- 1. runtime.json that is not a regular file


@pytest.mark.parametrize("kind", KINDS)
def test_report_only_refuses_a_runtime_file_that_is_not_a_regular_file(tmp_path, capsys, kind):
    """It was read as "no runtime.json (the study stopped before its runtime step)": the verdict went from yes to
    not run, summary.json lost the measurement, exit 0."""
    out, _ = _recorded_study(tmp_path)
    _not_regular(out / report.RUNTIME_FILE, kind)
    assert main(["--out", str(out), "--report-only"]) == 2
    err = _one_line_error(capsys)
    assert str(out / report.RUNTIME_FILE) in err and "not a regular file" in err, err
    assert not any((out / name).exists() for name in OUTPUTS)


@pytest.mark.parametrize("kind", KINDS)
def test_a_resumed_study_refuses_a_runtime_file_that_is_not_a_regular_file_before_measuring(tmp_path, capsys,
                                                                                             monkeypatch, kind):
    """A resume measured again (minutes), then crashed renaming its file onto the directory."""
    _no_work(monkeypatch)
    out, _ = _recorded_study(tmp_path)
    _not_regular(out / report.RUNTIME_FILE, kind)
    with pytest.raises(runner.DamagedResult, match="not a regular file") as info:
        study.measure_runtime(make_config("reduced"), out, [])
    assert str(out / report.RUNTIME_FILE) in str(info.value)
    assert main([*RESUME, "--out", str(out), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = _one_line_error(capsys)
    assert str(out / report.RUNTIME_FILE) in err and "not a regular file" in err, err
    assert not any((out / name).exists() for name in OUTPUTS)


def test_a_runtime_file_linked_to_a_regular_file_is_still_read(tmp_path, capsys):
    out, _ = _recorded_study(tmp_path)
    (tmp_path / "kept.json").write_bytes((COMMITTED / report.RUNTIME_FILE).read_bytes())
    (out / report.RUNTIME_FILE).symlink_to(tmp_path / "kept.json")
    assert main(["--out", str(out), "--report-only"]) == 0, capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["runtime"] == _committed_runtime()


# ---------------------------------------------------------------- 2. output places, and a write that fails


@pytest.mark.parametrize("victim", OUTPUTS)
@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_report_only_refuses_an_output_that_is_not_a_regular_file_before_writing(tmp_path, capsys, victim, kind):
    """A directory ended in IsADirectoryError's traceback (exit 1) after the other figures had been replaced."""
    out, _ = _recorded_study(tmp_path)
    before = _earlier_report(out)
    (out / victim).unlink()
    _not_regular(out / victim, kind)
    assert main(["--out", str(out), "--report-only"]) == 2
    err = _one_line_error(capsys)
    assert str(out / victim) in err and "not a regular file" in err and "nothing was changed" in err, err
    assert {n: (out / n).read_bytes() for n in OUTPUTS if n != victim} == {n: before[n] for n in OUTPUTS
                                                                            if n != victim}
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_study_run_refuses_an_output_that_is_a_directory_before_any_work(tmp_path, capsys, monkeypatch):
    """A study trained (and measured its runtime) for hours, then crashed writing its report."""
    _no_work(monkeypatch)
    out, record = _recorded_study(tmp_path)
    (out / "claims.md").mkdir()
    assert main([*RESUME, "--out", str(out), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = _one_line_error(capsys)
    assert str(out / "claims.md") in err and "a directory" in err, err
    assert (out / "study.json").read_bytes() == record and not (out / report.RUNTIME_FILE).exists()


# In a child: the report is written under a file-size limit below a figure's size (SIGXFSZ ignored, as a shell's
# `ulimit -f` under a supervisor leaves it), so writing it fails with EFBIG, as a full disk fails with ENOSPC.
_LIMITED_REPORT = textwrap.dedent("""
    import resource, signal, sys
    from models import cli
    from train.sweep import plots, study  # noqa: F401 - loaded (and their caches written) before the limit
    from train.sweep.__main__ import main
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    cli.run(lambda: main(["--out", sys.argv[1], "--report-only"]), "python -m train.sweep")
""")


def test_a_report_write_that_fails_is_one_line_naming_the_file(tmp_path):
    """A full disk said only "error: No space left on device" (or a traceback), without the file."""
    out, _ = _recorded_study(tmp_path)
    before = _earlier_report(out)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _LIMITED_REPORT, str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(err) == 1, done.stderr[-3000:]
    assert err[0].startswith(f"{PROG}: error: File too large: {out / 'convergence.png'}"), err
    assert "Traceback" not in done.stderr
    # Each file is replaced atomically, summary.json last: the earlier one stays whole, no temporary is left.
    assert (out / "summary.json").read_bytes() == before["summary.json"]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


# In a private mount namespace (the mount is gone with it): the study directory bound read-only onto itself, its
# parent (where the sweep's lock lies) still writable; the report then, and its exit code and stderr as JSON.
_READ_ONLY_REPORT = textwrap.dedent("""
    import json, subprocess, sys
    out = sys.argv[1]
    subprocess.run(["mount", "--bind", out, out], check=True)
    subprocess.run(["mount", "-o", "remount,ro,bind", out], check=True)
    proc = subprocess.run([sys.executable, "-m", "train.sweep", "--out", out, "--report-only", "--threads", "1"],
                          capture_output=True, text=True)
    print(json.dumps({"rc": proc.returncode, "stderr": proc.stderr}))
""")


def test_report_only_refuses_a_study_directory_it_cannot_write_before_any_work(tmp_path):
    """It found out only at its first write (exit 1, "Read-only file system", no file named)."""
    (tmp_path / "study").mkdir()
    out, _ = _recorded_study(tmp_path / "study")
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "mount", "--bind", str(out), str(out)],
                                                     capture_output=True, timeout=30).returncode != 0:
        pytest.skip("no mount namespace here (unshare -rm) to make a read-only study directory in")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["unshare", "-rm", sys.executable, "-c", _READ_ONLY_REPORT, str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    err = got["stderr"].strip().splitlines()
    assert got["rc"] == 2 and len(err) == 1, got
    assert err[0] == f"{PROG}: error: {out} is not writable, the report cannot be written there; nothing was changed"


# ---------------------------------------------------------------- 3. repeated or foreign runtime rows


def test_a_repeated_runtime_row_is_damaged(tmp_path, capsys):
    """Two copies of the same setting were judged as two comparisons: "8 of 8 support" for the committed 4 of 4."""
    doc = _committed_runtime()
    doc["rows"] += doc["rows"][:1]
    problem = report.runtime_problem(doc, [PAIR])
    assert problem is not None and "row 5" in problem and "row 1" in problem, problem
    out, _ = _recorded_study(tmp_path)
    (out / report.RUNTIME_FILE).write_text(json.dumps(doc))
    assert main(["--out", str(out), "--report-only"]) == 2
    err = _one_line_error(capsys)
    assert str(out / report.RUNTIME_FILE) in err and "row 5" in err, err
    assert not (out / "claims.md").exists()


@pytest.mark.parametrize("pair", [list(reversed(PAIR)), ["vit_c_mini", "vit_p_mini"]])
def test_a_runtime_row_of_a_pair_the_study_does_not_compare_is_damaged(tmp_path, capsys, pair):
    """A reversed pair was shown in the runtime table with its judgement but silently left out of the claim."""
    doc = _committed_runtime()
    doc["rows"][2]["pair"] = pair
    problem = report.runtime_problem(doc, [PAIR])
    assert problem is not None and "row 3" in problem and " / ".join(pair) in problem, problem
    out, _ = _recorded_study(tmp_path)
    (out / report.RUNTIME_FILE).write_text(json.dumps(doc))
    assert main(["--out", str(out), "--report-only"]) == 2
    err = _one_line_error(capsys)
    assert str(out / report.RUNTIME_FILE) in err and "row 3" in err, err


def test_the_committed_runtime_rows_are_still_reported():
    assert report.runtime_problem(_committed_runtime(), [PAIR]) is None
    assert report.runtime_problem(_committed_runtime()) is None


# ---------------------------------------------------------------- 4. study.json's types, a stop in --report-only


@pytest.mark.parametrize("field,value,expected", [
    ("samples", "16", "samples must be an integer, got '16'"),
    ("stability_epochs", [2], "stability_epochs must be an integer"),
    ("sample_seed", "0", "sample_seed must be an integer"),
    ("stability_seed", True, "stability_seed must be an integer"),
    ("tuning", 5, "tuning must be a string"),
    ("metric", ["final"], "metric must be a string"),
])
def test_a_study_setting_of_the_wrong_type_is_named_with_its_type(tmp_path, capsys, field, value, expected):
    """`"samples": "16"` said "TypeError: '<' not supported between instances of 'str' and 'int'"."""
    out, _ = _recorded_study(tmp_path)
    doc = json.loads((out / "study.json").read_text())
    doc["config"][field] = value
    (out / "study.json").write_text(json.dumps(doc))
    assert main(["--out", str(out), "--report-only"]) == 2
    err = _one_line_error(capsys)
    assert f"{out / 'study.json'}: " in err and expected in err and "TypeError" not in err, err


@pytest.mark.parametrize("top,expected", [("[]", "a list"), ('"all"', "a string"), ("5", "a number"),
                                          ('{"study": "all"}', "no config"), ('{"config": {}}', "no study")])
def test_a_study_record_that_is_not_an_object_of_study_and_config_is_named(tmp_path, capsys, top, expected):
    """`[]` said "TypeError: list indices must be integers or slices, not str"."""
    out, _ = _recorded_study(tmp_path)
    (out / "study.json").write_text(top)
    assert main(["--out", str(out), "--report-only"]) == 2
    err = _one_line_error(capsys)
    assert f"{out / 'study.json'}: not a readable study record" in err and expected in err, err
    assert "TypeError" not in err and "KeyError" not in err, err


@pytest.fixture
def signals_restored() -> Iterator[None]:
    """The sweep and cli.run install SIGTERM and SIGHUP handlers of their own: put back the test session's."""
    kept = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in kept.items():
            signal.signal(s, handler)


@pytest.mark.parametrize("signum,code,word", [(signal.SIGTERM, 143, "terminated"),
                                              (signal.SIGINT, 130, "interrupted")])
def test_a_stop_during_report_only_does_not_speak_of_runs_to_resume(tmp_path, capsys, monkeypatch,
                                                                    signals_restored, signum, code, word):
    """It said "finished runs are kept; rerun the same command to resume", though --report-only trains nothing."""
    out, _ = _recorded_study(tmp_path)
    build = report.build_summary

    def stopped_while_building(*args, **kwargs):  # the signal itself, delivered while the report is being built
        os.kill(os.getpid(), signum)
        return build(*args, **kwargs)

    monkeypatch.setattr(report, "build_summary", stopped_while_building)
    with pytest.raises(SystemExit) as done:
        cli.run(lambda: main(["--out", str(out), "--report-only"]), PROG)
    assert done.value.code == code
    err = _one_line_error(capsys)
    assert err.startswith(f"{PROG}: {word}: ") and "report" in err, err
    assert "finished runs are kept" not in err and "resume" not in err, err


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("report_only", [True, False], ids=["report-only", "resume"])
def test_a_study_record_that_is_not_a_regular_file_is_damaged_not_absent(tmp_path, capsys, monkeypatch, kind,
                                                                         report_only):
    """A study.json that was a directory or a FIFO read as "no study.json": a resume started a new study onto it."""
    _no_work(monkeypatch)
    out, _ = _recorded_study(tmp_path)
    (out / "study.json").unlink()
    _not_regular(out / "study.json", kind)
    args = ["--report-only"] if report_only else [*RESUME, "--runs-dir", str(tmp_path / "runs")]
    assert main([*args, "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert str(out / "study.json") in err and "not a readable study record" in err, err
    assert any(why in err for why in ("regular file", "symbolic link")), err
