"""The training objective of G runs at once: each member's loss terms with its own constants.

A training step works on member-major tensors: student logits ``[G, B, K]`` (member g's batch at
``[g]``), the teacher's logits on the view each member saw ``[G, B, K]`` (or None), labels
``[G, B]``. The loss constants of the G runs (alpha, T, label smoothing, gamma ...) are ``[G]``
tensors, so one set of kernels computes all members' losses with no Python loop over members
and no host synchronisation. A single run is G = 1.

Every term returns one loss per member, ``[G]``, averaged over that member's batch exactly as the
single-run loss is; the step sums the members' losses (each member's parameters receive gradient
from its own loss only, see :mod:`igkd.models.fused`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from igkd.distill.losses.attention import attention_map
from igkd.distill.losses.kd import cross_entropy_members, kd_members


@dataclass
class Objective:
    """Per-member loss constants, ``[G]`` float32 tensors on the training device."""

    alpha: torch.Tensor
    temperature: torch.Tensor
    label_smoothing: torch.Tensor
    gamma: torch.Tensor

    @classmethod
    def from_configs(cls, configs, device) -> "Objective":
        def column(name: str) -> torch.Tensor:
            return torch.tensor([float(getattr(c, name)) for c in configs], dtype=torch.float32, device=device)

        return cls(column("alpha"), column("temperature"), column("label_smoothing"), column("gamma"))

    def __post_init__(self) -> None:
        # Decided once here, not per step (a device tensor's truth value is a host synchronisation).
        self.uses_kd = bool((self.alpha > 0).any())
        self.uses_attention = bool((self.gamma > 0).any())

    def logit_losses(self, logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """``[G]``: cross-entropy (with each member's label smoothing), or KD where alpha > 0."""
        if teacher_logits is None or not self.uses_kd:
            return cross_entropy_members(logits, labels, self.label_smoothing)
        return kd_members(logits, teacher_logits, labels, self.alpha, self.temperature, self.label_smoothing)

    def attention_losses(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        """``[G]``: gamma * mean squared difference of attention maps; features ``[G, B, C, H, W]``.

        The student's map is resized to the teacher's when they differ (as :func:`attention_transfer_loss`).
        """
        G, B = student_features.shape[:2]
        size = tuple(teacher_features.shape[-2:])
        a_s = attention_map(student_features.flatten(0, 1), size).view(G, B, -1)
        a_t = attention_map(teacher_features.detach().flatten(0, 1), size).view(G, B, -1)
        return self.gamma * (a_s - a_t).pow(2).mean((1, 2))
