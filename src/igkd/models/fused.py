"""Horizontal fusion (HFTA, MLSys 2021): G models of one architecture trained as one network.

``fuse(models)`` turns G members of the family (same name, width, classes and dropout;
each may have its own input ``mean``/``std``) into a :class:`FusedModel` whose every layer
holds the G members side by side, so one forward/backward/optimizer step trains all G,
each on its own batch, with one kernel per layer instead of G.

Layout. Input ``[G, B, 3, H, W]`` (member g's batch at ``[g]``, pixels in [0, 1]);
output logits ``[G, B, num_classes]``. Inside, feature maps are ``[B, G*C, H, W]``
(member g owns channels ``g*C .. (g+1)*C``), which is what grouped convolutions and
per-channel BatchNorm need:

* convolutions -> one conv with ``groups = G * groups`` (depthwise: ``G * C``);
  1x1 convolutions optionally as one ``torch.bmm`` (``pointwise="bmm"``);
* BatchNorm -> one BatchNorm over ``G * C`` channels (per-channel statistics are
  per-member statistics, running stats and momentum included);
* the linear head -> ``torch.baddbmm`` with weight ``[G, out, in]``.

Fusion supports the family only: the layer types of :class:`MobileNetV2CIFAR` (Normalize, Conv2d incl.
depthwise, BatchNorm2d, ReLU6, Dropout, AdaptiveAvgPool2d, Linear) in its fixed order (:data:`FUSED_LAYERS`).
Any other architecture (:mod:`igkd.models.external`) is refused here; the executor trains it run by run.

Parameters keep their member's names (``features.3.conv.1.0.weight``) and their
member's ndim class: conv weights stay 4-D, BatchNorm and bias vectors 1-D
(``[G*C]``, the linear bias too), the linear weight is 3-D. So an optimizer built
with the loop's ``ndim > 1`` decay rule, or with :meth:`FusedModel.param_groups`,
treats every element exactly as G separate optimizers would (Adam, AdamW and SGD
are elementwise). Sum the members' losses (not their mean) so that each member's
gradient equals its single-run gradient.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from igkd.errors import IgkdError

#: The layer types fusion supports, in the order MobileNetV2CIFAR uses them; nothing else is fused.
FUSED_LAYERS = ("Normalize", "Conv2d", "BatchNorm2d", "ReLU6", "Dropout", "AdaptiveAvgPool2d", "Linear")
from igkd.models.mobilenetv2 import MobileNetV2CIFAR, Normalize
from igkd.models.registry import build_model, spec_of
from igkd.models.taps import FeatureTap

POINTWISE = ("grouped", "bmm")


def _stack(tensors: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    return torch.cat([t.detach() for t in tensors], dim)


class FusedNormalize(nn.Module):
    """Each member's (x - mean) / std on its slice of ``[G, B, 3, H, W]``; mean and std stored as ``[G, 3]``."""

    def __init__(self, members: list[Normalize]):
        super().__init__()
        self.register_buffer("mean", torch.stack([m.mean.detach().flatten() for m in members]))
        self.register_buffer("std", torch.stack([m.std.detach().flatten() for m in members]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        G, C = self.mean.shape
        return (x - self.mean.view(G, 1, C, 1, 1)) / self.std.view(G, 1, C, 1, 1)

    def split(self, name: str, value: torch.Tensor) -> list[torch.Tensor]:
        return [v.view(1, -1, 1, 1) for v in value.unbind(0)]

    def join(self, name: str, values: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([v.flatten() for v in values])


class FusedConv2d(nn.Module):
    """G convolutions as one grouped convolution over ``[B, G*C, H, W]``, or 1x1 ones as ``torch.bmm``."""

    def __init__(self, members: list[nn.Conv2d], pointwise: str = "grouped"):
        super().__init__()
        first = members[0]
        self.G = len(members)
        self.out_channels, self.in_channels = first.out_channels, first.in_channels
        self.stride, self.padding, self.dilation, self.groups = first.stride, first.padding, first.dilation, first.groups
        self.weight = nn.Parameter(_stack([m.weight for m in members]))  # [G*out, in/groups, kh, kw]
        self.bias = nn.Parameter(_stack([m.bias for m in members])) if first.bias is not None else None  # [G*out]
        is_pointwise = first.kernel_size == (1, 1) and first.stride == (1, 1) and first.groups == 1 and first.padding == (0, 0)
        self.use_bmm = pointwise == "bmm" and is_pointwise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_bmm:
            return self._bmm(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.G * self.groups)

    def _bmm(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        G, cin, cout = self.G, self.in_channels, self.out_channels
        weight = self.weight.reshape(G, cout, cin)
        if x.is_contiguous(memory_format=torch.channels_last):
            # [B, H, W, G, cin] -> [G, BHW, cin] @ [G, cin, cout] -> [BHW, G, cout] channels_last
            rows = x.permute(0, 2, 3, 1).reshape(B * H * W, G, cin).transpose(0, 1)
            out = torch.bmm(rows, weight.transpose(1, 2)).transpose(0, 1)
            if self.bias is not None:
                out = out + self.bias.view(G, cout)
            return out.reshape(B, H, W, G * cout).permute(0, 3, 1, 2)
        # [B, G, cin, HW] -> [G, cin, B*HW]; [G, cout, cin] @ that -> [B, G*cout, H, W]
        cols = x.reshape(B, G, cin, H * W).permute(1, 2, 0, 3).reshape(G, cin, B * H * W)
        out = torch.bmm(weight, cols).view(G, cout, B, H * W).permute(2, 0, 1, 3)
        if self.bias is not None:
            out = out + self.bias.view(1, G, cout, 1)
        return out.reshape(B, G * cout, H, W)

    def split(self, name: str, value: torch.Tensor) -> list[torch.Tensor]:
        return list(value.chunk(self.G, 0))

    def join(self, name: str, values: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(values, 0)

    def extra_repr(self) -> str:
        mode = "bmm" if self.use_bmm else f"groups={self.G * self.groups}"
        return f"G={self.G}, {self.in_channels}->{self.out_channels} per member, stride={self.stride}, {mode}"


class FusedBatchNorm2d(nn.Module):
    """G BatchNorm2d(C) as one over ``G*C`` channels: per-channel statistics are per-member statistics."""

    def __init__(self, members: list[nn.BatchNorm2d]):
        super().__init__()
        first = members[0]
        self.G, self.num_features, self.eps, self.momentum = len(members), first.num_features, first.eps, first.momentum
        self.weight = nn.Parameter(_stack([m.weight for m in members]))  # [G*C]
        self.bias = nn.Parameter(_stack([m.bias for m in members]))
        self.register_buffer("running_mean", _stack([m.running_mean for m in members]))
        self.register_buffer("running_var", _stack([m.running_var for m in members]))
        self.register_buffer("num_batches_tracked", torch.stack([m.num_batches_tracked.detach() for m in members]))  # [G]

    track_running_stats = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        momentum = self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative average, as nn.BatchNorm2d (BatchNorm recalibration before evaluation)
                momentum = 1.0 / float(self.num_batches_tracked[0])
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, momentum, self.eps)

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def split(self, name: str, value: torch.Tensor) -> list[torch.Tensor]:
        return list(value.unbind(0)) if name == "num_batches_tracked" else list(value.chunk(self.G, 0))

    def join(self, name: str, values: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(values) if name == "num_batches_tracked" else torch.cat(values, 0)

    def extra_repr(self) -> str:
        return f"G={self.G}, {self.num_features} per member, eps={self.eps}, momentum={self.momentum}"


class FusedLinear(nn.Module):
    """G linear layers as one ``torch.baddbmm``: ``[G, B, in] -> [G, B, out]``.

    The weight is ``[G, out, in]`` (ndim > 1, like a member's); the bias is stored flat as
    ``[G*out]`` so that it stays 1-D, i.e. in the no-decay group like a member's bias.
    """

    def __init__(self, members: list[nn.Linear]):
        super().__init__()
        first = members[0]
        self.G, self.in_features, self.out_features = len(members), first.in_features, first.out_features
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in members]))
        self.bias = nn.Parameter(_stack([m.bias for m in members]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias.view(self.G, 1, self.out_features), x, self.weight.transpose(1, 2))

    def split(self, name: str, value: torch.Tensor) -> list[torch.Tensor]:
        return list(value.unbind(0)) if name == "weight" else list(value.chunk(self.G, 0))

    def join(self, name: str, values: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(values) if name == "weight" else torch.cat(values, 0)

    def extra_repr(self) -> str:
        return f"G={self.G}, {self.in_features}->{self.out_features} per member"


FUSED = {Normalize: FusedNormalize, nn.Conv2d: FusedConv2d, nn.BatchNorm2d: FusedBatchNorm2d, nn.Linear: FusedLinear}


class FeatureTapG(FeatureTap):
    """Keeps member-major ``[G, B, C, H, W]`` views of one named module's latest output."""

    def __init__(self, fused: FusedModel, name: str):
        super().__init__(fused, name, "the fused model")
        self.G = fused.G

    def take(self) -> torch.Tensor:
        """Feature maps ``[B, G*C, H, W]`` come back as ``[G, B, C, H, W]`` (a view); other outputs as they are."""
        out = super().take()
        if out.dim() == 4:
            B, GC, H, W = out.shape
            out = out.view(B, self.G, GC // self.G, H, W).transpose(0, 1)
        return out


class FusedModel(nn.Module):
    """G members of one architecture side by side; ``forward([G, B, 3, H, W]) -> [G, B, classes]``."""

    def __init__(self, models: list[MobileNetV2CIFAR], pointwise: str = "grouped"):
        super().__init__()
        self.G, self.pointwise = len(models), pointwise
        self.specs = [spec_of(m) for m in models]
        self.num_classes = models[0].num_classes
        # The skeleton (Sequential, InvertedResidual, ReLU6, Dropout) is built on the meta device;
        # every module holding tensors is then replaced by its fused version, under the same name.
        with torch.device("meta"):
            skeleton = build_model(self.specs[0])
        self.normalize, self.features, self.classifier = skeleton.normalize, skeleton.features, skeleton.classifier
        members = [dict(m.named_modules()) for m in models]
        for name, module in list(self.named_modules()):
            kind = FUSED.get(type(module))
            if kind is None:
                continue
            args = (pointwise,) if kind is FusedConv2d else ()
            fused = kind([member[name] for member in members], *args)
            parent, _, leaf = name.rpartition(".")
            setattr(self.get_submodule(parent) if parent else self, leaf, fused)
        self.classifier[0].p = models[0].classifier[0].p  # the member's dropout module, should it differ from its spec
        self.member_ndim = {name: p.ndim for name, p in models[0].named_parameters()}
        self.train(models[0].training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        G, B, C, H, W = x.shape
        if G != self.G:
            raise ValueError(f"input has {G} member batches, the fused model has {self.G} members")
        x = self.normalize(x)
        if self.features[0][0].weight.is_contiguous(memory_format=torch.channels_last):
            x = x.permute(1, 3, 4, 0, 2).reshape(B, H, W, G * C).permute(0, 3, 1, 2)  # [B, G*3, H, W] channels_last
        else:
            x = x.transpose(0, 1).reshape(B, G * C, H, W)
        x = self.features(x)
        x = x.mean((2, 3)).view(B, G, -1).transpose(0, 1)  # global average pool -> [G, B, C]
        return self.classifier(x)

    # -- per-member views of the parameters and buffers ----------------------------------------
    def _owners(self):
        """(state-dict key, owning fused module, local name) in the members' state-dict order."""
        for prefix, module in self.named_modules():
            if hasattr(module, "split"):
                for local, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                    yield (f"{prefix}.{local}" if prefix else local), module, local

    def split_tensor(self, key: str, value: torch.Tensor) -> list[torch.Tensor]:
        """A fused-shaped tensor for ``key`` (a parameter, buffer, or e.g. its Adam moment) -> G member-shaped views."""
        module_name, _, local = key.rpartition(".")
        return self.get_submodule(module_name).split(local, value)

    def join_tensors(self, key: str, values: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`split_tensor`: G member-shaped tensors -> one fused-shaped tensor."""
        module_name, _, local = key.rpartition(".")
        return self.get_submodule(module_name).join(local, values)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The loop's two groups (decay for ndim > 1, none for ndim <= 1), classified by the members' ndim."""
        named = list(self.named_parameters())
        decay = [p for n, p in named if self.member_ndim[n] > 1]
        no_decay = [p for n, p in named if self.member_ndim[n] <= 1]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def tap(self, name: str) -> FeatureTapG:
        """Hook a module by its member name (``features.9``); ``.take()`` gives ``[G, B, C, H, W]``."""
        return FeatureTapG(self, name)


def fuse(models: list[nn.Module], pointwise: str = "grouped") -> FusedModel:
    """G models of one architecture -> one :class:`FusedModel` on their device and dtype (weights copied).

    ``pointwise``: ``"grouped"`` runs 1x1 convolutions as grouped convolutions, ``"bmm"`` as one
    batched matmul (``benchmarks/cohort_step.py`` says which is faster on a device).
    """
    if pointwise not in POINTWISE:
        raise IgkdError(f"pointwise must be one of {', '.join(POINTWISE)}, got {pointwise!r}")
    models = list(models)
    if not models:
        raise IgkdError("fuse needs at least one model")
    for i, model in enumerate(models):
        if not isinstance(model, MobileNetV2CIFAR):
            raise IgkdError(f"fuse works on igkd MobileNetV2-CIFAR models ({', '.join(FUSED_LAYERS)}); member {i} is a {type(model).__name__}: train it run by run (cohort size 1)")
    arch = lambda s: {k: v for k, v in s.items() if k not in ("mean", "std")}  # noqa: E731 - the input convention may differ
    reference = arch(spec_of(models[0]))
    shapes = {k: (v.shape, v.dtype, v.device) for k, v in models[0].state_dict().items()}
    for i, model in enumerate(models[1:], 1):
        spec = arch(spec_of(model))
        if spec != reference:
            diff = sorted(k for k in reference if reference[k] != spec.get(k))
            raise IgkdError(
                f"cannot fuse models of different architectures: member {i} differs from member 0 in {', '.join(diff)} "
                f"({', '.join(f'{k}={spec.get(k)!r} vs {reference[k]!r}' for k in diff)})"
            )
        other = {k: (v.shape, v.dtype, v.device) for k, v in model.state_dict().items()}
        if other != shapes:
            bad = sorted(k for k in set(shapes) | set(other) if shapes.get(k) != other.get(k))
            raise IgkdError(f"cannot fuse: member {i} differs from member 0 in the shape, dtype or device of {', '.join(bad[:3])}")
    if len({m.training for m in models}) > 1:
        raise IgkdError("cannot fuse members in different modes: put all in train() or all in eval()")
    if len({m.classifier[0].p for m in models}) > 1:
        raise IgkdError(f"cannot fuse members with different dropout: {sorted({m.classifier[0].p for m in models})}")
    for name, module in models[0].named_modules():
        if isinstance(module, nn.BatchNorm2d) and (module.momentum is None or not module.affine or not module.track_running_stats):
            raise IgkdError(f"cannot fuse {name}: BatchNorm needs a fixed momentum, affine weights and running stats")
    return FusedModel(models, pointwise)


def split(fused: FusedModel) -> list[dict[str, torch.Tensor]]:
    """G ordinary state dicts, key for key like each member's ``state_dict()`` (detached copies)."""
    return [member_state(fused, g) for g in range(fused.G)]


def member_state(fused: FusedModel, g: int) -> dict[str, torch.Tensor]:
    """Member g's ordinary state dict (detached copies)."""
    return {key: module.split(local, getattr(module, local).detach())[g].clone() for key, module, local in fused._owners()}


@torch.no_grad()
def load_member(fused: FusedModel, g: int, state_dict: dict[str, torch.Tensor]) -> None:
    """Overwrite member g's slice with an ordinary state dict (e.g. from a checkpoint, to resume)."""
    if not 0 <= g < fused.G:
        raise IgkdError(f"member {g} does not exist (the fused model has {fused.G})")
    keys = [key for key, _, _ in fused._owners()]
    missing, unexpected = sorted(set(keys) - set(state_dict)), sorted(set(state_dict) - set(keys))
    if missing or unexpected:
        raise IgkdError(f"state dict for member {g} does not match the fused architecture (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, module, local in fused._owners():
        target = module.split(local, getattr(module, local))[g]
        value = state_dict[key]
        if target.shape != value.shape:
            raise IgkdError(f"state dict for member {g}: {key} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
        target.copy_(value)
    fused.specs[g] = {**fused.specs[g], "mean": state_dict["normalize.mean"].flatten().tolist(), "std": state_dict["normalize.std"].flatten().tolist()}


def member(fused: FusedModel, g: int) -> MobileNetV2CIFAR:
    """Member g as an ordinary model (same device/dtype), e.g. for ``save_model`` or evaluation."""
    model = build_model(fused.specs[g])
    reference = next(fused.parameters())
    model.to(device=reference.device, dtype=reference.dtype)
    model.load_state_dict(member_state(fused, g))
    return model.train(fused.training)


def _param_names(fused: FusedModel, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's state-dict index order."""
    names = {id(p): n for n, p in fused.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def split_optimizer_state(fused: FusedModel, optimizer: torch.optim.Optimizer) -> list[dict]:
    """The fused optimizer's ``state_dict()`` as G single-run ones (param-shaped entries split, ``step`` copied).

    They load into a member's optimizer built with the same grouping (the loop's decay/no-decay rule
    and :meth:`FusedModel.param_groups` give the same order), so a member can resume on its own.
    """
    saved, names = optimizer.state_dict(), _param_names(fused, optimizer)
    states = [{"state": {}, "param_groups": copy.deepcopy(saved["param_groups"])} for _ in range(fused.G)]
    for index, entry in saved["state"].items():
        param = fused.get_parameter(names[index])
        for state in states:
            state["state"][index] = {}
        for key, value in entry.items():
            parts = fused.split_tensor(names[index], value) if torch.is_tensor(value) and value.shape == param.shape else [value] * fused.G
            for state, part in zip(states, parts):
                state["state"][index][key] = part.clone() if torch.is_tensor(part) else copy.deepcopy(part)
    return states


def join_optimizer_state(fused: FusedModel, optimizer: torch.optim.Optimizer, states: list[dict]) -> dict:
    """G single-run optimizer state dicts -> one for ``optimizer`` (the fused one); inverse of :func:`split_optimizer_state`."""
    if len(states) != fused.G:
        raise IgkdError(f"need {fused.G} optimizer states, got {len(states)}")
    names = _param_names(fused, optimizer)
    joined = {"state": {}, "param_groups": copy.deepcopy(states[0]["param_groups"])}
    for index, entry in states[0]["state"].items():
        param = fused.get_parameter(names[index])
        joined["state"][index] = {}
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() > 0:
                value = fused.join_tensors(names[index], [s["state"][index][key] for s in states])
                if value.shape != param.shape:
                    raise IgkdError(f"optimizer state {key!r} of {names[index]} joins to {tuple(value.shape)}, expected {tuple(param.shape)}")
            joined["state"][index][key] = value
    return joined
