"""The one training loop: an epoch is a pass of batches, a step is one batch through the overlay, the students
and the frozen teacher into the loss terms, for one run or a cohort of runs (teacher training, every method).

Per step (:meth:`Trainer.step`): a batch of the device-resident training split arrives cropped and flipped
(its IG maps the same way); the data plan lays the IG overlay (probability p) and gives each member its view;
the students and, when a loss term needs it, the frozen teacher run on that *same* view; the loss is each
member's KD (or plain CE) plus attention transfer. Each epoch (:meth:`Trainer.run`) ends with validation on a
held-out part of the training split, a metrics line and an atomic checkpoint that ``resume=True`` continues
from exactly.

A cohort (G runs that share the architecture, optimiser, schedule, batch size and epochs but differ in method,
loss constants, seed and subset; docs/training.md) trains as one fused network (:mod:`igkd.models.fused`);
a single run is G = 1 and runs the plain model. The pieces live beside this file: which member sees which
data (:mod:`igkd.distill.data_plan`), the loss terms (:mod:`igkd.distill.objective`), the optimiser and
schedule (:mod:`igkd.distill.schedule`), evaluation (:mod:`igkd.distill.evaluation`), each run's folder
(:mod:`igkd.distill.run_folder`) and what a cohort shares (:mod:`igkd.distill.cohort`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from igkd.atomic import append_jsonl, atomic_write_json
from igkd.data.dataset import Dataset
from igkd.data.loader import DeviceLoader
from igkd.devices import autocast, frozen_copy, prepare_model, resolve_device, training_layout
from igkd.distill import run_folder
from igkd.distill.cohort import check_cohort
from igkd.distill.config import TrainConfig
from igkd.distill.controls import apply_mix, mix_draws
from igkd.distill.data_plan import DataPlan, Member, channel_stats
from igkd.distill.distributed import DistContext
from igkd.distill.evaluation import Evaluation
from igkd.distill.losses import FeatureTap, attention_layers
from igkd.distill.losses.attention import check_attention_pair
from igkd.distill.objective import Objective
from igkd.distill.run_folder import CHECKPOINT, METRICS, MODEL, SUMMARY
from igkd.distill.schedule import build_optimizer, build_schedule
from igkd.errors import IgkdError
from igkd.evaluate.accuracy import evaluate
from igkd.models import MobileNetV2CIFAR, Normalize, build_model, count_parameters, save_model, spec_of
from igkd.models.external import build_external, parse_normalize
from igkd.models.fused import fuse, join_optimizer_state, load_member, member, member_state, split_optimizer_state
from igkd.progress import progress_bar
from igkd.provenance import environment

#: The teacher's test accuracy by (weights' sha256, dataset fingerprint, batch size, device): a study's runs share one teacher.
_TEACHER_TEST: dict[tuple, float] = {}


class Trainer:
    """Holds the pieces of one run, or of a cohort of runs; ``run()`` trains them to the end (or from their checkpoints).

    ``config``/``out_dir``: one config and folder (a single run; ``run()`` returns its summary), or lists
    of G of each (a cohort; ``run()`` returns the G summaries). Cohort members must agree in
    :data:`igkd.distill.cohort.COHORT_SHARED`; each is trained as its own single run would be in exact
    arithmetic (the fused network sums in another order; docs/training.md, "Cohorts", says what that means
    in float32). The pieces: the data plan (:mod:`igkd.distill.data_plan`), the loss terms
    (:mod:`igkd.distill.objective`), the optimiser and schedule (:mod:`igkd.distill.schedule`), evaluation
    (:mod:`igkd.distill.evaluation`) and each run's folder (:mod:`igkd.distill.run_folder`).
    """

    def __init__(
        self,
        config: TrainConfig | list[TrainConfig],
        dataset: Dataset,
        out_dir: str | Path | list,
        *,
        teacher: nn.Module | None = None,
        student: Callable[[], nn.Module] | None = None,
        teacher_info: dict | None = None,
        ig_maps: torch.Tensor | None = None,
        attribution_info: dict | None = None,
        resume: bool = False,
        progress: bool = True,
        on_epoch_end: Callable[[int, dict], None] | None = None,
        pointwise: str = "grouped",
    ):
        self.single = isinstance(config, TrainConfig)
        configs = external_configs([config] if self.single else list(config), student)
        outs = [Path(out_dir)] if isinstance(out_dir, (str, Path)) else [Path(o) for o in out_dir]
        check_cohort(configs, outs)
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
        if self.dist.is_main:
            for c, out in zip(configs, outs):
                run_folder.prepare_folder(c, out, resume)

        labels = dataset.train.labels
        self.members = [Member(c, out, labels, self.device, self.dist.rank) for c, out in zip(configs, outs)]
        if len({len(m.train_idx) for m in self.members}) > 1 or len({len(m.val_idx) for m in self.members}) > 1:
            raise IgkdError("cohort members must train and validate on splits of equal size: train them in separate cohorts")
        self.train_idx, self.val_idx, self.split_rule = self.members[0].train_idx, self.members[0].val_idx, self.members[0].split_rule
        self.generator = self.members[0].generator
        self.plan = DataPlan(self.members, ig_maps, self.device)
        self.loader = DeviceLoader(
            dataset.train.images.to(self.device),
            labels,
            max(1, self.config.batch_size // self.dist.world_size),
            indices=[self.members[g].train_idx for g in self.plan.stream_first],
            shuffle=True,
            augment=self.config.augment,
            pad=self.config.pad,
            seed=[configs[g].seed for g in self.plan.stream_first],
            extras=self.plan.loader_extras,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            drop_last=self.config.compile,  # a compiled step sees one batch shape, not a new one each epoch end
        )

        models = self._student_models(teacher, student)
        self.layout = training_layout(models, self.device)
        self.model = prepare_model(models[0] if self.G == 1 else fuse(models, pointwise), self.device, self.layout)
        self.objective = Objective.from_configs(configs, self.device)
        self.teacher = None
        self.reference_teacher = prepare_model(teacher, self.device).eval() if teacher is not None else None
        if teacher is not None and any(c.uses_teacher for c in configs):
            self.teacher = frozen_copy(teacher, self.device, bf16=self.config.amp and (self.device.type == "cuda" or self.config.cpu_bf16 != "off"))
        self.taps = None
        if any(c.gamma > 0 for c in configs):
            c = self.config
            self.at_layers = attention_layers(self.teacher, models[0], c.at_divider, c.at_teacher_layer, c.at_student_layer)
            if not all(isinstance(m, MobileNetV2CIFAR) for m in (teacher, models[0])):  # names of any network: checked on one dummy forward
                self.at_layers.update(check_attention_pair(teacher, models[0], self.at_layers, tuple(dataset.train.images.shape[1:])))
            student_tap = FeatureTap(self.model, self.at_layers["student"]) if self.G == 1 else self.model.tap(self.at_layers["student"])
            self.taps = (student_tap, FeatureTap(self.teacher, self.at_layers["teacher"]))
        self.train_model: nn.Module = self.model
        if self.dist.enabled:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.dist.local_rank] if self.device.type == "cuda" else None
            )
        if self.config.compile:
            self.train_model = torch.compile(self.train_model)
        self.optimizer = build_optimizer(self.config, self.model)
        self.scheduler = build_schedule(self.config, self.optimizer, len(self.loader))
        self.evaluation = Evaluation(self.model, self._forward, dataset, self.members, self.config, self.device)
        self.start_epoch, self.teacher_test = 1, None
        self._epoch, self._mix = 1, None  # the epoch being trained (DKD's warm-up) and its mixing draws
        self.wall_before = 0.0

    def _student_models(self, teacher: nn.Module | None, factory: Callable[[], nn.Module] | None) -> list[nn.Module]:
        """Each member's student with its initial weights drawn from its own seed, as its single run draws them,
        normalising its input as the teacher does (or by its training images' channel statistics). An external
        architecture (``student_arch``, or ``factory``) is built by its factory right after the same seeding."""
        models = []
        for m in self.members:
            torch.manual_seed(m.config.seed + 1_000 * self.dist.rank)
            normalize = getattr(teacher, "normalize", None)
            if isinstance(normalize, Normalize):
                mean, std = normalize.mean.flatten().tolist(), normalize.std.flatten().tolist()
            else:
                mean, std = channel_stats(self.dataset.train.images[m.train_idx])
            if m.config.student == "external" or m.config.student_arch is not None or factory is not None:
                models.append(external_student(m.config, factory, self.dataset, mean, std))
            else:
                models.append(build_model(self.config.student, num_classes=self.dataset.num_classes, width=self.config.width, mean=mean, std=std))
        return models

    def _check_inputs(self, config: TrainConfig, teacher, ig_maps) -> None:
        if config.uses_teacher and teacher is None:
            raise IgkdError(f"method {config.method!r} (alpha={config.alpha}, gamma={config.gamma}) needs a teacher: pass --teacher CKPT")
        if config.p > 0:
            if ig_maps is None:
                raise IgkdError(f"method {config.method!r} overlays IG maps (p={config.p}): pass --attributions DIR (built by 'igkd attributions compute')")
            expected = (len(self.dataset.train), *self.dataset.image_size)
            if tuple(ig_maps.shape) != expected:
                raise IgkdError(f"IG maps have shape {tuple(ig_maps.shape)} but the training split needs {expected} (one map per training image, in dataset order)")

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict | list[dict]:
        """Train every member from its checkpoint (or epoch 1) to the last epoch; its summary (a cohort: the summaries)."""
        finished = self._finished_earlier()
        if finished is not None:
            return finished
        self._load_checkpoint()
        self._measure_teacher()
        started = time.perf_counter()
        for epoch in range(self.start_epoch, self.config.epochs + 1):
            self.begin_epoch(epoch)
            tick = time.perf_counter()
            totals, seen = self._train_epoch(epoch)
            epoch_time = time.perf_counter() - tick
            if len(self.val_idx):  # without a validation part, the statistics are recomputed once, for the test
                self.evaluation.recalibrate()
            records = self._log_epoch(epoch, totals, seen, epoch_time, self.evaluation.evaluate("val"))
            self._save_checkpoint(epoch, self.wall_before + time.perf_counter() - started)
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch, records[0])
        summaries = self._finish(self.wall_before + time.perf_counter() - started)
        return summaries[0] if self.single else summaries

    def begin_epoch(self, epoch: int) -> None:
        """Set up ``epoch``'s random draws: the loader's order and crops, the overlay draws, the CutMix/Mixup draws."""
        self.loader.set_epoch(epoch)
        self.plan.draw_overlays(self.loader.epoch_length())
        self._epoch = epoch
        if self.plan.mixing:  # this epoch's CutMix/Mixup draws of every member, on the device once
            self._mix = mix_draws(self.configs, epoch, len(self.loader), self.loader.batch_size).to(self.device)

    def _train_epoch(self, epoch: int) -> tuple[list[tuple[float, float]], int]:
        """One pass over the loader; each member's (summed loss, correct predictions) and the images each saw."""
        self.model.train()
        loss_sum = torch.zeros(self.G, device=self.device)
        correct = torch.zeros(self.G, device=self.device, dtype=torch.long)
        seen = 0
        what = "" if self.G == 1 else f" ({self.G} runs)"
        with progress_bar(len(self.loader), f"epoch {epoch}/{self.config.epochs}{what}", enabled=self.show_progress and self.dist.is_main) as bar:
            for step, batch in enumerate(self.loader):
                loss, hits = self.step(batch, seen)
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
            return [(loss_total, correct_total)], seen_total
        return list(zip(loss_sum.tolist(), correct.tolist())), seen

    def step(self, batch, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step of every member on one batch; returns (loss ``[G]``, correct predictions ``[G]``),
        still on the device. ``offset``: the batch's first sample in the epoch (its overlay and mixing draws)."""
        views, labels = self.plan.views(batch, offset)  # crop/flip came with the batch; the overlays are laid here
        x, y = self.plan.for_members(views, labels)
        mixed = {}
        if self.plan.mixing:
            x, (y, labels_b, lam) = apply_mix(x, y, self._mix, offset // self.loader.batch_size)
            mixed = {"labels_b": labels_b, "lam": lam}
        seen = self.plan.for_teacher(views, x) if self.teacher is not None else None  # the very views (or mixed batches) the students see
        with autocast(self.device, self.config.amp, cpu=self.config.cpu_bf16 == "all"):
            logits = self._forward(x)
            teacher_logits = None
            if self.teacher is not None:
                with torch.inference_mode(), autocast(self.device, self.config.amp, cpu=self.config.cpu_bf16 != "off"):
                    out = self.teacher(seen.flatten(0, 1).contiguous(memory_format=torch.channels_last))
                teacher_logits = self.plan.per_member(out.clone(), seen.shape[1])  # an ordinary tensor: the loss may keep it for backward
        losses = self.objective.logit_losses(logits, teacher_logits, y, epoch=self._epoch, **mixed)
        if self.taps is not None:
            teacher_features = self.plan.per_member(self.taps[1].take().clone(), x.shape[1])
            losses = losses + self.objective.attention_losses(self._student_features(), teacher_features)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # each member's parameters get the gradient of its own loss only
        self.optimizer.step()
        self.scheduler.step()
        return losses.detach(), (logits.argmax(-1) == y).sum(1)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Member-major images ``[G, B, 3, H, W]`` -> logits ``[G, B, K]``."""
        if self.G == 1:
            return self.train_model(x[0].contiguous(memory_format=self.layout)).unsqueeze(0)
        return self.train_model(x)

    def _student_features(self) -> torch.Tensor:
        features = self.taps[0].take()
        return features.unsqueeze(0) if self.G == 1 else features

    def _log_epoch(self, epoch: int, totals: list[tuple[float, float]], seen: int, epoch_time: float, vals: list) -> list[dict]:
        """Each member's metrics line of ``epoch`` (appended to its metrics.jsonl, printed with progress)."""
        records = []
        for m, (loss_total, correct_total), val in zip(self.members, totals, vals):
            record = {
                "epoch": epoch,
                "train_loss": loss_total / max(seen, 1),
                "train_accuracy": 100.0 * correct_total / max(seen, 1),
                "val_accuracy": val["accuracy"] if val else None,
                "lr": self.optimizer.param_groups[0]["lr"],
                "epoch_time_s": round(epoch_time, 3),
                "images_per_s": round(seen / epoch_time, 1),
                **({} if self.G == 1 else {"cohort_size": self.G}),
            }
            records.append(record)
            if self.dist.is_main:
                append_jsonl(m.out / METRICS, record)
                if self.show_progress:
                    val_text = "-" if record["val_accuracy"] is None else f"{record['val_accuracy']:.2f}%"
                    who = "" if self.G == 1 else f"{m.out.name}: "
                    print(f"{who}epoch {epoch}/{self.config.epochs}: loss {record['train_loss']:.4f}, train {record['train_accuracy']:.2f}%, "
                          f"val {val_text}, {record['images_per_s']:,.0f} img/s", file=sys.stderr)
        return records

    # -- start, resume, checkpoint ----------------------------------------------------------------
    def _finished_earlier(self) -> dict | list[dict] | None:
        """On resume, the summaries when every member finished already (None otherwise; some finished: refused)."""
        if not self.resume:
            return None
        finished = [run_folder.read_summary(m.out / SUMMARY) for m in self.members]
        if all(f is not None for f in finished):
            return finished[0] if self.single else finished
        if any(f is not None for f in finished):
            done = [str(m.out) for m, f in zip(self.members, finished) if f is not None]
            raise IgkdError(f"{', '.join(done)} finished already: leave finished runs out of a cohort")
        return None

    def _measure_teacher(self) -> None:
        """The teacher's test accuracy, once per teacher and dataset in a process (a study's runs share it)."""
        if self.reference_teacher is None or self.teacher_test is not None:
            return
        key = (self.teacher_info.get("sha256"), self.dataset.fingerprint, self.config.eval_batch_size, str(self.device))
        if key[0] is None or key not in _TEACHER_TEST:
            _TEACHER_TEST[key] = self.dataset_accuracy(self.reference_teacher)
        self.teacher_test = _TEACHER_TEST[key]
        if self.show_progress and self.dist.is_main:
            print(f"teacher test accuracy: {self.teacher_test:.2f}%", file=sys.stderr)

    def _load_checkpoint(self) -> None:
        """Continue from the members' checkpoints (when resuming and there are some): weights, optimizer,
        schedule, random states, the epoch to start at, and the metrics of the epochs after it dropped."""
        states = run_folder.read_checkpoints([m.out for m in self.members]) if self.resume else None
        if states is None:
            return
        if self.dist.is_main:
            for m, state in zip(self.members, states):
                run_folder.check_environment(state, m.out, self.device)
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
        run_folder.set_rng_state(states[0]["rng"])
        self.start_epoch = int(states[0]["epoch"]) + 1
        self.teacher_test = states[0].get("teacher_test")
        self.wall_before = float(states[0].get("wall_time_s", 0.0))
        if self.dist.is_main:
            for m in self.members:
                run_folder.truncate_metrics(m.out / METRICS, self.start_epoch - 1)

    def _save_checkpoint(self, epoch: int, wall: float) -> None:
        """Every member's checkpoint after ``epoch`` (its own weights, optimizer state and overlay generator)."""
        if not self.dist.is_main:
            return
        common = {"scheduler": self.scheduler.state_dict(), "epoch": epoch, "teacher_test": self.teacher_test, "wall_time_s": wall,
                  **run_folder.run_environment(self.device)}
        if self.G == 1:
            per_member = [(self.model.state_dict(), spec_of(self.model), self.optimizer.state_dict())]
        else:
            optimizers = split_optimizer_state(self.model, self.optimizer)
            per_member = [(member_state(self.model, g), self.model.specs[g], optimizers[g]) for g in range(self.G)]
        plan = self.plan
        drawn_by = {g: plan.overlay_first[plan.overlay_views.index(v)] for g, v in enumerate(plan.member_view) if v in plan.overlay_views}
        states = []
        for g, (model_state, spec, optimizer_state) in enumerate(per_member):
            generator = self.members[drawn_by.get(g, g)].generator  # members sharing a view share its draws
            states.append({"model": model_state, "spec": spec, "optimizer": optimizer_state, "rng": run_folder.rng_state(generator), **common})
        run_folder.write_checkpoints([m.out for m in self.members], states)

    # -- the end ----------------------------------------------------------------------------------
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
            self.evaluation.recalibrate()  # no epoch recomputed them (a checkpoint written after one holds them)
        vals, tests = self.evaluation.evaluate("val"), self.evaluation.evaluate("test")
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


def external_configs(configs: list[TrainConfig], factory: Callable[[], nn.Module] | None) -> list[TrainConfig]:
    """With a Python ``factory`` for the student, its runs' ``student`` is ``external`` (a teacher being trained
    stays ``teacher``); without one, ``external`` needs ``student_arch``."""
    import dataclasses

    if factory is not None:
        return [c if c.student in ("teacher", "external") else dataclasses.replace(c, student="external") for c in configs]
    for c in configs:
        if c.student == "external" and c.student_arch is None:
            raise IgkdError("student 'external' needs its architecture: pass --student-arch package.module:factory (Python: student=<a factory>)")
    return configs


def external_student(config: TrainConfig, factory: Callable[[], nn.Module] | None, dataset: Dataset, mean, std) -> nn.Module:
    """An external student (or teacher being trained): the factory's network behind the normalisation that
    ``student_normalize`` states (``dataset``: ``mean``/``std``, the teacher's or the training images'), its
    spec attached; one forward of a zero image checks it gives ``[1, K]`` logits."""
    normalize = parse_normalize(config.student_normalize, "student_normalize")
    if normalize == "dataset":
        normalize = {"mean": list(mean), "std": list(std)}
    where = "the student factory" if factory is not None else "--student-arch"
    return build_external(factory if factory is not None else config.student_arch, config.student_arch_args, dataset.num_classes,
                          normalize=normalize, input_shape=tuple(dataset.train.images.shape[1:]), where=where)


def train(config: TrainConfig, dataset: Dataset, out_dir: str | Path, **kwargs) -> dict:
    """Train one run to completion (resuming when ``resume=True``) and return its summary."""
    return Trainer(config, dataset, out_dir, **kwargs).run()


def train_cohort(configs: list[TrainConfig], dataset: Dataset, out_dirs: list, **kwargs) -> list[dict]:
    """Train G runs as one cohort (resuming when ``resume=True``) and return their summaries, in order."""
    return Trainer(list(configs), dataset, list(out_dirs), **kwargs).run()
