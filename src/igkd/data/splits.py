"""Seeded, stratified splits and subsets (indices into a split, sorted ascending).

The test set is never used to choose anything: validation comes out of train.
"""

from __future__ import annotations

import torch

from igkd.errors import IgkdError


def stratified_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of ``round(fraction * n_c)`` samples of each class c, chosen at random under ``seed``."""
    if not 0.0 < fraction <= 1.0:
        raise IgkdError(f"subset fraction must be in (0, 1], got {fraction}")
    labels = labels.cpu()
    generator = torch.Generator().manual_seed(int(seed))
    chosen = []
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        keep = int(round(fraction * len(members)))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:keep]])
    return torch.sort(torch.cat(chosen)).values


def train_val_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint (train, val) indices; val holds ``val_fraction`` of every class. 0 gives an empty val."""
    if val_fraction == 0:
        return torch.arange(len(labels)), torch.empty(0, dtype=torch.int64)
    if not 0.0 < val_fraction < 1.0:
        raise IgkdError(f"validation fraction must be in [0, 1), got {val_fraction}")
    val = stratified_subset(labels, val_fraction, seed)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[val] = False
    return torch.nonzero(mask).flatten(), val
