"""Device selection and the precision/layout policy used for training and inference."""

from __future__ import annotations

import contextlib

import torch

from igkd.errors import IgkdError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda``/``cuda:N``/``cpu`` are taken as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise IgkdError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise IgkdError(f"device {name!r} requested but no CUDA GPU is available: use --device cpu")
    return device


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; a no-op context on CPU (fp32 there is faster and exact)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def full_precision(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in at least the default float dtype: autocast's bfloat16 outputs and float16 maps become
    float32; float32 and float64 stay as they are, so a training in float64 (``torch.set_default_dtype``,
    as the cohort equivalence tests run it) stays in float64 throughout."""
    return tensor.type(torch.promote_types(tensor.dtype, torch.get_default_dtype()))  # a cast, no device copy


def unit_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> [0, 1] in the default float dtype (float32; float64 under ``torch.set_default_dtype``):
    true division of integers computes in the default dtype, bit for bit as ``images.float() / 255`` in float32."""
    return images.div(255)


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move to device in channels_last layout: faster convolutions on CUDA (tensor cores), and on
    the CPU for training too (benchmarks/train_throughput.py times igkd's step in this layout)."""
    return model.to(device).to(memory_format=torch.channels_last)


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every eval-mode BatchNorm2d that follows a Conv2d in a Sequential into the conv (in place).

    In eval mode BN is the per-channel affine map y = (x - mean) / sqrt(var + eps) * w + b, so
    conv -> BN equals one conv with scaled weights and a bias; the BN becomes Identity (module
    names are kept, so forward hooks such as attention taps still find ``features.<i>``).
    """
    from torch import nn

    for sequential in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        children = list(sequential.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)) or bn.training or not bn.track_running_stats:
                continue
            with torch.no_grad():
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                bias = bn.bias - bn.running_mean * scale
                if conv.bias is not None:
                    bias = bias + conv.bias * scale
                conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
                conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
            setattr(sequential, bn_name, nn.Identity())
    return model


def frozen_copy(model: torch.nn.Module, device: torch.device, bf16: bool = False) -> torch.nn.Module:
    """An inference-only copy of a frozen network (the teacher during distillation): eval mode, no
    parameter gradients, BatchNorm folded into its convolutions, channels_last on ``device``, and on
    CUDA with ``bf16`` the weights cast once, instead of autocast re-casting them every step."""
    import copy

    frozen = fold_batchnorm(copy.deepcopy(model).eval().requires_grad_(False))
    frozen = prepare_model(frozen, device)
    if bf16:
        frozen = frozen.to(torch.bfloat16)
        normalize = getattr(frozen, "normalize", None)
        if normalize is not None:
            normalize.float()  # the input statistics stay exact; the convolutions after it run in bf16
    return frozen
