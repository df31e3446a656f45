"""What a run records about itself: the command that reruns it (no abbreviated options) and a diverged model's
accuracy (its NaN scores count as wrong, not as whatever classes topk happens to pick)."""

from __future__ import annotations

import json
import math

import torch
from torch import nn

from train.config import resolve_config, with_max_steps


def test_abbreviated_options_are_refused(tmp_path, capsys, train_cli):
    """argparse took `--max-step 20` for --max-steps, and the recorded command kept it: rerunning that command
    after a `--resume --max-steps 0` stopped at step 20 again."""
    from train.__main__ import main

    run = tmp_path / "run"
    argv = ["--model", "vit_c_micro", "--dataset", "digits", "--epochs", "0", "--out", str(run), "--max-step", "20"]
    code, _, err = train_cli(main, argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--max-step 20" in lines[0], err
    assert not run.exists()
    argv = ["--model", "vit_c_micro", "--dataset", "digits", "--epochs", "0", "--out", str(run), "--ep", "1"]
    code, _, err = train_cli(main, argv, capsys)
    assert code == 2 and "--ep" in err


def test_a_recorded_abbreviation_of_max_steps_is_replaced_on_resume():
    """Runs recorded before abbreviations were refused: their `--max-step N` (or `--max=N`) is still --max-steps."""
    began = ("python", "-m", "train", "--model", "m", "--out", "r", "--max-step", "20")
    assert with_max_steps(began, 0) == ("python", "-m", "train", "--model", "m", "--out", "r")
    assert with_max_steps((*began[:-2], "--max=5"), 7) == (*began[:-2], "--max-steps", "7")
    assert with_max_steps(("python", "-m", "train", "--model", "m"), 0) == ("python", "-m", "train", "--model", "m")
    saved = resolve_config({"model": "vit_c_micro", "dataset": "digits", "out": "r", "max_steps": 20,
                            "command": began}).to_dict()
    resumed = resolve_config({"out": "r", "resume": True, "max_steps": 0}, saved)
    assert resumed.command == ("python", "-m", "train", "--model", "m", "--out", "r")


class _Scores(nn.Module):
    """Fixed scores for a batch of four images (labels 0..3)."""

    def __init__(self, scores: torch.Tensor) -> None:
        super().__init__()
        self.scores = scores

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores[: len(x)]


def test_non_finite_scores_count_as_misclassified():
    from train.distributed import DistInfo
    from train.evaluate import evaluate
    from train.pipeline import EvalBatch

    info = DistInfo(0, 1, 0, 1, torch.device("cpu"))
    batch = EvalBatch(images=torch.zeros(4, 3, 2, 2), labels=torch.arange(4), ok=torch.ones(4, dtype=torch.bool),
                      corrupt=[])
    nan = torch.full((4, 6), math.nan)
    res = evaluate(_Scores(nan), [batch], info)
    assert (res["top1"], res["top5"], res["loss"], res["samples"]) == (0.0, 0.0, None, 4)
    # One image with an infinite score among finite ones is wrong too; the other three are scored as usual.
    scores = torch.eye(4, 6) * 5
    scores[3, 0] = math.inf
    res = evaluate(_Scores(scores), [batch], info)
    assert (res["top1"], res["top5"]) == (0.75, 0.75)


def test_a_diverged_run_records_and_prints_zero_accuracy(tmp_path, capsys, train_cli):
    """The report's run scored 7.8 % top-1 with NaN logits in metrics.jsonl, the epoch's line and the checkpoint."""
    from train.__main__ import main

    run = tmp_path / "run"
    argv = ["--model", "vit_c_micro", "--dataset", "digits", "--train-subset", "512", "--val-subset", "64",
            "--batch-size", "64", "--threads", "1", "--epochs", "3", "--lr", "100", "--warmup-epochs", "0",
            "--optimizer", "sgd", "--momentum", "0.99", "--out", str(run)]
    code, out, err = train_cli(main, argv, capsys)
    assert code == 0, err
    record = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["diverged"] is True
    assert (record["val_top1"], record["val_top5"], record["val_loss"]) == (0.0, 0.0, None)
    training = json.loads((run / "checkpoint.json").read_text())["training"]
    assert training["diverged"] is True and training["final_val_top1"] == 0.0 and training["final_val_top5"] == 0.0
    assert "val top-1 0.00%" in out and "loss diverged" in out
