"""The inputs a study's runs share (data, teacher file, IG maps): recorded in study.json, checked before anything trains.

The teacher and the IG cache are recorded by content (sha256, the maps' identity), so that a
study continued elsewhere is refused unless it trains with the same files (see
:mod:`igkd.experiments.study_folder`); :func:`check_inputs` refuses a plan whose runs could not
start (a method without its teacher or maps, a config-file key that acts on no run, extras that
could not be measured) before the first run trains.
"""

from __future__ import annotations

from pathlib import Path

from igkd.errors import IgkdError
from igkd.experiments.extras import check_extras


def dataset_record(dataset) -> dict:
    """name, fingerprint, sizes and classes of the data every run trains and is tested on."""
    return {"name": dataset.name, "fingerprint": dataset.fingerprint, "train": len(dataset.train), "test": len(dataset.test), "classes": list(dataset.classes)}


def teacher_record(path: str | Path | None, dataset, trusted=None) -> dict | None:
    """path, sha256, params and model name of the teacher file (checked against the dataset's classes)."""
    if path is None:
        return None
    from igkd.distill.run import resolve_checkpoint
    from igkd.models import count_parameters, load_model
    from igkd.provenance import sha256_file

    path = resolve_checkpoint(path)
    model, meta = load_model(path, trusted=trusted, option="--teacher-arch")
    if model.num_classes != dataset.num_classes:
        raise IgkdError(f"teacher {path} predicts {model.num_classes} classes but dataset {dataset.name} has {dataset.num_classes}")
    return {"path": str(path.resolve()), "sha256": sha256_file(path), "params": count_parameters(model), "model": meta["spec"]["name"]}


def attributions_record(path: str | Path | None, teacher: dict | None, dataset) -> dict | None:
    """path and manifest sha256 of the IG cache, refused unless built for this teacher and data."""
    if path is None:
        return None
    if teacher is None:
        raise IgkdError("IG maps are checked against their teacher: pass --teacher CKPT with --attributions")
    from igkd.attribution import open_attributions

    cache = open_attributions(path, teacher_sha256=teacher["sha256"], dataset_fingerprint=dataset.fingerprint, split="train")
    from igkd.attribution.cache import content_identity

    return {
        "path": str(Path(path).resolve()), "manifest_sha256": cache.manifest_sha256, "identity_sha256": content_identity(cache.manifest),
        "n_steps": cache.manifest.get("n_steps"), "reduction": cache.manifest.get("reduction"),
    }


def input_records(options, dataset, configs: dict) -> tuple[dict | None, dict | None]:
    """The teacher and IG-cache records of a study (``options``: its StudyOptions; ``configs``: its runs' configs by
    name); the cache is required when a config overlays maps."""
    teacher = teacher_record(options.teacher, dataset, options.trusted)
    needs_maps = any(c.p > 0 for c in configs.values())
    attributions = attributions_record(options.attributions, teacher, dataset) if options.attributions is not None or needs_maps else None
    if needs_maps and attributions is not None:
        from igkd.distill.run import check_overlay_reduction

        check_overlay_reduction(attributions["reduction"], attributions["path"])  # before the first run, not at the first IG run
    return teacher, attributions


def check_inputs(configs: dict, options, teacher: dict | None, attributions: dict | None) -> None:
    """Fail before any training when a planned run could not start, or the config file sets a key that acts
    on none of the planned runs (:func:`igkd.distill.config.refuse_no_effect`), or an extra could not be measured."""
    from igkd.distill.config import refuse_no_effect

    file_keys = [k for k in options.config_values or {} if k != "recipe"]
    refuse_no_effect(list(configs.values()), {k: "the --config file" for k in file_keys})
    for method, config in configs.items():
        if (config.uses_teacher or config.p > 0) and teacher is None:
            raise IgkdError(f"method {method!r} needs a teacher: pass --teacher CKPT")
        if config.p > 0 and attributions is None:
            raise IgkdError(f"method {method!r} overlays IG maps (p={config.p}): pass --attributions DIR (built by 'igkd attributions compute')")
    check_extras(options, teacher)
