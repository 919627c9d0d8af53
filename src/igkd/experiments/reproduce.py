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

import json
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from igkd.atomic import atomic_open, atomic_write_json, atomic_write_text, read_json_object
from igkd.distill.config import PAPER_METHODS
from igkd.errors import IgkdError

STAGES = ("teacher", "ig", "ablation", "montecarlo", "sweep", "report")
PACK_LIMIT = 16 * 2**20 - 2**19  # what comes back from a GPU job: 16 MiB a file (half a MiB kept for the tar itself)
STATE_FILE = "reproduce.json"


class BudgetSpent(Exception):
    """The next unit of work would not finish inside ``--budget``."""


@dataclass
class Settings:
    """What each stage trains. ``full()`` is the paper's scale; ``quick()`` every stage in seconds (CI)."""

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

    @classmethod
    def full(cls, dataset: str) -> "Settings":
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
        return cls(
            dataset=dataset,
            teacher={"epochs": 2, "batch_size": 64, "lr": 0.05, "width": 0.25},
            ig_steps=2,
            student="k17",
            student_overrides={"epochs": 1, "batch_size": 128, "width": 0.25},
            ablation_seeds=1,
            mc_methods="student,kd_ig",
            mc_runs=2,
            mc_subset=0.8,
            sweep_students="k17",
            sweep_methods="student,kd_ig",
            sweep_seeds=1,
            latency_batch_sizes=(1,),
            latency_repeats=20,
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
    if seconds <= 0:
        raise IgkdError(f"--budget must be positive, got {text!r}")
    return seconds


def parse_stages(text: str | None) -> list[str]:
    """``1,2,3`` or names (``teacher,ig``) or ranges (``1-3``); default all."""
    if not text:
        return list(STAGES)
    chosen = []
    for item in (t.strip().lower() for t in text.split(",") if t.strip()):
        if "-" in item and all(part.isdigit() for part in item.split("-", 1)):
            low, high = (int(part) for part in item.split("-", 1))
            chosen += [STAGES[i - 1] for i in range(low, high + 1) if 1 <= i <= len(STAGES)]
        elif item.isdigit() and 1 <= int(item) <= len(STAGES):
            chosen.append(STAGES[int(item) - 1])
        elif item in STAGES:
            chosen.append(item)
        else:
            raise IgkdError(f"unknown stage {item!r}: use numbers 1-{len(STAGES)} or names {', '.join(STAGES)}")
    return [s for s in STAGES if s in chosen]


class Reproduction:
    """The stages of one reproduction folder."""

    def __init__(
        self, out: Path, settings: Settings, data, *, data_dir, device: str, budget: Budget, teacher: Path | None, progress: bool, cohort_size: int | None = None,
    ):
        self.out, self.settings, self.data, self.data_dir, self.cohort_size = out, settings, data, data_dir, cohort_size
        self.device, self.budget, self.teacher_given, self.progress = device, budget, teacher, progress
        self.times: dict[str, float] = {}

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
        cache = compute_attributions(model, self.data, self.out / "ig", n_steps=self.settings.ig_steps, baseline="black", target="label",
                                     device=self.device, teacher_sha256=info["sha256"], progress=self.progress, on_chunk=self._chunk_hook("ig"))
        return {"images": cache.manifest["n"], "precision": cache.manifest.get("precision"), "images_per_s": cache.manifest.get("images_per_s")}

    def _options(self, stage: str):
        from igkd.experiments.studies import StudyOptions

        overrides = dict(self.settings.student_overrides)
        return StudyOptions(
            teacher=self.teacher_path, attributions=self.out / "ig", recipe="paper", device=self.device, progress=self.progress,
            epochs=overrides.pop("epochs", None), batch_size=overrides.pop("batch_size", None), lr=overrides.pop("lr", None),
            config_values=overrides or None, on_epoch_end=self._epoch_hook(stage),
            cohort_size=self.cohort_size, time_left=self.budget.left if self.budget.seconds is not None else None,
        )

    def ablation(self) -> dict:
        from igkd.experiments.studies import run_ablation

        study = run_ablation(self.data, self.out / "ablation", methods=",".join(PAPER_METHODS), seeds=self.settings.ablation_seeds,
                             student=self.settings.student, options=self._options("ablation"))
        return _finished(study)

    def montecarlo(self) -> dict:
        from igkd.experiments.studies import run_montecarlo

        study = run_montecarlo(self.data, self.out / "montecarlo", methods=self.settings.mc_methods, runs=self.settings.mc_runs, subset=self.settings.mc_subset,
                               student=self.settings.student, options=self._options("montecarlo"))
        return _finished(study)

    def sweep(self) -> dict:
        from igkd.experiments.studies import run_sweep

        study = run_sweep(self.data, self.out / "sweep", students=self.settings.sweep_students, methods=self.settings.sweep_methods,
                          seeds=self.settings.sweep_seeds, options=self._options("sweep"))
        return _finished(study)

    def report(self) -> dict:
        from igkd.deploy.latency import benchmark_latency
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
            build_report(studies, self.out / "report", data_dir=self.data_dir, latency=self.out / "latency.json", device=self.device)
        tables = paper_tables(self.out)
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




# -- paper vs ours -------------------------------------------------------------------------------


def paper_results() -> dict:
    return json.loads((Path(__file__).parent / "paper_results.json").read_text())


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None
    return mean, sd


def _accuracies(out: Path, study: str) -> dict[str, list[float]]:
    from igkd.experiments.studies import load_study

    if not (out / study / "study.json").exists():
        return {}
    by_method: dict[str, list[float]] = {}
    for run in load_study(out / study)["runs"]:
        if run["status"] == "finished":
            by_method.setdefault(run["method"], []).append(float(run["summary"]["test_accuracy"]))
    return by_method


def paper_tables(out: Path) -> str:
    """Markdown: Table 3 and the Monte Carlo table, the paper's numbers beside ours."""
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
    lines += ["", "## Monte Carlo (stratified 80% subsets)", "", f"Paper: {paper['montecarlo_note']}.", "",
              "| method | paper mean | paper sd | ours mean | ours sd | runs |", "|---|---:|---:|---:|---:|---:|"]
    ours = _accuracies(out, "montecarlo")
    for method, (mean_p, sd_p) in paper["montecarlo_mean_sd"].items():
        acc = ours.get(method, [])
        mean, sd = _mean_sd(acc) if acc else (None, None)
        lines.append(f"| {method} | {mean_p:.2f} | {sd_p:.2f} | {_fmt(mean)} | {_fmt(sd)} | {len(acc)} |")
    lines += ["", "Statistics (paired t-tests, Holm): `igkd stats --study <folder>`; the full report: `report/report.md`.", ""]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# -- running -------------------------------------------------------------------------------------


def run_reproduce(
    out: Path, *, dataset: str = "folder", data_dir=None, budget: str | None = None, stages: str | None = None, quick: bool = False,
    teacher: Path | None = None, device: str = "auto", results: Path | None = None, progress: bool = True, cohort_size: int | None = None,
) -> dict:
    """Run the chosen stages in order until done or out of budget; returns the state (also ``out/reproduce.json``)."""
    from igkd.data import load_dataset
    from igkd.devices import resolve_device
    from igkd.distill.executor import NotEnoughTime, check_cohort_size

    out = Path(out)
    chosen = parse_stages(stages)
    clock = Budget(parse_budget(budget))
    resolve_device(device)
    if teacher is not None and not Path(teacher).exists():
        raise IgkdError(f"--teacher {teacher} does not exist")
    if out.exists() and not out.is_dir():
        raise IgkdError(f"--out {out} is a file: give a folder for the reproduction")
    out.mkdir(parents=True, exist_ok=True)
    settings = Settings.quick(dataset) if quick else Settings.full(dataset)
    state = read_json_object(out / STATE_FILE) or {"format": "igkd-reproduce", "stages": {}}
    if state.get("quick", quick) != quick:
        raise IgkdError(f"{out} holds a {'--quick' if state['quick'] else 'full'} reproduction: use the same mode, or another --out")
    state["quick"] = quick
    data = load_dataset(dataset, data_dir, progress=progress)
    if settings.per_class is not None:
        data = first_per_class(data, *settings.per_class)
    job = Reproduction(out, settings, data, data_dir=data_dir, device=device, budget=clock, teacher=teacher, progress=progress,
                       cohort_size=check_cohort_size(cohort_size))
    say = (lambda text: print(text, file=sys.stderr)) if progress else (lambda text: None)
    stopped, worked = None, False
    for i, stage in enumerate(chosen):
        number = STAGES.index(stage) + 1
        record = state["stages"].setdefault(stage, {"wall_s": 0.0})
        if record.get("done") and not _redo(stage, out, state, chosen[i + 1 :], worked):
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
    atomic_write_json(out / STATE_FILE, state)
    if stopped is not None:
        print(f"stopped at stage {stopped[0]} ({stopped[1]}) to stay inside --budget {budget}: resume with the same command", file=sys.stderr)
    return state


def _redo(stage: str, out: Path, state: dict, later: list[str], worked: bool) -> bool:
    """A finished stage runs again only where its output is needed and gone: the IG maps (never
    packed) when a later stage still trains with them, and the report after new results."""
    if stage == "ig":
        needs_maps = any(name in ("ablation", "montecarlo", "sweep") and not state["stages"].get(name, {}).get("done") for name in later)
        return needs_maps and not (out / "ig" / "manifest.json").exists()
    return stage == "report" and worked


def first_per_class(data, n_train: int, n_test: int):
    """The first ``n_train`` / ``n_test`` images of each class (a smaller dataset with its own fingerprint)."""
    import torch

    from igkd.data.dataset import Dataset, content_fingerprint

    def keep(images, n):
        idx = torch.cat([torch.nonzero(images.labels == c).flatten()[:n] for c in range(len(data.classes))]).sort().values
        return images.subset(idx)

    train, test = keep(data.train, n_train), keep(data.test, n_test)
    fingerprint = content_fingerprint(train.images, train.labels, test.images, test.labels, extra=f"{data.fingerprint}-first-{n_train}-{n_test}")
    return Dataset(data.name, data.classes, train, test, fingerprint, f"{data.source} (first {n_train}/{n_test} per class)")


def _left(clock: Budget) -> str:
    left = clock.left()
    return "no budget" if left == float("inf") else f"{left:.0f} s of budget left"


# -- results, pack, unpack -----------------------------------------------------------------------

RESULT_FILES = ("reproduce.json", "paper-vs-ours.md", "latency.json", "ablation/results.csv", "montecarlo/results.csv", "sweep/results.csv",
                "ablation/study.json", "montecarlo/study.json", "sweep/study.json", "teacher/summary.json", "ig/manifest.json")


def export_results(out: Path, results: Path) -> list[str]:
    """Copy the files a user would commit (tables, report, summaries) into ``results``."""
    copied = []
    for name in RESULT_FILES:
        if (out / name).is_file():
            target = results / name.replace("/", "-")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / name, target)
            copied.append(target.name)
    if (out / "report").is_dir():
        for path in sorted((out / "report").iterdir()):
            if path.is_file():
                (results / "report").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, results / "report" / path.name)
                copied.append(f"report/{path.name}")
    return copied


