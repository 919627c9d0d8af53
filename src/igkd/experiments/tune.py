"""Hyper-parameter search (T, alpha, p, gamma) with Optuna, one or many workers on one study.

The objective is the **validation** accuracy of a run (a held-out part of the
training split); the test split is never used to choose. Every trial trains one
run in ``STUDY/runs/trial-<number>/`` with the same seed, so trials differ only
in their hyper-parameters. The Optuna study lives in a database: by default
``STUDY/optuna.db`` (SQLite); with ``storage=URL`` (e.g. PostgreSQL, or SQLite on
a shared disk) many workers on many machines join one study by running the same
command with the same storage and study name.

Samplers:

- ``grid``: every combination of the listed values (:data:`DEFAULT_GRID`, 5-7
  values each, as in the paper's grid of 5-9 values of T, alpha and p; a YAML
  file may list others). Parameters not tuned keep the method's values.
- ``tpe``: Optuna's TPE, seeded, over ranges (default: the grid's min..max,
  log-scaled for alpha and gamma) or over listed values.

Several workers never train the same point twice. Trial numbers are handed out
by the database in creation order; before training, a trial waits until every
earlier trial has its parameters and yields (state PRUNED, user attribute
``duplicate_of``) if an earlier live trial (waiting, running or complete) has the
same ones. Two trials with the same parameters thus always agree on which one
trains, whatever their timing. A trial that was interrupted (Ctrl-C: FAIL; a
killed worker: RUNNING until its heartbeat goes stale, then FAIL) is queued again
by the next worker loop with the same parameters and continues from the
interrupted trial's checkpoint (its folder is renamed to the new trial's).
Trials that fail for a reason (the loss became NaN: user attribute ``error``)
are not retried.

Like the other study kinds, a tune study checks its inputs (:mod:`igkd.experiments.inputs`),
keeps its study.json (:mod:`igkd.experiments.study_folder`) and measures the extras
(:mod:`igkd.experiments.extras`); its plan is the sampler's.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
import warnings
from collections import Counter
from pathlib import Path

from igkd.atomic import atomic_write_json, load_json
from igkd.errors import IgkdError
from igkd.experiments import studies  # studies.run_training trains a trial on its own (tests stand in for it there)
from igkd.experiments.extras import add_extras
from igkd.experiments.inputs import check_inputs, input_records
from igkd.experiments.plan import at_least_one, one_student, parse_methods
from igkd.experiments.studies import StudyOptions, refuse_torchrun, study_options
from igkd.experiments.study_folder import RUNS_DIR, first_difference, join_study_file, load_study, study_record

TUNE_FILE = "tune.json"
DB_FILE = "optuna.db"
PARAMS = {"t": "temperature", "temperature": "temperature", "alpha": "alpha", "p": "p", "gamma": "gamma"}
#: The paper searched 5-9 values each of T, alpha and p; these are ours (documented in docs/experiments.md).
DEFAULT_GRID = {
    "temperature": [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0],
    "alpha": [0.001, 0.01, 0.05, 0.1, 0.3, 0.5, 0.9],
    "p": [0.05, 0.1, 0.25, 0.5, 0.75],
    "gamma": [0.1, 0.4, 0.8, 1.6, 3.2],
}
LOG_SCALE = ("alpha", "gamma")
SAMPLERS = ("grid", "tpe")
#: A grid point whose trials were interrupted this many times is not queued again.
MAX_ATTEMPTS = 5
#: A worker stops after this many duplicate trials in a row (the sampler keeps proposing known points).
MAX_DUPLICATES_IN_A_ROW = 20
#: How long a trial waits for an earlier trial (still being sampled) to show its parameters.
CLAIM_WAIT_S = 120.0
#: A worker's heartbeat interval (``--heartbeat``); a RUNNING trial whose heartbeat is GRACE_FACTOR times as old is
#: taken as killed (marked FAIL, then queued again).
HEARTBEAT_S, GRACE_FACTOR = 60, 3
GRACE_S = HEARTBEAT_S * GRACE_FACTOR
SQLITE_TIMEOUT_S = 60


def parse_params(text: str | list[str] | None) -> list[str]:
    """``T,alpha,p,gamma`` (any subset, case-insensitive; T = temperature) -> canonical names."""
    if text is None:
        return []
    items = [p.strip().lower() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    unknown = [p for p in items if p not in PARAMS]
    if unknown:
        raise IgkdError(f"unknown hyper-parameter {unknown[0]!r}: tune any of T, alpha, p, gamma")
    return list(dict.fromkeys(PARAMS[p] for p in items))


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise IgkdError(f"{where}: {value!r} is not a finite number")
    return float(value)


def _space_entry(name: str, spec, where: str) -> dict:
    if isinstance(spec, (list, tuple)):
        values = [_number(v, f"{where}, {name}") for v in spec]
        if not values:
            raise IgkdError(f"{where}: {name} lists no values")
        return {"values": list(dict.fromkeys(values))}
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - {"low", "high", "log"})
        if unknown or "low" not in spec or "high" not in spec:
            raise IgkdError(f"{where}: {name} must be a list of values or {{low: .., high: .., log: true|false}}")
        low, high = _number(spec["low"], f"{where}, {name}.low"), _number(spec["high"], f"{where}, {name}.high")
        log = bool(spec.get("log", False))
        if not low < high or (log and low <= 0):
            raise IgkdError(f"{where}: {name} needs low < high (and low > 0 with log: true), got {low} .. {high}")
        return {"low": low, "high": high, "log": log}
    raise IgkdError(f"{where}: {name} must be a list of values or {{low: .., high: .., log: ..}}")


def load_space(params: list[str], sampler: str, grid_file: str | Path | None = None) -> dict:
    """``{name: {"values": [...]}}`` (grid/categorical) or ``{name: {"low", "high", "log"}}`` (TPE ranges)."""
    if sampler not in SAMPLERS:
        raise IgkdError(f"unknown sampler {sampler!r}: use grid or tpe")
    given: dict = {}
    if grid_file is not None:
        import yaml

        path = Path(grid_file)
        if not path.is_file():
            raise IgkdError(f"grid file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise IgkdError(f"grid file {path} is not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise IgkdError(f"grid file {path} must map parameter names to lists of values")
        for key, spec in raw.items():
            name = parse_params([str(key)])[0]
            given[name] = _space_entry(name, spec, str(path))
        if params:
            extra = sorted(set(given) - set(params))
            if extra:
                raise IgkdError(f"grid file {path} lists {', '.join(extra)}, which --params does not tune: add it to --params or remove it")
        else:
            params = list(given)
    if not params:
        raise IgkdError("nothing to tune: pass --params (e.g. T,alpha) or a --grid-file")
    space = {}
    for name in params:
        if name in given:
            space[name] = given[name]
        elif sampler == "grid":
            space[name] = {"values": list(DEFAULT_GRID[name])}
        else:
            values = DEFAULT_GRID[name]
            space[name] = {"low": min(values), "high": max(values), "log": name in LOG_SCALE}
    ranges = [n for n, s in space.items() if "values" not in s]
    if sampler == "grid" and ranges:
        raise IgkdError(f"the grid sampler needs lists of values, but {', '.join(ranges)} is a range: list values or use --sampler tpe")
    return space


def grid_points(space: dict) -> list[tuple]:
    """Every combination of the listed values, in ``space`` order (None when a parameter is a range)."""
    import itertools

    if any("values" not in spec for spec in space.values()):
        return []
    return list(itertools.product(*(spec["values"] for spec in space.values())))


def redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is reported by Optuna itself
        return url


def check_heartbeat(seconds: int | None) -> int:
    """``--heartbeat``: whole seconds, at least 1 (default :data:`HEARTBEAT_S`)."""
    if seconds is None:
        return HEARTBEAT_S
    if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < 1:
        raise IgkdError(f"--heartbeat takes whole seconds, at least 1 (a killed worker's trial is retried after {GRACE_FACTOR}x that), got {seconds!r}")
    return seconds


def open_storage(url: str, heartbeat_s: int = HEARTBEAT_S):
    """RDBStorage with a heartbeat every ``heartbeat_s`` (a trial silent for :data:`GRACE_FACTOR` times that is a killed
    worker's) and, for SQLite, a 60 s lock timeout.

    Several workers creating the tables of a new SQLite file at once can collide;
    that is retried a few times.
    """
    import optuna
    import sqlalchemy.exc

    engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else {}
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s, grace_period=GRACE_FACTOR * heartbeat_s)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError) as err:
            if attempt == 4:
                raise IgkdError(f"cannot open the Optuna storage {redact(url)}: {str(err).splitlines()[0]}") from None
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def _key(params: dict, names: list[str]) -> tuple | None:
    if not all(n in params for n in names):
        return None
    return tuple(params[n] for n in names)


class _Worker:
    """One process's share of a tune study: sample, de-duplicate, train, record."""

    def __init__(self, study, space: dict, names: list[str], out: Path, dataset, method: str, student: str, seed: int, options: StudyOptions, record: dict, sampler_seed: int):
        self.study, self.space, self.names, self.out = study, space, names, out
        self.dataset, self.method, self.student, self.seed, self.options = dataset, method, student, seed, options
        self.record, self.sampler_seed = record, sampler_seed
        self.last_was_duplicate, self.duplicates = False, 0
        self.cache: dict = {}  # the teacher's agreement maps, shared by this worker's trials

    # -- bookkeeping over all workers' trials ---------------------------------------------------
    def trials(self):
        return self.study.get_trials(deepcopy=False)

    def owner(self, number: int, key: tuple) -> int | None:
        """The earlier live trial with the same parameters, if any (after earlier trials show theirs)."""
        from optuna.trial import TrialState

        deadline = time.monotonic() + CLAIM_WAIT_S
        while True:
            earlier = [t for t in self.trials() if t.number < number]
            unsettled = [t for t in earlier if t.state == TrialState.RUNNING and _key(t.params, self.names) is None]
            if not unsettled or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        live = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
        for t in sorted(earlier, key=lambda t: t.number):
            if t.state in live and "duplicate_of" not in t.user_attrs and _key(t.params, self.names) == key:
                return t.number
        return None

    def requeue_interrupted(self) -> None:
        """Queue again (same parameters) the points whose last trial was interrupted, not failed for a reason."""
        import optuna
        from optuna.trial import TrialState

        trials = self.trials()
        live = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
        covered = {_key(t.params, self.names) for t in trials if t.state in live and "duplicate_of" not in t.user_attrs}
        attempts = Counter(_key(t.params, self.names) for t in trials if t.state == TrialState.FAIL)
        for t in sorted(trials, key=lambda t: -t.number):  # the latest failure of a point holds its checkpoint
            key = _key(t.params, self.names)
            if t.state != TrialState.FAIL or key is None or "error" in t.user_attrs or key in covered or attempts[key] >= MAX_ATTEMPTS:
                continue
            system = {k: v for k, v in t.system_attrs.items() if k in ("grid_id", "search_space")}
            self.study.add_trial(
                optuna.trial.create_trial(
                    state=TrialState.WAITING, params=t.params, distributions=t.distributions, user_attrs={"retry_of": t.number}, system_attrs=system
                )
            )
            covered.add(key)

    def work_left(self, target: int) -> bool:
        from optuna.trial import TrialState

        trials = self.trials()
        if any(t.state == TrialState.WAITING for t in trials):
            return True
        own = [t for t in trials if "duplicate_of" not in t.user_attrs]
        started = sum(t.state in (TrialState.RUNNING, TrialState.COMPLETE) for t in own)
        if started >= target:
            return False
        points = grid_points(self.space)
        if not points:
            return True
        attempts = Counter(_key(t.params, self.names) for t in trials if t.state == TrialState.FAIL)
        done = {
            _key(t.params, self.names)
            for t in own
            if t.state in (TrialState.RUNNING, TrialState.COMPLETE)
            or (t.state == TrialState.FAIL and ("error" in t.user_attrs or attempts[_key(t.params, self.names)] >= MAX_ATTEMPTS))
        }
        return any(point not in done for point in points)

    # -- one trial -------------------------------------------------------------------------------
    def suggest(self, trial) -> dict:
        values = {}
        for name, spec in self.space.items():
            if "values" in spec:
                values[name] = trial.suggest_categorical(name, spec["values"])
            else:
                values[name] = trial.suggest_float(name, spec["low"], spec["high"], log=spec["log"])
        return values

    def prepare(self, trial):
        """Suggest the trial's values; a duplicate of a live trial raises ``optuna.TrialPruned``. Returns (config, run folder)."""
        import optuna

        self.last_was_duplicate = False
        values = self.suggest(trial)
        owner = self.owner(trial.number, _key(values, self.names))
        if owner is not None:
            self.last_was_duplicate = True
            trial.set_user_attr("duplicate_of", owner)
            raise optuna.TrialPruned(f"same parameters as trial {owner}")
        run_dir = self.out / RUNS_DIR / f"trial-{trial.number}"
        retry_of = trial.user_attrs.get("retry_of")
        if retry_of is not None and not run_dir.exists():
            previous = self.out / RUNS_DIR / f"trial-{retry_of}"
            if previous.is_dir():
                previous.rename(run_dir)
                trial.set_user_attr("resumed_from", retry_of)
        trial.set_user_attr("run_dir", str(Path(RUNS_DIR) / run_dir.name))
        trial.set_user_attr("worker", f"{platform.node()}:{os.getpid()}")
        trial.set_user_attr("sampler_seed", self.sampler_seed)
        config = self.options.config(self.method, self.student, self.seed, **values)
        shown = ", ".join(f"{'T' if k == 'temperature' else k}={v:g}" for k, v in values.items())
        self.options.say(f"[bold]tune: trial {trial.number}[/bold] {shown} -> {run_dir}")
        return config, run_dir

    def finish(self, trial, run_dir: Path, summary: dict) -> float:
        teacher = self.record.get("teacher")
        add_extras(run_dir, self.dataset, teacher, self.options, self.cache)
        trial.set_user_attr("val_accuracy", summary["val_accuracy"])
        trial.set_user_attr("test_accuracy", summary["test_accuracy"])
        trial.set_user_attr("wall_time_s", summary["wall_time_s"])
        return float(summary["val_accuracy"])

    def failed(self, trial, err: IgkdError) -> None:
        """A trial that failed because of its values (e.g. the loss became NaN): recorded, not retried."""
        trial.set_user_attr("error", str(err))
        self.options.say(f"[yellow]tune: trial {trial.number} failed: {err}[/yellow]")

    def objective(self, trial) -> float:
        config, run_dir = self.prepare(trial)
        teacher, attributions = self.record.get("teacher"), self.record.get("attributions")
        try:
            summary = studies.run_training(
                config,
                self.dataset,
                run_dir,
                teacher_path=teacher["path"] if teacher else None,
                attributions_dir=attributions["path"] if attributions and config.p > 0 else None,
                resume=True,
                progress=self.options.progress,
            )
        except IgkdError as err:  # e.g. the loss became NaN: a result of these values, not retried
            self.failed(trial, err)
            raise
        return self.finish(trial, run_dir, summary)

    def cohort(self, size: int, target: int, per_cohort: int | None = None) -> None:
        """Start up to ``size`` trials and train them as cohorts of ``per_cohort`` (default ``size``; grid sampler):
        ask, train together (with ``--executor ray``: a Ray task per cohort), tell.

        A cohort that fails (a NaN loss in one member stops it) is trained again run by run, so only the
        trial whose values fail is recorded as failed.
        """
        import optuna
        from optuna.trial import TrialState

        from igkd.distill.executor import Run, pick

        batch = []
        while len(batch) < size and self.work_left(target):
            with warnings.catch_warnings():  # "heartbeat is supposed to be used with optimize": _heartbeats below keeps it
                warnings.simplefilter("ignore", UserWarning)
                trial = self.study.ask()
            try:
                config, run_dir = self.prepare(trial)
            except optuna.TrialPruned:
                _tell(self.study, trial, state=TrialState.PRUNED)
                self.duplicates += 1
                if self.duplicates >= MAX_DUPLICATES_IN_A_ROW:
                    break
                continue
            self.duplicates = 0
            batch.append((trial, Run(config, run_dir, f"trial {trial.number}")))
        if not batch:
            return
        teacher, attributions = self.record.get("teacher"), self.record.get("attributions")
        inputs = {"teacher_path": teacher["path"] if teacher else None, "attributions_dir": attributions["path"] if attributions else None}
        execute = pick(self.options.executor, self.options.ray_address)
        train = lambda runs, size: execute(runs, self.dataset, cohort_size=size, progress=self.options.progress, trusted=self.options.trusted, **inputs)  # noqa: E731
        try:
            with _heartbeats(self.study, [trial for trial, _ in batch]):  # as optimize() does: a killed worker's trials go stale
                summaries = train([run for _, run in batch], per_cohort or size)
        except IgkdError as err:
            summaries = {}
            if len(batch) == 1:
                self.failed(batch[0][0], err)
            else:
                self.options.say(f"[yellow]tune: a cohort stopped ({err}); its trials continue one by one[/yellow]")
                for trial, run in batch:
                    try:
                        summaries.update(train([run], 1))
                    except IgkdError as single_err:
                        self.failed(trial, single_err)
        for trial, run in batch:
            summary = summaries.get(str(run.out))
            if summary is None:
                _tell(self.study, trial, state=TrialState.FAIL)
            else:
                _tell(self.study, trial, self.finish(trial, run.out, summary))


def _heartbeats(study, trials):
    """Optuna's heartbeat thread for each trial while it trains outside ``study.optimize`` (ask/tell)."""
    import contextlib

    stack = contextlib.ExitStack()
    try:
        from optuna.storages._heartbeat import get_heartbeat_thread
    except ImportError:  # another Optuna: no heartbeat (a killed worker's trials stay RUNNING)
        return stack
    for trial in trials:
        stack.enter_context(get_heartbeat_thread(trial._trial_id, study._storage))
    return stack


def _tell(study, trial, value=None, state=None) -> None:
    """``study.tell``; the grid sampler's ``study.stop()`` on its last point is meant for ``optimize`` and raises
    outside it, after the trial's result is stored: our loop checks the work left itself."""
    try:
        study.tell(trial, value, state=state)
    except RuntimeError as err:
        if "Study.stop" not in str(err):
            raise


def _trial_record(t) -> dict:
    return {
        "number": t.number,
        "state": t.state.name,
        "params": t.params,
        "val_accuracy": t.value,
        "test_accuracy": t.user_attrs.get("test_accuracy"),
        "run_dir": t.user_attrs.get("run_dir"),
        "duplicate_of": t.user_attrs.get("duplicate_of"),
        "retry_of": t.user_attrs.get("retry_of"),
        "error": t.user_attrs.get("error"),
        "worker": t.user_attrs.get("worker"),
        "sampler_seed": t.user_attrs.get("sampler_seed"),
        "started": t.datetime_start.isoformat() if t.datetime_start else None,
        "completed": t.datetime_complete.isoformat() if t.datetime_complete else None,
    }


def write_tune_json(study, out: Path, meta: dict, target: int) -> dict:
    """All trials (every worker's) and the best by validation accuracy (ties: the earlier trial)."""
    from optuna.trial import TrialState

    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: (t.value, -t.number)) if complete else None
    result = {
        **meta,
        "objective": "val_accuracy (validation split held out of train; the test split is never used to choose)",
        "direction": "maximize",
        "target_trials": target,
        "counts": dict(Counter(t.state.name for t in trials)),
        "duplicates": sum("duplicate_of" in t.user_attrs for t in trials),
        "complete": len(complete) >= target,
        "best": None if best is None else {**_trial_record(best), "config": _read_config(out, best)},
        "trials": [_trial_record(t) for t in trials],
    }
    atomic_write_json(out / TUNE_FILE, result)
    return result


