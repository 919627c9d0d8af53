"""The numbers of the report, as JSON-able dicts computed from loaded studies and result files.

Everything the markdown shows comes from here (and is written to report.json):
per-run values are read from each run's summary.json / agreement.json /
robustness.json, spread over runs is :func:`igkd.experiments.statistics.describe`
and tests are :func:`igkd.experiments.statistics.summarize` (the study's
``paired`` flag picks paired t + Wilcoxon or Welch).
"""

from __future__ import annotations

import json
from pathlib import Path

from igkd.atomic import load_json
from igkd.errors import IgkdError
from igkd.experiments.statistics import describe, summarize


def spread(values: list[float]) -> dict:
    """n, mean, sd, min, max, 95% CI over runs; sd and CI are None for a single run (None for no runs)."""
    values = [float(v) for v in values]
    if not values:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None, "ci_low": None, "ci_high": None}
    if len(values) == 1:
        return {"n": 1, "mean": values[0], "sd": None, "min": values[0], "max": values[0], "ci_low": None, "ci_high": None}
    return describe(values)


#: Shown for every run; the keys of a loss term or augmentation only when the run uses it (below).
TRAINING_KEYS = ("recipe", "epochs", "batch_size", "optimizer", "lr", "alpha", "temperature", "p", "gamma")
TERM_KEYS = {
    ("logit_loss", "dkd"): ("logit_loss", "dkd_alpha", "dkd_beta", "dkd_temperature", "dkd_warmup"),
    ("logit_loss", "dist"): ("logit_loss", "dist_beta", "dist_gamma", "dist_temperature"),
    ("logit_std", True): ("logit_std", "logit_std_temperature"),
    ("overlay_maps", "shuffled"): ("overlay_maps",),
    ("overlay_maps", "saliency"): ("overlay_maps",),
    ("overlay_maps", "random"): ("overlay_maps", "random_map_sigma"),
    ("mix", "cutmix"): ("mix", "mix_alpha", "mix_prob"),
    ("mix", "mixup"): ("mix", "mix_alpha", "mix_prob"),
}


def training_settings(config: dict) -> dict:
    """The settings a reader needs to tell the runs' methods apart: :data:`TRAINING_KEYS` plus the keys of
    the loss terms and augmentations the run uses (DKD's weights only for DKD runs, and so on)."""
    keys = list(TRAINING_KEYS)
    for (key, value), extra in TERM_KEYS.items():
        if config.get(key) == value:
            keys += [k for k in extra if k not in keys]
    return {k: config.get(k) for k in keys}


def _distinct(values) -> list:
    return sorted({str(v) for v in values if v is not None})


def finished_runs(study: dict, student: str | None = None) -> list[dict]:
    return [r for r in study["runs"] if r["status"] == "finished" and (student is None or r.get("student") == student)]


def shown_path(path) -> str:
    """A path as a report shows it: relative to the working directory when inside it (a report copied into
    docs/ or another machine then names ``repro-cpu/ablation``, not this machine's absolute folder), else absolute."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(resolved)


def _shown_record(record: dict | None) -> dict | None:
    return {**record, "path": shown_path(record["path"])} if record and record.get("path") else record


def provenance(study: dict) -> dict:
    """Where the study's numbers come from: folder, data, teacher, devices, versions, seeds, pairing."""
    finished = finished_runs(study)
    summaries = [r["summary"] for r in finished]
    envs = [s.get("environment") or {} for s in summaries]
    configs = study.get("configs") or {}
    return {
        "path": shown_path(study["path"]),
        "kind": study["kind"],
        "paired": study.get("paired"),
        "pairing": study.get("pairing"),
        "dataset": {
            **{k: study["dataset"].get(k) for k in ("name", "fingerprint", "train", "test")},
            "classes": len(study["dataset"].get("classes", [])),
            "source": _distinct((s.get("dataset") or {}).get("source") for s in summaries),
        },
        "subset": study.get("subset"),
        "teacher": _shown_record(study.get("teacher")),
        "attributions": _shown_record(study.get("attributions")),
        "training": {m: training_settings(c) for m, c in configs.items()},
        "cohort_sizes": sorted({int(s.get("cohort_size") or 1) for s in summaries}),
        "devices": _distinct(e.get("device_name") for e in envs),
        "torch": _distinct(e.get("torch") for e in envs),
        "git_sha": _distinct(e.get("git_sha") for e in envs),
        "igkd": _distinct(e.get("igkd") for e in envs),
        "seeds": sorted({r["seed"] for r in finished if r.get("seed") is not None}),
        "subset_seeds": sorted({r["subset_seed"] for r in finished if r.get("subset_seed") is not None}) if (study.get("subset") or 1) < 1 else None,
        "runs": {
            "planned": len(study["runs"]),
            "finished": len(finished),
            "unfinished": [{"run_id": r["run_id"], "status": r["status"]} for r in study["runs"] if r["status"] != "finished"],
        },
    }


