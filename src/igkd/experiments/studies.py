"""Studies: many training runs planned together, written to one folder, resumable, balanced.

A study is a plan of runs (method x seed, or x student) and a folder::

    STUDY/study.json            what the study is (schema in docs/experiments.md)
    STUDY/results.csv           one line per finished run (method, run, accuracy, ..., the cohort size it trained in)
    STUDY/runs/<run_id>/        one run folder of igkd.distill.run_training
                                (+ agreement.json, robustness.json when asked for)

Kinds (each a function here and an ``igkd`` command):

- ``ablation`` (:func:`run_ablation`): methods x seeds 0..S-1 on the full training
  split (minus validation). Run r of every method uses seed r -> paired.
- ``montecarlo`` (:func:`run_montecarlo`): methods x runs on stratified random
  subsets; run r of every method uses seed r *and the same subset* (subset_seed r)
  -> paired. ``independent=True`` draws a seed and subset per method and run (the
  published design) -> unpaired, compared with Welch's test.
- ``sweep-cf`` (:func:`run_sweep`): students x methods x seeds: accuracy against
  the compression factor (teacher parameters / student parameters).

Runs are ordered seed-major (seed 0 of every method, then seed 1, ...), so a
study stopped half-way is still balanced across methods. Re-running the same
command continues it: finished runs (a readable ``summary.json``) are skipped and an
interrupted run resumes from its checkpoint. A re-run may *grow* the study (more
seeds/runs, more methods, more students for a sweep); anything else that differs
from ``study.json`` (data, teacher, attributions, any training setting) is
refused, because its runs would no longer be comparable.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from igkd.atomic import atomic_write_json, atomic_write_text, load_json, read_json_object, remove_stale_temporaries
from igkd.distill import executor, resolve_config, run_training  # noqa: F401 - tune trains its trials one by one with run_training
from igkd.distill.executor import Run
from igkd.errors import IgkdError
from igkd.experiments.agreement import AGREEMENT_FILE
from igkd.experiments.extras import ROBUSTNESS_FILE, add_extras, extras_record
from igkd.experiments.inputs import check_inputs, dataset_record, input_records
from igkd.experiments.plan import at_least_one, build_plan, one_student, pairing, parse_methods, parse_students, reference_params, student_params
from igkd.locking import folder_lock

STUDY_FILE = "study.json"
RESULTS_FILE = "results.csv"
RUNS_DIR = "runs"
FORMAT = "igkd-study"
FORMAT_VERSION = 1
KINDS = ("ablation", "montecarlo", "sweep-cf", "tune")

#: Config keys a study sets per run; a --config file must not set them.
STUDY_KEYS = ("method", "student", "seed", "subset", "subset_seed", "device")
#: Config keys that do not change what a run computes (left out of the identity).
NOT_IDENTITY = ("seed", "subset_seed", "student", "device", "compile")
#: What a tune study must keep to be continued (its trial count may change).
TUNE_IDENTITY = ("study_name", "storage", "sampler", "params", "space")


@dataclass
class StudyOptions:
    """What every run of a study shares (besides its data). ``None`` = the recipe's / method's value."""

    teacher: str | Path | None = None
    attributions: str | Path | None = None
    recipe: str | None = None
    config_values: dict | None = None  # the keys of a --config YAML file
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    val_fraction: float | None = None
    device: str = "auto"
    agreement: int | None = None  # measure IG agreement with the teacher on this many test images
    agreement_steps: int = 32
    robustness: str | None = None  # corruption spec for igkd.evaluate.robustness
    progress: bool = True
    on_epoch_end: Callable[[int, dict], None] | None = None  # called after each epoch's checkpoint (igkd reproduce's budget)
    cohort_size: int | None = None  # runs trained as one fused network; None: 1 on CPU, as many as fit on CUDA
    time_left: Callable[[], float] | None = None  # seconds left; cohorts are sized to finish inside it

    def config(self, method: str, student: str, seed: int, subset: float = 1.0, subset_seed: int | None = None, **overrides):
        values = dict(self.config_values or {})
        clash = [key for key in STUDY_KEYS if key in values]
        if clash:
            raise IgkdError(f"the config file sets {', '.join(clash)}, which a study sets per run: remove it from the file")
        recipe = self.recipe or values.pop("recipe", None) or "paper"
        values.pop("recipe", None)
        return resolve_config(
            yaml_values=values,
            check_unused=False,  # one config file serves every method of the study: check_inputs checks it once
            method=method,
            recipe=recipe,
            student=student,
            seed=seed,
            subset=subset,
            subset_seed=subset_seed,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            val_fraction=self.val_fraction,
            device=self.device,
            **overrides,
        )


# -- small parsers shared by the commands ------------------------------------------------------


# -- what a study is ------------------------------------------------------------------------------


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def config_identity(config) -> dict:
    values = json.loads(json.dumps(config.to_dict()))
    return {k: v for k, v in values.items() if k not in NOT_IDENTITY}


def first_difference(saved: dict, current: dict) -> str | None:
    """The first key (sorted) whose value differs between the two dicts, or None."""
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    return changed[0] if changed else None


def _describe(study: dict, attributions_key: str = "identity_sha256") -> dict:
    """The parts of a study that must not change when it is continued."""
    return {
        "kind": study["kind"],
        "dataset": study["dataset"]["fingerprint"],
        "teacher": (study.get("teacher") or {}).get("sha256"),
        # what the maps are, not the manifest's bytes: a cache rebuilt on the next machine continues the study
        "attributions": (study.get("attributions") or {}).get(attributions_key),
        "subset": study["subset"],
        "independent": study.get("independent", False),
        **({} if study["kind"] == "sweep-cf" else {"students": study["students"]}),
        **({"runs": study["runs"], "tune": {k: study["tune"][k] for k in TUNE_IDENTITY}} if study["kind"] == "tune" else {}),
    }


def _merge(saved: dict, new: dict, path: Path) -> dict:
    """``saved`` grown by ``new``'s methods, runs and (sweep) students; IgkdError on any other difference."""
    if saved.get("format") != FORMAT or saved.get("format_version") != FORMAT_VERSION:
        raise IgkdError(f"{path} is not an igkd study file (format {saved.get('format')!r} version {saved.get('format_version')!r})")
    key = "identity_sha256" if "identity_sha256" in (saved.get("attributions") or {}) or not saved.get("attributions") else "manifest_sha256"  # studies of 0.1.0
    old, now = _describe(saved, key), _describe(new, key)
    for key in old:
        if old[key] != now[key]:
            raise IgkdError(
                f"{path.parent} is a study with {key} = {old[key]!r}, but this command asks for {now[key]!r}; "
                "use the same options to continue it, or another --out for a new study"
            )
    for method in set(saved["configs"]) & set(new["configs"]):
        a, b = saved["configs"][method], new["configs"][method]
        key = first_difference(a, b)
        if key is not None:
            raise IgkdError(
                f"{path.parent}: method {method!r} was planned with {key}={a.get(key)!r} but this command gives {key}={b.get(key)!r}; "
                "use the same training options to continue the study, or another --out"
            )
    merged = dict(saved)
    merged["methods"] = saved["methods"] + [m for m in new["methods"] if m not in saved["methods"]]
    merged["students"] = saved["students"] + [s for s in new["students"] if s not in saved["students"]]
    merged["runs"] = sorted(set(saved["runs"]) | set(new["runs"]))
    merged["configs"] = {**saved["configs"], **new["configs"]}
    merged["teacher"], merged["attributions"] = new["teacher"], new["attributions"]  # same files (sha256), maybe other paths
    merged["extras"] = new["extras"]
    merged["invocations"] = saved.get("invocations", []) + new["invocations"]
    merged["updated"] = new["updated"]
    return merged


