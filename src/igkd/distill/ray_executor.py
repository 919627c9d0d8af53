"""The Ray executor: the local executor's plan and cohorts, each cohort trained by a Ray task somewhere on a cluster.

``--executor ray`` (studies, ``reproduce``, ``tune``'s grid) hands the same plan of runs to :func:`execute` here
instead of :func:`igkd.distill.executor.execute`. The runs are grouped into the same cohorts (plan order, the same
:func:`~igkd.distill.cohort.cohort_key` and checkpoint epoch, up to ``cohort_size``: :func:`cohorts_of`), and each
cohort becomes one Ray task that requests ``num_cpus`` (the driver's torch threads) and ``num_gpus`` (1 for a CUDA
run, else 0) and trains with the one training loop, ``resume=True``, into the run folders. The folders must be
on storage every node sees (a shared path): a task writes there exactly what a local run writes, so resume,
results.csv, statistics, reports and pairing do not depend on the executor. A task killed with its node is
retried by Ray (:data:`MAX_RETRIES`) and resumes from the run folders' last checkpoints. A task sets the driver's
torch thread count and default float dtype, so its weights equal the local executor's for the same plan.

While it waits the driver prints one line whenever the counts of runs done / running / pending across the cluster
change (:class:`_Board`); the Ray dashboard, where the cluster runs one, lists the tasks (``igkd-cohort``).
Per-epoch callbacks and time budgets act in the driver's process and are not available here (refused).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from igkd.distill.cohort import cohort_key, fusable
from igkd.distill.executor import Run, checkpoint_epoch, default_cohort_size, finished_and_pending
from igkd.errors import IgkdError

#: How often Ray runs a cohort's task again after its worker or node died (it resumes from the checkpoints).
MAX_RETRIES = 3
#: Seconds between two looks at the cluster while waiting.
POLL_S = 1.0
EXTRA_HINT = "--executor ray needs Ray on this machine and every node: pip install 'igkd[ray]'"


def require_ray():
    """The ``ray`` module, or one error line naming the extra."""
    try:
        import ray
    except ImportError:
        raise IgkdError(EXTRA_HINT) from None
    return ray


def cohorts_of(pending: list[Run], start: dict[str, int], size: int) -> list[list[Run]]:
    """The local executor's cohorts of ``pending`` (no time limit, no out-of-memory): in plan order, the first run
    and the next ones with its cohort key and checkpoint epoch, at most ``size`` of them; then the same on the rest."""
    cohorts, left = [], list(pending)
    while left:
        head = left[0]
        fits = [r for r in left if cohort_key(r.config) == cohort_key(head.config) and start[str(r.out)] == start[str(head.out)]]
        cohort = fits[:size if fusable(head.config) else 1]  # an external architecture trains run by run
        cohorts.append(cohort)
        left = [r for r in left if r not in cohort]
    return cohorts


def gpus_per_task(device: str, cluster_gpus: float) -> int:
    """1 for a run on CUDA (``cuda``, ``cuda:N``, or ``auto`` on a cluster with GPUs), else 0."""
    name = str(device).lower()
    return int(name.startswith("cuda") or (name == "auto" and cluster_gpus > 0))


def _train_task(cohort: list[Run], dataset, teacher_path, attributions_dir, threads: int, dtype: str, board=None, index: int = 0,
                trusted=None) -> list[dict]:
    """One cohort on whichever node Ray chose: the driver's threads and float dtype, inputs loaded from their
    (shared) paths, training resumed from the run folders' checkpoints."""
    from igkd.distill.loop import train_cohort
    from igkd.distill.run import load_inputs

    if board is not None:
        board.started.remote(index)
    torch.set_num_threads(threads)
    torch.set_default_dtype(getattr(torch, dtype))
    inputs = load_inputs([r.config for r in cohort], dataset, teacher_path=teacher_path, attributions_dir=attributions_dir, trusted=trusted)
    return train_cohort([r.config for r in cohort], dataset, [r.out for r in cohort], resume=True, progress=False, **inputs)


