"""A resume.pt whose optimizer state or progress counters differ from what this run would hold is refused before
the first step (one line, exit 2): every setting of the optimizer's groups (torch's load_state_dict takes the saved
ones: amsgrad failed mid-run with a KeyError, maximize trained by gradient ascent), each buffer's names, shape,
dtype and values, step counts within the run's steps, and counters that agree with each other."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.checkpoint import read_checkpoint_meta
from models.registry import build_model
from train.config import TrainConfig
from train.optim import build_optimizer
from train.state import check_resume


@pytest.fixture(scope="module")
def stopped_run(train_stopped) -> Path:
    """A run stopped mid-epoch at step 1 of 4."""
    return train_stopped(1)


def _state(run: Path) -> dict:
    return torch.load(run / "resume.pt", weights_only=True)


def _optimizer(state: dict) -> torch.optim.Optimizer:
    """The optimizer this run builds (its configuration, the model's parameters): what a resume compares with."""
    cfg = TrainConfig.from_dict(state["config"])
    return build_optimizer(build_model(cfg.model, num_classes=10), cfg, lr=1e-3)


def _group(key: str, value: object) -> Callable[[dict], None]:
    return lambda s: s["optimizer"]["param_groups"][0].__setitem__(key, value)


def _buffer(key: str, value: Callable[[torch.Tensor], object]) -> Callable[[dict], None]:
    def edit(s: dict) -> None:
        buffers = s["optimizer"]["state"][0]
        buffers[key] = value(buffers.get(key, buffers["exp_avg"]))
    return edit


OPTIMIZER = {
    # The report's: a KeyError traceback mid-run, or accepted and trained on.
    "amsgrad": (_group("amsgrad", True), "param_groups[0].amsgrad is True, this run's False"),
    "maximize": (_group("maximize", True), "param_groups[0].maximize is True, this run's False"),
    "coupled weight decay": (_group("decoupled_weight_decay", False), "decoupled_weight_decay is False"),
    "differentiable": (_group("differentiable", True), "differentiable is True"),
    "capturable": (_group("capturable", True), "capturable is True"),
    "negative step": (_buffer("step", lambda t: torch.tensor(-5.0)), "step: -5 steps, this run is at step 1"),
    "step beyond the run's": (_buffer("step", lambda t: torch.tensor(1e9)), "step: 1e+09 steps"),
    "fractional step": (_buffer("step", lambda t: torch.tensor(0.5)), "step: 0.5 steps"),
    "integer step": (_buffer("step", lambda t: torch.tensor(1)), "expected a float32 step count"),
    "NaN moment": (_buffer("exp_avg", lambda t: torch.full_like(t, math.nan)), "exp_avg: holds NaN or infinity"),
    "negative square": (_buffer("exp_avg_sq", lambda t: -torch.ones_like(t)), "exp_avg_sq: holds a negative"),
    "float64 moment": (_buffer("exp_avg", lambda t: t.double()), "exp_avg: torch.float64 of shape"),
    "moment of another shape": (_buffer("exp_avg", lambda t: t[:1]), "exp_avg: torch.float32 of shape (1,)"),
    "amsgrad's buffer": (_buffer("max_exp_avg_sq", torch.zeros_like), "a step of this run's optimizer keeps"),
    "a buffer missing": (lambda s: s["optimizer"]["state"][0].pop("exp_avg_sq"), "holds ['exp_avg', 'step']"),
    "an unknown parameter": (lambda s: s["optimizer"]["state"].__setitem__(10**6, dict(s["optimizer"]["state"][0])),
                             "optimizer.state[1000000]: no parameter group lists parameter 1000000"),
    "one group": (lambda s: s["optimizer"]["param_groups"].pop(), "1 parameter groups, this run's optimizer has 2"),
}


@pytest.mark.parametrize("case", OPTIMIZER)
def test_an_optimizer_state_this_run_would_not_build_is_named(stopped_run, case):
    from train.state import all_finite, optimizer_problem

    state = _state(stopped_run)
    optimizer, step = _optimizer(state), state["progress"]["global_step"]
    assert optimizer_problem(state["optimizer"], optimizer, step, weights_finite=True) is None
    edit, needle = OPTIMIZER[case]
    edit(state)
    if (problem := check_resume(state)) is None:
        problem = optimizer_problem(state["optimizer"], optimizer, step, weights_finite=all_finite(state["model"]))
    assert problem is not None and needle in problem, problem


def _progress(key: str, value: object) -> Callable[[dict], None]:
    return lambda s: s["progress"].__setitem__(key, value)


def _acc(key: str, value: object) -> Callable[[dict], None]:
    return lambda s: s["progress"]["epoch_acc"].__setitem__(key, value)


PROGRESS = {
    "global step": (_progress("global_step", 10**9), "global_step is 1000000000, but epoch 0 and step 1 of 4"),
    "no samples": (_acc("samples", 0), "epoch_acc.samples is 0, but 1 steps of a global batch of 16"),
    "fractional samples": (_acc("samples", 1.5), "progress.epoch_acc: unexpected value"),
    "too many samples": (_acc("samples", 10**12), "epoch_acc.samples is 1000000000000"),
    "more corrupt than samples": (_acc("corrupt", 17), "corrupt is 17, more than its 16 samples"),
    "negative loss sum": (_acc("loss_sum", -1e30), "is negative"),
    "last eval": (lambda s: s["progress"]["last_eval"].__setitem__("global_step", -3), "last_eval.global_step is -3"),
    "start time": (_progress("started", "garbage"), "progress.started: unexpected value 'garbage'"),
    "world size": (lambda s: s.__setitem__("world_size", 3), "global_batch 16 is not a multiple of world_size 3"),
    "numpy keys": (lambda s: s["rng"]["numpy"].__setitem__("keys", s["rng"]["numpy"]["keys"] - 2**32),
                   "rng.numpy.keys: expected integers from 0 to 2**32 - 1"),
}


@pytest.mark.parametrize("case", PROGRESS)
def test_counters_that_disagree_are_named(stopped_run, case):
    state = _state(stopped_run)
    edit, needle = PROGRESS[case]
    edit(state)
    problem = check_resume(state)
    assert problem is not None and needle in problem, problem


def test_a_run_diverging_mid_epoch_keeps_its_nan_state(stopped_run):
    """Weights and moments turn NaN together (one step with NaN gradients): a save then is not damage."""
    from train.state import all_finite, optimizer_problem

    state = _state(stopped_run)
    for tensors in (state["model"], *state["optimizer"]["state"].values()):
        for key, value in tensors.items():
            if key != "step" and value.is_floating_point():
                value.fill_(math.nan)
    assert not all_finite(state["model"]) and check_resume(state) is None
    assert optimizer_problem(state["optimizer"], _optimizer(state), 1, weights_finite=False) is None


def test_sgd_momentum_state_fits_an_sgd_run():
    from train.state import optimizer_problem

    model = torch.nn.Linear(3, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    model(torch.ones(1, 3)).sum().backward()
    sgd.step()
    saved = sgd.state_dict()
    assert optimizer_problem(saved, sgd, 1, weights_finite=True) is None
    saved["state"][0]["momentum_buffer"] = torch.zeros(5)
    assert "momentum_buffer: torch.float32 of shape (5,)" in optimizer_problem(saved, sgd, 1, weights_finite=True)


@pytest.mark.parametrize(("edit", "needle"), [OPTIMIZER["amsgrad"], OPTIMIZER["maximize"],
                                              OPTIMIZER["negative step"], PROGRESS["global step"]],
                         ids=["amsgrad", "maximize", "negative step", "global step"])
def test_the_report_cases_are_one_line_exit_2_before_any_step(stopped_run, tmp_path, capsys, train_cli, edit, needle):
    from train.__main__ import main

    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    state = _state(run)
    edit(state)
    torch.save(state, run / "resume.pt")
    tampered = (run / "resume.pt").read_bytes()
    code, out, err = train_cli(main, ["--out", str(run), "--resume", "--max-steps", "2"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "resume.pt is damaged or from another run" in lines[0] and needle in lines[0], lines
    assert "resuming" not in out and "epoch" not in out
    assert (run / "resume.pt").read_bytes() == tampered


def test_fused_is_the_devices_choice_and_the_run_takes_its_own(stopped_run, tmp_path, train_cli):
    """A state saved on a GPU (fused AdamW) resumes on the CPU as this run builds it, to the same weights."""
    from train.__main__ import main

    weights = []
    for fused in (None, True):
        run = tmp_path / f"run-{fused}"
        shutil.copytree(stopped_run, run)
        state = _state(run)
        for group in state["optimizer"]["param_groups"]:
            group["fused"] = fused
        torch.save(state, run / "resume.pt")
        code, _, err = train_cli(main, ["--out", str(run), "--resume", "--max-steps", "2", "--no-progress"])
        assert code == 0, err
        weights.append(load_file(str(read_checkpoint_meta(run).weights_path)))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
