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
from igkd.distill import METHODS, PAPER_METHODS, executor, resolve_config, run_training  # noqa: F401 - tune trains its trials one by one with run_training
from igkd.distill.executor import Run
from igkd.errors import IgkdError
from igkd.experiments.agreement import AGREEMENT_FILE, measure_agreement
from igkd.locking import folder_lock

STUDY_FILE = "study.json"
RESULTS_FILE = "results.csv"
RUNS_DIR = "runs"
ROBUSTNESS_FILE = "robustness.json"
FORMAT = "igkd-study"
FORMAT_VERSION = 1
KINDS = ("ablation", "montecarlo", "sweep-cf", "tune")

#: Config keys a study sets per run; a --config file must not set them.
STUDY_KEYS = ("method", "student", "seed", "subset", "subset_seed", "device")
#: Config keys that do not change what a run computes (left out of the identity).
NOT_IDENTITY = ("seed", "subset_seed", "student", "device", "compile")
#: Seeds of independent Monte Carlo runs: run r of the i-th method (in METHODS order) uses r + i * STRIDE.
INDEPENDENT_STRIDE = 1000
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
    student_arch: dict | None = None  # an external student: config keys student_arch, student_arch_args, student_normalize
    trusted: object = None  # the factories model files may be rebuilt by (igkd.models.load_model's trusted)

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
            **(self.student_arch or {}),
            **overrides,
        )


# -- small parsers shared by the commands ------------------------------------------------------


def methods_of_one_cache() -> list[str]:
    """``--methods all``: every method that can run in one study, i.e. all but those whose overlay needs a
    cache other than IG maps (``kd_saliency``, a saliency cache: a study has one cache, so it runs by name
    in a study of its own)."""
    from igkd.distill.controls import expected_attribution_method

    return [m for m, preset in METHODS.items() if expected_attribution_method(preset.get("overlay_maps", "ig")) == "ig"]


