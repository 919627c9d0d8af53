"""Device selection and the precision/layout policy used for training and inference."""

from __future__ import annotations

import contextlib

import torch

from igkd.errors import IgkdError


#: The device names igkd's commands take (``--device``); the code has CPU and CUDA paths only.
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def parse_device(name: str = "auto") -> torch.device | None:
    """The device a ``--device`` value names, without asking whether it is present (None for ``auto``).

    Only ``auto``, ``cpu``, ``cuda`` and ``cuda:N`` are taken: other torch device types (``meta``,
    ``mps``, ``xpu`` ...) parse, but igkd's training, IG and timing code has no path for them.
    """
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise IgkdError(f"unknown device {name!r}: use {DEVICE_CHOICES}") from None
    if device.type not in ("cpu", "cuda"):
        raise IgkdError(f"device {name!r} is not supported (igkd runs on the CPU or CUDA GPUs): use {DEVICE_CHOICES}")
    if device.type == "cpu" and device.index not in (None, 0):
        raise IgkdError(f"device {name!r}: the CPU has no index, use cpu")
    return device


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda``/``cuda:N``/``cpu`` are taken as given, and
    refused in one line when igkd cannot run there (:func:`parse_device`) or the GPU is not present."""
    device = parse_device(name)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise IgkdError(f"device {name!r} requested but no CUDA GPU is available: use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise IgkdError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA GPU(s) (cuda:0 ...): use another index")
    return device


#: ``cpu_bf16`` settings: which parts of a training step run in bf16 on a CPU (on CUDA, ``amp`` decides).
CPU_BF16 = ("off", "teacher", "all")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles); elsewhere bf16 is emulated and slow."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(probe()) for probe in probes if probe is not None)


def autocast(device: torch.device, enabled: bool = True, cpu: bool = False):
    """bf16 autocast on CUDA; on a CPU only when ``cpu`` asks for it (fp32 is exact there, and on a
    CPU without native bf16 also faster), else a no-op context."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if enabled and cpu and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
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


def prepare_model(model: torch.nn.Module, device: torch.device, memory_format: torch.memory_format = torch.channels_last) -> torch.nn.Module:
    """Move to device in channels_last layout: faster convolutions on CUDA (tensor cores), and on
    the CPU for training too (benchmarks/train_throughput.py times igkd's step in this layout)."""
    return model.to(device).to(memory_format=memory_format)


def training_layout(models, device: torch.device) -> torch.memory_format:
    """The memory layout a student trains in: channels_last for the MobileNetV2 family and on CUDA; on the CPU an
    external architecture trains in the plain layout, because oneDNN (torch 2.13 CPU, AVX-512) crashes with a
    segmentation fault in the weight gradient of a channels_last 1x1 stride-2 convolution (a ResNet's shortcut)
    on inputs of 48x48 and up (docs/own-networks.md)."""
    from igkd.models.mobilenetv2 import MobileNetV2CIFAR

    if device.type == "cuda" or all(isinstance(m, MobileNetV2CIFAR) for m in models):
        return torch.channels_last
    return torch.contiguous_format


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
    parameter gradients, BatchNorm folded into its convolutions, channels_last on ``device``, and with
    ``bf16`` the weights cast once, instead of autocast re-casting them every step (call it under a bf16
    autocast: the input statistics stay float, the convolutions after them run in bf16)."""
    import copy

    frozen = fold_batchnorm(copy.deepcopy(model).eval().requires_grad_(False))
    frozen = prepare_model(frozen, device)
    if bf16:
        frozen = frozen.to(torch.bfloat16)
        normalize = getattr(frozen, "normalize", None)
        if normalize is not None:
            normalize.float()  # the input statistics stay exact; the convolutions after it run in bf16
    return frozen
