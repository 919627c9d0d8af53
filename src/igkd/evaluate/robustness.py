"""Accuracy under common corruptions (CIFAR-10-C style), generated on the fly from the clean test set.

Each corrupted copy of the test split is built once per (dataset fingerprint,
corruption, severity, and seed for the noises) and cached as a ``.npy`` file, so evaluating many
checkpoints on the same data decodes/encodes JPEG and draws noise only once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from igkd.atomic import atomic_open
from igkd.evaluate.accuracy import evaluate
from igkd.evaluate.corruptions import CORRUPTIONS, corrupt, parse_corruption_spec
from igkd.progress import progress_bar

CACHE_VERSION = 1


def corrupted_test_images(dataset, name: str, severity: int, seed: int = 0, cache_dir=None) -> torch.Tensor:
    """The whole test split under one corruption (uint8), from the cache when present."""
    if severity == 0:
        return dataset.test.images
    from igkd.data.sources.cache import cache_root

    seeded = f"-seed{seed}" if CORRUPTIONS[name].random else ""  # only the noises depend on the seed
    path = cache_root(cache_dir) / "corrupted" / f"{dataset.fingerprint}-{name}-s{severity}{seeded}-v{CACHE_VERSION}.npy"
    if path.is_file():
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except (OSError, ValueError):
            pass  # unreadable: rebuild below
    images = corrupt(dataset.test.images, name, severity, seed)  # one call per split: noise does not depend on batching
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "wb") as handle:
            np.save(handle, images.numpy())
    except OSError:
        pass  # a cache that cannot be written only costs time
    return images


def evaluate_robustness(model, dataset, spec: str = "all", *, seed: int = 0, batch_size: int = 500, device=None, cache_dir=None, progress: bool = False) -> dict:
    """Clean accuracy, accuracy per corruption x severity, mean corruption accuracy, relative drop."""
    return evaluate_robustness_models([model], dataset, spec, seed=seed, batch_size=batch_size, device=device, cache_dir=cache_dir, progress=progress)[0]


def evaluate_robustness_models(models, dataset, spec: str = "all", *, seed: int = 0, batch_size: int = 500, device=None, cache_dir=None, progress: bool = False) -> list[dict]:
    """:func:`evaluate_robustness` of several models, each corrupted test set built (or read) once for all of them."""
    items = [(name, sev) for name, sev in parse_corruption_spec(spec) if sev > 0]
    labels, classes = dataset.test.labels, dataset.classes
    cleans = [evaluate(model, dataset.test.images, labels, classes, batch_size, device)["accuracy"] for model in models]
    tables: list[dict[str, dict[str, float]]] = [{} for _ in models]
    with progress_bar(len(items), "corruptions", unit="set", enabled=progress) as bar:
        for name, severity in items:
            images = corrupted_test_images(dataset, name, severity, seed, cache_dir)
            for model, table in zip(models, tables):
                table.setdefault(name, {})[str(severity)] = evaluate(model, images, labels, classes, batch_size, device)["accuracy"]
            bar.advance(1, items=1)
    return [_summary(clean, table, dataset, spec, seed) for clean, table in zip(cleans, tables)]


def _summary(clean: float, table: dict, dataset, spec: str, seed: int) -> dict:
    per_corruption = {name: float(np.mean(list(levels.values()))) for name, levels in table.items()}
    values = [acc for levels in table.values() for acc in levels.values()]
    mean_acc = float(np.mean(values)) if values else None
    return {
        "spec": spec,
        "seed": seed,
        "dataset": dataset.name,
        "fingerprint": dataset.fingerprint,
        "clean_accuracy": clean,
        "accuracy": table,
        "per_corruption_mean": per_corruption,
        "mean_corruption_accuracy": mean_acc,
        "relative_drop": (clean - mean_acc) / clean if mean_acc is not None and clean else None,
    }


def print_robustness(result: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    severities = sorted({int(s) for levels in result["accuracy"].values() for s in levels})
    table = Table(title=f"{title}: clean {result['clean_accuracy']:.2f}%")
    table.add_column("corruption")
    for severity in severities:
        table.add_column(f"s{severity}", justify="right")
    table.add_column("mean", justify="right")
    for name, levels in result["accuracy"].items():
        table.add_row(name, *[f"{levels[str(s)]:.2f}" if str(s) in levels else "-" for s in severities], f"{result['per_corruption_mean'][name]:.2f}")
    console = Console()
    console.print(table)
    if result["mean_corruption_accuracy"] is not None:
        console.print(
            f"mean corruption accuracy {result['mean_corruption_accuracy']:.2f}% "
            f"(relative drop {100 * result['relative_drop']:.1f}% from clean)"
        )


def save_robustness(path: str | Path, result: dict) -> None:
    from igkd.atomic import atomic_write_json

    atomic_write_json(path, result)
