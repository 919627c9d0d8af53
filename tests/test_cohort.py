"""The cohort contract: G runs trained as one fused network give each run what its single run gives.

Each member of a cohort keeps its own seed (initial weights, data order, crops, flips, overlay
draws), method and loss constants. In exact arithmetic a member's training is its single run's; the
fused network only sums in another order. So the comparisons train in float64 (the ``float64``
fixture): a member's weights, metrics and accuracies then equal its single run's to 1e-7 relative
(observed: ~1e-14 under SGD, ~1e-11 under Adam after 3 epochs), on any CPU and at any thread count.
In float32 the same rounding differences are amplified by training (Adam most: a parameter whose
exact gradient is 0 gets rounding-level gradients of the size of its eps, and so whole steps), so
two float32 trainings are compared here only with themselves (bit-identical resume).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from igkd.distill import resolve_config, train, train_cohort
from igkd.errors import IgkdError
from igkd.models import build_model, load_model

from conftest import default_dtype

#: A cohort member against its single run, both in float64 (the contract, docs/training.md "Cohorts").
TOL = dict(rtol=1e-7, atol=1e-9)


#: Small networks: float64 convolutions on the CPU run group by group (no vectorised kernel), so the
#: cohort's grouped convolutions are slow; a k13 student (expansions, residuals) and a k9 teacher suffice,
#: and the tests of many members (views, loss terms, a study) and of resume take the smallest student, k17.
STUDENT, TEACHER, SMALLEST = dict(student="k13", width=0.25), dict(name="k9", width=0.25), dict(student="k17", width=0.5)


def _config(method, seed, recipe="improved", **overrides):
    values = dict(**STUDENT, epochs=3, batch_size=16, val_fraction=0.25, device="cpu", lr=0.01)
    if recipe == "paper":
        values.pop("lr")  # the paper's Adam at 1e-3
    values.update(overrides)
    return resolve_config(method, recipe, seed=seed, **values)


def _teacher():
    torch.manual_seed(0)
    return build_model(TEACHER["name"], width=TEACHER["width"], num_classes=4).eval()


def _maps(dataset):
    return torch.rand(len(dataset.train), *dataset.image_size, generator=torch.Generator().manual_seed(0)).half()


def _inputs(dataset):
    return {"teacher": _teacher(), "ig_maps": _maps(dataset), "progress": False}


def _metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _weights(folder):
    return load_model(folder / "model.safetensors")[0].state_dict()


def assert_same_run(cohort_dir, single_dir):
    """Float64 weights within :data:`TOL`; losses to 1e-9; accuracies, per-class accuracies and configs equal."""
    a, b = _weights(cohort_dir), _weights(single_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and (a[key].dtype == torch.float64 or not key.endswith(("weight", "bias", "running_var"))), key
        assert torch.allclose(a[key], b[key], **TOL), (key, (a[key].double() - b[key].double()).abs().max())
    ma, mb = _metrics(cohort_dir), _metrics(single_dir)
    assert [m["epoch"] for m in ma] == [m["epoch"] for m in mb]
    for x, y in zip(ma, mb):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-9, abs=1e-12)
        assert (x["train_accuracy"], x["val_accuracy"]) == (y["train_accuracy"], y["val_accuracy"])
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (cohort_dir, single_dir))
    assert (sa["test_accuracy"], sa["val_accuracy"], sa["test_per_class"]) == (sb["test_accuracy"], sb["val_accuracy"], sb["test_per_class"])
    assert sa["config"] == sb["config"]


def test_cohort_of_three_methods_and_seeds_equals_single_runs(tiny_dataset, tmp_path, float64):
    """The contract of issue 12: student, kd_ig and kd_ig_at with different seeds, several epochs."""
    configs = [_config("student", 0), _config("kd_ig", 1, p=0.5), _config("kd_ig_at", 2, p=0.5)]
    names = ["student-s0", "kd_ig-s1", "kd_ig_at-s2"]
    summaries = train_cohort(configs, tiny_dataset, [tmp_path / "cohort" / n for n in names], **_inputs(tiny_dataset))
    assert [s["method"] for s in summaries] == ["student", "kd_ig", "kd_ig_at"] and all(s["cohort_size"] == 3 for s in summaries)
    for config, name in zip(configs, names):
        single = train(config, tiny_dataset, tmp_path / "single" / name, **_inputs(tiny_dataset))
        assert single["cohort_size"] == 1
        assert_same_run(tmp_path / "cohort" / name, tmp_path / "single" / name)


def test_members_sharing_a_seed_share_views_and_the_teacher_pass(tiny_dataset, tmp_path, float64):
    """Same seed: one data stream; same seed and overlay: one view, one teacher forward for it."""
    configs = [_config(m, seed, p=0.5 if "ig" in m else 0.0, **SMALLEST) for m, seed in [("student", 0), ("kd", 0), ("kd_ig", 0), ("kd_ig_at", 0), ("ig", 1)]]
    names = [f"{c.method}-s{c.seed}" for c in configs]
    teacher = _teacher()
    passes = []
    teacher_inputs = {"teacher": teacher, "ig_maps": _maps(tiny_dataset), "progress": False}
    from igkd.distill import Trainer

    trainer = Trainer(configs, tiny_dataset, [tmp_path / "cohort" / n for n in names], **teacher_inputs)
    assert trainer.plan.member_stream == [0, 0, 0, 0, 1] and trainer.plan.member_view == [0, 0, 1, 1, 2]
    assert trainer.plan.teacher_views == [0, 1]  # student and ig need no teacher; kd and kd_ig(_at) see views 0 and 1
    trainer.teacher.register_forward_pre_hook(lambda _m, args: passes.append(args[0].shape[0]))
    trainer.run()
    assert passes and all(n == 2 * 16 for n in passes[:-1])  # two views of a batch of 16 per step
    for config, name in zip(configs, names):
        train(config, tiny_dataset, tmp_path / "single" / name, **_inputs(tiny_dataset))
        assert_same_run(tmp_path / "cohort" / name, tmp_path / "single" / name)


def test_killed_cohort_resumes_exactly_and_members_resume_alone(tiny_dataset, tmp_path, float64):
    configs = [_config("student", 0, **SMALLEST), _config("kd_ig_at", 1, p=0.5, **SMALLEST)]
    names = ["a", "b"]

    def stop_after_first(epoch, _record):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_cohort(configs, tiny_dataset, [tmp_path / "killed" / n for n in names], on_epoch_end=stop_after_first, **_inputs(tiny_dataset))
    for name in names:  # every member's folder holds a single-run checkpoint of epoch 1
        assert torch.load(tmp_path / "killed" / name / "checkpoint.pt", weights_only=True)["epoch"] == 1
    train_cohort(configs, tiny_dataset, [tmp_path / "killed" / n for n in names], resume=True, **_inputs(tiny_dataset))
    train_cohort(configs, tiny_dataset, [tmp_path / "straight" / n for n in names], **_inputs(tiny_dataset))
    for name in names:
        a, b = _weights(tmp_path / "killed" / name), _weights(tmp_path / "straight" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)  # same cohort, same order of operations: bit for bit
        assert [m["epoch"] for m in _metrics(tmp_path / "killed" / name)] == [1, 2, 3]
    # A member's checkpoint is a single run's: it resumes alone and ends where its single run ends.
    with pytest.raises(KeyboardInterrupt):
        train_cohort(configs, tiny_dataset, [tmp_path / "split" / n for n in names], on_epoch_end=stop_after_first, **_inputs(tiny_dataset))
    train(configs[1], tiny_dataset, tmp_path / "split" / "b", resume=True, **_inputs(tiny_dataset))
    train(configs[1], tiny_dataset, tmp_path / "single-b", **_inputs(tiny_dataset))
    assert_same_run(tmp_path / "split" / "b", tmp_path / "single-b")


class _Killed(BaseException):
    """A stand-in for kill -9 in the middle of a save: nothing in igkd catches it."""


@pytest.mark.parametrize("phase", ["writes", "renames"])
def test_cohort_killed_between_two_members_checkpoint_writes_resumes_to_the_uninterrupted_result(tiny_dataset, tmp_path, monkeypatch, phase):
    """Issue 26 item 9: a cohort's checkpoint is one unit. Killed after the first member's part of the epoch-2
    save (its new checkpoint written beside the last one; or renamed into place, the others not yet), every
    member resumes at one epoch (1; or 2), the executor forms the cohort again, and the resumed cohort ends
    bit for bit where the uninterrupted one ends (same machine, same threads: float32 is fine)."""
    from igkd.distill import run_folder as loop
    from igkd.distill.executor import Run, checkpoint_epoch

    configs = [_config("student", 0), _config("kd_ig_at", 1, p=0.5), _config("kd", 2)]
    killed, straight = ([tmp_path / kind / name for name in ("a", "b", "c")] for kind in ("killed", "straight"))
    step = {"writes": "atomic_torch_save", "renames": "_commit_checkpoint"}[phase]  # phase 1 or phase 2 of a save
    real, calls = getattr(loop, step), []

    def kill_after_the_first_member_of_epoch_2(*args):
        calls.append(args)
        if len(calls) == len(configs) + 2:  # epoch 1's save had one call per member; epoch 2's first is done
            raise _Killed
        return real(*args)

    monkeypatch.setattr(loop, step, kill_after_the_first_member_of_epoch_2)
    with pytest.raises(_Killed):
        train_cohort(configs, tiny_dataset, killed, **_inputs(tiny_dataset))
    monkeypatch.undo()
    epochs = [torch.load(d / "checkpoint.pt", weights_only=True)["epoch"] for d in killed]
    pending = [(d / "checkpoint.next.pt").exists() for d in killed]
    assert (epochs, pending) == (([1, 1, 1], [True, False, False]) if phase == "writes" else ([2, 1, 1], [False, True, True]))
    resumed_at = 1 if phase == "writes" else 2
    assert [checkpoint_epoch(Run(c, d)) for c, d in zip(configs, killed)] == [resumed_at] * 3  # one cohort again
    if phase == "renames":  # a member's folder alone is a single run's; a copied study keeps its members together
        shutil.copytree(tmp_path / "killed", tmp_path / "copy")
        epochs_run = []
        train(configs[1], tiny_dataset, tmp_path / "copy" / "b", resume=True, on_epoch_end=lambda e, _r: epochs_run.append(e), **_inputs(tiny_dataset))
        assert epochs_run == [3] and not (tmp_path / "copy" / "b" / "checkpoint.next.pt").exists()
    resumed = []
    train_cohort(configs, tiny_dataset, killed, resume=True, on_epoch_end=lambda e, _r: resumed.append(e), **_inputs(tiny_dataset))
    assert resumed == list(range(resumed_at + 1, 4))
    train_cohort(configs, tiny_dataset, straight, **_inputs(tiny_dataset))
    for a_dir, b_dir in zip(killed, straight):
        a, b = _weights(a_dir), _weights(b_dir)
        assert all(torch.equal(a[k], b[k]) for k in a), a_dir.name
        ma, mb = _metrics(a_dir), _metrics(b_dir)
        assert [(m["epoch"], m["train_loss"], m["val_accuracy"]) for m in ma] == [(m["epoch"], m["train_loss"], m["val_accuracy"]) for m in mb]
        assert not (a_dir / "checkpoint.next.pt").exists()


def test_cohort_refuses_members_that_cannot_share_a_network(tiny_dataset, tmp_path):
    with pytest.raises(IgkdError, match="differ in lr"):
        train_cohort([_config("student", 0), _config("student", 1, lr=0.1)], tiny_dataset, [tmp_path / "a", tmp_path / "b"], progress=False)
    with pytest.raises(IgkdError, match="same folder"):
        train_cohort([_config("student", 0), _config("student", 1)], tiny_dataset, [tmp_path / "a", tmp_path / "a"], progress=False)
    with pytest.raises(IgkdError, match="different epochs"):
        configs = [_config("student", 0, epochs=2), _config("student", 1, epochs=2)]
        with pytest.raises(KeyboardInterrupt):
            train(configs[0], tiny_dataset, tmp_path / "c", progress=False, on_epoch_end=_interrupt)
        train_cohort(configs, tiny_dataset, [tmp_path / "c", tmp_path / "d"], resume=True, progress=False)


def _interrupt(epoch, _record):
    raise KeyboardInterrupt


def test_ablation_of_all_eight_methods_as_one_cohort_matches_run_by_run(tmp_path, float64):
    """Issue 12's acceptance on digits: ``igkd ablation`` with a cohort of the 8 methods gives each method
    the results of the run-by-run ablation of the same seed (a subset of digits, to keep CI short); with the
    paper's recipe (Adam), whose float32 cohorts differ from their single runs by more than rounding (issue 26)."""
    from igkd.attribution import compute_attributions
    from igkd.data import load_dataset
    from igkd.experiments.reproduce import first_per_class
    from igkd.experiments.studies import StudyOptions, run_ablation
    from igkd.models import save_model
    from igkd.provenance import sha256_file
    from igkd.report import markdown
    from igkd.report.tables import provenance

    data = first_per_class(load_dataset("digits"), 8, 4)
    with default_dtype(torch.float32):  # the teacher file and its IG maps as igkd makes them; the runs train in float64
        torch.manual_seed(0)
        teacher = build_model(TEACHER["name"], width=TEACHER["width"], num_classes=10).eval()
        save_model(tmp_path / "teacher.safetensors", teacher)
        compute_attributions(teacher, data, tmp_path / "ig", n_steps=4, device="cpu", teacher_sha256=sha256_file(tmp_path / "teacher.safetensors"), progress=False)
    results = {}
    for size in (8, 1):
        options = StudyOptions(
            teacher=tmp_path / "teacher.safetensors", attributions=tmp_path / "ig", recipe="paper", epochs=2, batch_size=32,
            val_fraction=0.25, device="cpu", progress=False, cohort_size=size, config_values={"width": SMALLEST["width"]},
        )
        study = run_ablation(data, tmp_path / f"cohort-{size}", methods="paper", seeds=1, student=SMALLEST["student"], options=options)
        results[size] = {run["method"]: run for run in study["runs"]}
        assert all(run["status"] == "finished" for run in study["runs"])
        # the cohort size is on record: asked for (study.json), trained with (results.csv, summary.json), in the report
        assert study["invocations"][-1]["cohort_size"] == size
        header, *rows = (tmp_path / f"cohort-{size}" / "results.csv").read_text().splitlines()
        assert header.endswith(",cohort_size") and [row.rsplit(",", 1)[1] for row in rows] == [str(size)] * 8
        assert ("cohorts of 8 (one fused network each)" if size == 8 else "every run trained alone") in markdown.provenance(provenance(study))
    assert [r["summary"]["cohort_size"] for r in results[8].values()] == [8] * 8
    for method, run in results[1].items():
        assert run["summary"]["cohort_size"] == 1
        assert_same_run(Path(results[8][method]["dir"]), Path(run["dir"]))


