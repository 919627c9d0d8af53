"""Studies beyond one process: `igkd tune` workers on a real PostgreSQL server, studies on a real Ray cluster.

The tests marked ``cluster`` start real servers on the loopback address (CI runs them; ``pytest -m "not cluster"``
skips them locally, docs/distributed.md); the others check the executor's choices and cohorts without a server. PostgreSQL's initdb refuses to run as root: as root, the server runs as
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

SRC = Path(__file__).resolve().parents[1] / "src"


def cluster(test):
    """A test that starts servers: marked ``cluster``, and kept on one xdist worker (group ``cluster``, with
    ``--dist loadgroup`` in pyproject.toml), so that two clusters never run at once."""
    return pytest.mark.cluster(pytest.mark.xdist_group("cluster")(test))


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


# -- without a server -----------------------------------------------------------------------------------


def test_executor_choices_are_one_error_line_before_anything_is_written(tiny_dataset, tmp_path, monkeypatch, capsys):
    from igkd.distill.executor import execute, pick
    from igkd.errors import IgkdError
    from igkd.experiments.reproduce import run_reproduce
    from igkd.experiments.studies import run_ablation
    from igkd.experiments.tune import run_tune

    assert pick("local") is execute
    with pytest.raises(IgkdError, match="unknown executor 'slurm': use local or ray"):
        pick("slurm")
    with pytest.raises(IgkdError, match="--ray-address goes with --executor ray"):
        pick("local", "127.0.0.1:6379")
    fast = dict(epochs=1, batch_size=16, device="cpu", progress=False)
    with pytest.raises(IgkdError, match="--budget .* --executor local"):
        run_reproduce(tmp_path / "repro", dataset="digits", quick=True, budget="10m", executor="ray", progress=False)
    with pytest.raises(IgkdError, match="for tpe start several workers"):
        run_tune(tiny_dataset, tmp_path / "tune", method="kd", params="T", sampler="tpe", trials=2, executor="ray", **fast)
    with pytest.raises(IgkdError, match="--heartbeat takes whole seconds, at least 1"):
        run_tune(tiny_dataset, tmp_path / "tune", method="kd", params="T", heartbeat=0, **fast)
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    with pytest.raises(IgkdError, match=r"pip install 'igkd\[ray\]'"):
        run_ablation(tiny_dataset, tmp_path / "study", methods="student", seeds=1, student="k17", executor="ray", **fast)
    from igkd.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["ablation", "--dataset", "digits", "--out", str(tmp_path / "cli"), "--executor", "ray"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "pip install 'igkd[ray]'" in err
    assert not [p.name for p in tmp_path.iterdir()]  # nothing written


def test_ray_cohorts_are_the_local_executors(tiny_dataset, tmp_path, monkeypatch):
    """:func:`igkd.distill.ray_executor.cohorts_of` groups a plan as the local executor does (size, key, order)."""
    from igkd.distill import executor, resolve_config
    from igkd.distill.executor import Run
    from igkd.distill.ray_executor import cohorts_of

    configs = [resolve_config(method=m, seed=s, student="k17", device="cpu", epochs=e) for s in (0, 1) for m, e in (("student", 1), ("kd", 1), ("student", 2))]
    runs = [Run(c, tmp_path / f"run-{i}") for i, c in enumerate(configs)]
    seen = []
    monkeypatch.setattr(executor, "_train", lambda cohort, dataset, inputs, **kw: seen.append([r.out for r in cohort]) or [{} for _ in cohort])
    executor.execute(runs, tiny_dataset, cohort_size=3)
    grouped = [[r.out for r in c] for c in cohorts_of(runs, {str(r.out): 0 for r in runs}, 3)]
    assert grouped == seen == [[runs[i].out for i in (0, 1, 3)], [runs[i].out for i in (2, 5)], [runs[4].out]]


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


@cluster
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


# -- Ray ------------------------------------------------------------------------------------------------


def ray_start(*args: str) -> int:
    """``ray start ...`` with one CPU, a 200 MB object store and fixed loopback ports (it returns once the node is up)."""
    ray = Path(sys.executable).parent / "ray"
    ports = [free_port() for _ in range(5)]
    command = [
        str(ray), "start", *args, "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0", "--object-store-memory", str(200 * 10**6),
        "--disable-usage-stats", "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
        "--min-worker-port", str(ports[2]), "--max-worker-port", str(ports[2] + 50),
    ]
    subprocess.run(command, env=child_env(RAY_USAGE_STATS_ENABLED="0"), check=True, capture_output=True, timeout=300)
    return ports[0]


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray cluster of two nodes on the loopback address (separate processes, one CPU each, no dashboard), its
    session files in a temporary directory, stopped at the end. Yields (address, node manager port of the second node)."""
    temp = Path(tempfile.mkdtemp(prefix="igkd-ray-", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    port = free_port()
    address = f"127.0.0.1:{port}"
    try:
        ray_start("--head", "--port", str(port), "--include-dashboard", "false", "--temp-dir", str(temp))
        second = ray_start("--address", address)
        yield address, second
    finally:
        stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)


def stop_cluster(temp: Path) -> None:
    """End this cluster's processes only (``ray stop`` would end every Ray on the machine): those whose command line
    names its session folder (GCS, raylets, monitors), their children (workers) first; SIGTERM, then SIGKILL."""
    procs = processes()
    ours = {pid for pid, (_, cmd) in procs.items() if str(temp) in cmd}
    children = {pid for pid, (ppid, _) in procs.items() if ppid in ours}
    for group in (children, ours):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in group:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in group):
                time.sleep(0.2)


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of the processes of this machine (Linux /proc)."""
    procs = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            pid = int(stat.split("/")[2])
            ppid = int(Path(stat).read_text().rsplit(")", 1)[1].split()[1])
            procs[pid] = (ppid, Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, ValueError, IndexError):
            continue
    return procs


ABLATION = ["--dataset", "digits", "--methods", "student,kd", "--seeds", "2", "--student", "k17", "--epochs", "2", "--batch-size", "64", "--device", "cpu"]


def ablation(out: Path, teacher: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "igkd.cli", "ablation", "--out", str(out), "--teacher", str(teacher), *ABLATION, *extra]


@pytest.fixture(scope="module")
def local_study(tmp_path_factory):
    """The 2 methods x 2 seeds x 2 epochs digits ablation trained by the local executor at one thread."""
    from igkd.models import build_model, save_model

    home = tmp_path_factory.mktemp("local")
    torch.manual_seed(0)
    teacher = home / "teacher.safetensors"
    save_model(teacher, build_model("teacher", width=0.25, num_classes=10))
    done = subprocess.run(ablation(home / "study", teacher), env=child_env(), capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr
    return home / "study", teacher


def weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "model.safetensors")


def assert_same_study(a: Path, b: Path) -> None:
    """Same runs, bit-identical weights and the same results.csv (cohort sizes and accuracies included)."""
    runs = sorted(p.name for p in (a / "runs").iterdir())
    assert runs == sorted(p.name for p in (b / "runs").iterdir()) == ["kd-s0", "kd-s1", "student-s0", "student-s1"]
    for run in runs:
        wa, wb = weights(a / "runs" / run), weights(b / "runs" / run)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f"{run}: weights differ"
    assert (a / "results.csv").read_text() == (b / "results.csv").read_text()


@cluster
def test_ablation_on_ray_equals_the_local_executor(ray_cluster, local_study, tmp_path):
    """--executor ray on a 2-node cluster: the same run folders, bit-identical weights (1 thread both)."""
    address, _ = ray_cluster
    local, teacher = local_study
    done = subprocess.run(ablation(tmp_path / "study", teacher, "--executor", "ray", "--ray-address", address), env=child_env(),
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "4 done, 0 running, 0 pending of 4 runs" in done.stdout
    assert_same_study(local, tmp_path / "study")


def task_workers(raylet_port: int) -> list[int]:
    """Pids of the worker processes of the node whose raylet listens on ``raylet_port`` that run an igkd cohort."""
    procs = processes()
    raylets = {pid for pid, (_, cmd) in procs.items() if "raylet" in cmd.split(" ")[0] and f"--node_manager_port={raylet_port}" in cmd}
    return [pid for pid, (ppid, cmd) in procs.items() if ppid in raylets and cmd.startswith("ray::igkd-cohort")]


@cluster
def test_a_killed_worker_node_task_is_retried_and_the_study_finishes_the_same(ray_cluster, local_study, tmp_path):
    """SIGKILL the second node's task worker after a first checkpoint: Ray runs the task again, the run resumes from
    its folder, and the study ends with the local executor's weights."""
    address, second = ray_cluster
    local, teacher = local_study
    out = tmp_path / "study"
    driver = subprocess.Popen(ablation(out, teacher, "--executor", "ray", "--ray-address", address), env=child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def busy_after_a_checkpoint():
            started = [p for p in (out / "runs").glob("*/checkpoint.pt") if not (p.parent / "summary.json").exists()] if (out / "runs").is_dir() else []
            return started and task_workers(second)

        victims = wait_for(busy_after_a_checkpoint, "a checkpoint while the second node trains", timeout=1800, every=0.2)
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        output, _ = driver.communicate(timeout=1800)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 0, output
    assert "4 done, 0 running, 0 pending of 4 runs" in output
    assert_same_study(local, out)
