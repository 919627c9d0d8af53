"""Every study command runs with its default options (``--device auto`` included), as the README writes them.

The other study tests pass ``--device cpu``; these pass only what a command requires plus sizes
(epochs, runs), so a default that crashes (issue: ``torch.device("auto")`` in provenance) shows here.
"""

from __future__ import annotations

import json

import pytest
import torch

from igkd.cli import main
from igkd.models import build_model, save_model
from igkd.provenance import device_name, environment

from test_cli_pipeline import write_folder


def run(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:  # typer's standalone mode always exits
        main(argv)
    assert exit_info.value.code in (0, None)


@pytest.fixture
def folder(tmp_path):
    return write_folder(tmp_path / "data", 0)


@pytest.fixture
def teacher(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "teacher.safetensors"
    save_model(path, build_model("teacher", width=0.25, num_classes=4))
    return path


def test_device_name_and_environment_take_auto():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert environment("auto")["device"].startswith(expected)
    assert device_name("auto") == device_name(expected)


@pytest.mark.parametrize(
    "argv, runs",
    [
        (["ablation", "--methods", "student", "--seeds", "1"], 1),
        (["montecarlo", "--methods", "student", "--runs", "2"], 2),
        (["sweep-cf", "--students", "k17", "--methods", "student"], 1),
        (["tune", "--method", "kd", "--params", "T", "--trials", "1"], 1),
    ],
    ids=["ablation", "montecarlo", "sweep-cf", "tune"],
)
def test_study_command_with_default_device(argv, runs, folder, teacher, tmp_path):
    out = tmp_path / "study"
    extra = ["--teacher", str(teacher)] if argv[0] == "tune" else []
    run([*argv, *extra, "--dataset", "folder", "--data-dir", str(folder), "--epochs", "1", "--out", str(out), "--json"])
    study = json.loads((out / "study.json").read_text())
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert study["invocations"][0]["device"].startswith(expected)
    summaries = sorted((out / "runs").glob("*/summary.json"))
    assert len(summaries) == runs
    for path in summaries:
        assert json.loads(path.read_text())["environment"]["device"].startswith(expected)
