"""What data each run of a cohort trains on: its training/validation split, its batch stream (seed and subset),
its view (the stream with or without its own overlay draw) and IG map source, and the views the frozen teacher
must see in a step; a single run is the cohort of one.

Tensors of a step are member-major (``[G, B, ...]``). Members with the same seed and subset share a stream's
batches; members that also draw the same overlay share a view, and the teacher runs once per distinct view it
is needed on (or on every teacher-using member's own batch when CutMix/Mixup makes each batch its own).
"""

from __future__ import annotations

from pathlib import Path

import torch

from igkd.data.splits import stratified_subset, train_val_split
from igkd.distill.config import TrainConfig
from igkd.distill.controls import overlay_maps_for
from igkd.distill.overlay import apply_overlay, overlay_draws

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


class Member:
    """What one run of a cohort keeps for itself: its config, folder, split, generator and progress."""

    def __init__(self, config: TrainConfig, out: Path, labels: torch.Tensor, device: torch.device, rank: int):
        self.config, self.out = config, out
        self.train_idx, self.val_idx, self.split_rule = split_plan(config, labels)
        self.generator = torch.Generator(device=device).manual_seed(config.seed * 7919 + rank)  # its overlay draws
        self.start_epoch, self.wall_before = 1, 0.0


def _distinct(keys: list) -> tuple[list[int], list[int]]:
    """(index of each item's class, first item of each class) for hashable keys."""
    first: dict = {}
    of = [first.setdefault(key, len(first)) for key in keys]
    firsts = [keys.index(key) for key in first]
    return of, firsts

class DataPlan:
    """The streams, views and map sources of a cohort's members, and the index tensors that route a step's
    batch through them: :meth:`views` (each view of a batch, overlays drawn), :meth:`for_members` (each
    member's images and labels), :meth:`for_teacher` (what the teacher sees) and :meth:`per_member` (the
    teacher's outputs back to the members)."""

    def __init__(self, members: list[Member], ig_maps: torch.Tensor | None, device: torch.device):
        self.members, self.G, self.device = members, len(members), device
        self.loader_extras = self._overlay_sources(ig_maps)
        self._plan_views()
        self._draws: tuple[torch.Tensor, torch.Tensor] | None = None

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

    def draw_overlays(self, n: int) -> None:
        """This epoch's overlay draws (apply?, exponent) for each of its ``n`` samples of every overlay view: ``[V_o, n]``."""
        self._draws = None
        if self.overlay_views:
            drawn = [
                overlay_draws(n, c.p, c.ig_scale_low, c.ig_scale_high, self.members[g].generator, self.device)
                for g, c in ((g, self.members[g].config) for g in self.overlay_first)
            ]
            self._draws = (torch.stack([a for a, _ in drawn]), torch.stack([s for _, s in drawn]))

    def views(self, batch, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
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

    def for_members(self, views: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's images ``[G, B, 3, H, W]`` (its view) and labels ``[G, B]`` (its stream's)."""
        x = views if self._members_are_views else views.index_select(0, self._idx["member_view"])
        y = labels if self._members_are_streams else labels.index_select(0, self._idx["member_stream"])
        return x, y

    def for_teacher(self, views: torch.Tensor, mixed: torch.Tensor | None = None) -> torch.Tensor:
        """The images the teacher sees: the views some member that uses the teacher trains on, or, with
        CutMix/Mixup, the mixed batches ``mixed`` of those members."""
        if self.mixing:
            return mixed if len(self.teacher_members) == self.G else mixed.index_select(0, self._idx["teacher_members"])
        return views.index_select(0, self._idx["teacher_views"]) if len(self.teacher_views) < len(views) else views

    def per_member(self, teacher_out: torch.Tensor, B: int) -> torch.Tensor:
        """Teacher outputs on the teacher views ``[V_t * B, ...]`` -> each member's ``[G, B, ...]``."""
        out = teacher_out.unflatten(0, (-1, B))
        return out if self._teacher_rows_identity else out.index_select(0, self._idx["teacher_rows"])