def parse_methods(text: str | list[str]) -> list[str]:
    """``paper`` (the paper's eight methods), ``all`` (every method that can run in one study:
    :func:`methods_of_one_cache`) or a comma-separated list of method names (order kept, repeats dropped)."""
    items = [m.strip().lower() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    if items == ["paper"]:
        return list(PAPER_METHODS)
    if items == ["all"]:
        return methods_of_one_cache()
    unknown = [m for m in items if m not in METHODS]
    if unknown or not items:
        problem = f"unknown method {unknown[0]!r}" if unknown else "no methods given"
        raise IgkdError(f"{problem}: use paper, all or a comma-separated list of {', '.join(METHODS)}")
    return list(dict.fromkeys(items))


def parse_students(text: str | list[str]) -> list[str]:
    """``all`` or a comma-separated list of students (k3 ... k17), as ``k<n>``, ordered by size (largest first)."""
    from igkd.models import STUDENT_KS, parse_model_name

    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    if [s.lower() for s in items] == ["all"]:
        return [f"k{k}" for k in STUDENT_KS]
    ks = []
    for item in items:
        k = parse_model_name(item)
        if k == 0:
            raise IgkdError("the teacher is not a student: list students k3 ... k17")
        ks.append(k)
    if not ks:
        raise IgkdError("no students given: use all or a comma-separated list such as k3,k5,k17")
    return [f"k{k}" for k in sorted(set(ks))]


def at_least_one(value: int, what: str) -> int:
    if value < 1:
        raise IgkdError(f"{what} must be at least 1, got {value}")
    return value


# -- what a study is ------------------------------------------------------------------------------


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def config_identity(config) -> dict:
    values = json.loads(json.dumps(config.to_dict()))
    if values.get("student_arch") is None:  # a family student: the identity studies have always recorded
        for key in ("student_arch", "student_arch_args", "student_normalize"):
            values.pop(key, None)
    return {k: v for k, v in values.items() if k not in NOT_IDENTITY}


def teacher_record(path: str | Path | None, dataset, trusted=None) -> dict | None:
    """path, sha256, params and model name of the teacher file (checked against the dataset's classes)."""
    if path is None:
        return None
    from igkd.distill.run import resolve_checkpoint
    from igkd.models import count_parameters, load_model
    from igkd.provenance import sha256_file

    path = resolve_checkpoint(path)
    model, meta = load_model(path, trusted=trusted, option="--teacher-arch")
    if model.num_classes != dataset.num_classes:
        raise IgkdError(f"teacher {path} predicts {model.num_classes} classes but dataset {dataset.name} has {dataset.num_classes}")
    return {"path": str(path.resolve()), "sha256": sha256_file(path), "params": count_parameters(model), "model": meta["spec"]["name"]}


def attributions_record(path: str | Path | None, teacher: dict | None, dataset) -> dict | None:
    """path and manifest sha256 of the IG cache, refused unless built for this teacher and data."""
    if path is None:
        return None
    if teacher is None:
        raise IgkdError("IG maps are checked against their teacher: pass --teacher CKPT with --attributions")
    from igkd.attribution import open_attributions

    cache = open_attributions(path, teacher_sha256=teacher["sha256"], dataset_fingerprint=dataset.fingerprint, split="train")
    from igkd.attribution.cache import content_identity

    return {
        "path": str(Path(path).resolve()), "manifest_sha256": cache.manifest_sha256, "identity_sha256": content_identity(cache.manifest),
        "n_steps": cache.manifest.get("n_steps"), "reduction": cache.manifest.get("reduction"),
    }


def input_records(options: StudyOptions, dataset, configs: dict) -> tuple[dict | None, dict | None]:
    """The teacher and IG-cache records of a study (the cache is required when a config overlays maps)."""
    teacher = teacher_record(options.teacher, dataset, options.trusted)
    needs_maps = any(c.p > 0 for c in configs.values())
    attributions = attributions_record(options.attributions, teacher, dataset) if options.attributions is not None or needs_maps else None
    if needs_maps and attributions is not None:
        from igkd.distill.run import check_overlay_reduction

        check_overlay_reduction(attributions["reduction"], attributions["path"])  # before the first run, not at the first IG run
    return teacher, attributions


def extras_record(options: StudyOptions) -> dict:
    return {
        "agreement": {"n": options.agreement, "n_steps": options.agreement_steps} if options.agreement else None,
        "robustness": options.robustness,
    }


def first_difference(saved: dict, current: dict) -> str | None:
    """The first key (sorted) whose value differs between the two dicts, or None."""
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    return changed[0] if changed else None


def dataset_record(dataset) -> dict:
    return {"name": dataset.name, "fingerprint": dataset.fingerprint, "train": len(dataset.train), "test": len(dataset.test), "classes": list(dataset.classes)}


def _student_params(student: str, dataset, width: float, config=None) -> int:
    """Parameters of a family student, or of the external one ``config`` names (student ``external``)."""
    from igkd.models import build_model, count_parameters

    if student == "external":
        from igkd.models.external import build_external

        return count_parameters(build_external(config.student_arch, config.student_arch_args, dataset.num_classes,
                                               input_shape=tuple(dataset.train.images.shape[1:])))
    return count_parameters(build_model(student, num_classes=dataset.num_classes, width=width))


def _reference_params(teacher: dict | None, dataset) -> tuple[int, str]:
    """Parameters the compression factor divides: the teacher file's, else the family teacher's."""
    if teacher is not None:
        return teacher["params"], "the teacher file"
    return _student_params("teacher", dataset, 1.0), "the family's MobileNetV2 teacher (no --teacher given)"


def check_inputs(configs: dict, options: StudyOptions, teacher: dict | None, attributions: dict | None) -> None:
    """Fail before any training when a planned run could not start, or the config file sets a key that acts
    on none of the planned runs (:func:`igkd.distill.config.refuse_no_effect`)."""
    from igkd.distill.config import refuse_no_effect

    file_keys = [k for k in options.config_values or {} if k != "recipe"]
    refuse_no_effect(list(configs.values()), {k: "the --config file" for k in file_keys})
    for method, config in configs.items():
        if (config.uses_teacher or config.p > 0) and teacher is None:
            raise IgkdError(f"method {method!r} needs a teacher: pass --teacher CKPT")
        if config.p > 0 and attributions is None:
            raise IgkdError(f"method {method!r} overlays IG maps (p={config.p}): pass --attributions DIR (built by 'igkd attributions compute')")
    if options.agreement is not None:
        if options.agreement < 1:
            raise IgkdError(f"--agreement takes a number of test images (e.g. 500), got {options.agreement}")
        if teacher is None:
            raise IgkdError("--agreement compares each student's IG maps with the teacher's: pass --teacher CKPT")
    if options.robustness is not None:
        from igkd.evaluate.corruptions import parse_corruption_spec

        parse_corruption_spec(options.robustness)


def _plan_entry(run_id: str, method: str, student: str, run: int, seed: int, subset_seed: int, params: int, reference: int) -> dict:
    return {
        "run_id": run_id,
        "method": method,
        "student": student,
        "run": run,
        "seed": seed,
        "subset_seed": subset_seed,
        "params": params,
        "cf": round(reference / params, 2),
    }


def _independent_seed(method: str, run: int) -> int:
    return run + INDEPENDENT_STRIDE * list(METHODS).index(method)


def build_plan(kind: str, methods: list[str], students: list[str], runs: list[int], subset: float, independent: bool, params: dict, reference: int) -> list[dict]:
    """Every run of the study, seed-major: run r of every student and method before run r + 1."""
    plan = []
    for r in runs:
        for student in students:
            for method in methods:
                if kind == "montecarlo":
                    seed = _independent_seed(method, r) if independent else r
                    run_id = f"{method}-r{r}"
                elif kind == "sweep-cf":
                    seed, run_id = r, f"{student}-{method}-s{r}"
                else:
                    seed, run_id = r, f"{method}-s{r}"
                plan.append(_plan_entry(run_id, method, student, r, seed, seed, params[student], reference))
    return plan


def _pairing(kind: str, subset: float, independent: bool) -> tuple[bool, str]:
    if independent:
        return False, "each method's run r has its own seed and subset (r + 1000 x method index): unpaired, Welch's t-test"
    if kind == "montecarlo":
        return True, f"run r of every method uses seed r and the same stratified {subset:g} subset (subset_seed r)"
    if kind == "sweep-cf":
        return True, "for each student, seed r is shared by every method (full training split)"
    return True, "run r of every method uses seed r on the full training split (minus validation)"


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




def add_extras(run_dir: Path, dataset, teacher: dict | None, options: StudyOptions, cache: dict | None = None) -> None:
    """agreement.json / robustness.json for a finished run, unless present with the same settings.

    ``cache``: a dict the caller keeps across the runs of a study (the teacher's IG maps are computed once).
    """
    if options.agreement is not None:
        existing = read_json_object(run_dir / AGREEMENT_FILE) or {}
        if (existing.get("n_requested"), existing.get("n_steps")) != (options.agreement, options.agreement_steps):
            result = measure_agreement(teacher["path"], run_dir, dataset, n=options.agreement, n_steps=options.agreement_steps, device=options.device, cache=cache)
            atomic_write_json(run_dir / AGREEMENT_FILE, result)
    if options.robustness is not None:
        existing = read_json_object(run_dir / ROBUSTNESS_FILE) or {}
        if existing.get("spec") != options.robustness:
            from igkd.devices import resolve_device
            from igkd.models import load_model

            device = resolve_device(options.device)
            model, _ = load_model(run_dir / "model.safetensors", trusted=options.trusted)
            from igkd.evaluate.robustness import evaluate_robustness

            result = evaluate_robustness(model.to(device), dataset, options.robustness, device=device)
            atomic_write_json(run_dir / ROBUSTNESS_FILE, result)


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
    from igkd.distill.run_folder import read_summary

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
        cohort_size=options.cohort_size, progress=options.progress, on_epoch_end=options.on_epoch_end, trusted=options.trusted,
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
    paired, pairing = _pairing(kind, subset, independent)
    new = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "paired": paired,
        "pairing": pairing,
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
    reference, reference_source = _reference_params(teacher, dataset)
    width = all_configs[study["methods"][0]].width
    params = {s: _student_params(s, dataset, width, all_configs[study["methods"][0]]) for s in study["students"]}
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


def one_student(student: str) -> list[str]:
    """The one student of an ablation, Monte Carlo or tune study: a family name, or ``external`` (--student-arch)."""
    if str(student).strip().lower() == "external":
        return ["external"]
    students = parse_students(student)
    if len(students) != 1:
        raise IgkdError(f"this study trains one student, got {', '.join(students)}: use igkd sweep-cf for several")
    return students


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
