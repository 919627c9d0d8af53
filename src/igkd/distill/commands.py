"""CLI: ``igkd train-teacher`` and ``igkd distill`` (one loop, every method)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from igkd.models import arch_options

DATASET_HELP = "Dataset name: digits (offline), cifar10, folder, imagenet32-cifar."


def _print_summary(summary: dict, out: Path, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
        return
    teacher = summary.get("teacher_test_accuracy")
    name = "teacher" if summary.get("kind") == "teacher" else f"{summary['method']} {summary['student']}"
    print(
        f"{name}: test {summary['test_accuracy']:.2f}%"
        + (f", val {summary['val_accuracy']:.2f}%" if summary.get("val_accuracy") is not None else "")
        + (f", teacher {teacher:.2f}%" if teacher is not None else "")
        + f" after {summary['epochs']} epochs ({summary['wall_time_s']:.0f} s)"
    )
    print(f"run folder: {out} (model.safetensors, summary.json, metrics.jsonl)")


def register(app: typer.Typer) -> None:
    @app.command("train-teacher")
    def train_teacher(
        dataset: str = typer.Option(..., help=DATASET_HELP),
        out: Path = typer.Option(..., help="Run folder (created)."),
        data_dir: Optional[Path] = typer.Option(None, help="Dataset folder or archive."),
        epochs: Optional[int] = typer.Option(None, help="Epochs (recipe 'teacher': 100)."),
        batch_size: Optional[int] = typer.Option(None),
        lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
        width: Optional[float] = typer.Option(None, help="Width multiplier of MobileNetV2."),
        teacher_arch: Optional[str] = arch_options.teacher_arch(),
        teacher_arch_args: Optional[str] = arch_options.teacher_arch_args(),
        teacher_normalize: Optional[str] = typer.Option(None, "--teacher-normalize", help=arch_options.NORMALIZE_HELP),
        label_smoothing: Optional[float] = typer.Option(None),
        val_fraction: Optional[float] = typer.Option(None, help="Part of train held out for validation."),
        seed: int = typer.Option(0),
        config: Optional[Path] = typer.Option(None, help="YAML file of config keys."),
        device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
        compile: bool = typer.Option(False, "--compile", help="torch.compile the model."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoint."),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ) -> None:
        """Train the MobileNetV2-CIFAR teacher, or any architecture (--teacher-arch) (SGD + Nesterov, warm-up + cosine, label smoothing)."""
        from igkd.data import load_dataset
        from igkd.distill.config import load_yaml, resolve_config
        from igkd.distill.run import run_training

        cfg = resolve_config(
            "student", "teacher", load_yaml(config) if config else None,
            **arch_options.arch_config(teacher_arch, teacher_arch_args, teacher_normalize, "--teacher-arch"),
            student="teacher", epochs=epochs, batch_size=batch_size, lr=lr, width=width,
            label_smoothing=label_smoothing, val_fraction=val_fraction, seed=seed, device=device, compile=compile or None,
        )
        data = load_dataset(dataset, data_dir)
        summary = run_training(cfg, data, out, resume=resume, progress=not as_json)
        _print_summary(summary, out, as_json)

    @app.command("distill")
    def distill(
        method: str = typer.Option(..., help="student, kd, ig, kd_ig, at, kd_at, ig_at, kd_ig_at; dkd, dkd_ig, dist, dist_ig; controls kd_shuffled, kd_saliency, kd_random_map, kd_cutmix, kd_mixup."),
        dataset: str = typer.Option(..., help=DATASET_HELP),
        out: Path = typer.Option(..., help="Run folder (created)."),
        teacher: Optional[Path] = typer.Option(None, help="Teacher model file or run folder (needed by kd/ig/at)."),
        student: Optional[str] = typer.Option(None, help="Student: k3, k5 (default), ..., k17 (modules removed)."),
        student_arch: Optional[str] = arch_options.student_arch(),
        student_arch_args: Optional[str] = arch_options.student_arch_args(),
        student_normalize: Optional[str] = arch_options.student_normalize(),
        teacher_arch: Optional[str] = arch_options.teacher_arch(),
        trust_arch: bool = arch_options.trust_arch(),
        attributions: Optional[Path] = typer.Option(None, help="IG cache folder from 'igkd attributions compute'."),
        data_dir: Optional[Path] = typer.Option(None, help="Dataset folder or archive."),
        recipe: str = typer.Option("paper", help="paper (Adam 1e-3, 100 epochs, batch 64) or improved."),
        config: Optional[Path] = typer.Option(None, help="YAML file of config keys (overridden by options)."),
        seed: int = typer.Option(0, help="Seed of initialisation, batches, augmentation."),
        subset: Optional[float] = typer.Option(None, help="Train on a stratified random fraction (Monte Carlo)."),
        subset_seed: Optional[int] = typer.Option(None, help="Seed of the subset (default: --seed)."),
        epochs: Optional[int] = typer.Option(None),
        batch_size: Optional[int] = typer.Option(None),
        lr: Optional[float] = typer.Option(None),
        alpha: Optional[float] = typer.Option(None, help="KD weight."),
        temperature: Optional[float] = typer.Option(None, "--temperature", "-T", help="KD temperature."),
        p: Optional[float] = typer.Option(None, "--p", help="IG overlay probability."),
        gamma: Optional[float] = typer.Option(None, help="Attention-transfer weight."),
        at_teacher_layer: Optional[str] = typer.Option(None, help="Teacher module for attention (default features.<len(teacher.features)//2>: features.9)."),
        at_student_layer: Optional[str] = typer.Option(None, help="Student module for attention (default: the teacher's index, features.9; a student without it uses its last module)."),
        logit_loss: Optional[str] = typer.Option(None, help="Logit-distillation term: kd, dkd or dist (other constants: YAML keys dkd_*, dist_*)."),
        logit_std: Optional[bool] = typer.Option(None, "--logit-std/--no-logit-std", help="Logit standardisation (Sun et al. 2024) on the KD/DKD/DIST term."),
        overlay_maps: Optional[str] = typer.Option(None, help="Overlay maps: ig, shuffled, saliency (a saliency cache as --attributions) or random."),
        mix: Optional[str] = typer.Option(None, help="Batch mixing: none, cutmix or mixup (mix_alpha, mix_prob: YAML)."),
        width: Optional[float] = typer.Option(None, help="Student width multiplier."),
        val_fraction: Optional[float] = typer.Option(None),
        device: str = typer.Option("auto"),
        cpu_bf16: Optional[str] = typer.Option(None, help="On a CPU with native bf16: off, teacher (the teacher's forward) or all (docs/training.md, 'Precision on a CPU')."),
        compile: bool = typer.Option(False, "--compile"),
        resume: bool = typer.Option(False, "--resume"),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """Train a student with one of the methods (a preset of loss terms and augmentations, docs/training.md)."""
        from igkd.data import load_dataset
        from igkd.distill.config import load_yaml, resolve_config
        from igkd.distill.run import run_training
        from igkd.errors import IgkdError
        from igkd.models import parse_model_name

        if student_arch is not None and student is not None:
            raise IgkdError(f"give the student once: --student {student} (the family) or --student-arch {student_arch}, not both")
        if student_arch is None and parse_model_name(student or "k5") == 0:
            raise IgkdError("--student must be a student of the family (k3 ... k17); train the teacher with 'igkd train-teacher'")
        cfg = resolve_config(
            method, recipe, load_yaml(config) if config else None,
            **arch_options.arch_config(student_arch, student_arch_args, student_normalize),
            student="external" if student_arch else (student or "k5"), seed=seed, subset=subset, subset_seed=subset_seed, epochs=epochs, batch_size=batch_size,
            lr=lr, alpha=alpha, temperature=temperature, p=p, gamma=gamma, at_teacher_layer=at_teacher_layer,
            at_student_layer=at_student_layer, logit_loss=logit_loss, logit_std=logit_std, overlay_maps=overlay_maps, mix=mix, width=width, val_fraction=val_fraction, device=device, compile=compile or None,
            cpu_bf16=cpu_bf16,
        )
        data = load_dataset(dataset, data_dir)
        summary = run_training(cfg, data, out, teacher_path=teacher, attributions_dir=attributions, resume=resume, progress=not as_json,
                               trusted=arch_options.trusted(teacher_arch, trust=trust_arch))
        _print_summary(summary, out, as_json)
