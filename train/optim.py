"""Optimizer, learning-rate schedule and EMA of a recipe, built from timm's well-kept pieces."""

from __future__ import annotations

import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
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


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int,
                    total_steps: int) -> CosineLRScheduler:
    """Per-step cosine to min_lr_ratio x lr with a linear warm-up from warmup_start x lr (call step_update(n)).

    lr is the optimizer's (already batch-scaled) rate; the cosine spans all steps, warm-up included, as in pycls.
    """
    lr = optimizer.param_groups[0]["lr"]
    return CosineLRScheduler(
        optimizer, t_initial=max(total_steps, 1), lr_min=lr * cfg.min_lr_ratio,
        warmup_t=warmup_steps(cfg, steps_per_epoch, total_steps),
        warmup_lr_init=lr * cfg.warmup_start, warmup_prefix=False, t_in_epochs=False,
    )


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
