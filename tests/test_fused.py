"""The cohort contract: a fused model of G members behaves exactly as the G members trained separately.

Float64 throughout, tiny inputs (16x16), narrow widths; tolerances 1e-10 (sums in a different order).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from igkd.distill.losses.attention import FeatureTap
from igkd.errors import IgkdError
from igkd.models import build_model
from igkd.models.fused import fuse, join_optimizer_state, load_member, member, split, split_optimizer_state

TOL = dict(rtol=1e-10, atol=1e-10)
CASES = [("teacher", 0.25), ("k5", 0.5), ("k17", 1.0), ("k13", 0.5)]


def members(name: str, width: float, G: int, seed: int = 0) -> list[torch.nn.Module]:
    """G members with different weights, BN running stats and input normalisation."""
    torch.manual_seed(seed)
    models = []
    for g in range(G):
        model = build_model(name, width=width, num_classes=7, mean=(0.4 + 0.01 * g, 0.5, 0.45), std=(0.25, 0.24 - 0.01 * g, 0.26)).double()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.1, 0.1)
                    module.running_var.uniform_(0.5, 1.5)
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.1, 0.1)
            model.classifier[1].bias.uniform_(-0.1, 0.1)
        models.append(model)
    return models


def batches(G: int, B: int = 4, size: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(G, B, 3, size, size, generator=generator, dtype=torch.float64), torch.randint(0, 7, (G, B), generator=generator)


def assert_states_equal(actual: dict, expected: dict, **tol) -> None:
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key].shape == value.shape and actual[key].dtype == value.dtype, key
        torch.testing.assert_close(actual[key], value, **(tol or dict(rtol=0, atol=0)), msg=key)


def no_dropout(models):
    """Dropout off (the teacher has p=0.2), so that train-mode outputs are deterministic."""
    for model in models:
        model.classifier[0].p = 0.0
    return models


@pytest.mark.parametrize("name,width", CASES)
def test_fuse_split_round_trip_is_exact(name, width):
    models = members(name, width, 3)
    states = split(fuse(models))
    for model, state in zip(models, states):
        assert_states_equal(state, model.state_dict())


@pytest.mark.parametrize("pointwise", ["grouped", "bmm"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("name,width", CASES)
def test_forward_matches_each_member(name, width, G, channels_last, pointwise):
    models = no_dropout(members(name, width, G))
    fused = fuse(models, pointwise=pointwise)
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
    x, _ = batches(G)
    for mode in ("train", "eval"):
        fused.train(mode == "train")
        out = fused(x)
        assert out.shape == (G, 4, 7)
        for g, model in enumerate(models):
            model.train(mode == "train")
            torch.testing.assert_close(out[g], model(x[g]), **TOL)
    for state, model in zip(split(fused), models):  # running stats updated once in train mode, like each member's
        assert_states_equal(state, model.state_dict(), **TOL)


def test_teacher_dropout_is_applied_in_train_mode_only():
    models = members("teacher", 0.25, 2)
    fused = fuse(models).eval()
    x, _ = batches(2)
    for g, model in enumerate(models):
        torch.testing.assert_close(fused(x)[g], model.eval()(x[g]), **TOL)
    with_dropout = fused.train()(x)
    fused.classifier[0].p = 0.0
    assert not torch.allclose(with_dropout, fused(x))  # same batch statistics, only the dropout masks differ


@pytest.mark.parametrize("pointwise", ["grouped", "bmm"])
@pytest.mark.parametrize("name,width", [("k5", 0.5), ("k17", 1.0), ("teacher", 0.25)])
def test_gradients_of_summed_losses_match_each_member(name, width, pointwise):
    G = 3
    models = no_dropout(members(name, width, G))
    fused = fuse(models, pointwise=pointwise).to(memory_format=torch.channels_last)
    x, y = batches(G)
    logits = fused(x)
    sum(F.cross_entropy(logits[g], y[g]) for g in range(G)).backward()
    grads = [{} for _ in range(G)]
    for name_, p in fused.named_parameters():
        for g, part in enumerate(fused.split_tensor(name_, p.grad)):
            grads[g][name_] = part
    for g, model in enumerate(models):
        F.cross_entropy(model(x[g]), y[g]).backward()
        for name_, p in model.named_parameters():
            torch.testing.assert_close(grads[g][name_], p.grad, **TOL, msg=name_)


def test_parameters_keep_their_members_ndim_class():
    for name, width in CASES:
        model = members(name, width, 1)[0]
        fused = fuse([model, copy.deepcopy(model)])
        member_class = {n: p.ndim > 1 for n, p in model.named_parameters()}
        fused_class = {n: p.ndim > 1 for n, p in fused.named_parameters()}
        assert fused_class == member_class  # the loop's own ndim rule classifies fused parameters correctly
        decay, no_decay = fused.param_groups(5e-4)
        assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
        assert len(decay["params"]) == sum(member_class.values())
        assert len(no_decay["params"]) == len(member_class) - sum(member_class.values())


def single_optimizer(kind: str, params_groups):
    if kind == "adam":
        return torch.optim.Adam(params_groups, lr=1e-2)
    if kind == "adamw":
        return torch.optim.AdamW(params_groups, lr=1e-2)
    return torch.optim.SGD(params_groups, lr=0.05, momentum=0.9, nesterov=True)


def loop_groups(model, weight_decay):
    """The grouping of distill/schedule.py's build_optimizer."""
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for n, p in named if p.ndim <= 1], "weight_decay": 0.0},
    ]


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_optimizer_steps_keep_members_equal_to_separate_runs(kind):
    G, steps, wd = 3, 5, 5e-3
    models = members("k13", 0.5, G)
    separate = copy.deepcopy(models)
    fused = fuse(models, pointwise="bmm").to(memory_format=torch.channels_last).train()
    fused_opt = single_optimizer(kind, fused.param_groups(wd))
    opts = [single_optimizer(kind, loop_groups(m.train(), wd)) for m in separate]
    for step in range(steps):
        x, y = batches(G, seed=10 + step)
        logits = fused(x)
        fused_opt.zero_grad(set_to_none=True)
        sum(F.cross_entropy(logits[g], y[g]) for g in range(G)).backward()
        fused_opt.step()
        for g, (model, opt) in enumerate(zip(separate, opts)):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[g]), y[g]).backward()
            opt.step()
    for state, model in zip(split(fused), separate):
        assert_states_equal(state, model.state_dict(), rtol=1e-8, atol=1e-9)
        assert state["features.0.1.num_batches_tracked"].item() == steps
    # The fused optimizer state splits into single-run optimizer states (names by index, as the loop builds them).
    for state, opt in zip(split_optimizer_state(fused, fused_opt), opts):
        expected = opt.state_dict()
        assert state["param_groups"] == expected["param_groups"]
        assert state["state"].keys() == expected["state"].keys()
        for index, entry in expected["state"].items():
            for key, value in entry.items():
                torch.testing.assert_close(state["state"][index][key], value, rtol=1e-8, atol=1e-9)


