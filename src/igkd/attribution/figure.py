"""One picture of one cached map: the image, the map, and the overlay the trainer would use.

The overlay is the paper's eq. 7 with exponent s = 1: 0.5 * x + 0.5 * minmax(map), the
min-max normalised map repeated over the three channels.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from igkd.atomic import atomic_write_bytes


def minmax(values: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] (a constant map becomes all zeros)."""
    values = values.astype(np.float64)
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


def overlay(image: np.ndarray, amap: np.ndarray) -> np.ndarray:
    """image float [H, W, 3] in [0, 1], map [H, W] -> 0.5 * image + 0.5 * minmax(map)."""
    return 0.5 * image + 0.5 * minmax(amap)[..., None]


def save_attribution_figure(image_uint8: np.ndarray, amap: np.ndarray, path: str | Path, title: str) -> None:
    """Draw image [3, H, W] uint8, its map [H, W] and their overlay side by side into a PNG (atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image = image_uint8.transpose(1, 2, 0).astype(np.float64) / 255
    amap = amap.astype(np.float64)
    figure = Figure(figsize=(9, 3.4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3)
    axes[0].imshow(image, interpolation="nearest")
    axes[0].set_title("image")
    shown = axes[1].imshow(amap, cmap="inferno", interpolation="nearest")
    axes[1].set_title("map")
    figure.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.04)
    axes[2].imshow(np.clip(overlay(image, amap), 0, 1), interpolation="nearest")
    axes[2].set_title("0.5 x + 0.5 minmax(map)")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    figure.suptitle(title, fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
