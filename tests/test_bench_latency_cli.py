"""`benchmarks/latency.py` runs the code of the checkout it is in, refuses end-to-end flags without --http, and does
not exit 0 from a run that measured nothing or a load level in which nothing succeeded. Fast: the suite's slow
parts are stand-ins, the end-to-end mode drives a stand-in server in this process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from stand_in_http import StandInHandler, stand_in_server

import benchmarks.suite
from benchmarks.latency import main

LATENCY_ERROR = "python benchmarks/latency.py: error: "

REPO = Path(__file__).resolve().parents[1]
MINI = REPO / "tests" / "data" / "bench-results-mini.json"


def _must_not_run(*_args, **_kwargs):
    raise AssertionError("the benchmark ran")


# --- end-to-end flags without --http ---------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, flags", [
    (["--concurrency", "4"], "--concurrency applies"),
    (["--image-size", "0"], "--image-size applies"),  # not even range-checked: the whole suite ran, exit 0
    (["--rate", "5", "--model", "m"], "--model, --rate apply"),
    (["--duration", "1"], "--duration applies"),
    (["--bundle", "exports/x"], "--bundle applies"),
    (["--image-format", "png"], "--image-format applies"),  # given, even as its default
    (["--api-key", "k"], "--api-key applies"),
])
def test_end_to_end_flags_without_http_are_refused(argv, flags, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("benchmarks.suite.run_suite", _must_not_run)
    monkeypatch.setenv("VITC_API_KEY", "from-the-environment")  # a default, not a flag: never refused
    with pytest.raises(SystemExit) as exc:
        main(["--quick", *argv, "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{LATENCY_ERROR}{flags} to the end-to-end "
                                               "mode only: add --http URL"), err
    assert list(tmp_path.iterdir()) == []


# --- a run that measures nothing ------------------------------------------------------------------------------------

def test_no_target_that_can_run_here_is_one_line_and_exit_2_before_any_export(tmp_path, monkeypatch, capsys):
    """`--targets tensorrt-fp16` without TensorRT measured nothing, wrote empty reports and exited 0."""
    monkeypatch.setattr(benchmarks.suite, "unavailable_here", lambda t, **_kw: f"{t.runtime} is not installed",
                        raising=False)
    monkeypatch.setattr(benchmarks.suite, "unavailable", lambda t, *_a, **_kw: f"{t.runtime} is not installed")
    monkeypatch.setattr(benchmarks.suite, "measure_limits", lambda *_a: {"cpu": {"bf16": {"native": False}}})
    monkeypatch.setattr(benchmarks.suite.machine, "environment", lambda _threads: {  # seconds of library imports
        "host": "vm", "cpu": {"model": "cpu", "usable_cpus": 1, "flags": []}, "gpus": [], "load_average": [0.0] * 3})
    monkeypatch.setattr("benchmarks.bundles.prepare_model", _must_not_run)
    rc = main(["--quick", "--no-progress", "--targets", "tensorrt-fp16,tensorrt-int8", "--cache",
               str(tmp_path / "c"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1] == (LATENCY_ERROR + "nothing to measure: no target can run here (tensorrt-fp16, "
                                   "tensorrt-int8: tensorrt is not installed)"), err
    assert sum("error" in line for line in err) == 1
    assert not list((tmp_path / "o").glob("*")) if (tmp_path / "o").exists() else True


def test_a_run_in_which_every_target_failed_exits_1_and_writes_nothing(tmp_path, monkeypatch, capsys):
    doc = json.loads(MINI.read_text())
    doc.update(results=[], ratios=[], breakdown=[], cold_start=[],
               skipped=[{"pair": "mini", "target": "onnxruntime-fp32", "reason": "failed: out of luck"}])
    monkeypatch.setattr("benchmarks.suite.run_suite", lambda cfg, log=None: doc)
    rc = main(["--pairs", "mini", "--no-progress", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert rc == 1 and "skipped mini onnxruntime-fp32: failed: out of luck" in out
    assert err.strip().splitlines() == [LATENCY_ERROR + "nothing was measured: every target failed (listed above as "
                                        "skipped); nothing written"]
    assert list(tmp_path.iterdir()) == []


NO_TEMP = FileNotFoundError(2, "No usable temporary directory found in ['/nonexistent', '/tmp', '/var/tmp']")


def test_no_temporary_directory_is_found_before_the_work(tmp_path, monkeypatch):
    """The missing TMPDIR surfaced only at the first export, after the machine was measured."""
    import tempfile

    def no_dir() -> str:
        raise NO_TEMP

    monkeypatch.setattr(tempfile, "gettempdir", no_dir)
    monkeypatch.setattr("benchmarks.suite.run_suite", _must_not_run)
    with pytest.raises(FileNotFoundError, match="No usable temporary directory"):
        main(["--quick", "--no-progress", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")])


def test_no_temporary_directory_mid_run_is_left_for_the_tmpdir_line(tmp_path, monkeypatch, capsys):
    """The run turned it into its own InputError ('[Errno 2] No usable temporary directory ...'), so cli.run could
    not name TMPDIR."""
    from models.cli import run
    from models.io import NO_TEMP_DIR

    def run_suite(_cfg, log=None):
        raise NO_TEMP

    monkeypatch.setattr("benchmarks.suite.run_suite", run_suite)
    with pytest.raises(SystemExit) as info:
        run(lambda: main(["--quick", "--no-progress", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")]),
            "python benchmarks/latency.py")
    assert info.value.code == 2
    assert capsys.readouterr().err == f"{LATENCY_ERROR}{NO_TEMP_DIR}\n"


# --- end-to-end: a level where nothing succeeded ---------------------------------------------------------------------

_INFO = {"name": "m", "variant": "vit_c_micro", "runtime": "onnxruntime", "precision": "fp32", "device": "cpu",
         "max_batch": 8, "source": {"sha256": "x"}}


@contextmanager
def _failing_server() -> Iterator[str]:
    """A vitc-shaped server whose every classification answers HTTP 500."""

    class Handler(StandInHandler):
        def _send(self, status: int, body: object) -> None:
            self.send_body(json.dumps(body).encode(), status, {"Content-Type": "application/json"})

        def do_GET(self) -> None:  # noqa: N802
            self._send(200, {"models": [_INFO]} if self.path == "/v1/models" else _INFO)

        def do_POST(self) -> None:  # noqa: N802
            self.read_body()
            self._send(500, {"error": "boom"})

    with stand_in_server(Handler) as url:
        yield url


def test_an_end_to_end_run_where_nothing_succeeded_saves_its_results_then_exits_1(tmp_path, capsys):
    with _failing_server() as url:
        rc = main(["--http", url, "--quick", "--concurrency", "1", "--duration", "0.3", "--rate", "20", "--no-plots",
                   "--no-progress", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1, err
    assert err[-1].startswith(LATENCY_ERROR + "2 of 2 load levels failed: c=1: no request succeeded: "), err
    assert "x HTTP 500; Poisson: no request succeeded: " in err[-1]
    doc = json.loads(next(tmp_path.glob("*-http.json")).read_text())  # saved first: the errors are the finding
    assert doc["closed"][0]["problem"].startswith("no request succeeded: ") and doc["open"]["ok"] == 0
    assert list(tmp_path.glob("*-http.md"))


# --- which code runs -------------------------------------------------------------------------------------------------

_FAKE_CLI = """
InputError = WorkFailed = Exception  # what latency.py takes from models.cli when it loads


