"""CIFAR-10-C-style corruptions generated on the fly from a clean uint8 test set.

Seven of the CIFAR-10-C corruptions (Hendrycks & Dietterich, "Benchmarking
Neural Network Robustness to Common Corruptions and Perturbations", ICLR 2019),
each at severities 1-5 with the parameters of the authors' generator
``make_cifar_c.py`` (github.com/hendrycks/robustness, ImageNet-C/create_c);
severity 0 returns the images unchanged. Images go in and come out as uint8
``[N, 3, H, W]``; the work happens in float32 on the images' device, in [0, 1]
pixel units, and the result is clamped to [0, 1] and rounded to the nearest
level (CIFAR-10-C truncated with ``np.uint8``, a bias of up to one level).

Where we differ from ``make_cifar_c.py``, on purpose:

- Gaussian blur pads by symmetric reflection (scipy's ``mode="reflect"``);
  CIFAR-10-C used skimage's default, edge replication. Same kernel (truncated
  at 4 sigma).
- Pixelate applies Pillow's BOX resize (down to ``int(side * factor)``, back
  up) as one matrix per axis and rounds once; Pillow rounds after each of its
  four 1-D passes, so results differ from CIFAR-10-C's by at most one level.
- Noise comes from a ``torch.Generator`` seeded from (seed, corruption,
  severity), so a corrupted test set is reproducible; CIFAR-10-C is one fixed
  draw from numpy's global generator.

The noise of image i depends on the whole batch (one generator per call):
corrupt a split in one call for reproducible numbers.
"""

from __future__ import annotations

import hashlib
import io
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from igkd.errors import IgkdError

SEVERITIES = (1, 2, 3, 4, 5)

#: Truncation of the Gaussian kernel in sigmas (scipy.ndimage and skimage default).
BLUR_TRUNCATE = 4.0


def _jpeg(images: torch.Tensor, quality: int, generator: torch.Generator) -> torch.Tensor:
    """Pillow JPEG encode/decode per image (Pillow defaults: 4:2:0 chroma subsampling)."""
    out = np.empty((images.shape[0], images.shape[2], images.shape[3], 3), dtype=np.uint8)
    for i, image in enumerate(images.permute(0, 2, 3, 1).cpu().numpy()):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            out[i] = np.asarray(decoded.convert("RGB"))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().to(images.device)


