"""The one training loop: teacher training and all eight distillation methods.

Per step: a batch of the device-resident training split receives its crop/flip
(the IG maps receive the same), the IG overlay (probability p), then the student
and, when a loss term needs it, the frozen teacher run on that *same* augmented
view; the loss is KD (or plain CE) plus attention transfer. Each epoch ends with
validation on a held-out part of the training split, a metrics line, and an
atomic checkpoint that ``resume=True`` continues from exactly.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from igkd.atomic import append_jsonl, atomic_torch_save, atomic_write_json, atomic_write_text, remove_stale_temporaries
from igkd.data.dataset import Dataset
from igkd.data.loader import DeviceLoader
from igkd.data.splits import stratified_subset, train_val_split
from igkd.devices import autocast, frozen_copy, prepare_model, resolve_device
from igkd.distill.config import TrainConfig
from igkd.distill.distributed import DistContext
from igkd.distill.losses import FeatureTap, attention_layers, attention_transfer_loss, kd_loss
from igkd.distill.overlay import ig_overlay
from igkd.errors import IgkdError
from igkd.evaluate.accuracy import evaluate
from igkd.models import build_model, count_parameters, save_model
from igkd.progress import progress_bar
from igkd.provenance import environment
from igkd.torch_io import load_torch

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.json"
MODEL = "model.safetensors"
#: The files a run writes atomically; a kill mid-write leaves ``.<name>.*.tmp``, removed when the run starts again.
RUN_FILES = (CHECKPOINT, METRICS, SUMMARY, CONFIG, MODEL)


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


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device, amp: bool = True) -> int:
    """Recompute every BatchNorm's running mean/var from ``images`` (uint8 [N, C, H, W]) with the current weights.

    The running averages (momentum 0.1) mix statistics of the last few dozen steps' weights; early in
    training, or in a short run, the weights move faster than the averages follow, and evaluation with
    them can collapse to one class although the training batches are classified well. Only the
    BatchNorm layers are put in training mode (dropout stays off, no random numbers are drawn); the
    statistics are exact averages over ``images`` (momentum ``None``). Returns the number of images used.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or len(images) == 0:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
        m.train()
    try:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(device, non_blocking=True).float().div_(255)
            with autocast(device, amp):
                model(batch.contiguous(memory_format=torch.channels_last))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return len(images)


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


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["overlay"])
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
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and "test_accuracy" in summary else None


def run_environment(device: torch.device) -> dict:
    """What a resumed run must share to continue bit-identically (docs/faults.md): CPU threads and device type."""
    return {"threads": torch.get_num_threads(), "device_type": device.type}


