"""MobileNetV2 for 32x32 inputs (the paper's teacher) and its truncated students.

The teacher's feature stack has 19 modules: a stride-1 stem, 17 inverted-residual
blocks and a 1x1 head conv to 1280 channels. A student with ``k`` modules removed
keeps the first ``19 - k`` of them (freshly initialised, not copied from the
teacher), then global average pooling and a linear layer. Module names follow the
torchvision / PyTorch_CIFAR10 layout (``features.<i>...``, ``classifier.1``), so
published state dicts load without renaming.

All models take float images in [0, 1]; ``normalize`` (the model's first module)
applies the input convention, so exported graphs and IG baselines live in pixel space.
"""

from __future__ import annotations

import torch
from torch import nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)

# (expansion t, output channels c, repeats n, first stride s); row 2 has stride 1 for 32x32 inputs.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
NUM_FEATURE_MODULES = 19


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor`` without dropping more than 10% (MobileNet rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class Normalize(nn.Module):
    """(x - mean) / std per channel; mean 0, std 1 for models trained on raw [0, 1] inputs."""

    def __init__(self, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int):
        super().__init__()
        hidden = int(round(in_ch * expansion))
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = [] if expansion == 1 else [ConvBNReLU(in_ch, hidden, kernel=1)]
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


def feature_modules(width: float = 1.0) -> list[nn.Module]:
    """The 19 feature modules of MobileNetV2-CIFAR at a width multiplier."""
    in_ch = make_divisible(32 * width)
    modules: list[nn.Module] = [ConvBNReLU(3, in_ch, stride=1)]
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
        out_ch = make_divisible(c * width)
        for i in range(n):
            modules.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
            in_ch = out_ch
    modules.append(ConvBNReLU(in_ch, make_divisible(1280 * max(1.0, width)), kernel=1))
    return modules


def _out_channels(module: nn.Module) -> int:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


class MobileNetV2CIFAR(nn.Module):
    """The first ``keep`` feature modules of MobileNetV2-CIFAR + pooling + linear classifier.

    ``keep=19, dropout=0.2`` is the teacher; ``keep=19-k, dropout=0`` the student with k removed.
    """

    def __init__(
        self,
        keep: int = NUM_FEATURE_MODULES,
        num_classes: int = 10,
        width: float = 1.0,
        dropout: float = 0.2,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
    ):
        super().__init__()
        if not 1 <= keep <= NUM_FEATURE_MODULES:
            raise ValueError(f"keep must be in 1..{NUM_FEATURE_MODULES}, got {keep}")
        self.keep, self.width, self.num_classes, self.dropout = keep, width, num_classes, dropout
        self.normalize = Normalize(mean, std)
        self.features = nn.Sequential(*feature_modules(width)[:keep])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(_out_channels(self.features[-1]), num_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalize(x))
        return self.classifier(torch.flatten(self.pool(x), 1))
