"""Issue 14: the authors' attention layer, unpaired CSV statistics by default, short runs that learn,
the paper's Monte Carlo split, signed IG maps refused by the overlay, the authors' checkpoints, output."""

from __future__ import annotations

import json

import pytest
import torch

from igkd.cli import app
from igkd.distill.config import TrainConfig, resolve_config
from igkd.distill.data_plan import split_indices, split_plan
from igkd.distill.evaluation import recalibrate_batchnorm
from igkd.distill.schedule import warmup_epochs
from igkd.distill.losses import attention_layers
from igkd.errors import IgkdError
from igkd.models import build_model

# -- 1. attention-transfer layers -------------------------------------------------------------------


def test_k5_default_attention_pair_is_features_9_in_both():
    teacher, k5 = build_model("teacher"), build_model("k5")
    layers = attention_layers(teacher, k5)
    assert (layers["teacher"], layers["student"]) == ("features.9", "features.9")
    assert "same module index" in layers["rule"]
    # a student too short for features.9 uses its deepest module, and says so
    short = attention_layers(teacher, build_model("k11"))
    assert short["student"] == "features.7" and "too few" in short["rule"]
    # named layers are kept; a named teacher layer moves the student's default with it
    assert attention_layers(teacher, k5, teacher_layer="features.6")["student"] == "features.6"
    assert attention_layers(teacher, k5, teacher_layer="features.6", student_layer="features.3")["student"] == "features.3"


# -- 2. statistics of a CSV: unpaired unless declared -----------------------------------------------

STUDENT = [91.19, 90.5, 91.32, 91.28, 91.36, 91.35, 91.43, 91.05, 90.86, 91.5]
KD_IG = [92.58, 91.73, 92.08, 92.45, 91.96, 91.58, 91.82, 91.62, 92.13, 92.23]


def _csv(path, seeds=None):
    lines = ["method,run,accuracy" + (",seed" if seeds else "")]
    for method, values in (("student", STUDENT), ("kd_ig", KD_IG)):
        for r, a in enumerate(values):
            lines.append(f"{method},{r},{a}" + (f",{seeds[method][r]}" if seeds else ""))
    path.write_text("\n".join(lines) + "\n")
    return path


def _stats(path, *flags):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["stats", "--csv", str(path), "--json", *flags])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_csv_with_equal_run_ids_is_unpaired_unless_it_declares_pairing(tmp_path):
    from scipy import stats

    welch = stats.ttest_ind(KD_IG, STUDENT, equal_var=False).pvalue
    plain = _stats(_csv(tmp_path / "a.csv"))  # the published situation: runs 0..9 drawn independently
    assert plain["paired"] is False and "nothing declares" in plain["pairing"]
    assert plain["vs_baseline"][0]["p"] == pytest.approx(welch, abs=1e-9)
    same = {m: list(range(10)) for m in ("student", "kd_ig")}
    declared = _stats(_csv(tmp_path / "b.csv", same))
    assert declared["paired"] is True and "seed" in declared["pairing"]
    assert declared["vs_baseline"][0]["p"] == pytest.approx(stats.ttest_rel(KD_IG, STUDENT).pvalue, abs=1e-9)
    other = {"student": list(range(10)), "kd_ig": list(range(100, 110))}
    independent = _stats(_csv(tmp_path / "c.csv", other))
    assert independent["paired"] is False and "differ" in independent["pairing"]
    assert _stats(_csv(tmp_path / "a.csv"), "--paired")["paired"] is True


def test_stats_tables_fit_80_columns_with_every_method_name(tmp_path, capsys):
    from igkd.experiments.commands import _print_summary
    from igkd.experiments.statistics import summarize

    methods = ("student", "kd", "ig", "kd_ig", "at", "kd_at", "ig_at", "kd_ig_at")
    rows = [(m, str(r), 90 + 0.1 * i + 0.07 * ((r * 7 + i) % 5)) for i, m in enumerate(methods) for r in range(10)]
    for paired in (True, False):
        capsys.readouterr()
        _print_summary(summarize(rows, paired=paired), width=80)
        out = capsys.readouterr().out
        assert max(len(line) for line in out.splitlines()) <= 80
        cells = [cell for line in out.splitlines() for cell in line.split()]
        for m in methods:
            assert cells.count(m) >= 1 + 7, (m, out)  # per-method table + every pair it is in, never wrapped


# -- 3. short runs learn ---------------------------------------------------------------------------


def test_warmup_is_a_capped_fraction_of_the_run():
    assert warmup_epochs(resolve_config("student", "teacher", epochs=100)) == 2  # capped: as before at full length
    assert warmup_epochs(resolve_config("student", "teacher", epochs=2)) == 1.4  # 70% of a short run, never all of it
    assert warmup_epochs(resolve_config("student", "teacher", epochs=3)) == 2
    assert warmup_epochs(resolve_config("student", "paper", epochs=3)) == 0
    assert warmup_epochs(resolve_config("student", "teacher", epochs=10, warmup_fraction=1.0, warmup_epochs=5)) == 5
    with pytest.raises(IgkdError, match="warmup_fraction"):
        resolve_config("student", "teacher", warmup_fraction=2.0)


def test_recalibrated_batchnorm_matches_the_current_weights():
    torch.manual_seed(0)
    model = build_model("k15", num_classes=4)
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    for m in model.modules():  # stale statistics, as after a few fast steps
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(5.0)
            m.running_var.fill_(50.0)
    x = images.float().div(255)
    model.train()
    with torch.no_grad():
        batch_stats = model(x)
    assert recalibrate_batchnorm(model, images, 64, torch.device("cpu")) == 64
    assert model.training  # the mode it was in is restored
    model.eval()
    with torch.no_grad():
        running = model(x)
    # one batch of all images: running mean = batch mean, running var = unbiased batch var (~ biased)
    assert torch.allclose(running, batch_stats, atol=2e-2, rtol=2e-2)
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def _main(argv):
    from igkd.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code in (0, None)