class Trainer:
    """Holds the pieces of one run; ``run()`` trains it to the end (or from its checkpoint)."""

    def __init__(
        self,
        config: TrainConfig,
        dataset: Dataset,
        out_dir: str | Path,
        *,
        teacher: nn.Module | None = None,
        teacher_info: dict | None = None,
        ig_maps: torch.Tensor | None = None,
        attribution_info: dict | None = None,
        resume: bool = False,
        progress: bool = True,
        on_epoch_end: Callable[[int, dict], None] | None = None,
    ):
        self.config, self.dataset, self.out = config, dataset, Path(out_dir)
        self.resume, self.show_progress, self.on_epoch_end = resume, progress, on_epoch_end
        self.teacher_info, self.attribution_info = teacher_info or {}, attribution_info or {}
        device = resolve_device(config.device)
        self.dist = DistContext.from_env(device.type)
        self.device = self.dist.device(device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution once
        self._check_inputs(teacher, ig_maps)
        self._prepare_folder()

        torch.manual_seed(config.seed + 1_000 * self.dist.rank)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed * 7919 + self.dist.rank)
        labels = dataset.train.labels
        self.train_idx, self.val_idx, self.split_rule = split_plan(config, labels)
        extras = {"ig": ig_maps} if config.p > 0 else None
        self.loader = DeviceLoader(
            dataset.train.images.to(self.device),
            labels,
            max(1, config.batch_size // self.dist.world_size),
            indices=self.train_idx,
            shuffle=True,
            augment=config.augment,
            pad=config.pad,
            seed=config.seed,
            extras=extras,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            drop_last=config.compile,  # a compiled step sees one batch shape, not a new one each epoch end
        )

        if teacher is not None:
            mean, std = teacher.normalize.mean.flatten().tolist(), teacher.normalize.std.flatten().tolist()
        else:
            mean, std = channel_stats(dataset.train.images[self.train_idx])
        self.model = prepare_model(
            build_model(config.student, num_classes=dataset.num_classes, width=config.width, mean=mean, std=std), self.device
        )
        self.teacher = None
        self.reference_teacher = prepare_model(teacher, self.device).eval() if teacher is not None else None
        if teacher is not None and config.uses_teacher:
            self.teacher = frozen_copy(teacher, self.device, bf16=config.amp and self.device.type == "cuda")
        self.taps = None
        if config.gamma > 0:
            self.at_layers = attention_layers(self.teacher, self.model, config.at_divider, config.at_teacher_layer, config.at_student_layer)
            self.taps = (FeatureTap(self.model, self.at_layers["student"]), FeatureTap(self.teacher, self.at_layers["teacher"]))
        self.train_model: nn.Module = self.model
        if self.dist.enabled:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.dist.local_rank] if self.device.type == "cuda" else None
            )
        if config.compile:
            self.train_model = torch.compile(self.train_model)
        self.optimizer = _optimizer(config, self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(config, len(self.loader)))
        self.start_epoch, self.teacher_test = 1, None
        self._val: tuple[torch.Tensor, torch.Tensor] | None = None
        self._calibration: torch.Tensor | None = None
        self.wall_before = 0.0

    # -- set-up -------------------------------------------------------------------------------
    def _check_inputs(self, teacher, ig_maps) -> None:
        config = self.config
        if config.uses_teacher and teacher is None:
            raise IgkdError(f"method {config.method!r} (alpha={config.alpha}, gamma={config.gamma}) needs a teacher: pass --teacher CKPT")
        if config.p > 0:
            if ig_maps is None:
                raise IgkdError(f"method {config.method!r} overlays IG maps (p={config.p}): pass --attributions DIR (built by 'igkd attributions compute')")
            expected = (len(self.dataset.train), *self.dataset.image_size)
            if tuple(ig_maps.shape) != expected:
                raise IgkdError(f"IG maps have shape {tuple(ig_maps.shape)} but the training split needs {expected} (one map per training image, in dataset order)")

    def _prepare_folder(self) -> None:
        if not self.dist.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        config_path = self.out / CONFIG
        if (self.out / CHECKPOINT).exists() and not self.resume:
            raise IgkdError(f"{self.out} already holds a run: continue it with --resume, or choose another --out")
        if self.resume and config_path.exists():
            saved = json.loads(config_path.read_text())
            current = json.loads(json.dumps(self.config.to_dict()))
            changed = sorted(k for k in current if saved.get(k) != current[k] and k not in ("device", "compile"))
            if changed:
                raise IgkdError(
                    f"cannot resume {self.out}: its saved config differs in {', '.join(changed)} "
                    f"(e.g. {changed[0]}={saved.get(changed[0])!r} there vs {current[changed[0]]!r} now); use the same options or another --out"
                )
        atomic_write_json(config_path, self.config.to_dict())
        remove_stale_temporaries(self.out, RUN_FILES)  # left by a write killed half-way
        if not (self.out / CHECKPOINT).exists():
            _truncate_metrics(self.out / METRICS, 0)  # killed before its first checkpoint: its epochs start over

    def _load_checkpoint(self) -> None:
        path = self.out / CHECKPOINT
        if not (self.resume and path.exists()):
            return
        # On the CPU: RNG states must be CPU ByteTensors (torch.set_rng_state, Generator.set_state);
        # load_state_dict then copies weights and optimizer state onto the model's device.
        state = load_torch(path, map_location="cpu", what="training checkpoint")
        self._check_environment(state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], self.generator)
        self.start_epoch = int(state["epoch"]) + 1
        self.teacher_test = state.get("teacher_test")
        self.wall_before = float(state.get("wall_time_s", 0.0))
        if self.dist.is_main:
            _truncate_metrics(self.out / METRICS, int(state["epoch"]))

    def _save_checkpoint(self, epoch: int, wall: float) -> None:
        if not self.dist.is_main:
            return
        from igkd.models import spec_of

        atomic_torch_save(
            self.out / CHECKPOINT,
            {
                "model": self.model.state_dict(),
                "spec": spec_of(self.model),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": _rng_state(self.generator),
                "epoch": epoch,
                "teacher_test": self.teacher_test,
                "wall_time_s": wall,
                **run_environment(self.device),
            },
        )

    def _check_environment(self, state: dict) -> None:
        """Warn (one line) when the run resumes with other CPU threads or another device type than it was saved with."""
        saved = {key: state.get(key) for key in ("threads", "device_type")}
        now = run_environment(self.device)
        changed = [f"{key} {saved[key]} -> {now[key]}" for key in now if saved[key] is not None and saved[key] != now[key]]
        if changed and self.dist.is_main:
            print(
                f"warning: resuming {self.out} with {', '.join(changed)}: the result will not be bit-identical to an uninterrupted run "
                "(set the same threads, e.g. OMP_NUM_THREADS, and device to reproduce it)",
                file=sys.stderr,
            )

    # -- training -----------------------------------------------------------------------------
    def _step(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        images = batch.images
        if config.p > 0:
            images = ig_overlay(images, batch.extras["ig"], config.p, self.generator, config.ig_scale_low, config.ig_scale_high)
        images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, config.amp):
            logits = self.train_model(images)
            teacher_logits = None
            if self.teacher is not None:
                with torch.inference_mode():
                    teacher_logits = self.teacher(images)  # the same augmented view the student saw
                teacher_logits = teacher_logits.clone()  # an ordinary tensor: the loss may keep it for backward
        loss = kd_loss(logits, teacher_logits if config.alpha > 0 else None, batch.labels, config.alpha, config.temperature, config.label_smoothing)
        if self.taps is not None:
            student_tap, teacher_tap = self.taps
            loss = loss + attention_transfer_loss(student_tap.take(), teacher_tap.take().clone(), config.gamma)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach(), (logits.argmax(1) == batch.labels).sum()

    def _recalibrate(self) -> None:
        """Fresh BatchNorm statistics for the current weights (see :func:`recalibrate_batchnorm`)."""
        n = min(self.config.bn_recalibration_images, len(self.train_idx))
        if n == 0:
            return
        if self._calibration is None:  # gathered once: evenly spread over the (sorted, stratified) training indices
            pick = self.train_idx[torch.linspace(0, len(self.train_idx) - 1, n).round().long()]
            self._calibration = self.dataset.train.images[pick]
        recalibrate_batchnorm(self.model, self._calibration, self.config.eval_batch_size, self.device, self.config.amp)

    def _evaluate(self, split: str) -> dict | None:
        if split == "val":
            if len(self.val_idx) == 0:
                return None
            if self._val is None:  # gathered once, not every epoch
                self._val = (self.dataset.train.images[self.val_idx], self.dataset.train.labels[self.val_idx])
            images, labels = self._val
        else:
            images, labels = self.dataset.test.images, self.dataset.test.labels
        return evaluate(self.model, images, labels, self.dataset.classes, self.config.eval_batch_size, self.device)

    def run(self) -> dict:
        config = self.config
        summary_path = self.out / SUMMARY
        if self.resume:
            finished = read_summary(summary_path)
            if finished is not None:
                return finished
        self._load_checkpoint()
        if self.reference_teacher is not None and self.teacher_test is None:
            self.teacher_test = self.dataset_accuracy(self.reference_teacher)
            if self.show_progress and self.dist.is_main:
                print(f"teacher test accuracy: {self.teacher_test:.2f}%", file=sys.stderr)
        started = time.perf_counter()
        epoch_time = 0.0
        for epoch in range(self.start_epoch, config.epochs + 1):
            self.loader.set_epoch(epoch)
            self.model.train()
            tick = time.perf_counter()
            loss_sum = torch.zeros((), device=self.device)
            correct = torch.zeros((), device=self.device, dtype=torch.long)
            seen = 0
            with progress_bar(len(self.loader), f"epoch {epoch}/{config.epochs}", enabled=self.show_progress and self.dist.is_main) as bar:
                for step, batch in enumerate(self.loader):
                    loss, hits = self._step(batch)
                    loss_sum += loss * len(batch.labels)
                    correct += hits
                    seen += len(batch.labels)
                    if step % 50 == 49 and not torch.isfinite(loss_sum):
                        self._non_finite(epoch, step)
                    bar.advance(1, items=len(batch.labels))
            if not torch.isfinite(loss_sum):
                self._non_finite(epoch, len(self.loader) - 1)
            loss_total, correct_total, seen_total = self.dist.sum([loss_sum.item(), correct.item(), seen], self.device)
            epoch_time = time.perf_counter() - tick
            self._recalibrate()
            val = self._evaluate("val")
            record = {
                "epoch": epoch,
                "train_loss": loss_total / max(seen_total, 1),
                "train_accuracy": 100.0 * correct_total / max(seen_total, 1),
                "val_accuracy": val["accuracy"] if val else None,
                "lr": self.optimizer.param_groups[0]["lr"],
                "epoch_time_s": round(epoch_time, 3),
                "images_per_s": round(seen_total / epoch_time, 1),
            }
            wall = self.wall_before + time.perf_counter() - started
            if self.dist.is_main:
                append_jsonl(self.out / METRICS, record)
                if self.show_progress:
                    val_text = "-" if record["val_accuracy"] is None else f"{record['val_accuracy']:.2f}%"
                    print(f"epoch {epoch}/{config.epochs}: loss {record['train_loss']:.4f}, train {record['train_accuracy']:.2f}%, "
                          f"val {val_text}, {record['images_per_s']:,.0f} img/s", file=sys.stderr)
            self._save_checkpoint(epoch, wall)
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch, record)
        return self._finish(self.wall_before + time.perf_counter() - started)

    def dataset_accuracy(self, model: nn.Module) -> float:
        return evaluate(model, self.dataset.test.images, self.dataset.test.labels, self.dataset.classes, self.config.eval_batch_size, self.device)["accuracy"]

    def _non_finite(self, epoch: int, step: int) -> None:
        kept = f"the last good checkpoint (epoch {epoch - 1}) is kept in {self.out / CHECKPOINT}" if epoch > 1 else "no checkpoint was written"
        raise IgkdError(f"the training loss became NaN/inf in epoch {epoch} (by step {step + 1}); {kept}. Lower --lr or check the inputs")

    def _finish(self, wall: float) -> dict:
        val = self._evaluate("val")
        test = self._evaluate("test")
        summary = {
            "kind": "teacher" if self.config.student == "teacher" else "student",
            "method": self.config.method,
            "recipe": self.config.recipe,
            "student": self.config.student,
            "params": count_parameters(self.model),
            "seed": self.config.seed,
            "subset": self.config.subset,
            "subset_seed": self.config.seed if self.config.subset_seed is None else self.config.subset_seed,
            "train_size": len(self.train_idx),
            "val_size": len(self.val_idx),
            "split": self.split_rule,
            "val_accuracy": val["accuracy"] if val else None,
            "test_accuracy": test["accuracy"],
            "test_per_class": test["per_class"],
            "teacher_test_accuracy": self.teacher_test,
            "epochs": self.config.epochs,
            "wall_time_s": round(wall, 2),
            "dataset": {"name": self.dataset.name, "fingerprint": self.dataset.fingerprint, "source": self.dataset.source},
            "teacher": self.teacher_info or None,
            "attributions": self.attribution_info or None,
            "attention_layers": getattr(self, "at_layers", None),
            "world_size": self.dist.world_size,
            "config": self.config.to_dict(),
            "environment": environment(self.device),
        }
        if self.dist.is_main:
            save_model(self.out / MODEL, self.model, {"summary": {k: summary[k] for k in ("method", "seed", "test_accuracy", "val_accuracy")}})
            atomic_write_json(self.out / SUMMARY, summary)
        self.dist.barrier()
        if self.taps is not None:
            for tap in self.taps:
                tap.remove()
        return summary


def train(config: TrainConfig, dataset: Dataset, out_dir: str | Path, **kwargs) -> dict:
    """Train one run to completion (resuming when ``resume=True``) and return its summary."""
    return Trainer(config, dataset, out_dir, **kwargs).run()
