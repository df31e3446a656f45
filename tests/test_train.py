"""Training: recipes, parameter groups, the lr schedule, EMA rate, --epochs 0, train.eval and bad-input errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from data.datasets import load_dataset
from models import build_model
from models.checkpoint import load_checkpoint
from train.__main__ import main as train_main
from train.config import RECIPES, ConfigError, TrainConfig, resolve_config
from train.eval import main as eval_main
from train.optim import build_optimizer, build_scheduler, ema_decay, scaled_lr


def cfg(**kw) -> TrainConfig:
    return resolve_config({"model": "vit_c_micro", "dataset": "animals", "out": "unused", **kw})


def test_recipes_and_auto_choice(tmp_path):
    assert cfg().recipe == "small"
    paper = cfg(recipe="paper")
    assert (paper.optimizer, paper.lr, paper.lr_ref_batch, paper.weight_decay) == ("adamw", 1e-3, 2048, 0.24)
    assert (paper.warmup_epochs, paper.warmup_start, paper.min_lr_ratio) == (5.0, 0.1, 0.005)
    assert (paper.label_smoothing, paper.mixup, paper.cutmix, paper.augment) == (0.1, 0.8, 1.0, "autoaugment")
    assert paper.ema and paper.ema_every == 32
    sgd = cfg(recipe="paper-sgd")
    assert (sgd.optimizer, sgd.lr, sgd.weight_decay, sgd.momentum, sgd.nesterov) == ("sgd", 2.54, 2.4e-5, 0.9, True)
    # Every knob is overridable; a folder defaults to the paper recipe.
    assert cfg(recipe="paper", lr=5e-4, mixup=0.0).lr == 5e-4
    folder = resolve_config({"model": "vit_c_micro", "dataset": str(tmp_path), "out": "x"})
    assert folder.recipe == "paper" and folder.dataset == str(tmp_path.resolve())
    assert set(RECIPES) == {"paper", "paper-sgd", "small"}


def test_lr_scales_linearly_with_the_global_batch():
    paper = cfg(recipe="paper")
    assert scaled_lr(paper, 2048) == pytest.approx(1e-3)
    assert scaled_lr(paper, 256) == pytest.approx(1.25e-4)
    assert scaled_lr(cfg(), 128) == pytest.approx(cfg().lr)


@pytest.mark.parametrize("name", ["vit_c_micro", "vit_p_micro"])
@pytest.mark.parametrize("recipe", ["paper", "paper-sgd"])
def test_no_weight_decay_on_biases_and_norms(name, recipe):
    model = build_model(name)
    opt = build_optimizer(model, cfg(model=name, recipe=recipe), lr=0.1)
    norm_types = (nn.LayerNorm, nn.BatchNorm2d)
    expect_no_decay = set()
    for mod_name, mod in model.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p_name == "bias" or isinstance(mod, norm_types):
                expect_no_decay.add(full)
    by_id = {id(p): n for n, p in model.named_parameters()}
    decayed = {by_id[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    not_decayed = {by_id[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert not_decayed == expect_no_decay
    assert decayed == set(by_id.values()) - expect_no_decay
    assert {"cls_token", "pos_embed", "head.weight"} <= decayed  # the paper decays these
    wd = {g["weight_decay"] for g in opt.param_groups} - {0.0}
    assert wd == {RECIPES[recipe]["weight_decay"]}
    assert isinstance(opt, torch.optim.SGD if recipe == "paper-sgd" else torch.optim.AdamW)


def test_lr_schedule_warmup_then_cosine():
    c = cfg(warmup_epochs=2.0, warmup_start=0.1, min_lr_ratio=0.005, epochs=10)
    steps_per_epoch, total, base = 10, 100, 2.0
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    sched = build_scheduler(opt, c, steps_per_epoch, total)
    seen = []
    for t in range(total + 1):
        if t:
            sched.step_update(t)
        seen.append(opt.param_groups[0]["lr"])
    lo = base * 0.005
    for t, lr in enumerate(seen):
        # pycls: the cosine over the whole run (down to 0.005x), times a warm-up factor from 0.1 to 1 over 2 epochs
        cosine = lo + 0.5 * (base - lo) * (1 + math.cos(math.pi * t / total))
        want = cosine * (0.1 + 0.9 * t / 20) if t < 20 else cosine
        assert lr == pytest.approx(want, rel=1e-9), t
    assert seen[0] == pytest.approx(0.2) and seen[-1] == pytest.approx(lo)
    assert all(a >= b for a, b in zip(seen[20:], seen[21:], strict=False))
    # Continuous: no drop where the warm-up ends (timm's scheduler rose to the base, then fell to the cosine).
    assert max(abs(b - a) for a, b in zip(seen, seen[1:], strict=False)) < 0.05 * base


def test_a_run_no_longer_than_its_warm_up_still_anneals():
    """pycls multiplies the warm-up into the cosine: a 4-epoch run with 5 warm-up epochs peaks at about 0.26x and
    ends at the floor; the earlier scheduler held it in warm-up to 0.998x until its last step."""
    c = cfg(warmup_epochs=5.0, warmup_start=0.1, min_lr_ratio=0.005, epochs=4)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, c, 100, 400)
    rates = []
    for t in range(401):
        sched.step_update(t)
        rates.append(opt.param_groups[0]["lr"])
    assert max(rates) == pytest.approx(0.257, abs=0.005) and rates[-1] == pytest.approx(0.005 * (0.1 * 0.2 + 0.8))


def test_ema_rate_reproduces_the_papers():
    # ImageNet-1k at batch 2048 for 400 epochs, updated every 32 steps: the paper's rate is ~1.6e-3.
    steps = 1_281_167 // 2048 * 400
    decay = ema_decay(cfg(recipe="paper"), steps)
    assert 1 - decay == pytest.approx(1.6e-3, rel=0.05)


@pytest.mark.parametrize("argv, needle", [
    (["--model", "vit_q_9", "--dataset", "animals"], "unknown model"),
    (["--model", "vit_c_micro", "--dataset", "imagenet21k"], "unknown dataset"),
    (["--model", "vit_c_micro", "--dataset", "animals", "--epochs", "-1"], "--epochs"),
    (["--model", "vit_c_micro", "--dataset", "animals", "--lr", "0"], "--lr"),
    (["--model", "vit_c_micro", "--dataset", "animals", "--lr", "nan"], "--lr"),
    (["--model", "vit_c_micro", "--dataset", "animals", "--batch-size", "0"], "--batch-size"),
    (["--model", "vit_c_micro", "--dataset", "animals", "--label-smoothing", "1.5"], "--label-smoothing"),
    (["--model", "vit_c_micro", "--dataset", "animals", "--mixup", "-1"], "--mixup"),
    (["--model", "vit_c_micro", "--dataset", "animals", "--crop-scale", "0"], "--crop-scale"),
    (["--model", "vit_c_micro", "--dataset", "animals", "--epochs", "ten"], "--epochs"),
    (["--model", "vit_c_micro", "--dataset", "animals", "--augment", "randaugment"], "--augment"),
    (["--model", "vit_c_micro", "--dataset", "animals", "--resume", "--overwrite"], "exclude"),
    (["--dataset", "animals"], "--model"),
])
def test_bad_options_exit_2_with_one_line(argv, needle, capsys, tmp_path, train_cli):
    code, out, err = train_cli(train_main, [*argv, "--out", str(tmp_path / "run")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m train: error:") and needle in lines[0], err
    assert not (tmp_path / "run" / "checkpoint.json").exists()


@pytest.fixture(scope="module")
def train_initial_run(tmp_path_factory, train_cli) -> Path:
    """An --epochs 0 run of vit_c_micro on digits (the export stage's random-init checkpoint)."""
    out = tmp_path_factory.mktemp("init") / "run"
    code, _, _ = train_cli(train_main, ["--model", "vit_c_micro", "--dataset", "digits", "--epochs", "0",
                                      "--out", str(out)])
    assert code == 0
    return out


def test_epochs_zero_writes_the_initial_checkpoint(train_initial_run):
    model, meta = load_checkpoint(train_initial_run)
    torch.manual_seed(0)
    fresh = build_model("vit_c_micro", num_classes=10)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(),
                                                 strict=True))
    raw = meta.raw
    assert raw["dataset"] == "digits" and raw["weights_source"] == "raw"
    assert meta.preprocessing.crop == 32 and meta.preprocessing.mode == "L"
    t = raw["training"]
    assert t["epochs"] == 0 and t["steps"] == 0 and 0.0 <= t["final_val_top1"] <= 1.0
    assert t["final_val_top1_ema"] is None and t["val_images"] == len(load_dataset("digits", "val"))
    assert {"wall_time_s", "command_line", "versions", "config", "best_val_top1"} <= set(t)
    assert t["data"] == {split: load_dataset("digits", split).fingerprint() for split in ("train", "val")}
    lines = (train_initial_run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0]