SMALL_SUFFIXES = (".json", ".jsonl", ".csv", ".md", ".png", ".txt")
NEVER_PACKED = ("maps.npy", "maps.partial.npy", ".lock")


def pack(out: Path, archive: Path, limit: int = PACK_LIMIT) -> dict:
    """One .tar.gz of what the next job needs and a person reads, under ``limit`` bytes (raw sizes, a safe bound)."""
    out = Path(out)
    if not (out / STATE_FILE).is_file():
        raise IgkdError(f"{out} holds no reproduction ({STATE_FILE}): run 'igkd reproduce --out {out}' first")
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name not in NEVER_PACKED and not p.name.endswith(".tmp"))
    must = [p for p in files if p.suffix in SMALL_SUFFIXES]
    optional = []  # by value: the teacher, interrupted runs' checkpoints (to resume), one student per method
    teacher = out / "teacher" / "model.safetensors"
    if teacher.exists():
        optional.append(teacher)
    optional += [p for p in files if p.name in ("checkpoint.pt", "checkpoint.next.pt") and not (p.parent / "summary.json").exists()]
    seen_methods = set()
    for path in files:
        if path.name == "model.safetensors" and path.parent.parent.name == "runs":
            method = (read_json_object(path.parent / "summary.json") or {}).get("method")
            if method and method not in seen_methods:
                seen_methods.add(method)
                optional.append(path)
    chosen, left_out, size = list(must), [], sum(p.stat().st_size for p in must)
    if size > limit:
        raise IgkdError(f"the small files of {out} alone are {size / 2**20:.1f} MiB, over the {limit / 2**20:.1f} MiB pack limit")
    for path in optional:
        if size + path.stat().st_size <= limit:
            chosen.append(path)
            size += path.stat().st_size
        else:
            left_out.append(str(path.relative_to(out)))
    listing = {"format": "igkd-reproduce-pack", "files": [str(p.relative_to(out)) for p in chosen], "left_out": left_out, "bytes_raw": size}
    archive.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(archive, "wb") as handle, tarfile.open(fileobj=handle, mode="w:gz") as tar:
        for path in chosen:
            tar.add(path, arcname=str(path.relative_to(out)))
        data = json.dumps(listing, indent=2).encode()
        info = tarfile.TarInfo("pack.json")
        info.size = len(data)
        import io

        tar.addfile(info, io.BytesIO(data))
    listing["archive_bytes"] = archive.stat().st_size
    return listing


