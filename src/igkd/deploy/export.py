"""Deployable files: ONNX (dynamic batch axis), TorchScript, ExecuTorch and LiteRT, written only after a parity check.

Which ONNX exporter, and why. torch 2.13 has two:

* ``dynamo=True`` (``torch.export``) took 11-15 s per model on the 2-core development
  machine, saves the weights to a side file ``<name>.onnx.data`` unless told otherwise,
  and prints its progress to stdout (which would corrupt ``--json`` output).
* ``dynamo=False`` (the TorchScript-based exporter, deprecated) takes 2-3 s, folds
  BatchNorm into the convolutions in eval mode and marks the batch axis dynamic via
  ``dynamic_axes``, but leaves ~50 ``Constant`` / ``Identity`` nodes behind.

igkd uses the legacy exporter (its DeprecationWarning silenced) and then onnxscript's
optimiser, which removes those nodes. The result is the same clean graph the dynamo
exporter gives -- Sub/Div (the input normalisation), Conv, Clip (ReLU6), Add,
GlobalAveragePool, Reshape, Gemm -- in one self-contained file with input ``input``
[batch, 3, H, W] and output ``logits`` [batch, classes].

Every export is checked before it is written: the file's logits on a real batch (or a
deterministic random one) and on a single image are compared with the eager model's;
a max abs difference above the tolerance (1e-4, fp32) refuses the write. Files are
written atomically.

ExecuTorch (``executorch``, XNNPACK) and LiteRT (``litert``) come from optional extras
(``igkd.deploy.executorch`` / ``igkd.deploy.litert``); both can also write int8 files
(PT2E quantisation calibrated on given images), which are not held to the fp32 tolerance:
their report carries the max difference and top-1 agreement, and the accuracy guard of
``igkd.deploy.accuracy`` decides. Their metadata is written beside the file (``<file>.json``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from pathlib import Path

import torch

from igkd.atomic import atomic_write_bytes
from igkd.errors import IgkdError
from igkd.models import spec_of
from igkd.models.registry import input_size

FORMATS = ("onnx", "torchscript", "executorch", "litert")
SIDECAR_FORMATS = ("executorch", "litert")  # metadata written beside the file, <file>.json
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "executorch": ".pte", "litert": ".tflite"}
DEFAULT_OPSET = 17
OPSETS = range(13, 21)  # 13: per-channel QDQ (int8) needs it; 20: the newest the legacy exporter writes
PARITY_TOLERANCE = 1e-4
PARITY_BATCH = 16
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def check_format(fmt: str) -> str:
    fmt = str(fmt).strip().lower()
    if fmt not in FORMATS:
        raise IgkdError(f"unknown export format {fmt!r}: use {', '.join(FORMATS)}")
    from igkd.deploy.extras import require

    require(fmt)  # one line naming the extra when its runtime is not installed
    return fmt


def check_opset(opset: int) -> int:
    if opset not in OPSETS:
        raise IgkdError(f"ONNX opset {opset} is not supported: use {OPSETS.start}..{OPSETS.stop - 1} (default {DEFAULT_OPSET})")
    return opset


def check_destination(path: str | Path) -> Path:
    """Fail before any work when the file could not be written."""
    path = Path(path)
    if path.is_dir():
        raise IgkdError(f"cannot write {path}: it is a folder, give a file name")
    if not path.parent.is_dir():
        raise IgkdError(f"cannot write {path}: folder {path.parent} does not exist (create it first)")
    return path


def random_batch(image_size: tuple[int, int] = (32, 32), size: int = PARITY_BATCH, seed: int = 0) -> torch.Tensor:
    """A deterministic float batch in [0, 1] (the model's input range)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(size, 3, *image_size, generator=generator)


def as_pixels(batch: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float [0, 1]; float batches are taken as already in [0, 1]."""
    return batch.float().div(255) if batch.dtype == torch.uint8 else batch.float()


def input_metadata(model: torch.nn.Module, image_size: tuple[int, int], classes=None) -> dict[str, str]:
    """What a user of the exported file must know about its input and output."""
    spec = spec_of(model)
    normalize = spec["normalize"] if spec["arch"] == "external" else {"mean": spec["mean"], "std": spec["std"]}
    meta = {
        "input_name": INPUT_NAME,
        "input_layout": "NCHW",
        "input_shape": f"[batch, 3, {image_size[0]}, {image_size[1]}]",
        "input_dtype": "float32",
        "input_range": "[0, 1]: RGB pixel values divided by 255",
        "normalization": "inside the graph: (x - mean) / std per channel; do not normalise the input" if normalize != "model"
        else "inside the graph (the model's own): do not normalise the input",
        **({"mean": json.dumps(normalize["mean"]), "std": json.dumps(normalize["std"])} if normalize != "model" else {}),
        "output_name": OUTPUT_NAME,
        "output": f"logits [batch, {spec['num_classes']}] (apply softmax for probabilities)",
        "igkd_spec": json.dumps(spec),
    }
    if classes:
        meta["classes"] = json.dumps(list(classes))
    return meta


@contextlib.contextmanager
def _quiet_export():
    """Silence the exporters' deprecation / tracer warnings and what they print to Python's stdout."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def onnx_bytes(model: torch.nn.Module, example: torch.Tensor, opset: int, metadata: dict[str, str]) -> bytes:
    """Legacy ONNX export (dynamic batch) + onnxscript optimiser + metadata_props."""
    import onnx
    import onnxscript.optimizer

    from igkd import __version__

    check_opset(opset)
    buffer = io.BytesIO()
    try:
        with _quiet_export(), torch.no_grad():
            torch.onnx.export(
                model,
                (example,),
                buffer,
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
            )
    except Exception as err:  # noqa: BLE001 - an operator the exporter cannot translate at this opset
        raise IgkdError(f"ONNX export failed at opset {opset}: {str(err).splitlines()[0][:200]} (try --opset {DEFAULT_OPSET})") from None
    graph = onnxscript.optimizer.optimize(onnx.load_from_string(buffer.getvalue()))
    graph.producer_name, graph.producer_version = "igkd", __version__
    graph.doc_string = f"igkd {spec_of(model)['name']}: input float32 NCHW in [0, 1], normalisation inside the graph"
    del graph.metadata_props[:]
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=str(value))
    onnx.checker.check_model(graph)
    return graph.SerializeToString()


def torchscript_bytes(model: torch.nn.Module, example: torch.Tensor, metadata: dict[str, str]) -> bytes:
    """A traced TorchScript module; the metadata travels as the extra file ``igkd.json``.

    TorchScript is deprecated upstream (torch 2.13 warns on ``torch.jit.trace``); ONNX is
    the recommended deployment format. The graph has no data-dependent control flow, so
    tracing is exact and the batch size stays free (the parity check runs two sizes).
    """
    with _quiet_export(), torch.no_grad():
        traced = torch.jit.trace(model, example)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={"igkd.json": json.dumps(metadata)})
    return buffer.getvalue()


