"""The CLI commands of igkd.experiments (stats, ablation, montecarlo, sweep-cf, tune, agreement), registered by igkd.cli."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Optional

import typer


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pvalue(value: float | None) -> str:
    return "-" if value is None else f"{value:.2g}"


def _print_summary(summary: dict, width: int | None = None) -> None:
    """Tables that fit an 80-column terminal: method names never wrap (every other column may fold);
    t, df and the raw Wilcoxon p are in ``--json``."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(width=width)
    names = [row["method"] for row in summary["methods"]]
    name_width = max(len(name) for name in names)

    def name_column(table: Table, header: str) -> None:
        table.add_column(header, justify="left", no_wrap=True, min_width=max(name_width, len(header)))

    def number_column(table: Table, header: str) -> None:
        table.add_column(header, justify="right", overflow="fold")

    level = f"{100 * summary['confidence']:g}%"
    methods = Table(title=f"Accuracy per method ({level} t-interval of the mean)", box=box.SIMPLE_HEAD)
    name_column(methods, "method")
    for column in ("n", "mean", "sd", "min", "max", f"{level} CI"):
        number_column(methods, column)
    for row in summary["methods"]:
        methods.add_row(
            row["method"], str(row["n"]), _number(row["mean"]), _number(row["sd"]), _number(row["min"]), _number(row["max"]),
            f"{_number(row['ci_low'])}..{_number(row['ci_high'])}",
        )
    console.print(methods)
    console.print(f"[bold]{'paired' if summary['paired'] else 'unpaired'}[/bold]: {summary['pairing']}")
    console.print(f"test: {summary['test']}; effect size: {summary['effect_size']}")
    paired = summary["paired"]
    effect = "d_z" if paired else "g"
    for family in ("vs_baseline", "all_pairs"):
        comparisons = summary[family]
        if not comparisons:
            continue
        table = Table(title=f"{family}: b - a, Holm over {summary['holm_families'][family]}", box=box.SIMPLE_HEAD, collapse_padding=True)
        with_a = family == "all_pairs"  # vs_baseline: a is always the baseline
        if with_a:
            name_column(table, "a")
        name_column(table, "b")
        for column in ["b - a", f"{level} CI", "p", "p Holm", effect] + (["W p Holm"] if paired else []):
            number_column(table, column)
        for c in comparisons:
            cells = ([c["a"]] if with_a else []) + [
                c["b"], _number(c["mean_difference"]), f"{_number(c['ci_low'])}..{_number(c['ci_high'])}",
                _pvalue(c["p"]), _pvalue(c["p_holm"]), _number(c["effect_size"]["value"], 2),
            ]
            if paired:
                cells.append(_pvalue(c["wilcoxon"]["p_holm"]))
            table.add_row(*cells)
        console.print(table)
    console.print("t, df" + (" and the Wilcoxon p before Holm" if paired else "") + ": igkd stats --json")
    notes = {c.get("reason") for c in summary["all_pairs"]} | {c.get("wilcoxon", {}).get("reason") for c in summary["all_pairs"]}
    for note in sorted(n for n in notes if n):
        console.print(f"note: some tests gave no p-value: {note}")


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the top-level app."""

    @app.command("stats")
    def stats_command(
        csv_path: Optional[Path] = typer.Option(None, "--csv", help="CSV with header method,run,accuracy; optional seed/subset_seed columns declare pairing (other columns ignored)."),
        study: Optional[Path] = typer.Option(None, "--study", help="A study folder (ablation, montecarlo, sweep-cf) instead of a CSV."),
        student: Optional[str] = typer.Option(None, help="With --study: the student to summarise (needed for a sweep of several)."),
        baseline: str = typer.Option("student", help="Method the others are compared with (case-insensitive)."),
        paired: Optional[bool] = typer.Option(
            None,
            "--paired/--unpaired",
            help="Runs with the same id share seed and subset (paired t-test, Wilcoxon) or not (Welch). "
            "Default for a CSV: unpaired, unless its seed/subset_seed column(s) agree across methods for every run id "
            "(equal run ids alone are not pairs). A --study records this itself.",
        ),
        confidence: float = typer.Option(0.95, help="Confidence level of the intervals."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    ) -> None:
        """Summarise Monte Carlo accuracies per method and test the differences between methods."""
        from igkd.errors import IgkdError
        from igkd.experiments.statistics import read_accuracy_csv, read_pairing_keys, summarize

        if (csv_path is None) == (study is None):
            raise IgkdError("give either --csv FILE or --study FOLDER")
        if study is not None:
            from igkd.experiments.studies import study_statistics

            if paired is not None:
                raise IgkdError("a study records whether its runs are paired (study.json 'paired'): drop --paired/--unpaired")
            summary = study_statistics(study, baseline=baseline, student=student, confidence=confidence)
        else:
            if student is not None:
                raise IgkdError("--student applies to --study only")
            rows = read_accuracy_csv(csv_path)
            summary = summarize(rows, baseline=baseline, paired=paired, confidence=confidence, pairing_keys=read_pairing_keys(csv_path))
        if as_json:
            print(json.dumps(summary, indent=2))
        else:
            if study is not None:
                notes = summary["study"]
                print(f"study {notes['path']} ({notes['kind']}, {notes['student']}): {notes['runs_used']} of {notes['runs_planned']} runs"
                      + (f"; left out (not finished by every method): {', '.join(notes['runs_dropped'])}" if notes["runs_dropped"] else ""))
            _print_summary(summary)

    _register_studies(app)


# -- studies ------------------------------------------------------------------------------------------

DATASET_HELP = "Dataset name: digits (offline), cifar10, folder, imagenet32-cifar."


COHORT_HELP = (
    "Train up to N runs at once as one fused network (docs/training.md); 1 = run by run. "
    "Default: 1 on the CPU, as many as fit on a GPU."
)


EXECUTOR_HELP = "local (this process) or ray (each cohort a Ray task on a cluster; the --out folder on storage every node sees: docs/distributed.md)."
RAY_ADDRESS_HELP = "With --executor ray: the cluster to join, e.g. auto or 10.0.0.1:6379 (default: RAY_ADDRESS, else a new local Ray)."


#: The options every study command takes after its own: (parameter, type, typer.Option's default and flags, help).
#: :func:`_study_command` adds them and gathers them into one StudyOptions; a command may word a help its own way.
STUDY_OPTIONS = (
    ("teacher", Optional[Path], (None,), "Teacher model file or run folder."),
    ("attributions", Optional[Path], (None,), "IG cache folder (needed by ig methods)."),
    ("data_dir", Optional[Path], (None,), "Dataset folder or archive."),
    ("recipe", Optional[str], (None,), "paper (default) or improved."),
    ("config", Optional[Path], (None,), "YAML file of training config keys."),
    ("epochs", Optional[int], (None,), None),
    ("batch_size", Optional[int], (None,), None),
    ("lr", Optional[float], (None,), None),
    ("val_fraction", Optional[float], (None,), None),
    ("device", str, ("auto",), None),
    ("agreement", Optional[int], (None,), "Also measure IG agreement with the teacher on N test images."),
    ("robustness", Optional[str], (None,), "Also evaluate each run under corruptions."),
    ("cohort_size", Optional[int], (None, "--cohort-size"), COHORT_HELP),
    ("executor", str, ("local",), EXECUTOR_HELP),
    ("ray_address", Optional[str], (None, "--ray-address"), RAY_ADDRESS_HELP),
    ("as_json", bool, (False, "--json"), "Print the study as JSON only."),
)

#: The options of a study whose student may be the user's own network (ablation, montecarlo, tune; docs/own-networks.md).
ARCH_OPTIONS = (
    ("student_arch", Optional[str], (None, "--student-arch"), "An external student: package.module:factory (docs/own-networks.md)."),
    ("student_arch_args", Optional[str], (None, "--student-arch-args"), "Keyword arguments of the factory: key=value,... or a .yaml/.json file."),
    ("student_normalize", Optional[str], (None, "--student-normalize"), "dataset, model or MEAN/STD (external student)."),
    ("teacher_arch", Optional[str], (None, "--teacher-arch"), "The factory of an external teacher file."),
    ("trust_arch", bool, (False, "--trust-arch"), "Rebuild external models from the factories their files name."),
)


def _study_command(app: typer.Typer, name: str, arch: bool = False, **helps: str):
    """Register the decorated function as ``igkd NAME`` with its own options followed by :data:`STUDY_OPTIONS`
    (and :data:`ARCH_OPTIONS` when ``arch``: its ``student`` may then become ``external``; ``helps``: this command's
    wording of some of their helps). It is called with its own options and, by keyword, ``options`` (the
    StudyOptions they make, checked before the data is loaded), ``data_dir`` and ``as_json``."""
    unknown = set(helps) - {key for key, *_ in STUDY_OPTIONS}
    if unknown:
        raise TypeError(f"no study option {', '.join(sorted(unknown))}")

    def register(command):
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.kind is not p.KEYWORD_ONLY]
        shared = [
            inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, annotation=kind, default=typer.Option(*option, help=helps.get(key, text)))
            for key, kind, option, text in STUDY_OPTIONS + (ARCH_OPTIONS if arch else ())
        ]

        def run(**values) -> None:
            given = {key: values.pop(key) for key, *_ in STUDY_OPTIONS}
            if arch:
                given["arch"], given["trusted"], values["student"] = _arch(**{key: values.pop(key) for key, *_ in ARCH_OPTIONS}, student=values["student"])
            data_dir, as_json = given.pop("data_dir"), given.pop("as_json")
            command(**values, options=_study_options(**given, progress=not as_json), data_dir=data_dir, as_json=as_json)

        run.__signature__ = inspect.Signature(own + shared)
        run.__doc__ = command.__doc__
        app.command(name)(run)
        return command

    return register


def _study_options(*, config, cohort_size, device, executor, ray_address, arch=None, trusted=None, **values):
    from igkd.devices import parse_device
    from igkd.distill.config import load_yaml
    from igkd.distill.executor import check_cohort_size, pick
    from igkd.experiments.studies import StudyOptions

    parse_device(device)  # before the dataset is loaded
    pick(executor, ray_address)
    return StudyOptions(config_values=load_yaml(config) if config else None, device=device, cohort_size=check_cohort_size(cohort_size),
                        executor=executor, ray_address=ray_address, student_arch=arch or None, trusted=trusted, **values)


def _arch(student_arch, student_arch_args, student_normalize, teacher_arch, trust_arch, student: str) -> tuple[dict, object, str]:
    """(config keys of an external student, the factories model files may be rebuilt by, the study's student)."""
    from igkd.errors import IgkdError
    from igkd.models import arch_options

    if student_arch is not None and student != "k5":
        raise IgkdError(f"give the student once: --student {student} (the family) or --student-arch {student_arch}, not both")
    arch = arch_options.arch_config(student_arch, student_arch_args, student_normalize)
    return arch, arch_options.trusted(student_arch, teacher_arch, trust=trust_arch), "external" if student_arch else student


def _print_study(study: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(study, indent=2, default=str))
        return
    from collections import defaultdict

    from rich.console import Console
    from rich.table import Table

    groups: dict = defaultdict(list)
    for run in study["runs"]:
        groups[(run["student"], run["method"])].append(run)
    table = Table(title=f"{study['kind']} study {study['path']} ({'paired' if study['paired'] else 'unpaired'} runs)")
    for column in ("student", "params", "CF", "method", "finished", "test acc mean", "val acc mean"):
        table.add_column(column, justify="left" if column in ("student", "method") else "right")
    for (student, method), runs in groups.items():
        done = [r["summary"] for r in runs if r["summary"]]
        mean = lambda key: f"{sum(s[key] for s in done) / len(done):.2f}" if done and all(s.get(key) is not None for s in done) else "-"  # noqa: E731
        table.add_row(student, f"{runs[0]['params']:,}", f"{runs[0]['cf']:g}", method, f"{len(done)}/{len(runs)}", mean("test_accuracy"), mean("val_accuracy"))
    console = Console()
    console.print(table)
    console.print(f"per-run results: {study['path']}/results.csv; statistics: igkd stats --study {study['path']}")


def _print_tune(study: dict, as_json: bool) -> None:
    result = study.get("tune_result") or {}
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    best = result.get("best")
    counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(result.get("counts", {}).items()))
    print(f"tune study {result.get('study_name')}: {counts or 'no trials'} (aim: {result.get('target_trials')} complete)")
    if best:
        shown = ", ".join(f"{'T' if k == 'temperature' else k}={v:g}" for k, v in best["params"].items())
        print(f"best by validation accuracy: trial {best['number']} {shown}: val {best['val_accuracy']:.2f}% ({best['run_dir']})")
    print(f"all trials: {study['path']}/tune.json")


