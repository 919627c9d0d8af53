"""``igkd reproduce``: the paper's CIFAR-10 experiments as one resumable command, sized for short GPU jobs.

Stages, in order of value (each resumable, skipped when done)::

    1 teacher     MobileNetV2-CIFAR, our fast recipe (or --teacher CKPT)
    2 ig          IG maps of every training image (50 Gauss-Legendre steps, true label, black baseline)
    3 ablation    8 methods x 5 paired seeds, k5, paper recipe (seed 0 of every method first)
    4 montecarlo  8 methods x 10 paired runs on stratified 80% subsets
    5 sweep       student and kd_ig for k3 ... k17, 3 seeds
    6 report      latency of teacher and students on the device, report, paper-vs-ours tables

``--budget`` is wall time. Training stops at an epoch boundary (IG at a chunk boundary) when
the next one would not finish in what is left (the last ones' durations, with a margin), with
the one line "stopped at stage N ...: resume with the same command". Every stage continues
from its checkpoints, so the next job loses at most the epoch in flight. ``--pack`` writes what
is small (summaries, metrics, tables, report, the teacher's weights, one student per method,
an interrupted run's checkpoint) into one archive under 16 MiB; ``--unpack`` restores it so
that the next job, on another machine, continues. The IG maps are rebuilt there, not packed.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from igkd.atomic import atomic_write_json, atomic_write_text, load_json, read_json_object
from igkd.distill.config import PAPER_METHODS
from igkd.errors import IgkdError
from igkd.experiments.pack import STATE_FILE, export_results, pack, unpack

STAGES = ("teacher", "ig", "ablation", "montecarlo", "sweep", "report")
STATE_FORMAT = "igkd-reproduce"
PRECISION_FILE = "precision.json"


class BudgetSpent(Exception):
    """The next unit of work would not finish inside ``--budget``."""


PROFILES = ("paper", "cpu")


@dataclass
class Settings:
    """What each stage trains, by profile: ``paper`` (the paper's scale, for a GPU), ``cpu`` (the same
    stages sized for two CPU cores in under 2 hours, docs/results/cpu), each also ``quick`` (every stage
    tiny, seconds on a CPU: checks the path, no result)."""

    dataset: str
    teacher: dict
    ig_steps: int
    student: str
    student_overrides: dict
    ablation_seeds: int
    mc_methods: str
    mc_runs: int
    mc_subset: float
    sweep_students: str
    sweep_methods: str
    sweep_seeds: int
    latency_batch_sizes: tuple[int, ...]
    latency_repeats: int
    per_class: tuple[int, int] | None = None  # (train, test) images kept per class; None = all
    margin: float = 1.3  # an epoch is expected to take up to this times the last one
    profile: str = "paper"
    ablation_methods: str = ",".join(PAPER_METHODS)
    student_recipe: str = "paper"
    students_per_class: int | None = None  # students (and so the IG maps) use the first N training images per class; the teacher all
    choose_cpu_bf16: bool = False  # on a CPU, time bf16 against fp32 before the students train (igkd.distill.precision)

    @classmethod
    def of(cls, profile: str, dataset: str, quick: bool) -> "Settings":
        if profile not in PROFILES:
            raise IgkdError(f"unknown --profile {profile!r}: use {' or '.join(PROFILES)}")
        if profile == "cpu":
            return cls.cpu_quick(dataset) if quick else cls.cpu(dataset)
        return cls.quick(dataset) if quick else cls.full(dataset)

    # The two profiles (cpu, full) list every setting, one a line, so that each reads as a table of what it trains:
    # their repeated shape is that table's. A quick variant says only what it changes (dataclasses.replace).

    @classmethod
    def cpu(cls, dataset: str) -> "Settings":
        """Two CPU cores, under 2 hours (measured speeds and the arithmetic: docs/results/cpu/README.md)."""
        common = {"batch_size": 64, "lr": 0.05, "width": 0.5, "val_fraction": 0.0, "bn_recalibration_images": 5000}
        return cls(
            dataset=dataset,
            profile="cpu",
            teacher={**common, "epochs": 8},  # all 50,000 training images, the teacher recipe (SGD + Nesterov, cosine, smoothing)
            ig_steps=8,
            student="k5",
            student_overrides={**common, "epochs": 6},
            student_recipe="improved",
            students_per_class=1000,
            ablation_methods="student,kd,ig,kd_ig,kd_shuffled",
            ablation_seeds=3,
            mc_methods="",
            mc_runs=0,
            mc_subset=0.8,
            sweep_students="",
            sweep_methods="",
            sweep_seeds=0,
            latency_batch_sizes=(1, 64),
            latency_repeats=50,
            choose_cpu_bf16=True,
        )

    @classmethod
    def cpu_quick(cls, dataset: str) -> "Settings":
        """The cpu profile's path (teacher on all, students on a per-class subset, five methods, bf16 probe), tiny."""
        return dataclasses.replace(
            cls.cpu(dataset), teacher={"epochs": 2, "batch_size": 64, "lr": 0.05, "width": 0.25, "val_fraction": 0.0, "bn_recalibration_images": 200},
            ig_steps=2, student="k17", student_overrides={"epochs": 1, "batch_size": 64, "width": 0.25, "val_fraction": 0.0, "bn_recalibration_images": 200},
            per_class=(24, 8), students_per_class=12, ablation_seeds=2, latency_batch_sizes=(1,), latency_repeats=20,
        )

    @classmethod
    def full(cls, dataset: str) -> "Settings":
        """The paper's scale, for a GPU."""
        return cls(
            dataset=dataset,
            # Ours, not the paper's: SGD + Nesterov, warm-up + cosine, label smoothing, batch 256, bf16 on GPU.
            teacher={"epochs": 40, "batch_size": 256, "lr": 0.2},
            ig_steps=50,
            student="k5",
            student_overrides={},
            ablation_seeds=5,
            mc_methods=",".join(PAPER_METHODS),
            mc_runs=10,
            mc_subset=0.8,
            sweep_students="all",
            sweep_methods="student,kd_ig",
            sweep_seeds=3,
            latency_batch_sizes=(1, 64),
            latency_repeats=50,
        )

    @classmethod
    def quick(cls, dataset: str) -> "Settings":
        """The paper profile's path (every stage, two methods where the paper has eight), tiny."""
        return dataclasses.replace(
            cls.full(dataset), teacher={"epochs": 2, "batch_size": 64, "lr": 0.05, "width": 0.25}, ig_steps=2,
            student="k17", student_overrides={"epochs": 1, "batch_size": 128, "width": 0.25}, ablation_seeds=1,
            mc_methods="student,kd_ig", mc_runs=2, sweep_students="k17", sweep_seeds=1, latency_batch_sizes=(1,), latency_repeats=20,
            per_class=(24, 8),  # MobileNetV2 at 32x32 runs at ~100 images/s on a 2-core CPU even at width 0.25
        )


