"""Cohort training throughput: the loop's real step for a cohort of G runs vs G runs one after another.

Each cohort member is a KD_IG student (the paper's k5 at batch 64 per member by default) with its
own seed, so every member has its own data stream, overlay draws and teacher pass (the cohort's
worst case: no view is shared). The step timed is ``igkd.distill.loop.Trainer.step``: crop/flip,
IG overlay, the frozen teacher on every view, the fused student forward/backward, Adam. The
single-run side is the same step of a G = 1 trainer; G sequential runs take G times its time.

Steps are timed in interleaved rounds (one step of the single run, then one of each cohort, ...),
so load on a shared machine hits every side alike; medians are reported. Prints one JSON object
(``--out`` also writes it); one line per G goes to stderr as it finishes.

    python benchmarks/cohort_throughput.py --quick --out benchmarks/results/cohort_throughput_cpu.json
    python benchmarks/cohort_throughput.py --device cuda --groups 1,2,4,8,16,40 --steps 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import emit, load_average, machine_record  # noqa: E402

from igkd.distill import Trainer, resolve_config  # noqa: E402
from igkd.doctor import tiny_dataset  # noqa: E402
from igkd.models import build_model  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_trainer(args, dataset, teacher, maps, G: int, folder: Path) -> Trainer:
    configs = [
        resolve_config(args.method, "paper", student=args.student, seed=g, batch_size=args.batch_size, epochs=1, device=args.device, val_fraction=0.0)
        for g in range(G)
    ]
    trainer = Trainer(configs, dataset, [folder / f"G{G}-m{g}" for g in range(G)], teacher=teacher, ig_maps=maps, progress=False)
    trainer.begin_epoch(1)
    trainer.model.train()
    return trainer


def stepper(trainer: Trainer):
    """A callable doing one step of ``trainer`` on its next batch (the epoch restarts when it runs out)."""
    state = {"batches": iter(trainer.loader), "offset": 0}

    def step() -> None:
        try:
            batch = next(state["batches"])
        except StopIteration:
            state["batches"], state["offset"] = iter(trainer.loader), 0
            batch = next(state["batches"])
        trainer.step(batch, state["offset"])
        state["offset"] += len(batch.labels) // batch.streams

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--method", default="kd_ig")
    parser.add_argument("--student", default="k5")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--groups", default="1,2,4,8,16,40", help="Cohort sizes G, comma-separated.")
    parser.add_argument("--steps", type=int, default=10, help="Timed rounds.")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="G = 1, 2, 4; 3 timed rounds, 1 warm-up (CPU: a few minutes).")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.groups, args.steps, args.warmup = "1,2,4", 3, 1
    groups = [int(g) for g in str(args.groups).split(",")]
    device = torch.device(args.device)
    load_before, started = load_average(), time.perf_counter()
    dataset = tiny_dataset(n_train=max(4 * args.batch_size, 256), n_test=32, size=32, classes=10, seed=0)
    torch.manual_seed(0)
    teacher = build_model("teacher", num_classes=10).eval()
    maps = torch.rand(len(dataset.train), 32, 32, generator=torch.Generator().manual_seed(0)).half()
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {G: make_trainer(args, dataset, teacher, maps, G, Path(tmp)) for G in sorted(set([1, *groups]))}
        steps = {G: stepper(t) for G, t in trainers.items()}
        for _ in range(args.warmup):
            for step in steps.values():
                step()
        sync(device)
        times: dict[int, list[float]] = {G: [] for G in steps}
        for _ in range(args.steps):
            for G, step in steps.items():
                tick = time.perf_counter()
                step()
                sync(device)
                times[G].append(time.perf_counter() - tick)
    single = statistics.median(times[1])
    rows = []
    for G in groups:
        fused = statistics.median(times[G])
        row = {
            "G": G,
            "seconds_per_step": round(fused, 4),
            "seconds_per_step_G_single_runs": round(G * single, 4),
            "images_per_s_per_member": round(args.batch_size / fused, 1),
            "images_per_s_per_member_single": round(args.batch_size / single, 1),
            "per_member_speedup": round(G * single / fused, 3),
            "step_times_s": [round(t, 4) for t in times[G]],
        }
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "step_times_s"}), file=sys.stderr, flush=True)
    result = {
        "benchmark": "cohort_throughput",
        "what": f"igkd's training step (Trainer.step) of a cohort of G {args.method} {args.student} runs with distinct seeds, batch "
                f"{args.batch_size} per member, 32x32, Adam, channels_last, teacher pass per view, vs G single runs one after another",
        "steps": args.steps, "warmup": args.warmup, "quick": args.quick,
        "rows": rows,
        "single_run_seconds_per_step": round(single, 4),
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": machine_record(device, load_before),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
