"""ONNX Runtime sessions with a stated thread count, and batched inference on uint8 images."""

from __future__ import annotations

import os

import torch

from igkd.errors import IgkdError


def ort_session(model: bytes | str | os.PathLike, threads: int | None = None):
    """A CPU session: ``threads`` intra-op threads (default: torch's thread count), 1 inter-op thread.

    All graph optimisations are on (that is how ORT is deployed); sequential execution
    keeps the one-inference latency free of inter-op scheduling noise.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else os.fspath(model)
    try:
        return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - ORT raises its own exception types for unreadable files
        where = "the exported graph" if isinstance(model, bytes) else str(model)
        raise IgkdError(f"ONNX Runtime cannot load {where}: {str(err).splitlines()[0][:200]}") from None


def ort_run(session, batch: torch.Tensor) -> torch.Tensor:
    """Logits of one float [0, 1] NCHW batch."""
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: batch.detach().cpu().float().contiguous().numpy()})[0])


def ort_logits(session, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits for uint8 images [N, 3, H, W], in order (the ORT twin of ``evaluate.predict_logits``)."""
    outputs = [
        ort_run(session, images[start : start + batch_size].float().div_(255))
        for start in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(outputs) if outputs else torch.empty(0, 0)