@dataclass
class Budget:
    """Wall-time budget: ``check(seconds)`` raises :class:`BudgetSpent` if that much is not left."""

    seconds: float | None
    started: float = field(default_factory=time.perf_counter)
    last_epoch_s: dict = field(default_factory=dict)  # stage -> seconds of its latest epoch or chunk

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - (time.perf_counter() - self.started)

    def check(self, stage: str, needed: float) -> None:
        if needed > self.left():
            raise BudgetSpent(stage)


def parse_budget(text: str | None) -> float | None:
    """``25m``, ``90s``, ``1.5h`` or plain seconds -> seconds; None for no budget."""
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600}
    value, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(value) * units[unit]
    except ValueError:
        raise IgkdError(f"--budget {text!r} is not a duration: use e.g. 25m, 90s or 1.5h") from None
    if not 0 < seconds < float("inf"):  # also refuses nan, which would be a budget that never runs out
        raise IgkdError(f"--budget must be a positive, finite duration (e.g. 25m, 90s or 1.5h), got {text!r}")
    return seconds


def parse_stages(text: str | None) -> list[str]:
    """``1,2,3`` or names (``teacher,ig``) or ranges (``1-3``); None (no --stages) = all.

    An empty text, a number outside 1-N and a range outside it or reversed (``3-1``) are refused, so
    that no --stages value runs every stage or none of them by mistake.
    """
    if text is None:
        return list(STAGES)
    valid = f"use numbers 1-{len(STAGES)}, ranges such as 2-4, or names {', '.join(STAGES)}"
    items = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not items:
        raise IgkdError(f"--stages {text!r} names no stage: {valid} (leave --stages out to run them all)")
    chosen = []
    for item in items:
        if "-" in item and all(part.isdigit() for part in item.split("-", 1)):
            low, high = (int(part) for part in item.split("-", 1))
            if not 1 <= low <= high <= len(STAGES):
                raise IgkdError(f"stage range {item!r} is not an increasing range within 1-{len(STAGES)}: {valid}")
            chosen += STAGES[low - 1 : high]
        elif item.isdigit() and 1 <= int(item) <= len(STAGES):
            chosen.append(STAGES[int(item) - 1])
        elif item in STAGES:
            chosen.append(item)
        else:
            raise IgkdError(f"unknown stage {item!r}: {valid}")
    return [s for s in STAGES if s in chosen]


