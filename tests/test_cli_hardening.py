"""Bad command-line input to train, the sweep, serve.sample and the benchmarks: exit 2, one line on stderr, nothing
left behind. Every case fails before any training, server or measurement starts, so the whole file takes seconds."""

from __future__ import annotations

import math
import socket

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
             "optimizer": {"state": {}, "param_groups": []}, "scheduler": {}, "ema": None, "rng": capture_rng(),
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

    device = "cuda:999" if torch.cuda.is_available() else "cuda"
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
    assert list(tmp_path.iterdir()) == [a_file]  # nothing written, no temp file left


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
