"""resume.pt values of the wrong type or out of range are refused up front (one line, exit 2), not met mid-training
(a traceback from inside torch.optim, or from the summary after the whole remaining training) or silently acted on."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.checkpoint import read_checkpoint_meta
from train.state import check_resume


@pytest.fixture(scope="module")
def stopped_run(train_stopped) -> Path:
    """A run stopped mid-epoch at step 1 of 4."""
    return train_stopped(1)


def _group(i: int, key: str, value: object) -> Callable[[dict], None]:
    def edit(s: dict) -> None:
        s["optimizer"]["param_groups"][i][key] = value
    return edit


def _history(key: str, value: object) -> Callable[[dict], None]:
    def edit(s: dict) -> None:
        s["progress"]["history"][0][key] = value
    return edit


def _acc(key: str, value: object) -> Callable[[dict], None]:
    def edit(s: dict) -> None:
        s["progress"]["epoch_acc"][key] = value
    return edit


def _last_eval(value: object) -> Callable[[dict], None]:
    def edit(s: dict) -> None:
        s["progress"]["last_eval"]["raw"]["top1"] = value
    return edit


TAMPERINGS = {
    # The report's: a TypeError inside torch.optim at the first step.
    "lr string": (_group(0, "lr", "x"), "optimizer.param_groups[0].lr"),
    "weight_decay string": (_group(1, "weight_decay", "x"), "optimizer.param_groups[1].weight_decay"),
    "momentum string": (_group(0, "momentum", "x"), "optimizer.param_groups[0].momentum"),
    "betas strings": (_group(0, "betas", ("a", 0.9)), "optimizer.param_groups[0].betas"),
    "lr inf": (_group(0, "lr", math.inf), "optimizer.param_groups[0].lr"),
    "amsgrad string": (_group(0, "amsgrad", "yes"), "optimizer.param_groups[0].amsgrad"),
    "group not a dict": (lambda s: s["optimizer"]["param_groups"].__setitem__(0, "x"), "param_groups[0]"),
    "buffer string": (lambda s: next(iter(s["optimizer"]["state"].values())).__setitem__("exp_avg", "x"),
                      "optimizer.state"),
    # Well typed, but not this run's: load_state_dict would train on with the saved value.
    "another weight decay": (_group(1, "weight_decay", 0.5), "weight_decay is 0.5, this run's 0.05"),
    "another eps": (_group(0, "eps", 0.1), "eps is 0.1"),
    # The report's: a TypeError in best_of after the whole remaining training, and no checkpoint.
    "history string": (_history("val_top1", "abc"), "progress.history[0].val_top1"),
    "history above 1": (_history("val_top1", 2.0), "progress.history[0].val_top1"),
    "history tensor": (_history("train_loss", torch.tensor(1.0)), "progress.history[0].train_loss"),
    "history nan": (_history("lr", math.nan), "progress.history[0].lr"),
    # The report's: marked diverged and stopped, silently, exit 0.
    "loss sum inf": (_acc("loss_sum", math.inf), "loss_sum"),
    "loss sum nan": (_acc("loss_sum", math.nan), "loss_sum"),
    "time inf": (_acc("time", math.inf), "epoch_acc"),
    "train time inf": (lambda s: s["progress"].__setitem__("train_time_s", math.inf), "train_time_s"),
    "last eval string": (_last_eval("x"), "last_eval"),
    "diverged string": (lambda s: s["progress"].__setitem__("diverged", "no"), "progress.diverged"),
}


@pytest.mark.parametrize("case", TAMPERINGS)
def test_wrongly_typed_resume_values_are_one_line_exit_2(stopped_run, tmp_path, capsys, train_cli, case):
    from train.__main__ import main

    edit, needle = TAMPERINGS[case]
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    state = torch.load(run / "resume.pt", weights_only=True)
    edit(state)
    torch.save(state, run / "resume.pt")
    tampered = (run / "resume.pt").read_bytes()
    code, out, err = train_cli(main, ["--out", str(run), "--resume", "--max-steps", "0"], capsys)
    lines = err.strip().splitlines()
    assert code == 2, (code, err[-2000:])
    assert len(lines) == 1 and "resume.pt is damaged or from another run" in lines[0] and needle in lines[0], lines
    assert "resuming" not in out  # refused before any training
    assert (run / "resume.pt").read_bytes() == tampered
    assert read_checkpoint_meta(run).raw["training"]["steps"] == 1  # the checkpoint there is untouched


def test_a_run_that_diverged_mid_epoch_still_resumes_its_state(stopped_run):
    """A non-finite loss sum is what a run that diverged mid-epoch saves, with its NaN weights: not damage."""
    state = torch.load(stopped_run / "resume.pt", weights_only=True)
    assert check_resume(state) is None
    state["progress"]["epoch_acc"]["loss_sum"] = math.nan
    assert "loss_sum" in (check_resume(state) or "")
    next(iter(state["model"].values())).fill_(math.nan)
    assert check_resume(state) is None


def test_the_saved_rate_is_the_schedules_at_the_step(stopped_run, tmp_path, train_cli):
    """The rate is a function of the step: a resume sets it from the step, so an edited (finite) saved rate does
    not change the weights, and the resumed run ends exactly where an untouched one does."""
    from train.__main__ import main

    runs = []
    for lr in (None, 50.0):
        run = tmp_path / f"run-{lr}"
        shutil.copytree(stopped_run, run)
        if lr is not None:
            state = torch.load(run / "resume.pt", weights_only=True)
            for group in state["optimizer"]["param_groups"]:
                group["lr"] = lr
            torch.save(state, run / "resume.pt")
        code, _, _ = train_cli(main, ["--out", str(run), "--resume", "--max-steps", "2"])
        assert code == 0
        runs.append(load_file(str(read_checkpoint_meta(run).weights_path)))
    assert runs[0].keys() == runs[1].keys() and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