class Reproduction:
    """The stages of one reproduction folder."""

    def __init__(
        self, out: Path, settings: Settings, data, *, data_dir, device: str, budget: Budget, teacher: Path | None, progress: bool, cohort_size: int | None = None,
        executor: str = "local", ray_address: str | None = None,
    ):
        self.out, self.settings, self.data, self.data_dir, self.cohort_size = out, settings, data, data_dir, cohort_size
        self.executor, self.ray_address = executor, ray_address  # where the studies' runs train (the teacher and IG maps: here)
        self.device, self.budget, self.teacher_given, self.progress = device, budget, teacher, progress
        self.times: dict[str, float] = {}
        # the teacher trains on all training images; the students (and so the IG maps) on the first N per class
        self.student_data = data if settings.students_per_class is None else first_per_class(data, settings.students_per_class, None)

    # -- budget hooks ----------------------------------------------------------------------
    def _epoch_hook(self, stage: str):
        def on_epoch_end(epoch: int, record: dict) -> None:
            seconds = float(record.get("epoch_time_s") or 0.0)
            self.budget.last_epoch_s[stage] = seconds
            self.budget.check(stage, self.settings.margin * seconds + 1.0)

        return on_epoch_end

    def _chunk_hook(self, stage: str):
        state = {"tick": time.perf_counter()}

        def on_chunk(done: int, total: int) -> None:
            now = time.perf_counter()
            seconds, state["tick"] = now - state["tick"], now
            self.budget.last_epoch_s[stage] = seconds
            if done < total:
                self.budget.check(stage, self.settings.margin * seconds + 1.0)

        return on_chunk

    # -- stages ------------------------------------------------------------------------------
    @property
    def teacher_path(self) -> Path:
        return Path(self.teacher_given) if self.teacher_given else self.out / "teacher" / "model.safetensors"

    def teacher(self) -> dict:
        if self.teacher_given:
            return {"teacher": str(self.teacher_given), "trained": False}
        from igkd.distill import resolve_config, run_training

        config = resolve_config("student", "teacher", student="teacher", device=self.device, **self.settings.teacher)
        summary = run_training(config, self.data, self.out / "teacher", resume=True, progress=self.progress, on_epoch_end=self._epoch_hook("teacher"))
        return {"test_accuracy": summary["test_accuracy"], "epochs": summary["epochs"]}

    def ig(self) -> dict:
        from igkd.attribution import compute_attributions
        from igkd.distill.run import load_teacher

        model, info = load_teacher(self.teacher_path)
        # A restored pack holds the manifest (or a build's progress) but never the maps: then they are built again.
        rebuild = not any((self.out / "ig" / name).exists() for name in ("maps.npy", "maps.partial.npy"))
        cache = compute_attributions(model, self.student_data, self.out / "ig", n_steps=self.settings.ig_steps, baseline="black", target="label",
                                     device=self.device, teacher_sha256=info["sha256"], progress=self.progress, on_chunk=self._chunk_hook("ig"),
                                     force=rebuild)
        return {"images": cache.manifest["n"], "steps": self.settings.ig_steps, "precision": cache.manifest.get("precision"),
                "images_per_s": cache.manifest.get("images_per_s"), "completeness": cache.manifest.get("completeness")}

    def precision(self) -> dict | None:
        """The students' ``cpu_bf16`` (``out/precision.json``): measured once on the first student stage, then
        read back, so that every run of the reproduction, resumed or not, trains with the same choice."""
        from igkd.devices import resolve_device

        if not self.settings.choose_cpu_bf16 or resolve_device(self.device).type != "cpu":
            return None
        path = self.out / PRECISION_FILE
        found = read_json_object(path)
        if found is not None:
            return found
        from igkd.distill import resolve_config
        from igkd.distill.precision import bf16_effect, choose_cpu_bf16
        from igkd.distill.run import load_teacher
        from igkd.models import build_model

        teacher, _ = load_teacher(self.teacher_path)
        overrides = self.settings.student_overrides
        student = build_model(self.settings.student, num_classes=self.data.num_classes, width=overrides.get("width", 1.0))
        choice = choose_cpu_bf16(teacher, student, batch_size=overrides.get("batch_size", 64), image_size=tuple(self.data.test.images.shape[-2:]))
        temperature = resolve_config("kd").temperature
        choice["teacher_test"] = bf16_effect(teacher, self.data.test.images, self.data.test.labels, temperature=temperature)
        atomic_write_json(path, choice)
        return choice

    def _options(self, stage: str):
        from igkd.experiments.studies import StudyOptions

        overrides = dict(self.settings.student_overrides)
        precision = self.precision()
        if precision is not None:
            overrides["cpu_bf16"] = precision["cpu_bf16"]
        return StudyOptions(
            teacher=self.teacher_path, attributions=self.out / "ig", recipe=self.settings.student_recipe, device=self.device, progress=self.progress,
            epochs=overrides.pop("epochs", None), batch_size=overrides.pop("batch_size", None), lr=overrides.pop("lr", None),
            config_values=overrides or None, on_epoch_end=self._epoch_hook(stage),
            cohort_size=self.cohort_size, time_left=self.budget.left if self.budget.seconds is not None else None,
            executor=self.executor, ray_address=self.ray_address,
        )

    def ablation(self) -> dict:
        from igkd.experiments.studies import run_ablation

        study = run_ablation(self.student_data, self.out / "ablation", methods=self.settings.ablation_methods, seeds=self.settings.ablation_seeds,
                             student=self.settings.student, options=self._options("ablation"))
        return _finished(study)

    def montecarlo(self) -> dict:
        from igkd.experiments.studies import run_montecarlo

        if not self.settings.mc_runs:
            return {"skipped": f"not part of the {self.settings.profile} profile"}
        study = run_montecarlo(self.student_data, self.out / "montecarlo", methods=self.settings.mc_methods, runs=self.settings.mc_runs, subset=self.settings.mc_subset,
                               student=self.settings.student, options=self._options("montecarlo"))
        return _finished(study)

    def sweep(self) -> dict:
        from igkd.experiments.studies import run_sweep

        if not self.settings.sweep_students:
            return {"skipped": f"not part of the {self.settings.profile} profile"}
        study = run_sweep(self.student_data, self.out / "sweep", students=self.settings.sweep_students, methods=self.settings.sweep_methods,
                          seeds=self.settings.sweep_seeds, options=self._options("sweep"))
        return _finished(study)

    def report(self) -> dict:
        from igkd.deploy.latency import benchmark_latency
        from igkd.experiments.paper_vs_ours import paper_tables
        from igkd.models import load_model
        from igkd.report.build import build_report

        self.budget.check("report", 30.0)
        entries = [(load_model(self.teacher_path)[0], str(self.teacher_path))]
        for path in _latency_students(self.out):
            entries.append((load_model(path)[0], str(path)))
        latency = benchmark_latency(entries, batch_sizes=self.settings.latency_batch_sizes, backends=("eager",), device=self.device,
                                    repeats=self.settings.latency_repeats)
        atomic_write_json(self.out / "latency.json", latency)
        studies = [self.out / name for name in ("ablation", "montecarlo", "sweep") if (self.out / name / "study.json").exists()]
        if studies:
            build_report(studies, self.out / "report", data_dir=self.data_dir, latency=self.out / "latency.json", device=self.device, dataset=self.student_data)
        tables = paper_tables(self.out, self.settings)
        atomic_write_text(self.out / "paper-vs-ours.md", tables)
        return {"models_timed": len(entries), "studies_reported": len(studies)}


