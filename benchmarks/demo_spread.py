"""The spread of ``igkd demo``'s accuracies and wall time over seeds, thread counts and CPU kernels.

The same command, ``igkd demo --out DIR --seed S --json``, run once per cell of the grid
seeds x ``OMP_NUM_THREADS`` x ``ATEN_CPU_CAPABILITY`` (``default`` leaves it unset: PyTorch picks the
best kernels for the CPU), ONE RUN AT A TIME, each in a fresh folder (the demo resumes finished runs,
so a reused folder would not train). float32 rounding differs between kernels and thread counts and
compounds over training, so the accuracies differ between cells of the same seed; the wall time
depends on the load, which each run records at its start and end (the demo's own machine facts),
beside the busiest other processes at each run's start and end.

Prints one JSON object; ``--out`` writes it too, after every run (``"complete": false`` until the
grid is done). Run it under the load you want to describe, e.g.

    nice -n 5 python benchmarks/demo_spread.py --out benchmarks/results/demo_spread_cpu.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import emit, load_average  # noqa: E402

from igkd.provenance import cpu_model, environment  # noqa: E402

MODELS = {"teacher": "teacher_test_accuracy", "student": "student_test_accuracy", "kd_ig": "kd_ig_test_accuracy"}


def busy_processes(min_cpu: float = 5.0, width: int = 140) -> list[str]:
    """The other processes using at least ``min_cpu`` % of a core (``ps``'s lifetime average), busiest first."""
    try:
        listing = subprocess.run(["ps", "-eo", "pid=,ni=,pcpu=,etime=,args="], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    mine = {os.getpid()}
    rows = []
    for line in listing.splitlines():
        pid, nice, cpu, elapsed, command = line.split(None, 4)
        if int(pid) not in mine and float(cpu) >= min_cpu:
            rows.append((float(cpu), f"pid {pid} nice {nice} {cpu}% cpu for {elapsed}: {command[:width]}"))
    return [text for _, text in sorted(rows, reverse=True)]


def demo_env(threads: int, capability: str) -> dict:
    """The environment of one cell: its thread count, and its kernels (``default`` unsets the variable)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability != "default":
        env["ATEN_CPU_CAPABILITY"] = capability
    return env


def run_cell(python: str, folder: Path, seed: int, threads: int, capability: str) -> dict:
    """One ``igkd demo`` in a fresh folder; its accuracies, wall time and machine facts."""
    others_start = busy_processes()
    command = [python, "-m", "igkd.cli", "demo", "--out", str(folder), "--seed", str(seed), "--json"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=demo_env(threads, capability))
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"demo_spread: {' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout)
    machine = result["machine"]
    return {
        "seed": seed,
        "threads_requested": threads,
        "capability_requested": capability,
        "threads": machine["threads"],
        "cpu_capability": machine["cpu_capability"],
        "test_accuracy": {name: result[key] for name, key in MODELS.items()},
        "kd_ig_minus_student": round(result["kd_ig_test_accuracy"] - result["student_test_accuracy"], 2),
        "wall_time_s": result["wall_time_s"],
        "process_time_s": round(seconds, 1),
        "load_average_1_5_15_min": machine["load_average_1_5_15_min"],
        "other_processes": {"start": others_start, "end": busy_processes()},
        "folder": str(folder),
    }


def spread(runs: list[dict], key) -> dict:
    values = [key(r) for r in runs]
    return {"min": min(values), "max": max(values), "n": len(values)} if values else {}


def summarise(runs: list[dict]) -> dict:
    """Ranges over all runs and per (capability, threads): accuracies, KD_IG - Student, wall time, 1-minute load."""
    def ranges(group: list[dict]) -> dict:
        return {
            **{f"{name}_test_accuracy": spread(group, lambda r, n=name: r["test_accuracy"][n]) for name in MODELS},
            "kd_ig_minus_student": spread(group, lambda r: r["kd_ig_minus_student"]),
            "wall_time_s": spread(group, lambda r: r["wall_time_s"]),
            "load_1_min_start": spread(group, lambda r: r["load_average_1_5_15_min"]["start"][0]),
            "load_1_min_end": spread(group, lambda r: r["load_average_1_5_15_min"]["end"][0]),
        }

    cells = sorted({(r["cpu_capability"], r["threads"]) for r in runs})
    return {"all": ranges(runs),
            "by_capability_and_threads": {f"{c} x {t} threads": ranges([r for r in runs if (r["cpu_capability"], r["threads"]) == (c, t)])
                                          for c, t in cells}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="OMP_NUM_THREADS of each cell.")
    parser.add_argument("--capabilities", nargs="+", default=["default", "avx2"],
                        help="ATEN_CPU_CAPABILITY of each cell; 'default' leaves it unset.")
    parser.add_argument("--work", type=Path, default=None, help="Where the demos' folders go (a new folder under it; default: a temporary one).")
    parser.add_argument("--python", default=sys.executable, help="The Python that runs igkd.")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="demo-spread-", dir=args.work))
    result = {
        "benchmark": "demo_spread",
        "what": "igkd demo --seed S --json, one run at a time, per seed x OMP_NUM_THREADS x ATEN_CPU_CAPABILITY (default = unset): "
                "test accuracies on digits, wall time, and the load each run saw",
        "complete": False,
        "settings": {"seeds": args.seeds, "threads": args.threads, "capabilities": args.capabilities, "work": str(work),
                     "niceness": os.nice(0)},
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "load_average_1_5_15_min": {"before": load_average(), "after": None},
                    **{k: environment("cpu")[k] for k in ("torch", "git_sha", "command")}},
        "runs": [],
    }
    for seed, threads, capability in itertools.product(args.seeds, args.threads, args.capabilities):
        folder = work / f"seed{seed}-threads{threads}-{capability}"
        result["runs"].append(run_cell(args.python, folder, seed, threads, capability))
        result["summary"] = summarise(result["runs"])
        if args.out:
            emit(result, args.out)
    result["complete"] = True
    result["machine"]["load_average_1_5_15_min"]["after"] = load_average()
    return emit(result, args.out)


if __name__ == "__main__":
    main()