def test_optimizer_state_round_trip():
    G = 2
    fused = fuse(members("k17", 0.5, G))
    opt = torch.optim.Adam(fused.param_groups(1e-4), lr=1e-3)
    x, y = batches(G)
    logits = fused(x)
    sum(F.cross_entropy(logits[g], y[g]) for g in range(G)).backward()
    opt.step()
    saved = opt.state_dict()
    restored = join_optimizer_state(fused, opt, split_optimizer_state(fused, opt))
    assert restored["param_groups"] == saved["param_groups"]
    for index, entry in saved["state"].items():
        for key, value in entry.items():
            assert torch.equal(restored["state"][index][key], value)
    torch.optim.Adam(fused.param_groups(1e-4), lr=1e-3).load_state_dict(restored)


@pytest.mark.parametrize("layer", ["features.9", "features.2.conv.1", "features.0"])
def test_tap_gives_each_members_features(layer):
    G = 3
    models = members("teacher", 0.25, G)
    fused = fuse(models).to(memory_format=torch.channels_last).eval()
    tap = fused.tap(layer)
    x, _ = batches(G)
    fused(x)
    features = tap.take()
    for g, model in enumerate(models):
        single = FeatureTap(model.eval(), layer)
        model(x[g])
        expected = single.take()
        assert features.shape == (G, *expected.shape)
        torch.testing.assert_close(features[g], expected, **TOL)
        single.remove()
    with pytest.raises(RuntimeError):
        tap.take()
    tap.remove()
    with pytest.raises(IgkdError, match="no module named"):
        fused.tap("features.99")


def test_load_member_and_member_model():
    models = members("k5", 0.5, 3)
    others = members("k5", 0.5, 3, seed=7)
    fused = fuse(models)
    load_member(fused, 1, others[1].state_dict())
    states = split(fused)
    assert_states_equal(states[0], models[0].state_dict())
    assert_states_equal(states[1], others[1].state_dict())
    assert_states_equal(states[2], models[2].state_dict())
    rebuilt = member(fused, 1)
    assert_states_equal(rebuilt.state_dict(), others[1].state_dict())
    with pytest.raises(IgkdError, match="does not match"):
        load_member(fused, 0, {"features.0.0.weight": models[0].features[0][0].weight})
    with pytest.raises(IgkdError, match="member 5"):
        load_member(fused, 5, models[0].state_dict())


def test_fuse_refuses_different_architectures():
    with pytest.raises(IgkdError, match="different architectures.*keep"):
        fuse([build_model("k5", width=0.5), build_model("k7", width=0.5)])
    with pytest.raises(IgkdError, match="width"):
        fuse([build_model("k5", width=0.5), build_model("k5", width=1.0)])
    with pytest.raises(IgkdError, match="num_classes"):
        fuse([build_model("k5", width=0.5), build_model("k5", width=0.5, num_classes=4)])
    with pytest.raises(IgkdError, match="dtype"):
        fuse([build_model("k5", width=0.5), build_model("k5", width=0.5).double()])
    with pytest.raises(IgkdError, match="pointwise"):
        fuse([build_model("k5", width=0.5)], pointwise="einsum")
    with pytest.raises(IgkdError, match="at least one"):
        fuse([])
    with pytest.raises(IgkdError, match="MobileNetV2"):
        fuse([torch.nn.Linear(2, 2)])
    # Members may differ in their input normalisation.
    fuse([build_model("k5", width=0.5), build_model("k5", width=0.5, mean=(0, 0, 0), std=(1, 1, 1))])
