"""int8 post-training static quantisation with ONNX Runtime's quantiser, and what it costs.

The fp32 model is exported (parity-checked), pre-processed (shape inference and graph
optimisation, ``quant_pre_process``), then quantised by ``quantize_static``: QDQ format,
int8 weights per output channel, uint8 activations whose ranges are calibrated on
TRAINING images only (the test split is used once, to measure accuracy before and
after). ``reduce_range`` (7-bit weights, default on) avoids the integer saturation of
uint8 x int8 products on x86 CPUs without VNNI (ORT's guidance); turn it off for
VNNI or ARM targets.

The accuracy cost is stated, and a model whose test accuracy drops more than
``max_drop`` points is not written unless forced.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

import torch

from igkd.atomic import atomic_write_bytes
from igkd.errors import IgkdError

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
PARITY_IMAGES = 16


class _CalibrationReader:
    """Feeds ONNX Runtime's calibrator batches of float [0, 1] training images."""

    def __init__(self, images: torch.Tensor, input_name: str, batch_size: int = 64):
        self.batches = [
            {input_name: images[start : start + batch_size].float().div(255).numpy()}
            for start in range(0, images.shape[0], batch_size)
        ]
        self.position = 0

    def get_next(self):
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return self.batches[self.position - 1]

    def rewind(self):
        self.position = 0


def check_calibration_method(method: str) -> str:
    if method not in CALIBRATION_METHODS:
        raise IgkdError(f"unknown calibration method {method!r}: use {', '.join(CALIBRATION_METHODS)} (--calibration-method)")
    return method


def calibration_indices(num_train: int, size: int, seed: int) -> torch.Tensor:
    """A seeded random subset of training indices (sorted); all of them if ``size`` >= N."""
    if size < 1:
        raise IgkdError(f"--calibration-size must be at least 1 (got {size})")
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(seed))
    return order[: min(size, num_train)].sort().values


