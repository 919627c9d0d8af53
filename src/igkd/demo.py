"""``igkd demo``: the whole pipeline, offline, on scikit-learn's digits, on CPU, in a few minutes.

teacher training -> IG maps of every training image (computed once) -> Student and
KD_IG students -> evaluation -> a short markdown report with a figure
(image / IG map / overlay). The demo shrinks the paper's settings so that it runs
on a laptop (a half-width teacher, few epochs, fewer IG steps); every value is
printed in the report, and the full-size commands are in the README.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from igkd.atomic import atomic_write_json, atomic_write_text


def run_demo(
    out: Path,
    *,
    teacher_epochs: int = 6,
    student_epochs: int = 6,
    width: float = 0.35,
    student: str = "k9",
    student_lr: float = 3e-3,
    student_batch_size: int = 32,
    ig_steps: int = 4,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    from igkd.attribution import compute_attributions
    from igkd.data import load_dataset
    from igkd.distill import resolve_config, run_training
    from igkd.distill.run import load_teacher
    from igkd.provenance import environment, load_average, machine_facts
    from igkd.report.figures import one_per_class, overlay_grid

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    machine = machine_facts()  # float32 rounding (so the accuracies) depends on these; the wall time on the load
    say = print if progress else (lambda *a, **k: None)
    data = load_dataset("digits")
    say(f"[1/5] dataset digits: {len(data.train)} train / {len(data.test)} test images, 32x32x3")

    say(f"[2/5] teacher: MobileNetV2-CIFAR width {width}, {teacher_epochs} epochs")
    teacher_cfg = resolve_config("student", "teacher", student="teacher", width=width, epochs=teacher_epochs,
                                 batch_size=64, lr=0.05, warmup_epochs=1, seed=seed, device=device)
    teacher_summary = run_training(teacher_cfg, data, out / "teacher", resume=True, progress=progress)
    teacher_path = out / "teacher" / "model.safetensors"

    say(f"[3/5] IG maps of all {len(data.train)} training images ({ig_steps} Gauss-Legendre steps, black baseline)")
    teacher, teacher_info = load_teacher(teacher_path)  # the saved file: the maps are checked against its sha256
    cache = compute_attributions(teacher, data, out / "attributions", split="train", n_steps=ig_steps, device=device,
                                 teacher_sha256=teacher_info["sha256"], progress=progress)

    runs = {}
    for i, method in enumerate(("student", "kd_ig")):
        say(f"[4/5] student {student} (width {width}) with method {method}, {student_epochs} epochs ({i + 1}/2)")
        cfg = resolve_config(method, "paper", student=student, width=width, epochs=student_epochs, lr=student_lr,
                             batch_size=student_batch_size, seed=seed, device=device)
        runs[method] = run_training(cfg, data, out / method, teacher_path=teacher_path, attributions_dir=out / "attributions",
                                    resume=True, progress=progress)

    say("[5/5] report")
    import torch

    picks = one_per_class(data.train.labels, data.num_classes)
    maps = torch.from_numpy(cache.maps[picks].astype("float32"))
    figure = overlay_grid(data.train.images[picks], maps, [data.classes[data.train.labels[i]] for i in picks],
                          out / "ig_overlay.png", caption="digits: teacher IG maps (|IG| summed over channels)")
    wall = time.perf_counter() - started
    result = {
        "teacher_test_accuracy": teacher_summary["test_accuracy"],
        "student_test_accuracy": runs["student"]["test_accuracy"],
        "kd_ig_test_accuracy": runs["kd_ig"]["test_accuracy"],
        "student": student,
        "student_params": runs["student"]["params"],
        "teacher_params": teacher_summary["params"],
        "compression_factor": round(teacher_summary["params"] / runs["student"]["params"], 2),
        "train_size": teacher_summary["train_size"] + teacher_summary["val_size"],
        "test_size": len(data.test),
        "ig_images_per_s": cache.manifest.get("images_per_s"),
        "wall_time_s": round(wall, 1),
        "settings": {"teacher_epochs": teacher_epochs, "student_epochs": student_epochs, "width": width, "student_lr": student_lr,
                     "student_batch_size": student_batch_size, "ig_steps": ig_steps, "seed": seed, "device": device},
        "environment": environment(device),
        "machine": {**machine, "load_average_1_5_15_min": {"start": machine["load_average_1_5_15_min"], "end": load_average()}},
    }
    atomic_write_json(out / "demo.json", result)
    atomic_write_text(out / "report.md", _report(result, figure.name))
    return result


def machine_line(m: dict) -> str:
    """One line of the facts that make a CPU result differ between machines."""
    load = m["load_average_1_5_15_min"]
    start, end = (load.get("start"), load.get("end")) if isinstance(load, dict) else (load, None)
    first = lambda values: "?" if not values else f"{values[0]:.2f}"  # noqa: E731 (the 1-minute average)
    return (f"{m['cpu']}, PyTorch CPU kernels {m['cpu_capability']}{', native bf16' if m['native_bf16'] else ''}, {m['threads']} threads "
            f"on {m['cpu_count']} cores, load average {first(start)} at the start and {first(end)} at the end")


def _report(r: dict, figure: str) -> str:
    s = r["settings"]
    return f"""# igkd demo report

