"""Paper vs ours: the paper's published CIFAR-10 numbers beside a reproduction's, as the markdown of paper-vs-ours.md.

The paper's numbers are in ``paper_results.json`` (Table 3's best runs, the Monte Carlo means
and sds); ours are read from the reproduction folder's ablation and montecarlo studies. For a
profile other than the paper's, a table says what it changes, read from the files the run wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

from igkd.atomic import read_json_object
from igkd.experiments.pack import STATE_FILE
from igkd.experiments.reproduce import PRECISION_FILE, Settings


def paper_results() -> dict:
    return json.loads((Path(__file__).parent / "paper_results.json").read_text())


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None
    return mean, sd


def _accuracies(out: Path, study: str) -> dict[str, list[float]]:
    from igkd.experiments.study_folder import load_study

    if not (out / study / "study.json").exists():
        return {}
    by_method: dict[str, list[float]] = {}
    for run in load_study(out / study)["runs"]:
        if run["status"] == "finished":
            by_method.setdefault(run["method"], []).append(float(run["summary"]["test_accuracy"]))
    return by_method


def paper_tables(out: Path, settings: Settings | None = None) -> str:
    """Markdown: Table 3 and the Monte Carlo table, the paper's numbers beside ours (and, for a profile other
    than the paper's, what it changes)."""
    paper = paper_results()
    teacher = read_json_object(out / "teacher" / "summary.json") or {}
    lines = [
        "# Paper vs ours (CIFAR-10)",
        "",
        "Ours were measured on the JPEG copy of CIFAR-10 (`cifar10-jpeg`), the paper's on the original pixels.",
        f"Paper: {paper['source']}.",
        "",
        f"Teacher: paper {paper['teacher_test_accuracy']:.2f}%, ours "
        + (f"{teacher['test_accuracy']:.2f}% ({teacher.get('epochs')} epochs)" if teacher.get("test_accuracy") is not None else "not trained here"),
        "",
    ]
    if settings is not None and settings.profile != "paper":
        lines += profile_differences(out, settings)
    lines += [
        "## Table 3 (k5 student, 4.12x fewer parameters)",
        "",
        f"Paper: {paper['table3_note']}.",
        "",
        "| method | paper (best run) | ours mean | ours sd | ours max | runs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    ours = _accuracies(out, "ablation")
    for method, value in paper["table3_best_run"].items():
        acc = ours.get(method, [])
        mean, sd = _mean_sd(acc) if acc else (None, None)
        lines.append(f"| {method} | {value:.2f} | {_fmt(mean)} | {_fmt(sd)} | {_fmt(max(acc) if acc else None)} | {len(acc)} |")
    for method, acc in ours.items():  # controls the paper did not run (e.g. kd_shuffled)
        if method not in paper["table3_best_run"]:
            mean, sd = _mean_sd(acc)
            lines.append(f"| {method} (not in the paper) | - | {_fmt(mean)} | {_fmt(sd)} | {_fmt(max(acc))} | {len(acc)} |")
    lines += ["", "## Monte Carlo (stratified 80% subsets)", "", f"Paper: {paper['montecarlo_note']}.", "",
              "| method | paper mean | paper sd | ours mean | ours sd | runs |", "|---|---:|---:|---:|---:|---:|"]
    ours = _accuracies(out, "montecarlo")
    for method, (mean_p, sd_p) in paper["montecarlo_mean_sd"].items():
        acc = ours.get(method, [])
        mean, sd = _mean_sd(acc) if acc else (None, None)
        lines.append(f"| {method} | {mean_p:.2f} | {sd_p:.2f} | {_fmt(mean)} | {_fmt(sd)} | {len(acc)} |")
    lines += ["", "Statistics (paired t-tests, Holm): `igkd stats --study <folder>`; the full report: `report/report.md`.", ""]
    return "\n".join(lines)


def profile_differences(out: Path, settings: Settings) -> list[str]:
    """What this profile changes from the paper's protocol, read from the files the run wrote (the teacher's and
    a student's summary and config, the IG stage's result, ``precision.json``), not from what was asked."""
    state = read_json_object(out / STATE_FILE) or {}
    data = state.get("data") or {}
    ig = (state.get("stages", {}).get("ig") or {}).get("result") or {}
    completeness = ig.get("completeness") or {}
    precision = read_json_object(out / PRECISION_FILE)
    teacher = read_json_object(out / "teacher" / "summary.json") or {}
    runs = sorted((out / "ablation" / "runs").glob("*/summary.json")) if (out / "ablation" / "runs").is_dir() else []
    student = (read_json_object(runs[0]) or {}) if runs else {}
    tc, sc = teacher.get("config") or {}, student.get("config") or {}
    planned = read_json_object(out / "ablation" / "study.json") or {}
    methods, seeds = planned.get("methods") or settings.ablation_methods.split(","), len(planned.get("runs") or []) or settings.ablation_seeds

    def recipe(c: dict) -> str:
        if not c:
            return "not trained yet"
        return (f"{c['epochs']} epoch{'s' if c['epochs'] != 1 else ''}, {c['optimizer'].upper()}{' + Nesterov' if c.get('nesterov') else ''} "
                f"lr {c['lr']:g}, {c['schedule']} schedule, batch {c['batch_size']}, weight decay {c['weight_decay']:g}, label smoothing {c['label_smoothing']:g}")

    def count(value) -> str:
        return f"{value:,}" if isinstance(value, int) else "?"

    rows = [
        ("data", "original CIFAR-10 pixels", f"{data.get('source', '?')}; every accuracy on all {count(data.get('test'))} test images"),
        ("teacher", "MobileNetV2-CIFAR width 1.0, 2,236,682 parameters", f"width {tc.get('width', '?')}, {count(teacher.get('params'))} parameters"),
        ("teacher training", "its own recipe, 50,000 images", f"{recipe(tc)}; {count(teacher.get('train_size'))} images (all)"),
        ("student", "k5, width 1.0, 543,498 parameters", f"{sc.get('student', settings.student)}, width {sc.get('width', '?')}, {count(student.get('params'))} parameters"),
        ("student training", "Adam lr 0.001, 100 epochs, batch 64, 50,000 images",
         f"{recipe(sc)}; {count(student.get('train_size'))} images (the first {settings.students_per_class} of each class)"),
        ("IG maps", "50 steps, every training image",
         f"{settings.ig_steps} Gauss-Legendre steps, every image the students train on ({count(ig.get('images'))})"
         + (f"; completeness error: mean abs(delta) / mean abs(F(x) - F(0)) = {completeness['relative']:.3g}" if completeness.get("relative") is not None else "")),
        ("methods x seeds", "8 methods x 5 seeds", f"{', '.join(methods)} x {seeds} paired seeds"),
        ("Monte Carlo, sweep", "10 runs x 8 methods; k3 ... k17", "not run in this profile" if not settings.mc_runs else "as the paper"),
        ("precision", "fp32 (GPU)", f"cpu_bf16 = {precision['cpu_bf16']} (bf16/fp32 speed: {precision.get('gain')}; {PRECISION_FILE})" if precision else "fp32"),
    ]
    lines = [f"## What the {settings.profile} profile changes", "", "| | paper | this run |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return lines + [""]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
