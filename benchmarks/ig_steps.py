"""How many integration steps an IG map needs: completeness error and agreement with a many-step map, per step count.

For a teacher model file and the first ``--images`` training images of a dataset, computes IG
(black baseline, true label, Gauss-Legendre) at each step count in ``--steps`` and reports

* the completeness error: sum |sum(attributions) - (F(x) - F(0))| / sum |F(x) - F(0)| over the images
  (0 for the exact integral);
* the map the overlay uses (|IG| summed over channels) compared with the map at the largest step
  count: mean per-image Pearson correlation, and the mean overlap of the top 10% pixels.

A step count is "enough" for the overlay when its maps agree with the reference, even where the
integral itself is still off. Prints one JSON object (``--out`` writes it too).

    python benchmarks/ig_steps.py --teacher repro-cpu/teacher/model.safetensors --data-dir cifar10-jpeg.zip \\
        --out benchmarks/results/ig_steps_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import emit, machine_record, run_args  # noqa: E402

from igkd.attribution.integrated_gradients import integrated_gradients  # noqa: E402
from igkd.data import load_dataset  # noqa: E402
from igkd.distill.run import load_teacher  # noqa: E402


def top_overlap(a: torch.Tensor, b: torch.Tensor, fraction: float = 0.1) -> float:
    """Mean share of the top ``fraction`` pixels of ``a``'s maps that are also in ``b``'s ([N, H, W])."""
    k = max(1, int(fraction * a[0].numel()))
    top_a, top_b = a.flatten(1).topk(k, 1).indices, b.flatten(1).topk(k, 1).indices
    return float(sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(top_a, top_b)) / (k * len(a)))


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)).mean())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, required=True, help="Teacher model file or run folder.")
    parser.add_argument("--dataset", default="folder")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--steps", default="4,8,16,32,64")
    args, load_before = run_args(parser, argv)
    model, info = load_teacher(args.teacher)
    model.eval()
    data = load_dataset(args.dataset, args.data_dir, progress=False)
    x = data.train.images[: args.images].float().div(255)
    y = data.train.labels[: args.images]
    steps = sorted(int(s) for s in args.steps.split(","))
    maps, rows = {}, []
    for n in steps:
        tick = time.perf_counter()
        values, delta = integrated_gradients(model, x, y, baseline="black", n_steps=n, return_delta=True, precision="fp32")
        seconds = time.perf_counter() - tick
        with torch.no_grad():
            logits_x, logits_0 = model(x), model(torch.zeros_like(x))
        change = (logits_x - logits_0).gather(1, y[:, None]).squeeze(1).double().abs()
        maps[n] = values.abs().sum(1)
        rows.append({"steps": n, "completeness_relative": round(float(delta.double().abs().sum() / change.sum().clamp_min(1e-12)), 4),
                     "seconds": round(seconds, 2), "images_per_s": round(len(x) / seconds, 1)})
    reference = steps[-1]
    for row in rows:
        row["map_correlation_with_%d_steps" % reference] = round(correlation(maps[row["steps"]], maps[reference]), 4)
        row["top10pct_overlap_with_%d_steps" % reference] = round(top_overlap(maps[row["steps"]], maps[reference]), 4)
    result = {
        "benchmark": "ig_steps",
        "what": f"IG (black baseline, true label, Gauss-Legendre) of the first {len(x)} training images of {data.source} by the teacher "
                f"{info['path']} (sha256 {info['sha256'][:12]}) at each step count",
        "rows": rows,
        "machine": machine_record(torch.device("cpu"), load_before),
    }
    return emit(result, args.out)


if __name__ == "__main__":
    main()
