"""Decoupled knowledge distillation, DKD (Zhao, Cui, Song, Qiu & Liang, CVPR 2022, arXiv 2203.08679).

With p = softmax(z / T) over the K classes and t the sample's label, KD's KL divergence splits into

    b     = [p_t, 1 - p_t]                               binary target / non-target probabilities
    p_hat = softmax over the K - 1 non-target classes of z / T
    KD    = TCKD + (1 - p_t^teacher) * NCKD
    TCKD  = KL(b^teacher || b^student)                   target-class KD
    NCKD  = KL(p_hat^teacher || p_hat^student)           non-target-class KD

and DKD weights the two freely, dropping NCKD's (1 - p_t^teacher) factor:

    L_DKD = T^2 * (alpha * TCKD + beta * NCKD)           (summed over classes, mean over the batch)
    L     = CE(z, y) + w(epoch) * L_DKD,   w(epoch) = min(epoch / warmup, 1)

The T^2 factor and the linear warm-up of the DKD weight over the first ``warmup`` epochs (epoch
counted from 1, so the first epoch has weight 1/warmup) are those of the authors' code (mdistiller,
``DKD.WARMUP`` 20 of 240 epochs). CIFAR-100 settings (mdistiller configs): alpha 1, T 4, warm-up 20
epochs, beta 8 by default (``BETA`` 2 for ResNet56->ResNet20 and ResNet110->ResNet32, 6 for several pairs); CE weight 1.

Here: per-member tensors, student/teacher logits ``[G, B, K]``, labels ``[G, B]``, alpha, beta, T
floats or ``[G]``; the result is ``[G]``. log(1 - p_t) is computed as a difference of log-sum-exps,
and the non-target softmax masks the target class with a large negative logit (its probability is
exactly 0 in float32, so it adds nothing to the KL and receives no gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from igkd.devices import full_precision
from igkd.distill.losses.kd import _column

_MASKED = -1e9


def dkd_warmup_factor(epoch, warmup) -> torch.Tensor | float:
    """min(epoch / warmup, 1), 1 where warmup is 0; ``epoch`` counted from 1 (a number, may be fractional).

    ``warmup`` a float (returns a float) or a ``[G]`` tensor (returns ``[G]``).
    """
    if not isinstance(warmup, torch.Tensor):
        return 1.0 if warmup <= 0 else min(float(epoch) / float(warmup), 1.0)
    safe = torch.where(warmup > 0, warmup, torch.ones_like(warmup))
    return torch.where(warmup > 0, (epoch / safe).clamp(max=1.0), torch.ones_like(warmup))


def dkd_members(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha, beta, temperature) -> torch.Tensor:
    """``[G]``: T^2 * (alpha * TCKD + beta * NCKD) of each member, averaged over its batch (no CE, no warm-up)."""
    t = _column(temperature, student_logits).unsqueeze(-1)  # [G, 1, 1]
    zs = full_precision(student_logits) / t
    zt = full_precision(teacher_logits) / t
    target = F.one_hot(labels, zs.shape[-1]).bool()  # [G, B, K]

    def binary_log(z: torch.Tensor) -> torch.Tensor:
        """[G, B, 2]: log p_target, log(1 - p_target)."""
        all_ = torch.logsumexp(z, -1)
        own = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        rest = torch.logsumexp(z.masked_fill(target, _MASKED), -1)
        return torch.stack((own - all_, rest - all_), -1)

    log_bs, log_bt = binary_log(zs), binary_log(zt)
    tckd = (log_bt.exp() * (log_bt - log_bs)).sum(-1)  # [G, B]
    log_ps = F.log_softmax(zs.masked_fill(target, _MASKED), -1)
    log_pt = F.log_softmax(zt.masked_fill(target, _MASKED), -1)
    nckd = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # [G, B]
    a, b = _column(alpha, student_logits), _column(beta, student_logits)
    tt = t.view(-1) ** 2
    return tt * (a * tckd + b * nckd).mean(1)
