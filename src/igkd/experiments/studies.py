"""Studies of many runs (ablation, montecarlo, sweep-cf): a plan of runs, handed to the executor, kept as records.

A study is *a plan of runs -> the executor -> records*, each part in its own module:

- the plan (:mod:`igkd.experiments.plan`): method x seed (x student) runs in seed-major order, paired or not,
  each with the training config :meth:`StudyOptions.config` gives it; what the runs share (data, teacher,
  IG maps) is recorded and checked first (:mod:`igkd.experiments.inputs`);
- the executor (:mod:`igkd.distill.executor`): trains every unfinished run, in cohorts where they fit;
- the records (:mod:`igkd.experiments.study_folder`): study.json, results.csv and the run folders, plus the
  extras measured on each finished run (:mod:`igkd.experiments.extras`).

``igkd tune`` (:mod:`igkd.experiments.tune`) shares all three; its plan is Optuna's sampler.

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

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from igkd.atomic import atomic_write_json, remove_stale_temporaries
from igkd.distill import executor, resolve_config, run_training  # noqa: F401 - tune trains its trials one by one with run_training
from igkd.distill.executor import Run
from igkd.errors import IgkdError
from igkd.experiments.extras import add_extras
from igkd.experiments.inputs import check_inputs, input_records
from igkd.experiments.plan import at_least_one, build_plan, one_student, pairing, parse_methods, parse_students, reference_params, student_params
from igkd.experiments.study_folder import RESULTS_FILE, RUNS_DIR, STUDY_FILE, load_study, open_study, study_lock, study_record, write_results

#: Config keys a study sets per run; a --config file must not set them.
STUDY_KEYS = ("method", "student", "seed", "subset", "subset_seed", "device")


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
    executor: str = "local"  # where cohorts train: this process, or "ray" (a task each, docs/distributed.md)
    ray_address: str | None = None  # the Ray cluster to join (None: RAY_ADDRESS or a new local Ray)
    student_arch: dict | None = None  # an external student: config keys student_arch, student_arch_args, student_normalize
    trusted: object = None  # the factories model files may be rebuilt by (igkd.models.load_model's trusted)

    def config(self, method: str, student: str, seed: int, subset: float = 1.0, subset_seed: int | None = None, **overrides):
        """The training config of one run of the study (``overrides``: a tune trial's values)."""
        values = dict(self.config_values or {})
        clash = [key for key in STUDY_KEYS if key in values]
        if clash:
            raise IgkdError(f"the config file sets {', '.join(clash)}, which a study sets per run: remove it from the file")
        recipe = self.recipe or values.pop("recipe", None) or "paper"
        values.pop("recipe", None)
        return resolve_config(
            yaml_values=values,
            check_unused=False,  # one config file serves every method of the study: check_inputs checks it once
            method=method, recipe=recipe, student=student, seed=seed, subset=subset, subset_seed=subset_seed,
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, val_fraction=self.val_fraction, device=self.device,
            **(self.student_arch or {}), **overrides,
        )

    def say(self, text: str) -> None:
        """A progress line (rich markup), unless ``progress`` is off."""
        if self.progress:
            from rich.console import Console

            Console().print(text, highlight=False)


# -- running ----------------------------------------------------------------------------------------


def _finished(run_dir: Path) -> bool:
    """A run is finished when its summary.json is readable; a damaged one is trained again (it resumes)."""
    from igkd.distill.run_folder import read_summary

    return read_summary(run_dir / "summary.json") is not None


def _execute(study: dict, out: Path, dataset, options: StudyOptions) -> None:
    """Train every unfinished run of the plan (in cohorts, see :mod:`igkd.distill.executor`); finished runs are
    skipped, interrupted ones resume. Extras (agreement, robustness) follow each finished run."""
    teacher, attributions, cache = study.get("teacher"), study.get("attributions"), {}
    write_results(study, out)  # runs finished earlier (a grown plan reorders them)
    runs = []
    for entry in study["plan"]:
        config = options.config(entry["method"], entry["student"], entry["seed"], study["subset"], entry["subset_seed"] if study["subset"] < 1 else None)
        label = f"{entry['method']} {entry['student']} seed {entry['seed']}" + (f" subset {study['subset']:g}/{entry['subset_seed']}" if study["subset"] < 1 else "")
        runs.append(Run(config, out / RUNS_DIR / entry["run_id"], label))
    earlier = [r for r in runs if _finished(r.out)]
    if earlier:
        options.say(f"[dim]study {study['kind']}: {len(earlier)} of {len(runs)} runs finished earlier: skipped[/dim]")

    def finished(cohort: list[Run], _summaries) -> None:
        write_results(study, out)
        for run in cohort:
            add_extras(run.out, dataset, teacher, options, cache)

    for run in earlier:
        add_extras(run.out, dataset, teacher, options, cache)
    execute = executor.pick(options.executor, options.ray_address)
    execute(
        runs, dataset,
        teacher_path=teacher["path"] if teacher else None,
        attributions_dir=attributions["path"] if attributions else None,
        cohort_size=options.cohort_size, progress=options.progress, on_epoch_end=options.on_epoch_end, trusted=options.trusted,
        on_finished=finished, time_left=options.time_left,
        say=lambda text: options.say(f"[bold]study {study['kind']}:[/bold] {text}"),
    )


def refuse_torchrun() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise IgkdError(
            "studies run as one process (tune: one process per worker); torchrun is for a single run: "
            "torchrun --nproc_per_node N -m igkd.cli distill ..."
        )


def _run_study(kind: str, dataset, out, *, methods, students, runs, subset: float = 1.0, independent: bool = False, options: StudyOptions) -> dict:
    refuse_torchrun()
    executor.pick(options.executor, options.ray_address)  # an unknown executor, or Ray missing: refused before anything is written
    out = Path(out)
    if not 0 < subset <= 1:
        raise IgkdError(f"--subset must be in (0, 1], got {subset}")
    if options.teacher is not None and Path(options.teacher).resolve() == out.resolve():
        raise IgkdError("--out must not be the teacher's folder")
    configs = {m: options.config(m, students[0], 0, subset, 0 if subset < 1 else None) for m in methods}
    teacher, attributions = input_records(options, dataset, configs)
    paired, pairing_text = pairing(kind, subset, independent)
    new = study_record(
        kind, paired=paired, pairing=pairing_text, methods=methods, students=students, runs=runs, subset=subset, independent=independent,
        configs=configs, dataset=dataset, teacher=teacher, attributions=attributions, options=options, cohort_size=options.cohort_size,
    )
    study = open_study(out, new)
    all_configs = {m: configs.get(m) or options.config(m, students[0], 0, subset, 0 if subset < 1 else None) for m in study["methods"]}
    check_inputs(all_configs, options, teacher, attributions)
    reference, reference_source = reference_params(teacher, dataset)
    width = all_configs[study["methods"][0]].width
    params = {s: student_params(s, dataset, width, all_configs[study["methods"][0]]) for s in study["students"]}
    study["cf_reference"] = {"params": reference, "source": reference_source}
    study["plan"] = build_plan(kind, study["methods"], study["students"], study["runs"], subset, independent, params, reference)
    out.mkdir(parents=True, exist_ok=True)
    with study_lock(out):
        remove_stale_temporaries(out, (STUDY_FILE, RESULTS_FILE))  # left by a write killed half-way
        atomic_write_json(out / STUDY_FILE, study)
        try:
            _execute(study, out, dataset, options)
        except KeyboardInterrupt:
            options.say("[yellow]study interrupted: run the same command again to continue it (finished runs are kept, the current one resumes)[/yellow]")
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
