"""Distillation: loss terms, the IG overlay, method presets and the one training loop."""

from igkd.distill.config import METHODS, PAPER_METHODS, RECIPES, TrainConfig, resolve_config
from igkd.distill.loop import Trainer, train, train_cohort
from igkd.distill.overlay import apply_overlay, ig_overlay, overlay_draws
from igkd.distill.run import run_training

__all__ = [
    "train_cohort",
    "METHODS",
    "PAPER_METHODS",
    "RECIPES",
    "TrainConfig",
    "Trainer",
    "apply_overlay",
    "ig_overlay",
    "overlay_draws",
    "resolve_config",
    "run_training",
    "train",
]
