"""Bring your own networks (issue 22): a ResNet-style teacher and a depthwise-separable student (tests/own_nets.py,
neither of igkd's family) through train-teacher -> attributions compute -> distill kd_ig_at -> evaluate -> export on
a 48x48 image folder, by the CLI and by the Python API; a file naming a factory imports nothing by itself; external
students train run by run in a cohort request; ``igkd models layers`` lists shapes."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import own_nets
from igkd.cli import main
from igkd.errors import IgkdError

CLASSES, SIDE = 3, 48
TEACHER, STUDENT = "own_nets:resnet_teacher", "own_nets:separable_student"


def write_folder(root: Path) -> Path:
    """train/c<k>/*.png (12 per class), test/c<k>/*.png (4 per class), 48x48: a bright vertical band in third k."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 4)):
        for c in range(CLASSES):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (SIDE, SIDE, 3), dtype=np.uint8)
                pixels[:, c * 16 : (c + 1) * 16] += 150
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.png")
    return root


def run(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code in (0, None)


def one_error_line(argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The folder, an external teacher trained by the CLI, and its IG cache."""
    tmp = tmp_path_factory.mktemp("own")
    folder = write_folder(tmp / "folder")
    data = ["--dataset", "folder", "--data-dir", str(folder)]
    run(["train-teacher", *data, "--out", str(tmp / "teacher"), "--teacher-arch", TEACHER, "--teacher-arch-args", "width=4,blocks=2",
         "--epochs", "1", "--batch-size", "12", "--val-fraction", "0", "--device", "cpu", "--json"])
    run(["attributions", "compute", "--teacher", str(tmp / "teacher"), "--teacher-arch", TEACHER, *data, "--out", str(tmp / "ig"),
         "--steps", "4", "--device", "cpu", "--json"])
    return {"tmp": tmp, "folder": folder, "data": data}


def distill_argv(world, out: str, *extra: str) -> list[str]:
    return ["distill", "--method", "kd_ig_at", *world["data"], "--teacher", str(world["tmp"] / "teacher"), "--teacher-arch", TEACHER,
            "--attributions", str(world["tmp"] / "ig"), "--student-arch", STUDENT, "--student-arch-args", "width=4",
            "--at-teacher-layer", "layers.1", "--at-student-layer", "2", "--epochs", "1", "--batch-size", "12", "--val-fraction", "0",
            "--device", "cpu", "--out", str(world["tmp"] / out), "--json", *extra]


def test_cli_pipeline_teacher_ig_distill_evaluate_export(world, capsys):
    tmp = world["tmp"]
    teacher = json.loads((tmp / "teacher" / "summary.json").read_text())
    assert teacher["kind"] == "teacher" and teacher["config"]["student_arch"] == TEACHER
    manifest = json.loads((tmp / "ig" / "manifest.json").read_text())
    from igkd.provenance import sha256_file

    assert (manifest["height"], manifest["width"]) == (SIDE, SIDE) and manifest["teacher_sha256"] == sha256_file(tmp / "teacher" / "model.safetensors")
    assert manifest["teacher_arch"]["factory"] == TEACHER and manifest["teacher_arch"]["kwargs"] == {"width": 4, "blocks": 2}

    run(distill_argv(world, "student"))
    summary = json.loads((tmp / "student" / "summary.json").read_text())
    assert summary["student"] == "external" and summary["config"]["student_arch"] == STUDENT and summary["config"]["p"] == 0.1
    layers = summary["attention_layers"]
    assert layers["teacher"] == "model.layers.1" and layers["student"] == "model.2"
    assert layers["teacher_shape"] == [1, 8, 24, 24] and layers["student_shape"] == [1, 16, 12, 12]  # resized to the teacher's map
    assert summary["teacher"]["spec"]["factory"] == TEACHER and summary["attributions"]["manifest_sha256"]

    from igkd.models import load_model

    model, meta = load_model(tmp / "student" / "model.safetensors", trusted=STUDENT)
    spec = meta["spec"]
    assert spec["arch"] == "external" and spec["factory"] == STUDENT and spec["kwargs"] == {"width": 4}
    assert spec["input_shape"] == [3, SIDE, SIDE] and spec["num_classes"] == CLASSES
    # 'dataset' normalisation of a student whose teacher states its own: the teacher's mean/std
    assert spec["normalize"] == load_model(tmp / "teacher" / "model.safetensors", trusted=TEACHER)[1]["spec"]["normalize"]

    capsys.readouterr()
    run(["evaluate", "--checkpoint", str(tmp / "student"), *world["data"], "--student-arch", STUDENT, "--device", "cpu", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"] == pytest.approx(summary["test_accuracy"]) and report["model"] == "separable_student"

    run(["export", str(tmp / "student"), "--student-arch", STUDENT, "--format", "onnx", "--out", str(tmp / "student.onnx"), *world["data"], "--json"])
    exported = json.loads(capsys.readouterr().out)
    assert exported["parity"]["passed"] and exported["accuracy"]["file"] == pytest.approx(exported["accuracy"]["eager_fp32"])
    assert exported["metadata"]["input_shape"] == f"[batch, 3, {SIDE}, {SIDE}]" and json.loads(exported["metadata"]["igkd_spec"])["factory"] == STUDENT


def test_wrong_attention_layer_lists_the_layers_with_shapes(world, capsys):
    argv = distill_argv(world, "bad-layer")
    argv[argv.index("--at-student-layer") + 1] = "nope"
    line = one_error_line(argv, capsys)
    assert "--at-student-layer 'nope'" in line and "2 [1, 16, 12, 12]" in line and "0 [1, 4, 24, 24]" in line
    argv[argv.index("--at-student-layer") + 1] = "5"  # the Linear: [1, 3], not a feature map
    assert "not a feature map" in one_error_line(argv, capsys)


def test_a_file_naming_a_factory_imports_nothing_by_itself(tmp_path, monkeypatch, capsys):
    """The file names a module that would leave a mark when imported: without the factory on the command line
    the load is one line and the module is not imported; naming it (or --trust-arch) rebuilds the model."""
    from igkd.models import load_model, save_model
    from igkd.models.external import build_external

    (tmp_path / "marking_net.py").write_text(
        "import pathlib\npathlib.Path('imported.mark').write_text('x')\n"
        "from own_nets import separable_student as make\n"
    )
    model = build_external(functools.partial(own_nets.separable_student, width=2), {}, CLASSES, normalize={"mean": [0.5] * 3, "std": [0.25] * 3},
                           input_shape=(3, 16, 16))
    model.igkd_spec["factory"] = "marking_net:make"
    path = tmp_path / "m.safetensors"
    save_model(path, model)
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("marking_net", None)

    for argv, expected in (
        (["evaluate", "--checkpoint", str(path), "--dataset", "digits"], "igkd does not import code named by a file: pass --student-arch marking_net:make (or --trust-arch)"),
        (["export", str(path), "--student-arch", "other:make"], "was built by marking_net:make(width=2), not by other:make"),
    ):
        assert expected in one_error_line(argv, capsys)
        assert "marking_net" not in sys.modules and not (tmp_path / "imported.mark").exists()
    with pytest.raises(IgkdError, match="igkd does not import code named by a file"):
        load_model(path)
    assert "marking_net" not in sys.modules

    loaded, meta = load_model(path, trusted=True)  # --trust-arch
    assert "marking_net" in sys.modules and (tmp_path / "imported.mark").exists()
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    sys.modules.pop("marking_net", None)


def test_python_api_any_modules(tmp_path):
    """Teacher and student as Python objects: a teacher module without a normalisation of its own (the student then
    takes the training images' statistics), a student factory called after each run's seeding."""
    from igkd.attribution import compute_attributions
    from igkd.data import load_dataset
    from igkd.deploy.export import export_bytes
    from igkd.distill import resolve_config, run_training
    from igkd.distill.data_plan import channel_stats
    from igkd.evaluate.accuracy import evaluate
    from igkd.models import load_model

    data = load_dataset("folder", write_folder(tmp_path / "folder"))
    torch.manual_seed(0)
    teacher = own_nets.resnet_teacher(CLASSES, width=4, blocks=2)  # takes [0, 1] pixels as they come
    maps = compute_attributions(teacher, data, tmp_path / "ig", n_steps=4, device="cpu", progress=False)
    assert maps.maps.shape == (len(data.train), SIDE, SIDE)

    factory = functools.partial(own_nets.separable_student, width=4)
    config = resolve_config("kd_ig_at", "paper", epochs=1, batch_size=12, val_fraction=0.0, device="cpu",
                            at_teacher_layer="layers.1", at_student_layer="2")
    summary = run_training(config, data, tmp_path / "run", teacher=teacher, student=factory, attributions_dir=tmp_path / "ig", progress=False)
    assert summary["student"] == "external" and summary["teacher"]["format"] == "python module"

    model, meta = load_model(tmp_path / "run" / "model.safetensors", trusted=factory)
    mean, std = channel_stats(data.train.images)
    assert meta["spec"]["normalize"]["mean"] == pytest.approx(mean) and meta["spec"]["normalize"]["std"] == pytest.approx(std)
    assert meta["spec"]["factory"] == "own_nets:separable_student" and meta["spec"]["kwargs"] == {"width": 4}
    accuracy = evaluate(model, data.test.images, data.test.labels, data.classes, 100, torch.device("cpu"))["accuracy"]
    assert accuracy == pytest.approx(summary["test_accuracy"])
    _, report = export_bytes(model, "onnx", batch=data.test.images[:8])
    assert report["parity"]["passed"] and report["model"] == "separable_student"

    with pytest.raises(IgkdError, match="was built for model_state_sha256="):  # maps of another teacher are refused
        run_training(config, data, tmp_path / "other", teacher=own_nets.resnet_teacher(CLASSES, width=4, blocks=2), student=factory,
                     attributions_dir=tmp_path / "ig", progress=False)


def test_student_that_normalizes_itself(tmp_path, tiny_dataset):
    from igkd.distill import resolve_config, run_training
    from igkd.models import load_model
    from igkd.models.external import Normalized

    config = resolve_config("student", "paper", epochs=1, batch_size=16, val_fraction=0.0, device="cpu", student="external",
                            student_arch=STUDENT, student_arch_args={"num_classes": 4, "width": 2}, student_normalize="model")
    run_training(config, tiny_dataset, tmp_path / "run", progress=False)
    model, meta = load_model(tmp_path / "run" / "model.safetensors", trusted=STUDENT)
    assert meta["spec"]["normalize"] == "model" and not isinstance(model, Normalized) and "normalize.mean" not in model.state_dict()


def test_cohort_request_trains_external_students_run_by_run(tmp_path, tiny_dataset):
    from igkd.distill import resolve_config
    from igkd.distill.executor import Run, execute

    said = []
    runs = [Run(resolve_config("student", "paper", epochs=1, batch_size=16, val_fraction=0.0, device="cpu", seed=seed, student="external",
                               student_arch=STUDENT, student_arch_args={"width": 2}), tmp_path / f"s{seed}") for seed in (0, 1)]
    summaries = execute(runs, tiny_dataset, cohort_size=2, progress=False, say=said.append)
    assert [summaries[str(r.out)]["cohort_size"] for r in runs] == [1, 1]
    cohort_lines = [line for line in said if "run by run" in line]
    assert len(cohort_lines) == 1 and "not a cohort of 2" in cohort_lines[0] and "BatchNorm2d" in cohort_lines[0]
    assert [line for line in said if line.startswith("run ")] == ["run 1 of 2: s0", "run 2 of 2: s1"]


def test_models_layers_lists_output_shapes(capsys):
    run(["models", "layers", TEACHER, "--args", "width=4,blocks=2", "--input-shape", "3x48x48", "--num-classes", "3", "--json"])
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["stem"]["output_shape"] == [1, 4, 48, 48] and rows["layers.1"]["output_shape"] == [1, 8, 24, 24]
    assert rows["layers.1"]["type"] == "BasicBlock" and rows["head.2"]["output_shape"] == [1, 3]
    run(["models", "layers", "k17", "--json"])
    family = {r["name"]: r["output_shape"] for r in json.loads(capsys.readouterr().out)}
    assert family["features.1"] == [1, 16, 32, 32]
    assert "cannot import module 'no_such_module'" in one_error_line(["models", "layers", "no_such_module:net"], capsys)


def test_arch_args_and_normalize_options(tmp_path):
    from igkd.models.external import parse_arch_args, parse_normalize

    assert parse_arch_args("width=16,bias=true,name=wide,rate=1e-3") == {"width": 16, "bias": True, "name": "wide", "rate": 0.001}
    (tmp_path / "a.yaml").write_text("width: 8\nblocks: [1, 2]\n")
    assert parse_arch_args(str(tmp_path / "a.yaml")) == {"width": 8, "blocks": [1, 2]}
    with pytest.raises(IgkdError, match="is not key=value"):
        parse_arch_args("width")
    assert parse_normalize("0.5,0.5,0.5/0.2,0.2,0.2") == {"mean": [0.5] * 3, "std": [0.2] * 3}
    with pytest.raises(IgkdError, match="use dataset, model, or MEAN/STD"):
        parse_normalize("imagenet")



def test_a_module_igkd_did_not_build_is_not_saved_without_its_spec(tmp_path):
    from igkd.models import save_model

    with pytest.raises(IgkdError, match="not built by igkd has no spec to record"):
        save_model(tmp_path / "raw.safetensors", own_nets.separable_student(CLASSES, width=2))
    assert not (tmp_path / "raw.safetensors").exists()


def test_ablation_with_an_external_student_and_teacher(world, capsys):
    """A study plumbs --student-arch into its runs' configs (part of the study's identity: another student's
    arguments in the same folder are refused) and rebuilds the external teacher only by the factory named."""
    tmp = world["tmp"]
    argv = ["ablation", *world["data"], "--out", str(tmp / "study"), "--methods", "student,kd", "--seeds", "1", "--teacher", str(tmp / "teacher"),
            "--student-arch", STUDENT, "--student-arch-args", "width=2", "--epochs", "1", "--batch-size", "12", "--val-fraction", "0", "--device", "cpu",
            "--json"]
    assert "pass --teacher-arch own_nets:resnet_teacher (or --trust-arch)" in one_error_line(argv, capsys)
    run([*argv, "--teacher-arch", TEACHER])
    study = json.loads((tmp / "study" / "study.json").read_text())
    assert study["students"] == ["external"] and study["configs"]["kd"]["student_arch"] == STUDENT
    assert study["configs"]["kd"]["student_arch_args"] == {"width": 2}
    summary = json.loads((tmp / "study" / "runs" / "kd-s0" / "summary.json").read_text())
    assert summary["config"]["student_arch"] == STUDENT and summary["teacher"]["spec"]["factory"] == TEACHER
    changed = [*argv, "--trust-arch"]
    changed[changed.index("width=2")] = "width=3"
    assert "student_arch_args" in one_error_line(changed, capsys)
