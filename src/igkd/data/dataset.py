"""The in-memory dataset every igkd stage works with.

A dataset is two uint8 tensors of images (N x 3 x H x W) and int64 labels per
split, the class names, and a fingerprint: a content hash that keys every cache
built from it (decoded images, attribution maps, corrupted test sets). Whole
datasets are small enough (CIFAR-10: 180 MB) to sit on the GPU.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from igkd.errors import IgkdError


@dataclass(frozen=True)
class ImageSet:
    """One split: ``images`` uint8 [N, 3, H, W], ``labels`` int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise IgkdError(f"images must be uint8 N x 3 x H x W, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise IgkdError(f"labels must be int64 of length {self.images.shape[0]}, got {self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[indices], self.labels[indices])

    def per_class(self, num_classes: int) -> list[int]:
        return torch.bincount(self.labels, minlength=num_classes).tolist()


@dataclass(frozen=True)
class Dataset:
    name: str
    classes: tuple[str, ...]
    train: ImageSet
    test: ImageSet
    fingerprint: str
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train.images.shape[-2:])

    def info(self) -> dict:
        return {
            "dataset": self.name,
            "train": len(self.train),
            "test": len(self.test),
            "classes": list(self.classes),
            "train_per_class": self.train.per_class(self.num_classes),
            "test_per_class": self.test.per_class(self.num_classes),
            "fingerprint": self.fingerprint,
        }


def content_fingerprint(*tensors: torch.Tensor, extra: str = "") -> str:
    """sha256 (first 16 hex digits) over the raw bytes and shapes of the given tensors."""
    digest = hashlib.sha256(extra.encode())
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]
