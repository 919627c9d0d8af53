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


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move to device in channels_last layout: faster convolutions on CUDA (tensor cores), and on
    the CPU for training too (benchmarks/train_throughput.py times igkd's step in this layout)."""
    return model.to(device).to(memory_format=torch.channels_last)