def _finished(study: dict) -> dict:
    runs = study["runs"]
    return {"runs_finished": sum(r["status"] == "finished" for r in runs), "runs_planned": len(runs)}


def _latency_students(out: Path) -> list[Path]:
    """One trained model per student size: the sweep's plain students (seed 0), else the ablation's."""
    found: dict[str, Path] = {}
    for study in ("sweep", "ablation"):
        for summary_path in sorted((out / study / "runs").glob("*/summary.json")) if (out / study / "runs").is_dir() else []:
            summary = read_json_object(summary_path)
            model = summary_path.parent / "model.safetensors"
            if summary and summary.get("method") == "student" and summary.get("seed") == 0 and model.exists():
                found.setdefault(summary["student"], model)
    return [found[k] for k in sorted(found, key=lambda name: int(name[1:]))]


# -- running -------------------------------------------------------------------------------------


def run_reproduce(
    out: Path, *, dataset: str = "folder", data_dir=None, budget: str | None = None, stages: str | None = None, quick: bool = False,
    teacher: Path | None = None, device: str = "auto", results: Path | None = None, progress: bool = True, cohort_size: int | None = None,
    profile: str = "paper", seeds: int | None = None, executor: str = "local", ray_address: str | None = None,
) -> dict:
    """Run the chosen stages in order until done or out of budget; returns the state (also ``out/reproduce.json``).

    ``seeds`` (default: the profile's) is the ablation's number of paired seeds; a larger number on a finished
    reproduction grows its ablation by the new seeds (the runs done are kept) and rebuilds the report.
    """
    from igkd.data import load_dataset
    from igkd.devices import resolve_device
    from igkd.distill.executor import NotEnoughTime, check_cohort_size, pick
    from igkd.experiments.study_folder import now
    from igkd.provenance import environment, git_sha, load_average, machine_facts

    out = Path(out)
    chosen = parse_stages(stages)
    clock = Budget(parse_budget(budget))
    pick(executor, ray_address)
    if executor != "local" and clock.seconds is not None:
        raise IgkdError("--budget is checked between epochs in this process: use it with --executor local, or drop it")
    resolve_device(device)
    if teacher is not None and not Path(teacher).exists():
        raise IgkdError(f"--teacher {teacher} does not exist")
    if out.exists() and not out.is_dir():
        raise IgkdError(f"--out {out} is a file: give a folder for the reproduction")
    out.mkdir(parents=True, exist_ok=True)
    settings = Settings.of(profile, dataset, quick)
    if seeds is not None:
        if seeds < 1:
            raise IgkdError(f"--seeds must be at least 1, got {seeds}")
        settings.ablation_seeds = seeds
    state = read_state(out) or {"format": STATE_FORMAT, "stages": {}}
    if state.get("quick", quick) != quick:
        raise IgkdError(f"{out} holds a {'--quick' if state['quick'] else 'full'} reproduction: use the same mode, or another --out")
    if state.get("profile", "paper") != profile and state["stages"]:
        raise IgkdError(f"{out} holds a reproduction of --profile {state.get('profile', 'paper')}: use the same profile, or another --out")
    state["quick"], state["profile"] = quick, profile
    session = {"started": now(), "machine": machine_facts(), "command": environment("cpu")["command"], "git_sha": git_sha()}
    state.setdefault("sessions", []).append(session)
    session_tick = time.perf_counter()
    data = load_dataset(dataset, data_dir, progress=progress)
    session["data_load_s"] = round(time.perf_counter() - session_tick, 1)
    if settings.per_class is not None:
        data = first_per_class(data, *settings.per_class)
    state["data"] = {"name": data.name, "source": data.source, "fingerprint": data.fingerprint, "train": len(data.train), "test": len(data.test)}
    job = Reproduction(out, settings, data, data_dir=data_dir, device=device, budget=clock, teacher=teacher, progress=progress,
                       cohort_size=check_cohort_size(cohort_size), executor=executor, ray_address=ray_address)
    say = (lambda text: print(text, file=sys.stderr)) if progress else (lambda text: None)
    stopped, worked = None, False
    for i, stage in enumerate(chosen):
        number = STAGES.index(stage) + 1
        record = state["stages"].setdefault(stage, {"wall_s": 0.0})
        if record.get("done") and not _redo(stage, out, state, chosen[i + 1 :], worked, settings):
            say(f"stage {number} {stage}: done earlier, skipped")
            continue
        worked = True
        if clock.left() <= 0:
            stopped = (number, stage)
            break
        say(f"stage {number} {stage}: starting ({_left(clock)})")
        tick = time.perf_counter()
        try:
            result = getattr(job, stage)()
        except (BudgetSpent, NotEnoughTime) as stop:
            if isinstance(stop, NotEnoughTime):
                say(str(stop))
            stopped = (number, stage)
        finally:
            record["wall_s"] = round(record["wall_s"] + time.perf_counter() - tick, 1)
            atomic_write_json(out / STATE_FILE, state)
        if stopped:
            break
        record.update(done=True, result=result)
        atomic_write_json(out / STATE_FILE, state)
        say(f"stage {number} {stage}: done in {record['wall_s']:.0f} s: {result}")
    if results is not None:
        export_results(out, Path(results))
    state["stopped_at"] = None if stopped is None else {"stage": stopped[0], "name": stopped[1]}
    session.update(wall_s=round(time.perf_counter() - session_tick, 1), load_average_at_end=load_average())
    state["wall_s"] = round(sum(s.get("wall_s", 0.0) for s in state["sessions"]), 1)
    atomic_write_json(out / STATE_FILE, state)
    if stopped is not None:
        print(f"stopped at stage {stopped[0]} ({stopped[1]}) to stay inside --budget {budget}: resume with the same command", file=sys.stderr)
    return state