def baseline_of(study: dict) -> str:
    methods = study.get("methods") or []
    return "student" if "student" in methods or not methods else methods[0]


def accuracy_section(study: dict, student: str) -> dict:
    """Table-3-like: test accuracy per method over all finished runs of ``student``, plus each run's value."""
    runs = [r for r in study["runs"] if r.get("student") == student]
    base = baseline_of(study)
    methods = []
    for method in study["methods"]:
        mine = [r for r in runs if r["method"] == method]
        done = [r for r in mine if r["status"] == "finished"]
        values = [float(r["summary"]["test_accuracy"]) for r in done]
        methods.append({
            "method": method,
            "planned": len(mine),
            **spread(values),
            "runs": [
                {"run_id": r["run_id"], "run": r.get("run"), "seed": r.get("seed"), "test_accuracy": float(r["summary"]["test_accuracy"]),
                 "val_accuracy": r["summary"].get("val_accuracy")}
                for r in done
            ],
        })
    base_mean = next((m["mean"] for m in methods if m["method"] == base), None)
    for m in methods:
        m["delta_vs_baseline"] = None if base_mean is None or m["mean"] is None else m["mean"] - base_mean
    teacher = [float(r["summary"]["teacher_test_accuracy"]) for r in runs if r["status"] == "finished" and r["summary"].get("teacher_test_accuracy") is not None]
    return {
        "student": student,
        "params": runs[0].get("params") if runs else None,
        "cf": runs[0].get("cf") if runs else None,
        "baseline": base,
        "teacher_test_accuracy": sorted(set(teacher)),
        "methods": methods,
        "source": "test_accuracy of each finished run's summary.json (final model, no selection on test); mean and sd (ddof=1) over runs",
    }


def statistics_section(study: dict, student: str) -> dict:
    """``igkd stats --study`` for one student (complete pairs when paired), or why there is none."""
    from igkd.experiments.studies import study_statistics

    try:
        return study_statistics(study["path"], baseline=baseline_of(study), student=student)
    except IgkdError as err:
        return {"skipped": str(err)}


def _per_method(study: dict, runs: list[dict], key: str) -> list[tuple[str, list[dict]]]:
    """(method, the ``key`` record of each of its runs) for every method of the study that has runs, in study order."""
    grouped = [(method, [r[key] for r in runs if r["method"] == method]) for method in study["methods"]]
    return [(method, records) for method, records in grouped if records]


def agreement_section(study: dict, student: str) -> dict | None:
    """Per method: mean +- sd over runs of each run's mean Spearman rho and top-10% overlap (None without agreement.json)."""
    runs = [r for r in finished_runs(study, student) if r.get("agreement")]
    if not runs:
        return None
    first = runs[0]["agreement"]
    methods = [
        {
            "method": method,
            "spearman": spread([a["spearman"]["mean"] for a in mine if a["spearman"]["mean"] is not None]),
            "top_overlap": spread([a["top_overlap"]["mean"] for a in mine if a["top_overlap"]["mean"] is not None]),
        }
        for method, mine in _per_method(study, runs, "agreement")
    ]
    return {"n_images": first.get("n"), "n_steps": first.get("n_steps"), "top_fraction": first.get("top_fraction"), "methods": methods}


def robustness_section(study: dict, student: str) -> dict | None:
    """Method x corruption accuracy (mean over severities), mean +- sd over runs, and tests on mean corruption accuracy."""
    runs = [r for r in finished_runs(study, student) if r.get("robustness") and r["robustness"].get("mean_corruption_accuracy") is not None]
    if not runs:
        return None
    corruptions = list(dict.fromkeys(c for r in runs for c in r["robustness"]["per_corruption_mean"]))
    methods = [
        {
            "method": method,
            "clean": spread([x["clean_accuracy"] for x in mine]),
            "corruptions": {c: spread([x["per_corruption_mean"][c] for x in mine if c in x["per_corruption_mean"]]) for c in corruptions},
            "mean_corruption_accuracy": spread([x["mean_corruption_accuracy"] for x in mine]),
            "relative_drop": spread([x["relative_drop"] for x in mine if x.get("relative_drop") is not None]),
        }
        for method, mine in _per_method(study, runs, "robustness")
    ]
    rows = [(r["method"], str(r.get("run", r["seed"])), float(r["robustness"]["mean_corruption_accuracy"])) for r in runs]
    dropped = []
    if study.get("paired"):  # pairs need both halves: keep the runs every method has
        by_method: dict[str, set] = {}
        for method, run, _ in rows:
            by_method.setdefault(method, set()).add(run)
        common = set.intersection(*by_method.values())
        dropped = sorted({f"{m}/{r}" for m, r, _ in rows if r not in common})
        rows = [row for row in rows if row[1] in common]
    try:
        tests = summarize(rows, baseline=baseline_of(study), paired=bool(study.get("paired")))
        tests["pairing"] = f"{'paired' if study.get('paired') else 'unpaired'} by design (study.json): {study.get('pairing')}"
    except IgkdError as err:
        tests = {"skipped": str(err)}
    tests["runs_dropped"] = dropped
    return {
        "spec": _distinct(r["robustness"].get("spec") for r in runs),
        "seed": _distinct(r["robustness"].get("seed") for r in runs),
        "corruptions": corruptions,
        "methods": methods,
        "statistics": tests,
    }


