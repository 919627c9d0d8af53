"""Training-step throughput: igkd's device-resident pipeline vs a reference-style pipeline.

Both train the same student with the same loss (KD_IG: teacher forward + KD loss + IG overlay),
Adam, the same batch size, on the same synthetic CIFAR-sized images and maps. They differ in
the input pipeline and the memory layout:

* reference: a per-sample ``torch.utils.data.Dataset`` doing crop/flip and the IG overlay in
  numpy per image, collated by a ``DataLoader`` (as in the authors' code);
* igkd: the whole split on the device as uint8, batched crop/flip (``DeviceLoader``) and batched
  overlay (``ig_overlay``), models and batches in channels_last (igkd's default layout).

Prints one JSON object: training images/s of both and their ratio, and the same for the input
pipeline alone (batches produced, no model), all measured in one run on one machine. On a CPU the
model dominates the step; on a GPU the input pipeline is what starves it.

    python benchmarks/train_throughput.py --images 1024 --steps 12 --student k5
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from igkd.data.loader import DeviceLoader
from igkd.distill.losses import kd_loss
from igkd.distill.overlay import ig_overlay
from igkd.models import build_model
from igkd.provenance import environment


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


def train_steps(batches, student, teacher, steps: int, channels_last: bool) -> float:
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    done, start = 0, None
    for step, (x, y) in enumerate(batches()):
        if step == 2:  # warm-up
            start, done = time.perf_counter(), 0
        if step == steps + 2:
            break
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            t = teacher(x)
        loss = kd_loss(student(x), t, y, 0.01, 2.5)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done += len(y)
    return done / (time.perf_counter() - start)


def pipeline_only(batches, steps: int) -> float:
    """Images/s of producing augmented batches alone (no model): the input pipeline's own cost."""
    done, start = 0, None
    for step, (x, y) in enumerate(batches()):
        if step == 2:
            start, done = time.perf_counter(), 0
        if step == steps + 2:
            break
        done += len(y)
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--student", default="k5")
    parser.add_argument("--teacher-width", type=float, default=1.0)
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the reference pipeline.")
    args = parser.parse_args()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (args.images,), generator=generator)
    maps = torch.rand(args.images, 32, 32, generator=generator)
    teacher = build_model("teacher", width=args.teacher_width).eval().requires_grad_(False)

    dataset = ReferenceStyleDataset(images.permute(0, 2, 3, 1).numpy(), labels.numpy(), maps.numpy(), args.p, 0)

    def reference_batches():
        while True:
            yield from torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)

    loader = DeviceLoader(images, labels, args.batch_size, seed=0, extras={"ig": maps.half()})
    overlay_rng = torch.Generator().manual_seed(0)

    def igkd_batches():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            for batch in loader:
                yield ig_overlay(batch.images, batch.extras["ig"], args.p, overlay_rng), batch.labels
            epoch += 1

    ref_pipe, ours_pipe = pipeline_only(reference_batches, 4 * args.steps), pipeline_only(igkd_batches, 4 * args.steps)
    ref = train_steps(reference_batches, build_model(args.student), teacher, args.steps, channels_last=False)
    teacher = teacher.to(memory_format=torch.channels_last)
    ours = train_steps(igkd_batches, build_model(args.student).to(memory_format=torch.channels_last), teacher, args.steps, channels_last=True)
    env = environment("cpu")
    print(json.dumps({
        "benchmark": "train_throughput",
        "student": args.student, "teacher_width": args.teacher_width, "batch_size": args.batch_size, "steps": args.steps,
        "p": args.p, "reference_workers": args.workers,
        "reference_images_per_s": round(ref, 1), "igkd_images_per_s": round(ours, 1), "ratio": round(ours / ref, 3),
        "pipeline_only": {"reference_images_per_s": round(ref_pipe, 1), "igkd_images_per_s": round(ours_pipe, 1), "ratio": round(ours_pipe / ref_pipe, 2)},
        "device": env["device_name"], "torch": env["torch"], "git_sha": env["git_sha"], "threads": torch.get_num_threads(),
        "command": env["command"],
    }, indent=2))


if __name__ == "__main__":
    main()
