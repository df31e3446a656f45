"""Bad command-line input to train, the sweep, serve.sample, serve and the benchmarks: exit 2, one line on stderr,
nothing left behind. Every case fails before any training, server or measurement starts, so the whole file takes
seconds; the last section starts a few tiny servers (the legacy test bundle, or the fake runtime) for what only a
running server shows: the load test's temporary log, and Ctrl-C on `python -m serve`."""

from __future__ import annotations

import json
import math
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from models.checkpoint import CheckpointError


def _one_line(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """The single stderr line; every needle must be in it (no traceback, no usage dump)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert all(n in err[0] for n in needles), err[0]
    assert "Traceback" not in err[0] and "usage:" not in err[0]
    return err[0]


def _rc(main, args: list[str]) -> int:  # noqa: ANN001 - a CLI entry point
    """The exit code, whether the parser exited (SystemExit) or main returned it."""
    try:
        return main(args)
    except SystemExit as exc:
        return exc.code


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ python -m train
def test_train_out_that_cannot_be_a_directory_is_one_line(tmp_path, capsys):
    from train.__main__ import main

    a_file = tmp_path / "file"
    a_file.write_text("x")
    args = ["--model", "vit_c_micro", "--dataset", "digits", "--epochs", "1", "--device", "cpu"]
    assert main([*args, "--out", str(a_file / "run")]) == 2
    _one_line(capsys, "--out", "cannot use it as the run directory")


def test_train_bad_dataset_leaves_no_empty_out_directory(tmp_path, capsys):
    from train.__main__ import main

    out = tmp_path / "new" / "run"
    assert main(["--model", "vit_c_micro", "--dataset", str(tmp_path / "nope"), "--out", str(out),
                 "--device", "cpu"]) == 2
    _one_line(capsys, "unknown dataset")
    assert not (tmp_path / "new").exists()


def _state(**changes: object) -> dict:
    """A structurally complete resume state (tiny, not from a real run) with `changes` applied."""
    from train.config import TrainConfig
    from train.state import capture_rng

    cfg = TrainConfig(model="vit_c_micro", dataset="digits", out="/tmp/x")
    progress = {"epoch": 0, "step_in_epoch": 1, "global_step": 1, "history": [], "train_time_s": 0.1,
                "wall_time_s": 0.2, "cpu_time_s": 0.2, "samples_seen": 16, "segments": 0, "epoch_acc": None,
                "last_eval": None, "started": "2026-01-01T00:00:00Z"}
    state = {"config": cfg.to_dict(), "steps_per_epoch": 10, "model": {"w": torch.zeros(2)},
             "optimizer": {"state": {}, "param_groups": [{"params": [0], "lr": 0.1}]}, "scheduler": {}, "ema": None,
             "rng": capture_rng(),
             "progress": progress}
    for key, value in changes.items():
        if value is KeyError:
            del state[key]
        else:
            state[key] = value
    return state


@pytest.mark.parametrize("changes, reason", [
    ({"progress": KeyError}, "missing progress"),
    ({"rng": 5}, "rng"),
    ({"config": [1, 2]}, "config"),
    ({"model": {"w": 3}}, "model"),
    ({"steps_per_epoch": "ten"}, "steps_per_epoch"),
    ({"progress": {"epoch": 0}}, "progress: missing"),
])
def test_load_resume_rejects_a_tampered_structure(tmp_path, changes, reason):
    from train.state import load_resume, save_resume

    save_resume(tmp_path, _state(**changes))
    with pytest.raises(CheckpointError, match=f"resume.pt is damaged or from another run: {reason}"):
        load_resume(tmp_path)


def test_a_whole_resume_state_loads(tmp_path):
    from train.state import load_resume, save_resume

    save_resume(tmp_path, _state())
    assert load_resume(tmp_path)["progress"]["global_step"] == 1


class _Touch:
    """A pickled object that would create a file if it were ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


def test_a_resume_state_that_unpickles_objects_is_refused_naming_them(tmp_path):
    import zipfile

    from train.state import load_resume, save_resume

    marker = tmp_path / "PWNED"
    torch.save({"version": 1, "x": _Touch(marker)}, tmp_path / "resume.pt")
    with pytest.raises(CheckpointError) as info:
        load_resume(tmp_path)
    said = str(info.value)
    assert "holds Python objects no resume state holds" in said and "GLOBAL" in said and "\n" not in said
    assert "weights_only" not in said and "add_safe_globals" not in said and not marker.exists()
    # A deflated pickle (a few KB on disk that would unpickle to gigabytes) is refused from the zip directory alone.
    save_resume(tmp_path, _state())
    packed = tmp_path / "packed.pt"
    with zipfile.ZipFile(tmp_path / "resume.pt") as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            dst.writestr(item.filename, src.read(item.filename))
    packed.replace(tmp_path / "resume.pt")
    with pytest.raises(CheckpointError, match="is compressed, which torch.save never does"):
        load_resume(tmp_path)
    # An oversized pickle under another case of its name (torch finds archive/DATA.PKL too) is bounded alike.
    import train.state as state_module

    save_resume(tmp_path, _state())
    renamed = tmp_path / "renamed.pt"
    with zipfile.ZipFile(tmp_path / "resume.pt") as src, zipfile.ZipFile(renamed, "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            name = item.filename[:-len("data.pkl")] + "DATA.PKL" if item.filename.endswith("data.pkl") else \
                item.filename
            dst.writestr(name, src.read(item.filename))
    renamed.replace(tmp_path / "resume.pt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(state_module, "MAX_PICKLE_BYTES", 10)
        with pytest.raises(CheckpointError, match="its pickle is"):
            load_resume(tmp_path)


@pytest.mark.parametrize("betas", [5, "ab", [2.0, 0.5]])
def test_resume_with_a_tampered_config_is_one_line(tmp_path, capsys, betas):
    from train.__main__ import main
    from train.state import save_resume

    state = _state()
    state["config"]["betas"] = betas
    save_resume(tmp_path, state)
    assert main(["--out", str(tmp_path), "--resume"]) == 2
    _one_line(capsys, "resume.pt is damaged or from another run: config:")


def test_damage_reasons_are_folded_to_one_bounded_line():
    from train.state import MAX_REASON, damaged

    msg = str(damaged("Error(s) in loading state_dict:\n\tsize mismatch " + "x" * 1000))
    assert "\n" not in msg and len(msg) < MAX_REASON + 80 and "; size mismatch" in msg


# ------------------------------------------------------------------------------------------ python -m train.sweep
@pytest.mark.parametrize("args, needle", [
    (["--lr-range", "adamw=-1,1"], "--lr-range"),
    (["--lr-range", "adamw=1,0.1"], "--lr-range"),
    (["--lr-range", "adamw=nan,1"], "--lr-range"),
    (["--wd-range", "sgd=0,1e-3"], "--wd-range"),
    (["--seeds", "-1"], "seeds"),
    (["--samples", str(10**12)], "--samples"),
    (["--threads", "0"], "--threads"),
    (["--workers", "1000000"], "--workers"),
    (["--sample-seed", "-1"], "--sample-seed"),
    (["--stability-epochs", "0"], "--stability-epochs"),
    (["--epochs", "1,1000000"], "epochs"),
])
def test_sweep_rejects_bad_settings_up_front(args, needle, capsys):
    from train.sweep.__main__ import main

    assert _rc(main, [*args, "--dry-run"]) == 2
    _one_line(capsys, needle)


def test_sweep_rejects_missing_data_and_unusable_out_before_any_run(tmp_path, capsys):
    from train.sweep.__main__ import main

    assert main(["--dataset", str(tmp_path / "nope"), "--out", str(tmp_path / "s")]) == 2
    _one_line(capsys, "unknown dataset")
    assert not (tmp_path / "s").exists()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["--out", str(a_file), "--report-only"]) == 2
    _one_line(capsys, "is not a directory")
    half = tmp_path / "half"
    (half / "train").mkdir(parents=True)
    assert main(["--dataset", str(half), "--dry-run"]) == 2
    _one_line(capsys, "no val/ directory")


def test_study_config_checks_ranges_and_bounds():
    from train.sweep.plan import range_problem
    from train.sweep.presets import make_config

    assert range_problem((1e-4, 1e-2)) is None
    for bad in ((0, 1), (1, 0.1), (math.nan, 1), (1, math.inf), (1, 1), ("a", 1)):
        assert range_problem(bad) is not None
    with pytest.raises(ValueError, match="lr range of adamw"):
        make_config("reduced", lr_ranges={"adamw": (1.0, 0.1)})
    with pytest.raises(ValueError, match="samples"):
        make_config("reduced", samples=10**12)


@pytest.mark.parametrize("args, needle", [
    (["--batch", "-1"], "--batch"), (["--batch", "0"], "--batch"), (["--batch", str(10**12)], "--batch"),
    (["--rounds", "0"], "--rounds"), (["--device", "bogus"], "--device"),
])
def test_runtime_rejects_bad_arguments_in_the_parser(args, needle, capsys):
    from train.sweep.runtime import main

    assert _rc(main, args) == 2
    _one_line(capsys, needle)


def test_runtime_rejects_a_device_this_machine_lacks(capsys):
    from train.sweep.runtime import main

    # cuda:99 is a name within the device rule (cuda:999 is refused by the parser) that no machine here has
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    assert main(["--device", device]) == 2
    _one_line(capsys, f"--device {device}")


# ------------------------------------------------------------------------------------------------ serve.sample
def test_sample_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    from serve.sample import main

    assert main(["--out", str(tmp_path)]) == 2
    _one_line(capsys, "is a directory")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["--out", str(a_file / "s.png")]) == 2
    _one_line(capsys, "cannot write it")
    assert main(["--dataset", "nope", "--out", str(tmp_path / "s.png")]) == 2
    _one_line(capsys, "unknown dataset")
    assert main(["--index", "999999", "--out", str(tmp_path / "s.png")]) == 2
    _one_line(capsys, "--index")
    for out in ("-", str(tmp_path / "s.gif"), str(tmp_path / "noext")):  # the extension says the format
        assert main(["--out", out]) == 2
        _one_line(capsys, "must end in .png, .jpg, .jpeg, .webp")
    assert list(tmp_path.iterdir()) == [a_file]  # nothing written, no temp file left


def test_sample_writes_the_format_its_name_says(tmp_path):
    from PIL import Image

    from serve.sample import main

    for name, fmt in (("s.png", "PNG"), ("s.JPG", "JPEG"), ("s.webp", "WEBP")):
        assert main(["--out", str(tmp_path / name)]) == 0
        assert Image.open(tmp_path / name).format == fmt


# -------------------------------------------------------------------------------------------------- benchmarks
@pytest.mark.parametrize("args, needle", [
    (["--bundle", "/nonexistent"], "bundle directory not found"),
    (["--bundle", "{tmp}"], "not a bundle"),
])
def test_overhead_rejects_a_bundle_it_cannot_serve(tmp_path, capsys, args, needle):
    from benchmarks.overhead import main

    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    _one_line(capsys, needle)


@pytest.mark.parametrize("flag", ["--rounds", "--saturation", "--cold-starts", "--saturation-rounds", "--concurrency"])
def test_overhead_rejects_non_positive_settings(flag, capsys):
    from benchmarks.overhead import main

    assert _rc(main, ["--bundle", "/nonexistent", flag, "0"]) == 2
    _one_line(capsys, flag)


def test_load_without_a_server_is_one_line(capsys):
    from benchmarks.load import main

    assert main(["--url", f"http://127.0.0.1:{_closed_port()}", "--concurrency", "1", "--duration", "0.5"]) == 2
    _one_line(capsys, "no server at")
    assert main(["--images", "0"]) == 2
    _one_line(capsys, "--images")


@pytest.mark.parametrize("args, needle", [
    (["--duration", "nan"], "argument --duration: must be a number in (0, 60]"),
    (["--duration", "inf"], "argument --duration"),
    (["--warmup", "nan"], "argument --warmup: must be a number in [0, 60]"),
    (["--warmup", "-1"], "argument --warmup"),
])
def test_load_refuses_non_finite_durations(args, needle, capsys):
    from benchmarks.load import main

    assert _rc(main, args) == 2
    _one_line(capsys, needle)


def test_load_refuses_a_missing_bundle_and_an_unusable_out_before_starting(tmp_path, capsys, monkeypatch):
    from benchmarks.load import main

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where a server log would go
    assert main(["--start", "--model", str(tmp_path / "nope")]) == 2
    _one_line(capsys, "--model", "bundle directory not found")
    (tmp_path / "file").write_text("x")
    assert main(["--url", f"http://127.0.0.1:{_closed_port()}", "--out", str(tmp_path / "file" / "load.json")]) == 2
    _one_line(capsys, "--out", "is a file")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_naive_server_rejects_bad_port_and_bundle(capsys):
    from benchmarks.naive_server import main

    assert _rc(main, ["/nonexistent", "--port", "70000"]) == 2
    _one_line(capsys, "--port")
    assert main(["/nonexistent", "--port", str(_closed_port())]) == 2
    _one_line(capsys, "bundle directory not found")


def test_gpu_check_rejects_bad_device_and_missing_parity_inputs(tmp_path, capsys):
    from benchmarks.gpu_check import main

    assert _rc(main, ["--device", "bogus", "--smoke"]) == 2
    _one_line(capsys, "--device")
    assert main(["--parity-of", "/nonexistent", "--checkpoint", str(tmp_path), "--device", "cpu"]) == 2
    _one_line(capsys, "not found")


def test_gpu_check_on_the_cpu_runs_the_smoke_check_only(tmp_path, capsys):
    """--help said "cpu for a smoke run", yet --device cpu without --smoke started the full-size training run."""
    from benchmarks.gpu_check import main

    assert main(["--device", "cpu", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]) == 2
    _one_line(capsys, "--device cpu", "--smoke")
    (tmp_path / "file").write_text("x")
    for flag in ("--out", "--work"):
        assert main(["--device", "cpu", "--smoke", flag, str(tmp_path / "file")]) == 2
        _one_line(capsys, flag, "is a file")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]  # no step ran, nothing written