def unpack(archive: Path, out: Path) -> dict:
    """Restore a pack into ``out`` (safe extraction: no absolute paths, no '..', no links)."""
    archive, out = Path(archive), Path(out)
    if not archive.is_file():
        raise IgkdError(f"pack {archive} does not exist")
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            names = {m.name for m in members}
            if "pack.json" not in names:
                raise IgkdError(f"{archive} is not an igkd reproduce pack (no pack.json): make one with 'igkd reproduce --pack'")
            for member in members:
                if not (member.isfile() or member.isdir()) or member.name.startswith("/") or ".." in Path(member.name).parts:
                    raise IgkdError(f"{archive} holds {member.name!r}, which is not a plain file inside the folder: refused")
            out.mkdir(parents=True, exist_ok=True)
            tar.extractall(out, members=[m for m in members if m.name != "pack.json"], filter="data")
            listing = json.loads(tar.extractfile("pack.json").read())
    except (tarfile.TarError, OSError, ValueError) as err:
        raise IgkdError(f"{archive} is not a readable pack ({type(err).__name__}: {err})") from None
    return listing


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
        unpack_file: Optional[Path] = typer.Option(None, "--unpack", help="Restore a pack into --out (to continue there) and exit."),
        cohort_size: Optional[int] = typer.Option(None, "--cohort-size", help="Runs trained at once as one fused network (1 = run by run; default: 1 on CPU, as many as fit on a GPU)."),
    ) -> None:
        """Reproduce the paper: teacher, IG maps, ablation, Monte Carlo, sweep, latency and report; resumable, budgeted."""
        if pack_file is not None and unpack_file is not None:
            raise IgkdError("give --pack or --unpack, not both")
        if pack_file is not None:
            listing = pack(out, pack_file)
            print(f"{pack_file}: {len(listing['files'])} files, {listing['archive_bytes'] / 2**20:.1f} MiB"
                  + (f"; left out (over the size limit): {', '.join(listing['left_out'])}" if listing["left_out"] else ""))
            return
        if unpack_file is not None:
            listing = unpack(unpack_file, out)
            print(f"{out}: restored {len(listing['files'])} files from {unpack_file}; continue with the same 'igkd reproduce' command")
            return
        if dataset == "folder" and data_dir is None:
            raise IgkdError("--data-dir is needed: CIFAR-10 as an image folder or archive (e.g. cifar10-jpeg.tar.gz), or use --dataset digits --quick")
        state = run_reproduce(out, dataset=dataset, data_dir=data_dir, budget=budget, stages=stages, quick=quick, teacher=teacher,
                              device=device, results=results, cohort_size=cohort_size)
        done = [name for name in STAGES if state["stages"].get(name, {}).get("done")]
        print(f"{out}: stages done: {', '.join(done) or 'none'}" + ("" if state.get("stopped_at") else "; nothing left to run" if len(done) == len(STAGES) else ""))
        if state.get("stopped_at"):
            raise typer.Exit(3)
