"""From per-pixel, per-channel attributions [B, C, H, W] to one map per image [B, H, W].

* ``abs_sum``: sum over channels of |attribution| (the paper's map: how much each
  pixel matters, whatever the sign).
* ``signed_sum``: sum over channels (evidence for minus evidence against the target).
* ``positive_sum``: sum over channels of max(attribution, 0) (evidence for the target only).
"""

from __future__ import annotations

import torch

from igkd.errors import IgkdError

REDUCTIONS: tuple[str, ...] = ("abs_sum", "signed_sum", "positive_sum")


def reduce_map(attributions: torch.Tensor, reduction: str = "abs_sum") -> torch.Tensor:
    """[B, C, H, W] attributions -> [B, H, W] maps by ``reduction`` (see the module docstring)."""
    if attributions.ndim != 4:
        raise IgkdError(f"attributions must be [B, C, H, W], got shape {tuple(attributions.shape)}")
    if reduction == "abs_sum":
        return attributions.abs().sum(1)
    if reduction == "signed_sum":
        return attributions.sum(1)
    if reduction == "positive_sum":
        return attributions.clamp_min(0).sum(1)
    raise IgkdError(f"unknown reduction {reduction!r}: use one of {', '.join(REDUCTIONS)}")