def read_state(out: Path) -> dict | None:
    """``out/reproduce.json`` (checked by :func:`check_state`), or None where there is none yet."""
    path = Path(out) / STATE_FILE
    if not path.exists():
        return None
    try:
        state = load_json(path)
    except (OSError, ValueError) as err:
        raise IgkdError(f"{path} is unreadable ({type(err).__name__}): remove it to check every stage again from its files") from None
    return check_state(state, str(path))


def check_state(state, where: str) -> dict:
    """A reproduction's state: an object of format igkd-reproduce whose ``stages`` maps stage names to records."""
    how = "remove it to check every stage again from its files"
    if not isinstance(state, dict) or state.get("format", STATE_FORMAT) != STATE_FORMAT:
        raise IgkdError(f"{where} is not the state of an igkd reproduction (a JSON object of format {STATE_FORMAT!r}): {how}")
    stages = state.get("stages")
    if not isinstance(stages, dict):
        raise IgkdError(f"{where}: 'stages' is a {type(stages).__name__}, not an object of stage names: {how}")
    for name, record in stages.items():
        if name not in STAGES:
            raise IgkdError(f"{where}: unknown stage {name!r} (stages are {', '.join(STAGES)}): {how}")
        if not isinstance(record, dict) or not isinstance(record.get("done", False), bool) or type(record.get("wall_s", 0.0)) not in (int, float):
            raise IgkdError(f"{where}: stage {name!r} is not a record of 'done' (true/false) and 'wall_s' (seconds): {how}")
        record.setdefault("wall_s", 0.0)
    if not isinstance(state.get("quick", False), bool):
        raise IgkdError(f"{where}: 'quick' is not true or false: {how}")
    if state.get("profile", "paper") not in PROFILES:
        raise IgkdError(f"{where}: 'profile' is {state.get('profile')!r}, not one of {', '.join(PROFILES)}: {how}")
    if not isinstance(state.get("sessions", []), list):
        raise IgkdError(f"{where}: 'sessions' is not a list of invocations: {how}")
    return state


