"""The optimiser and the learning-rate schedule of a run (or of a cohort's fused network, whose parameters
group the same way): SGD/Adam/AdamW with weight decay on weights only, linear warm-up, then cosine or constant."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from igkd.distill.config import TrainConfig


def warmup_epochs(config: TrainConfig) -> float:
    """Length of the linear warm-up in epochs: ``warmup_fraction`` of the run, at most ``warmup_epochs``."""
    return min(config.warmup_fraction * config.epochs, config.warmup_epochs)


def lr_lambda(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning-rate factor of each optimizer step: linear warm-up, then cosine to 0 (or constant)."""
    total = config.epochs * steps_per_epoch
    warmup = int(warmup_epochs(config) * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """``config.optimizer`` over ``model``: weight decay on weights (ndim > 1), none on biases and norms."""
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # One fused kernel per step for all parameters on CUDA (the for-each path launches several per tensor list).
    fused = {"fused": True} if next(model.parameters()).device.type == "cuda" else {}
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, **fused)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, **fused)
    # Adam's weight_decay is L2 in the gradient, as in the reference (which used none).
    return torch.optim.Adam(groups, lr=config.lr, **fused)


def build_schedule(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step schedule of ``optimizer`` (:func:`lr_lambda`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, steps_per_epoch))
