"""What the runs of a cohort must share to train as one fused network (architecture, optimiser, schedule,
batches), and the check that they do; everything else (method, loss constants, seed, subset) is per run."""

from __future__ import annotations

import json
from pathlib import Path

from igkd.distill.config import TrainConfig
from igkd.errors import IgkdError


#: What the members of a cohort share (one fused network, one optimizer, one schedule, one loader).
#: Everything else (method, loss constants, overlay, seed, subset draw) is per member.
COHORT_SHARED = (
    "student", "width", "optimizer", "lr", "momentum", "nesterov", "weight_decay", "schedule", "warmup_fraction",
    "warmup_epochs", "epochs", "batch_size", "augment", "pad", "val_fraction", "split_seed", "subset", "device", "amp", "cpu_bf16",
    "compile", "eval_batch_size", "bn_recalibration_images", "at_teacher_layer", "at_student_layer", "at_divider",
    "student_arch", "student_arch_args", "student_normalize",
)


def fusable(config: TrainConfig) -> bool:
    """Whether the run's student can be fused into a cohort: the MobileNetV2 family only
    (:data:`igkd.models.fused.FUSED_LAYERS`); an external architecture trains run by run."""
    return config.student_arch is None and config.student != "external"


def cohort_key(config: TrainConfig) -> tuple:
    """Runs with equal keys can train as one cohort (:data:`COHORT_SHARED`)."""
    return tuple(json.dumps(getattr(config, name)) for name in COHORT_SHARED)


def check_cohort(configs: list[TrainConfig], outs: list[Path]) -> None:
    """One folder per config, no folder twice, and every :data:`COHORT_SHARED` setting equal; else one error line."""
    if not configs or len(configs) != len(outs):
        raise IgkdError(f"a cohort needs one output folder per config (got {len(configs)} configs and {len(outs)} folders)")
    if len({o.resolve() for o in outs}) != len(outs):
        raise IgkdError("two members of a cohort write to the same folder: give each run its own folder")
    for g, config in enumerate(configs[1:], 1):
        for name in COHORT_SHARED:
            if getattr(config, name) != getattr(configs[0], name):
                raise IgkdError(
                    f"runs {outs[0]} and {outs[g]} cannot train as one cohort: they differ in {name} "
                    f"({getattr(configs[0], name)!r} vs {getattr(config, name)!r}); train them in separate cohorts"
                )
