"""A study's folder: study.json (what the study is: written, read back, checked, grown, locked), results.csv and its runs' records.

::

    STUDY/study.json            what the study is (schema in docs/experiments.md)
    STUDY/results.csv           one line per finished run (method, run, accuracy, ..., the cohort size it trained in)
    STUDY/runs/<run_id>/        one run folder of igkd.distill.run_training (+ the extras, igkd.experiments.extras)
    STUDY/.lock                 held while a process trains the study
    STUDY/.study.json.lock      held while a process merges its invocation into study.json (tune workers)

A command run again on a study folder continues it: :func:`open_study` grows the saved study by
the command's (more seeds or runs, more methods, more students for a sweep) and refuses any other
difference (data, teacher, IG maps, a training setting), because its runs would no longer be
comparable. :func:`load_study` reads a study back with each run's status and files.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timezone
from pathlib import Path

from igkd.atomic import atomic_write_json, atomic_write_text, load_json, read_json_object
from igkd.errors import IgkdError
from igkd.experiments.extras import AGREEMENT_FILE, ROBUSTNESS_FILE, extras_record
from igkd.experiments.inputs import dataset_record
from igkd.locking import folder_lock

STUDY_FILE = "study.json"
RESULTS_FILE = "results.csv"
RUNS_DIR = "runs"
FORMAT = "igkd-study"
FORMAT_VERSION = 1
KINDS = ("ablation", "montecarlo", "sweep-cf", "tune")

#: Config keys that do not change what a run computes (left out of the identity).
NOT_IDENTITY = ("seed", "subset_seed", "student", "device", "compile")
#: What a tune study must keep to be continued (its trial count may change).
TUNE_IDENTITY = ("study_name", "storage", "sampler", "params", "space")


# -- what a study is --------------------------------------------------------------------------------


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def config_identity(config) -> dict:
    values = json.loads(json.dumps(config.to_dict()))
    if values.get("student_arch") is None:  # a family student: the identity studies have always recorded
        for key in ("student_arch", "student_arch_args", "student_normalize"):
            values.pop(key, None)
    return {k: v for k, v in values.items() if k not in NOT_IDENTITY}


def first_difference(saved: dict, current: dict) -> str | None:
    """The first key (sorted) whose value differs between the two dicts, or None."""
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    return changed[0] if changed else None


def study_record(
    kind: str, *, paired: bool, pairing: str, methods: list[str], students: list[str], runs: list[int], subset: float, independent: bool,
    configs: dict, dataset, teacher: dict | None, attributions: dict | None, options, cohort_size: int | None, **kind_keys,
) -> dict:
    """A new study.json (schema in docs/experiments.md), before :func:`open_study` meets it with the saved one.

    ``configs``: the TrainConfig of each method (the first's device is recorded in the invocation); ``options``: the
    StudyOptions (its extras are recorded); ``cohort_size``: the size this command asked for; ``kind_keys``: a kind's
    own keys (tune: ``tune`` and ``plan``), recorded after the extras.
    """
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "paired": paired, "pairing": pairing,
        "methods": methods, "students": students, "runs": runs, "subset": subset, "independent": independent,
        "configs": {m: config_identity(c) for m, c in configs.items()},
        "dataset": dataset_record(dataset), "teacher": teacher, "attributions": attributions, "extras": extras_record(options),
        **kind_keys,
        "created": now(), "updated": now(),
        "invocations": [invocation(configs[methods[0]].device, cohort_size)],
    }


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


# -- the folder: opened, grown, locked, written ------------------------------------------------------


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


def join_study_file(out: Path, new: dict) -> dict:
    """study.json grown by this worker's record (its invocation), read-merged-written under a lock
    so that workers starting together keep every invocation."""
    open_study(out, new)  # refuse a foreign or different folder before creating anything in it
    out.mkdir(parents=True, exist_ok=True)
    with study_file_lock(out):
        record = open_study(out, new)
        atomic_write_json(out / STUDY_FILE, record)
    return record


def study_lock(out: Path):
    """Hold ``out/.lock`` while training, so two processes never run the same study folder at once
    (:func:`igkd.locking.folder_lock`; released when the process dies)."""
    return folder_lock(out, what=f"study {out}")


def study_file_lock(out: Path):
    """Held briefly while study.json is read, merged and written, so concurrent tune workers keep every invocation."""
    return folder_lock(out, name=".study.json.lock", wait=True, what=f"study {out}")


def write_results(study: dict, out: Path) -> None:
    """results.csv: one line per finished run of the plan, in plan order."""
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


# -- reading ----------------------------------------------------------------------------------------


def read_study_file(path: str | Path) -> dict:
    """The study.json at ``path``, checked (:func:`check_study`)."""
    path = Path(path)
    if not path.is_file():
        raise IgkdError(f"no study at {path.parent} (no {STUDY_FILE}): give the folder a study command wrote")
    try:
        study = load_json(path)
    except (OSError, ValueError) as err:
        raise IgkdError(f"{path} is not readable JSON ({err})") from None
    return check_study(study, path)


def check_study(study, path: Path) -> dict:
    """``study`` if it is an igkd study whose plan names one run folder per run (IgkdError, in one line, if not)."""
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
