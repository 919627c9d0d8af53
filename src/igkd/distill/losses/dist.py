"""DIST: distillation by Pearson correlation (Huang, You, Wang, Qian & Xu, "Knowledge Distillation
from A Stronger Teacher", NeurIPS 2022, arXiv 2205.10536).

With Y^s = softmax(Z^s / tau) and Y^t = softmax(Z^t / tau) row-wise ([B, K] probability matrices)
and the Pearson correlation rho(u, v) = Cov(u, v) / (Std(u) Std(v)):

    L_inter = tau^2 * (1 - (1/B) * sum_i rho(Y^s_{i,:}, Y^t_{i,:}))   relation between classes, per sample
    L_intra = tau^2 * (1 - (1/K) * sum_k rho(Y^s_{:,k}, Y^t_{:,k}))   relation between samples, per class
    L       = CE(z, y) + beta * L_inter + gamma * L_intra

(the tau^2 factor as in the authors' code). CIFAR-100 setting: beta = gamma = 2, tau = 4, CE weight 1
(the authors' dist_cifar.yaml: ``dist_t4``, beta = gamma = 1 and tau = 4, times a loss weight of 2).
ImageNet: the loss's beta = gamma = 1, tau = 1, and the authors' ImageNet configs multiply it by a loss
weight of 2, so effectively beta = gamma = 2 with tau = 1. rho is computed as the cosine of the centred vectors with 1e-8
added to the product of norms, as the authors' code does, so a constant vector has rho = 0, not NaN.

Here: logits ``[G, B, K]`` (member-major); L_intra correlates each class's column over *that member's*
batch, so it depends on the batch exactly as the single-run loss does. Returns ``[G]``.
"""

from __future__ import annotations

import torch

from igkd.devices import full_precision
from igkd.distill.losses.kd import _column

EPS = 1e-8


def pearson(a: torch.Tensor, b: torch.Tensor, dim: int = -1, eps: float = EPS) -> torch.Tensor:
    """Pearson correlation of a and b along ``dim`` (cosine of the centred vectors, ``eps`` added to the norm product)."""
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


def dist_relations(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature) -> tuple[torch.Tensor, torch.Tensor]:
    """``([G], [G])``: tau^2 * (1 - mean rho) between classes (inter) and between samples (intra), per member."""
    tau = _column(temperature, student_logits).unsqueeze(-1)  # [G, 1, 1]
    ys = torch.softmax(full_precision(student_logits) / tau, -1)
    yt = torch.softmax(full_precision(teacher_logits) / tau, -1)
    tt = tau.view(-1) ** 2
    inter = tt * (1 - pearson(ys, yt, dim=-1).mean(1))  # rho over classes, mean over the batch
    intra = tt * (1 - pearson(ys, yt, dim=1).mean(1))  # rho over the batch, mean over classes
    return inter, intra


def dist_members(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta, gamma, temperature) -> torch.Tensor:
    """``[G]``: beta * L_inter + gamma * L_intra of each member (no CE); beta, gamma, tau floats or ``[G]``."""
    inter, intra = dist_relations(student_logits, teacher_logits, temperature)
    return _column(beta, student_logits).view(-1) * inter + _column(gamma, student_logits).view(-1) * intra
