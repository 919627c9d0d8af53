"""Studies: balanced run order, resume without re-running, pairing, CF, statistics from the study, agreement."""

import json

import pytest
import torch
from conftest import as_cohort_trainer
from typer.testing import CliRunner

from igkd.distill import executor

from igkd.distill.data_plan import split_indices
from igkd.errors import IgkdError
from igkd.experiments import studies
from igkd.experiments.agreement import model_agreement
from igkd.experiments.studies import StudyOptions, load_study, run_ablation, run_montecarlo, run_sweep, study_statistics
from igkd.models import build_model, count_parameters, save_model

FAST = dict(epochs=1, batch_size=16, val_fraction=0.25, device="cpu", progress=False)


@pytest.fixture
def teacher_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "teacher.safetensors"
    save_model(path, build_model("teacher", width=0.25, num_classes=4))
    return path


@pytest.fixture
def attributions_dir(tmp_path, teacher_file, tiny_dataset):
    from igkd.attribution import compute_attributions
    from igkd.models import load_model
    from igkd.provenance import sha256_file

    model, _ = load_model(teacher_file)
    compute_attributions(model, tiny_dataset, tmp_path / "ig", n_steps=4, device="cpu", teacher_sha256=sha256_file(teacher_file), progress=False)
    return tmp_path / "ig"


class CountingTrainer:
    """Wraps the executor's training of a cohort (one run each on the CPU): counts runs, can interrupt the
    n-th run after its first epoch (checkpoint written)."""

    def __init__(self, interrupt_call=None):
        self.calls, self.interrupt_call, self.resumed_from_checkpoint = [], interrupt_call, []
        self.real = executor._train

    def __call__(self, cohort, dataset, inputs, **kwargs):
        for run in cohort:
            self.calls.append(run.out.name)
            self.resumed_from_checkpoint.append((run.out / "checkpoint.pt").exists())
        if len(self.calls) == self.interrupt_call:

            def interrupt(epoch, record):
                raise KeyboardInterrupt

            kwargs["on_epoch_end"] = interrupt
        return self.real(cohort, dataset, inputs, **kwargs)


def fake_trainer(accuracy):
    """A stand-in for run_training that writes a summary with ``accuracy(config)`` (statistics tests)."""

    def train(config, dataset, out_dir, **kwargs):
        out_dir.mkdir(parents=True, exist_ok=True)
        summary = {"method": config.method, "seed": config.seed, "test_accuracy": accuracy(config), "val_accuracy": 50.0, "config": config.to_dict()}
        (out_dir / "summary.json").write_text(json.dumps(summary))
        return summary

    return train


def test_ablation_interleaves_methods_and_resumes_without_rerunning(tiny_dataset, teacher_file, tmp_path, monkeypatch):
    out = tmp_path / "ablation"
    trainer = CountingTrainer(interrupt_call=3)
    monkeypatch.setattr(executor, "_train", trainer)
    with pytest.raises(KeyboardInterrupt):
        run_ablation(tiny_dataset, out, methods="student,kd", seeds=2, student="k17", teacher=teacher_file, **FAST)
    assert trainer.calls == ["student-s0", "kd-s0", "student-s1"]  # seed 0 of every method first
    finished = {name: (out / "runs" / name / "summary.json").stat().st_mtime_ns for name in ("student-s0", "kd-s0")}
    assert not (out / "runs" / "student-s1" / "summary.json").exists() and (out / "runs" / "student-s1" / "checkpoint.pt").exists()

    trainer.calls.clear()
    trainer.resumed_from_checkpoint.clear()
    study = run_ablation(tiny_dataset, out, methods="student,kd", seeds=2, student="k17", teacher=teacher_file, **FAST)
    assert trainer.calls == ["student-s1", "kd-s1"] and trainer.resumed_from_checkpoint == [True, False]
    assert {name: (out / "runs" / name / "summary.json").stat().st_mtime_ns for name in finished} == finished
    assert [r["status"] for r in study["runs"]] == ["finished"] * 4
    assert study["paired"] is True and study["kind"] == "ablation" and study["teacher"]["params"] > 0
    metrics = (out / "runs" / "student-s1" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in metrics] == [1]
    header, *rows = (out / "results.csv").read_text().splitlines()
    assert header.startswith("method,run,accuracy") and len(rows) == 4

    # a finished study re-run trains nothing; growing it trains only the new runs
    trainer.calls.clear()
    run_ablation(tiny_dataset, out, methods="student,kd", seeds=2, student="k17", teacher=teacher_file, **FAST)
    assert trainer.calls == []
    run_ablation(tiny_dataset, out, methods="student", seeds=3, student="k17", teacher=teacher_file, **FAST)
    assert trainer.calls == ["student-s2", "kd-s2"]  # the study keeps its methods: it only grows
    assert load_study(out)["runs"][-1]["run_id"] == "kd-s2"


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(epochs=2), "epochs=1 but this command gives epochs=2"),
        (dict(student="k15"), "students"),
        (dict(teacher=None), "teacher"),
    ],
)
def test_continuing_with_other_options_is_refused(change, message, tiny_dataset, teacher_file, tmp_path, monkeypatch):
    monkeypatch.setattr(executor, "_train", as_cohort_trainer(fake_trainer(lambda c: 50.0)))
    args = dict(methods="student", seeds=2, student="k17", teacher=teacher_file, **FAST)
    run_ablation(tiny_dataset, tmp_path / "s", **args)
    with pytest.raises(IgkdError, match=message):
        run_ablation(tiny_dataset, tmp_path / "s", **{**args, **change})


