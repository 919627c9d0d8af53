"""Accuracy, per-class accuracy and the confusion matrix of a model on a split."""

from __future__ import annotations

import torch

from igkd.devices import autocast, full_precision, unit_pixels


def check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        from igkd.errors import IgkdError

        raise IgkdError(f"--batch-size must be a whole number of at least 1, got {batch_size!r}")
    return batch_size


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 500, device=None) -> torch.Tensor:
    """Logits (float32, or float64 for a float64 model under ``torch.set_default_dtype``; CPU) for uint8 images [N, 3, H, W], in order, model in eval mode."""
    check_batch_size(batch_size)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for start in range(0, images.shape[0], batch_size):
            batch = unit_pixels(images[start : start + batch_size].to(device, non_blocking=True))
            batch = batch.contiguous(memory_format=torch.channels_last)  # igkd's layout (devices.prepare_model)
            with autocast(device):
                outputs.append(full_precision(model(batch)).cpu())
    finally:
        model.train(was_training)
    if not outputs:
        return torch.empty(0, 0)
    return torch.cat(outputs)


def accuracy_report(predictions: torch.Tensor, labels: torch.Tensor, classes: list[str] | tuple[str, ...]) -> dict:
    """``predictions``: class indices [N] or logits [N, C]. Accuracies in percent."""
    if predictions.ndim == 2:
        predictions = predictions.argmax(1)
    predictions, labels = predictions.cpu().long(), labels.cpu().long()
    n = len(classes)
    confusion = torch.bincount(labels * n + predictions, minlength=n * n).view(n, n)
    support = confusion.sum(1)
    correct = confusion.diag()
    per_class = {
        name: (round(100.0 * correct[i].item() / support[i].item(), 4) if support[i] > 0 else None)
        for i, name in enumerate(classes)
    }
    total = int(support.sum())
    return {
        "n": total,
        "accuracy": round(100.0 * correct.sum().item() / total, 4) if total else None,
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "classes": list(classes),
    }


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, classes, batch_size: int = 500, device=None) -> dict:
    return accuracy_report(predict_logits(model, images, batch_size, device), labels, classes)
