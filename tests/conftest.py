"""Shared fixtures: tiny datasets built in memory (tests never read ../shared/data)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("IGKD_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"), "igkd-test-cache"))
torch.set_num_threads(1)


def make_tiny_dataset(n_train: int = 64, n_test: int = 32, size: int = 16, classes: int = 4, seed: int = 0):
    """A learnable toy problem: class c has a bright square in quadrant c, plus noise."""
    from igkd.data.dataset import Dataset, ImageSet, content_fingerprint

    generator = torch.Generator().manual_seed(seed)

    def split(n):
        labels = torch.arange(n) % classes
        images = torch.randint(0, 60, (n, 3, size, size), generator=generator).to(torch.uint8)
        half = size // 2
        for i, c in enumerate(labels.tolist()):
            r, q = divmod(c % 4, 2)
            images[i, :, r * half : (r + 1) * half, q * half : (q + 1) * half] += 150
        return ImageSet(images, labels.long())

    train, test = split(n_train), split(n_test)
    names = tuple(f"c{i}" for i in range(classes))
    return Dataset("tiny", names, train, test, content_fingerprint(train.images, train.labels, test.images, test.labels, extra="tiny"), "memory")


@pytest.fixture
def tiny_dataset():
    return make_tiny_dataset()