Data: scikit-learn digits (1,797 8x8 images upscaled to 32x32x3: {r['train_size']:,} train / {r['test_size']:,} test; seed {s['seed']}),
device {r['environment']['device_name']},
igkd {r['environment']['igkd']} ({r['environment']['git_sha'] or 'no git'}), torch {r['environment']['torch']}. Wall time {r['wall_time_s']:.0f} s.

Machine: {machine_line(r['machine'])}. The same seed gives other accuracies on a CPU with other vector
units or at another thread count (float32 rounding compounds over training), and another wall time under
another load: compare two demos only with these facts beside them.

| model | parameters | test accuracy |
|---|---|---|
| teacher (MobileNetV2-CIFAR, width {s['width']}, {s['teacher_epochs']} epochs, SGD + cosine) | {r['teacher_params']:,} | {r['teacher_test_accuracy']:.2f}% |
| student {r['student']} ({r['compression_factor']}x fewer parameters), method Student (cross-entropy only) | {r['student_params']:,} | {r['student_test_accuracy']:.2f}% |
| student {r['student']}, method KD_IG (KD T=2.5, alpha=0.01 + IG overlay p=0.1) | {r['student_params']:,} | {r['kd_ig_test_accuracy']:.2f}% |

Student: the teacher's architecture with its last {r['student'][1:]} of 19 feature modules removed (same width, fresh weights); the paper recipe
(Adam, constant rate) shortened to {s['student_epochs']} epochs with lr {s['student_lr']:g} and batch {s['student_batch_size']}
so that the demo runs in minutes. Validation: 10% of the training split, held out.

One seed on a {r['test_size']}-image test set: differences of a few points are within run-to-run noise here.
For statistics you can trust, run `igkd montecarlo` and `igkd stats` (README, "Reproducing the paper").

The teacher's IG maps ({s['ig_steps']} Gauss-Legendre steps, black baseline), computed once for every training
image and overlaid on the image with probability p (paper eq. 5-7):

![IG overlay]({figure})
"""


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_command(
        out: Path = typer.Option(Path("igkd-demo"), help="Output folder."),
        teacher_epochs: int = typer.Option(6),
        student_epochs: int = typer.Option(6),
        width: float = typer.Option(0.35, help="Width multiplier of teacher and student (1.0 = the paper's)."),
        student: str = typer.Option("k9", help="Student of the family (k3 ... k17)."),
        ig_steps: int = typer.Option(4, help="IG integration steps (the paper uses 50)."),
        seed: int = typer.Option(0),
        device: str = typer.Option("cpu"),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """Offline end-to-end demo on digits: teacher, IG maps, Student vs KD_IG, report (a few minutes on CPU)."""
        result = run_demo(out, teacher_epochs=teacher_epochs, student_epochs=student_epochs, width=width, student=student,
                          ig_steps=ig_steps, seed=seed, device=device, progress=not as_json)
        if as_json:
            print(json.dumps(result, indent=2, default=str))
            return
        print(f"\nteacher {result['teacher_test_accuracy']:.2f}% | Student {result['student_test_accuracy']:.2f}% | "
              f"KD_IG {result['kd_ig_test_accuracy']:.2f}% (test accuracy, digits) in {result['wall_time_s']:.0f} s")
        print(f"machine: {machine_line(result['machine'])}")
        print(f"report: {out / 'report.md'}\nfigure: {out / 'ig_overlay.png'}\nruns:   {out}/teacher, {out}/student, {out}/kd_ig")
