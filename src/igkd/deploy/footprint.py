"""What a model costs to store and run: parameters, MACs, bytes at fp32 / fp16 / int8, CF.

Sizes are *state-dict bytes*, computed rather than measured, so they do not depend
on a file format's headers:

* ``fp32`` / ``fp16``: every floating tensor of the state dict (weights, biases,
  BatchNorm statistics, the input normalisation) x 4 or 2 bytes. Integer counters
  (BatchNorm ``num_batches_tracked``) are not part of a deployed model and are not counted.
* ``int8``: convolution and linear weights at 1 byte per weight plus one fp32 scale per
  output channel (per-channel quantisation, as ``igkd quantize`` does); every other
  floating tensor stays fp32. A deployment runtime usually folds BatchNorm into the
  convolutions, so real files can be smaller; ``igkd quantize`` reports the real
  ONNX file sizes next to these figures.
"""

from __future__ import annotations

import functools

from torch import nn

from igkd.models import build_model, count_macs, count_parameters, spec_of
from igkd.models.registry import input_size


def state_dict_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's floating tensors at fp32, fp16 and int8 (see the module docstring)."""
    quantised_weights = {
        f"{name}.weight": module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    }
    floats = int8 = 0
    for key, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        floats += tensor.numel()
        if key in quantised_weights:
            int8 += tensor.numel() + 4 * quantised_weights[key]
        else:
            int8 += 4 * tensor.numel()
    return {"fp32": 4 * floats, "fp16": 2 * floats, "int8": int8}


@functools.lru_cache(maxsize=None)
def _teacher_parameters(num_classes: int, width: float) -> int:
    """Parameters of the family's teacher, built once per (classes, width) rather than once per model."""
    return count_parameters(build_model("teacher", num_classes=num_classes, width=width))


def model_footprint(model: nn.Module) -> dict:
    """Name, k, parameters, MACs (one 32x32 image), CF vs the family's teacher, sizes in bytes. An external
    model: k and CF None (it has no place in the family), MACs on one image of its input size."""
    spec = spec_of(model)
    params = count_parameters(model)
    if spec["arch"] == "external":
        return {"name": spec["name"], "k": None, "params": params, "macs": count_macs(model, input_size(model)), "cf": None,
                "size_bytes": state_dict_bytes(model)}
    return {
        "name": spec["name"],
        "k": spec["k"],
        "params": params,
        "macs": count_macs(model),
        "cf": round(_teacher_parameters(spec["num_classes"], spec["width"]) / params, 2),
        "size_bytes": state_dict_bytes(model),
    }
