"""Attention transfer (Zagoruyko & Komodakis 2017), as in the paper's extended version.

Attention map of a feature tensor [B, C, H, W]: mean over channels of feature^2,
flattened and L2-normalised per sample. Loss: gamma * mean squared difference of
the teacher's and the student's maps. Features are read with forward hooks on
named modules, so neither network is rewrapped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from igkd.errors import IgkdError


def attention_map(features: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W]: channel-mean of squares, optionally resized, L2-normalised."""
    amap = features.float().pow(2).mean(1, keepdim=True)
    if size is not None and tuple(amap.shape[-2:]) != tuple(size):
        amap = F.interpolate(amap, size=size, mode="bilinear", align_corners=False)
    return F.normalize(amap.flatten(1), dim=1)


def attention_transfer_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, gamma: float) -> torch.Tensor:
    """gamma * mean((a_s - a_t)^2); the student's map is resized to the teacher's when they differ."""
    size = tuple(teacher_features.shape[-2:])
    a_s = attention_map(student_features, size)
    a_t = attention_map(teacher_features.detach(), size)
    return gamma * (a_s - a_t).pow(2).mean()


def default_attention_layer(model: nn.Module, divider: int = 2) -> str:
    """The paper's choice: ``features.<len(features) // divider>``."""
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        raise IgkdError("the default attention layer needs a model with a 'features' Sequential; name one with --at-teacher-layer/--at-student-layer")
    return f"features.{len(features) // divider}"


class FeatureTap:
    """Keeps the output of one named module from the latest forward pass."""

    def __init__(self, model: nn.Module, name: str):
        modules = dict(model.named_modules())
        if name not in modules:
            close = [n for n in modules if n.startswith(name.split(".")[0])][:5]
            raise IgkdError(f"no module named {name!r} in {type(model).__name__} (e.g. {', '.join(close) or 'features.0'})")
        self.name = name
        self.output: torch.Tensor | None = None
        self._handle = modules[name].register_forward_hook(self._keep)

    def _keep(self, _module, _inputs, output) -> None:
        self.output = output

    def take(self) -> torch.Tensor:
        if self.output is None:
            raise RuntimeError(f"module {self.name!r} has not run since the last take()")
        out, self.output = self.output, None
        return out

    def remove(self) -> None:
        self._handle.remove()
