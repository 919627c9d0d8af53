"""CLI: ``igkd bench latency``, ``igkd export``, ``igkd quantize`` (registered by igkd.cli)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from igkd.models import arch_options

from igkd.errors import IgkdError


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _positive_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in _csv(text)]
    except ValueError:
        raise IgkdError(f"{option} takes comma-separated whole numbers, e.g. 1,64 (got {text!r})") from None
    if not values or min(values) < 1:
        raise IgkdError(f"{option} needs numbers >= 1 (got {text!r})")
    return values


def _classes_from_meta(meta: dict):
    """Class names stored with a checkpoint, when its writer recorded them."""
    for source in (meta, meta.get("meta") or {}):
        if isinstance(source, dict) and source.get("classes"):
            return list(source["classes"])
    return None


def _source_metadata(checkpoint: Path, meta: dict) -> dict:
    from igkd import __version__
    from igkd.provenance import sha256_file

    return {
        "igkd_version": __version__,
        "source_checkpoint": checkpoint.name,
        "source_sha256": sha256_file(checkpoint),
        "source_format": meta.get("format", ""),
    }


def _progress(counted: bool):
    """A progress display on stderr (stdout stays clean for --json), shown only on a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = [SpinnerColumn(), TextColumn("{task.description}")]
    if counted:
        columns += [BarColumn(), MofNCompleteColumn()]
    console = Console(stderr=True)
    return Progress(*columns, TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal)


