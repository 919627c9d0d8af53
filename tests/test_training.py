"""The one training loop: every method, the teacher's view, exact resume, NaN handling, DDP."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from igkd.distill import METHODS, Trainer, resolve_config, train
from igkd.errors import IgkdError
from igkd.models import build_model, load_model


def _config(method, **overrides):
    values = dict(student="k17", epochs=1, batch_size=16, val_fraction=0.25, device="cpu")
    values.update(overrides)
    return resolve_config(method, "paper", **values)


def _teacher(classes=4):
    torch.manual_seed(0)
    return build_model("teacher", width=0.25, num_classes=classes).eval()


def _maps(dataset):
    return torch.rand(len(dataset.train), *dataset.image_size, generator=torch.Generator().manual_seed(0)).half()


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_one_epoch(method, tiny_dataset, tmp_path):
    summary = train(_config(method), tiny_dataset, tmp_path / method, teacher=_teacher(), ig_maps=_maps(tiny_dataset), progress=False)
    assert summary["method"] == method and summary["epochs"] == 1
    assert 0 <= summary["test_accuracy"] <= 100 and summary["val_size"] == 16
    assert summary["teacher_test_accuracy"] is not None
    assert (summary["attention_layers"] is not None) == (METHODS[method]["gamma"] > 0)
    metrics = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1] and torch.isfinite(torch.tensor(metrics[0]["train_loss"]))
    model, meta = load_model(tmp_path / method / "model.safetensors")
    assert meta["spec"]["name"] == "k17"


def test_teacher_sees_the_students_augmented_view(tiny_dataset, tmp_path):
    teacher = _teacher()
    seen = {"teacher": [], "student": []}
    teacher.register_forward_pre_hook(lambda _m, args: seen["teacher"].append(args[0].clone()))
    trainer = Trainer(_config("kd_ig", p=1.0), tiny_dataset, tmp_path, teacher=teacher, ig_maps=_maps(tiny_dataset), progress=False)
    trainer.model.register_forward_pre_hook(lambda m, args: seen["student"].append(args[0].clone()) if m.training else None)
    trainer.run()
    train_calls = seen["teacher"][-len(seen["student"]):]  # the first teacher calls measure its test accuracy
    assert len(seen["student"]) == 3
    for t_in, s_in in zip(train_calls, seen["student"]):
        assert torch.equal(t_in, s_in)
    # the view really is augmented: with p=1 no input equals a plain (un-overlaid) image of the split
    plain = tiny_dataset.train.images.float() / 255
    assert not any(torch.equal(x, y) for x in seen["student"][0] for y in plain)


def _weights(path):
    return load_model(path)[0].state_dict()


def test_resume_after_interrupt_gives_identical_weights(tiny_dataset, tmp_path):
    def config():
        return _config("kd_ig", epochs=3, p=0.5)

    train(config(), tiny_dataset, tmp_path / "straight", teacher=_teacher(), ig_maps=_maps(tiny_dataset), progress=False)

    def interrupt(epoch, _record):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(), tiny_dataset, tmp_path / "resumed", teacher=_teacher(), ig_maps=_maps(tiny_dataset), progress=False, on_epoch_end=interrupt)
    assert not (tmp_path / "resumed" / "summary.json").exists()
    with pytest.raises(IgkdError, match="already holds a run"):
        train(config(), tiny_dataset, tmp_path / "resumed", teacher=_teacher(), ig_maps=_maps(tiny_dataset), progress=False)
    train(config(), tiny_dataset, tmp_path / "resumed", teacher=_teacher(), ig_maps=_maps(tiny_dataset), progress=False, resume=True)
    a, b = _weights(tmp_path / "straight" / "model.safetensors"), _weights(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    with pytest.raises(IgkdError, match="saved config differs in lr"):
        train(_config("kd_ig", epochs=3, p=0.5, lr=0.5), tiny_dataset, tmp_path / "resumed", teacher=_teacher(), ig_maps=_maps(tiny_dataset), progress=False, resume=True)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    from igkd.distill.objective import Objective

    poisoned = {"on": False}
    real = Objective.logit_losses

    def maybe_nan(*args, **kwargs):
        loss = real(*args, **kwargs)
        return loss * float("nan") if poisoned["on"] else loss

    monkeypatch.setattr(Objective, "logit_losses", maybe_nan)
    with pytest.raises(IgkdError, match=r"NaN/inf in epoch 2.*last good checkpoint \(epoch 1\)"):
        train(_config("student", epochs=3), tiny_dataset, tmp_path, progress=False, on_epoch_end=lambda e, r: poisoned.update(on=True))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_bad_method_inputs_are_clear_errors(tiny_dataset, tmp_path):
    with pytest.raises(IgkdError, match="unknown method 'kdig'"):
        resolve_config("kdig")
    with pytest.raises(IgkdError, match="needs a teacher"):
        train(_config("kd"), tiny_dataset, tmp_path / "a", progress=False)
    with pytest.raises(IgkdError, match="pass --attributions"):
        train(_config("ig"), tiny_dataset, tmp_path / "b", progress=False)
    with pytest.raises(IgkdError, match="no module named 'features.42'"):
        train(_config("at", at_student_layer="features.42"), tiny_dataset, tmp_path / "c", teacher=_teacher(), progress=False)
    with pytest.raises(IgkdError, match="IG maps have shape"):
        train(_config("ig"), tiny_dataset, tmp_path / "d", ig_maps=torch.rand(5, 16, 16), progress=False)


def test_yaml_config_values_and_unknown_keys(tmp_path):
    from igkd.distill.config import load_yaml

    (tmp_path / "ok.yaml").write_text("method: kd\ntemperature: 4\nepochs: 7\n")
    config = resolve_config("student", "paper", load_yaml(tmp_path / "ok.yaml"), epochs=9)
    assert (config.method, config.alpha, config.temperature, config.epochs, config.lr) == ("kd", 0.01, 4.0, 9, 1e-3)
    (tmp_path / "bad.yaml").write_text("temprature: 4\n")
    with pytest.raises(IgkdError, match="unknown key 'temprature' in .*bad.yaml"):
        load_yaml(tmp_path / "bad.yaml")


def _free_port() -> int:
    """A port no other test run holds right now (a fixed one clashed when test runs overlapped)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import make_tiny_dataset
    from igkd.distill import resolve_config, train
    torch.set_num_threads(1)
    config = resolve_config("kd", "paper", student="k17", epochs=2, batch_size=16, val_fraction=0.25, device="cpu")
    teacher = __import__("igkd.models", fromlist=["build_model"]).build_model("teacher", width=0.25, num_classes=4)
    summary = train(config, make_tiny_dataset(), {out!r}, teacher=teacher, progress=False)
    os.write(1, f"RANK_DONE {{summary['world_size']}} {{summary['test_accuracy']}}\\n".encode())  # one write: the ranks share stdout
    """
)


def test_ddp_two_cpu_processes_write_one_summary(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path / "run")))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()), str(script)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("RANK_DONE")]
    assert len(lines) == 2 and len(set(lines)) == 1  # both ranks agree on the reduced result
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["train_size"] == 48
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl", "model.safetensors", "summary.json"]