def test_cohort_of_modern_losses_and_overlay_controls_equals_single_runs(tiny_dataset, tmp_path, float64):
    """Issue 15's methods in one cohort: per-member loss terms (DKD, DIST, logit standardisation), map
    controls (shuffled, random) and mixing (CutMix, Mixup, the teacher seeing the mixed batch)."""
    slow = {"lr": 0.002, **SMALLEST}  # DIST's loss (tau^2 = 16 times a correlation gap) is chaotic at 0.01
    configs = [
        _config("dkd_ig", 0, p=0.5, **slow), _config("dist", 1, **slow), _config("kd_shuffled", 0, p=0.5, **slow),
        _config("kd_random_map", 2, p=0.5, **slow), _config("kd_cutmix", 1, mix_prob=1.0, **slow), _config("kd_mixup", 2, **slow),
        _config("kd", 0, logit_std=True, **slow), _config("kd_ig", 0, p=0.5, **slow),
    ]
    names = [f"{c.method}-{g}" for g, c in enumerate(configs)]
    from igkd.distill import Trainer

    trainer = Trainer(configs, tiny_dataset, [tmp_path / "cohort" / n for n in names], **_inputs(tiny_dataset))
    assert trainer.plan.mixing and trainer.plan.member_source == [0, None, 1, 2, None, None, None, 0]  # ig (shared), shuffled, random
    trainer.run()
    for config, name in zip(configs, names):
        train(config, tiny_dataset, tmp_path / "single" / name, **_inputs(tiny_dataset))
        assert_same_run(tmp_path / "cohort" / name, tmp_path / "single" / name)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_cohort_under_adam_equals_single_runs_in_float64(tiny_dataset, tmp_path, float64, optimizer):
    """Issue 26 item 10: the fused Adam(W) step is each member's own (per-element moments, eps and weight
    decay; the decay groups follow the members' ndim), so in float64 a member equals its single run. In
    float32 the cohort is statistically equivalent to its single runs (same seeds, subsets, views), not the
    same weights: Adam turns rounding-level gradients into steps of its learning rate."""
    decay = {"weight_decay": 5e-4} if optimizer == "adamw" else {}  # the paper's Adam uses none
    configs = [_config("student", 0, "paper", optimizer=optimizer, **decay), _config("kd_ig_at", 1, "paper", p=0.5, optimizer=optimizer, **decay),
               _config("dist", 2, "paper", optimizer=optimizer, **decay)]
    assert configs[0].optimizer == optimizer and configs[0].lr == 1e-3
    names = [f"{c.method}-s{c.seed}" for c in configs]
    train_cohort(configs, tiny_dataset, [tmp_path / "cohort" / n for n in names], **_inputs(tiny_dataset))
    for config, name in zip(configs, names):
        train(config, tiny_dataset, tmp_path / "single" / name, **_inputs(tiny_dataset))
        assert_same_run(tmp_path / "cohort" / name, tmp_path / "single" / name)