def _read_config(out: Path, trial) -> dict | None:
    run_dir = trial.user_attrs.get("run_dir")
    path = out / run_dir / "config.json" if run_dir else None
    try:
        return load_json(path) if path else None
    except (OSError, ValueError):
        return None  # trained by a worker on another machine


def run_tune(
    dataset,
    out,
    *,
    method: str = "kd_ig_at",
    params: str | list[str] | None = None,
    sampler: str = "grid",
    trials: int | None = None,
    grid_file: str | Path | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    seed: int = 0,
    sampler_seed: int | None = None,
    student: str = "k5",
    heartbeat: int | None = None,
    options: StudyOptions | None = None,
    **kwargs,
) -> dict:
    """Join (or start) the Optuna study and train trials until the grid / ``trials`` is done; returns :func:`load_study`.

    ``trials``: the number of completed trials the study aims at (all workers
    together); default and maximum for the grid: its size; required for TPE.
    ``sampler_seed`` (default ``seed``): give each TPE worker its own.
    ``heartbeat``: seconds between this worker's heartbeats (:func:`check_heartbeat`).
    """
    import optuna

    refuse_torchrun()
    heartbeat = check_heartbeat(heartbeat)
    options = study_options(options, kwargs)
    _check_executor(options, sampler)
    out = Path(out)
    methods = parse_methods(method)
    if len(methods) != 1:
        raise IgkdError(f"tune one method at a time, got {', '.join(methods)}")
    method = methods[0]
    student = one_student(student)[0]
    names = parse_params(params)
    space = load_space(names, sampler, grid_file)
    names = list(space)
    points = grid_points(space)
    if sampler == "grid":
        target = len(points) if trials is None else min(at_least_one(trials, "--trials"), len(points))
    elif trials is None:
        raise IgkdError("the TPE sampler needs --trials N (the number of completed trials to aim at)")
    else:
        target = at_least_one(trials, "--trials")
        if points:
            target = min(target, len(points))  # every listed combination can be tried only once
    base, teacher, attributions = _check_space(dataset, space, method, student, seed, options)
    study_name = study_name or f"igkd-tune-{method}-{sampler}-{'-'.join(names)}"
    url = storage or f"sqlite:///{(out / DB_FILE).resolve()}"
    tune_meta = {
        "study_name": study_name,
        "storage": redact(storage) if storage else f"default ({DB_FILE} in the study folder)",
        "sampler": sampler,
        "params": names,
        "space": space,
        "grid_size": len(points) or None,
        "method": method,
        "student": student,
        "seed": seed,
    }
    new = study_record(
        "tune", paired=False, pairing="not applicable: trials differ in hyper-parameters and are compared on validation accuracy",
        methods=[base.method], students=[base.student], runs=[base.seed], subset=1.0, independent=False, configs={base.method: base},
        dataset=dataset, teacher=teacher, attributions=attributions, options=options, cohort_size=options.cohort_size if sampler == "grid" else 1,
        tune=tune_meta, plan=[],
    )
    record = join_study_file(out, new)

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures and duplicates are reported by our own lines
    sampler_seed = seed if sampler_seed is None else sampler_seed
    chosen = optuna.samplers.GridSampler({n: s["values"] for n, s in space.items()}, seed=sampler_seed) if sampler == "grid" else optuna.samplers.TPESampler(seed=sampler_seed)
    study = optuna.create_study(study_name=study_name, storage=open_storage(url, heartbeat), sampler=chosen, direction="maximize", load_if_exists=True)
    _check_optuna_study(study, {k: tune_meta[k] for k in ("sampler", "params", "space", "method", "student", "seed")} | {
        "dataset": dataset.fingerprint, "teacher": (teacher or {}).get("sha256"), "config": new["configs"][method]
    })
    worker = _Worker(study, space, names, out, dataset, method, student, seed, options, record, sampler_seed)
    # Cohorts for the grid (its points are known up front); TPE proposes each trial from the results before it.
    cohort_size = 1
    if sampler == "grid":
        from igkd.devices import resolve_device
        from igkd.distill.executor import default_cohort_size

        cohort_size = options.cohort_size or default_cohort_size(resolve_device(options.device))
    duplicates_in_a_row = 0
    try:
        while True:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            worker.requeue_interrupted()
            if not worker.work_left(target):
                break
            if options.executor == "ray":  # every point left at once, a Ray task per cohort
                worker.cohort(target, target, per_cohort=cohort_size)
                duplicates_in_a_row = worker.duplicates
            elif cohort_size > 1:
                worker.cohort(cohort_size, target)
                duplicates_in_a_row = worker.duplicates
            else:
                study.optimize(worker.objective, n_trials=1, catch=(IgkdError,))
                duplicates_in_a_row = duplicates_in_a_row + 1 if worker.last_was_duplicate else 0
            if duplicates_in_a_row >= MAX_DUPLICATES_IN_A_ROW:
                options.say(f"[yellow]tune: the sampler proposed {MAX_DUPLICATES_IN_A_ROW} known points in a row; this worker stops[/yellow]")
                break
            write_tune_json(study, out, tune_meta, target)
    except KeyboardInterrupt:
        options.say("[yellow]tune interrupted: run the same command again; the interrupted trial is retried from its checkpoint[/yellow]")
        write_tune_json(study, out, tune_meta, target)
        raise
    result = write_tune_json(study, out, tune_meta, target)
    running = result["counts"].get("RUNNING", 0)
    if running:
        options.say(f"tune: nothing left to start here; {running} trial(s) still running in other workers")
    return load_study(out)


