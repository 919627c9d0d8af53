"""Deployment: ONNX / TorchScript export with parity, int8 quantisation, latency benchmark, errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_tiny_dataset
from igkd.cli import app, main
from igkd.deploy import export_model, measure_latency, quantize_onnx
from igkd.deploy.export import load_torchscript
from igkd.deploy.footprint import state_dict_bytes
from igkd.deploy.runtime import ort_run, ort_session
from igkd.errors import IgkdError
from igkd.models import build_model, save_model


def _scrambled(name: str, num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    """A random model whose logits are O(1): at init they are ~1e-7, which would make parity trivial."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=num_classes)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    torch.nn.init.normal_(model.classifier[1].weight, 0, 0.5)
    return model.eval()


def _run_main(args, capsys):
    """``igkd ARGS`` in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.mark.parametrize("name", ["teacher", "k5"])
def test_onnx_export_matches_eager_at_two_batch_sizes(tmp_path, name):
    import onnx

    model = _scrambled(name)
    path = tmp_path / f"{name}.onnx"
    report = export_model(model, path, "onnx", classes=[f"class{i}" for i in range(10)], metadata={"note": "test"})
    assert report["parity"]["passed"] and report["parity"]["batch_sizes"] == [16, 1]
    graph = onnx.load(str(path))
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert {node.op_type for node in graph.graph.node} >= {"Conv", "Clip", "Gemm"}
    assert not any(node.op_type in ("Identity", "Constant", "BatchNormalization") for node in graph.graph.node)
    props = {p.key: p.value for p in graph.metadata_props}
    assert props["input_layout"] == "NCHW" and props["input_range"].startswith("[0, 1]")
    assert json.loads(props["mean"]) == pytest.approx(model.normalize.mean.flatten().tolist())
    assert json.loads(props["std"]) == pytest.approx(model.normalize.std.flatten().tolist())
    assert json.loads(props["classes"])[3] == "class3" and props["note"] == "test"
    session = ort_session(path, threads=1)
    for batch_size in (1, 5):
        x = torch.rand(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(batch_size))
        with torch.inference_mode():
            reference = model(x)
        assert reference.abs().max() > 0.1  # the comparison is not between two near-zero tensors
        assert (ort_run(session, x) - reference).abs().max().item() <= 1e-4


def test_torchscript_round_trip(tmp_path):
    model = _scrambled("k13")
    path = tmp_path / "k13.pt"
    report = export_model(model, path, "torchscript", classes=list("abcdefghij"))
    assert report["parity"]["passed"]
    loaded, meta = load_torchscript(path)
    x = torch.rand(3, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)
    assert json.loads(meta["classes"])[0] == "a" and meta["input_layout"] == "NCHW"


def test_export_refuses_to_write_on_parity_failure(tmp_path):
    path = tmp_path / "k17.onnx"
    with pytest.raises(IgkdError, match="parity check"):
        export_model(_scrambled("k17"), path, "onnx", tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def trained_k15():
    """A k15 student fitted to a tiny separable problem (8x8 images, so training takes a few seconds)."""
    data = make_tiny_dataset(n_train=192, n_test=64, size=8, classes=4, seed=1)
    torch.manual_seed(0)
    model = build_model("k15", num_classes=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(120):
        index = torch.randint(0, len(data.train), (32,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(data.train.images[index].float() / 255), data.train.labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), data


def test_quantize_calibrates_on_train_and_reports_the_cost(tmp_path, trained_k15, monkeypatch):
    import onnx

    import igkd.deploy.quantize as quantize_module

    model, data = trained_k15
    seen = {}
    real = quantize_module.quantize_static_bytes

    def spy(fp32, calibration_images, **kwargs):
        seen["images"] = calibration_images
        return real(fp32, calibration_images, **kwargs)

    monkeypatch.setattr(quantize_module, "quantize_static_bytes", spy)
    out = tmp_path / "k15.int8.onnx"
    report = quantize_onnx(model, data, out, calibration_size=64, batch_sizes=(1, 8), warmup=1, repeats=20, threads=1)
    train_rows = {bytes(image.numpy().tobytes()) for image in data.train.images}
    assert seen["images"].shape[0] == 64
    assert all(bytes(image.numpy().tobytes()) in train_rows for image in seen["images"])
    assert report["calibration"]["split"] == "train" and report["calibration"]["images"] == 64
    assert report["fp32"]["accuracy"] >= 90.0, "the fixture model did not learn the toy problem"
    assert report["accuracy_drop_points"] == pytest.approx(report["fp32"]["accuracy"] - report["int8"]["accuracy"])
    assert report["int8"]["bytes"] < report["fp32"]["bytes"] and out.stat().st_size == report["int8"]["bytes"]
    for variant in ("fp32", "int8"):
        for batch in ("1", "8"):
            assert report[variant]["latency"][batch]["repeats"] >= 20
    graph = onnx.load(str(out))
    assert "QuantizeLinear" in {node.op_type for node in graph.graph.node}
    props = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(props["classes"]) == list(data.classes) and "quantization" in props
    session = ort_session(out, threads=1)
    assert ort_run(session, data.test.images[:3].float() / 255).shape == (3, 4)


def test_quantize_cli_refuses_a_drop_above_max_drop_unless_forced(tmp_path, trained_k15, monkeypatch, capsys):
    import igkd.data

    model, data = trained_k15
    checkpoint = tmp_path / "k15.safetensors"
    save_model(checkpoint, model, {"classes": list(data.classes)})
    monkeypatch.setattr(igkd.data, "load_dataset", lambda name, data_dir=None, **kw: data)
    out = tmp_path / "k15.int8.onnx"
    args = ["quantize", str(checkpoint), "--dataset", "tiny", "--out", str(out), "--calibration-size", "32", "--warmup", "0"]
    code, stdout, stderr = _run_main([*args, "--max-drop", "-100"], capsys)
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("error: int8 test accuracy dropped") and "--max-drop" in stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["k15.safetensors"]
    result = CliRunner().invoke(app, [*args, "--max-drop", "-100", "--force", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["forced"] is True and out.is_file()


def test_bench_latency_json_tiny_run(tmp_path):
    plot = tmp_path / "latency.png"
    args = ["bench", "latency", "--models", "k17", "--batch-sizes", "1", "--repeats", "20", "--warmup", "2", "--json", "--plot", str(plot)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads(result.stdout)
    assert [m["name"] for m in results["models"]] == ["k17"]
    assert results["models"][0]["params"] == 1994 and results["models"][0]["cf"] == pytest.approx(1121.71)
    rows = {(m["model"], m["backend"], m["batch_size"]): m for m in results["measurements"]}
    assert set(rows) == {("k17", "eager", 1), ("k17", "onnxruntime", 1)}
    for row in rows.values():
        assert row["repeats"] >= 20 and 0 < row["min_ms"] <= row["median_ms"] <= row["p90_ms"] <= row["max_ms"]
        assert row["speedup_vs_teacher"] is None  # no teacher in this run
    machine = results["machine"]
    assert machine["threads"] >= 1 and machine["cpu_model"] and machine["torch"] and machine["onnxruntime"]
    assert "git_sha" in results["environment"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_models_are_timed_in_interleaved_rounds():
    from igkd.deploy.latency import time_interleaved

    log = []
    samples = time_interleaved([lambda: log.append("a"), lambda: log.append("b")], warmup=2, repeats=20, rounds=4)
    assert [len(s) for s in samples] == [20, 20]
    timed = "".join(log[4:])  # after 2 warm-up calls each
    assert timed == "a" * 6 + "b" * 6 + "b" * 6 + "a" * 6 + "a" * 6 + "b" * 6 + "b" * 6 + "a" * 6  # 1 re-warm + 5 timed


def test_speedup_is_the_ratio_of_teacher_to_model_medians():
    from igkd.deploy.latency import _add_speedups

    rows = [
        {"model": "teacher", "k": 0, "backend": "eager", "device": "cpu", "precision": "fp32", "batch_size": 1, "median_ms": 10.0},
        {"model": "k5", "k": 5, "backend": "eager", "device": "cpu", "precision": "fp32", "batch_size": 1, "median_ms": 2.5},
        {"model": "k5", "k": 5, "backend": "eager", "device": "cpu", "precision": "fp32", "batch_size": 64, "median_ms": 9.0},
    ]
    _add_speedups(rows)
    assert [r["speedup_vs_teacher"] for r in rows] == [1.0, 4.0, None]


def test_footprint_bytes_and_minimum_repeats():
    model = build_model("k17")
    floats = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    sizes = state_dict_bytes(model)
    assert sizes["fp32"] == 4 * floats and sizes["fp16"] == 2 * floats and sizes["int8"] < sizes["fp16"]
    with pytest.raises(IgkdError, match="at least 20"):
        measure_latency(model, repeats=5)


@pytest.fixture
def files(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    save_model(tmp_path / "k17.safetensors", build_model("k17"))
    return tmp_path


@pytest.mark.parametrize(
    "args, message",
    [
        (["export", "{d}/list.pt", "--out", "{d}/x.onnx"], "holds a list"),
        (["export", "{d}/notes.pt", "--out", "{d}/x.onnx"], "cannot read"),
        (["export", "{d}/k17.safetensors", "--out", "{d}/missing/x.onnx"], "does not exist"),
        (["export", "{d}/k17.safetensors", "--format", "tflite"], "unknown export format"),
        (["export", "{d}/k17.safetensors", "--opset", "99"], "opset 99"),
        (["quantize", "{d}/k17.safetensors", "--out", "{d}/x.onnx"], "--dataset is required"),
        (["bench", "latency", "--models", "k4"], "unknown model"),
        (["bench", "latency", "--models", "k17", "--repeats", "5"], "at least 20"),
        (["bench", "latency", "--models", "k17", "--backends", "tensorrt"], "unknown backend"),
    ],
)
def test_bad_input_is_one_error_line(files, capsys, args, message):
    code, stdout, stderr = _run_main([a.format(d=files) for a in args], capsys)
    assert code == 2 and stdout == ""
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and message in stderr
    assert "Traceback" not in stderr
    assert not (files / "x.onnx").exists()
