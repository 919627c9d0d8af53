"""Two small networks that are not of igkd's family, for tests/test_own_networks.py: a ResNet-style teacher
(stem + residual blocks) and a student of another family (depthwise-separable convolutions). Importable as
``own_nets:resnet_teacher`` and ``own_nets:separable_student`` with tests/ on the import path."""

from __future__ import annotations

from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Identity() if stride == 1 and in_ch == out_ch else nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetTeacher(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 8, blocks: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, ch = [], width
        for i in range(blocks):
            out = width * 2 ** min(i, 2)
            layers.append(BasicBlock(ch, out, 1 if i == 0 else 2))
            ch = out
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, num_classes))

    def forward(self, x):
        return self.head(self.layers(self.stem(x)))


def resnet_teacher(num_classes: int = 10, width: int = 8, blocks: int = 3) -> nn.Module:
    return ResNetTeacher(num_classes, width, blocks)


def _separable(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, in_ch, 3, stride, 1, groups=in_ch, bias=False), nn.BatchNorm2d(in_ch), nn.ReLU(),
        nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(),
    )


def separable_student(num_classes: int = 10, width: int = 4) -> nn.Module:
    """stem -> two depthwise-separable stages (the second at stride 2) -> pool -> linear."""
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()),
        _separable(width, 2 * width, 1),
        _separable(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, num_classes),
    )
