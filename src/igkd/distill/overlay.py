"""IG overlay augmentation (paper eq. 5-7), batched on the device.

For each sample, with probability p:
    s ~ exp(U[ln a, ln b])             (log-uniform exponent, default a=1, b=2)
    m = minmax(map ** s)               (per image, to [0, 1]; repeated over channels)
    x <- 0.5 * x + 0.5 * m             (in [0, 1] pixel space, before normalisation)
otherwise x is unchanged. The map has already received its image's crop and flip
(``DeviceLoader`` extras), so it lines up with the pixels it is laid over. Maps must be
non-negative (``abs_sum``/``positive_sum`` caches; ``distill.run.load_ig_maps`` refuses signed
ones); ``clamp_min(0)`` below only removes float16 rounding noise, it is no sign transform.
"""

from __future__ import annotations

import math

import torch

from igkd.devices import full_precision


def overlay_draws(n: int, p: float, a: float, b: float, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (apply: bool [n], exponent s: float [n]) from one generator."""
    u = torch.rand(2, n, generator=generator, device=device)
    apply = u[0] < p
    s = torch.exp(math.log(a) + (math.log(b) - math.log(a)) * u[1])
    return apply, s


def apply_overlay(images: torch.Tensor, maps: torch.Tensor, apply: torch.Tensor, s: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """images [B, C, H, W] in [0, 1]; maps [B, H, W] >= 0; returns the augmented batch."""
    scaled = full_precision(maps).clamp_min(0).pow(s[:, None, None])
    flat = scaled.flatten(1)
    lo = flat.min(1).values[:, None, None]
    hi = flat.max(1).values[:, None, None]
    normed = (scaled - lo) / (hi - lo).clamp_min(eps)
    blended = 0.5 * images + 0.5 * normed[:, None]
    return torch.where(apply[:, None, None, None], blended, images)


def ig_overlay(images: torch.Tensor, maps: torch.Tensor, p: float, generator: torch.Generator, a: float = 1.0, b: float = 2.0) -> torch.Tensor:
    if p <= 0:
        return images
    apply, s = overlay_draws(images.shape[0], p, a, b, generator, images.device)
    return apply_overlay(images, maps, apply, s)
