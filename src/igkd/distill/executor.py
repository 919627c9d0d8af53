"""The executor: train a plan of runs, grouped into cohorts that each train as one fused network.

A study (ablation, Monte Carlo, sweep) builds its plan of runs — a config and a folder each — and
hands it to :func:`execute`. The executor skips finished runs, groups the rest into cohorts of up
to ``cohort_size`` runs that can share one network (:data:`igkd.distill.cohort.COHORT_SHARED`: same
student, optimizer, schedule, batch size, epochs ...; and the same checkpoint epoch, so a killed
cohort resumes as one), and trains each cohort with the one training loop
(:func:`igkd.distill.loop.train_cohort`). Cohorts are formed in plan order: the first unfinished
run and the next runs that fit with it, so a study stopped half-way stays balanced.

Only the MobileNetV2 family fuses (:data:`igkd.models.fused.FUSED_LAYERS`): runs of an external architecture
train run by run whatever the cohort size, which is said in one line.

Cohort size: ``None`` = 1 on the CPU (fusion does not pay there, docs/cohort.md) and all runs that
fit together on CUDA, halved on out-of-memory; 1 turns cohorts off. With ``time_left``, the
executor measures each cohort's epochs and, before starting the next cohort, picks the largest
size that finishes in the time left — or stops with :class:`NotEnoughTime` when not even one run
would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from igkd.distill.config import TrainConfig
from igkd.distill.cohort import cohort_key, fusable
from igkd.distill.loop import train_cohort
from igkd.distill.run_folder import SUMMARY, read_summary, resume_checkpoint
from igkd.distill.run import load_inputs, refuse_foreign_folder
from igkd.errors import IgkdError
from igkd.models.fused import FUSED_LAYERS

#: Upper bound of the default cohort on CUDA (HFTA measured gains up to about this width for small models).
CUDA_DEFAULT_SIZE = 40
#: Safety factor on the projected time of a cohort (evaluation, the final test pass, jitter).
TIME_MARGIN = 1.15


class NotEnoughTime(Exception):
    """Not even one more run finishes in the time left; the message says what was needed."""


@dataclass
class Run:
    """One run of a plan: its config, its folder and a label for progress lines."""

    config: TrainConfig
    out: Path
    label: str = ""

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.label = self.label or self.out.name


def default_cohort_size(device: torch.device) -> int:
    """1 on the CPU (a fused step is no faster there), :data:`CUDA_DEFAULT_SIZE` on CUDA (halved on out-of-memory)."""
    return CUDA_DEFAULT_SIZE if device.type == "cuda" else 1


def check_cohort_size(value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise IgkdError(f"--cohort-size must be a whole number of at least 1 (1 trains run by run), got {value!r}")
    return value


def checkpoint_epoch(run: Run) -> int:
    """The epoch the run resumes after (0 without a checkpoint); the members of a cohort whose save a kill cut
    short all resume at one epoch (:func:`igkd.distill.run_folder.resume_checkpoint`), so they form that cohort again."""
    from igkd.torch_io import load_torch

    path = resume_checkpoint(run.out)
    if path is None:
        return 0
    return int(load_torch(path, map_location="cpu", what="training checkpoint")["epoch"])


class _Clock:
    """Seconds per epoch measured per cohort shape; projects a cohort of another size conservatively."""

    def __init__(self):
        self.measured: dict[tuple, tuple[int, float]] = {}  # cohort key -> (size, seconds per epoch)

    def hook(self, key: tuple, size: int, then: Callable | None):
        state = {"tick": time.perf_counter()}

        def on_epoch_end(epoch: int, record: dict) -> None:
            now = time.perf_counter()
            self.measured[key] = (size, now - state["tick"])  # training + evaluation + checkpoints of one epoch
            state["tick"] = now
            if then is not None:
                then(epoch, record)

        return on_epoch_end

    def seconds(self, key: tuple, size: int, epochs: int) -> float | None:
        """Projected wall time of ``epochs`` epochs of a cohort of ``size``: a fused step of G' members
        takes at most max(1, G'/G) times the measured one of G members (GPU time grows at most linearly
        in G; a smaller cohort is not slower than a larger one)."""
        if key not in self.measured:
            return None
        measured_size, per_epoch = self.measured[key]
        return TIME_MARGIN * epochs * per_epoch * max(1.0, size / measured_size)


def finished_and_pending(runs: list[Run], cohort_size: int | None) -> tuple[dict[str, dict], list[Run]]:
    """Checks shared by every executor (the cohort size; no folder of another run), then the summaries of the runs
    finished earlier (by folder) and the runs still to train, in plan order."""
    check_cohort_size(cohort_size)
    for run in runs:
        refuse_foreign_folder(run.out)
    summaries = {str(r.out): s for r in runs if (s := read_summary(r.out / SUMMARY)) is not None}
    return summaries, [r for r in runs if str(r.out) not in summaries]


def execute(
    runs: list[Run],
    dataset,
    *,
    teacher_path: str | Path | None = None,
    attributions_dir: str | Path | None = None,
    cohort_size: int | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    on_finished: Callable[[list[Run], list[dict]], None] | None = None,
    time_left: Callable[[], float] | None = None,
    say: Callable[[str], None] = lambda text: None,
    trusted=None,
) -> dict[str, dict]:
    """Train every unfinished run of ``runs`` (resuming interrupted ones); returns summaries by folder.

    ``on_finished(runs, summaries)`` is called after each cohort; ``on_epoch_end`` after each epoch of
    every cohort (e.g. a budget check that may raise to stop). ``trusted``: the factories an external teacher
    file may be rebuilt by (:func:`igkd.models.load_model`).
    """
    from igkd.devices import resolve_device

    summaries, pending = finished_and_pending(runs, cohort_size)
    if not pending:
        return summaries
    device = resolve_device(pending[0].config.device)
    size = cohort_size or default_cohort_size(device)
    inputs = load_inputs([r.config for r in pending], dataset, teacher_path=teacher_path, attributions_dir=attributions_dir, trusted=trusted)
    start = {str(r.out): checkpoint_epoch(r) for r in pending}
    clock, done, total = _Clock(), len(runs) - len(pending), len(runs)
    external = [r for r in pending if not fusable(r.config)]
    if external and size > 1:
        say(f"{len(external)} run(s) of an external architecture train run by run: cohorts fuse only the MobileNetV2 family "
            f"(igkd.models.fused: {', '.join(FUSED_LAYERS)}), not a cohort of {size}")
    while pending:
        head = pending[0]
        key = cohort_key(head.config)
        fits = [r for r in pending if cohort_key(r.config) == key and start[str(r.out)] == start[str(head.out)]]
        epochs = head.config.epochs - start[str(head.out)]
        G = _size_for_time(clock, key, min(size if fusable(head.config) else 1, len(fits)), epochs, time_left, head)
        cohort = fits[:G]
        resumed = " (resuming)" if start[str(head.out)] else ""
        names = ", ".join(r.label for r in cohort)
        say(f"runs {done + 1}-{done + G} of {total}: {names}{resumed}" if G > 1 else f"run {done + 1} of {total}: {names}{resumed}")
        try:
            results = _train(cohort, dataset, inputs, progress=progress, on_epoch_end=clock.hook(key, G, on_epoch_end))
        except torch.cuda.OutOfMemoryError:
            if G == 1:
                raise
            torch.cuda.empty_cache()
            size = max(1, G // 2)
            say(f"a cohort of {G} runs does not fit in the GPU's memory: trying {size}")
            start.update({str(r.out): checkpoint_epoch(r) for r in cohort})
            continue
        for run, summary in zip(cohort, results):
            summaries[str(run.out)] = summary
        pending = [r for r in pending if r not in cohort]
        done += G
        if on_finished is not None:
            on_finished(cohort, results)
    return summaries


#: ``--executor``: where a plan's cohorts train (this process, or Ray tasks on a cluster: :mod:`igkd.distill.ray_executor`).
EXECUTORS = ("local", "ray")


def pick(name: str = "local", ray_address: str | None = None) -> Callable[..., dict[str, dict]]:
    """The ``execute`` function of executor ``name`` (same arguments); Ray's missing gives one line naming the extra."""
    if name not in EXECUTORS:
        raise IgkdError(f"unknown executor {name!r}: use {' or '.join(EXECUTORS)}")
    if name == "local":
        if ray_address is not None:
            raise IgkdError("--ray-address goes with --executor ray")
        return execute
    import functools

    from igkd.distill import ray_executor

    ray_executor.require_ray()
    return functools.partial(ray_executor.execute, address=ray_address)


def _size_for_time(clock: _Clock, key: tuple, size: int, epochs: int, time_left, head: Run) -> int:
    """The largest cohort size <= ``size`` whose projected time fits in ``time_left()``; ``size`` when unmeasured."""
    if time_left is None:
        return size
    left = time_left()
    for G in range(size, 0, -1):
        needed = clock.seconds(key, G, epochs)
        if needed is None or needed <= left:
            return G
    needed = clock.seconds(key, 1, epochs)
    raise NotEnoughTime(
        f"the next run ({head.label}) needs about {needed:.0f} s for its {epochs} epochs, {max(left, 0):.0f} s are left: "
        "run the same command again with more time to continue"
    )


def _train(cohort: list[Run], dataset, inputs: dict, **kwargs) -> list[dict]:
    """Train one cohort (G = 1 is a single run) from its checkpoints, if any."""
    return train_cohort([r.config for r in cohort], dataset, [r.out for r in cohort], resume=True, **inputs, **kwargs)