def _gaussian_noise(x: torch.Tensor, sd: float, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
    return x + sd * noise.to(x.device)


def _shot_noise(x: torch.Tensor, photons: float, generator: torch.Generator) -> torch.Tensor:
    """Poisson photon counts with mean ``photons * x``, rescaled: mean x, variance x / photons."""
    counts = torch.poisson((x * photons).cpu(), generator=generator)
    return counts.to(x.device) / photons


def gaussian_kernel1d(sigma: float, truncate: float = BLUR_TRUNCATE) -> torch.Tensor:
    """Normalised Gaussian weights on ``[-r, r]``, r = int(truncate * sigma + 0.5) (as scipy.ndimage)."""
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (weights / weights.sum()).float()


def _reflect_indices(size: int, radius: int) -> torch.Tensor:
    """Indices of ``[-radius, size + radius)`` reflected about the edges: d c b a | a b c d | d c b a.

    Works for any radius (repeated reflection), unlike ``F.pad(mode="reflect")``.
    """
    i = torch.arange(-radius, size + radius) % (2 * size)
    return torch.where(i < size, i, 2 * size - 1 - i)


def blur_matrix(size: int, sigma: float) -> torch.Tensor:
    """[size, size] matrix of a 1-D Gaussian blur with symmetric-reflection padding folded in."""
    kernel = gaussian_kernel1d(sigma)
    radius = kernel.numel() // 2
    source = _reflect_indices(size, radius).unfold(0, kernel.numel(), 1)  # [size, taps]: input index of each tap
    matrix = torch.zeros(size, size)
    rows = torch.arange(size)[:, None].expand_as(source)
    return matrix.index_put_((rows, source), kernel.expand_as(source).clone(), accumulate=True)


def _separable(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Apply ``rows`` [H', H] along the height and ``cols`` [W', W] along the width of x [N, C, H, W]."""
    return rows.to(x.device) @ x @ cols.to(x.device).T


def _gaussian_blur(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Separable Gaussian blur of each channel with symmetric-reflection padding."""
    return _separable(x, blur_matrix(x.shape[-2], sigma), blur_matrix(x.shape[-1], sigma))


def _contrast(x: torch.Tensor, factor: float, generator: torch.Generator) -> torch.Tensor:
    """Deviation from the per-image, per-channel mean scaled by ``factor`` (as CIFAR-10-C)."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    return (x - mean) * factor + mean


def _brightness(x: torch.Tensor, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Add ``shift`` to the HSV value V = max(R, G, B), clipped to 1, keeping hue and saturation.

    With hue and saturation fixed, RGB is proportional to V, so the HSV round trip
    of CIFAR-10-C reduces to scaling each pixel by V' / V; a black pixel (V = 0,
    saturation 0 by convention) becomes grey V'.
    """
    value = x.amax(dim=1, keepdim=True)
    new_value = (value + shift).clamp(max=1.0)
    return torch.where(value > 0, x * new_value / value.clamp(min=1e-12), new_value)


def box_resize_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """[out, in] weights of a box-filter resize with Pillow's sampling rule (``Image.BOX``).

    Output pixel i covers ``[i * s, (i + 1) * s)`` in input coordinates
    (s = in / out), widened to one input pixel when upsampling. It is the mean of
    the input pixels whose centres fall inside: an average of one or two pixels
    when shrinking by less than 2x, the nearest pixel when enlarging.
    """
    scale = in_size / out_size
    width = max(scale, 1.0)
    centres = (torch.arange(out_size, dtype=torch.float64)[:, None] + 0.5) * scale
    offsets = (torch.arange(in_size, dtype=torch.float64)[None, :] + 0.5 - centres) / width
    inside = ((offsets >= -0.5) & (offsets < 0.5)).double()
    return (inside / inside.sum(1, keepdim=True)).float()


def _pixelate(x: torch.Tensor, factor: float, generator: torch.Generator) -> torch.Tensor:
    """Box-filter down to ``int(side * factor)`` pixels per side and back up, as one linear map per axis."""
    h, w = x.shape[-2:]
    small_h, small_w = max(1, int(h * factor)), max(1, int(w * factor))
    rows = box_resize_matrix(small_h, h) @ box_resize_matrix(h, small_h)
    cols = box_resize_matrix(small_w, w) @ box_resize_matrix(w, small_w)
    return _separable(x, rows, cols)


@dataclass(frozen=True)
class Corruption:
    """One corruption: its parameter at severities 1-5 and the function applying it.

    ``apply(images, level, generator)`` gets uint8 images when ``on_uint8`` (JPEG),
    else float32 in [0, 1]; it returns the same kind (floats may leave [0, 1]).
    ``random``: the output depends on the seed (the noises); the others ignore it.
    """

    name: str
    parameter: str
    levels: tuple[float, ...]
    apply: Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]
    on_uint8: bool = False
    random: bool = False


CORRUPTIONS: dict[str, Corruption] = {
    c.name: c
    for c in (
        Corruption("jpeg", "JPEG quality (Pillow)", (80, 65, 58, 50, 40), _jpeg, on_uint8=True),
        Corruption("gaussian_noise", "noise sd, [0, 1] pixel units", (0.04, 0.06, 0.08, 0.09, 0.10), _gaussian_noise, random=True),
        Corruption("shot_noise", "Poisson photons per unit intensity", (500, 250, 100, 75, 50), _shot_noise, random=True),
        Corruption("gaussian_blur", "blur sigma, pixels", (0.4, 0.6, 0.7, 0.8, 1.0), _gaussian_blur),
        Corruption("contrast", "contrast factor c", (0.75, 0.5, 0.4, 0.3, 0.15), _contrast),
        Corruption("brightness", "shift of HSV value V", (0.05, 0.1, 0.15, 0.2, 0.3), _brightness),
        Corruption("pixelate", "kept fraction of the side", (0.95, 0.9, 0.85, 0.75, 0.65), _pixelate),
    )
}


def _lookup(name: str) -> Corruption:
    key = str(name).strip().lower()
    if key not in CORRUPTIONS:
        raise IgkdError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)} (or 'all')")
    return CORRUPTIONS[key]


