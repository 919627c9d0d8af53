"""Studies beyond one process: `igkd tune` workers on a real PostgreSQL server, studies on a real Ray cluster.

Every test here starts real servers on the loopback address (marked ``cluster``: CI runs them; ``pytest -m "not cluster"``
skips them locally, docs/distributed.md). PostgreSQL's initdb refuses to run as root: as root, the server runs as
the system user ``nobody`` in a folder it owns.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.cluster

SRC = Path(__file__).resolve().parents[1] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra) -> dict:
    """The environment of a child process: this checkout's igkd first, one thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def wait_for(condition, what: str, timeout: float = 300.0, every: float = 0.1):
    """Poll ``condition()`` until it returns something true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


# -- PostgreSQL -----------------------------------------------------------------------------------------


def postgres_bin() -> Path:
    """The folder of initdb / pg_ctl: on PATH, or Debian's /usr/lib/postgresql/<version>/bin (.ci/run installs it)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if not versions:
        pytest.fail("PostgreSQL's initdb is not installed: apt-get install postgresql (bash .ci/run does), or skip with -m 'not cluster'")
    return Path(versions[-1]).parent


def as_server_user(args: list[str]) -> list[str]:
    """initdb and postgres refuse root: as root, run them as ``nobody``."""
    return ["runuser", "-u", "nobody", "--", *args] if os.geteuid() == 0 else args


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server for this module: data folder in a temporary directory, loopback only, trust auth,
    stopped and removed at the end. Yields its SQLAlchemy URL."""
    bin_dir = postgres_bin()
    home = Path(tempfile.mkdtemp(prefix="igkd-pg-"))
    data, sockets, log = home / "data", home / "sockets", home / "server.log"
    sockets.mkdir()
    if os.geteuid() == 0:
        for path in (home, sockets):
            shutil.chown(path, "nobody")
        home.chmod(0o755)
    port = free_port()
    subprocess.run(as_server_user([str(bin_dir / "initdb"), "-D", str(data), "-U", "igkd", "-A", "trust", "--no-sync"]), check=True, capture_output=True)
    options = f"-k {sockets} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "start"]), check=True, capture_output=True)
    try:
        yield f"postgresql://igkd@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]), capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def tune_command(out: Path, teacher: Path, grid: Path, storage: str) -> list[str]:
    return [
        sys.executable, "-m", "igkd.cli", "tune", "--dataset", "digits", "--out", str(out), "--method", "kd", "--grid-file", str(grid),
        "--storage", storage, "--study-name", "pg-grid", "--student", "k17", "--teacher", str(teacher), "--epochs", "2", "--batch-size", "64",
        "--val-fraction", "0.25", "--device", "cpu", "--heartbeat", "2", "--json",
    ]


def running_trial_with_checkpoint(storage: str, out: Path):
    """(trial number, worker pid) of a RUNNING trial that has saved a checkpoint, or None."""
    import optuna
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name="pg-grid", storage=storage)
    except KeyError:  # not created yet
        return None
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        run_dir, worker = t.user_attrs.get("run_dir"), t.user_attrs.get("worker")
        if run_dir and worker and (out / run_dir / "checkpoint.pt").exists() and not (out / run_dir / "summary.json").exists():
            return t.number, int(worker.rsplit(":", 1)[1])
    return None


def test_tune_workers_on_postgresql_lose_no_trial_when_one_is_killed(postgres, tmp_path):
    """Two `igkd tune` workers share a 4-point grid in PostgreSQL; one is killed (SIGKILL) mid-trial, after its
    first checkpoint. Its trial goes stale (heartbeat 2 s, grace 6 s), is marked FAIL and queued again, and the
    retry resumes its checkpoint; the same command run again finishes the study. Every point is trained and
    complete exactly once, every trial is accounted for, and every worker's invocation is in study.json."""
    import optuna
    from optuna.trial import TrialState

    from igkd.models import build_model, save_model

    torch.manual_seed(0)
    teacher, grid, out = tmp_path / "teacher.safetensors", tmp_path / "grid.yaml", tmp_path / "tune"
    save_model(teacher, build_model("teacher", width=0.25, num_classes=10))
    grid.write_text("T: [1, 2]\nalpha: [0.1, 0.5]\n")
    command = tune_command(out, teacher, grid, postgres)
    logs = [open(tmp_path / f"worker-{i}.log", "w") for i in range(2)]
    workers = [subprocess.Popen(command, env=child_env(), stdout=log, stderr=subprocess.STDOUT) for log in logs]
    try:
        number, pid = wait_for(lambda: running_trial_with_checkpoint(postgres, out), "a trial with a checkpoint")
        killed = next(w for w in workers if w.pid == pid)
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
        survivor = next(w for w in workers if w is not killed)
        assert survivor.wait(timeout=600) == 0, (tmp_path / f"worker-{workers.index(survivor)}.log").read_text()
        time.sleep(3 * 2 + 1)  # past the grace period: the killed trial's heartbeat is stale (whatever the survivor did)
        again = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
        for log in logs:
            log.close()
    result = json.loads(again.stdout)
    trials = {t["number"]: t for t in result["trials"]}
    assert result["complete"] and result["counts"].get("COMPLETE") == 4 and "RUNNING" not in result["counts"]
    assert trials[number]["state"] == "FAIL" and trials[number]["error"] is None  # interrupted, not failed for a reason
    retry = [t for t in trials.values() if t["retry_of"] == number]
    assert len(retry) == 1 and retry[0]["state"] == "COMPLETE" and retry[0]["params"] == trials[number]["params"]
    complete = [t for t in trials.values() if t["state"] == "COMPLETE"]
    assert sorted(tuple(sorted(t["params"].items())) for t in complete) == sorted(
        tuple(sorted({"temperature": T, "alpha": a}.items())) for T in (1.0, 2.0) for a in (0.1, 0.5)
    )
    others = [t for t in trials.values() if t["state"] not in ("COMPLETE", "FAIL")]
    assert all(t["state"] == "PRUNED" and t["duplicate_of"] is not None for t in others)
    # the retry resumed the killed trial's checkpoint (its folder was renamed to the retry's)
    study = optuna.load_study(study_name="pg-grid", storage=postgres)
    stored = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert len(stored) == len(trials) and not [t for t in stored.values() if t.state == TrialState.RUNNING]
    assert stored[retry[0]["number"]].user_attrs.get("resumed_from") == number
    assert not (out / "runs" / f"trial-{number}").exists()
    folders = sorted(p.parent.name for p in (out / "runs").glob("trial-*/summary.json"))
    assert folders == sorted(f"trial-{t['number']}" for t in complete)
    invocations = json.loads((out / "study.json").read_text())["invocations"]
    assert len(invocations) == 3  # both workers and the command run again
