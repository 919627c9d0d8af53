"""``igkd report``: read studies, compute every number (report.json), draw the figures, write report.md.

Figures that need the dataset, the teacher or the IG cache (the Figure-3 grid,
the attention maps) are skipped with a note in the report when those cannot be
loaded; a missing or damaged study folder is an error.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from igkd.atomic import atomic_write_json, atomic_write_text
from igkd.errors import IgkdError
from igkd.report import figures, tables

MAX_IMAGES = 10  # columns of the IG grid (one image per class)
ATTENTION_IMAGES = 6


def build_report(studies: list, out, *, data_dir=None, latency=None, evaluations=(), device: str = "cpu", dataset=None) -> dict:
    """Write ``out/report.md``, ``out/report.json`` and the PNGs for ``studies``; returns the report dict.
    ``dataset``: the studies' data already in memory (used where its fingerprint is theirs), else loaded from ``data_dir``."""
    from igkd.devices import resolve_device
    from igkd.experiments.study_folder import load_study, now
    from igkd.provenance import environment

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise IgkdError(f"--out {out} is a file: give a folder for the report")
    if not studies:
        raise IgkdError("no study folders given: igkd report STUDY_DIR... --out DIR")
    target = resolve_device(device)
    loaded = [load_study(path) for path in studies]  # every input is checked before anything is written
    latency_data = tables.read_latency(latency) if latency else None
    latency_numbers = tables.latency_section(latency, latency_data) if latency else None
    evaluation = tables.evaluation_section(list(evaluations or []))
    out.mkdir(parents=True, exist_ok=True)
    env = environment(target)
    report = {
        "format": "igkd-report",
        "created": now(),
        "environment": {k: env[k] for k in ("igkd", "git_sha", "torch", "device_name", "command")},
        "studies": [],
        "latency": latency_numbers,
        "evaluation": evaluation,
    }
    cache: dict = {} if dataset is None else {("dataset", dataset.name): dataset}  # datasets and teachers, loaded once per report
    for i, study in enumerate(loaded, 1):
        name = f"s{i}-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(study["path"]).resolve().name)
        report["studies"].append(study_section(study, name, out, data_dir, target, cache))
    if latency_numbers is not None:
        from igkd.deploy.plot import plot_latency_vs_cf

        plot_latency_vs_cf(latency_data, out / "latency-vs-cf.png")
        latency_numbers["figure"] = {"file": "latency-vs-cf.png", "caption": f"median latency per image vs CF, from {latency_numbers['path']}"}
    from igkd.report.markdown import render

    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render(report))
    return report


def study_section(study: dict, name: str, out: Path, data_dir, device, cache: dict) -> dict:
    section = {"name": name, "provenance": tables.provenance(study), "students": [], "figures": {}}
    if study["kind"] == "tune":
        section["tune"] = study.get("tune_result")
    else:
        for student in study["students"]:
            section["students"].append({
                "accuracy": tables.accuracy_section(study, student),
                "statistics": tables.statistics_section(study, student),
                "agreement": tables.agreement_section(study, student),
                "robustness": tables.robustness_section(study, student),
            })
    figs = section["figures"]
    if len(section["students"]) > 1:
        series = tables.cf_series([s["accuracy"] for s in section["students"]])
        figs["accuracy_vs_cf"] = _figure(
            out / f"{name}-accuracy-vs-cf.png", "test accuracy (mean ± sd over finished runs) vs compression factor",
            lambda path: figures.accuracy_vs_cf(series, path, f"{study['kind']} {name}"),
        )
    runs = tables.curves(study)
    figs["curves"] = (
        _figure(out / f"{name}-curves.png", "validation accuracy and training loss per epoch (metrics.jsonl), one line per run",
                lambda path: figures.training_curves(runs, study["methods"], path, f"{study['kind']} {name}"))
        if runs else {"skipped": "no run has a metrics.jsonl yet"}
    )
    dataset, problem = _dataset(study, data_dir, cache) if (study.get("attributions") or study.get("teacher")) else (None, None)
    if not study.get("attributions"):
        figs["ig_grid"] = {"skipped": "the study has no IG attribution cache (it was run without --attributions)"}
    else:
        figs["ig_grid"] = {"skipped": problem} if problem else _figure(out / f"{name}-ig-grid.png", None, lambda path: ig_grid(study, dataset, path))
    if not study.get("teacher"):
        figs["attention"] = {"skipped": "the study has no teacher"}
    else:
        figs["attention"] = {"skipped": problem} if problem else _figure(out / f"{name}-attention.png", None, lambda path: attention_figure(study, dataset, path, device, cache))
    return section


def _figure(path: Path, caption: str | None, draw) -> dict:
    """Draw one figure; an IgkdError (missing teacher, damaged cache, ...) becomes a note instead."""
    try:
        result = draw(path)
    except IgkdError as err:
        return {"skipped": str(err)}
    return {"file": path.name, "caption": caption if caption is not None else result}


