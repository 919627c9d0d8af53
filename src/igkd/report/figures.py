"""Figures shared by the demo and the report (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from pathlib import Path

import torch


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed); imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (120 dpi) atomically and close it."""
    from igkd.atomic import atomic_open

    path = Path(path)
    try:
        fig.tight_layout()
        with atomic_open(path, "wb") as handle:
            fig.savefig(handle, format="png", dpi=120)
    finally:
        pyplot().close(fig)
    return path


def minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def overlay_grid(images: torch.Tensor, maps: torch.Tensor, titles: list[str], path: str | Path, caption: str = "") -> Path:
    """Figure-3-like grid: one column per image, rows original / IG map / overlay (paper eq. 7, s = 1).

    ``images`` uint8 [K, 3, H, W]; ``maps`` [K, H, W] (any scale; min-max normalised per image).
    """
    plt = pyplot()
    k = images.shape[0]
    fig, axes = plt.subplots(3, k, figsize=(1.6 * k, 5.2), squeeze=False)
    for j in range(k):
        img = images[j].float().div(255)
        amap = minmax(maps[j].float())
        over = 0.5 * img + 0.5 * amap[None]
        for row, (pic, cmap) in enumerate(((img.permute(1, 2, 0), None), (amap, "inferno"), (over.permute(1, 2, 0), None))):
            ax = axes[row][j]
            ax.imshow(pic.numpy(), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
        axes[0][j].set_title(titles[j], fontsize=8)
    for row, label in enumerate(("image", "IG map", "overlay")):
        axes[row][0].set_ylabel(label, fontsize=9)
    if caption:
        fig.suptitle(caption, fontsize=9)
    return save_png(fig, path)


def one_per_class(labels: torch.Tensor, num_classes: int) -> list[int]:
    """Index of the first sample of each class that has one."""
    picks = []
    for c in range(num_classes):
        hits = torch.nonzero(labels == c).flatten()
        if len(hits):
            picks.append(int(hits[0]))
    return picks


def _colours(names: list[str]) -> dict[str, str]:
    return {name: f"C{i % 10}" for i, name in enumerate(names)}


def accuracy_vs_cf(series: dict[str, list[dict]], path: str | Path, title: str = "") -> Path:
    """Mean test accuracy +- sd over runs per method against the compression factor (log x)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method, points in series.items():
        ax.errorbar([p["cf"] for p in points], [p["mean"] for p in points], yerr=[p["sd"] or 0 for p in points], marker="o", capsize=3, label=method)
    for p in next(iter(series.values()), []):
        ax.annotate(p["student"], (p["cf"], 0), xycoords=("data", "axes fraction"), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("compression factor (teacher params / student params)")
    ax.set_ylabel("test accuracy (%), mean ± sd over runs")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def training_curves(runs: list[dict], methods: list[str], path: str | Path, title: str = "") -> Path:
    """Validation accuracy and training loss per epoch, one line per run, one colour per method."""
    plt = pyplot()
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    colour, students = _colours(methods), list(dict.fromkeys(r["student"] for r in runs))
    seen = set()
    for run in runs:
        style = dict(color=colour.get(run["method"], "k"), linestyle=("-", "--", ":", "-.")[students.index(run["student"]) % 4], alpha=0.8, marker=".")
        label = run["method"] + (f" {run['student']}" if len(students) > 1 else "")
        for ax, key in ((acc_ax, "val_accuracy"), (loss_ax, "train_loss")):
            points = [(e, v) for e, v in zip(run["epoch"], run[key]) if v is not None]
            if points:
                ax.plot(*zip(*points), label=None if label in seen or ax is loss_ax else label, **style)
        seen.add(label)
    acc_ax.set_ylabel("validation accuracy (%)")
    loss_ax.set_ylabel("training loss")
    for ax in (acc_ax, loss_ax):
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, alpha=0.3)
    acc_ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_png(fig, path)


def attention_grid(images: torch.Tensor, rows: list[tuple[str, torch.Tensor]], titles: list[str], path: str | Path, caption: str = "") -> Path:
    """Images in the first row, then one row of attention maps [K, h, w] per model (min-max per image)."""
    plt = pyplot()
    k = images.shape[0]
    fig, axes = plt.subplots(1 + len(rows), k, figsize=(1.6 * k + 1.2, 1.7 * (1 + len(rows))), squeeze=False)
    for j in range(k):
        axes[0][j].imshow(images[j].permute(1, 2, 0).numpy(), interpolation="nearest")
        axes[0][j].set_title(titles[j], fontsize=8)
        for i, (_, maps) in enumerate(rows, 1):
            axes[i][j].imshow(minmax(maps[j].float()).numpy(), cmap="inferno", vmin=0, vmax=1, interpolation="nearest")
    for i, label in enumerate(["image"] + [label for label, _ in rows]):
        axes[i][0].set_ylabel(label, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    if caption:
        fig.suptitle(caption, fontsize=8)
    return save_png(fig, path)