def _register_studies(app: typer.Typer) -> None:
    @_study_command(
        app, "ablation", arch=True,
        teacher="Teacher model file or run folder (needed by kd/ig/at methods).",
        attributions="IG cache folder from 'igkd attributions compute' (needed by ig methods).",
        config="YAML file of training config keys (not method/seed/student/subset).",
        val_fraction="Part of train held out for validation (default 0.1).",
        agreement="Also measure IG agreement with the teacher on N test images (agreement.json per run).",
        robustness="Also evaluate each run under corruptions, e.g. all (robustness.json per run).",
    )
    def ablation_command(
        dataset: str = typer.Option(..., help=DATASET_HELP),
        out: Path = typer.Option(..., help="Study folder (created; re-run the same command to continue it)."),
        methods: str = typer.Option("paper", help="paper (its 8 methods: student,kd,ig,kd_ig,at,kd_at,ig_at,kd_ig_at), all (every method but kd_saliency, which needs a saliency cache: run it by name in a study of its own), or a comma-separated list (igkd methods)."),
        seeds: int = typer.Option(5, help="Seeds 0..N-1 for every method (run r of each method shares seed r: paired)."),
        student: str = typer.Option("k5", help="Student k3 ... k17."),
        *, options, data_dir, as_json,
    ) -> None:
        """Train every method with seeds 0..N-1 on the full training split (paired by seed)."""
        from igkd.data import load_dataset
        from igkd.experiments.studies import run_ablation

        study = run_ablation(load_dataset(dataset, data_dir, progress=not as_json), out, methods=methods, seeds=seeds, student=student, options=options)
        _print_study(study, as_json)

    @_study_command(app, "montecarlo", arch=True)
    def montecarlo_command(
        dataset: str = typer.Option(..., help=DATASET_HELP),
        out: Path = typer.Option(..., help="Study folder (created; re-run the same command to continue it)."),
        methods: str = typer.Option("paper", help="paper (its 8 methods), all (every method but kd_saliency, which needs a saliency cache: run it by name in a study of its own), or a comma-separated list of methods."),
        runs: int = typer.Option(10, help="Runs 0..N-1: run r of every method uses seed r and the same subset (paired)."),
        subset: float = typer.Option(0.8, help="Stratified fraction of the training split (minus validation) per run."),
        independent: bool = typer.Option(False, "--independent", help="Draw seed and subset per method and run (the published, unpaired design; Welch)."),
        student: str = typer.Option("k5", help="Student k3 ... k17."),
        *, options, data_dir, as_json,
    ) -> None:
        """Monte Carlo: every method on N random stratified subsets, run r of each method on the same subset."""
        from igkd.data import load_dataset
        from igkd.experiments.studies import run_montecarlo

        study = run_montecarlo(
            load_dataset(dataset, data_dir, progress=not as_json), out, methods=methods, runs=runs, subset=subset, independent=independent,
            student=student, options=options,
        )
        _print_study(study, as_json)

    @_study_command(app, "sweep-cf", teacher="Teacher model file (also the reference of the compression factor).")
    def sweep_command(
        dataset: str = typer.Option(..., help=DATASET_HELP),
        out: Path = typer.Option(..., help="Study folder (created; re-run the same command to continue it)."),
        students: str = typer.Option("all", help="all, or a comma-separated list such as k3,k5,k9,k17."),
        methods: str = typer.Option("student,kd_ig", help="Comma-separated methods, or all (every method but kd_saliency, which needs a saliency cache: run it by name in a study of its own)."),
        seeds: int = typer.Option(1, help="Seeds 0..N-1 per student and method."),
        *, options, data_dir, as_json,
    ) -> None:
        """Accuracy against compression factor: every student x method x seed (params and CF recorded)."""
        from igkd.data import load_dataset
        from igkd.experiments.studies import run_sweep

        study = run_sweep(load_dataset(dataset, data_dir, progress=not as_json), out, students=students, methods=methods, seeds=seeds, options=options)
        _print_study(study, as_json)

    @_study_command(
        app, "tune", arch=True,
        attributions="IG cache folder (needed when p > 0).",
        val_fraction="Validation part of train: the objective (default 0.1).",
        robustness="Also evaluate each trial under corruptions.",
        cohort_size=COHORT_HELP + " (grid sampler only)",
        as_json="Print tune.json only.",
    )
    def tune_command(
        dataset: str = typer.Option(..., help=DATASET_HELP),
        out: Path = typer.Option(..., help="Study folder: study.json, tune.json, runs/trial-<n>/ (and optuna.db by default)."),
        params: Optional[str] = typer.Option(None, help="Hyper-parameters to tune: any of T,alpha,p,gamma (others keep the method's values)."),
        method: str = typer.Option("kd_ig_at", help="The method whose hyper-parameters are tuned."),
        sampler: str = typer.Option("grid", help="grid (every combination) or tpe (Optuna TPE, seeded)."),
        trials: Optional[int] = typer.Option(None, help="Completed trials to aim at, all workers together (grid: default the whole grid; tpe: required)."),
        grid_file: Optional[Path] = typer.Option(None, help="YAML: param -> list of values (or {low, high, log} for tpe)."),
        storage: Optional[str] = typer.Option(None, help="Optuna storage URL shared by workers (default: sqlite:///OUT/optuna.db)."),
        study_name: Optional[str] = typer.Option(None, help="Optuna study name (default: igkd-tune-<method>-<sampler>-<params>)."),
        seed: int = typer.Option(0, help="Training seed of every trial."),
        sampler_seed: Optional[int] = typer.Option(None, help="Sampler seed (default: --seed); give each TPE worker its own."),
        heartbeat: Optional[int] = typer.Option(None, help="Seconds between this worker's heartbeats (default 60); a trial silent for 3x that is a killed worker's and is retried from its checkpoint."),
        student: str = typer.Option("k5", help="Student k3 ... k17."),
        *, options, data_dir, as_json,
    ) -> None:
        """Tune T, alpha, p, gamma on validation accuracy with Optuna; run it in several shells/machines to add workers."""
        from igkd.data import load_dataset
        from igkd.experiments.tune import run_tune

        study = run_tune(
            load_dataset(dataset, data_dir, progress=not as_json), out, method=method, params=params, sampler=sampler, trials=trials,
            grid_file=grid_file, storage=storage, study_name=study_name, seed=seed, sampler_seed=sampler_seed, student=student, heartbeat=heartbeat, options=options,
        )
        _print_tune(study, as_json)

    @app.command("agreement")
    def agreement_command(
        teacher: Path = typer.Option(..., help="Teacher model file or run folder."),
        student: Path = typer.Option(..., help="Student model file or run folder."),
        dataset: str = typer.Option(..., help=DATASET_HELP),
        data_dir: Optional[Path] = typer.Option(None, help="Dataset folder or archive."),
        n: int = typer.Option(500, help="Test images (stratified by class, seeded)."),
        steps: int = typer.Option(32, help="Integrated-gradients steps."),
        seed: int = typer.Option(0, help="Seed of the image sample."),
        device: str = typer.Option("auto"),
        out: Optional[Path] = typer.Option(None, help="Also write the result to this JSON file."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    ) -> None:
        """How well the student's IG maps agree with the teacher's: Spearman rho and top-10% pixel overlap."""
        from igkd.atomic import atomic_write_json
        from igkd.data import load_dataset
        from igkd.experiments.agreement import measure_agreement

        result = measure_agreement(teacher, student, load_dataset(dataset, data_dir, progress=not as_json), n=n, n_steps=steps, seed=seed, device=device)
        if out is not None:
            atomic_write_json(out, result)
        if as_json:
            print(json.dumps(result, indent=2))
            return
        rho, top = result["spearman"], result["top_overlap"]
        sd = lambda part: "-" if part["sd"] is None else f"{part['sd']:.3f}"  # noqa: E731
        print(f"IG agreement of {result['student']['path']} with {result['teacher']['path']} on {result['n']} {result['dataset']['name']} test images ({result['n_steps']} steps):")
        print(f"  Spearman rho    {rho['mean']:.3f} (sd {sd(rho)}, {rho['n']} images)")
        print(f"  top-10% overlap {top['mean']:.3f} (sd {sd(top)}, {top['n']} images)")
