"""Knowledge distillation loss (paper eq. 1-3, Hinton et al. 2015).

    L = (1 - alpha) * CE(s, y) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))

KL is summed over classes and averaged over the batch (``reduction="batchmean"``);
the T^2 factor keeps the soft-target gradients on the scale of the hard-label ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    ce = F.cross_entropy(student_logits.float(), labels, label_smoothing=label_smoothing)
    if alpha == 0 or teacher_logits is None:
        return ce
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student_logits.float() / t, dim=1),
        F.log_softmax(teacher_logits.float() / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1 - alpha) * ce + alpha * t * t * kl