def _digits_run(tmp_path, argv):
    _main([*argv, "--dataset", "digits", "--device", "cpu", "--json", "--out", str(tmp_path)])
    return json.loads((tmp_path / "summary.json").read_text())


# What these guard against: evaluation collapsing to one class (10% on digits) because BatchNorm
# running averages lag the weights. How far above that a 2-3 epoch run lands depends on the CPU's
# rounding (the same code and seed gave 54.9% / 62.1% on one machine, 49.3% / 32.6% on another):
# so the bar is well above chance, with most classes predicted, not a particular accuracy.
def _learned(summary: dict) -> None:
    assert summary["test_accuracy"] >= 25, summary["test_accuracy"]
    per_class = [v for v in summary["test_per_class"].values()]
    assert sum(v > 0 for v in per_class) >= 5, per_class  # not one class predicted for everything


@pytest.mark.slow
def test_three_epoch_teacher_on_digits_learns(tmp_path, capsys):
    _learned(_digits_run(tmp_path / "t", ["train-teacher", "--epochs", "3"]))


@pytest.mark.slow
def test_two_epoch_student_on_digits_learns(tmp_path, capsys):
    _learned(_digits_run(tmp_path / "s", ["distill", "--method", "student", "--epochs", "2"]))


# -- 4. smaller points ------------------------------------------------------------------------------


def test_monte_carlo_subset_is_a_fraction_of_the_whole_split_and_val_comes_from_the_rest():
    labels = torch.arange(1000) % 10  # 100 per class
    config = TrainConfig(subset=0.8, subset_seed=3, val_fraction=0.1)
    train, val = split_indices(config, labels)
    assert len(train) == 800 and len(val) == 100  # the paper's 80% of the whole split; val held out
    assert not set(train.tolist()) & set(val.tolist())
    assert torch.equal(torch.bincount(labels[val]), torch.full((10,), 10))
    again = split_indices(TrainConfig(subset=0.8, subset_seed=3, val_fraction=0.1, seed=9, method="kd"), labels)
    assert torch.equal(again[0], train) and torch.equal(again[1], val)  # paired: same subset and val for run r
    other = split_indices(TrainConfig(subset=0.8, subset_seed=4, val_fraction=0.1), labels)
    assert not torch.equal(other[0], train)
    # not enough left out: the validation part is fixed first, the subset drawn from the rest
    train, val, rule = split_plan(TrainConfig(subset=0.95, subset_seed=0, val_fraction=0.1), labels)
    assert len(val) == 100 and len(train) == 860 and "exceed" in rule


def test_signed_ig_maps_are_refused_for_the_overlay(tmp_path, tiny_dataset):
    from igkd.attribution import compute_attributions
    from igkd.distill.run import load_ig_maps
    from igkd.models import save_model
    from igkd.provenance import sha256_file

    teacher = build_model("k15", num_classes=tiny_dataset.num_classes)
    save_model(tmp_path / "t.safetensors", teacher)
    sha = sha256_file(tmp_path / "t.safetensors")
    compute_attributions(teacher.eval(), tiny_dataset, tmp_path / "ig", split="train", n_steps=2, device="cpu",
                         teacher_sha256=sha, reduction="signed_sum", progress=False)
    with pytest.raises(IgkdError, match="signed_sum.*non-negative"):
        load_ig_maps(tmp_path / "ig", sha, tiny_dataset)


def test_evaluate_reads_the_authors_attention_layout(tmp_path, tiny_dataset, capsys):
    from safetensors.torch import save_file

    from igkd.models import save_model

    import igkd.data as data_module

    model = build_model("k5", num_classes=tiny_dataset.num_classes, mean=(0, 0, 0), std=(1, 1, 1)).eval()
    for m in model.modules():  # non-trivial BN statistics, so a wrong mapping would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    save_model(tmp_path / "ours.safetensors", model)
    theirs = {}
    for key, value in model.state_dict().items():
        if key.startswith("normalize."):
            continue
        if key.startswith("features."):
            _, index, rest = key.split(".", 2)
            i = int(index)
            key = f"front_layers.{i}.{rest}" if i < 9 else (f"middle_layer.{rest}" if i == 9 else f"end_layers.{i - 10}.{rest}")
        theirs[key] = value.clone()
    torch.save(theirs, tmp_path / "theirs.pt")
    save_file(theirs, str(tmp_path / "theirs.safetensors"))

    original = data_module.load_dataset
    try:
        data_module.load_dataset = lambda *a, **k: tiny_dataset
        results = {}
        for name in ("ours.safetensors", "theirs.pt", "theirs.safetensors"):
            capsys.readouterr()
            _main(["evaluate", "--checkpoint", str(tmp_path / name), "--dataset", "digits", "--device", "cpu", "--json"])
            results[name] = json.loads(capsys.readouterr().out)
    finally:
        data_module.load_dataset = original
    assert results["theirs.pt"]["accuracy"] == results["ours.safetensors"]["accuracy"]
    assert results["theirs.safetensors"]["accuracy"] == results["ours.safetensors"]["accuracy"]
    assert results["theirs.pt"]["confusion"] == results["ours.safetensors"]["confusion"]


def test_teacher_summary_line_says_teacher(capsys):
    from igkd.distill.commands import _print_summary

    _print_summary({"kind": "teacher", "method": "student", "student": "teacher", "test_accuracy": 90.0, "val_accuracy": 89.0,
                    "epochs": 3, "wall_time_s": 5}, "out", False)
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("teacher: test 90.00%") and "student" not in line