def _check_severity(severity, name: str) -> int:
    if isinstance(severity, bool) or not isinstance(severity, numbers.Integral) or not 0 <= severity <= 5:
        raise IgkdError(f"severity of {name} must be an integer 0..5 (0 = clean, 1-5 = CIFAR-10-C levels), got {severity!r}")
    return int(severity)


def corruption_generator(seed: int, name: str, severity: int) -> torch.Generator:
    """A CPU generator seeded from (seed, corruption, severity) by SHA-256 (stable across runs and machines)."""
    digest = hashlib.sha256(f"igkd-corruption:{seed}:{name}:{severity}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """``images`` (uint8 [N, 3, H, W]) corrupted by ``name`` at ``severity`` (0 = a copy of the input).

    Deterministic: the same (images, name, severity, seed) give the same output.
    """
    corruption = _lookup(name)
    severity = _check_severity(severity, corruption.name)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise IgkdError(f"corrupt() needs uint8 images of shape N x 3 x H x W, got {got}")
    if severity == 0 or images.shape[0] == 0:
        return images.clone()
    level = corruption.levels[severity - 1]
    generator = corruption_generator(seed, corruption.name, severity)
    if corruption.on_uint8:
        return corruption.apply(images, level, generator)
    x = corruption.apply(images.float().div_(255), level, generator)
    return x.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


def _parse_severities(text: str, item: str) -> list[int]:
    severities: list[int] = []
    for part in text.split(","):
        part = part.strip()
        bounds = part.split("-")
        if len(bounds) > 2 or not all(b.strip().isascii() and b.strip().isdigit() for b in bounds):
            raise IgkdError(f"bad severity {part!r} in corruption spec item {item!r}; use integers 0..5, e.g. 1,3,5 or 2-4")
        low, high = int(bounds[0]), int(bounds[-1])
        if not (0 <= low <= 5 and 0 <= high <= 5) or low > high:
            raise IgkdError(f"bad severity {part!r} in corruption spec item {item!r}; severities are 0..5 (0 = clean)")
        severities.extend(range(low, high + 1))
    return severities


def parse_corruption_spec(spec: str) -> list[tuple[str, int]]:
    """``(corruption, severity)`` pairs named by ``spec``, in order, without duplicates.

    Grammar (whitespace ignored, names case-insensitive)::

        spec       := item (";" item)*
        item       := target [":" severities]
        target     := "all" | a name in CORRUPTIONS
        severities := range ("," range)*
        range      := N | N "-" M          (0 <= N <= M <= 5)

    Without ``:severities`` an item means severities 1-5; ``all`` means every
    corruption in CORRUPTIONS order. Examples: ``all``, ``jpeg``, ``jpeg:1,3,5``,
    ``gaussian_noise:2;contrast``, ``all:3``, ``pixelate:1-3``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise IgkdError(f"empty corruption spec; use 'all' or names from {', '.join(CORRUPTIONS)}, e.g. 'jpeg:1,3;contrast'")
    pairs: list[tuple[str, int]] = []
    for item in spec.split(";"):
        item = item.strip()
        if not item:
            continue
        target, colon, severities = item.partition(":")
        target = target.strip().lower()
        names = list(CORRUPTIONS) if target == "all" else [_lookup(target).name]
        levels = _parse_severities(severities, item) if colon else list(SEVERITIES)
        pairs.extend((name, level) for name in names for level in levels)
    if not pairs:
        raise IgkdError(f"corruption spec {spec!r} names nothing; use 'all' or names from {', '.join(CORRUPTIONS)}")
    return list(dict.fromkeys(pairs))
