"""Interpretability, measured: how closely a student's IG maps agree with its teacher's.

Both models explain the same N test images (stratified by class, seeded) with
integrated gradients on the logit of the true label, a black baseline (zero
pixels) and ``n_steps`` Gauss-Legendre steps; each map is the sum over channels
of |IG| (the maps the overlay uses). Per image we compare the two maps by

- Spearman's rank correlation of the pixel values (ties get average ranks), and
- the overlap of the top 10% pixels: |top(student) & top(teacher)| / |top|,

then report the mean and sd over images. Pixels that are black in the input are
left out of both measures: IG is exactly zero there for *every* model (the input
equals the baseline), so they would add agreement that says nothing about the
models. Within the remaining pixels, ties in the top-10% cut are broken by pixel
index. A model compared with itself scores 1.0 on both.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from igkd.errors import IgkdError

AGREEMENT_FILE = "agreement.json"
DEFAULT_N = 500
DEFAULT_STEPS = 32
TOP_FRACTION = 0.1


def sample_test_indices(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """About ``n`` test indices, the same share of every class (all of them when n >= the split)."""
    from igkd.data.splits import stratified_subset

    if n < 1:
        raise IgkdError(f"the number of agreement images must be at least 1, got {n}")
    if n >= len(labels):
        return torch.arange(len(labels))
    return stratified_subset(labels, n / len(labels), seed)


def ig_maps(model: torch.nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor, n_steps: int, device) -> torch.Tensor:
    """abs_sum IG maps [N, H, W] (float32, CPU) for the true labels, black baseline, in fp32."""
    from igkd.attribution import integrated_gradients, reduce_map

    model = model.to(device).eval()
    x = images_uint8.to(device).float().div(255)
    values = integrated_gradients(model, x, labels.to(device), baseline="black", n_steps=n_steps, precision="fp32")
    return reduce_map(values, "abs_sum").float().cpu()


def map_agreement(a: np.ndarray, b: np.ndarray, informative: np.ndarray, top_fraction: float = TOP_FRACTION) -> tuple[float | None, float | None]:
    """(Spearman rho, top-fraction overlap) of two maps over the ``informative`` pixels (None when undefined)."""
    from scipy import stats

    x, y = a[informative].astype(np.float64), b[informative].astype(np.float64)
    if x.size < 2:
        return None, None
    rho = None
    if np.ptp(x) > 0 and np.ptp(y) > 0:
        rho = float(stats.spearmanr(x, y).statistic)
    k = max(1, math.ceil(top_fraction * x.size))
    top_x = np.argsort(-x, kind="stable")[:k]
    top_y = np.argsort(-y, kind="stable")[:k]
    overlap = len(np.intersect1d(top_x, top_y, assume_unique=True)) / k
    return rho, float(overlap)


def _mean_sd(values: list[float]) -> dict:
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(array.mean()) if array.size else None,
        "sd": float(array.std(ddof=1)) if array.size > 1 else None,
        "n": int(array.size),
    }


def ig_maps_batched(model: torch.nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor, n_steps: int, device, batch: int = 100) -> torch.Tensor:
    """:func:`ig_maps` of every image, ``batch`` images at a time (maps [N, H, W], in image order)."""
    parts = [ig_maps(model, images_uint8[i : i + batch], labels[i : i + batch], n_steps, device) for i in range(0, len(labels), batch)]
    return torch.cat(parts) if parts else torch.empty(0, *images_uint8.shape[2:])


def maps_agreement(teacher_maps: torch.Tensor, student_maps: torch.Tensor, images_uint8: torch.Tensor, top_fraction: float = TOP_FRACTION) -> dict:
    """Mean/sd over images of Spearman rho and top-``top_fraction`` overlap between two aligned sets of maps."""
    rhos, overlaps = [], []
    informative = (images_uint8 > 0).any(1).numpy()  # [N, H, W]: not black in every channel
    for t_map, s_map, mask in zip(teacher_maps.numpy(), student_maps.numpy(), informative):
        rho, overlap = map_agreement(s_map, t_map, mask, top_fraction)
        if rho is not None:
            rhos.append(rho)
        if overlap is not None:
            overlaps.append(overlap)
    return {"spearman": _mean_sd(rhos), "top_overlap": _mean_sd(overlaps)}


def model_agreement(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    images_uint8: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_steps: int = DEFAULT_STEPS,
    top_fraction: float = TOP_FRACTION,
    device="cpu",
    batch: int = 100,
) -> dict:
    """Mean/sd over images of Spearman rho and top-``top_fraction`` overlap between the two models' IG maps."""
    t_maps = ig_maps_batched(teacher, images_uint8, labels, n_steps, device, batch)
    s_maps = ig_maps_batched(student, images_uint8, labels, n_steps, device, batch)
    return maps_agreement(t_maps, s_maps, images_uint8, top_fraction)


def measure_agreement(
    teacher_path: str | Path,
    student_path: str | Path,
    dataset,
    *,
    n: int = DEFAULT_N,
    n_steps: int = DEFAULT_STEPS,
    seed: int = 0,
    device: str = "auto",
    cache: dict | None = None,
) -> dict:
    """Agreement of the student's IG maps with the teacher's on ``n`` stratified test images (a JSON-able dict).

    ``cache``: a dict kept by the caller across calls (a study's runs share one teacher):
    the teacher's record and IG maps are computed once per teacher file, images and steps.
    """
    from igkd.devices import resolve_device
    from igkd.distill.run import resolve_checkpoint
    from igkd.models import load_model
    from igkd.provenance import environment, sha256_file

    target = resolve_device(device)

    def load(role: str, path):
        path = resolve_checkpoint(path)
        model, meta = load_model(path)
        if model.num_classes != dataset.num_classes:
            raise IgkdError(f"{role} {path} predicts {model.num_classes} classes but dataset {dataset.name} has {dataset.num_classes}")
        return model, {"path": str(path), "sha256": sha256_file(path), "model": meta["spec"]["name"]}

    indices = sample_test_indices(dataset.test.labels, n, seed)
    images, labels = dataset.test.images[indices], dataset.test.labels[indices]
    teacher_file = resolve_checkpoint(teacher_path)
    stat = teacher_file.stat()
    key = (str(teacher_file.resolve()), stat.st_size, stat.st_mtime_ns, dataset.fingerprint, n, seed, n_steps, str(target))
    cached = cache.get(key) if cache is not None else None
    teacher = None
    if cached is None:
        teacher, teacher_info = load("teacher", teacher_file)
    student, student_info = load("student", student_path)  # both checked before any IG work
    if cached is None:
        cached = (teacher_info, ig_maps_batched(teacher, images, labels, n_steps, target))
        if cache is not None:
            cache.clear()  # one teacher per study: keep only the latest maps
            cache[key] = cached
    teacher_info, teacher_maps = cached
    result = maps_agreement(teacher_maps, ig_maps_batched(student, images, labels, n_steps, target), images)
    return {
        "n": int(len(indices)),
        "n_requested": n,
        "seed": seed,
        "method": "integrated gradients, target = true label, black baseline, gausslegendre",
        "n_steps": n_steps,
        "reduction": "abs_sum",
        "top_fraction": TOP_FRACTION,
        "excluded_pixels": "black in the input (IG is zero there for every model)",
        **result,
        "teacher": teacher_info,
        "student": student_info,
        "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint, "split": "test"},
        "environment": environment(target),
    }
