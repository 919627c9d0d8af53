"""Test accuracy of an exported file, and the int8 accuracy guard shared by every format."""

from __future__ import annotations

import torch

from igkd.errors import IgkdError


def load_file(fmt: str, data: bytes, threads: int = 1, batch_size: int | None = None):
    """(run, static batch size or None): ``run(float [0, 1] NCHW batch)`` -> logits, for any igkd format."""
    if fmt == "onnx":
        from igkd.deploy.runtime import ort_run, ort_session

        session = ort_session(data, threads)
        return (lambda x: ort_run(session, x)), None
    if fmt == "torchscript":
        from igkd.deploy.export import load_torchscript

        module = load_torchscript(data)[0]
        return (lambda x: module(x)), None
    if fmt == "executorch":
        from igkd.deploy.executorch import load_executorch

        return load_executorch(data, threads)
    if fmt == "litert":
        from igkd.deploy.litert import load_litert

        return load_litert(data, threads, batch_size)
    raise IgkdError(f"unknown format {fmt!r}")


def file_accuracy(run, static_batch: int | None, dataset, chunk: int = 256) -> dict:
    """Accuracy report of ``run`` on ``dataset.test`` (uint8 images, in calls of the file's batch size)."""
    from igkd.deploy.export import run_in_chunks
    from igkd.evaluate import accuracy_report

    images, outputs = dataset.test.images, []
    size = static_batch or chunk
    step = size * max(1, chunk // size)
    with torch.inference_mode():
        for start in range(0, images.shape[0], step):
            outputs.append(run_in_chunks(run, images[start : start + step].float().div(255), static_batch).float())
    return accuracy_report(torch.cat(outputs), dataset.test.labels, dataset.classes)


def guard_drop(fp32_accuracy: float, int8_accuracy: float, max_drop: float, force: bool, out) -> dict:
    """The int8 accuracy guard: refuse (one line, nothing written) a drop above ``max_drop`` points unless forced."""
    drop = round(fp32_accuracy - int8_accuracy, 4)
    if drop > max_drop and not force:
        raise IgkdError(
            f"int8 test accuracy dropped {drop:.2f} points ({fp32_accuracy:.2f}% -> "
            f"{int8_accuracy:.2f}%), more than --max-drop {max_drop:g}: {out} not written "
            "(--force writes it anyway)"
        )
    return {"accuracy_drop_points": drop, "max_drop": max_drop, "forced": bool(force and drop > max_drop)}
