"""scikit-learn's bundled handwritten digits as a tiny 32 x 32 RGB dataset (offline default).

The 1,797 8 x 8 images (values 0..16) are scaled to 0..255, upscaled 4x with
*nearest-neighbour* interpolation (exact pixel replication, so the bytes and the
fingerprint do not depend on interpolation arithmetic) and repeated over three
channels. The test split is a seeded stratified 20% of every class
(:func:`igkd.data.splits.stratified_subset`, seed 0: 359 images), the rest is train
(1,438).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from igkd.data.dataset import Dataset, ImageSet, content_fingerprint
from igkd.data.splits import stratified_subset
from igkd.errors import IgkdError

NAME = "digits"
CLASSES = tuple(str(digit) for digit in range(10))
TEST_FRACTION = 0.2
SPLIT_SEED = 0
SIZE = 32


# the source signature that load_dataset calls: every source repeats it, on purpose (a module-level interface)
def load(
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    url: str | None = None,
    progress: bool = True,
) -> Dataset:
    """The digits dataset; it ships with scikit-learn, so there is nothing to point at or download."""
    if data_dir is not None or url:
        raise IgkdError("the digits dataset ships with scikit-learn: drop --data-dir / --url")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = torch.as_tensor(bunch.images, dtype=torch.float64)  # [N, 8, 8], 0..16
    small = torch.round(small * (255.0 / 16.0)).to(torch.uint8)
    images = F.interpolate(small[:, None], size=(SIZE, SIZE), mode="nearest").expand(-1, 3, -1, -1).contiguous()
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    test_index = stratified_subset(labels, TEST_FRACTION, SPLIT_SEED)
    is_train = torch.ones(len(labels), dtype=torch.bool)
    is_train[test_index] = False
    train = ImageSet(images[is_train], labels[is_train])
    test = ImageSet(images[test_index], labels[test_index])
    fingerprint = content_fingerprint(train.images, train.labels, test.images, test.labels, extra=NAME)
    return Dataset(NAME, CLASSES, train, test, fingerprint, source="sklearn.datasets.load_digits")
