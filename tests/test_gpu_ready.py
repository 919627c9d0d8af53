"""What the first CUDA run needs, checked on the CPU: resume with a non-CPU device, the frozen teacher.

The resume test uses the meta-device trick: the trainer's device is set to ``meta`` before its
checkpoint is loaded, so anything the checkpoint's RNG states would need to be CPU tensors for
(``torch.set_rng_state``, ``Generator.set_state``) fails as it would on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from igkd.devices import fold_batchnorm, frozen_copy
from igkd.distill import Trainer, resolve_config, train
from igkd.models import build_model


def _config(method="kd", **overrides):
    values = dict(student="k17", epochs=1, batch_size=16, val_fraction=0.25, device="cpu")
    values.update(overrides)
    return resolve_config(method, "paper", **values)


def _teacher():
    torch.manual_seed(0)
    return build_model("teacher", width=0.25, num_classes=4).eval()


def _stop_after_epoch_1(epoch, _record):
    raise KeyboardInterrupt


def test_resume_loads_rng_states_on_the_cpu_whatever_the_training_device(tiny_dataset, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(_config(epochs=2), tiny_dataset, tmp_path, teacher=_teacher(), progress=False, on_epoch_end=_stop_after_epoch_1)
    trainer = Trainer(_config(epochs=2), tiny_dataset, tmp_path, teacher=_teacher(), progress=False, resume=True)
    trainer.device = torch.device("meta")  # stands in for cuda: a map_location on it would move the RNG states there
    state = torch.load(tmp_path / "checkpoint.pt", map_location="meta", weights_only=True)
    with pytest.raises((TypeError, RuntimeError, NotImplementedError)):
        torch.set_rng_state(state["rng"]["torch"])  # the failure the old map_location=device caused
    trainer._load_checkpoint()
    assert trainer.start_epoch == 2


def test_rng_state_round_trip_through_a_checkpoint(tiny_dataset, tmp_path):
    """After a resume the overlay generator and the global RNG continue exactly where the checkpoint left them."""
    with pytest.raises(KeyboardInterrupt):
        train(_config("kd_ig", p=0.5, epochs=2), tiny_dataset, tmp_path, teacher=_teacher(), ig_maps=torch.rand(64, 16, 16).half(),
              progress=False, on_epoch_end=_stop_after_epoch_1)
    saved = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)["rng"]
    trainer = Trainer(_config("kd_ig", p=0.5, epochs=2), tiny_dataset, tmp_path, teacher=_teacher(), ig_maps=torch.rand(64, 16, 16).half(),
                      progress=False, resume=True)
    trainer._load_checkpoint()
    assert torch.equal(torch.get_rng_state(), saved["torch"]) and torch.equal(trainer.generator.get_state(), saved["overlay"])


def test_folded_teacher_equals_the_original():
    teacher = _teacher()
    for module in teacher.modules():  # non-trivial statistics, as in a trained teacher
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    x = torch.rand(8, 3, 16, 16)
    with torch.no_grad():
        expected = teacher(x)
        frozen = frozen_copy(teacher, torch.device("cpu"))
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
        assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
        torch.testing.assert_close(frozen(x.contiguous(memory_format=torch.channels_last)), expected, rtol=1e-4, atol=1e-5)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())  # the original is untouched
    assert "features.9" in dict(frozen.named_modules())  # attention taps still find their module


def test_batchnorm_in_training_mode_is_not_folded():
    model = build_model("k17", width=0.5).train()
    fold_batchnorm(model)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_frozen_teacher_runs_in_inference_mode_and_the_losses_still_backpropagate(tiny_dataset, tmp_path):
    seen = []
    trainer = Trainer(_config("kd_at"), tiny_dataset, tmp_path, teacher=_teacher(), progress=False)
    trainer.teacher.register_forward_hook(lambda _m, _i, out: seen.append(torch.is_inference_mode_enabled()))
    summary = trainer.run()
    assert seen and all(seen) and summary["epochs"] == 1
