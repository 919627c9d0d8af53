"""IG throughput: igkd's ``integrated_gradients`` against the reference recipe, same machine, same images.

Reference recipe (the authors' precompute): Captum ``IntegratedGradients`` on batches of 8
images, 50 Gauss-Legendre steps, fp32, model parameters with ``requires_grad=True``.
Ours: the same integral, parameter gradients off, ``max_batch`` interpolated samples per
pass. Model: the teacher architecture (``build_model("teacher")``) with random weights
(seed 0), BatchNorm statistics calibrated on 256 random images, in eval mode; images: uniform random 32x32 (seed 0); targets: random classes.

The two run in interleaved rounds (the order alternates) so that load from other
processes hits both alike; the ratio is the sum of reference times over the sum of ours.
Without Captum (the GPU machine has none) ours is measured alone. Records threads, the load
average before and after, the precision ours used (``--precision``; auto chooses on CUDA) and
the projected time of the 50,000 CIFAR-10 training images at the measured rate.
Prints one JSON object; ``--out`` also writes it to a file.

    python benchmarks/ig_throughput.py --images 32 --out benchmarks/results/ig_throughput_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import emit, machine_record, run_args  # noqa: E402

from igkd.attribution import reduce_map  # noqa: E402
from igkd.attribution.engine import default_max_batch  # noqa: E402
from igkd.attribution.integrated_gradients import integrated_gradients_attribution  # noqa: E402
from igkd.models import build_model  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibrated_teacher(generator: torch.Generator) -> torch.nn.Module:
    """Random teacher weights; BatchNorm statistics set from 256 random images so that
    activations and logits have a realistic scale (with the init statistics the logits
    are ~1e-9 and every comparison drowns in cancellation)."""
    model = build_model("teacher")
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.rand(64, 3, 32, 32, generator=generator))
    return model.eval()


def reference_ig(model, images, targets, steps: int, batch: int) -> torch.Tensor:
    """The reference recipe: Captum IG, ``batch`` images per call, parameter gradients on."""
    from captum.attr import IntegratedGradients

    for parameter in model.parameters():
        parameter.requires_grad_(True)
    explainer = IntegratedGradients(model)
    parts = []
    for start in range(0, images.shape[0], batch):
        x = images[start : start + batch]
        parts.append(explainer.attribute(x, baselines=torch.zeros_like(x), target=targets[start : start + batch], n_steps=steps).detach())
    model.zero_grad(set_to_none=True)
    return torch.cat(parts)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="Images in total (a multiple of rounds x reference batch).")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=4, help="Interleaved rounds (reference and ours alternate).")
    parser.add_argument("--reference-batch", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=None, help="Our samples per pass (default: the device budget).")
    parser.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="Ours (bf16 needs CUDA).")
    parser.add_argument("--seed", type=int, default=0)
    args, load_before = run_args(parser, argv)
    device = torch.device(args.device)
    try:
        import captum  # noqa: F401

        with_reference = True
    except ImportError:
        with_reference = False
    per_round = args.images // args.rounds
    if per_round * args.rounds != args.images or per_round % args.reference_batch:
        parser.error("--images must be a multiple of rounds x reference batch")

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = calibrated_teacher(generator).to(device)
    images = torch.rand(args.images, 3, 32, 32, generator=generator).to(device)
    targets = torch.randint(0, 10, (args.images,), generator=generator).to(device)
    channels_last = {"auto": None, "on": True, "off": False}[args.channels_last]

    used = set()

    def ours(x, t):
        result = integrated_gradients_attribution(model, x, t, baseline="black", n_steps=args.steps, max_batch=args.max_batch,
                                                  channels_last=channels_last, precision=args.precision, with_delta=False)
        used.add(result.precision)
        return result.values

    ours(images[:2], targets[:2])  # warm-up (allocator, oneDNN primitives)
    if with_reference:
        reference_ig(model, images[:2], targets[:2], 4, args.reference_batch)
    times = {"reference": 0.0, "igkd": 0.0}
    results = {"reference": [], "igkd": []}
    for r in range(args.rounds):
        part = slice(r * per_round, (r + 1) * per_round)
        order = (("reference", "igkd") if r % 2 == 0 else ("igkd", "reference")) if with_reference else ("igkd",)
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            out = reference_ig(model, images[part], targets[part], args.steps, args.reference_batch) if name == "reference" else ours(images[part], targets[part])
            synchronize(device)
            times[name] += time.perf_counter() - start
            results[name].append(out.cpu())
    mine = torch.cat(results["igkd"])
    report = {
        "benchmark": "ig_throughput",
        "command": " ".join(["python", "benchmarks/ig_throughput.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": f"teacher (MobileNetV2-CIFAR, random weights, seed {args.seed}, BN statistics from 256 random images), eval mode",
        "data": f"{args.images} uniform random 32x32 images, random targets (seed {args.seed})",
        "steps": args.steps,
        "rule": "gausslegendre",
        "baseline": "black",
        "reference": None,
        "igkd": {
            "recipe": "igkd.attribution.integrated_gradients, parameter grads off",
            "max_batch": args.max_batch or default_max_batch(device, 32, 32),
            "channels_last": args.channels_last,
            "precision_requested": args.precision,
            "precision_used": sorted(used),
            "seconds": round(times["igkd"], 3),
            "images_per_s": round(args.images / times["igkd"], 3),
            "projected_50000_images_s": round(50_000 * times["igkd"] / args.images, 1),
        },
        "machine": machine_record(device, load_before),
    }
    if with_reference:
        reference = torch.cat(results["reference"])
        ref_maps, my_maps = reduce_map(reference), reduce_map(mine)
        report["reference"] = {
            "recipe": f"captum IntegratedGradients, batches of {args.reference_batch}, fp32, parameter requires_grad=True",
            "seconds": round(times["reference"], 3),
            "images_per_s": round(args.images / times["reference"], 3),
        }
        report.update({
            "speedup": round(times["reference"] / times["igkd"], 3),
            "max_abs_diff_attributions": float((mine - reference).abs().max()),
            "max_rel_diff_attributions": float((mine - reference).abs().max() / reference.abs().max()),
            "max_abs_diff_maps": float((my_maps - ref_maps).abs().max()),
            "max_rel_diff_maps": float((my_maps - ref_maps).abs().max() / ref_maps.abs().max()),
        })
    else:
        report["reference"] = "not measured: captum is not installed here"
    return emit(report, args.out)


if __name__ == "__main__":
    main()