def test_a_study_folder_runs_in_one_process_at_a_time(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(executor, "_train", as_cohort_trainer(fake_trainer(lambda c: 50.0)))
    args = dict(methods="student", seeds=1, student="k17", **FAST)
    run_ablation(tiny_dataset, tmp_path / "s", **args)
    with studies.study_lock(tmp_path / "s"):  # as if another process were running it
        with pytest.raises(IgkdError, match="being run by another process"):
            run_ablation(tiny_dataset, tmp_path / "s", **args)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(IgkdError, match="torchrun is for a single run"):
        run_ablation(tiny_dataset, tmp_path / "s", **args)


def test_bad_study_inputs_fail_before_training(tiny_dataset, teacher_file, tmp_path, monkeypatch):
    monkeypatch.setattr(executor, "_train", as_cohort_trainer(fake_trainer(lambda c: 50.0)))
    with pytest.raises(IgkdError, match="needs a teacher"):
        run_ablation(tiny_dataset, tmp_path / "a", methods="kd", seeds=1, student="k17", **FAST)
    with pytest.raises(IgkdError, match="pass --attributions"):
        run_ablation(tiny_dataset, tmp_path / "b", methods="ig", seeds=1, student="k17", teacher=teacher_file, **FAST)
    with pytest.raises(IgkdError, match="unknown method 'kdd'"):
        run_ablation(tiny_dataset, tmp_path / "c", methods="student,kdd", seeds=1, student="k17", **FAST)
    with pytest.raises(IgkdError, match="sets seed"):
        run_ablation(tiny_dataset, tmp_path / "d", methods="student", seeds=1, student="k17", options=StudyOptions(config_values={"seed": 3}, **FAST))
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "other.txt").write_text("x")
    with pytest.raises(IgkdError, match="not empty"):
        run_ablation(tiny_dataset, tmp_path / "e", methods="student", seeds=1, student="k17", **FAST)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_montecarlo_runs_share_the_subset_across_methods(tiny_dataset, teacher_file, attributions_dir, tmp_path):
    study = run_montecarlo(
        tiny_dataset, tmp_path / "mc", methods="student,kd_ig", runs=2, subset=0.5, student="k17", teacher=teacher_file, attributions=attributions_dir, **FAST
    )
    assert study["paired"] is True and study["attributions"]["manifest_sha256"]
    labels = tiny_dataset.train.labels
    subsets = {}
    for run in study["runs"]:
        summary = run["summary"]
        assert summary["subset_seed"] == run["run"] == summary["seed"] and summary["subset"] == 0.5
        config = studies.resolve_config(**{k: v for k, v in summary["config"].items() if k != "extra"})
        subsets[(run["method"], run["run"])] = split_indices(config, labels)[0].tolist()
    assert subsets[("student", 0)] == subsets[("kd_ig", 0)]
    assert subsets[("student", 1)] == subsets[("kd_ig", 1)]
    assert subsets[("student", 0)] != subsets[("student", 1)]
    assert len(subsets[("student", 0)]) == 32  # half of all 64 training images, 8 per class (val: from the other half)


