"""Controls for the IG overlay and batch-mixing augmentations (issue 15), as pure functions.

Map controls replace the map cache the overlay reads (``[N, H, W]``, row i = training image i), so
the overlay itself, its crop/flip alignment and its draws are unchanged:

* ``shuffled``: image i is overlaid with the IG map of image ``d[i]`` for a seeded *derangement* d
  (``d[i] != i`` for every i): a real IG map of this teacher, but of another image
  (:func:`derangement`, :func:`shuffled_maps`); optionally within groups (e.g. classes).
* ``saliency``: the cache itself is the teacher's |gradient| (``igkd attributions compute --method
  saliency``); nothing to compute here (:func:`expected_attribution_method` names the method the
  cache must hold).
* ``random``: a smooth random map with the *same value histogram* as the image's IG map: white noise
  low-pass filtered by a Gaussian (sigma pixels), then the IG map's values placed in the rank order of
  the noise (:func:`random_maps`), so mean, std, min, max and every quantile match the IG map exactly
  and only the spatial arrangement is random.

Mixing (:func:`mix_draws`, :func:`apply_mix`): CutMix (Yun et al., ICCV 2019) and Mixup (Zhang et al.,
ICLR 2018) on member-major images ``[G, B, C, H, W]``, one lambda (and box) per member batch, the
partner of each image a random permutation within its member's batch; the loss is
lam * CE(y_a) + (1 - lam) * CE(y_b) (:func:`igkd.distill.losses.kd.mixed_cross_entropy_members`), and
with distillation the teacher sees the mixed images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from igkd.errors import IgkdError

# -- map controls ---------------------------------------------------------------------------------


def derangement(n: int, seed: int, groups: torch.Tensor | None = None) -> torch.Tensor:
    """A seeded random permutation d of range(n) with d[i] != i for all i (int64 ``[n]``).

    One random cycle through all n indices (or, with ``groups`` ``[n]``, one random cycle through each
    group's indices, so d[i] is in i's group). Needs n >= 2 and every group of size >= 2.
    """
    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=generator)
    if n < 2:
        raise IgkdError(f"a derangement needs at least 2 items, got {n}")
    if groups is None:
        groups_sorted = torch.zeros(n, dtype=torch.int64)
    else:
        groups = torch.as_tensor(groups).cpu().long()
        if groups.shape != (n,):
            raise IgkdError(f"groups must have shape [{n}], got {list(groups.shape)}")
        order = order[torch.argsort(groups[order], stable=True)]
        groups_sorted = groups[order]
    values, counts = torch.unique_consecutive(groups_sorted, return_counts=True)
    if (counts < 2).any():
        raise IgkdError(f"group {values[counts < 2][0].item()} has a single item: it cannot get another item's map")
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    ends = torch.repeat_interleave(torch.cumsum(counts, 0), counts)
    position = torch.arange(n)
    successor = torch.where(position + 1 < ends, position + 1, starts)
    result = torch.empty(n, dtype=torch.int64)
    result[order] = order[successor]
    return result


def shuffled_maps(maps: torch.Tensor, seed: int, groups: torch.Tensor | None = None) -> torch.Tensor:
    """``maps[derangement(N, seed, groups)]``: row i is the map of another image."""
    return maps[derangement(maps.shape[0], seed, groups).to(maps.device)]


_RANDOM_MAP_CHUNK = 1024  # fixed: the noise of chunk c comes from a generator seeded (seed, c)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def smooth_noise(n: int, height: int, width: int, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """``[n, H, W]`` white noise blurred by a separable Gaussian of ``sigma`` pixels (reflect padding)."""
    noise = torch.randn(n, 1, height, width, generator=generator, dtype=torch.float32)  # the same maps whatever the default dtype
    k = _gaussian_kernel(sigma)
    r = k.numel() // 2
    pad_h, pad_w = min(r, height - 1), min(r, width - 1)
    if pad_h < r or pad_w < r:  # reflect padding needs pad < size: trim the kernel for tiny images
        r = min(pad_h, pad_w)
        k = k[k.numel() // 2 - r : k.numel() // 2 + r + 1]
        k = k / k.sum()
    x = F.pad(noise, (r, r, 0, 0), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x[:, 0]


def random_maps(maps: torch.Tensor, seed: int, sigma: float = 2.0) -> torch.Tensor:
    """Smooth random maps with each map's exact value histogram: ``[N, H, W]``, same dtype and device.

    Row i: the values of ``maps[i]``, sorted, placed at the pixels of a Gaussian-filtered noise image
    in the order of its values (rank matching). Deterministic for (seed, sigma), whatever N.
    """
    n, height, width = maps.shape
    out = torch.empty(maps.shape, dtype=maps.dtype)
    for c, start in enumerate(range(0, n, _RANDOM_MAP_CHUNK)):
        chunk = maps[start : start + _RANDOM_MAP_CHUNK].detach().cpu().float().flatten(1)
        generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + c)
        noise = smooth_noise(chunk.shape[0], height, width, sigma, generator).flatten(1)
        ranks = torch.argsort(noise, dim=1)
        values = torch.sort(chunk, dim=1).values
        placed = torch.empty_like(chunk).scatter_(1, ranks, values)
        out[start : start + chunk.shape[0]] = placed.view(-1, height, width).to(maps.dtype)
    return out.to(maps.device)


def expected_attribution_method(overlay_maps: str) -> str:
    """The attribution method a run's cache must hold: ``saliency`` for the saliency control, else ``ig``."""
    return "saliency" if overlay_maps == "saliency" else "ig"