def quantize_static_bytes(
    fp32: bytes,
    calibration_images: torch.Tensor,
    *,
    method: str = "minmax",
    reduce_range: bool = True,
) -> bytes:
    """fp32 ONNX bytes -> int8 QDQ ONNX bytes (per-channel weights), calibrated on ``calibration_images``."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    if method not in calibrate:
        raise IgkdError(f"unknown calibration method {method!r}: use {', '.join(CALIBRATION_METHODS)}")
    source = onnx.load_from_string(fp32)
    with tempfile.TemporaryDirectory(prefix="igkd-quantize-") as tmp:
        raw, prepared, quantised = (Path(tmp) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        raw.write_bytes(fp32)
        quant_pre_process(str(raw), str(prepared))
        quantize_static(
            str(prepared),
            str(quantised),
            _CalibrationReader(calibration_images, source.graph.input[0].name),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=calibrate[method],
        )
        model = onnx.load(str(quantised))
    del model.metadata_props[:]
    for prop in source.metadata_props:
        model.metadata_props.add(key=prop.key, value=prop.value)
    model.metadata_props.add(
        key="quantization",
        value=json.dumps(
            {
                "tool": "onnxruntime.quantization.quantize_static",
                "format": "QDQ",
                "weights": "int8, per output channel" + (", 7-bit range (reduce_range)" if reduce_range else ""),
                "activations": "uint8, calibrated",
                "calibration": f"{method} on {calibration_images.shape[0]} training images",
            }
        ),
    )
    model.doc_string = source.doc_string + " (int8 QDQ)"
    return model.SerializeToString()


def quantize_onnx(
    model: torch.nn.Module,
    dataset,
    out: str | Path,
    *,
    calibration_size: int = 512,
    max_drop: float = 1.0,
    force: bool = False,
    method: str = "minmax",
    reduce_range: bool = True,
    batch_sizes: tuple[int, ...] = (1, 64),
    warmup: int = 5,
    repeats: int = 20,
    threads: int | None = None,
    seed: int = 0,
    metadata: dict | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Export ``model`` to ONNX, quantise it to int8 (calibrated on ``dataset.train``), compare on ``dataset.test``.

    Returns a report (accuracies, drop in points, file sizes, ORT latencies of both) and
    writes the int8 model to ``out`` atomically -- unless the accuracy dropped by more
    than ``max_drop`` points and ``force`` is false, which raises ``IgkdError`` and writes nothing.
    """
    from igkd.deploy.export import check_destination, export_bytes
    from igkd.deploy.latency import check_counts, compare_sessions, torch_threads
    from igkd.deploy.runtime import ort_logits, ort_session
    from igkd.evaluate import accuracy_report
    from igkd.provenance import environment

    check_calibration_method(method)  # before the export and calibration, not after
    out = check_destination(out)
    check_counts(repeats, warmup, batch_sizes)
    if model.num_classes != dataset.num_classes:
        raise IgkdError(
            f"the model has {model.num_classes} outputs but dataset {dataset.name!r} has {dataset.num_classes} classes: "
            "quantise a model trained on this dataset"
        )
    step = progress or (lambda _description: None)
    with torch_threads(threads) as used_threads:
        step("exporting fp32 ONNX")
        fp32, export_report = export_bytes(
            model,
            "onnx",
            batch=dataset.test.images[:PARITY_IMAGES],
            batch_source=f"{dataset.name} test images 0-{PARITY_IMAGES - 1}",
            classes=dataset.classes,
            metadata=metadata,
            threads=used_threads,
        )
        indices = calibration_indices(len(dataset.train), calibration_size, seed)
        step(f"calibrating on {len(indices)} training images")
        int8 = quantize_static_bytes(fp32, dataset.train.images[indices], method=method, reduce_range=reduce_range)
        files = {"fp32": fp32, "int8": int8}
        sessions = {name: ort_session(data, used_threads) for name, data in files.items()}
        variants = {}
        for name, session in sessions.items():
            step(f"{name}: test accuracy on {len(dataset.test)} images")
            report = accuracy_report(ort_logits(session, dataset.test.images), dataset.test.labels, dataset.classes)
            variants[name] = {"accuracy": report["accuracy"], "bytes": len(files[name])}
        step(f"latency of fp32 and int8 (interleaved) at batch {', '.join(map(str, batch_sizes))}")
        latency = compare_sessions(
            sessions, batch_sizes=batch_sizes, warmup=warmup, repeats=repeats, threads=used_threads, image_size=dataset.image_size
        )
        for name in variants:
            variants[name]["latency"] = latency[name]
    from igkd.deploy.accuracy import guard_drop

    guard = guard_drop(variants["fp32"]["accuracy"], variants["int8"]["accuracy"], max_drop, force, out)
    drop = guard["accuracy_drop_points"]
    result = {
        "kind": "igkd-int8-quantization",
        "model": export_report["model"],
        "dataset": dataset.name,
        "dataset_fingerprint": dataset.fingerprint,
        "test_images": len(dataset.test),
        "calibration": {"split": "train", "images": len(indices), "seed": seed, "method": method},
        "quantization": {"format": "QDQ", "weights": "int8 per-channel", "activations": "uint8", "reduce_range": reduce_range},
        "fp32": variants["fp32"],
        "int8": variants["int8"],
        "accuracy_drop_points": drop,
        "size_ratio": round(variants["fp32"]["bytes"] / variants["int8"]["bytes"], 3),
        "int8_speedup": {
            b: round(variants["fp32"]["latency"][b]["median_ms"] / variants["int8"]["latency"][b]["median_ms"], 3)
            for b in variants["fp32"]["latency"]
        },
        "max_drop": max_drop,
        "forced": guard["forced"],
        "parity_fp32": export_report["parity"],
        "threads": used_threads,
        "environment": environment("cpu"),
    }
    atomic_write_bytes(out, int8)
    result["out"] = str(out)
    return result
