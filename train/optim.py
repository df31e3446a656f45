"""Optimizer, learning-rate schedule (pycls's) and EMA of a recipe; the optimizer groups and EMA are timm's."""

from __future__ import annotations

import math

import torch
from timm.optim import param_groups_weight_decay
from timm.utils import ModelEmaV3
from torch import nn

from train.config import TrainConfig


def scaled_lr(cfg: TrainConfig, global_batch: int) -> float:
    """The recipe's lr scaled linearly from its reference batch to the actual global batch."""
    return cfg.lr * global_batch / cfg.lr_ref_batch


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights decayed; biases and norm (1-D) parameters not. Class token and pos-embed are decayed."""
    return param_groups_weight_decay(model, weight_decay)


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov) over `param_groups`, fused on CUDA."""
    groups = param_groups(model, cfg.weight_decay)
    fused = next(model.parameters()).device.type == "cuda"
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               fused=fused or None)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


class Schedule:
    """pycls's learning-rate policy, per optimizer step t of T: lr x cosine(t) x warm-up(t), where cosine(t) goes
    from 1 to min_lr_ratio over the whole run (warm-up included) and the warm-up factor rises linearly from
    warmup_start to 1 over the warm-up steps (core/optimizer.py get_epoch_lr: the factor multiplies the cosine).
    So the rate is continuous, and a run no longer than its warm-up still anneals; timm's scheduler (used before)
    rose to the full rate and then dropped to the cosine's value at the end of warm-up. Stateless: the rate is a
    function of the step, so a resume needs only the step."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup: int, warmup_start: float,
                 min_lr_ratio: float) -> None:
        self.optimizer = optimizer
        self.base = [g["lr"] for g in optimizer.param_groups]  # already batch-scaled
        self.total, self.warmup = max(total_steps, 1), warmup
        self.warmup_start, self.min_lr_ratio = warmup_start, min_lr_ratio
        self.step_update(0)

    def factor(self, step: int) -> float:
        """The rate at `step` as a fraction of the base rate."""
        t = min(max(step, 0), self.total)
        cosine = self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t / self.total))
        if t < self.warmup:
            alpha = t / self.warmup
            cosine *= self.warmup_start * (1 - alpha) + alpha
        return cosine

    def step_update(self, step: int) -> None:
        """Set every group's rate for optimizer step `step`."""
        f = self.factor(step)
        for group, base in zip(self.optimizer.param_groups, self.base, strict=True):
            group["lr"] = base * f

    def state_dict(self) -> dict:
        return {}


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int,
                    total_steps: int) -> Schedule:
    """The recipe's `Schedule` over `total_steps` (call step_update(n) before step n)."""
    return Schedule(optimizer, total_steps, round(cfg.warmup_epochs * steps_per_epoch), cfg.warmup_start,
                    cfg.min_lr_ratio)


def warmup_steps(cfg: TrainConfig, steps_per_epoch: int, total_steps: int) -> int:
    """Optimizer steps of the warm-up (the EMA copies the weights until they are done)."""
    return min(round(cfg.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))


def ema_decay(cfg: TrainConfig, total_steps: int) -> float:
    """Per-update decay whose averaging length is `ema_horizon` of the run: 1 - every / (horizon x steps)."""
    span = cfg.ema_horizon * max(total_steps, 1)
    return max(0.0, 1.0 - cfg.ema_every / max(span, 1.0))


def build_ema(model: nn.Module, cfg: TrainConfig, total_steps: int) -> ModelEmaV3 | None:
    """timm's EMA of all parameters and buffers (BN statistics too), or None when off."""
    if not cfg.ema:
        return None
    return ModelEmaV3(model, decay=ema_decay(cfg, total_steps))
