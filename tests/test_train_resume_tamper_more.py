"""More resume.pt tampering refused before the first step (one line, exit 2): an optimizer group without a setting a
step reads (a KeyError traceback mid-run before), and states training never writes that were trained on quietly:
optimizer buffers missing for some or all parameters, step counts other than the run's, a NaN weight whose buffers
are finite, a negative or NaN BatchNorm running variance with finite weights, a NaN EMA with finite weights, a
negative batch count, samples or a history step the run's steps did not make, and no epoch sums mid-epoch. A run
diverging mid-epoch (weights, buffers and statistics NaN together) is still accepted."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from models.registry import build_model
from train.config import TrainConfig
from train.optim import build_optimizer
from train.state import all_finite, check_resume, optimizer_problem


@pytest.fixture(scope="module")
def stopped_run(train_stopped) -> Path:
    """Stopped at step 2 of the first epoch's 4: AdamW buffers with counts of 2, epoch sums, BatchNorm in the stem."""
    return train_stopped(2)


def _state(run: Path) -> dict:
    return torch.load(run / "resume.pt", weights_only=True)


def _problem(state: dict) -> str | None:
    """What a resume says of `state`: its own checks, then the optimizer's against this run's, the weights loaded
    first (as the trainer does)."""
    if problem := check_resume(state):
        return problem
    cfg = TrainConfig.from_dict(state["config"])
    model = build_model(cfg.model, num_classes=10)
    model.load_state_dict(state["model"])
    return optimizer_problem(state["optimizer"], build_optimizer(model, cfg, lr=1e-3),
                             state["progress"]["global_step"], weights_finite=all_finite(state["model"]))


def _fill(tensors_of: Callable[[dict], dict], key: str, value: float) -> Callable[[dict], None]:
    return lambda s: tensors_of(s)[key].fill_(value)


CASES = {
    "one parameter's buffers": (lambda s: s["optimizer"]["state"].pop(5),
                                "nothing for parameter 5 at step 2"),
    "every parameter's buffers": (lambda s: s["optimizer"]["state"].clear(), "nothing for parameter 0 at step 2"),
    "a lowered step count": (lambda s: s["optimizer"]["state"][0]["step"].fill_(1.0),
                             "optimizer.state[0].step: 1 steps, this run is at step 2"),
    "a NaN weight": (_fill(lambda s: s["model"], "head.bias", math.nan),
                     "finite buffers for a parameter that holds NaN or infinity"),
    "a negative running variance": (_fill(lambda s: s["model"], "stem.body.1.running_var", -1.0),
                                    "model.stem.body.1.running_var: holds a negative value"),
    "a NaN running variance": (_fill(lambda s: s["model"], "stem.body.4.running_var", math.nan),
                               "model.stem.body.4.running_var: holds NaN or infinity, with finite weights"),
    "the EMA's negative running variance": (_fill(lambda s: s["ema"], "module.stem.body.1.running_var", -1.0),
                                            "ema.module.stem.body.1.running_var: holds a negative"),
    "a NaN EMA with finite weights": (_fill(lambda s: s["ema"], "module.head.weight", math.nan),
                                      "ema: holds NaN or infinity, with finite weights"),
    "a negative batch count": (_fill(lambda s: s["model"], "stem.body.1.num_batches_tracked", -3),
                               "model.stem.body.1.num_batches_tracked: holds a negative value"),
    "samples seen of another batch": (lambda s: s["progress"].__setitem__("samples_seen", 5),
                                      "progress.samples_seen is 5, but 2 steps of a global batch of 16 trained 32"),
    "a history step ahead of the run": (lambda s: s["progress"]["history"].append({"epoch": 1, "step": 4}),
                                        "step is 4, after the run's step 2"),
}
# Refused by the trainer (a hand-built state without sums still loads as a run directory).
NO_EPOCH_SUMS = (lambda s: s["progress"].__setitem__("epoch_acc", None),
                 "progress.epoch_acc is None at step 2 of epoch 0")


def test_the_state_as_saved_passes(stopped_run):
    state = _state(stopped_run)
    assert state["progress"]["global_step"] == 2 and state["ema"] is not None
    assert _problem(state) is None


