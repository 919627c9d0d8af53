"""MobileNetV2-CIFAR teacher, the truncated student family, model files."""

from igkd.models.checkpoint import load_model, save_model
from igkd.models.mobilenetv2 import CIFAR10_MEAN, CIFAR10_STD, MobileNetV2CIFAR, Normalize
from igkd.models.registry import (
    STUDENT_KS,
    build_model,
    count_macs,
    count_parameters,
    family_table,
    model_spec,
    parse_model_name,
    spec_of,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "MobileNetV2CIFAR",
    "Normalize",
    "STUDENT_KS",
    "build_model",
    "count_macs",
    "count_parameters",
    "family_table",
    "load_model",
    "model_spec",
    "parse_model_name",
    "save_model",
    "spec_of",
]