def command(prog):
    return lambda main: main


def machine_error(exc, hint=""):
    return None


def run(main, prog):
    import models
    print("models from", models.__file__)
    raise SystemExit(0)
"""


@pytest.mark.parametrize("safe_path", [False, True], ids=["default", "PYTHONSAFEPATH"])
def test_a_second_copy_run_as_a_script_uses_its_own_models(safe_path, tmp_path):
    """`python copy/benchmarks/latency.py` imported `models` from the installed checkout before its sys.path fix:
    the run mixed two source trees and recorded the other checkout's git commit."""
    copy = tmp_path / "copy"
    (copy / "benchmarks").mkdir(parents=True)
    (copy / "models").mkdir()
    shutil.copy(REPO / "benchmarks" / "latency.py", copy / "benchmarks" / "latency.py")
    (copy / "benchmarks" / "__init__.py").write_text("")
    (copy / "models" / "__init__.py").write_text("")
    (copy / "models" / "cli.py").write_text(_FAKE_CLI)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    if safe_path:
        env["PYTHONSAFEPATH"] = "1"
    proc = subprocess.run([sys.executable, str(copy / "benchmarks" / "latency.py"), "--help"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"models from {copy / 'models' / '__init__.py'}", proc.stdout[:300]


def test_the_recorded_command_says_how_the_benchmark_was_started(monkeypatch):
    from benchmarks.latency import _command

    assert _command() == ("python", "benchmarks/latency.py")  # under pytest: not the module run as __main__
    monkeypatch.setitem(sys.modules, "__main__", SimpleNamespace(__spec__=SimpleNamespace(name="benchmarks.latency")))
    assert _command() == ("python", "-m", "benchmarks.latency")


def test_no_git_checkout_is_said_in_words_not_none():
    from benchmarks.report import markdown

    doc = json.loads(MINI.read_text())
    doc["environment"]["git"] = {"commit": None, "dirty": None}
    md = markdown(doc)
    assert "git None" not in md and "git: no commit (not run from a git checkout of vitc)" in md
    doc["environment"]["git"] = {"commit": "0123456789abcdef" * 2 + "01234567", "dirty": True}
    assert "; git 0123456789ab (dirty)" in markdown(doc)


@pytest.mark.parametrize("form", [["-m", "benchmarks.latency"], ["benchmarks/latency.py"]])
def test_errors_name_the_form_the_benchmark_was_started_with(form):
    """Started as a module (the only form an installed vitc has), its errors named the script path."""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, *form, "--pairs", "bogus"], cwd=root, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    shown = "python -m benchmarks.latency" if form[0] == "-m" else "python benchmarks/latency.py"
    assert r.stderr.strip().splitlines() == [f"{shown}: error: unknown pair 'bogus'; known: "
                                             "1gf, 4gf, 18gf, 36gf, 72gf, mini, micro"], r.stderr
