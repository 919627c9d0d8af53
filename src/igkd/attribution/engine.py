"""What every gradient-based attribution shares: model state, targets, batching, precision.

Attributions need gradients with respect to the *inputs* only. Parameter gradients
(Captum's recipe leaves them on) cost a third of every backward pass and are
switched off for the duration of a call (and restored after); the model runs in
eval mode; gradients come from ``torch.autograd.grad`` on the inputs, so nothing
accumulates in ``.grad``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from igkd.errors import IgkdError

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
# Interpolated samples per forward/backward pass = pixel budget / (H * W):
# 32 samples of 32x32 on a CPU: small passes stay in cache and were fastest on the 2-core dev
# CPU (try others with ``benchmarks/ig_throughput.py --max-batch N``; see docs/attributions.md);
# 1024 on a GPU, enough to fill it (about 11 GB of fp32 activations for the teacher, half in bf16).
PIXEL_BUDGET = {"cpu": 32 * 32 * 32, "cuda": 1024 * 32 * 32}


@dataclass
class Attribution:
    """Per-pixel attributions [B, C, H, W] (fp32), the completeness error per sample [B]
    (None for methods without one), and the precision the gradients were computed in."""

    values: torch.Tensor
    delta: torch.Tensor | None
    precision: str
    precision_check: dict | None = None  # how ``auto`` chose (see integrated_gradients.choose_precision)


def model_device(model: torch.nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def default_max_batch(device: torch.device, height: int, width: int) -> int:
    """Samples per pass that fit the device's pixel budget at this image size."""
    budget = PIXEL_BUDGET["cuda" if device.type == "cuda" else "cpu"]
    return max(1, budget // (height * width))


def execution_defaults(
    device: torch.device, inputs: torch.Tensor, max_batch: int | None, channels_last: bool | None
) -> tuple[int, bool]:
    """``max_batch`` and ``channels_last`` as given, else the device's: its pixel budget at the inputs' size; channels_last on CUDA only."""
    max_batch = max_batch or default_max_batch(device, *inputs.shape[-2:])
    return max_batch, device.type == "cuda" if channels_last is None else channels_last


@contextlib.contextmanager
def input_gradient_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode, no parameter gradients, autograd on; the caller's settings come back after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def check_inputs(inputs: torch.Tensor) -> None:
    if not isinstance(inputs, torch.Tensor) or inputs.ndim != 4 or not inputs.is_floating_point():
        got = f"{inputs.dtype} {tuple(inputs.shape)}" if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise IgkdError(f"inputs must be float images [B, C, H, W] in [0, 1], got {got}")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: try bf16 on CUDA (kept only if completeness holds), fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise IgkdError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if device.type != "cuda":
        if precision == "bf16":
            raise IgkdError("bf16 attributions need a CUDA device (on CPU fp32 is faster and exact): use precision fp32 or auto")
        return "fp32"
    return precision


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """fp32 on CUDA means fp32: TF32 convolutions/matmuls (PyTorch's default for convs) are off meanwhile."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def autocast_for(precision: str, device: torch.device):
    """bf16 autocast, or true fp32 (no TF32) on CUDA; nothing to change on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return _no_tf32()


@torch.no_grad()
def logits(model: torch.nn.Module, inputs: torch.Tensor, max_batch: int) -> torch.Tensor:
    """fp32 outputs of ``inputs`` in slices of ``max_batch`` (true fp32 on CUDA too: the completeness reference)."""
    with autocast_for("fp32", inputs.device):
        return torch.cat([model(inputs[i : i + max_batch]).float() for i in range(0, inputs.shape[0], max_batch)])


def target_indices(model: torch.nn.Module, inputs: torch.Tensor, target, max_batch: int, outputs: torch.Tensor | None = None) -> torch.Tensor:
    """Class index per sample (long [B] on the inputs' device) from an int, a sequence/tensor of ints, or ``"predicted"``."""
    n = inputs.shape[0]
    if isinstance(target, str):
        if target != "predicted":
            raise IgkdError(f"unknown target {target!r}: pass class indices (e.g. the labels) or 'predicted'")
        outputs = logits(model, inputs, max_batch) if outputs is None else outputs
        return outputs.argmax(1)
    if isinstance(target, int):
        return torch.full((n,), target, dtype=torch.long, device=inputs.device)
    tensor = torch.as_tensor(target, device=inputs.device)
    if tensor.is_floating_point() or tensor.shape != (n,):
        raise IgkdError(f"target must be an int, 'predicted' or {n} integer class indices, got {tensor.dtype} {tuple(tensor.shape)}")
    return tensor.long()


def input_gradients(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    max_batch: int,
    *,
    weights: torch.Tensor | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """d output[i, targets[i]] / d inputs[i] (times ``weights[i]`` if given), fp32, in slices of ``max_batch``.

    Call inside :func:`input_gradient_mode`. Samples are independent (eval mode), so
    the gradient of the sum of the selected outputs is every sample's own gradient.
    """
    grads = torch.empty_like(inputs, dtype=torch.float32)
    for start in range(0, inputs.shape[0], max_batch):
        stop = min(start + max_batch, inputs.shape[0])
        batch = inputs[start:stop].detach()
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        batch.requires_grad_(True)
        selected = model(batch).float().gather(1, targets[start:stop, None]).squeeze(1)
        if weights is not None:
            selected = selected * weights[start:stop]
        (grad,) = torch.autograd.grad(selected.sum(), batch)
        grads[start:stop] = grad
    return grads