def _redo(stage: str, out: Path, state: dict, later: list[str], worked: bool, settings: Settings) -> bool:
    """A finished stage runs again only where its output is needed and gone: the IG maps (never
    packed; a restored pack holds their manifest only) when a later stage still trains with them,
    the ablation when ``--seeds`` asks for more runs than it planned, and the report after new results."""
    if stage == "ablation":
        planned = state["stages"]["ablation"].get("result", {}).get("runs_planned", 0)
        return planned < len(settings.ablation_methods.split(",")) * settings.ablation_seeds
    if stage == "ig":
        needs_maps = any(name in ("ablation", "montecarlo", "sweep") and (not state["stages"].get(name, {}).get("done")
                                                                          or _redo(name, out, state, [], False, settings)) for name in later)
        return needs_maps and not _maps_here(out / "ig")
    return stage == "report" and worked


def _maps_here(folder: Path) -> bool:
    """The folder holds the IG maps its manifest describes (complete, with maps.npy of that shape)."""
    from igkd.attribution import open_attributions

    try:
        open_attributions(folder)
    except IgkdError:
        return False
    return True


def first_per_class(data, n_train: int, n_test: int | None):
    """The first ``n_train`` / ``n_test`` images of each class (a smaller dataset with its own fingerprint);
    ``n_test`` None keeps the whole test split."""
    import torch

    from igkd.data.dataset import Dataset, content_fingerprint

    def keep(images, n):
        if n is None:
            return images
        idx = torch.cat([torch.nonzero(images.labels == c).flatten()[:n] for c in range(len(data.classes))]).sort().values
        return images.subset(idx)

    train, test = keep(data.train, n_train), keep(data.test, n_test)
    fingerprint = content_fingerprint(train.images, train.labels, test.images, test.labels, extra=f"{data.fingerprint}-first-{n_train}-{n_test}")
    return Dataset(data.name, data.classes, train, test, fingerprint, f"{data.source} (first {n_train}/{n_test} per class)")