def load_torchscript(data: bytes | str | Path) -> tuple[torch.jit.ScriptModule, dict]:
    """A saved TorchScript file -> (module, metadata)."""
    extra = {"igkd.json": ""}
    source = io.BytesIO(data) if isinstance(data, bytes) else str(data)
    with _quiet_export():
        module = torch.jit.load(source, map_location="cpu", _extra_files=extra)
    return module, json.loads(extra["igkd.json"] or "{}")


def run_in_chunks(run, batch: torch.Tensor, size: int | None) -> torch.Tensor:
    """``run`` over ``batch`` in calls of exactly ``size`` images (a file with a static batch axis);
    the last call is padded with zeros and its padding dropped. ``size=None``: one call."""
    if not size or batch.shape[0] == size:
        return run(batch)
    outputs = []
    for start in range(0, batch.shape[0], size):
        part = batch[start : start + size]
        short = size - part.shape[0]
        if short:
            part = torch.cat([part, part.new_zeros(short, *part.shape[1:])])
        outputs.append(run(part)[: size - short])
    return torch.cat(outputs)


def parity(model: torch.nn.Module, run, batch: torch.Tensor, tolerance: float, static_batch: int | None = None) -> dict:
    """Max abs logit difference between ``run`` (the exported file) and eager fp32, at two batch sizes
    (for a file with a static batch axis: the batch run in calls of that size, and one call)."""
    worst, sizes, agree = 0.0, [], []
    parts = (batch, batch[:1]) if static_batch is None else (batch, batch[:static_batch])
    for part in parts:
        with torch.inference_mode():
            reference = model(part)
        logits = run_in_chunks(run, part, static_batch).float()
        worst = max(worst, (logits - reference).abs().max().item())
        agree.append((logits.argmax(1) == reference.argmax(1)).float().mean().item())
        sizes.append(part.shape[0] if static_batch is None else static_batch)
    return {"batch_sizes": sizes, "max_abs_diff": worst, "tolerance": tolerance, "passed": worst <= tolerance,
            "top1_agreement": min(agree)}


