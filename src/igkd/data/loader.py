"""Device-resident batches with batched random crop + flip (no DataLoader, no workers).

The whole split sits on one device as uint8. Each epoch draws one permutation and
one crop offset / flip bit per sample from a CPU generator seeded by
``(seed, epoch)``, so an epoch is reproducible on any device and after a resume.

Several *streams* (a cohort's runs with their own seeds and subsets, see
``igkd.distill.data_plan``) can share one loader: with ``seed=[s0, s1, ...]`` and one index
set per stream, each stream is drawn exactly as a loader of its own would draw it, and a
batch holds the streams' batches one after the other (``[S * B, ...]``, stream-major),
gathered and cropped with one set of kernels.
Extra per-sample tensors (e.g. IG maps, [N, H, W] or [N, C, H, W]) receive exactly
the crop and flip of their image, and every batch carries the dataset indices of
its samples, so per-sample artefacts can never drift from their images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from igkd.devices import full_precision, unit_pixels
from igkd.errors import IgkdError


@dataclass
class Batch:
    indices: torch.Tensor  # int64 [S*B] on the loader's device, indices into the split it was built on
    images: torch.Tensor  # float32 [B, 3, H, W] in [0, 1] (pixel space, not normalised)
    labels: torch.Tensor  # int64 [B]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # float32, same crop/flip as images
    streams: int = 1  # S: stream s's samples are rows s*B .. (s+1)*B - 1


def crop_flip(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, flip: torch.Tensor, pad: int) -> torch.Tensor:
    """Per-sample crop of the zero-padded batch at offsets (dy, dx), then optional horizontal flip.

    ``x`` is [B, C, H, W]; offsets are in [0, 2*pad]; offset ``pad`` with no flip is the identity.
    """
    b, _, h, w = x.shape
    if pad > 0:
        x = F.pad(x, (pad, pad, pad, pad))
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # [B, H, 1]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # [B, 1, W]
        x = x[torch.arange(b, device=x.device)[:, None, None], :, rows, cols]  # [B, H, W, C]
        x = x.permute(0, 3, 1, 2)
    return torch.where(flip[:, None, None, None], x.flip(-1), x).contiguous()


class DeviceLoader:
    """Batches of a split held on ``images.device``.

    Args:
        images: uint8 [N, 3, H, W]; labels: int64 [N].
        indices: optional subset of sample indices to iterate over (e.g. a stratified 80%);
            with several seeds, one index tensor per seed (all of the same length).
        seed: the seed of the epoch order, crops and flips; a list of seeds makes one stream each.
        augment: random crop with ``pad`` pixels of zero padding + random horizontal flip.
        extras: name -> tensor [N, ...spatial H, W] cropped/flipped like its image.
        rank, world_size: shard each epoch's permutation for DistributedDataParallel.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        indices: torch.Tensor | Sequence[torch.Tensor] | None = None,
        shuffle: bool = True,
        augment: bool = True,
        pad: int = 4,
        flip: bool = True,
        seed: int | Sequence[int] = 0,
        extras: Mapping[str, torch.Tensor] | None = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if images.dtype != torch.uint8:
            raise IgkdError(f"DeviceLoader wants uint8 images, got {images.dtype}")
        if batch_size < 1:
            raise IgkdError(f"batch size must be at least 1, got {batch_size}")
        self.images, self.labels = images, labels.to(images.device)
        self.extras = {}
        for name, tensor in (extras or {}).items():
            if tensor.shape[0] != images.shape[0] or tensor.shape[-2:] != images.shape[-2:]:
                raise IgkdError(
                    f"extra tensor {name!r} has shape {tuple(tensor.shape)}, which does not match the images "
                    f"{tuple(images.shape)} (need one [.., H, W] entry per image, in dataset order)"
                )
            self.extras[name] = tensor.to(images.device)
        seeds = [int(s) for s in seed] if isinstance(seed, Sequence) else [int(seed)]
        if indices is None or torch.is_tensor(indices):
            indices = [torch.arange(images.shape[0]) if indices is None else indices] * len(seeds)
        self.stream_indices = [i.cpu().long() for i in indices]
        if len(self.stream_indices) != len(seeds) or len({len(i) for i in self.stream_indices}) != 1:
            raise IgkdError(f"a loader of {len(seeds)} streams needs one index set per stream, all of one length (got {[len(i) for i in self.stream_indices]})")
        self.indices, self.seeds = self.stream_indices[0], seeds
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.pad, self.flip, self.seed, self.drop_last = pad, flip, seeds[0], drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def streams(self) -> int:
        return len(self.seeds)

    def epoch_length(self) -> int:
        """Samples per stream this epoch (after sharding and ``drop_last``)."""
        n = len(self.indices) // self.world_size if self.world_size > 1 else len(self.indices)
        return n - n % self.batch_size if self.drop_last else n

    def _epoch_order(self, stream: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seeds[stream] * 1_000_003 + int(self.epoch))
        indices = self.stream_indices[stream]
        n = len(indices)
        order = indices[torch.randperm(n, generator=generator)] if self.shuffle else indices
        if self.world_size > 1:
            per_rank = n // self.world_size
            order = order[: per_rank * self.world_size][self.rank :: self.world_size]
        dx = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator)[: len(order)]
        dy = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator)[: len(order)]
        flips = (torch.rand(n, generator=generator) < 0.5)[: len(order)]
        if not self.augment:
            dx = dy = torch.full((len(order),), self.pad)
            flips = torch.zeros(len(order), dtype=torch.bool)
        if not self.flip:
            flips = torch.zeros_like(flips)
        return order, dx, dy, flips

    def __len__(self) -> int:
        n = len(self.indices) // self.world_size if self.world_size > 1 else len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        # The epoch's order, offsets and flips go to the device once (drawn on the CPU for
        # reproducibility on any device); each step then only slices device tensors, so no step
        # waits on a host-to-device copy or a host sync, and the CPU can queue work ahead of a GPU.
        device = self.images.device
        plans = [self._epoch_order(s) for s in range(self.streams)]
        order, dx, dy, flips = (torch.stack(parts).to(device, non_blocking=True) for parts in zip(*plans))  # [S, n]
        pad = self.pad if self.augment else 0
        geometric = self.augment  # without augmentation every offset is `pad` and no flip: identity
        for start in range(0, order.shape[1], self.batch_size):
            idx = order[:, start : start + self.batch_size].reshape(-1)  # stream-major [S * B]
            if self.drop_last and idx.numel() < self.batch_size * self.streams:
                break
            step = (slice(None), slice(start, start + self.batch_size))
            offsets = (dx[step].reshape(-1), dy[step].reshape(-1), flips[step].reshape(-1))
            images = self.images[idx]
            if geometric:
                images = crop_flip(images, *offsets, pad)
            extras = {}
            for name, tensor in self.extras.items():
                sample = full_precision(tensor[idx])
                squeeze = sample.ndim == 3
                if squeeze:
                    sample = sample[:, None]
                if geometric:
                    sample = crop_flip(sample, *offsets, pad)
                extras[name] = sample[:, 0] if squeeze else sample
            yield Batch(idx, unit_pixels(images), self.labels[idx], extras, self.streams)