@pytest.mark.parametrize("module", ["train.sweep.__main__", "train.sweep.runtime", "serve.sample", "models.__main__",
                                    "benchmarks.overhead", "benchmarks.load", "benchmarks.naive_server",
                                    "benchmarks.gpu_check"])
def test_help_still_exits_0(module, capsys):
    import importlib

    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ python -m serve
@pytest.mark.parametrize("args, needle", [
    (["--max-body-bytes", str(10**21)],
     "--max-body-bytes (VITC_MAX_BODY_BYTES): Input should be less than or equal to 1073741824 (1 GiB)"),
    (["--max-buffered-bytes", str(10**23)], "--max-buffered-bytes (VITC_MAX_BUFFERED_BYTES): Input should be less"),
    (["--max-image-pixels", str(10**12), "--decode-budget-pixels", str(10**12)], "--max-image-pixels"),
    (["--decode-budget-pixels", str(10**15)], "--decode-budget-pixels"),
    (["--graceful-timeout-s", "inf"], "--graceful-timeout-s"),
    (["--max-image-pixels", str(2 * 10**8), "--decode-budget-pixels", str(10**8)],
     "invalid settings: --decode-budget-pixels (100000000) must be at least --max-image-pixels (200000000)"),
])
def test_serve_bounds_every_size_and_duration(args, needle, capsys):
    from serve.__main__ import main

    assert main(args) == 2
    _one_line(capsys, "python -m serve: error: invalid setting", needle)