def export_bytes(
    model: torch.nn.Module,
    format: str = "onnx",
    *,
    opset: int = DEFAULT_OPSET,
    batch: torch.Tensor | None = None,
    batch_source: str | None = None,
    classes=None,
    metadata: dict | None = None,
    tolerance: float = PARITY_TOLERANCE,
    threads: int | None = None,
    calibration: torch.Tensor | None = None,
    batch_size: int = 1,
) -> tuple[bytes, dict]:
    """Export in memory and check parity; returns (file bytes, report). Raises on parity failure.

    ExecuTorch / LiteRT only: ``batch_size`` is the file's batch axis (static for ExecuTorch;
    LiteRT's interpreter can resize it), ``calibration`` (uint8 or float [0, 1] training images)
    makes an int8 file, whose parity is reported but not held to ``tolerance``.
    """
    fmt = check_format(format)
    if calibration is not None and fmt not in SIDECAR_FORMATS:
        raise IgkdError(f"int8 {fmt} is not written by export: use 'igkd quantize' for int8 ONNX")
    if batch_size < 1:
        raise IgkdError(f"--batch-size must be >= 1 (got {batch_size})")
    model = copy.deepcopy(model).cpu().float().eval()
    if batch is None:
        batch, batch_source = random_batch(input_size(model)), f"deterministic random batch of {PARITY_BATCH} (uniform [0, 1], seed 0)"
    batch = as_pixels(batch)
    image_size = tuple(batch.shape[-2:])
    props = {**input_metadata(model, image_size, classes), **{k: str(v) for k, v in (metadata or {}).items()}}
    if fmt == "onnx":
        from igkd.deploy.runtime import ort_run, ort_session

        data = onnx_bytes(model, batch[:1], opset, props)
        session = ort_session(data, threads)
        check = parity(model, lambda x: ort_run(session, x), batch, tolerance)
    elif fmt == "torchscript":
        data = torchscript_bytes(model, batch[:1], props)
        module, _ = load_torchscript(data)
        with torch.inference_mode():
            check = parity(model, module, batch, tolerance)
    else:
        data, check, props = _edge_export(model, fmt, batch, props, tolerance, threads, calibration, batch_size)
    check["batch"] = batch_source or f"given batch of {batch.shape[0]}"
    report = {
        "format": fmt,
        "precision": "int8" if calibration is not None else "fp32",
        "model": spec_of(model)["name"],
        "exporter": EXPORTERS[fmt],
        "opset": opset if fmt == "onnx" else None,
        "bytes": len(data),
        "parity": check,
        "metadata": props,
    }
    if calibration is not None:
        check["passed"] = None  # int8: judged by the accuracy guard, not by the fp32 tolerance
    elif not check["passed"]:
        raise IgkdError(
            f"{fmt} export of {report['model']} failed the parity check: max abs logit difference "
            f"{check['max_abs_diff']:.3g} > {tolerance:g} on the {check['batch']}; nothing written"
        )
    return data, report


EXPORTERS = {
    "onnx": "torch.onnx.export(dynamo=False) + onnxscript.optimizer",
    "torchscript": "torch.jit.trace",
    "executorch": "torch.export + executorch to_edge_transform_and_lower(XnnpackPartitioner)",
    "litert": "litert_torch.convert",
}


def _edge_export(model, fmt, batch, props, tolerance, threads, calibration, batch_size):
    """ExecuTorch / LiteRT bytes for a ``batch_size`` input, their parity report and metadata."""
    example = batch[:batch_size] if batch.shape[0] >= batch_size else random_batch(tuple(batch.shape[-2:]), batch_size)
    images = None if calibration is None else as_pixels(calibration)
    threads = int(threads or 1)
    if fmt == "executorch":
        from igkd.deploy.executorch import executorch_bytes, load_executorch

        data = executorch_bytes(model, example, calibration=images)
        run, static = load_executorch(data, threads)
    else:
        from igkd.deploy.litert import litert_bytes, load_litert

        data = litert_bytes(model, example, calibration=images)
        run, static = load_litert(data, threads)
    props = {
        **props,
        "input_shape": f"[{static}, 3, {batch.shape[-2]}, {batch.shape[-1]}]",
        "batch_size": str(static) + (" (static)" if fmt == "executorch" else " (the interpreter can resize it)"),
        "precision": "int8" if images is not None else "fp32",
    }
    if images is not None:
        props["quantization"] = json.dumps({
            "flow": "PT2E (torch.export, prepare_pt2e, convert_pt2e)",
            "quantizer": "XNNPACKQuantizer" if fmt == "executorch" else "litert_torch PT2EQuantizer",
            "weights": "int8 symmetric, per output channel",
            "activations": "int8, static, calibrated",
            "calibration": f"{images.shape[0] - images.shape[0] % static} training images",
        })
    return data, parity(model, run, batch, tolerance, static_batch=static), props


def metadata_path(path: str | Path) -> Path:
    """Where the metadata of a format without an embedded metadata slot is written."""
    return Path(f"{path}.json")


def export_model(model: torch.nn.Module, path: str | Path, format: str = "onnx", **options) -> dict:
    """Export ``model`` to ``path`` (ONNX or TorchScript) after a parity check; returns the report.

    ``options`` are those of :func:`export_bytes`: ``opset``, ``batch`` (uint8 images or a
    float [0, 1] batch for the parity check -- a real batch of the model's data when you have
    one; default a deterministic random batch), ``batch_source``, ``classes`` and ``metadata``
    (stored in the file: ONNX ``metadata_props``), ``tolerance``, ``threads``.
    """
    path = check_destination(path)
    data, report = export_bytes(model, format, **options)
    return write_export(path, data, report)


def write_export(path: str | Path, data: bytes, report: dict) -> dict:
    """Write the exported bytes atomically (and, for ExecuTorch / LiteRT, the metadata beside them)."""
    path = Path(path)
    atomic_write_bytes(path, data)
    report["path"] = str(path)
    if report["format"] in SIDECAR_FORMATS:
        from igkd.atomic import atomic_write_json

        sidecar = metadata_path(path)
        atomic_write_json(sidecar, {"kind": "igkd-model-metadata", "file": path.name, "format": report["format"],
                                    "bytes": report["bytes"], "parity": report["parity"], **report["metadata"]})
        report["metadata_path"] = str(sidecar)
    return report