def invocation(device, cohort_size: int | None = None) -> dict:
    """One command's record in study.json; ``cohort_size``: the cohort size it asked for (None: the device's default,
    recorded as that number). Each run's summary.json and results.csv line say the size it was trained with."""
    from igkd.devices import resolve_device
    from igkd.distill.executor import default_cohort_size
    from igkd.provenance import environment

    env = environment(device)
    return {
        "time": now(), "command": env["command"], "git_sha": env["git_sha"], "hostname": env["hostname"], "device": env["device_name"],
        "cohort_size": cohort_size or default_cohort_size(resolve_device(device)),
    }


def open_study(out: Path, new: dict) -> dict:
    """The study to run in ``out``: ``new``, or the saved one grown by ``new`` (never changed). Writes nothing."""
    path = out / STUDY_FILE
    if path.exists():
        return _merge(read_study_file(path), new, path)
    if out.exists() and not out.is_dir():
        raise IgkdError(f"--out {out} is a file: give a folder for the study")
    if out.is_dir() and any(not (p.name.startswith(f".{STUDY_FILE}.") or p.name == ".lock") for p in out.iterdir()):  # a write in flight, the locks
        raise IgkdError(f"{out} is not empty and holds no {STUDY_FILE}: choose an empty or new folder for the study")
    return new