def test_a_bundle_carries_the_training_provenance(train_stopped, tmp_path):
    import hashlib

    from export.bundle import build_bundle

    run = train_stopped(2)  # trained: an --epochs 0 run's zero head gives every image the same logits
    t = json.loads((run / "checkpoint.json").read_text())["training"]
    p = build_bundle(run, tmp_path / "b", ["torch"], max_batch=4, parity_samples=16, log=lambda _: None).provenance
    assert p.training_command == t["command_line"] and p.training_data_fingerprint == t["data"]["train"]
    assert p.training_config_sha256 == hashlib.sha256(json.dumps(t["config"], sort_keys=True).encode()).hexdigest()
    assert p.calibration_data_fingerprint is None and p.libraries["torch"]


def test_eval_cli_matches_the_training_summary(train_initial_run, capsys, tmp_path, train_cli, monkeypatch):
    import torch

    out_json = tmp_path / "eval.json"
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    code, out, err = train_cli(eval_main, ["--checkpoint", str(train_initial_run), "--out", str(out_json),
                                           "--threads", "1"], capsys)
    assert code == 0, err
    assert threads[:1] == [1]  # --threads, like train, export and serve (it was refused)
    res = json.loads(out_json.read_text())
    summary = json.loads((train_initial_run / "checkpoint.json").read_text())["training"]
    assert res["top1"] == summary["final_val_top1"] and res["dataset"] == "digits"
    assert res["samples"] == summary["val_images"]
    assert res["top1"] <= res["top5"] and "top-1" in out
    code, _, err = train_cli(eval_main, ["--checkpoint", str(tmp_path / "nothing")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_an_existing_run_needs_resume_or_overwrite(train_initial_run, capsys, train_cli):
    argv = ["--model", "vit_c_micro", "--dataset", "digits", "--epochs", "0", "--out", str(train_initial_run)]
    code, _, err = train_cli(train_main, argv, capsys)
    assert code == 2 and "--resume" in err and len(err.strip().splitlines()) == 1


def test_resume_refuses_to_change_the_trajectory(tmp_path, capsys, train_cli):
    out = tmp_path / "run"
    base = ["--model", "vit_p_micro", "--dataset", "digits", "--epochs", "1", "--batch-size", "64", "--out", str(out)]
    code, _, err = train_cli(train_main, [*base, "--max-steps", "2"], capsys)
    assert code == 0, err
    code, _, err = train_cli(train_main, ["--out", str(out), "--resume", "--lr", "0.5"], capsys)
    assert code == 2 and "cannot change" in err and "--lr" in err
    with pytest.raises(ConfigError):
        resolve_config({"model": "vit_p_micro"}, saved={**cfg().to_dict(), "batch_size": 0})


def test_a_diverging_run_stops_and_records_strict_json(tmp_path, capsys, train_cli):
    out = tmp_path / "run"
    argv = ["--model", "vit_p_micro", "--dataset", "digits", "--epochs", "3", "--optimizer", "sgd", "--lr", "100",
            "--train-subset", "512", "--val-subset", "64", "--out", str(out)]
    code, _, err = train_cli(train_main, argv, capsys)
    assert code == 0, err

    def no_nan(token: str):
        raise AssertionError(f"non-JSON number {token}")

    t = json.loads((out / "checkpoint.json").read_text(), parse_constant=no_nan)["training"]
    assert t["diverged"] is True and t["epochs_completed"] < 3 and t["final_val_loss"] is None
    history = [json.loads(x, parse_constant=no_nan) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == t["epochs_completed"]  # stopped at the first non-finite epoch
    assert history[-1]["diverged"] is True and history[-1]["train_loss"] is None


def test_the_ema_copies_every_warm_up_step_not_every_ema_every():
    """A paper-recipe run shorter than ema_every (32) steps reported its EMA as the untrained initial weights (0 %):
    the warm-up copy ran only on multiples of 32. It copies at every warm-up step; afterwards it averages every 32."""
    from types import SimpleNamespace

    from timm.utils import ModelEmaV3

    from train.trainer import Trainer

    net = nn.Linear(2, 2)
    fake = SimpleNamespace(ema=ModelEmaV3(net, decay=0.9), cfg=SimpleNamespace(ema_every=32), warmup=10, net=net)
    with torch.no_grad():
        net.weight.add_(1.0)
    Trainer._update_ema(fake, 3)  # a warm-up step that is no multiple of 32
    assert torch.equal(fake.ema.module.weight, net.weight)
    with torch.no_grad():
        net.weight.add_(1.0)
    Trainer._update_ema(fake, 33)  # after warm-up, off the 32-step grid: untouched
    assert not torch.equal(fake.ema.module.weight, net.weight)
