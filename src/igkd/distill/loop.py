"""The one training loop: teacher training, all distillation methods, and cohorts of runs.

Per step: a batch of the device-resident training split receives its crop/flip
(the IG maps receive the same), the IG overlay (probability p), then the student
and, when a loss term needs it, the frozen teacher run on that *same* augmented
view; the loss is KD (or plain CE) plus attention transfer. Each epoch ends with
validation on a held-out part of the training split, a metrics line, and an
atomic checkpoint that ``resume=True`` continues from exactly.

The loop trains G runs at once (a *cohort*, docs/training.md): runs that share the
architecture, optimizer, schedule, batch size and epochs but differ in method, loss
constants, seed and subset become one fused network (:mod:`igkd.models.fused`) whose
members each see their own batches. The tensors of a step are member-major
(``[G, B, ...]``); a single run is G = 1 and runs the plain model. Members with the
same data stream (seed and subset) share its batches; members that also draw the same
overlay see the same *view*, and the frozen teacher runs once per distinct view.
Each member writes its own run folder, exactly as a single run of its config would.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from igkd.atomic import append_jsonl, atomic_torch_save, atomic_write_json, atomic_write_text, load_json, remove_stale_temporaries
from igkd.data.dataset import Dataset
from igkd.data.loader import DeviceLoader
from igkd.data.splits import stratified_subset, train_val_split
from igkd.devices import autocast, frozen_copy, full_precision, prepare_model, resolve_device, unit_pixels
from igkd.distill.config import TrainConfig
from igkd.distill.controls import apply_mix, mix_draws, overlay_maps_for
from igkd.distill.distributed import DistContext
from igkd.distill.losses import FeatureTap, attention_layers
from igkd.distill.objective import Objective
from igkd.distill.overlay import apply_overlay, overlay_draws
from igkd.errors import IgkdError
from igkd.evaluate.accuracy import accuracy_report, evaluate
from igkd.models import build_model, count_parameters, save_model, spec_of
from igkd.models.fused import fuse, join_optimizer_state, load_member, member, member_state, split_optimizer_state
from igkd.progress import progress_bar
from igkd.provenance import environment
from igkd.torch_io import load_torch

CHECKPOINT = "checkpoint.pt"
#: A cohort member's new checkpoint, written next to its last one until every member has one (see :func:`resume_checkpoint`).
PENDING = "checkpoint.next.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.json"
MODEL = "model.safetensors"
#: The files a run writes atomically; a kill mid-write leaves ``.<name>.*.tmp``, removed when the run starts again.
RUN_FILES = (CHECKPOINT, PENDING, METRICS, SUMMARY, CONFIG, MODEL)


def split_plan(config: TrainConfig, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(train, val) indices into the training split and the rule that chose them.

    Without a subset: a stratified ``val_fraction`` of the training split, fixed by ``split_seed``
    for every run, is held out; the rest is trained on. With a Monte Carlo subset (``subset < 1``),
    the subset is a stratified ``subset`` fraction of the *whole* training split, drawn by
    ``subset_seed`` (the paper: 80% of 50,000 = 40,000 images), and the validation part
    (``val_fraction`` of each class of the whole split, drawn by ``split_seed``) comes from the
    images the subset leaves out, so selection is still on held-out data. When too few are left
    out for that (``subset + val_fraction > 1`` for some class), the validation part is fixed first
    and the subset drawn from the rest. Either way run r of every method (same ``subset_seed``) gets
    the same subset and the same validation part.
    """
    if config.subset >= 1.0:
        train_idx, val_idx = train_val_split(labels, config.val_fraction, config.split_seed)
        return train_idx, val_idx, f"a fixed stratified {config.val_fraction:g} of the training split held out (split_seed {config.split_seed})"
    seed = config.seed if config.subset_seed is None else config.subset_seed
    labels = labels.cpu()
    subset = stratified_subset(labels, config.subset, seed)
    left = torch.ones(len(labels), dtype=torch.bool)
    left[subset] = False
    generator = torch.Generator().manual_seed(int(config.split_seed))
    val_parts = []
    for cls in torch.unique(labels).tolist():
        members = labels == cls
        want = int(round(config.val_fraction * int(members.sum())))
        spare = torch.nonzero(members & left).flatten()
        if want > len(spare):
            break
        val_parts.append(spare[torch.randperm(len(spare), generator=generator)[:want]])
    else:
        val_idx = torch.sort(torch.cat(val_parts)).values if val_parts else torch.empty(0, dtype=torch.int64)
        return subset, val_idx, (
            f"a stratified {config.subset:g} subset of the whole training split (subset_seed {seed}); validation: "
            f"a stratified {config.val_fraction:g} of the split drawn from the images the subset leaves out (split_seed {config.split_seed})"
        )
    train_idx, val_idx = train_val_split(labels, config.val_fraction, config.split_seed)
    train_idx = train_idx[stratified_subset(labels[train_idx], config.subset, seed)]
    return train_idx, val_idx, (
        f"subset {config.subset:g} + val_fraction {config.val_fraction:g} exceed the training split: a fixed stratified "
        f"{config.val_fraction:g} held out (split_seed {config.split_seed}), then a stratified {config.subset:g} of the rest (subset_seed {seed})"
    )