def _print_latency_tables(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    machine, settings = results["machine"], results["settings"]
    footprint = Table(title="Footprint (state-dict bytes; int8 = weights x 1 B + fp32 per-channel scales)")
    for column in ("model", "params", "CF", "MACs", "fp32 KiB", "fp16 KiB", "int8 KiB"):
        footprint.add_column(column, justify="left" if column == "model" else "right")
    for row in results["models"]:
        sizes = row["size_bytes"]
        footprint.add_row(
            row["label"], f"{row['params']:,}", '-' if row['cf'] is None else f"{row['cf']:.2f}", f"{row['macs']:,}",
            *(f"{sizes[d] / 1024:,.1f}" for d in ("fp32", "fp16", "int8")),
        )
    console.print(footprint)
    latency = Table(
        title=f"Latency on {machine.get('gpu') or machine['cpu_model']}, threads {settings['threads']}, "
        f"{settings['warmup']} warm-up + {settings['repeats']} timed calls"
    )
    for column in ("model", "backend", "precision", "threads", "batch", "median ms", "p90 ms", "min ms", "ms/image",
                   "first ms", "load ms", "file KiB", "speed-up"):
        latency.add_column(column, justify="left" if column in ("model", "backend", "precision") else "right")
    for m in results["measurements"]:
        speedup = m["speedup_vs_teacher"]
        latency.add_row(
            m["model"], m["backend"], m["precision"], str(m.get("threads") or "-"), str(m["batch_size"]),
            *(f"{m[key]:.3f}" for key in ("median_ms", "p90_ms", "min_ms", "per_image_ms")),
            *(f"{m[key]:.1f}" if key in m else "-" for key in ("first_inference_ms", "load_ms")),
            f"{m['file_bytes'] / 1024:,.1f}" if "file_bytes" in m else "-",
            f"{speedup:.2f}x" if speedup else "-",
        )
    console.print(latency)
    if settings.get("denormals"):
        console.print(f"Never-trained models: {settings['denormals']}.")


def register(app: typer.Typer) -> None:
    """Add ``bench`` (a sub-app), ``export`` and ``quantize`` to the top-level app."""
    bench = typer.Typer(help="Measure models: latency and footprint.", no_args_is_help=True)
    app.add_typer(bench, name="bench")

    @bench.command("latency")
    def bench_latency(
        models: Optional[str] = typer.Option(None, "--models", help="Comma-separated names (teacher,k3,...) or 'all' [default: all, unless --checkpoint is given]."),
        checkpoints: Optional[List[Path]] = typer.Option(None, "--checkpoint", help="A model file or finished run folder to measure (repeatable)."),
        batch_sizes: str = typer.Option("1,64", "--batch-sizes", help="Comma-separated batch sizes."),
        repeats: int = typer.Option(30, "--repeats", help="Timed calls per figure (at least 20)."),
        warmup: int = typer.Option(5, "--warmup", help="Untimed calls before timing."),
        threads: str = typer.Option("1", "--threads", help="Threads per runtime, or a comma-separated list (each a separate setting)."),
        rounds: int = typer.Option(5, "--rounds", help="Interleaved rounds the repeats are split into (all models timed in each)."),
        backends: Optional[str] = typer.Option(None, "--backends", "--backend", help="Comma-separated: eager, onnxruntime, executorch, litert [default: eager,onnxruntime on CPU, eager on CUDA]."),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto (onnxruntime is measured on CPU only)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
        out: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON results to this file."),
        plot: Optional[Path] = typer.Option(None, "--plot", help="Write a latency-vs-CF PNG here."),
        student_arch: Optional[str] = arch_options.student_arch(),
        teacher_arch: Optional[str] = arch_options.teacher_arch(),
        trust_arch: bool = arch_options.trust_arch(),
    ) -> None:
        """Latency (median, p90, first call, load; >= 20 warmed-up calls), file size, parameters, MACs, CF, speed-up."""
        import torch

        from igkd.atomic import atomic_write_json
        from igkd.deploy.export import check_destination
        from igkd.deploy.latency import DEFAULT_CPU_BACKENDS, RANDOM_INIT, benchmark_latency, check_counts, check_setting
        from igkd.devices import resolve_device
        from igkd.distill.run import resolve_checkpoint
        from igkd.models import STUDENT_KS, build_model, load_model, parse_model_name

        sizes = _positive_ints(batch_sizes, "--batch-sizes")
        target = resolve_device(device)
        chosen_backends = _csv(backends) if backends else (list(DEFAULT_CPU_BACKENDS) if target.type == "cpu" else ["eager"])
        thread_counts = _positive_ints(threads, "--threads")
        for backend in chosen_backends:
            check_setting(backend, target)
        check_counts(repeats, warmup, sizes)
        if rounds < 1:
            raise IgkdError("--rounds must be >= 1")
        for path in (out, plot):
            if path is not None:
                check_destination(path)
        names = _csv(models) if models else ([] if checkpoints else ["all"])
        if "all" in names:
            names = ["teacher", *(f"k{k}" for k in STUDENT_KS)]
        entries = []
        for name in names:
            parse_model_name(name)
            torch.manual_seed(0)
            entries.append((build_model(name), RANDOM_INIT))
        for checkpoint in checkpoints or []:
            checkpoint = resolve_checkpoint(checkpoint)  # a model file, or a run folder's model.safetensors
            entries.append((load_model(checkpoint, trusted=arch_options.trusted(student_arch, teacher_arch, trust=trust_arch))[0], str(checkpoint)))
        with _progress(True) as progress:
            task = progress.add_task("measuring", total=None)

            def step(description: str, done: int, total: int) -> None:
                progress.update(task, description=description, completed=done, total=total)

            results = benchmark_latency(
                entries, batch_sizes=sizes, backends=chosen_backends, device=target,
                warmup=warmup, repeats=repeats, rounds=rounds,
                threads=thread_counts if target.type == "cpu" else thread_counts[0], progress=step,
            )
        if out is not None:
            atomic_write_json(out, results)
        if plot is not None:
            from igkd.deploy.plot import plot_latency_vs_cf

            plot_latency_vs_cf(results, plot)
        if as_json:
            print(json.dumps(results, indent=2, default=str))
        else:
            _print_latency_tables(results)

    @app.command("export")
    def export_command(
        checkpoint: Path = typer.Argument(..., help="Model file (igkd .safetensors, training checkpoint .pt, reference state dict) or a finished run folder (its model.safetensors)."),
        fmt: str = typer.Option("onnx", "--format", help="onnx, torchscript, executorch (extra 'executorch') or litert (extra 'litert')."),
        out: Optional[Path] = typer.Option(None, "--out", help="Output file [default: next to CKPT, .onnx / .torchscript.pt / .pte / .tflite]."),
        opset: int = typer.Option(17, "--opset", help="ONNX opset version."),
        dataset: Optional[str] = typer.Option(None, "--dataset", help="Check parity on this dataset's test images and measure the file's test accuracy (default: a deterministic random batch)."),
        data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Where the dataset lives / is cached."),
        tolerance: float = typer.Option(1e-4, "--tolerance", help="Max abs logit difference allowed vs eager (fp32)."),
        int8: bool = typer.Option(False, "--int8", help="executorch / litert: int8 (PT2E), calibrated on --dataset training images; refused if test accuracy drops more than --max-drop."),
        batch_size: int = typer.Option(1, "--batch-size", help="executorch / litert: the file's batch size (static in ExecuTorch; LiteRT can resize it)."),
        calibration_size: int = typer.Option(512, "--calibration-size", help="int8: training images used to calibrate."),
        max_drop: float = typer.Option(1.0, "--max-drop", help="int8: refuse to write if test accuracy drops more than this many points."),
        force: bool = typer.Option(False, "--force", help="int8: write even if accuracy dropped more than --max-drop."),
        seed: int = typer.Option(0, "--seed", help="int8: seed of the calibration subset."),
        student_arch: Optional[str] = arch_options.student_arch(),
        teacher_arch: Optional[str] = arch_options.teacher_arch(),
        trust_arch: bool = arch_options.trust_arch(),
        as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    ) -> None:
        """Export a model to ONNX, TorchScript, ExecuTorch (XNNPACK) or LiteRT; refuses to write on a parity failure."""
        from igkd.data import load_dataset
        from igkd.deploy.accuracy import file_accuracy, guard_drop, load_file
        from igkd.deploy.export import (
            PARITY_BATCH, SIDECAR_FORMATS, SUFFIXES, check_destination, check_format, check_opset, export_bytes, write_export,
        )
        from igkd.deploy.quantize import calibration_indices
        from igkd.distill.run import resolve_checkpoint
        from igkd.evaluate import accuracy_report, predict_logits
        from igkd.models import load_model

        fmt = check_format(fmt)
        if fmt == "onnx":
            check_opset(opset)
        if int8 and fmt not in SIDECAR_FORMATS:
            raise IgkdError(f"--int8 is for executorch and litert; for int8 {fmt} use 'igkd quantize'")
        if int8 and dataset is None:
            raise IgkdError("--int8 needs --dataset: its training images calibrate the int8 ranges and its test images guard the accuracy")
        if batch_size < 1:
            raise IgkdError(f"--batch-size must be >= 1 (got {batch_size})")
        if int8:
            calibration_indices(1, calibration_size, seed)  # refuses --calibration-size < 1 before any work
        checkpoint = resolve_checkpoint(checkpoint)  # a model file, or a run folder's model.safetensors
        suffix = (".int8" if int8 else "") + SUFFIXES[fmt]
        out = check_destination(out or checkpoint.with_name(checkpoint.stem + suffix))
        model, meta = load_model(checkpoint, trusted=arch_options.trusted(student_arch, teacher_arch, trust=trust_arch))
        batch, batch_source, classes, data = None, None, _classes_from_meta(meta), None
        if dataset is not None:
            data = load_dataset(dataset, data_dir, progress=not as_json)
            if data.num_classes != model.num_classes:
                raise IgkdError(f"{checkpoint} has {model.num_classes} outputs but dataset {dataset!r} has {data.num_classes} classes")
            batch, batch_source = data.test.images[:PARITY_BATCH], f"{data.name} test images 0-{PARITY_BATCH - 1}"
            classes = list(data.classes)
        calibration = None
        if int8:
            calibration = data.train.images[calibration_indices(len(data.train), calibration_size, seed)]
        with _progress(False) as progress:
            progress.add_task(f"exporting {checkpoint.name} to {fmt}{' int8' if int8 else ''}")
            payload, report = export_bytes(
                model, fmt, opset=opset, batch=batch, batch_source=batch_source, classes=classes,
                metadata=_source_metadata(checkpoint, meta), tolerance=tolerance, threads=1,
                calibration=calibration, batch_size=batch_size,
            )
            if data is not None:
                run, static = load_file(fmt, payload, 1, batch_size)
                eager = accuracy_report(predict_logits(model.eval(), data.test.images, device="cpu"), data.test.labels, data.classes)
                report["accuracy"] = {"split": "test", "images": len(data.test), "dataset": data.name,
                                      "eager_fp32": eager["accuracy"], "file": file_accuracy(run, static, data)["accuracy"]}
                if int8:
                    report["accuracy"].update(guard_drop(eager["accuracy"], report["accuracy"]["file"], max_drop, force, out))
                    report["calibration"] = {"split": "train", "images": int(calibration.shape[0]), "seed": seed}
            report = write_export(out, payload, report)
        if as_json:
            print(json.dumps(report, indent=2))
            return
        parity = report["parity"]
        shape = "dynamic batch" if fmt in ("onnx", "torchscript") else f"batch {report['metadata']['batch_size']}"
        line = (
            f"wrote {out} ({report['bytes']:,} bytes, {fmt} {report['precision']}{', opset ' + str(opset) if fmt == 'onnx' else ''}, {shape}); "
            f"max |diff| vs eager {parity['max_abs_diff']:.2e}"
            + (f" <= {parity['tolerance']:g}" if report["precision"] == "fp32" else f" (int8; top-1 agreement {parity['top1_agreement']:.1%})")
            + f" at batch {parity['batch_sizes']} on {parity['batch']}"
        )
        if "accuracy" in report:
            acc = report["accuracy"]
            line += f"; test accuracy {acc['file']:.2f}% (eager fp32 {acc['eager_fp32']:.2f}%, {acc['images']} {acc['dataset']} test images)"
        if "metadata_path" in report:
            line += f"; metadata {report['metadata_path']}"
        print(line)

    @app.command("quantize")
    def quantize_command(
        checkpoint: Path = typer.Argument(..., help="Model file to quantise, or a finished run folder (its model.safetensors)."),
        dataset: Optional[str] = typer.Option(None, "--dataset", help="The model's dataset: training images calibrate, test images measure accuracy."),
        data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Where the dataset lives / is cached."),
        out: Optional[Path] = typer.Option(None, "--out", help="int8 ONNX file [default: next to CKPT, .int8.onnx]."),
        calibration_size: int = typer.Option(512, "--calibration-size", help="Training images used to calibrate activation ranges."),
        method: str = typer.Option("minmax", "--calibration-method", help="minmax, entropy or percentile."),
        reduce_range: bool = typer.Option(True, "--reduce-range/--no-reduce-range", help="7-bit weights: safe on x86 without VNNI; turn off for VNNI/ARM targets."),
        max_drop: float = typer.Option(1.0, "--max-drop", help="Refuse to write if test accuracy drops more than this many points."),
        force: bool = typer.Option(False, "--force", help="Write the int8 model even if it dropped more than --max-drop."),
        threads: Optional[int] = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads [default: torch's]."),
        repeats: int = typer.Option(20, "--repeats", help="Timed calls per latency figure (at least 20)."),
        warmup: int = typer.Option(5, "--warmup", help="Untimed calls before timing."),
        seed: int = typer.Option(0, "--seed", help="Seed of the calibration subset."),
        student_arch: Optional[str] = arch_options.student_arch(),
        teacher_arch: Optional[str] = arch_options.teacher_arch(),
        trust_arch: bool = arch_options.trust_arch(),
        as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    ) -> None:
        """int8 post-training static quantisation (ONNX Runtime, QDQ, per-channel), with its accuracy and speed cost."""
        from igkd.data import load_dataset
        from igkd.deploy.export import check_destination
        from igkd.deploy.latency import check_counts
        from igkd.deploy.quantize import calibration_indices, check_calibration_method, quantize_onnx
        from igkd.distill.run import resolve_checkpoint
        from igkd.models import load_model

        if dataset is None:
            raise IgkdError("--dataset is required: its training images calibrate the int8 ranges and its test images measure the accuracy cost")
        check_calibration_method(method)
        calibration_indices(1, calibration_size, seed)  # refuses --calibration-size < 1 before any work
        check_counts(repeats, warmup)
        checkpoint = resolve_checkpoint(checkpoint)  # a model file, or a run folder's model.safetensors
        out = check_destination(out or checkpoint.with_suffix(".int8.onnx"))
        model, meta = load_model(checkpoint, trusted=arch_options.trusted(student_arch, teacher_arch, trust=trust_arch))
        data = load_dataset(dataset, data_dir, progress=not as_json)
        with _progress(False) as progress:
            task = progress.add_task("quantising")
            report = quantize_onnx(
                model, data, out, calibration_size=calibration_size, max_drop=max_drop, force=force,
                method=method, reduce_range=reduce_range, warmup=warmup, repeats=repeats, threads=threads,
                seed=seed, metadata=_source_metadata(checkpoint, meta),
                progress=lambda description: progress.update(task, description=description),
            )
        if as_json:
            print(json.dumps(report, indent=2, default=str))
            return
        _print_quantization(report)


def _print_quantization(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['model']} on {report['dataset']} ({report['test_images']} test images), ONNX Runtime CPU, {report['threads']} threads")
    batches = list(report["fp32"]["latency"])
    for column in ("", "test accuracy %", "file bytes", *(f"batch {b} median ms" for b in batches)):
        table.add_column(column, justify="left" if not column else "right")
    for name in ("fp32", "int8"):
        variant = report[name]
        table.add_row(
            name, f"{variant['accuracy']:.2f}", f"{variant['bytes']:,}",
            *(f"{variant['latency'][b]['median_ms']:.3f}" for b in batches),
        )
    console = Console()
    console.print(table)
    calibration = report["calibration"]
    console.print(
        f"int8 accuracy drop {report['accuracy_drop_points']:.2f} points (limit {report['max_drop']:g}"
        f"{', forced' if report['forced'] else ''}); file {report['size_ratio']:.2f}x smaller; int8 speed-up "
        + ", ".join(f"{ratio:.2f}x at batch {b}" for b, ratio in report["int8_speedup"].items())
        + "; "
        f"calibrated on {calibration['images']} training images ({calibration['method']}, seed {calibration['seed']})"
    )
    console.print(f"wrote {report['out']}")
