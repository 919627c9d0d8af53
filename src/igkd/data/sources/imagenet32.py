"""The CIFAR-10 classes inside downsampled ImageNet (Imagenet32), a shifted test set.

Reads the Imagenet32 pickles (``val_data``, optionally ``train_data_batch_1..10``;
dicts with ``data`` uint8 [N, 3072] in channel-planar order like CIFAR and
``labels`` 1-based indices into ``map_clsloc.txt``, lines ``n01440764 1 tench``)
and keeps the images whose WordNet id maps onto a CIFAR-10 class, relabelled with
the CIFAR-10 label. The mapping ships as ``igkd/data/imagenet32_cifar_classes.json``:
the paper's mapping, with ``mud turtle`` taken out of ``frog`` and ``horse``
(sorrel) and ``deer`` (impala, gazelle) added, so that all ten classes have
images. ``test`` is the filtered ``val_data``; ``train`` the filtered train
batches when present, else empty.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from igkd.data.dataset import Dataset, ImageSet, content_fingerprint
from igkd.data.sources.cifar10 import CLASSES as CIFAR10_CLASSES
from igkd.progress import progress_bar
from igkd.data.sources.safe_pickle import load_pickled_dict
from igkd.errors import IgkdError

NAME = "imagenet32-cifar"
VAL_FILE = "val_data"
TRAIN_FILES = tuple(f"train_data_batch_{i}" for i in range(1, 11))
MAP_FILE = "map_clsloc.txt"
CLASS_MAP_FILE = "imagenet32_cifar_classes.json"
_HOW_TO_GET = (
    "download Imagenet32 (val, optionally train) from https://image-net.org/download-images (needs an account) and "
    f"pass --data-dir with the folder holding {VAL_FILE} and {MAP_FILE}"
)


def cifar_class_map() -> dict[str, list[dict[str, str]]]:
    """CIFAR-10 class -> [{"wnid", "name"}] of the ImageNet classes it takes, in CIFAR-10 label order."""
    mapping = json.loads(resources.files("igkd.data").joinpath(CLASS_MAP_FILE).read_text(encoding="utf-8"))
    return {name: mapping[name] for name in CIFAR10_CLASSES}


# the source signature that load_dataset calls: every source repeats it, on purpose (a module-level interface)
def load(
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    url: str | None = None,
    progress: bool = True,
) -> Dataset:
    """The CIFAR-aligned Imagenet32 subset (32 x 32, CIFAR-10 labels and class order)."""
    if download or url:
        raise IgkdError(f"Imagenet32 cannot be downloaded by igkd: {_HOW_TO_GET}")
    if data_dir is None:
        raise IgkdError(f"the {NAME} dataset needs --data-dir: {_HOW_TO_GET}")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise IgkdError(f"{root} is not a folder: {_HOW_TO_GET}")
    map_path = _find(root, MAP_FILE)
    if map_path is None:
        raise IgkdError(
            f"{MAP_FILE} not found in {root} (or a folder inside it): it gives the WordNet id of each Imagenet32 label "
            f"(lines 'n01440764 1 tench') and ships with the dataset / the ImageNet devkit; put it next to {VAL_FILE}"
        )
    val_path = _find(root, VAL_FILE)
    if val_path is None:
        raise IgkdError(f"{VAL_FILE} not found in {root} (or a folder inside it): {_HOW_TO_GET}")
    lookup = _label_lookup(map_path)
    train_paths = [path for path in (_find(root, name) for name in TRAIN_FILES) if path is not None]
    parts = {"train": [], "test": []}
    with progress_bar(len(train_paths) + 1, f"filtering {NAME}", enabled=progress, unit="file") as bar:
        for split, path in [("test", val_path)] + [("train", path) for path in train_paths]:
            parts[split].append(_filtered_batch(path, lookup, map_path))
            bar.advance(1, items=1)
    train, test = (_concat(parts[split]) for split in ("train", "test"))
    fingerprint = content_fingerprint(train.images, train.labels, test.images, test.labels, extra=NAME)
    return Dataset(NAME, CIFAR10_CLASSES, train, test, fingerprint, source=str(root))


def _find(root: Path, name: str) -> Path | None:
    """``root/name``, else ``root/<folder>/name`` (the official zips unpack into a folder)."""
    if (root / name).is_file():
        return root / name
    return next((path for path in sorted(root.glob(f"*/{name}")) if path.is_file()), None)


def _label_lookup(map_path: Path) -> np.ndarray:
    """int64 array: Imagenet32 label (1-based) -> CIFAR-10 label, -1 to drop, -2 for a label the map lacks."""
    wnid_to_cifar = {entry["wnid"]: label for label, entries in enumerate(cifar_class_map().values()) for entry in entries}
    index_to_wnid = {}
    try:
        lines = map_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise IgkdError(f"cannot read {map_path}: {err}") from None
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2 or not fields[0].startswith("n") or not fields[1].isdigit() or int(fields[1]) < 1:
            raise IgkdError(f"{map_path}, line {number}: expected '<wnid> <index from 1> <name>', got {line.strip()!r}")
        index_to_wnid[int(fields[1])] = fields[0]
    if not any(wnid in wnid_to_cifar for wnid in index_to_wnid.values()):
        raise IgkdError(f"{map_path} holds none of the WordNet ids of the CIFAR-10 classes: is it the Imagenet32 {MAP_FILE}?")
    lookup = np.full(max(index_to_wnid) + 1, -2, dtype=np.int64)
    for index, wnid in index_to_wnid.items():
        lookup[index] = wnid_to_cifar.get(wnid, -1)
    return lookup


def _filtered_batch(path: Path, lookup: np.ndarray, map_path: Path) -> ImageSet:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise IgkdError(f"cannot read {path}: {err.strerror or err}") from None
    batch = load_pickled_dict(data, str(path))
    del data
    pixels, labels = batch.get("data"), batch.get("labels")
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32:
        described = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise IgkdError(f"{path}: 'data' must be a uint8 array [N, 3072] (the 32x32 Imagenet32), got {described}")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError, OverflowError):
        labels = np.empty(0, dtype=np.int64)
    if labels.shape != (pixels.shape[0],):
        raise IgkdError(f"{path}: 'labels' must hold {pixels.shape[0]} integers (Imagenet32 class indices from 1)")
    unknown = (labels < 1) | (labels >= len(lookup))
    unknown[~unknown] = lookup[labels[~unknown]] == -2
    if unknown.any():
        raise IgkdError(f"{path}: label {int(labels[unknown][0])} is not an index of {map_path}")
    cifar = lookup[labels]
    keep = np.flatnonzero(cifar >= 0)
    images = torch.from_numpy(pixels[keep].reshape(-1, 3, 32, 32))
    return ImageSet(images, torch.from_numpy(cifar[keep]))


def _concat(parts: list[ImageSet]) -> ImageSet:
    if not parts:
        return ImageSet(torch.empty(0, 3, 32, 32, dtype=torch.uint8), torch.empty(0, dtype=torch.int64))
    return ImageSet(torch.cat([part.images for part in parts]), torch.cat([part.labels for part in parts]))
