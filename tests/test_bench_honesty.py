"""The benchmarks compare what they say they compare, check their output before measuring, leave no server or
temporary directory behind whatever stops them, never overwrite an earlier run's results, and sample the two
models of a pair evenly. Fast: the slow parts (servers, timing, exports) are stand-ins."""

from __future__ import annotations

import json
import signal
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

# Imported before any test patches models.bundle.read_manifest or models.io.atomic_write_json: a module first imported
# under a patch would keep the stand-in as its own for the rest of the session (export.bundle did, failing later
# tests).
import benchmarks.bundles  # noqa: F401
import benchmarks.load  # noqa: F401
import benchmarks.report  # noqa: F401
import export.bundle  # noqa: F401
import export.report  # noqa: F401
import export.served  # noqa: F401
import export.triton  # noqa: F401
import serve.registry  # noqa: F401
import serve.tensor  # noqa: F401
from benchmarks import e2e, overhead
from benchmarks.latency import main as latency_main
from benchmarks.measure import QUICK, input_pool, time_pair
from models.cli import Terminated, signals_caught

LATENCY_ERROR = "python benchmarks/latency.py: error: "

SERVED = {"name": "animals", "variant": "vit_c_mini", "runtime": "onnxruntime", "precision": "fp32",
          "source": {"dataset": "animals", "sha256": "a" * 64}, "execution": {}}


def _must_not_measure(*_args, **_kwargs):
    raise AssertionError("the benchmark measured")


def _manifest(model: str, sha: str) -> SimpleNamespace:
    return SimpleNamespace(model=model, source=SimpleNamespace(sha256=sha))


# --- 1. --http URL --bundle B: B must be the served model ----------------------------------------------------------

