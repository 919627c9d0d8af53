"""Shipping a model: honest latency and footprint, ONNX / TorchScript export, int8 quantisation.

onnx, onnxruntime, onnxscript and matplotlib are imported only inside the functions that need them.
"""

from igkd.deploy.export import export_model
from igkd.deploy.footprint import model_footprint, state_dict_bytes
from igkd.deploy.latency import benchmark_latency, measure_latency
from igkd.deploy.plot import plot_latency_vs_cf
from igkd.deploy.quantize import quantize_onnx

__all__ = [
    "benchmark_latency",
    "export_model",
    "measure_latency",
    "model_footprint",
    "plot_latency_vs_cf",
    "quantize_onnx",
    "state_dict_bytes",
]