def test_serve_environment_goes_through_the_same_bounds(monkeypatch, capsys):
    from pydantic import ValidationError

    from serve.__main__ import main
    from serve.settings import GiB, Settings

    monkeypatch.setenv("VITC_MAX_BUFFERED_BYTES", str(10**23))
    assert main([]) == 2
    _one_line(capsys, "VITC_MAX_BUFFERED_BYTES", "16 GiB")
    monkeypatch.setenv("VITC_MAX_BUFFERED_BYTES", str(16 * GiB))
    monkeypatch.setenv("VITC_MAX_BODY_BYTES", str(GiB))
    s = Settings()
    assert (s.max_body_bytes, s.buffered_bytes_limit) == (GiB, 16 * GiB)  # the bounds themselves are allowed
    monkeypatch.setenv("VITC_MAX_BODY_BYTES", str(GiB + 1))
    with pytest.raises(ValidationError, match="max_body_bytes"):
        Settings()


def test_the_servers_last_error_is_read_from_its_log():
    from serve.launch import MAX_REASON, last_error

    info = json.dumps({"level": "info", "msg": "listening"})
    failed = json.dumps({"level": "error", "msg": "inference failed", "exc": "Traceback ...\nValueError: boom"})
    assert last_error(f"{info}\nerror: model 'x': not a bundle\n") == "model 'x': not a bundle"
    assert last_error(f"error: early\n{failed}\n{info}\n") == "inference failed: ValueError: boom"
    assert last_error("Traceback (most recent call last):\n  File x\nImportError: no uvicorn\n") == \
        "ImportError: no uvicorn"
    assert last_error(info) is None and last_error("") is None
    assert len(last_error("error: " + "x" * 5000)) == MAX_REASON