def test_independent_montecarlo_draws_per_method_and_stats_use_welch(tiny_dataset, teacher_file, tmp_path, monkeypatch):
    monkeypatch.setattr(executor, "_train", as_cohort_trainer(fake_trainer(lambda c: 50.0 + (c.seed % 7) + (0.5 if c.method == "kd" else 0))))
    args = dict(methods="student,kd", runs=3, subset=0.5, student="k17", teacher=teacher_file, **FAST)
    paired = run_montecarlo(tiny_dataset, tmp_path / "paired", **args)
    independent = run_montecarlo(tiny_dataset, tmp_path / "independent", independent=True, **args)
    assert independent["paired"] is False
    seeds = {(r["method"], r["run"]): r["subset_seed"] for r in independent["runs"]}
    assert seeds[("student", 1)] != seeds[("kd", 1)] and len(set(seeds.values())) == 6
    # same run ids in both studies: only the study's flag makes one paired and the other Welch
    assert study_statistics(tmp_path / "paired")["test"].startswith("paired t-test")
    welch = study_statistics(tmp_path / "independent")
    assert welch["test"].startswith("Welch") and welch["study"]["paired"] is False
    assert paired["runs"][0]["summary"]["test_accuracy"] == 50.0


def test_stats_of_a_partial_paired_study_use_complete_pairs(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(executor, "_train", as_cohort_trainer(fake_trainer(lambda c: 60.0 + c.seed)))
    study = run_ablation(tiny_dataset, tmp_path / "s", methods="student", seeds=3, student="k17", **FAST)
    assert len(study["runs"]) == 3
    # a kd run that exists for seeds 0 and 1 only, as if the study had stopped there
    data = json.loads((tmp_path / "s" / "study.json").read_text())
    data["methods"].append("kd")
    data["plan"] += [dict(data["plan"][i], run_id=f"kd-s{i}", method="kd") for i in range(3)]
    (tmp_path / "s" / "study.json").write_text(json.dumps(data))
    for i in (0, 1):
        config = studies.resolve_config("kd", student="k17", seed=i, epochs=1)
        fake_trainer(lambda c: 61.0 + c.seed)(config, tiny_dataset, tmp_path / "s" / "runs" / f"kd-s{i}")
    summary = study_statistics(tmp_path / "s")
    assert summary["paired"] and summary["study"]["runs_dropped"] == ["student-s2"]
    assert [m["n"] for m in summary["methods"]] == [2, 2]
    assert summary["vs_baseline"][0]["mean_difference"] == pytest.approx(1.0)


def test_sweep_records_params_and_compression_factor(tiny_dataset, teacher_file, tmp_path):
    study = run_sweep(tiny_dataset, tmp_path / "sweep", students="k17,k15", methods="student", seeds=1, teacher=teacher_file, **FAST)
    teacher_params = study["teacher"]["params"]
    assert study["students"] == ["k15", "k17"] and study["cf_reference"]["params"] == teacher_params
    for run in study["runs"]:
        params = count_parameters(build_model(run["student"], num_classes=4))
        assert run["params"] == params == run["summary"]["params"]
        assert run["cf"] == round(teacher_params / params, 2)
    rows = (tmp_path / "sweep" / "results.csv").read_text().splitlines()
    assert rows[0].split(",")[6:8] == ["params", "cf"] and len(rows) == 3
    with pytest.raises(IgkdError, match="choose one with --student"):
        study_statistics(tmp_path / "sweep")


def test_agreement_of_a_model_with_itself_is_one_and_with_another_is_lower(tiny_dataset):
    torch.manual_seed(0)
    a = build_model("teacher", width=0.25, num_classes=4).eval()
    torch.manual_seed(1)
    b = build_model("k13", num_classes=4).eval()
    images, labels = tiny_dataset.test.images[:8], tiny_dataset.test.labels[:8]
    same = model_agreement(a, a, images, labels, n_steps=4)
    other = model_agreement(a, b, images, labels, n_steps=4)
    assert same["spearman"]["mean"] == pytest.approx(1.0) and same["top_overlap"]["mean"] == 1.0 and same["spearman"]["n"] == 8
    assert other["spearman"]["mean"] < 0.95 and other["top_overlap"]["mean"] < 0.9


def test_study_extras_agreement_and_robustness(tiny_dataset, teacher_file, tmp_path):
    args = dict(methods="student", seeds=1, student="k17", teacher=teacher_file, agreement=8, agreement_steps=4, robustness="jpeg:1", **FAST)
    study = run_ablation(tiny_dataset, tmp_path / "s", **args)
    run = study["runs"][0]
    assert run["agreement"]["n"] == 8 and run["agreement"]["teacher"]["sha256"] == study["teacher"]["sha256"]
    assert -1 <= run["agreement"]["spearman"]["mean"] <= 1 and 0 <= run["agreement"]["top_overlap"]["mean"] <= 1
    assert run["robustness"]["spec"] == "jpeg:1" and "jpeg" in run["robustness"]["accuracy"]
    assert study["extras"]["agreement"] == {"n": 8, "n_steps": 4}


def test_cli_ablation_stats_and_agreement(tiny_dataset, teacher_file, tmp_path, monkeypatch, capsys):
    import igkd.data
    from igkd.cli import app, main

    monkeypatch.setattr(igkd.data, "load_dataset", lambda name, data_dir=None, **kw: tiny_dataset)
    runner = CliRunner()
    common = ["--dataset", "tiny", "--student", "k17", "--epochs", "1", "--batch-size", "16", "--val-fraction", "0.25", "--device", "cpu"]
    result = runner.invoke(app, ["ablation", "--methods", "student,kd", "--seeds", "2", "--teacher", str(teacher_file), "--out", str(tmp_path / "s"), *common, "--json"])
    assert result.exit_code == 0, result.output
    study = json.loads(result.stdout)
    assert study["kind"] == "ablation" and [r["status"] for r in study["runs"]] == ["finished"] * 4

    result = runner.invoke(app, ["stats", "--study", str(tmp_path / "s"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["study"]["runs_used"] == 4

    result = runner.invoke(app, ["agreement", "--teacher", str(teacher_file), "--student", str(teacher_file), "--dataset", "tiny", "--n", "8", "--steps", "4", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["top_overlap"]["mean"] == 1.0

    with pytest.raises(SystemExit) as exit_info:
        changed = [("3" if previous == "--epochs" else arg) for previous, arg in zip(["", *common], common)]
        main(["ablation", "--methods", "student,kd", "--seeds", "2", "--teacher", str(teacher_file), "--out", str(tmp_path / "s"), *changed, "--json"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "epochs" in err[0]
    with pytest.raises(SystemExit):
        main(["stats", "--study", str(tmp_path / "s"), "--paired"])
    assert "records whether its runs are paired" in capsys.readouterr().err


def test_agreement_cache_computes_the_teacher_maps_once(tiny_dataset, teacher_file, tmp_path, monkeypatch):
    from igkd.experiments import agreement

    torch.manual_seed(1)
    save_model(tmp_path / "student.safetensors", build_model("k17", num_classes=4))
    args = dict(n=8, n_steps=4, device="cpu")
    plain = agreement.measure_agreement(teacher_file, tmp_path / "student.safetensors", tiny_dataset, **args)
    calls, real = [], agreement.ig_maps_batched
    monkeypatch.setattr(agreement, "ig_maps_batched", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache: dict = {}
    first = agreement.measure_agreement(teacher_file, tmp_path / "student.safetensors", tiny_dataset, cache=cache, **args)
    second = agreement.measure_agreement(teacher_file, tmp_path / "student.safetensors", tiny_dataset, cache=cache, **args)
    assert len(calls) == 3  # teacher + student, then the student only
    for key in ("spearman", "top_overlap", "teacher", "student"):
        assert plain[key] == first[key] == second[key]