def _left(clock: Budget) -> str:
    left = clock.left()
    return "no budget" if left == float("inf") else f"{left:.0f} s of budget left"


def register(app) -> None:
    import typer

    @app.command("reproduce")
    def reproduce_command(
        out: Path = typer.Option(Path("repro"), help="Reproduction folder (created; the same command continues it)."),
        data_dir: Optional[Path] = typer.Option(None, help="CIFAR-10 as a folder/zip/tar.gz of images (e.g. cifar10-jpeg.tar.gz)."),
        dataset: str = typer.Option("folder", help="Dataset name: folder (image tree), cifar10 (pickles), digits (offline)."),
        budget: Optional[str] = typer.Option(None, help="Wall time, e.g. 25m: stop cleanly (resumable) before it is spent."),
        stages: Optional[str] = typer.Option(None, help=f"Stages to run: numbers or names of {', '.join(STAGES)} (default all)."),
        quick: bool = typer.Option(False, "--quick", help="Every stage tiny (seconds on a CPU): checks the whole path, no result."),
        teacher: Optional[Path] = typer.Option(None, help="Reuse this teacher model file instead of stage 1."),
        device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
        results: Optional[Path] = typer.Option(None, help="Also copy the tables, report and summaries here (e.g. docs/results)."),
        pack_file: Optional[Path] = typer.Option(None, "--pack", help="Write the small results of --out into this .tar.gz (< 16 MiB) and exit."),
        unpack_file: Optional[Path] = typer.Option(None, "--unpack", help="Restore a pack into --out, an empty or new folder (to continue there), and exit."),
        force: bool = typer.Option(False, "--force", help="With --unpack: merge the pack into an --out that holds results (what is done there is kept)."),
        cohort_size: Optional[int] = typer.Option(None, "--cohort-size", help="Runs trained at once as one fused network (1 = run by run; default: 1 on CPU, as many as fit on a GPU)."),
        profile: str = typer.Option("paper", help="paper (the paper's scale, a GPU) or cpu (the same stages sized for 2 CPU cores in < 2 h; docs/results/cpu)."),
        seeds: Optional[int] = typer.Option(None, help="Paired seeds per method in the ablation (default: paper 5, cpu 3); more on a finished folder adds runs."),
        executor: str = typer.Option("local", help="local, or ray: the studies' runs as Ray tasks on a cluster (docs/distributed.md); not with --budget."),
        ray_address: Optional[str] = typer.Option(None, "--ray-address", help="With --executor ray: the cluster to join (default: RAY_ADDRESS, else a new local Ray)."),
    ) -> None:
        """Reproduce the paper: teacher, IG maps, ablation, Monte Carlo, sweep, latency and report; resumable, budgeted."""
        if pack_file is not None and unpack_file is not None:
            raise IgkdError("give --pack or --unpack, not both")
        if pack_file is not None:
            listing = pack(out, pack_file)
            print(f"{pack_file}: {len(listing['files'])} files, {listing['archive_bytes'] / 2**20:.1f} MiB"
                  + (f"; left out (over the size limit): {', '.join(listing['left_out'])}" if listing["left_out"] else ""))
            return
        if force and unpack_file is None:
            raise IgkdError("--force goes with --unpack (merge a pack into a folder that holds results)")
        if unpack_file is not None:
            listing = unpack(unpack_file, out, force=force)
            kept = f"; kept {len(listing['kept'])} files done here" if listing["kept"] else ""
            print(f"{out}: restored {len(listing['restored'])} files from {unpack_file}{kept}; continue with the same 'igkd reproduce' command")
            return
        if dataset == "folder" and data_dir is None:
            raise IgkdError("--data-dir is needed: CIFAR-10 as an image folder or archive (e.g. cifar10-jpeg.tar.gz), or use --dataset digits --quick")
        state = run_reproduce(out, dataset=dataset, data_dir=data_dir, budget=budget, stages=stages, quick=quick, teacher=teacher,
                              device=device, results=results, cohort_size=cohort_size, profile=profile, seeds=seeds,
                              executor=executor, ray_address=ray_address)
        done = [name for name in STAGES if state["stages"].get(name, {}).get("done")]
        print(f"{out}: stages done: {', '.join(done) or 'none'}" + ("" if state.get("stopped_at") else "; nothing left to run" if len(done) == len(STAGES) else ""))
        if state.get("stopped_at"):
            raise typer.Exit(3)