def _serve_legacy(tmp_path: Path, *more: str) -> list[str]:
    """Arguments of `python -m benchmarks.load` that serve the committed legacy bundle for a fraction of a second."""
    from fake_runtime import LEGACY

    return ["--start", "--model", f"legacy={LEGACY}", "--concurrency", "1", "--duration", "0.3", "--warmup", "0",
            "--images", "2", "--server-arg=--threads=1", "--out", str(tmp_path / "out" / "load.json"), *more]


def test_load_start_leaves_no_server_log_behind(tmp_path, capsys, monkeypatch):
    """Every `--start` run used to leave /tmp/vitc-load-*/server.log behind."""
    from benchmarks.load import main

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    assert main(_serve_legacy(tmp_path)) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "load.json").read_text())["server"]["exit_code"] == 0
    assert list(temp.iterdir()) == []


def test_load_start_says_why_the_server_did_not_start_and_keeps_its_log(tmp_path, capsys, monkeypatch):
    from benchmarks.load import main

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    assert main(_serve_legacy(tmp_path, "--server-arg=--max-batch-size=0")) == 2
    line = _one_line(capsys, "the server did not start: server exited with code 2: invalid setting --max-batch-size")
    (kept,) = temp.iterdir()
    assert f"(log: {kept / 'server.log'})" in line and "--max-batch-size" in (kept / "server.log").read_text()


