"""``igkd demo`` end to end with its defaults, as a user runs it after installing (offline, CPU)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from igkd.cli import main


@pytest.mark.slow
def test_demo_runs_offline_and_writes_its_report(tmp_path, capsys):
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(out)])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert str(out / "report.md") in printed

    result = json.loads((out / "demo.json").read_text())
    assert result["teacher_test_accuracy"] > 80  # digits: 10 classes, chance is 10%
    assert result["student_test_accuracy"] > 30 and result["kd_ig_test_accuracy"] > 30
    assert result["compression_factor"] > 10 and result["settings"]["device"] == "cpu"
    for run in ("teacher", "student", "kd_ig"):
        summary = json.loads((out / run / "summary.json").read_text())
        assert summary["dataset"]["name"] == "digits" and summary["epochs"] == 6
    kd_ig = json.loads((out / "kd_ig" / "summary.json").read_text())
    assert kd_ig["attributions"]["manifest_sha256"] and kd_ig["config"]["p"] == 0.1 and kd_ig["config"]["alpha"] == 0.01

    report = (out / "report.md").read_text()
    assert f"{result['kd_ig_test_accuracy']:.2f}%" in report and "![IG overlay](ig_overlay.png)" in report
    machine = result["machine"]  # what makes two machines' demos differ, printed and in the report
    assert machine["cpu_capability"] and machine["threads"] >= 1 and set(machine["load_average_1_5_15_min"]) == {"start", "end"}
    if hasattr(os, "getloadavg"):  # the 1, 5 and 15 minute averages, taken at the start and at the end
        assert all(len(machine["load_average_1_5_15_min"][when]) == 3 for when in ("start", "end"))
    for text in (report, printed.split("machine: ", 1)[1]):  # capability, threads, load at start and end: present, whatever their values
        assert f"PyTorch CPU kernels {machine['cpu_capability']}" in text and f"{machine['threads']} threads" in text
        assert "load average" in text and "at the start" in text and "at the end" in text
    with Image.open(out / "ig_overlay.png") as figure:
        assert figure.width > 500 and figure.height > 200 and len(np.unique(np.asarray(figure.convert("L")))) > 10
