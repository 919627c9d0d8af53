"""Attention transfer (Zagoruyko & Komodakis 2017), as in the paper's extended version.

Attention map of a feature tensor [B, C, H, W]: mean over channels of feature^2,
flattened and L2-normalised per sample. Loss: gamma * mean squared difference of
the teacher's and the student's maps. Features are read with forward hooks on
named modules, so neither network is rewrapped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from igkd.errors import IgkdError
from igkd.devices import full_precision
from igkd.models.taps import FeatureTap  # noqa: F401 - the losses read features through it (igkd.distill.losses.FeatureTap)


def attention_map(features: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W]: channel-mean of squares, optionally resized, L2-normalised."""
    amap = full_precision(features).pow(2).mean(1, keepdim=True)
    if size is not None and tuple(amap.shape[-2:]) != tuple(size):
        amap = F.interpolate(amap, size=size, mode="bilinear", align_corners=False)
    return F.normalize(amap.flatten(1), dim=1)


def attention_transfer_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, gamma: float) -> torch.Tensor:
    """gamma * mean((a_s - a_t)^2); the student's map is resized to the teacher's when they differ."""
    size = tuple(teacher_features.shape[-2:])
    a_s = attention_map(student_features, size)
    a_t = attention_map(teacher_features.detach(), size)
    return gamma * (a_s - a_t).pow(2).mean()


def _features(model: nn.Module, role: str) -> nn.Sequential:
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        raise IgkdError(
            f"the default attention layer needs a {role} with a 'features' Sequential; name one with --at-{role}-layer "
            "(igkd models layers <package.module:factory> lists a network's modules and their output shapes)"
        )
    return features


def default_attention_layer(model: nn.Module, divider: int = 2) -> str:
    """``features.<len(features) // divider>`` of one network (the teacher's layer under the authors' rule)."""
    if divider < 1:
        raise IgkdError(f"at_divider must be a positive integer, got {divider}")
    return f"features.{len(_features(model, 'teacher')) // divider}"


def _index(name: str) -> int | None:
    head, _, tail = name.partition(".")
    return int(tail) if head == "features" and tail.isdigit() else None


def attention_layers(
    teacher: nn.Module,
    student: nn.Module,
    divider: int = 2,
    teacher_layer: str | None = None,
    student_layer: str | None = None,
) -> dict:
    """The (teacher, student) modules whose attention maps are matched, and the rule that chose them.

    The authors' rule: the module index ``len(teacher.features) // divider`` in *both* networks
    (MobileNetV2-CIFAR: 19 // 2 = 9, ``features.9``, 8x8 on 32x32 inputs). A student is the first
    ``19 - k`` modules of the teacher's architecture, so the same index is the same block at the same
    depth with the same map size. A student too short to have that module (k >= 11 keeps <= 8
    modules) uses its deepest module, ``features.<n-1>``: the one closest in depth to the teacher's;
    its map is resized to the teacher's. A teacher layer named by the user moves the student's
    default with it (same index); names given for both are used as they are.
    """
    t_layer = teacher_layer or default_attention_layer(teacher, divider)
    if student_layer:
        rule = "both layers named by the user (--at-teacher-layer/--at-student-layer)" if teacher_layer else (
            f"student layer named by the user; teacher layer features.<len(teacher.features) // {divider}>"
        )
        return {"teacher": t_layer, "student": student_layer, "rule": rule}
    index = _index(t_layer)
    n_student = len(_features(student, "student"))
    how = "named by the user" if teacher_layer else f"len(teacher.features) // {divider} = {index}"
    if index is None:
        s_layer = f"features.{n_student // divider}"
        rule = f"teacher layer {t_layer} named by the user is not a features.<i> module: student features.<len(student.features) // {divider}>"
    elif index < n_student:
        s_layer = f"features.{index}"
        rule = f"the same module index in teacher and student ({how}; the student is a truncation of the teacher's architecture)"
    else:
        s_layer = f"features.{n_student - 1}"
        rule = (
            f"the student has {n_student} feature modules, too few for the teacher's index {index} ({how}): "
            f"its deepest module, features.{n_student - 1}, the closest in depth; its map is resized to the teacher's"
        )
    return {"teacher": t_layer, "student": s_layer, "rule": rule}


def check_attention_pair(teacher: nn.Module, student: nn.Module, layers: dict, input_shape) -> dict:
    """The attention layers of a pair of any networks, checked on one forward of a zero image of ``input_shape``
    (batch 1, eval mode): each name must be a module whose output is a 4-D feature map ``[B, C, H, W]`` (the maps'
    spatial sizes may differ: the student's is resized to the teacher's). Names of a user's network inside
    :class:`igkd.models.external.Normalized` are taken as they are written. Returns the module names as the
    wrapped models spell them and the two output shapes; a wrong name is one line listing the 4-D layers."""
    from igkd.models.external import Normalized, layer_listing, layer_shapes, resolve_layer

    checked = {}
    for role, model in (("teacher", teacher), ("student", student)):
        name = layers[role]
        user_name = name.removeprefix("model.") if isinstance(model, Normalized) else name
        shapes = {n: shape for n, _, shape in layer_shapes(model, input_shape)}
        shape = shapes.get(user_name)
        where = f"--at-{role}-layer {user_name!r}"
        if shape is None:
            raise IgkdError(f"{where}: the {role} has no such module; its modules with 4-D outputs on a [1, {', '.join(map(str, input_shape))}] image: "
                            f"{layer_listing(model, input_shape) or 'none'}")
        if not isinstance(shape, list) or len(shape) != 4:
            raise IgkdError(f"{where} gives {shape}, not a feature map [B, C, H, W]: attention transfer needs one; the {role}'s 4-D layers: "
                            f"{layer_listing(model, input_shape) or 'none'}")
        checked[role], checked[f"{role}_shape"] = resolve_layer(model, user_name), shape
    return checked