def test_ctrl_c_drains_like_sigterm_without_a_traceback(tmp_path):
    """SIGINT (Ctrl-C) while a request runs: the request is answered, the server stops as on SIGTERM, and it ends
    with exit 0 (Ctrl-C is the server's normal stop, as the README says), never a KeyboardInterrupt traceback."""
    import fake_runtime
    import httpx
    import numpy as np
    from test_serve_fixtures import start_server

    bundle = fake_runtime.write_bundle(tmp_path / "fake")
    server = start_server(["--model", f"fake={bundle}", "--backend", "fake", "--parallel", "1"],
                          tmp_path / "server.log", fake_runtime.server_env(tmp_path))
    try:
        x = np.full((1, 3, 32, 32), 0.25, np.float32)
        x[0, 0, 0, 0] = fake_runtime.SLOW  # the backend takes a second over it
        body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.ravel().tolist()}]})
        answers: list[httpx.Response] = []
        client = threading.Thread(target=lambda: answers.append(
            httpx.post(server.url + "/v2/models/fake/infer", content=body, timeout=30)))
        client.start()
        computed, end = tmp_path / "computed.log", time.monotonic() + 10  # warm-up rows are logged there too
        slow = f"{fake_runtime.SLOW:g}"
        while not (computed.exists() and slow in computed.read_text().split()) and time.monotonic() < end:
            time.sleep(0.02)  # until the slow batch is running
        server.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends (a shell's `cmd &` job would ignore it)
        client.join(30)
        assert server.proc.wait(30) == 0
    finally:
        server.stop()
    assert answers and answers[0].status_code == 200, answers
    logs = server.logs()
    assert "Traceback" not in logs and "KeyboardInterrupt" not in logs, logs[-2000:]
    lines = logs.strip().splitlines()
    assert any(json.loads(ln).get("msg") == "stopped" for ln in lines if ln.startswith("{"))  # drained as SIGTERM
    assert [ln for ln in lines if not ln.startswith("{")] == []


@pytest.mark.parametrize("failure, code, says", [
    (KeyboardInterrupt(), 130, "prog: interrupted"),
    (MemoryError(), 1, "prog: error: out of memory"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"), 1, "out of memory"),
    (OSError(28, "No space left on device", "/x/y"), 1, "prog: error: No space left on device: /x/y"),
    # onnxruntime's errors derive from Exception alone: its bad_alloc was a traceback, or a bad model (exit 2)
    ("onnxruntime", 1, "prog: error: out of memory"),
    (RuntimeError("can't start new thread"), 1, "prog: error: out of memory or threads (a thread could not start: a "
                                                "memory, pids or ulimit -u limit)"),
    (RuntimeError("Exception from src/inference/src/cpp/infer_request.cpp:223:\nResource temporarily unavailable"), 1,
     "out of memory or threads"),  # OpenVINO under a pids limit: it said 'out of memory' alone
])
def test_every_entry_point_ends_a_failure_of_the_machine_in_one_line(failure, code, says, capsys):
    from models.cli import run

    if failure == "onnxruntime":
        from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

        failure = RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : std::bad_alloc")

    def main() -> int:
        raise failure

    with pytest.raises(SystemExit) as exit_:
        run(main, "prog")
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == code and says in err and "\n" not in err


def test_a_closed_output_pipe_ends_quietly(capfd, monkeypatch):
    from models.cli import run

    monkeypatch.setattr("os.dup2", lambda *_: None)  # the real one would point the test's stdout at /dev/null

    def main() -> int:
        raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(SystemExit) as exit_:
        run(main, "prog")
    assert exit_.value.code == 141 and capfd.readouterr().err == ""


def test_an_unexpected_error_still_shows_its_traceback():
    from models.cli import run

    def main() -> int:
        raise OSError(13, "Permission denied")  # not the machine failing: a bug to report, with its traceback

    with pytest.raises(OSError):
        run(main, "prog")


@pytest.mark.parametrize("blocked, command, says", [
    ("torch", ["train.eval", "--checkpoint", "nope"],
     "python -m train.eval: error: torch is not installed: install the project's train extra "
     "(in the vitc checkout: pip install -c constraints.txt '.[train]')"),
    ("PIL", ["serve.sample", "--dataset", "animals", "--out", "s.png"],
     "python -m serve.sample: error: PIL (pillow) is not installed: install the project's server extra "
     "(in the vitc checkout: pip install -c constraints.txt '.[server]')"),
])
def test_a_missing_extra_is_one_line_that_names_it(blocked, command, says, tmp_path):
    """An install without the extra a command needs (torch in a serving install): one line and exit 2, not a
    ModuleNotFoundError traceback."""
    import subprocess
    import sys

    module, *args = command
    code = (f"import runpy, sys\nsys.modules[{blocked!r}] = None  # importing it now fails as if not installed\n"
            f"sys.argv = [{module!r}, *{args!r}]\nrunpy.run_module({module!r}, run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stderr.strip()) == (2, says)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["models.nope", "serve.routes.nope", "left_pad", None])
def test_a_missing_module_of_no_extra_keeps_its_traceback(name):
    """vitc's own modules (a packaging bug) and modules no extra brings: the traceback is what to report."""
    from models.cli import run

    def main() -> int:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    with pytest.raises(ModuleNotFoundError):
        run(main, "prog")


def test_models_list_into_a_closed_pipe_ends_quietly():
    """`python -m models list | head -1`: the rest of the table has nowhere to go, and that is no error."""
    import os
    import subprocess
    import sys

    reader, writer = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "models", "list"], cwd=Path(__file__).resolve().parents[1],
                            stdout=writer,
                            stderr=subprocess.PIPE, text=True)
    os.close(writer)
    os.close(reader)  # closed before the table is written: every write meets a broken pipe
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 141 and "Traceback" not in err, err


def test_sigterm_takes_the_ctrl_c_path_with_its_cleanup_and_says_so(capsys):
    """`kill`, `timeout`, Kubernetes and Slurm send SIGTERM: a command used to die at once, silently, leaving its
    temporary directory and lock (and a training lost what it had not saved); now the same cleanup as for Ctrl-C
    runs, one line says why it stopped, exit 143. A server opts out (it drains on SIGTERM)."""
    import os

    from models.cli import run

    cleaned = []

    def main() -> int:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            return 0
        finally:
            cleaned.append(True)

    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_:
            run(main, "prog")
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # a second SIGTERM stops the cleanup at once
    finally:
        signal.signal(signal.SIGTERM, before)
    assert exit_.value.code == 143 and cleaned == [True]
    assert capsys.readouterr().err.strip() == "prog: terminated"


def test_train_eval_treats_a_full_disk_as_the_machine_not_the_output(tmp_path, monkeypatch):
    import errno
    import os

    from train import eval as train_eval

    def full(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(train_eval, "atomic_write_json", full)
    with pytest.raises(OSError) as err:  # models.cli.run turns it into one line and exit 1
        train_eval.write_result(tmp_path / "eval.json", {"top1": 0.5})
    assert err.value.errno == errno.ENOSPC


@pytest.mark.parametrize("value", ["4.0", "4e0", "four"])
def test_serve_environment_counts_are_read_as_their_flags_read_them(value, monkeypatch, capsys):
    from serve.__main__ import main
    from serve.settings import Settings

    monkeypatch.setenv("VITC_MAX_BATCH_SIZE", value)
    assert main([]) == 2  # as `--max-batch-size 4.0` is refused, VITC_MAX_BATCH_SIZE=4.0 is
    _one_line(capsys, "--max-batch-size (VITC_MAX_BATCH_SIZE)", "must be a whole number")
    monkeypatch.setenv("VITC_MAX_BATCH_SIZE", " 4 ")
    monkeypatch.setenv("VITC_MAX_QUEUE_DELAY_MS", "2.5")  # a duration stays a float
    s = Settings()
    assert (s.max_batch_size, s.max_queue_delay_ms) == (4, 2.5)
