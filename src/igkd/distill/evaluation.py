"""Evaluation inside training: every member's logits in eval mode, BatchNorm statistics recomputed for the
current weights, and each member's accuracy on its validation part or on the test split."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from igkd.data.dataset import Dataset
from igkd.devices import autocast, full_precision, unit_pixels
from igkd.distill.config import TrainConfig
from igkd.distill.data_plan import Member
from igkd.evaluate.accuracy import accuracy_report


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    from igkd.models.fused import FusedBatchNorm2d

    kinds = (nn.modules.batchnorm._BatchNorm, FusedBatchNorm2d)
    return [m for m in model.modules() if isinstance(m, kinds) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device, amp: bool = True) -> int:
    """Recompute every BatchNorm's running mean/var from ``images`` (uint8 [N, C, H, W]) with the current weights.

    The running averages (momentum 0.1) mix statistics of the last few dozen steps' weights; early in
    training, or in a short run, the weights move faster than the averages follow, and evaluation with
    them can collapse to one class although the training batches are classified well. Only the
    BatchNorm layers are put in training mode (dropout stays off, no random numbers are drawn); the
    statistics are exact averages over ``images`` (momentum ``None``). Returns the number of images used.
    """
    batches = (
        unit_pixels(images[start : start + batch_size].to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
        for start in range(0, len(images), batch_size)
    )
    return len(images) if recalibrate_with(model, model, batches, device, amp) else 0


@torch.no_grad()
def recalibrate_with(model: nn.Module, forward: Callable, batches, device: torch.device, amp: bool = True, cpu_bf16: bool = False) -> bool:
    """:func:`recalibrate_batchnorm` of ``model``'s BatchNorms (plain or fused) by running ``forward`` on ``batches``
    (in bf16 where the training step runs in it: ``amp`` on CUDA, ``cpu_bf16`` on a CPU)."""
    norms = _batchnorms(model)
    if not norms:
        return False
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
        m.train()
    ran = False
    try:
        for batch in batches:
            with autocast(device, amp, cpu=cpu_bf16):
                forward(batch)
            ran = True
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return ran

class Evaluation:
    """Evaluates the members of a run (G = 1) or a cohort through ``forward`` (``[G, B, 3, H, W]`` -> ``[G, B, K]``)."""

    def __init__(self, model: nn.Module, forward: Callable, dataset: Dataset, members: list[Member], config: TrainConfig, device: torch.device):
        self.model, self._forward, self.dataset, self.members, self.config, self.device = model, forward, dataset, members, config, device
        self.G = len(members)
        self.train_idx, self.val_idx = members[0].train_idx, members[0].val_idx
        self._val: torch.Tensor | None = None
        self._calibration: torch.Tensor | None = None

    def member_batches(self, images: torch.Tensor, index: torch.Tensor, batch_size: int):
        """Device batches ``[G, b, 3, H, W]`` in [0, 1] of uint8 ``images`` at ``index`` ``[G, N]`` (a shared row is moved once)."""
        shared = bool((index == index[:1]).all())
        for start in range(0, index.shape[1], batch_size):
            part = index[:1 if shared else self.G, start : start + batch_size]
            x = unit_pixels(images[part.reshape(-1)].to(self.device, non_blocking=True)).unflatten(0, part.shape)
            yield x.expand(self.G, *x.shape[1:]) if shared else x

    @torch.no_grad()
    def predict(self, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Logits ``[G, N, K]`` (float32, or float64 in a float64 training; CPU) of every member, in eval mode."""
        was_training = self.model.training
        self.model.eval()
        outputs = []
        try:
            for x in self.member_batches(images, index, self.config.eval_batch_size):
                with autocast(self.device, self.config.amp, cpu=self.config.cpu_bf16 == "all"):
                    outputs.append(full_precision(self._forward(x)).cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(outputs, 1)

    def recalibrate(self) -> None:
        """Fresh BatchNorm statistics for the current weights (see :func:`recalibrate_batchnorm`): before each
        validation, and before the test when no validation ran after the last epoch."""
        n = min(self.config.bn_recalibration_images, len(self.train_idx))
        if n == 0:
            return
        if self._calibration is None:  # chosen once: evenly spread over each member's (sorted, stratified) training indices
            spread = torch.linspace(0, len(self.train_idx) - 1, n).round().long()
            self._calibration = torch.stack([m.train_idx[spread] for m in self.members])
        batches = self.member_batches(self.dataset.train.images, self._calibration, self.config.eval_batch_size)
        recalibrate_with(self.model, self._forward, batches, self.device, self.config.amp, cpu_bf16=self.config.cpu_bf16 == "all")

    def evaluate(self, split: str) -> list[dict] | list[None]:
        """Each member's accuracy report on ``val`` (its own held-out part) or ``test``."""
        if split == "val":
            if len(self.val_idx) == 0:
                return [None] * self.G
            if self._val is None:
                self._val = torch.stack([m.val_idx for m in self.members])
            images, index, labels = self.dataset.train.images, self._val, self.dataset.train.labels[self._val]
        else:
            images, labels = self.dataset.test.images, self.dataset.test.labels
            index = torch.arange(len(labels)).expand(self.G, -1)
            labels = labels.expand(self.G, -1)
        logits = self.predict(images, index)
        return [accuracy_report(logits[g], labels[g], self.dataset.classes) for g in range(self.G)]
