"""CLI: ``igkd evaluate`` (accuracy, per-class accuracy, confusion matrix)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from igkd.models import arch_options


def print_report(report: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{title}[/bold]: accuracy {report['accuracy']:.2f}% on {report['n']} images")
    classes = report["classes"]
    table = Table(title="per class and confusion (rows: true, columns: predicted)")
    table.add_column("class")
    table.add_column("acc %", justify="right")
    for name in classes:
        table.add_column(name[:6], justify="right")
    for i, name in enumerate(classes):
        acc = report["per_class"][name]
        table.add_row(name, "-" if acc is None else f"{acc:.1f}", *[str(v) for v in report["confusion"][i]])
    console.print(table)


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate_command(
        checkpoint: Path = typer.Option(..., help="Model file (or run folder with model.safetensors); also the paper authors' published state dicts (.pt/.pth, or .safetensors)."),
        dataset: str = typer.Option(..., help="Dataset name (digits, cifar10, folder, imagenet32-cifar)."),
        data_dir: Optional[Path] = typer.Option(None, help="Dataset folder or archive."),
        split: str = typer.Option("test", help="test or train."),
        device: str = typer.Option("auto"),
        batch_size: int = typer.Option(500),
        corruptions: Optional[str] = typer.Option(None, help="Also evaluate under corruptions, e.g. all, jpeg:1,3 (docs/robustness.md)."),
        seed: int = typer.Option(0, help="Seed of the random corruptions."),
        student_arch: Optional[str] = arch_options.student_arch(),
        teacher_arch: Optional[str] = arch_options.teacher_arch(),
        trust_arch: bool = arch_options.trust_arch(),
        as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    ) -> None:
        """Accuracy, per-class accuracy and confusion matrix of a model on a dataset split.

        Also reads the paper authors' published checkpoints (state dicts saved with torch.save, or
        safetensors): their plain layout (features.<i>, classifier.1) and their attention-transfer
        layout (front_layers.<i>, middle_layer, end_layers.<j>). Their students saw un-normalised
        [0, 1] inputs, which is applied; see the README, "Compare with the paper's own models".
        """
        from igkd.data import load_dataset
        from igkd.devices import resolve_device
        from igkd.distill.run import resolve_checkpoint
        from igkd.errors import IgkdError
        from igkd.evaluate.accuracy import check_batch_size, evaluate
        from igkd.models import load_model

        if split not in ("test", "train"):
            raise IgkdError(f"unknown split {split!r}: use test or train")
        check_batch_size(batch_size)
        path = resolve_checkpoint(checkpoint)
        model, meta = load_model(path, trusted=arch_options.trusted(student_arch, teacher_arch, trust=trust_arch))
        data = load_dataset(dataset, data_dir, progress=not as_json)
        if model.num_classes != data.num_classes:
            raise IgkdError(f"{path} predicts {model.num_classes} classes but {data.name} has {data.num_classes}")
        target = resolve_device(device)
        part = data.test if split == "test" else data.train
        report = evaluate(model.to(target), part.images, part.labels, data.classes, batch_size, target)
        from igkd.provenance import environment, sha256_file

        report.update(checkpoint=str(path), checkpoint_sha256=sha256_file(path), model=meta["spec"]["name"], dataset=data.name,
                      fingerprint=data.fingerprint, source=data.source, split=split, environment=environment(target))
        if corruptions is not None:
            from igkd.evaluate.corruptions import parse_corruption_spec
            from igkd.evaluate.robustness import evaluate_robustness

            if split != "test":
                raise IgkdError("--corruptions evaluates the test split: drop --split train")
            parse_corruption_spec(corruptions)  # bad names fail before any work
            report["robustness"] = evaluate_robustness(model, data, corruptions, seed=seed, batch_size=batch_size, device=target, progress=not as_json)
        if as_json:
            print(json.dumps(report, indent=2))
        else:
            print_report(report, f"{meta['spec']['name']} on {data.name} {split}")
            if corruptions is not None:
                from igkd.evaluate.robustness import print_robustness

                print_robustness(report["robustness"], meta["spec"]["name"])

    @app.command("robustness")
    def robustness_command(
        checkpoints: list[Path] = typer.Argument(..., help="Model files or run folders."),
        dataset: str = typer.Option(..., help="Dataset name."),
        data_dir: Optional[Path] = typer.Option(None, help="Dataset folder or archive."),
        corruptions: str = typer.Option("all", help="Corruption spec: all, jpeg, jpeg:1,3;contrast:5 ... (docs/robustness.md)."),
        seed: int = typer.Option(0, help="Seed of the random corruptions."),
        device: str = typer.Option("auto"),
        batch_size: int = typer.Option(500),
        out: Optional[Path] = typer.Option(None, help="Also write the JSON results to this file."),
        student_arch: Optional[str] = arch_options.student_arch(),
        teacher_arch: Optional[str] = arch_options.teacher_arch(),
        trust_arch: bool = arch_options.trust_arch(),
        as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    ) -> None:
        """Accuracy of each model under corruptions x severities, mean corruption accuracy, relative drop."""
        from igkd.data import load_dataset
        from igkd.devices import resolve_device
        from igkd.distill.run import resolve_checkpoint
        from igkd.errors import IgkdError
        from igkd.evaluate.corruptions import parse_corruption_spec
        from igkd.evaluate.robustness import evaluate_robustness_models, print_robustness, save_robustness
        from igkd.evaluate.accuracy import check_batch_size
        from igkd.models import load_model

        parse_corruption_spec(corruptions)
        check_batch_size(batch_size)
        paths = [resolve_checkpoint(c) for c in checkpoints]
        models = [load_model(p, trusted=arch_options.trusted(student_arch, teacher_arch, trust=trust_arch)) for p in paths]
        data = load_dataset(dataset, data_dir, progress=not as_json)
        for path, (model, _) in zip(paths, models):  # every model checked before any work
            if model.num_classes != data.num_classes:
                raise IgkdError(f"{path} predicts {model.num_classes} classes but {data.name} has {data.num_classes}")
        target = resolve_device(device)
        results = evaluate_robustness_models(
            [model.to(target) for model, _ in models], data, corruptions, seed=seed, batch_size=batch_size, device=target, progress=not as_json
        )
        for path, (_, meta), result in zip(paths, models, results):
            result.update(checkpoint=str(path), model=meta["spec"]["name"])
            if not as_json:
                print_robustness(result, f"{meta['spec']['name']} ({path})")
        if out is not None:
            save_robustness(out, results)
        if as_json:
            print(json.dumps(results, indent=2))
