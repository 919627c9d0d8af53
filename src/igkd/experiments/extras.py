"""What a study measures on each finished run besides its accuracy: IG agreement with the teacher and robustness.

Asked for with ``--agreement N`` (``agreement.json``: :mod:`igkd.experiments.agreement`) and
``--robustness SPEC`` (``robustness.json``: :mod:`igkd.evaluate.robustness`), written into each
run's folder once the run is finished, and measured again only when the settings change. Every
study kind (ablation, montecarlo, sweep-cf, tune) shares these functions.
"""

from __future__ import annotations

from pathlib import Path

from igkd.atomic import atomic_write_json, read_json_object
from igkd.errors import IgkdError
from igkd.experiments.agreement import AGREEMENT_FILE, measure_agreement

ROBUSTNESS_FILE = "robustness.json"


def extras_record(options) -> dict:
    """The extras a study asks for, as study.json records them (``options``: a StudyOptions)."""
    return {
        "agreement": {"n": options.agreement, "n_steps": options.agreement_steps} if options.agreement else None,
        "robustness": options.robustness,
    }


def check_extras(options, teacher: dict | None) -> None:
    """Refuse, before anything trains, extras that could not be measured."""
    if options.agreement is not None:
        if options.agreement < 1:
            raise IgkdError(f"--agreement takes a number of test images (e.g. 500), got {options.agreement}")
        if teacher is None:
            raise IgkdError("--agreement compares each student's IG maps with the teacher's: pass --teacher CKPT")
    if options.robustness is not None:
        from igkd.evaluate.corruptions import parse_corruption_spec

        parse_corruption_spec(options.robustness)


def add_extras(run_dir: Path, dataset, teacher: dict | None, options, cache: dict | None = None) -> None:
    """agreement.json / robustness.json for a finished run, unless present with the same settings.

    ``cache``: a dict the caller keeps across the runs of a study (the teacher's IG maps are computed once).
    """
    if options.agreement is not None:
        existing = read_json_object(run_dir / AGREEMENT_FILE) or {}
        if (existing.get("n_requested"), existing.get("n_steps")) != (options.agreement, options.agreement_steps):
            result = measure_agreement(teacher["path"], run_dir, dataset, n=options.agreement, n_steps=options.agreement_steps, device=options.device, cache=cache)
            atomic_write_json(run_dir / AGREEMENT_FILE, result)
    if options.robustness is not None:
        existing = read_json_object(run_dir / ROBUSTNESS_FILE) or {}
        if existing.get("spec") != options.robustness:
            from igkd.devices import resolve_device
            from igkd.evaluate.robustness import evaluate_robustness
            from igkd.models import load_model

            device = resolve_device(options.device)
            model, _ = load_model(run_dir / "model.safetensors", trusted=options.trusted)
            result = evaluate_robustness(model.to(device), dataset, options.robustness, device=device)
            atomic_write_json(run_dir / ROBUSTNESS_FILE, result)
