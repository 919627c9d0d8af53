"""Forward hooks that keep one named module's latest output (torchdistill-style), so that a loss can read
intermediate features without any change to the model."""

from __future__ import annotations

import torch
from torch import nn

from igkd.errors import IgkdError


class FeatureTap:
    """Keeps the output of one named module from the latest forward pass; :meth:`take` hands it over once."""

    def __init__(self, model: nn.Module, name: str, what: str | None = None):
        modules = dict(model.named_modules())
        if not name or name not in modules:  # "" is the model itself: its output is the logits, not a feature map
            close = [n for n in modules if n and n.startswith(name.split(".")[0])][:5]
            raise IgkdError(f"no module named {name!r} in {what or type(model).__name__} (e.g. {', '.join(close) or 'features.0'})")
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
