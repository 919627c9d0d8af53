"""Training-step throughput, split into its two factors: input pipeline and memory layout.

Every variant trains the same student with the same loss (KD_IG: IG overlay, teacher forward, KD
loss, Adam) on the same synthetic CIFAR-sized images and maps, at the same batch size:

* pipeline ``dataloader``: a per-sample ``torch.utils.data.Dataset`` doing crop/flip and the overlay
  in numpy per image, collated by a ``DataLoader`` (as in the authors' code), copied to the device;
* pipeline ``device``: the split on the device as uint8, batched crop/flip (``DeviceLoader``) and
  batched overlay (``ig_overlay``);
* layout ``nchw`` or ``channels_last`` (models and batches).

The four variants run interleaved in rounds (the order rotates), so load from other processes falls
on all of them; each factor is then a ratio of two variants that differ in that factor alone.
Prints one JSON object (``--out`` also writes it), with the projected time of a 100-epoch run on
45,000 images from the fastest variant's rate.

    python benchmarks/train_throughput.py --threads 1 --out benchmarks/results/train_throughput_cpu.json
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import emit, machine_record, run_args  # noqa: E402

from igkd.data.loader import DeviceLoader  # noqa: E402
from igkd.distill.losses import kd_loss  # noqa: E402
from igkd.distill.overlay import ig_overlay  # noqa: E402
from igkd.models import build_model  # noqa: E402


class ReferenceStyleDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, maps: np.ndarray, p: float, seed: int):
        self.images, self.labels, self.maps, self.p = images, labels, maps, p
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i].astype(np.float32) / 255  # HWC
        x = np.pad(x, ((4, 4), (4, 4), (0, 0)))
        dy, dx = self.rng.integers(0, 9, 2)
        x = x[dy : dy + 32, dx : dx + 32]
        if self.rng.random() < 0.5:
            x = x[:, ::-1]
        if self.rng.random() < self.p:
            s = np.exp(self.rng.uniform(np.log(1), np.log(2)))
            m = self.maps[i] ** s
            m = (m - m.min()) / (m.max() - m.min() + 1e-12)
            x = 0.5 * x + 0.5 * np.repeat(m[:, :, None], 3, axis=2)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)), int(self.labels[i])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Variant:
    """One (pipeline, layout) combination: its own student, optimizer and endless batch stream."""

    def __init__(self, pipeline: str, layout: str, args, data, teacher, device):
        self.name, self.layout, self.device = f"{pipeline}+{layout}", layout, device
        torch.manual_seed(0)
        memory = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        self.student = build_model(args.student).to(device).to(memory_format=memory)
        self.teacher = teacher.to(memory_format=memory)
        self.optimizer = torch.optim.Adam(self.student.parameters(), lr=1e-3)
        self.batches = self._stream(pipeline, args, data)
        self.images = 0
        self.seconds = 0.0

    def _stream(self, pipeline, args, data):
        images, labels, maps = data
        if pipeline == "dataloader":
            dataset = ReferenceStyleDataset(images.permute(0, 2, 3, 1).numpy(), labels.numpy(), maps.numpy(), args.p, 0)
            for _ in itertools.count():
                for x, y in torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers):
                    yield x.to(self.device), y.to(self.device)
        loader = DeviceLoader(images.to(self.device), labels, args.batch_size, seed=0, extras={"ig": maps.half()})
        overlay_rng = torch.Generator(device=self.device).manual_seed(0)
        for epoch in itertools.count():
            loader.set_epoch(epoch)
            for batch in loader:
                yield ig_overlay(batch.images, batch.extras["ig"], args.p, overlay_rng), batch.labels

    def step(self) -> int:
        x, y = next(self.batches)
        if self.layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            t = self.teacher(x)
        loss = kd_loss(self.student(x), t, y, 0.01, 2.5)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return len(y)

    def timed(self, steps: int) -> None:
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.images += self.step()
        synchronize(self.device)
        self.seconds += time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4, help="Timed steps per variant per round.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--student", default="k5")
    parser.add_argument("--teacher-width", type=float, default=1.0)
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the reference pipeline.")
    parser.add_argument("--device", default="cpu")
    args, load_before = run_args(parser, argv)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    data = (torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=generator),
            torch.randint(0, 10, (args.images,), generator=generator), torch.rand(args.images, 32, 32, generator=generator))
    torch.manual_seed(0)
    teacher = build_model("teacher", width=args.teacher_width).to(device).eval().requires_grad_(False)
    variants = [Variant(p, layout, args, data, teacher, device) for p in ("dataloader", "device") for layout in ("nchw", "channels_last")]
    for variant in variants:  # warm-up: allocator, oneDNN/cuDNN algorithm choice
        for _ in range(2):
            variant.step()
    for r in range(args.rounds):
        for variant in variants[r % 4 :] + variants[: r % 4]:
            variant.timed(args.steps)
    rate = {v.name: v.images / v.seconds for v in variants}

    def ratio(a, b):
        return round(rate[a] / rate[b], 3)

    best = max(rate.values())
    report = {
        "benchmark": "train_throughput",
        "student": args.student, "teacher_width": args.teacher_width, "batch_size": args.batch_size, "p": args.p,
        "steps_per_round": args.steps, "rounds": args.rounds, "reference_workers": args.workers,
        "images_per_s": {name: round(value, 1) for name, value in rate.items()},
        "factors": {
            "channels_last_alone (device pipeline)": ratio("device+channels_last", "device+nchw"),
            "channels_last_alone (dataloader pipeline)": ratio("dataloader+channels_last", "dataloader+nchw"),
            "device_pipeline_alone (nchw)": ratio("device+nchw", "dataloader+nchw"),
            "device_pipeline_alone (channels_last)": ratio("device+channels_last", "dataloader+channels_last"),
            "both (igkd vs reference-style)": ratio("device+channels_last", "dataloader+nchw"),
        },
        "projected_100_epochs_45000_images_s": round(100 * 45_000 / best, 1),
        "machine": machine_record(device, load_before),
    }
    return emit(report, args.out)


if __name__ == "__main__":
    main()
