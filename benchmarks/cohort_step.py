"""Cohort training step: G members fused into one network vs G separate single-model steps.

One "cohort step" trains every member once on its own batch (cross-entropy, Adam with the
loop's decay/no-decay groups, channels_last):

* single: G models, G optimizers, G forward/backward/step calls one after another;
* fused-grouped / fused-bmm: ``igkd.models.fused.fuse`` of the same G models, one call each,
  1x1 convolutions as grouped convolutions or as one ``torch.bmm``.

Steps are timed in interleaved rounds (one step of every variant per round, so a burst of load
on a shared machine hits all alike); medians are reported. A second, smaller table times the
1x1 convolutions alone (forward + backward) in the two implementations, to choose ``pointwise=``
for a device (it runs first; ``--quick`` then times only its choice in the whole step). Prints one
JSON object (``--out`` also writes it); per-G rows go to stderr as they finish.

    python benchmarks/cohort_step.py --quick --out benchmarks/results/cohort_step_cpu.json
    python benchmarks/cohort_step.py --device cuda --groups 1,2,4,8,16 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from igkd.models import build_model
from igkd.models.fused import FusedConv2d, fuse
from igkd.provenance import environment

sys.path.insert(0, str(Path(__file__).parent))
from machine import emit  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def adam(params_groups) -> torch.optim.Optimizer:
    return torch.optim.Adam(params_groups, lr=1e-3)


def loop_groups(model: torch.nn.Module, weight_decay: float = 5e-4) -> list[dict]:
    named = list(model.named_parameters())
    return [{"params": [p for _, p in named if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for _, p in named if p.ndim <= 1], "weight_decay": 0.0}]


def single_step(models, optimizers, x, y):
    for g, (model, optimizer) in enumerate(zip(models, optimizers)):
        loss = F.cross_entropy(model(x[g].contiguous(memory_format=torch.channels_last)), y[g])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def fused_step(fused, optimizer, x, y):
    logits = fused(x)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / y.shape[1]  # sum of member means
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def time_rounds(variants: dict, steps: int, warmup: int, device: torch.device, sys_share: dict | None = None) -> dict:
    """Median seconds per call of each variant, calls interleaved round by round.

    ``sys_share`` (if given) receives each variant's share of process CPU time spent in the kernel
    (page faults of freshly mapped buffers show up there on a CPU).
    """
    for step in variants.values():
        for _ in range(warmup):
            step()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu = {name: [0.0, 0.0] for name in variants}
    for _ in range(steps):
        for name, step in variants.items():
            before, start = os.times(), time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
            after = os.times()
            cpu[name][0] += after.system - before.system
            cpu[name][1] += after.system - before.system + after.user - before.user
    if sys_share is not None:
        sys_share.update({name: round(s / t, 2) if t else None for name, (s, t) in cpu.items()})
    return {name: statistics.median(t) for name, t in times.items()}


def cohort_table(args, device, modes: tuple[str, ...]) -> list[dict]:
    rows = []
    for G in args.groups:
        torch.manual_seed(G)
        models = [build_model(args.student, width=args.width).to(device).to(memory_format=torch.channels_last).train() for _ in range(G)]
        x = torch.rand(G, args.batch_size, 3, args.size, args.size, device=device)
        y = torch.randint(0, 10, (G, args.batch_size), device=device)
        optimizers = [adam(loop_groups(m)) for m in models]
        variants = {"single": lambda: single_step(models, optimizers, x, y)}
        for mode in modes:
            fused = fuse(models, pointwise=mode).to(memory_format=torch.channels_last)
            optimizer = adam(fused.param_groups(5e-4))
            variants[f"fused-{mode}"] = lambda fused=fused, optimizer=optimizer: fused_step(fused, optimizer, x, y)
        sys_share: dict = {}
        seconds = time_rounds(variants, args.steps, args.warmup, device, sys_share)
        images = G * args.batch_size
        row = {"G": G, "seconds_per_cohort_step": {k: round(v, 4) for k, v in seconds.items()},
               "images_per_s": {k: round(images / v, 1) for k, v in seconds.items()}}
        if device.type == "cpu":
            row["cpu_time_share_in_kernel"] = sys_share
        best = min((f"fused-{mode}" for mode in modes), key=seconds.get)
        row["fastest_fused"] = best
        row["speedup_fused_vs_single"] = round(seconds["single"] / seconds[best], 3)
        rows.append(row)
        print(json.dumps(row), flush=True, file=sys.stderr)
    return rows


def pointwise_table(args, device) -> list[dict]:
    """1x1 convolutions of k5's blocks (channels in -> out at the size they run), fused for G members."""
    rows = []
    G = max(args.groups)
    for cin, cout, size in ((16, 96, args.size), (96, 24, args.size), (32, 192, args.size // 2), (64, 384, args.size // 4)):
        convs = [torch.nn.Conv2d(cin, cout, 1, bias=False).to(device) for _ in range(G)]
        x = torch.rand(args.batch_size, G * cin, size, size, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
        variants = {}
        for mode in ("grouped", "bmm"):
            layer = FusedConv2d(convs, mode).to(memory_format=torch.channels_last)

            def step(layer=layer):
                layer(x).square().sum().backward()

            variants[mode] = step
        seconds = time_rounds(variants, args.steps, args.warmup, device)
        rows.append({"G": G, "in": cin, "out": cout, "size": size,
                     "ms_forward_backward": {k: round(1e3 * v, 3) for k, v in seconds.items()},
                     "faster": min(seconds, key=seconds.get)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--student", default="k5")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--groups", default="1,2,4,8", help="Cohort sizes G, comma-separated.")
    parser.add_argument("--steps", type=int, default=10, help="Timed rounds per G.")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="1 warm-up, 1 timed round, and only the pointwise mode the 1x1 table picks in the whole step (CPU: about 2 minutes).")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup = 1, 1
    args.groups = [int(g) for g in str(args.groups).split(",")]
    device = torch.device(args.device)
    load_before = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    started = time.perf_counter()
    pointwise = pointwise_table(args, device)
    votes = [row["faster"] for row in pointwise]
    choice = max(sorted(set(votes)), key=votes.count)
    cohort = cohort_table(args, device, (choice,) if args.quick else ("grouped", "bmm"))
    env = environment(device)
    result = {
        "benchmark": "cohort_step",
        "command": "python benchmarks/" + env["command"],
        "what": f"one training step of every member: {args.student} width {args.width}, batch {args.batch_size} per member, "
                f"{args.size}x{args.size}, cross-entropy, Adam (decay/no-decay groups), channels_last, train mode",
        "steps": args.steps, "warmup": args.warmup, "quick": args.quick,
        "cohort": cohort,
        "pointwise_1x1": pointwise,
        "pointwise_choice": choice,
        "wall_s": round(time.perf_counter() - started, 1),
        "device": env["device_name"], "torch": env["torch"], "threads": torch.get_num_threads(),
        "load_average_1m": {"before": load_before, "after": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None},
        "environment": env,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