@pytest.mark.parametrize("model, sha, says", [
    ("vit_c_micro", "a" * 64, "variant 'vit_c_mini' served, 'vit_c_micro' in the bundle"),
    ("vit_p_mini", "b" * 64, "variant 'vit_c_mini' served, 'vit_p_mini' in the bundle"),
    ("vit_c_mini", "b" * 64, f"weights sha256 {'a' * 64!r} served, {'b' * 64!r} in the bundle"),
])
def test_a_bundle_that_is_not_the_served_model_is_refused_before_measuring(model, sha, says, tmp_path, monkeypatch,
                                                                           capsys):
    """A vit_c_micro (or vit_p) bundle against a vit_c_mini server was timed bare and reported as its overhead."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    monkeypatch.setattr("models.bundle.read_manifest", lambda _path: _manifest(model, sha))
    monkeypatch.setattr(e2e, "model_info", lambda _cfg: SERVED)
    monkeypatch.setattr(e2e, "request_bodies", _must_not_measure)
    monkeypatch.setattr(e2e, "open_bare", _must_not_measure)
    rc = latency_main(["--http", "http://127.0.0.1:9", "--bundle", str(bundle), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"{LATENCY_ERROR}--bundle {bundle} is not the model the server serves as 'animals'")
    assert says in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no results


def test_the_served_bundle_is_accepted(monkeypatch):
    monkeypatch.setattr("models.bundle.read_manifest", lambda _path: _manifest("vit_c_mini", "a" * 64))
    assert e2e.bundle_mismatch(Path("b"), SERVED) is None


# --- 2. overhead --out: checked before measuring; the Markdown printed before the files --------------------------

def test_overhead_refuses_an_unwritable_out_before_measuring(monkeypatch, capsys):
    """--out /proc/x measured everything, then a traceback and nothing printed."""
    monkeypatch.setattr(overhead, "check_bundle", lambda _bundle: None)
    monkeypatch.setattr(overhead, "run", _must_not_measure)
    assert overhead.main(["--bundle", "b", "--out", "/proc/vitc-overhead"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m benchmarks.overhead: error: --out /proc/vitc-overhead: ")


def _overhead_doc() -> dict:
    return {"created": "2026-12-05T23:42:07Z", "environment": {"host": "vm"}, "numbers": [1, 2]}


def test_overhead_prints_the_results_before_a_failing_write(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(overhead, "check_bundle", lambda _bundle: None)
    monkeypatch.setattr(overhead, "run", lambda *a, **k: _overhead_doc())
    monkeypatch.setattr(overhead, "markdown", lambda _doc: "| the measured table |\n")

    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("benchmarks.report.stage", full_disk)
    assert overhead.main(["--bundle", "b", "--out", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "| the measured table |" in out
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


# --- 3. every started server and temporary directory is cleaned up, whatever stops the run -----------------------

class _FakeServer:
    """Records starts and stops; `fail_at`: the start (1-based) that a signal interrupts."""

    started: list[_FakeServer] = []
    fail_at: int | None = None

    def __init__(self, kind: str, bundle: Path, backend: str = "onnxruntime", log_dir: Path | None = None) -> None:
        if _FakeServer.fail_at == len(_FakeServer.started) + 1:
            raise Terminated()
        self.kind, self.stopped, self.cold_start_s = kind, False, 0.1
        _FakeServer.started.append(self)

    def startup(self) -> dict:
        return {}

    def stop(self, keep_log: bool = False) -> None:
        self.stopped = True


@pytest.fixture
def fake_servers(monkeypatch):
    _FakeServer.started, _FakeServer.fail_at = [], None
    monkeypatch.setattr(overhead, "Server", _FakeServer)
    monkeypatch.setattr(overhead, "request_image", lambda: b"png")
    monkeypatch.setattr("models.bundle.read_manifest", lambda _path: _manifest("vit_c_mini", "a" * 64))
    monkeypatch.setattr("benchmarks.machine.environment", lambda _gpus: {"host": "vm"})
    monkeypatch.setattr(overhead, "bare_backend", _must_not_measure)
    return _FakeServer


@pytest.mark.parametrize("fail_at", [1, 2, 3])  # the n-th of naive, vitc-onnxruntime, vitc-openvino
def test_a_signal_while_the_servers_start_stops_those_already_running(fake_servers, fail_at):
    """SIGTERM while the second server started left the hand-written one running, parented to PID 1."""
    fake_servers.fail_at = fail_at + 2  # after the two cold starts
    with pytest.raises(Terminated):
        overhead.run(Path("b"), rounds=1, slice_s=0.1, saturation_s=0.1, concurrency=1, cold_starts=1,
                     backends=["onnxruntime", "openvino"], log=lambda _m: None)
    assert len(fake_servers.started) == fail_at + 1
    assert all(s.stopped for s in fake_servers.started)


def test_a_signal_during_a_cold_start_stops_that_server(fake_servers, monkeypatch):
    monkeypatch.setattr(_FakeServer, "startup", lambda self: (_ for _ in ()).throw(Terminated()))
    with pytest.raises(Terminated):
        overhead.run(Path("b"), rounds=1, slice_s=0.1, saturation_s=0.1, concurrency=1, cold_starts=1,
                     backends=["onnxruntime", "openvino"], log=lambda _m: None)
    assert len(fake_servers.started) == 1 and fake_servers.started[0].stopped


def test_a_signal_while_popen_runs_is_held_until_the_child_is_recorded():
    """Popen interrupted while it waits for the exec would leave a child nobody can stop: the signal waits."""
    reached = False
    with pytest.raises(KeyboardInterrupt), signals_caught():
        signal.raise_signal(signal.SIGINT)
        time.sleep(0.01)  # a Python handler would have run here
        reached = True
    assert reached
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_a_real_server_interrupted_while_starting_is_stopped_and_its_directory_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = []

    def interrupted(_url, proc):
        seen.append(proc)
        raise Terminated()

    monkeypatch.setattr(overhead, "_wait", interrupted)
    with pytest.raises(Terminated):
        overhead.Server("naive", tmp_path / "no-bundle")
    assert seen and seen[0].poll() is not None  # the child was stopped, not left running
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stop", [Terminated, KeyboardInterrupt, ValueError])
def test_http_start_removes_its_log_directory_whatever_stops_the_run(stop, tmp_path, monkeypatch):
    """--http start stopped the server on SIGTERM but left /tmp/vitc-e2e-*/server.log behind."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    server = SimpleNamespace(url="http://127.0.0.1:9", stopped=False)
    server.stop = lambda: setattr(server, "stopped", True)
    monkeypatch.setattr("serve.launch.start", lambda *_a, **_k: server)

    def interrupted(*_args):
        raise stop("stopped")

    monkeypatch.setattr(e2e, "_run_e2e", interrupted)
    with pytest.raises(stop):
        e2e.run_e2e(e2e.E2EConfig(url="start", bundle=tmp_path / "bundle"), log=lambda _m: None)
    assert server.stopped and list(tmp_path.iterdir()) == []


