"""`make gpu-check --device cuda:N`, without a GPU: every step is pinned to GPU N (CUDA_VISIBLE_DEVICES=N and
`--device cuda`, which each step's own parser accepts), an index the machine lacks is refused before any step, and
on a GPU machine the pinned child sees exactly the GPU that was asked for."""

from __future__ import annotations

import json
import shlex
import sys

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.gpu_check import GPU, Budget, run_group, step_device

PY = sys.executable
STEPS = ["train", "ddp", "export", "parity-on-device", "latency-1", "serve-under-load"]


def test_cuda_n_becomes_cuda_on_gpu_n_alone():
    assert step_device("cpu", {}) == ("cpu", {})
    assert step_device("cuda", {"CUDA_VISIBLE_DEVICES": "2,3"}) == ("cuda", {})  # the first visible GPU, as torch
    assert step_device("cuda:1", {}) == ("cuda", {"CUDA_VISIBLE_DEVICES": "1"})
    assert step_device("cuda:0", {}) == ("cuda", {"CUDA_VISIBLE_DEVICES": "0"})
    # N counts among the GPUs this process already sees, as torch.cuda does: cuda:1 of "4,6" is physical GPU 6
    assert step_device("cuda:1", {"CUDA_VISIBLE_DEVICES": "4, 6"}) == ("cuda", {"CUDA_VISIBLE_DEVICES": "6"})
    assert step_device("cuda:0", {"CUDA_VISIBLE_DEVICES": "GPU-5e1f,GPU-77aa"}) == (
        "cuda", {"CUDA_VISIBLE_DEVICES": "GPU-5e1f"})
    with pytest.raises(ValueError, match=r"--device cuda:2: CUDA_VISIBLE_DEVICES='4,6' names no GPU 2"):
        step_device("cuda:2", {"CUDA_VISIBLE_DEVICES": "4,6"})


def _commands(tmp_path, monkeypatch, device: str) -> dict[str, list[str]]:
    """Each step's command as run() records it, with a budget already spent (nothing is started)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    budget = Budget(30, GPU.shares, reserve_s=30, min_step_s=10)
    doc = gpu_check.run(device, GPU, tmp_path / "out", tmp_path / "work", log=lambda m: None, budget=budget)
    assert [s["name"] for s in doc["steps"]] == STEPS
    assert doc["device"] == device and doc["step_device"] == "cuda"
    return {s["name"]: shlex.split(s["command"]) for s in doc["steps"]}


def _after(cmd: list[str], marker: list[str]) -> list[str]:
    i = next(i for i in range(len(cmd)) if cmd[i:i + len(marker)] == marker)
    return cmd[i + len(marker):]


def test_every_step_runs_on_gpu_n_with_a_device_its_own_parser_accepts(tmp_path, monkeypatch):
    from benchmarks.latency import build_parser as latency_parser
    from serve.__main__ import build_parser as serve_parser
    from train.options import build_parser as train_parser

    cmds = _commands(tmp_path, monkeypatch, "cuda:1")
    for name, cmd in cmds.items():
        # the variable in front of the recorded command, as a shell reruns it
        assert cmd[0] == "CUDA_VISIBLE_DEVICES=1", (name, cmd)
        assert "cuda:1" not in " ".join(cmd), (name, cmd)
    # train and torchrun: `python -m train` knows auto|cpu|cuda only (cuda:1 was "invalid choice")
    for name in ("train", "ddp"):
        args = train_parser().parse_args(_after(cmds[name], ["-m", "train"]))
        assert args.device == "cuda", name
    assert _after(cmds["parity-on-device"], ["--device"])[0] == "cuda"
    latency_parser().parse_args(_after(cmds["latency-1"], ["-m", "benchmarks.latency"]))
    server_args = next(a for a in cmds["serve-under-load"] if a.startswith("--server-args="))
    served = serve_parser().parse_args(["--model", "b", *shlex.split(server_args.split("=", 1)[1])])
    assert served.device == "cuda"


def test_the_steps_run_with_the_variables_they_were_given():
    code = "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES'), os.environ.get('VITC_GPU_CHECK_STEP') is not None)"
    done = run_group([PY, "-c", code], timeout=30, env={"CUDA_VISIBLE_DEVICES": "1"})
    assert done.rc == 0 and done.stdout.split() == ["1", "True"]


class Reached(Exception):
    """main() got as far as running the steps."""


@pytest.fixture
def gpus(monkeypatch):
    """A machine whose torch sees `gpus["count"]` GPUs; run() records its device instead of running."""
    seen: dict = {"count": 1}

    def run(device, sizes, out, work, log=print, budget=None, cache=None):
        seen["device"] = device
        raise Reached

    monkeypatch.setattr(gpu_check, "run", run)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: seen["count"])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return seen


@pytest.mark.parametrize(("count", "device", "says"), [
    (1, "cuda:1", "--device cuda:1: torch sees 1 CUDA GPU here (cuda:0)"),
    (2, "cuda:7", "--device cuda:7: torch sees 2 CUDA GPUs here (cuda:0 to cuda:1)"),
])
def test_a_gpu_index_the_machine_lacks_is_refused_with_one_line_before_any_step(tmp_path, capsys, gpus, count,
                                                                              device, says):
    gpus["count"] = count
    assert gpu_check.main(["--device", device, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"python -m benchmarks.gpu_check: error: {says}"]
    assert "device" not in gpus and not (tmp_path / "out").exists()


def test_a_gpu_index_the_machine_has_reaches_the_steps(tmp_path, gpus):
    gpus["count"] = 2
    with pytest.raises(Reached):
        gpu_check.main(["--device", "cuda:1", "--out", str(tmp_path / "out")])
    assert gpus["device"] == "cuda:1"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")
def test_a_pinned_step_sees_exactly_the_gpu_asked_for():
    n = torch.cuda.device_count() - 1
    dev, env = step_device(f"cuda:{n}")
    code = ("import json, torch; p = torch.cuda.get_device_properties(0); "
            "print(json.dumps([torch.cuda.device_count(), str(p.uuid), p.name]))")
    done = run_group([PY, "-c", code], timeout=120, env=env)
    assert done.rc == 0, done.stderr
    props = torch.cuda.get_device_properties(n)
    assert dev == "cuda" and json.loads(done.stdout.strip().splitlines()[-1]) == [1, str(props.uuid), props.name]