def _dataset(study: dict, data_dir, cache: dict):
    """(dataset, None) when the study's data loads with the same fingerprint, else (None, why not)."""
    from igkd.data import load_dataset

    name, fingerprint = study["dataset"]["name"], study["dataset"]["fingerprint"]
    key = ("dataset", name)
    if key not in cache:
        try:
            cache[key] = load_dataset(name, data_dir, progress=False)
        except IgkdError as err:
            cache[key] = err
    data = cache[key]
    if isinstance(data, IgkdError):
        return None, f"dataset {name} could not be loaded ({data}); pass its files with --data-dir"
    if data.fingerprint != fingerprint:
        return None, f"the {name} data loaded now has fingerprint {data.fingerprint[:12]}, the study was trained on {fingerprint[:12]}: pass the study's data with --data-dir"
    return data, None


def ig_grid(study: dict, dataset, path: Path) -> str:
    """Figure 3: the first training image of each class, its teacher IG map (from the study's cache) and the overlay."""
    from igkd.attribution import open_attributions

    record = study["attributions"]
    cache = open_attributions(record["path"], teacher_sha256=(study.get("teacher") or {}).get("sha256"), dataset_fingerprint=dataset.fingerprint, split="train")
    picks = figures.one_per_class(dataset.train.labels, dataset.num_classes)[:MAX_IMAGES]
    maps = torch.from_numpy(np.asarray(cache.maps[picks], dtype=np.float32))
    titles = [dataset.classes[int(dataset.train.labels[i])] for i in picks]
    m = cache.manifest
    caption = (f"teacher IG maps of {dataset.name} training images {picks} ({m.get('method', 'IG')}, {m.get('n_steps')} steps, "
               f"baseline {m.get('baseline')}, reduction {m.get('reduction')}) from {tables.shown_path(record['path'])}; overlay = (image + min-max map) / 2")
    figures.overlay_grid(dataset.train.images[picks], maps, titles, path, caption=f"{dataset.name}: teacher IG maps")
    return caption


@torch.no_grad()
def attention_maps(model: torch.nn.Module, layer: str, images: torch.Tensor, device) -> torch.Tensor:
    """[K, h, w]: the attention-transfer map (channel mean of feature^2, L2-normalised) of ``layer``."""
    from igkd.distill.losses import FeatureTap
    from igkd.distill.losses import attention_map

    tap = FeatureTap(model, layer)
    try:
        model.to(device).eval()(images.to(device).float().div(255))
        features = tap.take()
    finally:
        tap.remove()
    return attention_map(features).view(features.shape[0], *features.shape[-2:]).cpu()


def _layer(model, summary: dict, role: str, teacher=None) -> str:
    from igkd.distill.losses import attention_layers, default_attention_layer

    config = summary.get("config") or {}
    named = (summary.get("attention_layers") or {}).get(role) or config.get(f"at_{role}_layer")
    if named:
        return named
    divider = config.get("at_divider", 2)
    if role == "student" and teacher is not None:
        return attention_layers(teacher, model, divider, config.get("at_teacher_layer"))["student"]
    return default_attention_layer(model, divider)


def _teacher(teacher: dict, cache: dict) -> torch.nn.Module:
    """The study's teacher model, hashed and loaded once per report, refused if it changed since the study ran."""
    from igkd.models import load_model
    from igkd.provenance import sha256_file

    path = Path(teacher["path"])
    if not path.is_file():
        raise IgkdError(f"teacher file {path} is missing")
    key = ("teacher", str(path.resolve()))
    if key not in cache:
        cache[key] = (sha256_file(path), load_model(path)[0])
    sha256, model = cache[key]
    if sha256 != teacher["sha256"]:
        raise IgkdError(f"teacher file {path} changed since the study ran (sha256 differs)")
    return model


def attention_figure(study: dict, dataset, path: Path, device, cache: dict) -> str:
    """The teacher's and each method's (first finished run) attention maps on a few test images."""
    from igkd.models import load_model

    teacher = _teacher(study["teacher"], cache)
    first: dict = {}
    for run in tables.finished_runs(study):
        first.setdefault(run["method"], run)
    if not first:
        raise IgkdError("no finished runs yet")
    picks = figures.one_per_class(dataset.test.labels, dataset.num_classes)[:ATTENTION_IMAGES]
    images = dataset.test.images[picks]
    with_at = next((r["summary"] for r in first.values() if r["summary"].get("attention_layers")), next(iter(first.values()))["summary"])
    layer = _layer(teacher, with_at, "teacher")
    rows, used = [(f"teacher\n{layer}", attention_maps(teacher, layer, images, device))], [f"teacher {layer}"]
    for method, run in first.items():
        model, _ = load_model(Path(run["dir"]) / "model.safetensors")
        layer = _layer(model, run["summary"], "student", teacher)
        rows.append((f"{method}\n{run['run_id']}\n{layer}", attention_maps(model, layer, images, device)))
        used.append(f"{method} {run['run_id']} {layer}")
    titles = [dataset.classes[int(dataset.test.labels[i])] for i in picks]
    figures.attention_grid(images, rows, titles, path, caption=f"{dataset.name} test images: attention maps (mean over channels of feature²)")
    return f"attention maps (channel mean of feature², as in the AT loss) on {dataset.name} test images {picks}; rows: " + "; ".join(used)
