"""From names and paths to a finished run: load data, teacher and IG maps, check they belong together, train."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from igkd.distill.config import TrainConfig
from igkd.distill.loop import train
from igkd.distill.run_folder import MODEL, SUMMARY, read_summary
from igkd.errors import IgkdError


def refuse_foreign_folder(out_dir: str | Path) -> None:
    """A run folder must not be an attribution cache or a study folder (their files would mix)."""
    out = Path(out_dir)
    if (out / "manifest.json").is_file():
        raise IgkdError(f"--out {out} holds an attribution cache (manifest.json): give a new folder for the run")
    if (out / "study.json").is_file():
        raise IgkdError(f"--out {out} is a study folder (study.json): give a new folder for the run")


def resolve_checkpoint(path: str | Path) -> Path:
    """A model file, or a run folder holding ``model.safetensors``."""
    path = Path(path)
    if path.is_dir():
        if (path / MODEL).is_file():
            return path / MODEL
        raise IgkdError(f"{path} is a folder without {MODEL}: pass the model file, or a finished run folder")
    if not path.exists():
        raise IgkdError(f"checkpoint {path} does not exist")
    return path


def load_teacher(path: str | Path, trusted=None) -> tuple[torch.nn.Module, dict]:
    """The teacher of a model file or run folder, and what identifies it (path, sha256 of the file, spec, format).
    An external architecture is rebuilt only by the factory ``trusted`` names (:func:`igkd.models.load_model`)."""
    from igkd.models import load_model
    from igkd.provenance import sha256_file

    path = resolve_checkpoint(path)
    model, meta = load_model(path, trusted=trusted, option="--teacher-arch")
    return model, {"path": str(path), "sha256": sha256_file(path), "spec": meta["spec"], "format": meta["format"]}


#: Reductions whose maps are non-negative, as the overlay (paper eq. 5-7: map^s, min-max) needs.
OVERLAY_REDUCTIONS = ("abs_sum", "positive_sum")


def check_overlay_reduction(reduction: str | None, directory: str | Path) -> None:
    """Refuse IG maps the overlay cannot use as they are: signed maps (``signed_sum``) have negative
    values, which ``map ** s`` with a fractional s and the min-max scaling would silently distort."""
    if reduction not in OVERLAY_REDUCTIONS:
        raise IgkdError(
            f"the IG cache {directory} holds {reduction!r} maps, but the overlay needs non-negative maps "
            f"({' or '.join(OVERLAY_REDUCTIONS)}): rebuild it with 'igkd attributions compute --reduction abs_sum' (the paper's)"
        )


def python_teacher_info(teacher: torch.nn.Module) -> dict:
    """What identifies a teacher given as a Python module (no file): the sha256 of its weights
    (:func:`igkd.attribution.cache.model_state_sha256`, which every IG cache records) and its spec."""
    from igkd.attribution.cache import model_state_sha256
    from igkd.models import spec_of

    return {"path": None, "sha256": None, "model_state_sha256": model_state_sha256(teacher), "spec": spec_of(teacher), "format": "python module"}


def load_ig_maps(directory: str | Path, teacher_sha256: str | None, dataset, model_state_sha256: str | None = None) -> tuple[torch.Tensor, dict]:
    """The cached maps [N, H, W] (float16) of the training split, refused unless built for this teacher and
    data, and unless non-negative (:func:`check_overlay_reduction`). The teacher is its file's sha256, or, for a
    teacher given as a Python module, the sha256 of its weights (``model_state_sha256``).

    The maps file is read whole anyway, so it is also checked: its sha256 against the manifest's, and every value finite.
    """
    import numpy as np

    from igkd.attribution import open_attributions
    from igkd.attribution.cache import MAPS_FILE, REBUILD_HINT

    expect = {"model_state_sha256": model_state_sha256} if teacher_sha256 is None and model_state_sha256 is not None else None
    cache = open_attributions(directory, teacher_sha256=teacher_sha256, dataset_fingerprint=dataset.fingerprint, split="train", expect=expect, verify=True)
    check_overlay_reduction(cache.manifest.get("reduction"), directory)
    maps = torch.from_numpy(np.array(cache.maps))  # a private, writable copy of the memmap
    if not bool(torch.isfinite(maps).all()):
        bad = int((~torch.isfinite(maps)).any(dim=(1, 2)).sum())
        raise IgkdError(f"attribution maps {Path(directory) / MAPS_FILE} hold NaN/inf values in {bad} of {len(maps)} maps (a damaged cache or a broken teacher): {REBUILD_HINT}")
    info = {"path": str(directory), "manifest_sha256": cache.manifest_sha256, "method": cache.manifest.get("method"), "n_steps": cache.manifest.get("n_steps")}
    return maps, info


def load_inputs(
    configs, dataset, *, teacher_path: str | Path | None = None, attributions_dir: str | Path | None = None,
    teacher: torch.nn.Module | None = None, trusted=None,
) -> dict:
    """The teacher and IG maps the runs of ``configs`` need, loaded once and checked against the data. The teacher
    is a model file (``teacher_path``; an external one rebuilt by the factory ``trusted`` names) or a Python module.

    Returns the keyword arguments of :class:`igkd.distill.loop.Trainer`: ``teacher``, ``teacher_info``,
    ``ig_maps``, ``attribution_info`` (None where no run needs them).
    """
    teacher_info = None
    if teacher is not None and teacher_path is not None:
        raise IgkdError("give the teacher once: as a model file (teacher_path) or as a module (teacher), not both")
    if teacher_path is not None:
        teacher, teacher_info = load_teacher(teacher_path, trusted)
    elif teacher is not None:
        teacher_path, teacher_info = "(the Python module)", python_teacher_info(teacher)
    classes = getattr(teacher, "num_classes", None)
    if teacher is not None and isinstance(classes, int) and classes != dataset.num_classes:
        raise IgkdError(f"teacher {teacher_path} has {classes} classes but dataset {dataset.name} has {dataset.num_classes}")
    maps, attribution_info = (None, None)
    overlaid = [c for c in configs if c.p > 0]
    if overlaid:
        if attributions_dir is None:
            raise IgkdError(f"method {overlaid[0].method!r} overlays IG maps (p={overlaid[0].p}): pass --attributions DIR (built by 'igkd attributions compute')")
        if teacher_info is None:
            raise IgkdError("IG maps are checked against their teacher: pass --teacher CKPT with --attributions")
        maps, attribution_info = load_ig_maps(attributions_dir, teacher_info["sha256"], dataset, teacher_info.get("model_state_sha256"))
        from igkd.distill.controls import expected_attribution_method

        for config in overlaid:
            wanted = expected_attribution_method(config.overlay_maps)
            if attribution_info["method"] != wanted:
                raise IgkdError(
                    f"method {config.method!r} overlays {wanted!r} maps (overlay_maps {config.overlay_maps!r}) but {attributions_dir} holds "
                    f"{attribution_info['method']!r} maps: give a cache built with 'igkd attributions compute --method {wanted}' "
                    "(a study has one cache: train such methods in a study of their own)"
                )
    return {"teacher": teacher, "teacher_info": teacher_info, "ig_maps": maps, "attribution_info": attribution_info}


def run_training(
    config: TrainConfig,
    dataset,
    out_dir: str | Path,
    *,
    teacher_path: str | Path | None = None,
    attributions_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    on_epoch_end=None,
    teacher: torch.nn.Module | None = None,
    student=None,
    trusted=None,
) -> dict:
    """Load what ``config`` needs (teacher, IG maps), then train the run in ``out_dir``; returns its summary.

    Any classifier may be the teacher (``teacher``: an ``nn.Module`` taking [0, 1] pixels, or ``teacher_path``,
    an external one rebuilt by the factory ``trusted`` names) and the student (``student``: a zero-argument
    factory returning an ``nn.Module``, called once after the run's seeding; or ``config.student_arch``).

    A finished run is never trained over: without ``resume`` its folder is refused, with it the run's
    summary is returned as it is (said on stderr with ``progress``).
    """
    refuse_foreign_folder(out_dir)
    if resume and progress and read_summary(Path(out_dir) / SUMMARY) is not None:
        print(f"{out_dir} holds a finished run: nothing to train (its summary follows)", file=sys.stderr)
    inputs = load_inputs([config], dataset, teacher_path=teacher_path, attributions_dir=attributions_dir, teacher=teacher, trusted=trusted)
    return train(config, dataset, out_dir, resume=resume, progress=progress, on_epoch_end=on_epoch_end, student=student, **inputs)
