"""CLI: ``igkd attributions compute`` (precompute and cache a teacher's maps) and ``show`` (draw one)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from igkd.errors import IgkdError
from igkd.models import arch_options

DATASET_HELP = "Dataset name: cifar10, folder, digits or imagenet32-cifar."


def _summary_line(cache) -> str:
    m = cache.manifest
    params = ", ".join(f"{k}={m[k]}" for k in ("n_steps", "rule", "baseline", "nt_samples", "n_samples", "stdevs", "seed") if k in m)
    rate = f"{m['images_per_s']} images/s" if m.get("images_per_s") else "rate n/a"
    completeness = m.get("completeness") or {}
    relative = completeness.get("relative")
    error = f", completeness error {100 * relative:.2f}% of |F(x)-F(x')|" if relative is not None else ""
    status = "reused existing cache" if cache.reused else f"computed in {m['wall_s']} s ({rate}, {m['precision']})"
    return f"{cache.path / m['maps_file']}: {m['n']} maps {m['height']}x{m['width']} float16, {m['method']} ({params}), {m['reduction']}; {status}{error}"


def register(app: typer.Typer) -> None:
    attributions = typer.Typer(
        name="attributions",
        help="Teacher attribution maps (integrated gradients): compute once, cache in dataset order, inspect.",
        no_args_is_help=True,
    )

    # typer reads a command's options from its signature: declarations alike in shape to other commands', not shared logic
    @attributions.command("compute")
    def compute_command(
        teacher: Path = typer.Option(..., help="Teacher model file (or a run folder with model.safetensors)."),
        teacher_arch: Optional[str] = arch_options.teacher_arch(),
        trust_arch: bool = arch_options.trust_arch(),
        dataset: str = typer.Option(..., help=DATASET_HELP),
        out: Path = typer.Option(..., help="Cache folder (maps.npy + manifest.json)."),
        data_dir: Optional[Path] = typer.Option(None, help="Dataset folder or archive."),
        split: str = typer.Option("train", help="train or test."),
        method: str = typer.Option("ig", help="ig, saliency, input_x_gradient, smoothgrad or gradient_shap."),
        steps: int = typer.Option(50, help="Integration steps (ig, smoothgrad)."),
        baseline: str = typer.Option("black", help="black (zero pixels), mean (normalisation mean colour, as the authors' code) or blur."),
        rule: str = typer.Option("gausslegendre", help="gausslegendre or riemann_left|right|middle|trapezoid."),
        reduction: str = typer.Option("abs_sum", help="abs_sum (the paper's), signed_sum or positive_sum."),
        target: str = typer.Option("label", help="label (true class) or predicted."),
        samples: Optional[int] = typer.Option(None, help="Noise samples (smoothgrad nt_samples, gradient_shap n_samples)."),
        stdevs: Optional[float] = typer.Option(None, help="Noise standard deviation in [0, 1] pixel units (smoothgrad, gradient_shap)."),
        seed: Optional[int] = typer.Option(None, help="Seed of the random draws (smoothgrad, gradient_shap)."),
        blur_sigma: Optional[float] = typer.Option(None, help="Gaussian sigma in pixels of the blur baseline."),
        chunk_size: Optional[int] = typer.Option(None, help="Images per committed chunk (default 64 on CPU, 1024 on GPU)."),
        max_batch: Optional[int] = typer.Option(None, help="Interpolated samples per forward/backward pass (default: device memory budget)."),
        precision: str = typer.Option("auto", help="auto (bf16 on GPU when completeness allows), fp32 or bf16."),
        device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
        force: bool = typer.Option(False, "--force", help="Rebuild even if the folder holds a cache (of this or another computation)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    ) -> None:
        """Compute the teacher's maps for every image of a split, in dataset index order; resume or reuse when possible."""
        from igkd.attribution.cache import compute_attributions
        from igkd.data import load_dataset
        from igkd.distill.run import load_teacher
        from igkd.locking import sibling_lock

        if max_batch is not None and max_batch < 1:
            raise IgkdError(f"--max-batch must be at least 1 (samples per forward/backward pass), got {max_batch}; or leave it out for the device default")
        if out.exists() and not out.is_dir():
            raise IgkdError(f"--out {out} is a file: give a folder for the cache")
        model, teacher_info = load_teacher(teacher, arch_options.trusted(teacher_arch, trust=trust_arch))  # a model file or a run folder; sha256 of the file
        data = load_dataset(dataset, data_dir, progress=not as_json)
        options = {}
        if samples is not None:
            options["nt_samples" if method == "smoothgrad" else "n_samples"] = samples
        options.update({k: v for k, v in {"stdevs": stdevs, "seed": seed, "blur_sigma": blur_sigma}.items() if v is not None})
        with sibling_lock(out, what=f"attribution cache {out}"):  # two computations never write one cache at once
            # every option passed on by name: lines alike in shape, no logic to share
            cache = compute_attributions(
                model,
                data,
                out,
                split=split,
                method=method,
                reduction=reduction,
                n_steps=steps,
                baseline=baseline,
                rule=rule,
                target=target,
                method_options=options,
                chunk_size=chunk_size,
                max_batch=max_batch,
                precision=precision,
                device=device,
                teacher_sha256=teacher_info["sha256"],
                force=force,
                progress=not as_json,
            )
        if as_json:
            print(json.dumps({"path": str(cache.path), "reused": cache.reused, "manifest_sha256": cache.manifest_sha256, "manifest": cache.manifest}, indent=2, default=str))
        else:
            print(_summary_line(cache))

    @attributions.command("show")
    def show_command(
        cache_dir: Path = typer.Argument(..., help="Cache folder from 'igkd attributions compute'."),
        dataset: str = typer.Option(..., help=DATASET_HELP),
        index: int = typer.Option(..., help="Dataset index of the image (in the cache's split)."),
        out: Path = typer.Option(..., help="PNG file to write."),
        data_dir: Optional[Path] = typer.Option(None, help="Dataset folder or archive."),
    ) -> None:
        """Draw image INDEX, its cached map and the overlay 0.5 x + 0.5 minmax(map) into a PNG."""
        from igkd.attribution.cache import open_attributions
        from igkd.attribution.figure import save_attribution_figure
        from igkd.data import load_dataset

        data = load_dataset(dataset, data_dir)
        cache = open_attributions(cache_dir, dataset_fingerprint=data.fingerprint)
        split = cache.manifest["split"]
        images = getattr(data, split)
        if not 0 <= index < len(cache):
            raise IgkdError(f"index {index} is out of range: {cache_dir} holds {len(cache)} maps of the {split} split (indices 0..{len(cache) - 1})")
        label = int(images.labels[index])
        m = cache.manifest
        title = f"{data.name} {split}[{index}] = {data.classes[label]}; {m['method']} {m['reduction']}, baseline {m.get('baseline', '-')}, target {m['target']}"
        save_attribution_figure(images.images[index].numpy(), cache.maps[index].astype("float32"), out, title)
        print(out)

    app.add_typer(attributions, name="attributions")