class _Board:
    """Which cohorts' tasks have started (a task tells it when it begins): the "running" of the progress lines."""

    def __init__(self):
        self.seen: set[int] = set()

    def started(self, index: int) -> None:
        self.seen.add(index)

    def snapshot(self) -> list[int]:
        return sorted(self.seen)


def connect(address: str | None):
    """Join the cluster at ``address`` (``auto``: the one ``ray start`` runs on this machine; None: RAY_ADDRESS, or
    a new local Ray); returns whether this call connected (and so should disconnect)."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    new_local = address is None and not os.environ.get("RAY_ADDRESS")
    try:
        ray.init(address=address, logging_level="WARNING", **({"include_dashboard": False} if new_local else {}))
    except ConnectionError as err:
        raise IgkdError(f"cannot reach the Ray cluster at {address}: {str(err).splitlines()[0]} (start it with 'ray start --head', docs/distributed.md)") from None
    return True


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
    address: str | None = None,
    trusted=None,
) -> dict[str, dict]:
    """:func:`igkd.distill.executor.execute` with each cohort a Ray task; returns summaries by folder.

    ``on_finished`` runs in this process as each task ends. ``on_epoch_end`` (a per-epoch callback in this process)
    is not called; ``time_left`` is refused: a budget needs the epochs' times as they happen.
    """
    del progress, on_epoch_end  # tasks train without progress bars; their epochs are not seen here
    if time_left is not None:
        raise IgkdError("a time budget (--budget) sizes cohorts between epochs in this process: use it with --executor local")
    summaries, pending = finished_and_pending(runs, cohort_size)
    if not pending:
        return summaries
    ray = require_ray()
    connected = connect(address)
    try:
        return _run_tasks(ray, pending, summaries, len(runs), dataset, teacher_path, attributions_dir, cohort_size, on_finished, say, trusted)
    finally:
        if connected:
            ray.shutdown()


def _run_tasks(ray, pending, summaries, total, dataset, teacher_path, attributions_dir, cohort_size, on_finished, say, trusted=None) -> dict[str, dict]:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    gpus = gpus_per_task(pending[0].config.device, ray.cluster_resources().get("GPU", 0))
    size = cohort_size or default_cohort_size(torch.device("cuda" if gpus else "cpu"))
    start = {str(r.out): checkpoint_epoch(r) for r in pending}
    cohorts = cohorts_of(pending, start, size)
    threads = torch.get_num_threads()
    dtype = str(torch.get_default_dtype()).removeprefix("torch.")
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    board = ray.remote(num_cpus=0)(_Board).options(scheduling_strategy=here).remote()  # lives with the driver
    task = ray.remote(_train_task).options(
        num_cpus=threads if not gpus else 1, num_gpus=gpus, max_retries=MAX_RETRIES, retry_exceptions=False, name="igkd-cohort",
    )
    shared = ray.put(dataset)
    refs = {task.remote(c, shared, teacher_path, attributions_dir, threads, dtype, board, i, trusted): i for i, c in enumerate(cohorts)}
    say(f"{len(cohorts)} task(s) of up to {size} run(s) on Ray ({threads} thread(s){', 1 GPU' if gpus else ''} each)")
    done, shown, waiting = total - len(pending), None, list(refs)
    try:
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1, timeout=POLL_S)
            for ref in ready:
                cohort = cohorts[refs[ref]]
                results = _result(ray, ref)
                for run, summary in zip(cohort, results):
                    summaries[str(run.out)] = summary
                done += len(cohort)
                if on_finished is not None:
                    on_finished(cohort, results)
            started = set(ray.get(board.snapshot.remote()))
            running = sum(len(cohorts[refs[r]]) for r in waiting if refs[r] in started)
            counts = (done, running, total - done - running)
            if counts != shown:
                say(f"{counts[0]} done, {counts[1]} running, {counts[2]} pending of {total} runs (across the cluster)")
                shown = counts
    except BaseException:
        for ref in waiting:
            ray.cancel(ref, force=True)
        raise
    return summaries


def _result(ray, ref) -> list[dict]:
    """A task's summaries; a task that raised IgkdError (e.g. a NaN loss) raises it here, as a local run would."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, IgkdError):
            raise IgkdError(str(err.cause)) from None
        raise