def curves(study: dict) -> list[dict]:
    """Per finished or interrupted run: epoch, val accuracy and train loss from metrics.jsonl."""
    out = []
    for run in study["runs"]:
        path = Path(run["dir"]) / "metrics.jsonl"
        if not path.is_file():
            continue
        records = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash: the others still plot
            if isinstance(record, dict):  # a line that is not an epoch's record (5, "x", [..]) is skipped alike
                records.append(record)
        if records:
            out.append({
                "run_id": run["run_id"], "method": run["method"], "student": run.get("student"),
                "epoch": [r.get("epoch") for r in records],
                "val_accuracy": [r.get("val_accuracy") for r in records],
                "train_loss": [r.get("train_loss") for r in records],
            })
    return out


def cf_series(accuracy: list[dict]) -> dict:
    """``{method: [{student, cf, n, mean, sd}]}`` over the students of a sweep, ordered by CF."""
    series: dict[str, list] = {}
    for section in sorted(accuracy, key=lambda s: s["cf"] or 0):
        for m in section["methods"]:
            if m["n"]:
                series.setdefault(m["method"], []).append({"student": section["student"], "cf": section["cf"], "n": m["n"], "mean": m["mean"], "sd": m["sd"]})
    return series


def read_json(path: str | Path, what: str, how: str) -> dict | list:
    path = Path(path)
    try:
        return load_json(path)
    except OSError as err:
        raise IgkdError(f"cannot read {what} {path} ({err.strerror or err}): {how}") from None
    except ValueError as err:
        raise IgkdError(f"{what} {path} is not valid JSON ({err}): {how}") from None


def read_latency(path: str | Path) -> dict:
    """The JSON of ``igkd bench latency --json --out FILE``, checked to be one."""
    how = "pass the file written by 'igkd bench latency --json --out FILE'"
    data = read_json(path, "latency file", how)
    if not isinstance(data, dict) or data.get("kind") != "igkd-latency-benchmark" or "measurements" not in data:
        raise IgkdError(f"{path} is not an igkd latency benchmark: {how}")
    return data


def latency_section(path: str | Path, data: dict) -> dict:
    """Median latency per model x backend/precision/batch size and speedup vs the teacher, from ``read_latency(path)``."""
    settings = sorted({(m["backend"], m["precision"], m["batch_size"]) for m in data["measurements"]})
    rows = []
    for model in data["models"]:
        cells = {}
        for m in data["measurements"]:
            if m["model"] == model["label"]:
                key = (m["backend"], m["precision"], m["batch_size"])
                cells[f"{key[0]} {key[1]} b{key[2]}"] = {"median_ms": m["median_ms"], "speedup_vs_teacher": m.get("speedup_vs_teacher")}
        rows.append({"model": model["label"], "params": model.get("params"), "cf": model.get("cf"), "latency": cells})
    return {
        "path": shown_path(path),
        "created": data.get("created"),
        "machine": data.get("machine", {}),
        "settings": data.get("settings", {}),
        "git_sha": (data.get("environment") or {}).get("git_sha"),
        "columns": [f"{b} {p} b{s}" for b, p, s in settings],
        "models": rows,
    }


def evaluation_section(paths: list[str | Path]) -> dict | None:
    """Accuracy and per-class accuracy of models saved from ``igkd evaluate ... --json`` (e.g. on imagenet32-cifar)."""
    if not paths:
        return None
    how = "save the output of 'igkd evaluate --checkpoint CKPT --dataset imagenet32-cifar --json > FILE'"
    results = []
    for path in paths:
        data = read_json(path, "evaluation file", how)
        if not isinstance(data, dict) or not {"accuracy", "per_class", "n"} <= set(data):
            raise IgkdError(f"{path} has no accuracy/per_class/n: {how}")
        results.append({
            "file": shown_path(path),
            **{k: data.get(k) for k in ("model", "checkpoint", "dataset", "fingerprint", "split", "n", "accuracy", "per_class")},
            "device": (data.get("environment") or {}).get("device_name"),
            "git_sha": (data.get("environment") or {}).get("git_sha"),
        })
    classes = list(dict.fromkeys(c for r in results for c in r["per_class"]))
    return {"classes": classes, "results": results}
