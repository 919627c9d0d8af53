"""LiteRT files (.tflite, formerly TensorFlow Lite) converted by ``litert-torch``: fp32, or int8 (PT2E).

* fp32: ``litert_torch.convert(model, (example,))``; the graph keeps the NCHW input and
  output of the PyTorch model (the converter inserts the layout transposes).
* int8: ``torch.export`` -> ``prepare_pt2e`` with litert-torch's PT2E quantiser (symmetric
  int8, weights per output channel, static activations) -> calibration on training images
  -> ``convert_pt2e`` -> ``litert_torch.convert(..., quant_config=QuantConfig(pt2e_quantizer))``.

An int8 file's output tensor is itself int8 (scale and zero point in the file): ``load_litert``
dequantises it, so every format returns float logits (before, the raw int8 codes came back --
argmax, hence accuracy, was right, but the logits and their parity were not).

The file's input shape is the example's; the LiteRT interpreter resizes the batch axis at
load time (``resize_tensor_input``), so one file serves any batch size. The metadata is
written beside the file (``<file>.json``), as for ExecuTorch.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from igkd.deploy.executorch import calibrate_pt2e, quiet
from igkd.deploy.extras import require
from igkd.errors import IgkdError


def litert_bytes(model: torch.nn.Module, example: torch.Tensor, *, calibration: torch.Tensor | None = None) -> bytes:
    """A .tflite flatbuffer for input shape ``example.shape``; int8 when ``calibration`` images are given."""
    require("litert")
    with quiet():
        import litert_torch

        try:
            if calibration is None:
                converted = litert_torch.convert(model, (example,))
            else:
                from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
                from litert_torch.quantize.quant_config import QuantConfig
                from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

                quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
                prepared = prepare_pt2e(torch.export.export(model, (example,)).module(), quantizer)
                calibrate_pt2e(prepared, calibration, example.shape[0])
                quantized = convert_pt2e(prepared, fold_quantize=False)
                converted = litert_torch.convert(quantized, (example,), quant_config=QuantConfig(pt2e_quantizer=quantizer))
            return bytes(converted.model_content())
        except IgkdError:
            raise
        except Exception as err:  # noqa: BLE001 - any converter failure is one line
            raise IgkdError(f"LiteRT conversion failed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}") from None


def load_litert(data: bytes | str | os.PathLike, threads: int = 1, batch_size: int | None = None):
    """(run, batch_size): an interpreter with ``threads`` threads, its batch axis resized to ``batch_size``."""
    require("litert")
    with quiet():
        from ai_edge_litert.interpreter import Interpreter

        try:
            if isinstance(data, bytes):
                interpreter = Interpreter(model_content=data, num_threads=int(threads))
            else:
                interpreter = Interpreter(model_path=os.fspath(data), num_threads=int(threads))
        except Exception as err:  # noqa: BLE001
            raise IgkdError(f"LiteRT cannot load {'the converted model' if isinstance(data, bytes) else data}: {err}") from None
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    shape = [int(v) for v in source["shape"]]
    if batch_size and batch_size != shape[0]:
        interpreter.resize_tensor_input(source["index"], [batch_size, *shape[1:]])
        shape[0] = batch_size
    interpreter.allocate_tensors()

    def run(x: torch.Tensor) -> torch.Tensor:
        interpreter.set_tensor(source["index"], _quantize(np.ascontiguousarray(x.detach().float().numpy()), source))
        interpreter.invoke()
        return torch.from_numpy(_dequantize(interpreter.get_tensor(target["index"]), target))

    return run, shape[0]


def _quantize(values: np.ndarray, detail: dict) -> np.ndarray:
    """Float input -> the tensor's integer type when the file's input is quantised (scale, zero point)."""
    dtype = np.dtype(detail["dtype"])
    scale, zero = detail.get("quantization", (0.0, 0))
    if not np.issubdtype(dtype, np.integer) or not scale:
        return values
    info = np.iinfo(dtype)
    return np.clip(np.round(values / scale) + zero, info.min, info.max).astype(dtype)


def _dequantize(values: np.ndarray, detail: dict) -> np.ndarray:
    """An int8 output (litert-torch's int8 files quantise the logits) -> float32 logits: (q - zero) * scale."""
    scale, zero = detail.get("quantization", (0.0, 0))
    if np.issubdtype(values.dtype, np.integer) and scale:
        return (values.astype(np.float32) - np.float32(zero)) * np.float32(scale)
    return values.astype(np.float32, copy=True)
