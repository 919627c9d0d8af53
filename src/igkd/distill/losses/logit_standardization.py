"""Logit standardisation (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024).

Before the tempered softmax of a logit-distillation term, every logit vector is z-scored over its
classes, for the student and the teacher alike:

    Z(z) = (z - mean_k z_k) / (std_k z_k + eps)          (per sample, over the K classes)
    q    = softmax(Z(z) / tau)                           tau = the paper's *base temperature*

so the student matches the teacher's logit *relations* rather than their range. The paper's
CIFAR-100 runs use tau = 2 (``--base-temp 2`` in the authors' commands; 3 for a few pairs); the
T^2 factor of the term it modifies is kept, with T = tau (as the authors' code does).

``std`` is the unbiased (K - 1) standard deviation and ``eps`` = 1e-7 is added to it, as in the
authors' released code (arXiv 2403.01427, github.com/sunshangquan/logit-standardization-KD), which
produced the published numbers. The population (K) standard deviation is not the same loss: its
z-scores are sqrt(K / (K - 1)) times larger, so it needs a base temperature that much larger (2.108
instead of 2 for K = 10) for the same softened probabilities, and then the T^2 factor makes its loss
K / (K - 1) times larger (1.111x at K = 10).

Only the distillation terms see standardised logits; the cross-entropy with the labels uses the raw
logits. Here it is a switch (``logit_std``) on KD, DKD and DIST: :class:`igkd.distill.objective.Objective`
standardises the members that ask for it and uses ``logit_std_temperature`` as their temperature.
"""

from __future__ import annotations

import torch

from igkd.devices import full_precision

EPS = 1e-7


def standardize_logits(logits: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Z-score over the last (class) dimension: ``(z - mean) / (std + eps)``, std unbiased; any leading shape."""
    z = full_precision(logits)
    mean = z.mean(-1, keepdim=True)
    std = z.std(-1, keepdim=True)
    return (z - mean) / (std + eps)


def standardize_members(logits: torch.Tensor, switch) -> torch.Tensor:
    """``[G, B, K]`` logits with member g standardised where ``switch[g]`` is true (a bool or a ``[G]`` bool tensor)."""
    mask = torch.as_tensor(switch, dtype=torch.bool, device=logits.device).expand(logits.shape[0]).view(-1, 1, 1)
    return torch.where(mask, standardize_logits(logits), full_precision(logits))
