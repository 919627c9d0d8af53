"""Bring your own networks: compress your own CNN with igkd (docs/own-networks.md).

A ResNet-style teacher and a smaller depthwise-separable student, both written below (plain PyTorch, no
torchvision), go through igkd's pipeline:

1. train the teacher;
2. compute its integrated-gradients maps once (cached, checked on every use);
3. train the student alone (the baseline) and with KD + the IG overlay + attention transfer (kd_ig_at), the
   attention maps taken from layers named as in these networks;
4. evaluate both students on the test split;
5. export the distilled student to ONNX (and ExecuTorch / LiteRT when their extras are installed), each file
   checked against the eager model before it is written.

Data: the offline ``digits`` set (1,797 8x8 digits upscaled to 32x32), or your own image folder with
``--data-dir`` (``train/<class>/*.png`` and ``test/<class>/*.png``, all images of one size).

    python examples/own_networks.py [--data-dir FOLDER] [--out own-networks-run]

The same from the command line (run from this folder so ``own_networks`` is importable):

    igkd train-teacher --dataset digits --out run/teacher --teacher-arch own_networks:resnet_teacher
    igkd attributions compute --teacher run/teacher --teacher-arch own_networks:resnet_teacher --dataset digits --out run/ig
    igkd distill --method kd_ig_at --dataset digits --out run/kd_ig_at --teacher run/teacher \\
        --teacher-arch own_networks:resnet_teacher --attributions run/ig --student-arch own_networks:separable_student \\
        --at-teacher-layer layers.1 --at-student-layer blocks.1
    igkd export run/kd_ig_at --student-arch own_networks:separable_student --format onnx
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn


# -- the networks: any nn.Module mapping [B, 3, H, W] images to [B, K] logits --------------------------------
class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """stem -> residual stages (each after the first halves the resolution, doubles the width) -> pool -> linear."""

    def __init__(self, num_classes: int = 10, width: int = 8, stages: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks, ch = [], width
        for i in range(stages):
            blocks.append(BasicBlock(ch, width * 2**i, 1 if i == 0 else 2))
            ch = width * 2**i
        self.layers = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, num_classes))

    def forward(self, x):
        return self.head(self.layers(self.stem(x)))


def resnet_teacher(num_classes: int = 10, width: int = 8, stages: int = 3) -> nn.Module:
    return ResNet(num_classes, width, stages)


def separable(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    """A depthwise 3x3 and a pointwise 1x1 convolution, each with BatchNorm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_ch, in_ch, 3, stride, 1, groups=in_ch, bias=False), nn.BatchNorm2d(in_ch), nn.ReLU(),
        nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(),
    )


class SeparableNet(nn.Module):
    """A small student of another family: a stem and depthwise-separable blocks."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(separable(width, 2 * width, 2), separable(2 * width, 4 * width, 2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def separable_student(num_classes: int = 10, width: int = 16) -> nn.Module:
    return SeparableNet(num_classes, width)


# -- the pipeline ------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, help="An image folder (train/<class>/, test/<class>/); default: the offline digits set.")
    parser.add_argument("--out", type=Path, default=Path("own-networks-run"), help="Folder for the runs, the IG cache and the exported files.")
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=12, help="Epochs of each student.")
    parser.add_argument("--ig-steps", type=int, default=8, help="Integration steps of the IG maps.")
    args = parser.parse_args()

    from igkd.attribution import compute_attributions
    from igkd.data import load_dataset
    from igkd.deploy.export import export_bytes, write_export
    from igkd.deploy.extras import available
    from igkd.distill import resolve_config, run_training
    from igkd.evaluate.accuracy import evaluate
    from igkd.models import count_parameters, load_model

    started = time.perf_counter()
    data = load_dataset("folder", args.data_dir) if args.data_dir else load_dataset("digits")
    print(f"data: {data.name}, {len(data.train)} training / {len(data.test)} test images of {tuple(data.train.images.shape[1:])}, {data.num_classes} classes")
    common = {"device": "cpu", "val_fraction": 0.1}

    # 1. the teacher: igkd's teacher recipe (SGD + Nesterov, warm-up + cosine, label smoothing) on our ResNet
    teacher_config = resolve_config("student", "teacher", student="teacher", epochs=args.teacher_epochs, batch_size=64, **common)
    teacher_run = run_training(teacher_config, data, args.out / "teacher", student=resnet_teacher, progress=False)
    teacher, _ = load_model(args.out / "teacher" / "model.safetensors", trusted=resnet_teacher)  # the file names its factory: we pass it
    print(f"teacher {teacher_run['params']:,} parameters: test {teacher_run['test_accuracy']:.2f}% ({teacher_run['wall_time_s']:.0f} s)")

    # 2. the teacher's IG maps, once, in dataset order (the overlay reads them; they are checked against this teacher)
    cache = compute_attributions(teacher, data, args.out / "ig", n_steps=args.ig_steps, device="cpu", progress=False)
    manifest = cache.manifest
    print(f"IG maps: {manifest['n']} x {manifest['height']}x{manifest['width']}, {manifest['n_steps']} steps, "
          f"{manifest['wall_s']} s, completeness error {100 * manifest['completeness']['relative']:.2f}% of |F(x)-F(x')|")

    # 3. the student alone, and distilled: KD + IG overlay + attention transfer between layers named as in our networks
    students = {}
    for method in ("student", "kd_ig_at"):
        extra = {"at_teacher_layer": "layers.1", "at_student_layer": "blocks.1"} if method == "kd_ig_at" else {}
        config = resolve_config(method, "improved", epochs=args.epochs, batch_size=64, **common, **extra)  # SGD + cosine: quicker than the paper's Adam
        students[method] = run_training(config, data, args.out / method, teacher=teacher, student=separable_student,
                                        attributions_dir=args.out / "ig", progress=False)
    layers = students["kd_ig_at"]["attention_layers"]
    print(f"attention transfer: teacher {layers['teacher']} {layers['teacher_shape']} -> student {layers['student']} {layers['student_shape']}")

    # 4. evaluation of the saved files (rebuilt by the factory we name)
    for method, summary in students.items():
        model, meta = load_model(args.out / method / "model.safetensors", trusted=separable_student)
        report = evaluate(model, data.test.images, data.test.labels, data.classes, 500, torch.device("cpu"))
        ratio = teacher_run["params"] / count_parameters(model)
        print(f"{method:9s} student {count_parameters(model):,} parameters ({ratio:.1f}x fewer): test {report['accuracy']:.2f}% "
              f"(teacher {teacher_run['test_accuracy']:.2f}%, {summary['wall_time_s']:.0f} s)")

    # 5. export the distilled student: parity-checked on test images, normalisation inside the graph, [0, 1] inputs
    model, _ = load_model(args.out / "kd_ig_at" / "model.safetensors", trusted=separable_student)
    for fmt, suffix in (("onnx", ".onnx"), ("executorch", ".pte"), ("litert", ".tflite")):
        if fmt != "onnx" and not available(fmt):
            print(f"{fmt}: not installed (pip install 'igkd[{fmt}]'), skipped")
            continue
        payload, report = export_bytes(model, fmt, batch=data.test.images[:16], batch_source="16 test images", classes=list(data.classes))
        report = write_export(args.out / f"student{suffix}", payload, report)
        print(f"{fmt}: wrote {report['path']} ({report['bytes']:,} bytes), max |logit diff| vs PyTorch {report['parity']['max_abs_diff']:.1e}")
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