def read_study_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise IgkdError(f"no study at {path.parent} (no {STUDY_FILE}): give the folder a study command wrote")
    try:
        study = load_json(path)
    except (OSError, ValueError) as err:
        raise IgkdError(f"{path} is not readable JSON ({err})") from None
    if not isinstance(study, dict) or study.get("format") != FORMAT or not isinstance(study.get("kind"), str):
        raise IgkdError(f"{path} is not an igkd study file")
    plan = study.get("plan", [])
    if not isinstance(plan, list) or not all(isinstance(entry, dict) for entry in plan):
        raise IgkdError(f"{path}: 'plan' is not a list of runs: it was not written by igkd (run the study command into a new --out)")
    for entry in plan:
        if not run_folder_name(entry.get("run_id")):
            raise IgkdError(f"{path}: run_id {entry.get('run_id')!r} is not one folder name under {RUNS_DIR}/ (no '/' or '\\', not '.' or '..'): "
                            "refused; it was not written by igkd (run the study command into a new --out)")
    return study


def run_folder_name(run_id) -> bool:
    """A run id names one folder in STUDY/runs: a non-empty str, one plain path part (not '.' or '..', not absolute)."""
    return (
        isinstance(run_id, str) and run_id not in ("", ".", "..") and not any(c in "/\\:" or ord(c) < 32 for c in run_id)
    )


# -- running ----------------------------------------------------------------------------------------




def _results_csv(study: dict, out: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "run", "accuracy", "student", "seed", "subset_seed", "params", "cf", "val_accuracy", "run_id", "cohort_size"])
    for entry in study["plan"]:
        summary = read_json_object(out / RUNS_DIR / entry["run_id"] / "summary.json")
        if summary is not None:
            writer.writerow([
                entry["method"], entry["run"], summary["test_accuracy"], entry["student"], entry["seed"], entry["subset_seed"],
                entry["params"], entry["cf"], summary.get("val_accuracy"), entry["run_id"], summary.get("cohort_size", 1),
            ])
    atomic_write_text(out / RESULTS_FILE, buffer.getvalue())


def say(options: StudyOptions, text: str) -> None:
    if options.progress:
        from rich.console import Console

        Console().print(text, highlight=False)


def _finished(run_dir: Path) -> bool:
    """A run is finished when its summary.json is readable; a damaged one is trained again (it resumes)."""
    from igkd.distill.loop import read_summary

    return read_summary(run_dir / "summary.json") is not None


def _execute(study: dict, out: Path, dataset, options: StudyOptions) -> None:
    """Train every unfinished run of the plan (in cohorts, see :mod:`igkd.distill.executor`); finished runs are
    skipped, interrupted ones resume. Extras (agreement, robustness) follow each finished run."""
    teacher, attributions, cache = study.get("teacher"), study.get("attributions"), {}
    _results_csv(study, out)  # runs finished earlier (a grown plan reorders them)
    runs = []
    for entry in study["plan"]:
        config = options.config(entry["method"], entry["student"], entry["seed"], study["subset"], entry["subset_seed"] if study["subset"] < 1 else None)
        label = f"{entry['method']} {entry['student']} seed {entry['seed']}" + (f" subset {study['subset']:g}/{entry['subset_seed']}" if study["subset"] < 1 else "")
        runs.append(Run(config, out / RUNS_DIR / entry["run_id"], label))
    earlier = [r for r in runs if _finished(r.out)]
    if earlier:
        say(options, f"[dim]study {study['kind']}: {len(earlier)} of {len(runs)} runs finished earlier: skipped[/dim]")

    def finished(cohort: list[Run], _summaries) -> None:
        _results_csv(study, out)
        for run in cohort:
            add_extras(run.out, dataset, teacher, options, cache)

    for run in earlier:
        add_extras(run.out, dataset, teacher, options, cache)
    executor.execute(
        runs, dataset,
        teacher_path=teacher["path"] if teacher else None,
        attributions_dir=attributions["path"] if attributions else None,
        cohort_size=options.cohort_size, progress=options.progress, on_epoch_end=options.on_epoch_end,
        on_finished=finished, time_left=options.time_left,
        say=lambda text: say(options, f"[bold]study {study['kind']}:[/bold] {text}"),
    )


def refuse_torchrun() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise IgkdError(
            "studies run as one process (tune: one process per worker); torchrun is for a single run: "
            "torchrun --nproc_per_node N -m igkd.cli distill ..."
        )


