"""IG baselines: the reference input that "carries no signal".

igkd models take [0, 1] pixels and normalise inside, so baselines live in pixel space:

* ``black``: all-zero pixels (the paper's stated baseline).
* ``mean``: the model's normalisation mean colour, i.e. a zero tensor in the model's
  normalised input space. This is what the authors' implementation used (Captum's
  default zero baseline applied after normalisation); choose it to reproduce them.
* ``blur``: the input blurred with a Gaussian of ``blur_sigma`` pixels (edges
  replicated), which keeps colour but removes structure.
* a tensor broadcastable to the inputs ([3, H, W], [1, 3, H, W] or [B, 3, H, W]).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from igkd.errors import IgkdError

BASELINES: tuple[str, ...] = ("black", "mean", "blur")
DEFAULT_BLUR_SIGMA = 5.0


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, H, W] images, kernel radius ceil(3 sigma), replicated edges."""
    if sigma <= 0:
        return images.clone()
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def model_mean_colour(model: torch.nn.Module) -> torch.Tensor:
    """The model's input normalisation mean as [1, C, 1, 1] (zero in its normalised space)."""
    normalize = getattr(model, "normalize", None)
    mean = getattr(normalize, "mean", None)
    if not isinstance(mean, torch.Tensor):
        raise IgkdError("baseline 'mean' needs a model with a 'normalize' module holding its input mean (igkd models have one)")
    return mean.detach().float().reshape(1, -1, 1, 1)


def make_baseline(model: torch.nn.Module, inputs: torch.Tensor, baseline, blur_sigma: float = DEFAULT_BLUR_SIGMA) -> torch.Tensor:
    """The baseline for ``inputs`` [B, C, H, W] as a tensor of the same shape (may be an expanded view)."""
    if isinstance(baseline, torch.Tensor):
        tensor = baseline.to(device=inputs.device, dtype=inputs.dtype)
        if tensor.ndim == 3:
            tensor = tensor.unsqueeze(0)
        try:
            return tensor.expand_as(inputs)
        except RuntimeError:
            raise IgkdError(f"baseline of shape {tuple(baseline.shape)} does not broadcast to inputs {tuple(inputs.shape)}") from None
    if baseline == "black":
        return torch.zeros_like(inputs)
    if baseline == "mean":
        return model_mean_colour(model).to(inputs.device, inputs.dtype).expand_as(inputs)
    if baseline == "blur":
        return gaussian_blur(inputs, blur_sigma)
    raise IgkdError(f"unknown baseline {baseline!r}: use one of {', '.join(BASELINES)} or a tensor")
