"""igkd doctor on the CPU: every CPU path ok, the GPU-only ones 'not checked', a failing path fails the command."""

from __future__ import annotations

import json

import pytest

from igkd import doctor
from igkd.cli import main


def run(argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


def test_doctor_passes_on_the_cpu(tmp_path, capsys):
    code, out, _ = run(["doctor", "--device", "cpu", "--json", "--out", str(tmp_path / "doctor.json")], capsys)
    assert code == 0
    result = json.loads(out)
    assert result == json.loads((tmp_path / "doctor.json").read_text())
    status = {c["name"]: c["status"] for c in result["checks"]}
    assert status.pop("compiled_step") == "not checked" and status.pop("cuda_graph") == "not checked"
    assert set(status.values()) == {"ok"}, status
    assert result["failed"] == [] and result["environment"]["device"] == "cpu"


def test_a_failing_path_is_one_line_and_a_nonzero_exit(monkeypatch, capsys):
    def broken(self):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")

    monkeypatch.setattr(doctor.Doctor, "latency", broken)
    monkeypatch.setattr(doctor, "CHECKS", (("loader_and_overlay", "loader"), ("latency", "latency timing")))
    code, out, err = run(["doctor", "--device", "cpu"], capsys)
    assert code == 1
    lines = [line for line in out.splitlines() if line.startswith(("ok", "FAILED"))]
    assert lines[0].startswith("ok") and lines[1].startswith("FAILED") and "RuntimeError: CUDA error: an illegal memory access" in lines[1]
    assert "more lines" not in out and err.strip() == "error: doctor found failing paths: latency"
