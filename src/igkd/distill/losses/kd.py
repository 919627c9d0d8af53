"""Knowledge distillation loss (paper eq. 1-3, Hinton et al. 2015).

    L = (1 - alpha) * CE(s, y) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))

KL is summed over classes and averaged over the batch (``reduction="batchmean"``);
the T^2 factor keeps the soft-target gradients on the scale of the hard-label ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from igkd.devices import full_precision


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    ce = F.cross_entropy(full_precision(student_logits), labels, label_smoothing=label_smoothing)
    if alpha == 0 or teacher_logits is None:
        return ce
    t = temperature
    kl = F.kl_div(
        F.log_softmax(full_precision(student_logits) / t, dim=1),
        F.log_softmax(full_precision(teacher_logits) / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1 - alpha) * ce + alpha * t * t * kl


def _column(value, like: torch.Tensor) -> torch.Tensor:
    """A per-member constant (a float or a [G] tensor) as [G, 1] for broadcasting over a batch."""
    return torch.as_tensor(value, dtype=torch.get_default_dtype(), device=like.device).expand(like.shape[0]).reshape(-1, 1)


def cross_entropy_members(logits: torch.Tensor, labels: torch.Tensor, label_smoothing=0.0) -> torch.Tensor:
    """Cross-entropy of each member, ``[G]``: logits ``[G, B, K]``, labels ``[G, B]``, label smoothing a float or ``[G]``.

    Equal to ``F.cross_entropy(logits[g], labels[g], label_smoothing=ls[g])`` for every g:
    (1 - ls) * NLL + ls * mean over classes of -log p.
    """
    logp = F.log_softmax(full_precision(logits), dim=-1)
    nll = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ls = _column(label_smoothing, logits)
    return ((1 - ls) * nll + ls * -logp.mean(-1)).mean(1)


def mixed_cross_entropy_members(logits: torch.Tensor, labels_a: torch.Tensor, labels_b: torch.Tensor, lam, label_smoothing=0.0) -> torch.Tensor:
    """``[G]``: lam * CE(y_a) + (1 - lam) * CE(y_b) of each member (CutMix / Mixup), lam a float or ``[G]``."""
    lam = _column(lam, logits).view(-1)
    return lam * cross_entropy_members(logits, labels_a, label_smoothing) + (1 - lam) * cross_entropy_members(logits, labels_b, label_smoothing)


def soft_target_members(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature) -> torch.Tensor:
    """``[G]``: T^2 * KL(softmax(t / T) || softmax(s / T)), summed over classes, averaged over each member's batch."""
    t = _column(temperature, student_logits).unsqueeze(-1)  # [G, 1, 1]
    log_s = F.log_softmax(full_precision(student_logits) / t, dim=-1)
    log_t = F.log_softmax(full_precision(teacher_logits) / t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean(1)
    return t.flatten() ** 2 * kl


def kd_members(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha, temperature, label_smoothing=0.0) -> torch.Tensor:
    """:func:`kd_loss` of each member, ``[G]``, with per-member alpha, T and label smoothing (floats or ``[G]``).

    KL is summed over classes and averaged over the member's batch (``batchmean``), as in :func:`kd_loss`.
    """
    ce = cross_entropy_members(student_logits, labels, label_smoothing)
    a = _column(alpha, student_logits).view(-1)
    return (1 - a) * ce + a * soft_target_members(student_logits, teacher_logits, temperature)