@pytest.mark.parametrize("case", CASES)
def test_a_state_training_never_writes_is_named(stopped_run, case):
    state = _state(stopped_run)
    edit, needle = CASES[case]
    edit(state)
    problem = _problem(state)
    assert problem is not None and needle in problem, problem


def test_unequal_step_counts_are_named(stopped_run):
    """Every parameter takes every step: one count raised to the run's step and another lowered is not a run's."""
    state = _state(stopped_run)
    state["optimizer"]["state"][3]["step"].fill_(1.0)
    problem = _problem(state)
    assert problem is not None and "optimizer.state[3].step: 1 steps, this run is at step 2" in problem, problem


def test_a_run_diverging_mid_epoch_is_still_accepted(stopped_run):
    """One step with NaN gradients leaves weights, buffers, BatchNorm statistics and (at the next update) the EMA NaN
    with the epoch's loss sum still finite: a save then is a diverging run's, not damage."""
    state = _state(stopped_run)
    for tensors in (state["model"], state["ema"], *state["optimizer"]["state"].values()):
        for key, value in tensors.items():
            if key not in ("step", "num_batches_tracked") and value.is_floating_point():
                value.fill_(math.nan)
    assert math.isfinite(state["progress"]["epoch_acc"]["loss_sum"])
    assert _problem(state) is None


def test_an_overflowed_square_with_finite_weights_is_a_runs_not_damage(stopped_run):
    """A huge finite gradient's square overflows to infinity and the weights stay finite; NaN there is damage."""
    state = _state(stopped_run)
    state["optimizer"]["state"][0]["exp_avg_sq"].fill_(math.inf)
    assert _problem(state) is None
    state["optimizer"]["state"][0]["exp_avg_sq"].fill_(math.nan)
    problem = _problem(state)
    assert problem is not None and "exp_avg_sq: holds NaN, with finite weights" in problem, problem


def test_a_run_whose_rate_overflows_its_squares_resumes(tmp_path, train_cli, train_tiny):
    """AdamW at a far too high rate: at step 3 some second moments are infinite, the weights still finite."""
    from train.__main__ import main

    run = tmp_path / "run"
    argv = [*train_tiny, "--max-steps", "3", "--lr", "100", "--weight-decay", "10", "--lr-ref-batch", "16",
            "--warmup-epochs", "0", "--out", str(run)]
    code, _, err = train_cli(main, argv)
    assert code == 0, err
    state = _state(run)
    squares = [b["exp_avg_sq"] for b in state["optimizer"]["state"].values()]
    assert all_finite(state["model"]) and not all(bool(torch.isfinite(t).all()) for t in squares)
    code, _, err = train_cli(main, ["--out", str(run), "--resume", "--max-steps", "4"])
    assert code == 0, err


def _resume_tampered(run: Path, edit: Callable[[dict], None], train_cli, capsys) -> tuple[int, str, str, bytes]:
    from train.__main__ import main

    state = _state(run)
    edit(state)
    torch.save(state, run / "resume.pt")
    tampered = (run / "resume.pt").read_bytes()
    code, out, err = train_cli(main, ["--out", str(run), "--resume", "--max-steps", "3"], capsys)
    return code, out, err, tampered


def _drop(key: str) -> Callable[[dict], None]:
    return lambda s: s["optimizer"]["param_groups"][1].pop(key)


@pytest.mark.parametrize(("edit", "needle"), [
    (_drop("weight_decay"), "optimizer.param_groups[1] has no 'weight_decay', this run's is 0.05"),
    (_drop("eps"), "optimizer.param_groups[1] has no 'eps'"),
    (_drop("betas"), "optimizer.param_groups[1] has no 'betas'"),
    CASES["every parameter's buffers"], CASES["a NaN weight"], NO_EPOCH_SUMS,
    CASES["a negative running variance"], CASES["a NaN EMA with finite weights"],
], ids=["no weight_decay", "no eps", "no betas", "no buffers", "NaN weight", "no epoch sums", "negative variance",
        "NaN EMA"])
def test_refused_in_one_line_exit_2_before_any_step(stopped_run, tmp_path, capsys, train_cli, edit, needle):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    code, out, err, tampered = _resume_tampered(run, edit, train_cli, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "resume.pt is damaged or from another run" in lines[0] and needle in lines[0], lines
    assert "resuming" not in out and "epoch" not in out
    assert (run / "resume.pt").read_bytes() == tampered
