"""`make gpu-check` without a GPU: its time budget, how a step's result is classified (refused artifacts included),
stopping a step with everything it started, its output as text, and the server start it waits for."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from test_serve_fixtures import micro_checkpoint

from benchmarks import gpu_check
from benchmarks.gpu_check import GPU, GPU_FULL, SMOKE, Budget, Finished, run_group, step_result

PY = sys.executable


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _alive(pid: int) -> bool:
    """Running (a zombie, killed but not yet reaped by whoever adopted it, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _wait_file(path: Path, seconds: float = 10.0) -> str:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if path.is_file() and (text := path.read_text().strip()):
            return text
        time.sleep(0.02)
    raise AssertionError(f"{path} was never written")


# --- the budget -------------------------------------------------------------------------------------------------


def test_each_step_gets_its_share_of_what_is_left_and_a_quick_step_leaves_time_to_the_later_ones():
    clock = Clock()
    budget = Budget(300, {"a": 1, "b": 1, "c": 2}, reserve_s=20, min_step_s=10, clock=clock)
    assert budget.left() == 280
    assert budget.take("a") == pytest.approx(70)  # 280 * 1/4
    clock.t += 10  # "a" took 10 s of its 70
    assert budget.take("b") == pytest.approx(270 / 3)  # what "a" left is shared by "b" and "c"
    clock.t += 90
    assert budget.take("c") == pytest.approx(180)  # the last step gets all that is left
    clock.t += 500
    assert budget.left() == 0  # never negative


def test_a_step_with_too_little_left_is_not_started_and_a_dropped_step_gives_its_share_away():
    clock = Clock()
    budget = Budget(100, {"a": 1, "b": 1, "c": 1}, reserve_s=0, min_step_s=10, clock=clock)
    budget.drop("a")  # what "a" needed failed
    assert budget.take("b") == pytest.approx(50)
    clock.t += 95
    assert budget.take("c") == 0.0  # 5 s left: below the 10 s a step needs


def test_the_gpu_check_fits_its_budget_and_serves_a_bundle_of_the_servers_max_batch():
    from benchmarks.latency import build_parser

    assert set(GPU.shares) == {"train", "ddp", "export", "parity-on-device", "latency-1", "serve-under-load"}
    assert set(GPU_FULL.shares) >= {f"latency-{i + 1}" for i in range(len(GPU_FULL.latency))}
    served_max = int(GPU.serve_args.split("--max-batch-size")[1].split()[0])
    for sizes in (GPU, GPU_FULL):
        for args in sizes.latency:
            parsed = build_parser().parse_args(list(args))
            # benchmarks/suite.py exports every bundle with max batch max(32, *batch sizes)
            assert max(32, *parsed.batch_sizes) == served_max == 64
            assert parsed.parity_samples <= 64
    # the paper's 4GF..72GF sweep and TensorRT INT8 only with --full
    assert all("72gf" not in args for args in GPU.latency) and not GPU.int8
    assert any("72gf" in ",".join(args) for args in GPU_FULL.latency) and GPU_FULL.int8
    # a bench cache (max batch 256 bundles) is never served
    assert GPU.cache == gpu_check.GPU_CACHE and SMOKE.cache is None


def test_the_default_budget_lets_a_cold_machine_finish_every_step():
    """A cold machine (empty inductor and TensorRT caches, no cached bundles) needs about _GPU_COLD_S a step; even
    when every step before it took all of that, each step is still given its own with room to spare (300 s, the
    old default, gave the 1GF latency step 80 s for what takes minutes there)."""
    cold = gpu_check._GPU_COLD_S
    assert list(cold) == list(GPU.shares) and GPU.budget_s >= 1.4 * sum(cold.values()) + gpu_check.RESERVE_S
    clock = Clock()
    budget = Budget(GPU.budget_s, GPU.shares, clock=clock)
    for name, needs in cold.items():
        assert budget.take(name) >= 1.4 * needs, name
        clock.t += needs
    # the latency step's cold work: two TensorRT engine builds and ONNX exports, then the compiled pair
    assert cold["latency-1"] >= 0.3 * sum(cold.values())


def test_the_load_levels_stay_short():
    """The served 1GF model is compiled and captured at its 7 buckets by the server (a minute cold): the load levels,
    thousands of requests each on a GPU, need not add 5 s apiece on top."""
    assert float(GPU.load[GPU.load.index("--duration") + 1]) <= 3
    assert GPU.load[GPU.load.index("--concurrency") + 1] == "1,16,64"


def test_the_serve_step_is_estimated_with_one_compile_as_e2e_runs_it():
    """The served model is compiled once, by the server: for a compiled torch server benchmarks/e2e.py opens no
    second copy in-process (its reference is the server's compute stage), so the step's cold estimate is one compile
    and capture (about a minute) and its requests, not the two compiles it once counted (120 s)."""
    from benchmarks import e2e
    from serve.__main__ import build_parser as serve_parser

    served = serve_parser().parse_args(["--model", "b", *GPU.serve_args.split()])
    assert served.compile and served.precision == "bf16"
    # what such a server reports of itself (runtimes/pytorch.py's execution), as e2e reads it
    assert e2e.bare_skip_reason({"runtime": "torch", "execution": {"compiled": served.compile}}) is not None
    load = GPU.load
    duration = float(load[load.index("--duration") + 1])
    levels = len(load[load.index("--concurrency") + 1].split(",")) + 1  # the closed loops and the open loop
    requests_s = 8 * 1.0 + levels * (duration + 2.0)  # c1 rounds (non-quick), each level with its 2 s warm-up
    assert gpu_check._GPU_COLD_S["serve-under-load"] <= 60 + requests_s + 5


def test_parity_on_a_gpu_compiles_batch_1_and_the_max_batch_only(tmp_path, monkeypatch):
    """A bucket between them (8) cost another inductor compile and CUDA graph capture, and proved nothing more."""
    import runtimes
    from export.bundle import build_bundle

    ckpt = micro_checkpoint(tmp_path)
    build_bundle(ckpt, tmp_path / "bundle", ("torch-fp32", "torch-bf16"), name="b", max_batch=16, parity_samples=16,
                 log=lambda _: None)
    asked = []
    real = runtimes.open_backend

    def open_backend(path, manifest, runtime, precision, options, *a, **k):
        asked.append((precision, options.compile, options.buckets))
        # run it on the CPU, eagerly: what is checked is what a GPU run asks for
        return real(path, manifest, runtime, precision, runtimes.BackendOptions(device="cpu"), *a, **k)

    monkeypatch.setattr(runtimes, "open_backend", open_backend)
    facts = gpu_check.parity_on_device(tmp_path / "bundle", ckpt, "cuda", 24)
    assert set(facts) == {"fp32", "bf16", "bf16-compiled"}
    assert [(p, b) for p, c, b in asked if c] == [("bf16", (1, 16))]


def test_a_step_cut_for_time_says_so_in_its_record_the_log_and_the_summary(tmp_path, monkeypatch, capsys):
    budget = Budget(3, {"slow": 1}, reserve_s=0, min_step_s=1)
    logged: list[str] = []
    s = gpu_check._step("slow", [PY, "-c", "import time; time.sleep(60)"], budget, logged.append, {})
    assert s["status"] == "cut" and s["cut_for_time"] and s["rc"] == 124
    assert s["reason"].startswith("cut for time: stopped after ") and "of the 3 s budget), not failed" in s["reason"]
    assert "rerun with a larger --budget" in s["reason"] and s["reason"] in logged[-1]
    # the whole check: the summary line and the report name the steps cut for time
    spent = Budget(60, SMOKE.shares, reserve_s=60, min_step_s=10)
    doc = gpu_check.run("cpu", SMOKE, tmp_path / "o", tmp_path / "w", log=lambda m: None, budget=spent)
    assert doc["cut_for_time"] == ["train", "ddp", "latency-1"]  # the others were not run for want of their input
    assert "**Cut for time** (stopped or not started, not failed): train, ddp, latency-1" in gpu_check.markdown(doc)
    monkeypatch.setattr(gpu_check, "run", lambda *a, **k: doc)
    assert gpu_check.main(["--device", "cpu", "--smoke", "--out", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out.strip()
    assert out.startswith("FAILED (train, ddp, latency-1 cut for time: rerun with a larger --budget than 60): wrote ")


def test_a_spent_budget_records_every_step_as_not_run_and_the_check_as_failed(tmp_path):
    clock = Clock()
    budget = Budget(60, SMOKE.shares, reserve_s=0, min_step_s=10, clock=clock)
    clock.t += 55
    logged: list[str] = []
    doc = gpu_check.run("cpu", SMOKE, tmp_path / "out", tmp_path / "work", log=logged.append, budget=budget)
    steps = {s["name"]: s for s in doc["steps"]}
    assert list(steps) == ["train", "ddp", "export", "parity-on-device", "latency-1", "serve-under-load"]
    assert not doc["passed"] and doc["budget_s"] == 60
    assert all(s["status"] == "not run" and s["rc"] is None for s in steps.values())
    assert "5 s of the 60 s budget left" in steps["train"]["reason"]
    assert steps["export"]["reason"] == "not run: needs the checkpoint of train, which not run"
    assert [c["step"] for c in doc["cut"]] == list(steps)
    md = gpu_check.markdown(doc)
    assert "**FAILED**" in md and "| train | not run |  |" in md


# --- classification ---------------------------------------------------------------------------------------------


def test_a_step_is_passed_failed_or_cut_with_its_reason():
    ok = step_result("s", ["x"], 50, Finished(0, False, 3.0, "line\n{\"a\": 1}\n", ""))
    assert (ok["status"], ok["reason"], ok["rc"], ok["last_line"]) == ("passed", None, 0, '{"a": 1}')
    bad = step_result("s", ["x"], 50, Finished(3, False, 3.0, "", "progress\nerror: the disk is full\n"))
    assert (bad["status"], bad["rc"]) == ("failed", 3) and bad["reason"] == "exit 3: error: the disk is full"
    cut = step_result("s", ["x"], 42.4, Finished(-15, True, 52.0, "", "epoch 1\n"))
    assert (cut["status"], cut["rc"]) == ("cut", 124) and "stopped after 42 s" in cut["reason"]
    assert "epoch 1" in cut["output_tail"]  # stderr kept when the step was stopped


@pytest.fixture(scope="module")
def refused_bundle(tmp_path_factory) -> tuple[Path, Path]:
    """A real bundle whose torch-fp16 artifact the export refused (a gate no logits can pass), and its checkpoint."""
    from export.bundle import build_bundle
    from models.tolerance import Tolerance

    root = tmp_path_factory.mktemp("refused")
    ckpt = micro_checkpoint(root)
    never = Tolerance(atol=0.0, rtol=0.0, min_top1_agreement=1.0, max_accuracy_drop=0.0, batch_atol=0.0,
                      batch_rtol=0.0)  # fp16 logits are never exactly fp32's
    build_bundle(ckpt, root / "bundle", ("torch-fp32", "torch-fp16"), name="refused", max_batch=8,
                 parity_samples=16, tolerances={"fp16": never}, log=lambda _: None)
    return root / "bundle", ckpt


def test_a_refused_artifact_is_a_failure_with_its_reason_not_certified(refused_bundle):
    bundle, _ = refused_bundle
    facts, problems = gpu_check.export_facts(bundle, ["torch-fp32", "torch-fp16", "tensorrt-fp16"])
    assert facts["torch-fp32"] == "certified"
    assert facts["torch-fp16"].startswith("refused: ") and len(facts["torch-fp16"]) > len("refused: ")
    assert problems[0].startswith("torch-fp16 refused: ") and problems[1] == "tensorrt-fp16 missing from the manifest"
    step = step_result("export", ["x"], 50, Finished(0, False, 1.0))
    gpu_check.fail(step, "; ".join(problems))
    assert (step["status"], step["rc"]) == ("failed", 1) and "torch-fp16 refused" in step["reason"]


def test_parity_on_the_device_lists_a_refused_torch_precision_as_failed(refused_bundle):
    bundle, ckpt = refused_bundle
    facts = gpu_check.parity_on_device(bundle, ckpt, "cpu", 8)
    assert facts["fp32"]["passed"] and not facts["fp16"]["passed"] and facts["fp16"]["refused"]
    problems = gpu_check.parity_problems(facts)
    assert len(problems) == 1 and problems[0].startswith("fp16: refused by the export: ")


def test_a_target_that_failed_inside_the_benchmark_fails_the_latency_step():
    doc = {"skipped": [{"pair": "1gf", "target": "tensorrt-int8", "reason": "tensorrt is not installed"},
                       {"pair": "1gf", "target": "onnxruntime-cuda-fp32", "reason": "failed: golden mismatch"}]}
    assert gpu_check.latency_problems(doc) == ["1gf onnxruntime-cuda-fp32: failed: golden mismatch"]


# --- stopping a step ------------------------------------------------------------------------------------------

# The step: starts a grandchild (as torchrun starts its workers, latency.py a server) that ignores SIGTERM, then
# hangs. `hold` keeps the grandchild on the step's stdout, as a server started with inherited output would;
# `session` starts it in a session of its own, as torchrun starts its workers.
_TREE = """
import subprocess, sys, time
hold = sys.argv[2] == "hold"
grandchild = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(30)"],
    stdout=None if hold else subprocess.DEVNULL, stderr=None if hold else subprocess.DEVNULL,
    start_new_session=sys.argv[2] == "session")
open(sys.argv[1], "w").write(str(grandchild.pid))
print("started", flush=True)
time.sleep(float(sys.argv[3]))
"""


@pytest.mark.parametrize("where", ["free", "session"])
def test_a_step_past_its_time_is_stopped_with_its_grandchildren(tmp_path, where):
    pid_file = tmp_path / "pid"
    t0 = time.monotonic()
    done = run_group([PY, "-c", _TREE, str(pid_file), where, "60"], timeout=2.0, grace=1.0)
    grandchild = int(_wait_file(pid_file))
    try:
        assert done.timed_out and done.rc != 0
        assert time.monotonic() - t0 < 15
        assert not _alive(grandchild)  # SIGKILLed after ignoring SIGTERM
        assert "started" in done.stdout
    finally:
        if _alive(grandchild):
            import os
            import signal

            os.kill(grandchild, signal.SIGKILL)


def test_a_step_that_exits_leaving_a_process_on_its_output_returns_at_once_and_the_process_is_stopped(tmp_path):
    pid_file = tmp_path / "pid"
    t0 = time.monotonic()
    done = run_group([PY, "-c", _TREE, str(pid_file), "hold", "0"], timeout=60.0, grace=1.0)
    grandchild = int(_wait_file(pid_file))
    try:
        assert not done.timed_out and done.rc == 0 and done.leftovers == 1
        assert time.monotonic() - t0 < 15  # not the grandchild's 30 s (a pipe it held would have been waited for)
        assert not _alive(grandchild)
    finally:
        if _alive(grandchild):
            import os
            import signal

            os.kill(grandchild, signal.SIGKILL)


def test_a_stopped_steps_output_is_text_and_keeps_its_stderr():
    script = ("import sys, time; print('héllo ✓', flush=True); sys.stdout.buffer.write(b'bad \\xff byte\\n'); "
              "sys.stdout.flush(); print('warn: ünïcode', file=sys.stderr, flush=True); time.sleep(60)")
    done = run_group([PY, "-c", script], timeout=2.0, grace=1.0)
    step = step_result("s", [PY, "-c", "..."], 2.0, done)
    assert step["status"] == "cut"
    tail = step["output_tail"]
    assert "héllo ✓" in tail and "bad \ufffd byte" in tail and "warn: ünïcode" in tail
    assert "b'" not in tail and "\\n" not in tail
    json.dumps(step)  # the report is JSON


# --- machine facts ----------------------------------------------------------------------------------------------


def test_the_cuda_versions_are_named_for_what_they_are(monkeypatch):
    import torch

    from benchmarks import machine

    assert machine.cuda_version_text(13000) == "13.0" and machine.cuda_version_text(12080) == "12.8"
    # no driver library, or one without the entry point: unknown, not torch's build version
    assert machine.driver_cuda_version(("libvitc-no-such-driver.so.1",)) is None
    assert machine.driver_cuda_version(("libc.so.6",)) is None

    class Props:
        name, total_memory, major, minor = "H200", 141 * 2**30, 9, 0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _i: Props())
    (gpu,) = machine.gpu_info()
    assert gpu["torch_cuda"] == torch.version.cuda
    assert gpu["driver_cuda"] == machine.driver_cuda_version()  # None on a machine without the driver


# --- the served model's start -------------------------------------------------------------------------------------


def test_a_compiling_server_gets_minutes_to_start_and_start_honours_its_timeout(tmp_path):
    from serve import launch

    assert launch.start_timeout(["--model", "b"]) == launch.START_TIMEOUT_S == 60
    assert launch.start_timeout(["--model", "b", "--device", "cuda", "--compile"]) == 600
    assert launch.start_timeout(["--model", "b"], {"VITC_COMPILE": "true"}) == 600
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"server did not start within 0.05s"):
        launch.start(["--model", str(tmp_path / "none")], tmp_path / "server.log", timeout=0.05)
    assert time.monotonic() - t0 < 35
