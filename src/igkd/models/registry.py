"""Model names -> architectures: ``teacher`` and the student family ``k3`` ... ``k17``.

A model's *spec* (a small JSON-able dict) is stored with every checkpoint so that
the architecture is rebuilt from the file alone.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from igkd.errors import IgkdError
from igkd.models.external import EXTERNAL, check_external_spec, external_spec_of
from igkd.models.mobilenetv2 import CIFAR10_MEAN, CIFAR10_STD, NUM_FEATURE_MODULES, MobileNetV2CIFAR

STUDENT_KS = (3, 5, 7, 9, 11, 13, 15, 17)
ARCH = "mobilenetv2-cifar"


def parse_model_name(name: str) -> int:
    """``teacher`` -> 0 removed modules; ``k5``, ``student-k5``, ``5`` -> 5."""
    name = str(name).strip().lower()
    if name == "teacher":
        return 0
    match = re.fullmatch(r"(?:student-?)?k?(\d+)", name)
    if match and int(match.group(1)) in STUDENT_KS:
        return int(match.group(1))
    family = ", ".join(f"k{k}" for k in STUDENT_KS)
    raise IgkdError(f"unknown model {name!r}: use 'teacher' or a student of the family {family}")


def model_spec(
    name: str = "teacher",
    *,
    num_classes: int = 10,
    width: float = 1.0,
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
    dropout: float | None = None,
) -> dict:
    k = parse_model_name(name)
    return {
        "arch": ARCH,
        "name": "teacher" if k == 0 else f"k{k}",
        "k": k,
        "keep": NUM_FEATURE_MODULES - k,
        "num_classes": int(num_classes),
        "width": float(width),
        "dropout": float((0.2 if k == 0 else 0.0) if dropout is None else dropout),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
    }


MAX_WIDTH = 4.0  # width multipliers igkd trains are 0.25 ... 1; 4 is a model of ~36M parameters
MAX_CLASSES = 100_000


def check_spec(spec, where: str) -> dict:
    """A model spec read from a file, checked before anything is built (an external one by
    :func:`igkd.models.external.check_external_spec`): the architecture and its name,
    ``keep`` = 19 - k for k in the family, ``num_classes`` in 1..MAX_CLASSES, ``width`` in (0, MAX_WIDTH],
    ``dropout`` in [0, 1) and 3 finite ``mean``/``std`` values (std > 0). IgkdError names the first bad field."""

    def number(value) -> bool:
        return type(value) in (int, float) and math.isfinite(value)

    def refuse(field: str, wanted: str):
        value = spec.get(field) if isinstance(spec, dict) else spec
        raise IgkdError(f"{where}: model spec field {field!r} is {value!r}, not {wanted}: the file was not written by igkd or is damaged")

    if not isinstance(spec, dict):
        refuse("spec", "an object")
    if spec.get("arch") == EXTERNAL:
        return check_external_spec(spec, where)
    if spec.get("arch") != ARCH:
        raise IgkdError(f"{where}: unknown architecture {spec.get('arch')!r} (igkd builds {ARCH!r} and {EXTERNAL!r} ones)")
    k = spec.get("k")
    if type(k) is not int or k not in (0, *STUDENT_KS):
        refuse("k", f"0 (teacher) or one of {', '.join(map(str, STUDENT_KS))}")
    if spec.get("keep") != NUM_FEATURE_MODULES - k or type(spec.get("keep")) is not int:
        refuse("keep", f"{NUM_FEATURE_MODULES - k} (19 - k)")
    if spec.get("name") != ("teacher" if k == 0 else f"k{k}"):
        refuse("name", "teacher" if k == 0 else f"k{k}")
    classes = spec.get("num_classes")
    if type(classes) is not int or not 1 <= classes <= MAX_CLASSES:
        refuse("num_classes", f"a whole number in 1..{MAX_CLASSES}")
    if not number(spec.get("width")) or not 0 < spec["width"] <= MAX_WIDTH:
        refuse("width", f"a number in (0, {MAX_WIDTH:g}]")
    if not number(spec.get("dropout")) or not 0 <= spec["dropout"] < 1:
        refuse("dropout", "a number in [0, 1)")
    for field in ("mean", "std"):
        values = spec.get(field)
        if not isinstance(values, list) or len(values) != 3 or not all(number(v) for v in values) or (field == "std" and min(values) <= 0):
            refuse(field, "3 finite numbers" + (" above 0" if field == "std" else ""))
    return spec


def build_model(spec_or_name: dict | str = "teacher", **overrides) -> MobileNetV2CIFAR:
    spec = model_spec(spec_or_name, **overrides) if isinstance(spec_or_name, str) else dict(spec_or_name)
    if spec.get("arch") != ARCH:
        raise IgkdError(f"unknown architecture {spec.get('arch')!r} (igkd builds {ARCH!r})")
    return MobileNetV2CIFAR(
        keep=spec["keep"],
        num_classes=spec["num_classes"],
        width=spec["width"],
        dropout=spec["dropout"],
        mean=spec["mean"],
        std=spec["std"],
    )


def spec_of(model: nn.Module) -> dict:
    """The spec a model file records: the family's fields, or an external model's (:mod:`igkd.models.external`)."""
    if not isinstance(model, MobileNetV2CIFAR):
        return external_spec_of(model)
    k = NUM_FEATURE_MODULES - model.keep
    return {
        "arch": ARCH,
        "name": "teacher" if k == 0 else f"k{k}",
        "k": k,
        "keep": model.keep,
        "num_classes": model.num_classes,
        "width": model.width,
        "dropout": model.dropout,
        "mean": model.normalize.mean.flatten().tolist(),
        "std": model.normalize.std.flatten().tolist(),
    }


def input_size(model: nn.Module) -> tuple[int, int]:
    """(H, W) of the images a model takes: an external model's recorded input shape, 32x32 otherwise."""
    spec = getattr(model, "igkd_spec", None)
    if isinstance(spec, dict) and spec.get("arch") == EXTERNAL and min(spec["input_shape"][1:]) > 0:
        return tuple(spec["input_shape"][1:])
    return (32, 32)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, int] = (32, 32)) -> int:
    """Multiply-accumulates of one forward pass on one image (convolutions and linear layers)."""
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs, output):
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, _inputs, output):
        nonlocal total
        total += output.numel() * module.in_features

    hooks = [
        m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, 3, *input_size, device=device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return total


def family_table(num_classes: int = 10, width: float = 1.0) -> list[dict]:
    """Name, k, params, CF (teacher params / params, 2 decimals) and MACs at 32x32 for the whole family."""
    rows = []
    teacher_params = None
    for k in (0, *STUDENT_KS):
        model = build_model("teacher" if k == 0 else f"k{k}", num_classes=num_classes, width=width)
        params = count_parameters(model)
        teacher_params = teacher_params or params
        rows.append(
            {
                "name": "teacher" if k == 0 else f"k{k}",
                "k": k,
                "params": params,
                "cf": round(teacher_params / params, 2),
                "macs": count_macs(model),
            }
        )
    return rows
