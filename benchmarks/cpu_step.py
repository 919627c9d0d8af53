"""igkd's real training step against a bare PyTorch step of the same models and loss, on the CPU.

* ``igkd``: :meth:`igkd.distill.loop.Trainer.step` of a KD_IG run as ``igkd reproduce --profile cpu``
  trains it (k5 and teacher at width 0.5, batch 64, SGD + Nesterov): the device-resident loader's
  crop/flip of images and maps, the overlay, the frozen teacher on the same view, the KD loss,
  backward, optimizer and schedule steps, and the loss/accuracy bookkeeping;
* ``bare``: the least a hand-written loop does for the same training: ready-made channels_last
  batches, the frozen teacher under ``no_grad``, the same KD loss, backward, SGD step.

The two run interleaved in rounds (the order alternates), so the load of other processes falls on
both; the figure that matters is the ratio igkd / bare (the issue's bar: at least 0.9). With
``--cpu-bf16`` both sides run the same precision policy. ``--precision`` also times bf16 against fp32
for the teacher's forward and the student's step (:func:`igkd.distill.precision.choose_cpu_bf16`,
the rule ``igkd reproduce --profile cpu`` applies). Prints one JSON object (``--out`` writes it too).

    python benchmarks/cpu_step.py --precision --out benchmarks/results/cpu_step_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import emit, machine_record, run_args  # noqa: E402

from igkd.devices import autocast, frozen_copy, prepare_model  # noqa: E402
from igkd.distill import Trainer, resolve_config  # noqa: E402
from igkd.distill.losses import kd_loss  # noqa: E402
from igkd.doctor import tiny_dataset  # noqa: E402
from igkd.models import build_model  # noqa: E402


def igkd_stepper(config, dataset, teacher, maps, folder: Path):
    """One call = one real step of igkd's loop on its next batch (a new epoch when the loader runs out)."""
    trainer = Trainer(config, dataset, folder, teacher=teacher, ig_maps=maps, progress=False)
    trainer.model.train()
    state = {"epoch": 0, "batches": iter(()), "offset": 0}

    def step() -> int:
        batch = next(state["batches"], None)
        if batch is None:
            state["epoch"] += 1
            trainer.begin_epoch(state["epoch"])
            state["batches"], state["offset"] = iter(trainer.loader), 0
            batch = next(state["batches"])
        loss, hits = trainer.step(batch, state["offset"])
        n = len(batch.labels) // batch.streams
        state["offset"] += n
        return n

    return step


def bare_stepper(config, teacher, batches: int, image_size: int):
    """One call = one step of the same models and loss, hand-written: no loader, no overlay, no schedule."""
    torch.manual_seed(config.seed)
    student = prepare_model(build_model(config.student, width=config.width), torch.device("cpu")).train()
    frozen = frozen_copy(teacher, torch.device("cpu"), bf16=config.cpu_bf16 != "off")
    optimizer = torch.optim.SGD(student.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(0)
    data = [(torch.rand(config.batch_size, 3, image_size, image_size, generator=generator).contiguous(memory_format=torch.channels_last),
             torch.randint(0, 10, (config.batch_size,), generator=generator)) for _ in range(batches)]
    state = {"i": 0}
    cpu = torch.device("cpu")

    def step() -> int:
        x, y = data[state["i"] % len(data)]
        state["i"] += 1
        with torch.no_grad(), autocast(cpu, True, cpu=config.cpu_bf16 != "off"):
            t = frozen(x).float()
        with autocast(cpu, True, cpu=config.cpu_bf16 == "all"):
            s = student(x)
        loss = kd_loss(s, t, y, config.alpha, config.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return len(y)

    return step


def timed(step, steps: int) -> tuple[int, float]:
    tick = time.perf_counter()
    images = sum(step() for _ in range(steps))
    return images, time.perf_counter() - tick


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="kd_ig")
    parser.add_argument("--student", default="k5")
    parser.add_argument("--width", type=float, default=0.5, help="Width of the student and the teacher.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=1280, help="Synthetic training images (32x32).")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=8, help="Timed steps per side per round.")
    parser.add_argument("--cpu-bf16", default="off", choices=("off", "teacher", "all"))
    parser.add_argument("--precision", action="store_true", help="Also time bf16 against fp32 (the cpu profile's rule).")
    args, load_before = run_args(parser, argv)
    dataset = tiny_dataset(n_train=args.images, n_test=64, size=32, classes=10, name="cpu-step")
    maps = torch.rand(args.images, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    teacher = build_model("teacher", width=args.width).eval()
    config = resolve_config(args.method, "improved", student=args.student, width=args.width, batch_size=args.batch_size, lr=0.05, epochs=100,
                            val_fraction=0.0, device="cpu", cpu_bf16=args.cpu_bf16)
    with tempfile.TemporaryDirectory() as folder:
        sides = {"igkd": igkd_stepper(config, dataset, teacher, maps, Path(folder) / "run"),
                 "bare": bare_stepper(config, teacher, args.images // args.batch_size, 32)}
        for step in sides.values():  # warm-up: allocator and oneDNN's kernel choice
            timed(step, 2)
        rates: dict[str, list[float]] = {name: [] for name in sides}
        for r in range(args.rounds):
            for name in (("igkd", "bare") if r % 2 == 0 else ("bare", "igkd")):
                images, seconds = timed(sides[name], args.steps)
                rates[name].append(images / seconds)
    ratios = [a / b for a, b in zip(rates["igkd"], rates["bare"])]
    result = {
        "benchmark": "cpu_step",
        "what": f"images/s of igkd's training step (Trainer.step, {args.method}, {args.student} and teacher at width {args.width}, batch "
                f"{args.batch_size}, cpu_bf16 {args.cpu_bf16}) and of a bare PyTorch step of the same models and loss, interleaved",
        "images_per_s": {name: round(statistics.median(values), 1) for name, values in rates.items()},
        "per_round_images_per_s": {name: [round(v, 1) for v in values] for name, values in rates.items()},
        "igkd_over_bare": {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3), "max": round(max(ratios), 3),
                           "per_round": [round(r, 3) for r in ratios]},
        "settings": vars(args) | {"out": str(args.out) if args.out else None},
    }
    if args.precision:
        from igkd.distill.precision import choose_cpu_bf16

        result["bf16"] = choose_cpu_bf16(teacher, build_model(args.student, width=args.width), batch_size=args.batch_size, rounds=args.rounds)
    result["machine"] = machine_record(torch.device("cpu"), load_before)
    return emit(result, args.out)


if __name__ == "__main__":
    main()
