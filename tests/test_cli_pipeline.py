"""The user's pipeline through the command line on a tiny image folder: distill with a real IG cache,
evaluate under corruptions, robustness; and each bad input of ``igkd distill`` as one error line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from igkd.cli import main
from igkd.models import build_model, save_model

CLASSES = 4


def write_folder(root: Path, seed: int) -> Path:
    """train/c<k>/*.png (8 per class) and test/c<k>/*.png (4 per class): a bright square in quadrant k."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", 8), ("test", 4)):
        for c in range(CLASSES):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
                r, q = divmod(c, 2)
                pixels[r * 8 : (r + 1) * 8, q * 8 : (q + 1) * 8] += 150
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.png")
    return root


@pytest.fixture
def world(tmp_path):
    """Two image folders, two teachers, and the IG cache of teacher A on folder A."""
    folder_a, folder_b = write_folder(tmp_path / "a", 0), write_folder(tmp_path / "b", 1)
    teachers = {}
    for name, seed in (("A", 0), ("B", 1)):
        torch.manual_seed(seed)
        teachers[name] = tmp_path / f"teacher{name}.safetensors"
        save_model(teachers[name], build_model("teacher", width=0.25, num_classes=CLASSES))
    cache = tmp_path / "ig-a"
    run(["attributions", "compute", "--teacher", str(teachers["A"]), "--dataset", "folder", "--data-dir", str(folder_a),
         "--out", str(cache), "--steps", "4", "--device", "cpu"])
    return {"a": folder_a, "b": folder_b, "teachers": teachers, "cache": cache, "tmp": tmp_path}


def run(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:  # typer's standalone mode always exits
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


def distill_args(world, out: str, method: str = "kd_ig", folder: str = "a", teacher: str = "A", student: str = "k17") -> list[str]:
    return ["distill", "--method", method, "--dataset", "folder", "--data-dir", str(world[folder]), "--teacher", str(world["teachers"][teacher]),
            "--attributions", str(world["cache"]), "--student", student, "--epochs", "1", "--batch-size", "8", "--val-fraction", "0.25",
            "--device", "cpu", "--out", str(world["tmp"] / out)]


def test_distill_with_a_real_ig_cache_then_robustness(world, capsys):
    run(distill_args(world, "run") + ["--json"])
    summary = json.loads((world["tmp"] / "run" / "summary.json").read_text())
    manifest = json.loads((world["cache"] / "manifest.json").read_text())
    assert summary["method"] == "kd_ig" and summary["config"]["p"] == 0.1 and summary["teacher"]["sha256"] == manifest["teacher_sha256"]
    assert summary["attributions"]["manifest_sha256"] and summary["train_size"] == 24 and summary["val_size"] == 8

    capsys.readouterr()
    run(["robustness", str(world["tmp"] / "run"), "--dataset", "folder", "--data-dir", str(world["a"]), "--corruptions", "jpeg:1,5;contrast:3",
         "--device", "cpu", "--out", str(world["tmp"] / "robust.json")])
    printed = capsys.readouterr().out
    assert "jpeg" in printed and "contrast" in printed
    [result] = json.loads((world["tmp"] / "robust.json").read_text())
    assert result["model"] == "k17" and result["clean_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert result["accuracy"].keys() == {"jpeg", "contrast"} and result["accuracy"]["jpeg"].keys() == {"1", "5"}
    assert result["mean_corruption_accuracy"] == pytest.approx(np.mean([result["accuracy"]["jpeg"]["1"], result["accuracy"]["jpeg"]["5"], result["accuracy"]["contrast"]["3"]]))

    line = one_error_line(["robustness", str(world["tmp"] / "run"), "--dataset", "folder", "--data-dir", str(world["a"]), "--corruptions", "fog:2"], capsys)
    assert "fog" in line


def test_distill_bad_inputs_are_one_error_line_each(world, capsys):
    (world["tmp"] / "bad.yaml").write_text("temprature: 4\n")
    cases = [
        (distill_args(world, "m", method="kdig"), "unknown method 'kdig'"),
        (distill_args(world, "s", student="k4"), "unknown model 'k4'"),
        (distill_args(world, "t", teacher="B"), "was built for teacher_sha256="),
        (distill_args(world, "d", folder="b"), "was built for dataset_fingerprint="),
        (distill_args(world, "l", method="at") + ["--at-student-layer", "features.42"], "no module named 'features.42'"),
        (distill_args(world, "y") + ["--config", str(world["tmp"] / "bad.yaml")], "unknown key 'temprature'"),
    ]
    for argv, expected in cases:
        assert expected in one_error_line(argv, capsys), argv
    assert not (world["tmp"] / "t" / "summary.json").exists()