def study_lock(out: Path):
    """Hold ``out/.lock`` while training, so two processes never run the same study folder at once
    (:func:`igkd.locking.folder_lock`; released when the process dies)."""
    return folder_lock(out, what=f"study {out}")


def study_file_lock(out: Path):
    """Held briefly while study.json is read, merged and written, so concurrent tune workers keep every invocation."""
    return folder_lock(out, name=".study.json.lock", wait=True, what=f"study {out}")


def _run_study(kind: str, dataset, out, *, methods, students, runs, subset: float = 1.0, independent: bool = False, options: StudyOptions) -> dict:
    refuse_torchrun()
    out = Path(out)
    if not 0 < subset <= 1:
        raise IgkdError(f"--subset must be in (0, 1], got {subset}")
    if options.teacher is not None and Path(options.teacher).resolve() == out.resolve():
        raise IgkdError("--out must not be the teacher's folder")
    configs = {m: options.config(m, students[0], 0, subset, 0 if subset < 1 else None) for m in methods}
    teacher, attributions = input_records(options, dataset, configs)
    paired, pairing_text = pairing(kind, subset, independent)
    new = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "paired": paired,
        "pairing": pairing_text,
        "methods": methods,
        "students": students,
        "runs": runs,
        "subset": subset,
        "independent": independent,
        "configs": {m: config_identity(c) for m, c in configs.items()},
        "dataset": dataset_record(dataset),
        "teacher": teacher,
        "attributions": attributions,
        "extras": extras_record(options),
        "created": now(),
        "updated": now(),
        "invocations": [invocation(configs[methods[0]].device, options.cohort_size)],
    }
    study = open_study(out, new)
    all_configs = {m: configs.get(m) or options.config(m, students[0], 0, subset, 0 if subset < 1 else None) for m in study["methods"]}
    check_inputs(all_configs, options, teacher, attributions)
    reference, reference_source = reference_params(teacher, dataset)
    width = all_configs[study["methods"][0]].width
    params = {s: student_params(s, dataset, width) for s in study["students"]}
    study["cf_reference"] = {"params": reference, "source": reference_source}
    study["plan"] = build_plan(kind, study["methods"], study["students"], study["runs"], subset, independent, params, reference)
    out.mkdir(parents=True, exist_ok=True)
    with study_lock(out):
        remove_stale_temporaries(out, (STUDY_FILE, RESULTS_FILE))  # left by a write killed half-way
        atomic_write_json(out / STUDY_FILE, study)
        try:
            _execute(study, out, dataset, options)
        except KeyboardInterrupt:
            say(options, "[yellow]study interrupted: run the same command again to continue it (finished runs are kept, the current one resumes)[/yellow]")
            raise
    return load_study(out)


def study_options(options: StudyOptions | None, kwargs: dict) -> StudyOptions:
    if options is not None and kwargs:
        raise TypeError("pass either options=StudyOptions(...) or keyword options, not both")
    return options or StudyOptions(**kwargs)


def run_ablation(dataset, out, *, methods="paper", seeds: int = 5, student: str = "k5", options: StudyOptions | None = None, **kwargs) -> dict:
    """Every method with seeds 0..seeds-1 on the full training split (paired by seed); returns :func:`load_study`."""
    return _run_study(
        "ablation", dataset, out, methods=parse_methods(methods), students=one_student(student),
        runs=list(range(at_least_one(seeds, "--seeds"))), options=study_options(options, kwargs),
    )


def run_montecarlo(
    dataset, out, *, methods="paper", runs: int = 10, subset: float = 0.8, independent: bool = False, student: str = "k5",
    options: StudyOptions | None = None, **kwargs,
) -> dict:
    """Every method on ``runs`` stratified ``subset`` draws; run r of each method shares seed and subset unless ``independent``."""
    if subset >= 1:
        raise IgkdError(f"a Monte Carlo study trains on random subsets: --subset must be below 1 (e.g. 0.8), got {subset}")
    return _run_study(
        "montecarlo", dataset, out, methods=parse_methods(methods), students=one_student(student), runs=list(range(at_least_one(runs, "--runs"))),
        subset=subset, independent=independent, options=study_options(options, kwargs),
    )


def run_sweep(dataset, out, *, students="all", methods="student,kd_ig", seeds: int = 1, options: StudyOptions | None = None, **kwargs) -> dict:
    """Accuracy against compression: every student x method x seed; each run records params and CF."""
    return _run_study(
        "sweep-cf", dataset, out, methods=parse_methods(methods), students=parse_students(students),
        runs=list(range(at_least_one(seeds, "--seeds"))), options=study_options(options, kwargs),
    )