def split_indices(config: TrainConfig, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices into the training split (see :func:`split_plan`)."""
    train_idx, val_idx, _ = split_plan(config, labels)
    return train_idx, val_idx


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units of uint8 images (the input normalisation)."""
    x = images.float().div(255).transpose(0, 1).flatten(1)
    return x.mean(1).tolist(), x.std(1).tolist()


def warmup_epochs(config: TrainConfig) -> float:
    """Length of the linear warm-up in epochs: ``warmup_fraction`` of the run, at most ``warmup_epochs``."""
    return min(config.warmup_fraction * config.epochs, config.warmup_epochs)


def _lr_lambda(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    total = config.epochs * steps_per_epoch
    warmup = int(warmup_epochs(config) * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    from igkd.models.fused import FusedBatchNorm2d

    kinds = (nn.modules.batchnorm._BatchNorm, FusedBatchNorm2d)
    return [m for m in model.modules() if isinstance(m, kinds) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device, amp: bool = True) -> int:
    """Recompute every BatchNorm's running mean/var from ``images`` (uint8 [N, C, H, W]) with the current weights.

    The running averages (momentum 0.1) mix statistics of the last few dozen steps' weights; early in
    training, or in a short run, the weights move faster than the averages follow, and evaluation with
    them can collapse to one class although the training batches are classified well. Only the
    BatchNorm layers are put in training mode (dropout stays off, no random numbers are drawn); the
    statistics are exact averages over ``images`` (momentum ``None``). Returns the number of images used.
    """
    batches = (
        unit_pixels(images[start : start + batch_size].to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
        for start in range(0, len(images), batch_size)
    )
    return len(images) if recalibrate_with(model, model, batches, device, amp) else 0


@torch.no_grad()
def recalibrate_with(model: nn.Module, forward: Callable, batches, device: torch.device, amp: bool = True, cpu_bf16: bool = False) -> bool:
    """:func:`recalibrate_batchnorm` of ``model``'s BatchNorms (plain or fused) by running ``forward`` on ``batches``
    (in bf16 where the training step runs in it: ``amp`` on CUDA, ``cpu_bf16`` on a CPU)."""
    norms = _batchnorms(model)
    if not norms:
        return False
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
        m.train()
    ran = False
    try:
        for batch in batches:
            with autocast(device, amp, cpu=cpu_bf16):
                forward(batch)
            ran = True
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return ran


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # One fused kernel per step for all parameters on CUDA (the for-each path launches several per tensor list).
    fused = {"fused": True} if next(model.parameters()).device.type == "cuda" else {}
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, **fused)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, **fused)
    # Adam's weight_decay is L2 in the gradient, as in the reference (which used none).
    return torch.optim.Adam(groups, lr=config.lr, **fused)


def _rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "overlay": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    """The process-wide RNG states of a checkpoint (the overlay generators are set per member)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _truncate_metrics(path: Path, last_epoch: int) -> None:
    """Keep only epochs <= last_epoch, so a resumed run logs every epoch exactly once."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and _metrics_epoch(line) <= last_epoch]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def _metrics_epoch(line: str) -> float:
    """The epoch of a metrics line; a line cut short by a kill counts as past every checkpoint (dropped)."""
    try:
        return int(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def read_summary(path: Path) -> dict | None:
    """A finished run's summary.json, or None when it is missing or unreadable (then the run is not finished)."""
    try:
        summary = load_json(path)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and "test_accuracy" in summary else None


def _saved_config(path: Path) -> dict:
    """The config.json of a run being resumed (a JSON object), or one error line naming it."""
    try:
        saved = load_json(path)
    except (OSError, ValueError) as err:
        raise IgkdError(f"cannot resume {path.parent}: its {path.name} is unreadable ({type(err).__name__}); remove the folder to train again, or use another --out") from None
    if not isinstance(saved, dict):
        raise IgkdError(f"cannot resume {path.parent}: its {path.name} holds a JSON {type(saved).__name__}, not a run config; remove the folder to train again, or use another --out")
    return saved


def resume_checkpoint(out: Path) -> Path | None:
    """The checkpoint the run in ``out`` resumes from (None: it starts at epoch 1). Reads, never writes.

    A cohort saves its members' checkpoints as one unit, in two phases (:meth:`Trainer._save_checkpoint`):
    every member's new checkpoint is written as ``checkpoint.next.pt`` beside its last one, then each is
    renamed onto ``checkpoint.pt``. A kill between two members' writes leaves some members a pending
    checkpoint: the run resumes from it when the renames had begun (a fellow member's ``checkpoint.pt``
    is of the same save, so every member has the new epoch), else from its ``checkpoint.pt``, like every
    other member. Either way all members resume at one epoch, and each folder alone is a single run's.
    """
    out = Path(out)
    pending = out / PENDING
    if pending.exists() and _renames_began(out, pending):
        return pending
    return out / CHECKPOINT if (out / CHECKPOINT).exists() else None


def _renames_began(out: Path, pending: Path) -> bool:
    """Whether some other member of the pending checkpoint's cohort save holds that save as its ``checkpoint.pt``."""
    save = load_torch(pending, map_location="cpu", what="training checkpoint").get("cohort") or {}
    for relative in save.get("members", []):
        other = (out / relative).resolve()
        if other == out.resolve() or not (other / CHECKPOINT).exists():
            continue
        if (load_torch(other / CHECKPOINT, map_location="cpu", what="training checkpoint").get("cohort") or {}).get("save") == save["save"]:
            return True
    return False


def settle_checkpoint(out: Path) -> None:
    """Finish or undo a cohort save that a kill cut short (:func:`resume_checkpoint`): afterwards ``checkpoint.pt``
    is the checkpoint to resume from and no pending one is left."""
    pending = Path(out) / PENDING
    if not pending.exists():
        return
    if resume_checkpoint(out) == pending:
        _commit_checkpoint(Path(out))
    else:
        pending.unlink()


def _commit_checkpoint(out: Path) -> None:
    """Phase 2 of a cohort's save, for one member: its pending checkpoint replaces its last one (one rename)."""
    os.replace(out / PENDING, out / CHECKPOINT)


def run_environment(device: torch.device) -> dict:
    """What a resumed run must share to continue bit-identically (docs/faults.md): CPU threads and device type."""
    return {"threads": torch.get_num_threads(), "device_type": device.type}


#: What the members of a cohort share (one fused network, one optimizer, one schedule, one loader).
#: Everything else (method, loss constants, overlay, seed, subset draw) is per member.
COHORT_SHARED = (
    "student", "width", "optimizer", "lr", "momentum", "nesterov", "weight_decay", "schedule", "warmup_fraction",
    "warmup_epochs", "epochs", "batch_size", "augment", "pad", "val_fraction", "split_seed", "subset", "device", "amp", "cpu_bf16",
    "compile", "eval_batch_size", "bn_recalibration_images", "at_teacher_layer", "at_student_layer", "at_divider",
)


def cohort_key(config: TrainConfig) -> tuple:
    """Runs with equal keys can train as one cohort (:data:`COHORT_SHARED`)."""
    return tuple(json.dumps(getattr(config, name)) for name in COHORT_SHARED)


def _check_cohort(configs: list[TrainConfig], outs: list[Path]) -> None:
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


class _Member:
    """What one run of a cohort keeps for itself: its config, folder, split, generator and progress."""

    def __init__(self, config: TrainConfig, out: Path, labels: torch.Tensor, device: torch.device, rank: int):
        self.config, self.out = config, out
        self.train_idx, self.val_idx, self.split_rule = split_plan(config, labels)
        self.generator = torch.Generator(device=device).manual_seed(config.seed * 7919 + rank)  # its overlay draws
        self.start_epoch, self.wall_before = 1, 0.0


#: The teacher's test accuracy by (weights' sha256, dataset fingerprint, batch size, device): a study's runs share one teacher.
_TEACHER_TEST: dict[tuple, float] = {}


def _distinct(keys: list) -> tuple[list[int], list[int]]:
    """(index of each item's class, first item of each class) for hashable keys."""
    first: dict = {}
    of = [first.setdefault(key, len(first)) for key in keys]
    firsts = [keys.index(key) for key in first]
    return of, firsts


class Trainer:
    """Holds the pieces of one run, or of a cohort of runs; ``run()`` trains them to the end (or from their checkpoints).

    ``config``/``out_dir``: one config and folder (a single run; ``run()`` returns its summary), or lists
    of G of each (a cohort; ``run()`` returns the G summaries). Cohort members must agree in
    :data:`COHORT_SHARED`; each is trained as its own single run would be in exact arithmetic (the fused
    network sums in another order; docs/training.md, "Cohorts", says what that means in float32).
    """

    def __init__(
        self,
        config: TrainConfig | list[TrainConfig],
        dataset: Dataset,
        out_dir: str | Path | list,
        *,
        teacher: nn.Module | None = None,
        teacher_info: dict | None = None,
        ig_maps: torch.Tensor | None = None,
        attribution_info: dict | None = None,
        resume: bool = False,
        progress: bool = True,
        on_epoch_end: Callable[[int, dict], None] | None = None,
        pointwise: str = "grouped",
    ):
        self.single = isinstance(config, TrainConfig)
        configs = [config] if self.single else list(config)
        outs = [Path(out_dir)] if isinstance(out_dir, (str, Path)) else [Path(o) for o in out_dir]
        _check_cohort(configs, outs)
        self.config, self.configs, self.G = configs[0], configs, len(configs)
        self.out = outs[0]
        self.dataset = dataset
        self.resume, self.show_progress, self.on_epoch_end = resume, progress, on_epoch_end
        self.teacher_info, self.attribution_info = teacher_info or {}, attribution_info or {}
        device = resolve_device(self.config.device)
        self.dist = DistContext.from_env(device.type)
        if self.dist.enabled and self.G > 1:
            raise IgkdError("a cohort of runs trains in one process: torchrun is for a single run")
        self.device = self.dist.device(device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution once
        for c in configs:
            self._check_inputs(c, teacher, ig_maps)
        for c, out in zip(configs, outs):
            self._prepare_folder(c, out)

        labels = dataset.train.labels
        self.members = [_Member(c, out, labels, self.device, self.dist.rank) for c, out in zip(configs, outs)]
        if len({len(m.train_idx) for m in self.members}) > 1 or len({len(m.val_idx) for m in self.members}) > 1:
            raise IgkdError("cohort members must train and validate on splits of equal size: train them in separate cohorts")
        self.train_idx, self.val_idx, self.split_rule = self.members[0].train_idx, self.members[0].val_idx, self.members[0].split_rule
        self.generator = self.members[0].generator
        extras = self._overlay_sources(ig_maps)
        self._plan_views()
        self.loader = DeviceLoader(
            dataset.train.images.to(self.device),
            labels,
            max(1, self.config.batch_size // self.dist.world_size),
            indices=[self.members[g].train_idx for g in self.stream_first],
            shuffle=True,
            augment=self.config.augment,
            pad=self.config.pad,
            seed=[configs[g].seed for g in self.stream_first],
            extras=extras,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            drop_last=self.config.compile,  # a compiled step sees one batch shape, not a new one each epoch end
        )

        models = []
        for m in self.members:  # each member's initial weights from its own seed, as its single run draws them
            torch.manual_seed(m.config.seed + 1_000 * self.dist.rank)
            if teacher is not None:
                mean, std = teacher.normalize.mean.flatten().tolist(), teacher.normalize.std.flatten().tolist()
            else:
                mean, std = channel_stats(dataset.train.images[m.train_idx])
            models.append(build_model(self.config.student, num_classes=dataset.num_classes, width=self.config.width, mean=mean, std=std))
        self.model = prepare_model(models[0] if self.G == 1 else fuse(models, pointwise), self.device)
        self.objective = Objective.from_configs(configs, self.device)
        self.teacher = None
        self.reference_teacher = prepare_model(teacher, self.device).eval() if teacher is not None else None
        if teacher is not None and any(c.uses_teacher for c in configs):
            self.teacher = frozen_copy(teacher, self.device, bf16=self.config.amp and (self.device.type == "cuda" or self.config.cpu_bf16 != "off"))
        self.taps = None
        if any(c.gamma > 0 for c in configs):
            c = self.config
            self.at_layers = attention_layers(self.teacher, models[0], c.at_divider, c.at_teacher_layer, c.at_student_layer)
            student_tap = FeatureTap(self.model, self.at_layers["student"]) if self.G == 1 else self.model.tap(self.at_layers["student"])
            self.taps = (student_tap, FeatureTap(self.teacher, self.at_layers["teacher"]))
        self.train_model: nn.Module = self.model
        if self.dist.enabled:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.dist.local_rank] if self.device.type == "cuda" else None
            )
        if self.config.compile:
            self.train_model = torch.compile(self.train_model)
        self.optimizer = _optimizer(self.config, self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(self.config, len(self.loader)))
        self.start_epoch, self.teacher_test = 1, None
        self._epoch, self._mix = 1, None  # the epoch being trained (DKD's warm-up) and its mixing draws
        self._val: torch.Tensor | None = None
        self._calibration: torch.Tensor | None = None
        self.wall_before = 0.0

    # -- set-up -------------------------------------------------------------------------------
    def _overlay_sources(self, ig_maps: torch.Tensor | None) -> dict | None:
        """The distinct map tensors the members overlay (the IG cache, or a control built from it, see
        :func:`igkd.distill.controls.overlay_maps_for`), stacked as the loader's extra ``[N, sources, H, W]``
        so that one crop/flip serves them all; each overlaying member's source index in ``member_source``."""
        sources: dict[tuple, torch.Tensor] = {}
        self.member_source = []
        for m in self.members:
            c = m.config
            if c.p <= 0:
                self.member_source.append(None)
                continue
            seeded = c.overlay_maps in ("shuffled", "random")
            key = (c.overlay_maps, c.seed if seeded else None, c.random_map_sigma if c.overlay_maps == "random" else None)
            if key not in sources:
                sources[key] = overlay_maps_for(c, ig_maps)
            self.member_source.append(list(sources).index(key))
        return {"ig": torch.stack(list(sources.values()), 1)} if sources else None

    def _plan_views(self) -> None:
        """Streams (distinct seed + training subset), views (a stream with or without one overlay draw)
        and the views the teacher must see; each member's index into them, as device tensors."""
        members = self.members
        stream_keys = []
        for m in members:
            same = [k for k, other in enumerate(members[: len(stream_keys)]) if other.config.seed == m.config.seed and torch.equal(other.train_idx, m.train_idx)]
            stream_keys.append(stream_keys[same[0]] if same else len(stream_keys))
        self.member_stream, self.stream_first = _distinct(stream_keys)
        view_keys = [
            (s, (c.p, c.ig_scale_low, c.ig_scale_high, source) if c.p > 0 else None)
            for s, c, source in zip(self.member_stream, (m.config for m in members), self.member_source)
        ]
        self.member_view, view_first = _distinct(view_keys)
        self.view_stream = [self.member_stream[g] for g in view_first]
        self.overlay_views = [v for v, g in enumerate(view_first) if members[g].config.p > 0]
        self.overlay_first = [view_first[v] for v in self.overlay_views]  # the member whose generator draws the view
        teacher_views = sorted({self.member_view[g] for g, m in enumerate(members) if m.config.uses_teacher})
        self.teacher_views = teacher_views
        self.member_teacher_view = [teacher_views.index(v) if v in teacher_views else 0 for v in self.member_view]
        # Mixing (CutMix/Mixup) makes each member's batch its own: the teacher then sees the members' mixed batches.
        self.mixing = any(m.config.mix != "none" for m in members)
        teacher_members = [g for g, m in enumerate(members) if m.config.uses_teacher]
        self.teacher_members = teacher_members
        rows = [teacher_members.index(g) if g in teacher_members else 0 for g in range(self.G)] if self.mixing else self.member_teacher_view
        as_index = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
        self._idx = {
            "view_stream": as_index(self.view_stream),
            "member_view": as_index(self.member_view),
            "member_stream": as_index(self.member_stream),
            "overlay": as_index(self.overlay_views),
            "overlay_stream": as_index([self.view_stream[v] for v in self.overlay_views]),
            "overlay_source": as_index([self.member_source[g] for g in self.overlay_first]),
            "teacher_views": as_index(teacher_views),
            "teacher_members": as_index(teacher_members),
            "teacher_rows": as_index(rows),
        }
        identity = lambda values: values == list(range(len(values)))  # noqa: E731
        self._teacher_rows_identity = identity(rows)
        self._views_are_streams = identity(self.view_stream) and not self.overlay_views
        self._members_are_views = identity(self.member_view)
        self._members_are_streams = identity(self.member_stream)

    def _check_inputs(self, config: TrainConfig, teacher, ig_maps) -> None:
        if config.uses_teacher and teacher is None:
            raise IgkdError(f"method {config.method!r} (alpha={config.alpha}, gamma={config.gamma}) needs a teacher: pass --teacher CKPT")
        if config.p > 0:
            if ig_maps is None:
                raise IgkdError(f"method {config.method!r} overlays IG maps (p={config.p}): pass --attributions DIR (built by 'igkd attributions compute')")
            expected = (len(self.dataset.train), *self.dataset.image_size)
            if tuple(ig_maps.shape) != expected:
                raise IgkdError(f"IG maps have shape {tuple(ig_maps.shape)} but the training split needs {expected} (one map per training image, in dataset order)")

    def _prepare_folder(self, config: TrainConfig, out: Path) -> None:
        if not self.dist.is_main:
            return
        out.mkdir(parents=True, exist_ok=True)
        config_path = out / CONFIG
        finished = read_summary(out / SUMMARY) is not None
        if not self.resume and (finished or (out / SUMMARY).exists() or (out / MODEL).exists()):
            raise IgkdError(f"{out} holds a finished run ({SUMMARY} or {MODEL} is there): use another --out, or remove that folder")
        if ((out / CHECKPOINT).exists() or (out / PENDING).exists()) and not self.resume:
            raise IgkdError(f"{out} already holds a run: continue it with --resume, or choose another --out")
        if self.resume and not finished and (out / MODEL).exists() and not (out / CHECKPOINT).exists():
            raise IgkdError(f"{out} holds {MODEL} but neither a readable {SUMMARY} nor {CHECKPOINT}: it cannot be resumed; use another --out, or remove that folder")
        if self.resume and config_path.exists():
            saved = _saved_config(config_path)
            current = json.loads(json.dumps(config.to_dict()))
            defaults = TrainConfig().to_dict()  # a key added since the run was saved has its default there
            changed = sorted(k for k in current if saved.get(k, defaults.get(k)) != current[k] and k not in ("device", "compile"))
            if changed:
                raise IgkdError(
                    f"cannot resume {out}: its saved config differs in {', '.join(changed)} "
                    f"(e.g. {changed[0]}={saved.get(changed[0])!r} there vs {current[changed[0]]!r} now); use the same options or another --out"
                )
        if finished:
            return  # resumed when finished: run() reports its summary, and nothing in the folder is rewritten
        atomic_write_json(config_path, config.to_dict())
        remove_stale_temporaries(out, RUN_FILES)  # left by a write killed half-way
        settle_checkpoint(out)  # a cohort's save cut short between two members: finish or undo it
        if not (out / CHECKPOINT).exists():
            _truncate_metrics(out / METRICS, 0)  # killed before its first checkpoint: its epochs start over

    def _load_checkpoint(self) -> None:
        paths = [m.out / CHECKPOINT for m in self.members]  # settled by _prepare_folder
        if not self.resume or not any(p.exists() for p in paths):
            return
        # On the CPU: RNG states must be CPU ByteTensors (torch.set_rng_state, Generator.set_state);
        # load_state_dict then copies weights and optimizer state onto the model's device.
        states = [load_torch(p, map_location="cpu", what="training checkpoint") if p.exists() else None for p in paths]
        epochs = {str(m.out): (int(s["epoch"]) if s else 0) for m, s in zip(self.members, states)}
        if len(set(epochs.values())) > 1:
            raise IgkdError(
                f"the runs of this cohort stopped at different epochs ({', '.join(f'{k}: {v}' for k, v in epochs.items())}): "
                "train them in separate cohorts (studies group runs by their checkpoint's epoch)"
            )
        for m, state in zip(self.members, states):
            self._check_environment(state, m.out)
        if self.G == 1:
            self.model.load_state_dict(states[0]["model"])
            self.optimizer.load_state_dict(states[0]["optimizer"])
        else:
            for g, state in enumerate(states):
                load_member(self.model, g, state["model"])
            self.optimizer.load_state_dict(join_optimizer_state(self.model, self.optimizer, [s["optimizer"] for s in states]))
        self.scheduler.load_state_dict(states[0]["scheduler"])
        for m, state in zip(self.members, states):
            m.generator.set_state(state["rng"]["overlay"])
        _set_rng_state(states[0]["rng"])
        self.start_epoch = int(states[0]["epoch"]) + 1
        self.teacher_test = states[0].get("teacher_test")
        self.wall_before = float(states[0].get("wall_time_s", 0.0))
        if self.dist.is_main:
            for m in self.members:
                _truncate_metrics(m.out / METRICS, self.start_epoch - 1)

    def _save_checkpoint(self, epoch: int, wall: float) -> None:
        if not self.dist.is_main:
            return
        common = {"scheduler": self.scheduler.state_dict(), "epoch": epoch, "teacher_test": self.teacher_test, "wall_time_s": wall, **run_environment(self.device)}
        if self.G == 1:
            per_member = [(self.model.state_dict(), spec_of(self.model), self.optimizer.state_dict())]
        else:
            optimizers = split_optimizer_state(self.model, self.optimizer)
            per_member = [(member_state(self.model, g), self.model.specs[g], optimizers[g]) for g in range(self.G)]
        drawn_by = {g: self.overlay_first[self.overlay_views.index(v)] for g, v in enumerate(self.member_view) if v in self.overlay_views}
        states = []
        for g, (m, (model_state, spec, optimizer_state)) in enumerate(zip(self.members, per_member)):
            generator = self.members[drawn_by.get(g, g)].generator  # members sharing a view share its draws
            states.append({"model": model_state, "spec": spec, "optimizer": optimizer_state, "rng": _rng_state(generator), **common})
        if self.G == 1:
            atomic_torch_save(self.out / CHECKPOINT, states[0])
            return
        # A cohort's checkpoint is one unit (all members at the new epoch, or all at the last): write every
        # member's new checkpoint beside its last one, then rename them into place (see resume_checkpoint).
        save = uuid.uuid4().hex
        for m, state in zip(self.members, states):
            members = [os.path.relpath(other.out.resolve(), m.out.resolve()) for other in self.members]
            atomic_torch_save(m.out / PENDING, {**state, "cohort": {"members": members, "save": save}})
        for m in self.members:
            _commit_checkpoint(m.out)

    def _check_environment(self, state: dict, out: Path) -> None:
        """Warn (one line) when the run resumes with other CPU threads or another device type than it was saved with."""
        saved = {key: state.get(key) for key in ("threads", "device_type")}
        now = run_environment(self.device)
        changed = [f"{key} {saved[key]} -> {now[key]}" for key in now if saved[key] is not None and saved[key] != now[key]]
        if changed and self.dist.is_main:
            print(
                f"warning: resuming {out} with {', '.join(changed)}: the result will not be bit-identical to an uninterrupted run "
                "(set the same threads, e.g. OMP_NUM_THREADS, and device to reproduce it)",
                file=sys.stderr,
            )

    # -- training -----------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Member-major images ``[G, B, 3, H, W]`` -> logits ``[G, B, K]``."""
        if self.G == 1:
            return self.train_model(x[0].contiguous(memory_format=torch.channels_last)).unsqueeze(0)
        return self.train_model(x)

    def _student_features(self) -> torch.Tensor:
        features = self.taps[0].take()
        return features.unsqueeze(0) if self.G == 1 else features

    def _draw_overlays(self) -> None:
        """This epoch's overlay draws (apply?, exponent) for every sample of every overlay view: ``[V_o, n]``."""
        self._draws = None
        if self.overlay_views:
            n = self.loader.epoch_length()
            drawn = [
                overlay_draws(n, c.p, c.ig_scale_low, c.ig_scale_high, self.members[g].generator, self.device)
                for g, c in ((g, self.members[g].config) for g in self.overlay_first)
            ]
            self._draws = (torch.stack([a for a, _ in drawn]), torch.stack([s for _, s in drawn]))

    def _views(self, batch, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(views ``[V, B, 3, H, W]``, labels ``[S, B]``) of one batch: each stream's images, with the overlays drawn."""
        S = batch.streams
        images = batch.images.unflatten(0, (S, -1))
        labels = batch.labels.unflatten(0, (S, -1))
        if self._views_are_streams:
            return images, labels
        views = images.index_select(0, self._idx["view_stream"])
        if self.overlay_views:
            B = images.shape[1]
            apply, exponent = (d[:, offset : offset + B] for d in self._draws)
            rows = torch.arange(B, device=images.device)[None, :]
            maps = batch.extras["ig"].unflatten(0, (S, -1))[self._idx["overlay_stream"][:, None], rows, self._idx["overlay_source"][:, None]]
            laid = apply_overlay(views.index_select(0, self._idx["overlay"]).flatten(0, 1), maps.flatten(0, 1), apply.flatten(), exponent.flatten())
            views = views.index_copy(0, self._idx["overlay"], laid.unflatten(0, (len(self.overlay_views), B)))
        return views, labels

    def _step(self, batch, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step of every member; returns (loss ``[G]``, correct predictions ``[G]``), still on the device."""
        views, labels = self._views(batch, offset)
        x = views if self._members_are_views else views.index_select(0, self._idx["member_view"])
        y = labels if self._members_are_streams else labels.index_select(0, self._idx["member_stream"])
        mixed = {}
        if self.mixing:
            x, (y, labels_b, lam) = apply_mix(x, y, self._mix, offset // self.loader.batch_size)
            mixed = {"labels_b": labels_b, "lam": lam}
            seen = x if len(self.teacher_members) == self.G else x.index_select(0, self._idx["teacher_members"])
        elif self.teacher is not None:
            seen = views.index_select(0, self._idx["teacher_views"]) if len(self.teacher_views) < len(views) else views
        with autocast(self.device, self.config.amp, cpu=self.config.cpu_bf16 == "all"):
            logits = self._forward(x)
            teacher_logits = None
            if self.teacher is not None:
                with torch.inference_mode(), autocast(self.device, self.config.amp, cpu=self.config.cpu_bf16 != "off"):
                    out = self.teacher(seen.flatten(0, 1).contiguous(memory_format=torch.channels_last))  # the views the students saw
                teacher_logits = self._per_member(out.clone(), seen.shape[1])  # an ordinary tensor: the loss may keep it for backward
        losses = self.objective.logit_losses(logits, teacher_logits, y, epoch=self._epoch, **mixed)
        if self.taps is not None:
            teacher_features = self._per_member(self.taps[1].take().clone(), x.shape[1])
            losses = losses + self.objective.attention_losses(self._student_features(), teacher_features)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # each member's parameters get the gradient of its own loss only
        self.optimizer.step()
        self.scheduler.step()
        return losses.detach(), (logits.argmax(-1) == y).sum(1)

    def _per_member(self, teacher_out: torch.Tensor, B: int) -> torch.Tensor:
        """Teacher outputs on the teacher views ``[V_t * B, ...]`` -> each member's ``[G, B, ...]``."""
        out = teacher_out.unflatten(0, (-1, B))
        return out if self._teacher_rows_identity else out.index_select(0, self._idx["teacher_rows"])

    def _member_batches(self, images: torch.Tensor, index: torch.Tensor, batch_size: int):
        """Device batches ``[G, b, 3, H, W]`` in [0, 1] of uint8 ``images`` at ``index`` ``[G, N]`` (a shared row is moved once)."""
        shared = bool((index == index[:1]).all())
        for start in range(0, index.shape[1], batch_size):
            part = index[:1 if shared else self.G, start : start + batch_size]
            x = unit_pixels(images[part.reshape(-1)].to(self.device, non_blocking=True)).unflatten(0, part.shape)
            yield x.expand(self.G, *x.shape[1:]) if shared else x

    @torch.no_grad()
    def _predict(self, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Logits ``[G, N, K]`` (float32, or float64 in a float64 training; CPU) of every member, in eval mode."""
        was_training = self.model.training
        self.model.eval()
        outputs = []
        try:
            for x in self._member_batches(images, index, self.config.eval_batch_size):
                with autocast(self.device, self.config.amp, cpu=self.config.cpu_bf16 == "all"):
                    outputs.append(full_precision(self._forward(x)).cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(outputs, 1)

    def _recalibrate(self) -> None:
        """Fresh BatchNorm statistics for the current weights (see :func:`recalibrate_batchnorm`): before each
        validation, and before the test when no validation ran after the last epoch."""
        n = min(self.config.bn_recalibration_images, len(self.train_idx))
        if n == 0:
            return
        if self._calibration is None:  # chosen once: evenly spread over each member's (sorted, stratified) training indices
            spread = torch.linspace(0, len(self.train_idx) - 1, n).round().long()
            self._calibration = torch.stack([m.train_idx[spread] for m in self.members])
        batches = self._member_batches(self.dataset.train.images, self._calibration, self.config.eval_batch_size)
        recalibrate_with(self.model, self._forward, batches, self.device, self.config.amp, cpu_bf16=self.config.cpu_bf16 == "all")

    def _evaluate(self, split: str) -> list[dict] | list[None]:
        """Each member's accuracy report on ``val`` (its own held-out part) or ``test``."""
        if split == "val":
            if len(self.val_idx) == 0:
                return [None] * self.G
            if self._val is None:
                self._val = torch.stack([m.val_idx for m in self.members])
            images, index, labels = self.dataset.train.images, self._val, self.dataset.train.labels[self._val]
        else:
            images, labels = self.dataset.test.images, self.dataset.test.labels
            index = torch.arange(len(labels)).expand(self.G, -1)
            labels = labels.expand(self.G, -1)
        logits = self._predict(images, index)
        return [accuracy_report(logits[g], labels[g], self.dataset.classes) for g in range(self.G)]

    def run(self) -> dict | list[dict]:
        config = self.config
        if self.resume:
            finished = [read_summary(m.out / SUMMARY) for m in self.members]
            if all(f is not None for f in finished):
                return finished[0] if self.single else finished
            if any(f is not None for f in finished):
                done = [str(m.out) for m, f in zip(self.members, finished) if f is not None]
                raise IgkdError(f"{', '.join(done)} finished already: leave finished runs out of a cohort")
        self._load_checkpoint()
        if self.reference_teacher is not None and self.teacher_test is None:
            key = (self.teacher_info.get("sha256"), self.dataset.fingerprint, self.config.eval_batch_size, str(self.device))
            if key[0] is None or key not in _TEACHER_TEST:
                _TEACHER_TEST[key] = self.dataset_accuracy(self.reference_teacher)
            self.teacher_test = _TEACHER_TEST[key]
            if self.show_progress and self.dist.is_main:
                print(f"teacher test accuracy: {self.teacher_test:.2f}%", file=sys.stderr)
        started = time.perf_counter()
        what = "" if self.G == 1 else f" ({self.G} runs)"
        for epoch in range(self.start_epoch, config.epochs + 1):
            self.loader.set_epoch(epoch)
            self._draw_overlays()
            self._epoch = epoch
            if self.mixing:  # this epoch's CutMix/Mixup draws of every member, on the device once
                self._mix = mix_draws(self.configs, epoch, len(self.loader), self.loader.batch_size).to(self.device)
            self.model.train()
            tick = time.perf_counter()
            loss_sum = torch.zeros(self.G, device=self.device)
            correct = torch.zeros(self.G, device=self.device, dtype=torch.long)
            seen = 0
            with progress_bar(len(self.loader), f"epoch {epoch}/{config.epochs}{what}", enabled=self.show_progress and self.dist.is_main) as bar:
                for step, batch in enumerate(self.loader):
                    loss, hits = self._step(batch, seen)
                    n = len(batch.labels) // batch.streams
                    loss_sum += loss * n
                    correct += hits
                    seen += n
                    if step % 50 == 49 and not torch.isfinite(loss_sum).all():
                        self._non_finite(epoch, step, loss_sum)
                    bar.advance(1, items=n * self.G)
            if not torch.isfinite(loss_sum).all():
                self._non_finite(epoch, len(self.loader) - 1, loss_sum)
            if self.G == 1:
                loss_total, correct_total, seen_total = self.dist.sum([loss_sum.item(), correct.item(), seen], self.device)
                totals = [(loss_total, correct_total)]
            else:
                totals, seen_total = list(zip(loss_sum.tolist(), correct.tolist())), seen
            epoch_time = time.perf_counter() - tick
            if len(self.val_idx):  # without a validation part, the statistics are recomputed once, for the test
                self._recalibrate()
            vals = self._evaluate("val")
            wall = self.wall_before + time.perf_counter() - started
            records = []
            for m, (loss_total, correct_total), val in zip(self.members, totals, vals):
                record = {
                    "epoch": epoch,
                    "train_loss": loss_total / max(seen_total, 1),
                    "train_accuracy": 100.0 * correct_total / max(seen_total, 1),
                    "val_accuracy": val["accuracy"] if val else None,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "epoch_time_s": round(epoch_time, 3),
                    "images_per_s": round(seen_total / epoch_time, 1),
                    **({} if self.G == 1 else {"cohort_size": self.G}),
                }
                records.append(record)
                if self.dist.is_main:
                    append_jsonl(m.out / METRICS, record)
                    if self.show_progress:
                        val_text = "-" if record["val_accuracy"] is None else f"{record['val_accuracy']:.2f}%"
                        who = "" if self.G == 1 else f"{m.out.name}: "
                        print(f"{who}epoch {epoch}/{config.epochs}: loss {record['train_loss']:.4f}, train {record['train_accuracy']:.2f}%, "
                              f"val {val_text}, {record['images_per_s']:,.0f} img/s", file=sys.stderr)
            self._save_checkpoint(epoch, wall)
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch, records[0])
        summaries = self._finish(self.wall_before + time.perf_counter() - started)
        return summaries[0] if self.single else summaries

    def dataset_accuracy(self, model: nn.Module) -> float:
        return evaluate(model, self.dataset.test.images, self.dataset.test.labels, self.dataset.classes, self.config.eval_batch_size, self.device)["accuracy"]

    def _non_finite(self, epoch: int, step: int, loss_sum: torch.Tensor) -> None:
        bad = [str(m.out) for m, ok in zip(self.members, torch.isfinite(loss_sum).tolist()) if not ok]
        kept = f"the last good checkpoint (epoch {epoch - 1}) is kept" if epoch > 1 else "no checkpoint was written"
        where = f"in {self.out / CHECKPOINT}" if self.G == 1 else f"in each run's {CHECKPOINT}"
        whose = "" if self.G == 1 else f" of {', '.join(bad)} (in a cohort of {self.G}; train it alone with other settings)"
        raise IgkdError(f"the training loss{whose} became NaN/inf in epoch {epoch} (by step {step + 1}); {kept} {where}. Lower --lr or check the inputs")

    def _finish(self, wall: float) -> list[dict]:
        if not len(self.val_idx):
            self._recalibrate()  # no epoch recomputed them (a checkpoint written after one holds them)
        vals, tests = self._evaluate("val"), self._evaluate("test")
        summaries = []
        for g, (m, val, test) in enumerate(zip(self.members, vals, tests)):
            model = self.model if self.G == 1 else member(self.model, g)
            c = m.config
            summary = {
                "kind": "teacher" if c.student == "teacher" else "student",
                "method": c.method,
                "recipe": c.recipe,
                "student": c.student,
                "params": count_parameters(model),
                "seed": c.seed,
                "subset": c.subset,
                "subset_seed": c.seed if c.subset_seed is None else c.subset_seed,
                "train_size": len(m.train_idx),
                "val_size": len(m.val_idx),
                "split": m.split_rule,
                "val_accuracy": val["accuracy"] if val else None,
                "test_accuracy": test["accuracy"],
                "test_per_class": test["per_class"],
                "teacher_test_accuracy": self.teacher_test,
                "epochs": c.epochs,
                "wall_time_s": round(wall, 2),
                "cohort_size": self.G,
                "dataset": {"name": self.dataset.name, "fingerprint": self.dataset.fingerprint, "source": self.dataset.source},
                "teacher": self.teacher_info or None,
                "attributions": (self.attribution_info or None) if c.p > 0 else None,
                "attention_layers": getattr(self, "at_layers", None) if c.gamma > 0 else None,
                "world_size": self.dist.world_size,
                "config": c.to_dict(),
                "environment": environment(self.device),
            }
            if self.dist.is_main:
                save_model(m.out / MODEL, model, {"summary": {k: summary[k] for k in ("method", "seed", "test_accuracy", "val_accuracy")}})
                atomic_write_json(m.out / SUMMARY, summary)
            summaries.append(summary)
        self.dist.barrier()
        if self.taps is not None:
            for tap in self.taps:
                tap.remove()
        return summaries


def train(config: TrainConfig, dataset: Dataset, out_dir: str | Path, **kwargs) -> dict:
    """Train one run to completion (resuming when ``resume=True``) and return its summary."""
    return Trainer(config, dataset, out_dir, **kwargs).run()


def train_cohort(configs: list[TrainConfig], dataset: Dataset, out_dirs: list, **kwargs) -> list[dict]:
    """Train G runs as one cohort (resuming when ``resume=True``) and return their summaries, in order."""
    return Trainer(list(configs), dataset, list(out_dirs), **kwargs).run()