def test_http_start_keeps_the_log_of_a_server_that_did_not_start(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def failed(*_args, **_kwargs):
        raise RuntimeError("exited with 1")

    monkeypatch.setattr("serve.launch.start", failed)
    with pytest.raises(ValueError, match="the server did not start: exited with 1 .log: "):
        e2e.run_e2e(e2e.E2EConfig(url="start", bundle=tmp_path / "bundle"), log=lambda _m: None)
    assert [p.name for p in tmp_path.iterdir()][0].startswith("vitc-e2e-")


# --- 4. a second run in the same minute never replaces the first one's results -----------------------------------

def test_unused_stem_numbers_a_taken_name(tmp_path):
    from benchmarks.report import unused_stem

    assert unused_stem(tmp_path, "x", (".json", ".md")) == "x"
    (tmp_path / "x.md").write_text("")
    assert unused_stem(tmp_path, "x", (".json", ".md")) == "x-2"
    (tmp_path / "x-2.json").write_text("")
    assert unused_stem(tmp_path, "x", (".json", ".md")) == "x-3"


def test_latency_results_of_the_same_minute_are_both_kept(tmp_path, monkeypatch):
    from benchmarks import report

    monkeypatch.setattr(report, "summarize_doc", lambda _doc: {})
    monkeypatch.setattr(report, "markdown", lambda doc, _plots: f"targets {doc['targets']}\n")
    paths = [report.write_reports({"created": "2026-12-05T23:42:07Z", "host": "vm", "targets": [t]}, tmp_path,
                                  suffix="-quick", plots=False)[0]
             for t in ("onnxruntime-fp32", "openvino-fp32")]
    assert [p.name for p in paths] == ["2026-12-05-2342-vm-quick.json", "2026-12-05-2342-vm-quick-2.json"]
    assert [json.loads(p.read_text())["targets"] for p in paths] == [["onnxruntime-fp32"], ["openvino-fp32"]]


def test_http_and_overhead_results_of_the_same_minute_are_both_kept(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(e2e, "markdown_e2e", lambda doc, _plots: "md\n")
    first, second = (e2e.write_e2e_reports({"created": "2026-12-05T23:42:07Z", "host": "vm", "n": n}, tmp_path,
                                           plots=False)[0] for n in (1, 2))
    assert first.name != second.name and json.loads(first.read_text())["n"] == 1
    monkeypatch.setattr(overhead, "markdown", lambda _doc: "md\n")
    assert overhead.save(_overhead_doc(), tmp_path) == 0 and overhead.save(_overhead_doc(), tmp_path) == 0
    assert sorted(p.name for p in tmp_path.glob("*overhead*.json")) == ["2026-12-05-2342-vm-overhead-2.json",
                                                                         "2026-12-05-2342-vm-overhead.json"]


# --- 5. --quick samples the two models of a pair evenly ----------------------------------------------------------

def test_quick_rounds_are_not_sized_by_one_slow_warm_up_call():
    """One preempted warm-up call gave C 36 samples against P's 2628 (2 calls per round against 146)."""
    calls = {"c": 0}

    def busy(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    def c_infer(x: np.ndarray) -> np.ndarray:
        calls["c"] += 1
        busy(0.02 if calls["c"] <= 2 else 0.0002)  # a cold first call and a preempted second one
        return x

    def p_infer(x: np.ndarray) -> np.ndarray:
        busy(0.0002)
        return x

    t = time_pair(c_infer, p_infer, input_pool(1, (3, 4, 4), pool=2), QUICK)
    assert 0.5 <= len(t.c) / len(t.p) <= 2.0, (len(t.c), len(t.p))