# -- reading ----------------------------------------------------------------------------------------


def _tune_runs(out: Path) -> list[dict]:
    runs = []
    folder = out / RUNS_DIR
    trials = sorted(folder.glob("trial-*"), key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else -1) if folder.is_dir() else []
    for run_dir in trials:
        config = read_json_object(run_dir / "config.json") or {}
        runs.append({"run_id": run_dir.name, "method": config.get("method"), "student": config.get("student"), "seed": config.get("seed")})
    return runs


def load_study(path: str | Path) -> dict:
    """study.json plus, under ``runs``, each planned run with its status and files.

    Each run: the plan entry (run_id, method, student, run, seed, subset_seed,
    params, cf) + ``dir``, ``status`` (finished | interrupted | pending),
    ``summary`` (summary.json or None), ``agreement``, ``robustness``. A tune
    study lists its trial folders instead and adds ``tune_result`` (tune.json).
    """
    out = Path(path)
    study = read_study_file(out / STUDY_FILE)
    study["path"] = str(out)
    entries = _tune_runs(out) if study["kind"] == "tune" else study.get("plan", [])
    runs = []
    for entry in entries:
        run_dir = out / RUNS_DIR / entry["run_id"]
        summary = read_json_object(run_dir / "summary.json")
        started = (run_dir / "checkpoint.pt").exists() or (run_dir / "checkpoint.next.pt").exists()  # the latter: a cohort's save cut short
        status = "finished" if summary is not None else "interrupted" if started else "pending"
        runs.append({
            **entry,
            "dir": str(run_dir),
            "status": status,
            "summary": summary,
            "agreement": read_json_object(run_dir / AGREEMENT_FILE),
            "robustness": read_json_object(run_dir / ROBUSTNESS_FILE),
        })
    study["runs"] = runs
    if study["kind"] == "tune":
        study["tune_result"] = read_json_object(out / "tune.json")
    return study


def study_rows(study: dict, student: str | None = None) -> tuple[list[tuple[str, str, float]], dict]:
    """Rows (method, run, test accuracy) of a loaded study for :func:`igkd.experiments.statistics.summarize`, and notes.

    A paired study keeps only the runs every method has finished (pairs need
    both halves); the notes say which runs were left out.
    """
    if study["kind"] == "tune":
        raise IgkdError("a tune study selects hyper-parameters on validation accuracy (see its tune.json); igkd stats --study takes ablation, montecarlo and sweep-cf studies")
    students = study["students"]
    if student is None:
        if len(students) > 1:
            raise IgkdError(f"this study has students {', '.join(students)}: choose one with --student")
        student = students[0]
    else:
        student = parse_students(student)[0]
        if student not in students:
            raise IgkdError(f"this study has no student {student}; it has {', '.join(students)}")
    finished = [r for r in study["runs"] if r["student"] == student and r["status"] == "finished"]
    if not finished:
        raise IgkdError(f"no finished runs of {student} in {study['path']} yet: run the study command first")
    by_method: dict[str, set[int]] = {}
    for run in finished:
        by_method.setdefault(run["method"], set()).add(run["run"])
    dropped: list[str] = []
    if study["paired"]:
        common = set.intersection(*by_method.values())
        dropped = sorted(r["run_id"] for r in finished if r["run"] not in common)
        finished = [r for r in finished if r["run"] in common]
    rows = [(r["method"], str(r["run"]), float(r["summary"]["test_accuracy"])) for r in finished]
    notes = {
        "path": study["path"],
        "kind": study["kind"],
        "student": student,
        "paired": study["paired"],
        "pairing": study["pairing"],
        "accuracy": "test_accuracy of each run's final model (no selection on test)",
        "runs_used": len(rows),
        "runs_planned": sum(r["student"] == student for r in study["runs"]),
        "runs_dropped": dropped,
    }
    return rows, notes


def study_statistics(path: str | Path, *, baseline: str = "student", student: str | None = None, confidence: float = 0.95) -> dict:
    """:func:`summarize` of a study's test accuracies; the study's ``paired`` flag decides paired vs Welch."""
    from igkd.experiments.statistics import summarize

    rows, notes = study_rows(load_study(path), student)
    summary = summarize(rows, baseline=baseline, paired=notes["paired"], confidence=confidence)
    summary["pairing"] = f"{'paired' if notes['paired'] else 'unpaired'} by design (study.json): {notes['pairing']}"
    summary["study"] = notes
    return summary