def _check_executor(options: StudyOptions, sampler: str) -> None:
    """``--executor ray`` trains the grid's points as Ray tasks; TPE proposes each trial from the ones before it."""
    from igkd.distill.executor import pick

    pick(options.executor, options.ray_address)
    if options.executor == "ray" and sampler != "grid":
        raise IgkdError("--executor ray trains the grid sampler's points on a cluster; for tpe start several workers on one --storage instead (docs/distributed.md)")


def _check_optuna_study(study, identity: dict) -> None:
    """A study name in a shared database must not be reused for a different search."""
    saved = study.user_attrs.get("igkd")
    current = json.loads(json.dumps(identity))
    if saved is None:
        study.set_user_attr("igkd", current)
        return
    key = first_difference(saved, current)
    if key is not None:
        raise IgkdError(
            f"Optuna study {study.study_name!r} in this storage was started with {key} = {saved.get(key)!r}, not {current.get(key)!r}: "
            "use the same options to join it, or another --study-name"
        )


def _check_space(dataset, space: dict, method: str, student: str, seed: int, options: StudyOptions):
    """Every value of the space must make a valid run, with its teacher and maps: checked before anything trains."""
    base = options.config(method, student, seed)
    if not base.val_fraction > 0:
        raise IgkdError("tuning selects on validation accuracy: --val-fraction must be above 0")
    configs = {method: base}
    for name, spec in space.items():
        for value in spec.get("values") or [spec["low"], spec["high"]]:
            configs[f"{method} {name}={value:g}"] = options.config(method, student, seed, **{name: value})
    from igkd.distill.config import refuse_no_effect

    refuse_no_effect(list(configs.values()), {name: "--params" for name in space})  # e.g. T of a method without KD
    teacher, attributions = input_records(options, dataset, configs)
    check_inputs(configs, options, teacher, attributions)
    return base, teacher, attributions