def overlay_maps_for(config, maps: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """The maps a run overlays, from its loaded cache and ``config.overlay_maps`` (seeded by ``config.seed``).

    ``ig`` and ``saliency``: the cache as it is; ``shuffled``: :func:`shuffled_maps` (within ``groups``
    if given); ``random``: :func:`random_maps` with ``config.random_map_sigma``.
    """
    kind = config.overlay_maps
    if kind in ("ig", "saliency"):
        return maps
    if kind == "shuffled":
        return shuffled_maps(maps, config.seed, groups)
    if kind == "random":
        return random_maps(maps, config.seed, config.random_map_sigma)
    raise IgkdError(f"unknown overlay_maps {kind!r}")


# -- CutMix / Mixup ---------------------------------------------------------------------------------

MIX_CODES = {"none": 0, "cutmix": 1, "mixup": 2}


@dataclass
class MixDraws:
    """One epoch of mixing draws for G members: ``[S, G]`` (steps x members) unless noted.

    ``kind`` ``[G]`` (0 none, 1 cutmix, 2 mixup); ``apply`` whether the member's batch is mixed at that
    step (probability mix_prob); ``lam`` ~ Beta(mix_alpha, mix_alpha); ``cx``, ``cy`` in [0, 1): the
    CutMix box centre as a fraction of W and H; ``keys`` ``[S, G, B]`` uniform: the partner permutation
    of a batch of b <= B images is ``argsort(keys[..., :b])``.
    """

    kind: torch.Tensor
    apply: torch.Tensor
    lam: torch.Tensor
    cx: torch.Tensor
    cy: torch.Tensor
    keys: torch.Tensor

    def to(self, device) -> "MixDraws":
        return MixDraws(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})


def member_mix_draws(seed: int, epoch: int, steps: int, batch_size: int, alpha: float, prob: float) -> dict[str, np.ndarray]:
    """One member's draws for one epoch from ``numpy.random.default_rng([seed, epoch, 15])``.

    Seeded by the member's own seed and the epoch, so a member draws the same whether trained alone
    or in any cohort, and a resumed run draws the same without storing generator state.
    """
    rng = np.random.default_rng([int(seed), int(epoch), 15])
    return {
        "apply": rng.random(steps) < prob,
        "lam": rng.beta(alpha, alpha, steps),
        "cx": rng.random(steps),
        "cy": rng.random(steps),
        "keys": rng.random((steps, batch_size)),
    }


