"""The training objective of G runs at once: each member's loss terms with its own constants.

A training step works on member-major tensors: student logits ``[G, B, K]`` (member g's batch at
``[g]``), the teacher's logits on the view each member saw ``[G, B, K]`` (or None), labels
``[G, B]``. The loss constants of the G runs (alpha, T, label smoothing, gamma ...) are ``[G]``
tensors, so one set of kernels computes all members' losses with no Python loop over members
and no host synchronisation. A single run is G = 1.

Every term returns one loss per member, ``[G]``, averaged over that member's batch exactly as the
single-run loss is; the step sums the members' losses (each member's parameters receive gradient
from its own loss only, see :mod:`igkd.models.fused`).

Per member, the logit loss is one formula whose weights select the method (``logit_loss`` and
``alpha`` of its TrainConfig):

    loss = ce_weight * CE                                   (mixed CE with CutMix / Mixup)
         + kd_weight * T_kd^2 KL(t || s)                    KD:   ce_weight 1 - alpha, kd_weight alpha
         + w(epoch) * T_dkd^2 (dkd_alpha TCKD + dkd_beta NCKD)    DKD:  ce_weight 1, others 0
         + dist_beta * L_inter + dist_gamma * L_intra       DIST: ce_weight 1, others 0

A member that does not use a term has its weights at 0, so each term is computed once for all
members, and only if at least one member uses it (decided on the host when the objective is
built, never per step). With ``logit_std`` a member's logits are z-scored before its distillation
term and ``logit_std_temperature`` replaces that term's temperature (Sun et al. 2024).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from igkd.devices import full_precision
from igkd.distill.losses.attention import attention_map
from igkd.distill.losses.dist import dist_members
from igkd.distill.losses.dkd import dkd_members, dkd_warmup_factor
from igkd.distill.losses.kd import cross_entropy_members, mixed_cross_entropy_members, soft_target_members
from igkd.distill.losses.logit_standardization import standardize_members


@dataclass
class Objective:
    """Per-member loss constants, ``[G]`` tensors of the default float dtype (float32) on the training device (build with :meth:`from_configs`).

    ``kd_temperature``, ``dkd_temperature`` and ``dist_temperature`` are the temperatures each term
    actually uses (``logit_std_temperature`` for members with ``logit_std``); ``temperature`` is the
    configured KD temperature. The ``uses_*`` flags are host booleans fixed at construction.
    """

    alpha: torch.Tensor
    temperature: torch.Tensor
    label_smoothing: torch.Tensor
    gamma: torch.Tensor
    ce_weight: torch.Tensor
    kd_weight: torch.Tensor
    kd_temperature: torch.Tensor
    dkd_alpha: torch.Tensor
    dkd_beta: torch.Tensor
    dkd_temperature: torch.Tensor
    dkd_warmup: torch.Tensor
    dist_beta: torch.Tensor
    dist_gamma: torch.Tensor
    dist_temperature: torch.Tensor
    logit_std: torch.Tensor  # bool [G]
    uses_kd: bool
    uses_dkd: bool
    uses_dist: bool
    uses_logit_std: bool
    uses_attention: bool

    @classmethod
    def from_configs(cls, configs, device) -> "Objective":
        configs = list(configs)

        def column(values) -> torch.Tensor:
            return torch.tensor([float(v) for v in values], dtype=torch.get_default_dtype(), device=device)

        def each(name: str) -> list:
            return [getattr(c, name) for c in configs]

        loss = [getattr(c, "logit_loss", "kd") for c in configs]
        std = [bool(getattr(c, "logit_std", False)) for c in configs]
        is_kd = [name == "kd" for name in loss]
        is_dkd = [name == "dkd" for name in loss]
        is_dist = [name == "dist" for name in loss]

        def temperature(own: str, c, s: bool) -> float:
            return c.logit_std_temperature if s else getattr(c, own)

        alpha = [c.alpha if k else 0.0 for c, k in zip(configs, is_kd)]
        return cls(
            alpha=column(each("alpha")),
            temperature=column(each("temperature")),
            label_smoothing=column(each("label_smoothing")),
            gamma=column(each("gamma")),
            ce_weight=column([1 - a for a in alpha]),
            kd_weight=column(alpha),
            kd_temperature=column([temperature("temperature", c, s) for c, s in zip(configs, std)]),
            dkd_alpha=column([c.dkd_alpha if d else 0.0 for c, d in zip(configs, is_dkd)]),
            dkd_beta=column([c.dkd_beta if d else 0.0 for c, d in zip(configs, is_dkd)]),
            dkd_temperature=column([temperature("dkd_temperature", c, s) for c, s in zip(configs, std)]),
            dkd_warmup=column(each("dkd_warmup")),
            dist_beta=column([c.dist_beta if d else 0.0 for c, d in zip(configs, is_dist)]),
            dist_gamma=column([c.dist_gamma if d else 0.0 for c, d in zip(configs, is_dist)]),
            dist_temperature=column([temperature("dist_temperature", c, s) for c, s in zip(configs, std)]),
            logit_std=torch.tensor(std, dtype=torch.bool, device=device),
            uses_kd=any(a > 0 for a in alpha),
            uses_dkd=any(is_dkd),
            uses_dist=any(is_dist),
            uses_logit_std=any(std),
            uses_attention=any(c.gamma > 0 for c in configs),
        )

    @property
    def uses_teacher_logits(self) -> bool:
        return self.uses_kd or self.uses_dkd or self.uses_dist

    def logit_losses(
        self,
        logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        labels: torch.Tensor,
        *,
        epoch: float | None = None,
        labels_b: torch.Tensor | None = None,
        lam: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[G]``: each member's CE (label smoothing) plus its KD, DKD or DIST term.

        ``epoch``: the current epoch counted from 1 (the first epoch is 1), needed when a member uses
        DKD (its warm-up weight min(epoch / dkd_warmup, 1)). ``labels_b`` ``[G, B]`` and ``lam`` ``[G]``
        (from :func:`igkd.distill.controls.apply_mix`): the CE becomes lam * CE(labels) + (1 - lam) *
        CE(labels_b); the teacher's logits are those of the mixed images; DKD's target class is ``labels``.
        Without teacher logits (or no member with a distillation term) it is the CE alone, as before.
        """
        if labels_b is None:
            ce = cross_entropy_members(logits, labels, self.label_smoothing)
        else:
            ce = mixed_cross_entropy_members(logits, labels, labels_b, lam, self.label_smoothing)
        if teacher_logits is None or not self.uses_teacher_logits:
            return ce
        total = self.ce_weight * ce
        s, t = full_precision(logits), full_precision(teacher_logits)
        if self.uses_logit_std:
            s, t = standardize_members(s, self.logit_std), standardize_members(t, self.logit_std)
        if self.uses_kd:
            total = total + self.kd_weight * soft_target_members(s, t, self.kd_temperature)
        if self.uses_dkd:
            if epoch is None:
                raise ValueError("a member uses DKD: pass epoch= (counted from 1) for its warm-up weight")
            weight = dkd_warmup_factor(epoch, self.dkd_warmup)
            total = total + weight * dkd_members(s, t, labels, self.dkd_alpha, self.dkd_beta, self.dkd_temperature)
        if self.uses_dist:
            total = total + dist_members(s, t, self.dist_beta, self.dist_gamma, self.dist_temperature)
        return total

    def attention_losses(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        """``[G]``: gamma * mean squared difference of attention maps; features ``[G, B, C, H, W]``.

        The student's map is resized to the teacher's when they differ (as :func:`attention_transfer_loss`).
        """
        G, B = student_features.shape[:2]
        size = tuple(teacher_features.shape[-2:])
        a_s = attention_map(student_features.flatten(0, 1), size).view(G, B, -1)
        a_t = attention_map(teacher_features.detach().flatten(0, 1), size).view(G, B, -1)
        return self.gamma * (a_s - a_t).pow(2).mean((1, 2))
