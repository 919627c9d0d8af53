"""ExecuTorch and LiteRT export: parity with eager, metadata beside the file, the int8 accuracy guard,
and the one-line refusal when the extra is not installed. Each backend's tests skip (saying which
extra) only when that extra is absent; CI installs both."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_dataset
from igkd.cli import main
from igkd.deploy.accuracy import file_accuracy, guard_drop, load_file
from igkd.deploy.export import export_bytes, export_model
from igkd.deploy.extras import available, require
from igkd.errors import IgkdError
from igkd.evaluate import accuracy_report, predict_logits
from igkd.models import build_model

FORMATS = ("executorch", "litert")


def _needs(fmt: str):
    return pytest.mark.skipif(not available(fmt), reason=f"the '{fmt}' extra is not installed: pip install -c constraints.txt -e \".[{fmt}]\"")


def _scrambled(name: str = "k15", num_classes: int = 4, seed: int = 0) -> torch.nn.Module:
    """A small random model whose logits are O(1) (at init they are ~1e-7, which would make parity trivial)."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=num_classes, width=0.5)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    torch.nn.init.normal_(model.classifier[1].weight, 0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    """A k15 student (width 0.5) fitted to a tiny separable problem of 16x16 images."""
    data = make_tiny_dataset(n_train=192, n_test=64, size=16, classes=4, seed=1)
    torch.manual_seed(0)
    model = build_model("k15", num_classes=4, width=0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(80):
        index = torch.randint(0, len(data.train), (32,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(data.train.images[index].float() / 255), data.train.labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), data


@pytest.mark.parametrize("fmt", [pytest.param(f, marks=_needs(f)) for f in FORMATS])
def test_fp32_export_matches_eager_and_writes_metadata_beside(tmp_path, fmt):
    model = _scrambled()
    path = tmp_path / f"k15.{fmt}"
    batch = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    report = export_model(model, path, fmt, batch=batch, classes=["a", "b", "c", "d"], batch_size=2)
    parity = report["parity"]
    assert parity["passed"] and parity["max_abs_diff"] <= 1e-4 and parity["top1_agreement"] == 1.0
    with torch.inference_mode():
        assert model(batch).abs().max() > 0.1  # not a comparison of two near-zero tensors
    meta = json.loads((tmp_path / f"k15.{fmt}.json").read_text())
    assert meta["format"] == fmt and meta["precision"] == "fp32" and json.loads(meta["classes"]) == ["a", "b", "c", "d"]
    assert meta["input_shape"] == "[2, 3, 16, 16]" and meta["input_range"].startswith("[0, 1]")
    assert json.loads(meta["mean"]) == pytest.approx(model.normalize.mean.flatten().tolist())
    run, static = load_file(fmt, path.read_bytes(), threads=1, batch_size=2)
    assert static == 2
    with torch.inference_mode():
        assert (run(batch[:2]) - model(batch[:2])).abs().max().item() <= 1e-4


@pytest.mark.parametrize("fmt", [pytest.param(f, marks=_needs(f)) for f in FORMATS])
def test_int8_export_passes_the_accuracy_guard(fmt, trained):
    model, data = trained
    eager = accuracy_report(predict_logits(model, data.test.images, device="cpu"), data.test.labels, data.classes)["accuracy"]
    assert eager >= 90.0  # the toy problem was learnt, so the guard compares real accuracies
    payload, report = export_bytes(model, fmt, batch=data.test.images[:16], calibration=data.train.images[:64], batch_size=1)
    assert report["precision"] == "int8" and report["parity"]["passed"] is None
    assert "int8" in json.loads(report["metadata"]["quantization"])["weights"]
    run, static = load_file(fmt, payload, threads=1)
    with torch.inference_mode():
        reference, logits = model(data.test.images[:1].float() / 255), run(data.test.images[:1].float() / 255)
    assert logits.dtype == torch.float32  # dequantised: logits, not int8 codes
    assert (logits - reference).abs().max() <= 0.25 * reference.abs().max() + 0.5
    int8 = file_accuracy(run, static, data)["accuracy"]
    assert guard_drop(eager, int8, max_drop=5.0, force=False, out="x")["accuracy_drop_points"] <= 5.0


@pytest.mark.parametrize("fmt", [pytest.param(f, marks=_needs(f)) for f in FORMATS])
def test_export_refuses_to_write_on_parity_failure(tmp_path, fmt):
    with pytest.raises(IgkdError, match="parity check"):
        export_model(_scrambled(), tmp_path / "m", fmt, batch=torch.rand(2, 3, 16, 16), tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_guard_refuses_a_drop_above_max_drop():
    with pytest.raises(IgkdError, match="dropped 3.00 points .* not written"):
        guard_drop(90.0, 87.0, max_drop=1.0, force=False, out="m.pte")
    assert guard_drop(90.0, 87.0, max_drop=1.0, force=True, out="m.pte")["forced"] is True


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_extra_is_one_line_naming_it(tmp_path, fmt, monkeypatch, capsys):
    import igkd.deploy.extras as extras

    monkeypatch.setattr(extras.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(IgkdError, match=rf'pip install -c constraints.txt -e "\.\[{fmt}\]"'):
        require(fmt)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "absent.safetensors"), "--format", fmt])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code != 0 and len(err.splitlines()) == 1 and f".[{fmt}]" in err
