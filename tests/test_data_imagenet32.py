"""Imagenet32 filtered onto the CIFAR-10 classes, on a tiny synthetic file in the Imagenet32 format."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from igkd.data import CIFAR10_CLASSES, load_dataset
from igkd.data.sources import imagenet32
from igkd.errors import IgkdError

# index (1-based, as in map_clsloc.txt) -> (wnid, name, CIFAR-10 label or None)
MAP = {
    1: ("n01440764", "tench", None),
    2: ("n02690373", "airliner", 0),
    3: ("n02389026", "sorrel", 7),
    4: ("n01667114", "mud_turtle", None),  # the paper filed it under frog; it is a turtle
    5: ("n02422699", "impala", 4),
    6: ("n01641577", "bullfrog", 6),
}


def write_imagenet32(root: Path, val_labels: list[int], train_labels: list[int] | None = None, seed: int = 0):
    """val_data (+ Imagenet32_train/train_data_batch_1) and map_clsloc.txt; returns the pixel arrays written."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "map_clsloc.txt").write_text("".join(f"{wnid} {i} {name}\n" for i, (wnid, name, _) in MAP.items()))
    val = rng.integers(0, 256, (len(val_labels), 3072), dtype=np.uint8)
    (root / "val_data").write_bytes(pickle.dumps({"data": val, "labels": val_labels}))
    train = None
    if train_labels is not None:
        (root / "Imagenet32_train").mkdir()
        train = rng.integers(0, 256, (len(train_labels), 3072), dtype=np.uint8)
        batch = {"data": train, "labels": train_labels, "mean": train.mean(0)}
        (root / "Imagenet32_train" / "train_data_batch_1").write_bytes(pickle.dumps(batch))
    return val, train


def kept(pixels: np.ndarray, labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    keep = [i for i, label in enumerate(labels) if MAP[label][2] is not None]
    return pixels[keep].reshape(-1, 3, 32, 32), np.asarray([MAP[labels[i]][2] for i in keep])


def test_filters_onto_cifar_classes(tmp_path):
    val_labels, train_labels = [1, 2, 3, 4, 5, 6, 2, 4], [6, 6, 1, 3]
    val, train = write_imagenet32(tmp_path, val_labels, train_labels)
    data = load_dataset("imagenet32-cifar", tmp_path)
    assert data.classes == CIFAR10_CLASSES
    for split, pixels, labels in (("test", val, val_labels), ("train", train, train_labels)):
        images, cifar_labels = kept(pixels, labels)
        assert np.array_equal(getattr(data, split).images.numpy(), images)
        assert np.array_equal(getattr(data, split).labels.numpy(), cifar_labels)
    assert data.info()["test_per_class"] == [2, 0, 0, 0, 1, 0, 1, 1, 0, 0]


def test_without_train_batches_train_is_empty(tmp_path):
    write_imagenet32(tmp_path, [2, 3, 5])
    data = load_dataset("imagenet32-cifar", tmp_path)
    assert tuple(data.train.images.shape) == (0, 3, 32, 32) and len(data.test) == 3
    assert data.info()["train"] == 0


def test_missing_map_and_bad_labels(tmp_path, capsys):
    write_imagenet32(tmp_path, [2, 3])
    (tmp_path / "map_clsloc.txt").unlink()
    with pytest.raises(IgkdError, match="map_clsloc.txt not found"):
        load_dataset("imagenet32-cifar", tmp_path)
    from igkd.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["data", "info", "--dataset", "imagenet32-cifar", "--data-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "map_clsloc.txt not found" in lines[0]
    write_imagenet32(tmp_path / "other", [2, 99])
    with pytest.raises(IgkdError, match=r"label 99 is not an index of"):
        load_dataset("imagenet32-cifar", tmp_path / "other")
    (tmp_path / "other" / "val_data").write_bytes(b"\x80\x04garbage")
    with pytest.raises(IgkdError, match=r"val_data is not a readable dataset pickle"):
        load_dataset("imagenet32-cifar", tmp_path / "other")


def test_shipped_mapping_covers_all_ten_classes():
    mapping = imagenet32.cifar_class_map()
    assert tuple(mapping) == CIFAR10_CLASSES
    wnids = [entry["wnid"] for entries in mapping.values() for entry in entries]
    assert len(wnids) == len(set(wnids)) and all(re.fullmatch(r"n\d{8}", wnid) for wnid in wnids)
    assert all(mapping[name] for name in CIFAR10_CLASSES)
    assert "n01667114" not in wnids  # mud turtle is no frog
    by_class = {name: {entry["wnid"] for entry in entries} for name, entries in mapping.items()}
    assert by_class["horse"] == {"n02389026"} and by_class["deer"] == {"n02422699", "n02423022"}
    assert len(by_class["bird"]) == 58 and len(wnids) == 109