def mix_draws(configs, epoch: int, steps: int, batch_size: int) -> MixDraws:
    """All members' draws for one epoch (CPU tensors; ``.to(device)`` once per epoch); ``epoch`` as the loop counts it."""
    configs = list(configs)
    per = [member_mix_draws(c.seed, epoch, steps, batch_size, c.mix_alpha, c.mix_prob) for c in configs]
    kind = torch.tensor([MIX_CODES[c.mix] for c in configs], dtype=torch.int64)

    def stack(name: str, dtype) -> torch.Tensor:
        return torch.as_tensor(np.stack([d[name] for d in per], 1), dtype=dtype)

    apply = stack("apply", torch.bool) & (kind != 0)
    return MixDraws(kind, apply, stack("lam", torch.float32), stack("cx", torch.float32), stack("cy", torch.float32), stack("keys", torch.float32))


def cutmix_boxes(lam: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[G, 4]`` int64 (y1, y2, x1, x2): the CutMix box of cut ratio sqrt(1 - lam) centred at (cx W, cy H), clipped to the image."""
    cut = torch.sqrt((1 - lam).clamp(0, 1))
    cut_h, cut_w = torch.floor(height * cut).long(), torch.floor(width * cut).long()
    yc, xc = torch.floor(cy * height).long(), torch.floor(cx * width).long()
    y1, y2 = (yc - cut_h // 2).clamp(0, height), (yc + cut_h // 2).clamp(0, height)
    x1, x2 = (xc - cut_w // 2).clamp(0, width), (xc + cut_w // 2).clamp(0, width)
    return torch.stack((y1, y2, x1, x2), 1)


def apply_mix(images: torch.Tensor, labels: torch.Tensor, draws: MixDraws, step: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Mix each member's batch: ``images`` ``[G, B, C, H, W]``, ``labels`` ``[G, B]`` (B may be smaller than the draws').

    Returns ``(mixed, (labels_a, labels_b, lam))``: ``mixed = w * x + (1 - w) * x[perm]`` with w the
    Mixup lambda (every pixel) or, for CutMix, 0 inside the member's box and 1 outside; ``labels_b =
    labels[perm]``; ``lam`` ``[G]`` is the weight of labels_a: Mixup's lambda, CutMix's 1 - box area /
    (H W) (the box actually pasted), 1 where the member does not mix at this step (then mixed = images
    and labels_b = labels). No host synchronisation.
    """
    G, B, _, H, W = images.shape
    perm = torch.argsort(draws.keys[step, :, :B], dim=1)  # [G, B]
    rows = torch.arange(G, device=images.device)[:, None]
    partner = images[rows, perm]
    labels_b = labels[rows, perm]
    apply, kind, lam = draws.apply[step], draws.kind, draws.lam[step]
    box = cutmix_boxes(lam, draws.cx[step], draws.cy[step], H, W)
    ys = torch.arange(H, device=images.device).view(1, H, 1)
    xs = torch.arange(W, device=images.device).view(1, 1, W)
    inside = (ys >= box[:, 0, None, None]) & (ys < box[:, 1, None, None]) & (xs >= box[:, 2, None, None]) & (xs < box[:, 3, None, None])
    cut_weight = (~inside).to(images.dtype)  # [G, H, W]
    mix_weight = lam.to(images.dtype).view(G, 1, 1).expand(G, H, W)
    weight = torch.where((kind == 1).view(G, 1, 1), cut_weight, mix_weight)
    weight = torch.where(apply.view(G, 1, 1), weight, torch.ones_like(weight))
    w = weight.view(G, 1, 1, H, W)
    mixed = w * images + (1 - w) * partner
    area = ((box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])).float()
    lam_eff = torch.where(kind == 1, 1 - area / (H * W), lam.float())
    lam_eff = torch.where(apply, lam_eff, torch.ones_like(lam_eff))
    labels_b = torch.where(apply.view(G, 1), labels_b, labels)
    return mixed, (labels, labels_b, lam_eff)
