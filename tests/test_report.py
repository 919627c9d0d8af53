"""igkd report: renders from a tiny real study; its PNGs open and are not blank; its numbers equal the runs' files."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import as_cohort_trainer, make_tiny_dataset
from PIL import Image
from typer.testing import CliRunner

from igkd.cli import app, main
from igkd.distill import executor
from igkd.experiments import studies
from igkd.experiments.studies import run_ablation, run_sweep, study_statistics
from igkd.models import build_model, save_model

FAST = dict(epochs=1, batch_size=16, val_fraction=0.25, device="cpu", progress=False)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_dataset()


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory, tiny):
    """A real ablation: student and kd_ig_at, seeds 0 and 1, with IG cache, agreement and robustness."""
    from igkd.attribution import compute_attributions
    from igkd.models import load_model
    from igkd.provenance import sha256_file

    root = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    teacher = root / "teacher.safetensors"
    save_model(teacher, build_model("teacher", width=0.25, num_classes=4))
    compute_attributions(load_model(teacher)[0], tiny, root / "ig", n_steps=4, device="cpu", teacher_sha256=sha256_file(teacher), progress=False)
    run_ablation(  # 4 epochs at lr 0.02: enough for the seeds to reach different accuracies
        tiny, root / "ablation", methods="student,kd_ig_at", seeds=2, student="k17", teacher=teacher, attributions=root / "ig",
        agreement=8, agreement_steps=4, robustness="jpeg:1", **{**FAST, "epochs": 4, "lr": 0.02},
    )
    return root


def latency_file(path):
    def row(model, k, ms, speedup):
        return {"model": model, "k": k, "backend": "eager", "precision": "fp32", "batch_size": 1, "median_ms": ms, "p90_ms": ms * 1.1, "speedup_vs_teacher": speedup}

    data = {
        "kind": "igkd-latency-benchmark", "created": "2026-01-01T00:00:00+00:00", "settings": {"device": "cpu", "threads": 2, "repeats": 30},
        "machine": {"cpu_model": "test cpu", "torch": "x"}, "environment": {"git_sha": "abc"},
        "models": [{"label": "teacher", "params": 2236682, "cf": 1.0}, {"label": "k5", "params": 543498, "cf": 4.12}],
        "measurements": [row("teacher", 0, 10.0, 1.0), row("k5", 5, 2.5, 4.0)],
    }
    path.write_text(json.dumps(data))
    return path


def pictures(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def test_report_of_a_tiny_study_matches_the_runs(study_dir, tiny, tmp_path, monkeypatch):
    import igkd.data

    monkeypatch.setattr(igkd.data, "load_dataset", lambda name, data_dir=None, **kw: tiny)
    runner = CliRunner()
    evaluated = runner.invoke(app, ["evaluate", "--checkpoint", str(study_dir / "ablation/runs/kd_ig_at-s0"), "--dataset", "tiny", "--device", "cpu", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    (tmp_path / "eval.json").write_text(evaluated.stdout)
    out = tmp_path / "rep"
    args = ["report", str(study_dir / "ablation"), "--out", str(out), "--latency", str(latency_file(tmp_path / "lat.json")), "--imagenet-eval", str(tmp_path / "eval.json")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert str(out / "report.md") in result.stdout

    md = (out / "report.md").read_text()
    files = pictures(md)
    assert {"s1-ablation-curves.png", "s1-ablation-ig-grid.png", "s1-ablation-attention.png", "latency-vs-cf.png"} <= set(files)
    for name in files:
        with Image.open(out / name) as image:
            pixels = np.asarray(image.convert("L"))
        assert min(pixels.shape) > 100 and pixels.std() > 5, name  # a real picture, not a blank canvas

    report = json.loads((out / "report.json").read_text())
    section = report["studies"][0]
    runs = {p.name: json.loads((p / "summary.json").read_text()) for p in (study_dir / "ablation/runs").iterdir()}
    accuracy = section["students"][0]["accuracy"]
    assert [m["method"] for m in accuracy["methods"]] == ["student", "kd_ig_at"]
    for m in accuracy["methods"]:
        values = [runs[f"{m['method']}-s{s}"]["test_accuracy"] for s in (0, 1)]
        assert m["n"] == 2 and m["mean"] == pytest.approx(np.mean(values)) and m["sd"] == pytest.approx(np.std(values, ddof=1))
        assert (m["min"], m["max"]) == (min(values), max(values))
        assert f"| {m['method']} | 2/2 | {np.mean(values):.2f} ± {np.std(values, ddof=1):.2f} |" in md
        assert all(f"{v:.2f}" in md for v in values)
    delta = accuracy["methods"][1]["mean"] - accuracy["methods"][0]["mean"]
    assert accuracy["methods"][1]["delta_vs_baseline"] == pytest.approx(delta) and f"{delta:.2f}" in md

    stats, expected = section["students"][0]["statistics"], study_statistics(study_dir / "ablation")
    assert stats["paired"] and stats["vs_baseline"][0]["p"] == pytest.approx(expected["vs_baseline"][0]["p"])
    assert f"kd_ig_at − student | 2 | {expected['vs_baseline'][0]['mean_difference']:.2f}" in md

    rob = section["students"][0]["robustness"]
    for m in rob["methods"]:
        values = [json.loads((study_dir / f"ablation/runs/{m['method']}-s{s}/robustness.json").read_text())["mean_corruption_accuracy"] for s in (0, 1)]
        assert m["mean_corruption_accuracy"]["mean"] == pytest.approx(np.mean(values))
    assert rob["corruptions"] == ["jpeg"] and rob["statistics"]["test"].startswith("paired t-test")
    agreement = section["students"][0]["agreement"]["methods"][0]
    rhos = [json.loads((study_dir / f"ablation/runs/student-s{s}/agreement.json").read_text())["spearman"]["mean"] for s in (0, 1)]
    assert agreement["spearman"]["mean"] == pytest.approx(np.mean(rhos)) and f"{np.mean(rhos):.3f} ± {np.std(rhos, ddof=1):.3f}" in md

    prov = section["provenance"]
    environment = runs["student-s0"]["environment"]
    assert prov["seeds"] == [0, 1] and prov["devices"] == [environment["device_name"]] and prov["torch"] == [environment["torch"]]
    assert tiny.fingerprint in md and "seeds 0, 1" in md and "4 planned, 4 finished" in md
    assert "| k5 | 543,498 | 4.12 | 2.50 (4.00×) |" in md
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert report["evaluation"]["results"][0]["accuracy"] == ev["accuracy"] and f"{ev['accuracy']:.2f}" in md
    assert "not drawn" not in md


def test_partial_sweep_lists_unfinished_runs_and_skips_what_it_cannot_draw(tiny, tmp_path, monkeypatch):
    def fake_training(config, dataset, out_dir, **kwargs):  # a summary only: no metrics, no model
        out_dir.mkdir(parents=True, exist_ok=True)
        summary = {"method": config.method, "seed": config.seed, "test_accuracy": 50.0 + config.seed + (2.0 if config.student == "k15" else 0.0)}
        (out_dir / "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(executor, "_train", as_cohort_trainer(fake_training))
    run_sweep(tiny, tmp_path / "sweep", students="k15,k17", methods="student", seeds=2, **FAST)
    (tmp_path / "sweep/runs/k17-student-s1/summary.json").unlink()  # as if the study stopped before its last run
    main_args = ["report", str(tmp_path / "sweep"), "--out", str(tmp_path / "rep")]
    result = CliRunner().invoke(app, main_args)
    assert result.exit_code == 0, result.output
    md = (tmp_path / "rep/report.md").read_text()
    assert "3 of 4 planned runs are finished" in md and "k17-student-s1 (pending)" in md
    assert "| student | 1/2 | 50.00 |" in md and "| student | 2/2 | 52.50 ± 0.71 |" in md
    assert "has 1 run" in md and "one method only, nothing to compare" in md  # no test without runs or methods to compare, said so
    assert "(sweep-cf, student k17); data tiny" in md and "seeds 0; test_accuracy" in md  # the caption names the seeds the table used
    assert pictures(md) == ["s1-sweep-accuracy-vs-cf.png"]
    with Image.open(tmp_path / "rep" / "s1-sweep-accuracy-vs-cf.png") as image:
        assert np.asarray(image.convert("L")).std() > 5
    assert "training curves: not drawn — no run has a metrics.jsonl" in md and "no IG attribution cache" in md and "has no teacher" in md
    series = json.loads((tmp_path / "rep/report.json").read_text())["studies"][0]["students"]
    assert [(s["accuracy"]["student"], s["accuracy"]["methods"][0]["n"]) for s in series] == [("k15", 2), ("k17", 1)]


def test_bad_inputs_fail_with_one_line(tmp_path, capsys, study_dir):
    (tmp_path / "empty").mkdir()
    for args, message in (
        ([str(tmp_path / "empty")], "no study at"),
        ([str(study_dir / "ablation"), "--latency", str(study_dir / "ablation/study.json")], "is not an igkd latency benchmark"),
        ([str(study_dir / "ablation"), "--imagenet-eval", str(tmp_path / "missing.json")], "cannot read evaluation file"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["report", *args, "--out", str(tmp_path / "rep")])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "rep").exists()


def test_report_paths_are_shown_relative_to_the_working_directory(tmp_path, monkeypatch):
    """A report copied into docs/ names repro-cpu/ablation, not the absolute folder of the machine it ran on."""
    from igkd.report.tables import shown_path

    (tmp_path / "repro" / "ablation").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert shown_path(tmp_path / "repro" / "ablation") == str(Path("repro") / "ablation")
    assert shown_path("repro/ablation") == str(Path("repro") / "ablation")
    outside = tmp_path.parent / "elsewhere"
    assert shown_path(outside) == str(outside.resolve())
