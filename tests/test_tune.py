"""igkd tune: the search space, duplicate points, interrupted trials, two worker processes on one SQLite study."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from igkd.errors import IgkdError
from igkd.experiments import studies
from igkd.experiments.tune import DEFAULT_GRID, grid_points, load_space, parse_params, run_tune
from igkd.models import build_model, save_model

FAST = dict(epochs=1, batch_size=16, val_fraction=0.25, device="cpu", progress=False)
TESTS = Path(__file__).parent


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    save_model(tmp_path / "teacher.safetensors", build_model("teacher", width=0.25, num_classes=4))
    (tmp_path / "grid.yaml").write_text("T: [1, 2]\nalpha: [0.1, 0.5]\n")
    return tmp_path


def _trials(out):
    return json.loads((out / "tune.json").read_text())["trials"]


def _trained(out):
    """Run folders that finished, and the hyper-parameters each was trained with."""
    configs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("trial-*/summary.json"))]
    return [(c["config"]["temperature"], c["config"]["alpha"]) for c in configs]


def test_search_space_defaults_files_and_errors(tmp_path):
    assert parse_params("T, Alpha,p,t") == ["temperature", "alpha", "p"]
    space = load_space(["temperature", "alpha"], "grid")
    assert len(grid_points(space)) == len(DEFAULT_GRID["temperature"]) * len(DEFAULT_GRID["alpha"]) == 49
    assert load_space(["gamma"], "tpe") == {"gamma": {"low": 0.1, "high": 3.2, "log": True}}
    (tmp_path / "g.yaml").write_text("p: [0.1, 0.25]\ngamma: {low: 0.2, high: 2, log: true}\n")
    assert load_space([], "tpe", tmp_path / "g.yaml") == {"p": {"values": [0.1, 0.25]}, "gamma": {"low": 0.2, "high": 2.0, "log": True}}
    with pytest.raises(IgkdError, match="gamma is a range"):
        load_space([], "grid", tmp_path / "g.yaml")
    with pytest.raises(IgkdError, match="does not tune"):
        load_space(["p"], "grid", tmp_path / "g.yaml")
    with pytest.raises(IgkdError, match="unknown hyper-parameter 'beta'"):
        parse_params("beta")
    with pytest.raises(IgkdError, match="nothing to tune"):
        load_space([], "grid")


def test_bad_values_and_missing_inputs_fail_before_training(tiny_dataset, setup):
    (setup / "bad.yaml").write_text("alpha: [0.1, 1.5]\n")
    with pytest.raises(IgkdError, match="alpha must be in"):
        run_tune(tiny_dataset, setup / "t1", method="kd", grid_file=setup / "bad.yaml", student="k17", teacher=setup / "teacher.safetensors", **FAST)
    with pytest.raises(IgkdError, match="pass --attributions"):
        run_tune(tiny_dataset, setup / "t2", method="kd", params="p", student="k17", teacher=setup / "teacher.safetensors", **FAST)
    with pytest.raises(IgkdError, match="needs --trials"):
        run_tune(tiny_dataset, setup / "t3", method="kd", params="T", sampler="tpe", student="k17", teacher=setup / "teacher.safetensors", **FAST)
    assert not (setup / "t1").exists()


def test_a_known_point_is_not_trained_again(tiny_dataset, setup):
    """A grid point that already has a complete trial is skipped as a duplicate (state PRUNED, duplicate_of)."""
    import optuna

    out, name, storage = setup / "tune", "dup", f"sqlite:///{setup / 'shared.db'}"  # a --storage outside the study folder
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    distributions = {
        "alpha": optuna.distributions.CategoricalDistribution([0.1, 0.5]),
        "temperature": optuna.distributions.CategoricalDistribution([1.0, 2.0]),
    }
    # trial numbers 1-3 take grid points 1-3 (GridSampler's rule); the known point comes up as trial 4 or earlier
    study.add_trial(optuna.trial.create_trial(params={"alpha": 0.1, "temperature": 1.0}, distributions=distributions, value=99.0))
    kwargs = dict(method="kd", grid_file=setup / "grid.yaml", storage=storage, study_name=name, student="k17", teacher=setup / "teacher.safetensors", **FAST)
    result = run_tune(tiny_dataset, out, **kwargs)["tune_result"]
    pruned = [t for t in result["trials"] if t["state"] == "PRUNED"]
    assert len(pruned) == 1 and pruned[0]["duplicate_of"] == 0 and pruned[0]["params"] == {"temperature": 1.0, "alpha": 0.1}
    assert not (out / "runs" / f"trial-{pruned[0]['number']}").exists() and sorted(_trained(out)) == [(1.0, 0.5), (2.0, 0.1), (2.0, 0.5)]
    assert result["best"]["number"] == 0 and result["complete"]  # best by validation accuracy (the objective)
    for trial in (t for t in result["trials"] if t["run_dir"]):
        summary = json.loads((out / trial["run_dir"] / "summary.json").read_text())
        assert trial["val_accuracy"] == summary["val_accuracy"]


def test_interrupted_trial_is_retried_from_its_checkpoint(tiny_dataset, setup, monkeypatch):
    calls, real = [], studies.run_training

    def trainer(config, dataset, out_dir, **kwargs):
        calls.append((out_dir.name, (out_dir / "checkpoint.pt").exists()))
        if len(calls) == 2:
            kwargs["on_epoch_end"] = lambda epoch, record: (_ for _ in ()).throw(KeyboardInterrupt())
        return real(config, dataset, out_dir, **kwargs)

    monkeypatch.setattr(studies, "run_training", trainer)
    kwargs = dict(method="kd", grid_file=setup / "grid.yaml", student="k17", teacher=setup / "teacher.safetensors", **FAST)
    with pytest.raises(KeyboardInterrupt):
        run_tune(tiny_dataset, setup / "tune", **kwargs)
    assert [t["state"] for t in _trials(setup / "tune")] == ["COMPLETE", "FAIL"]
    study = run_tune(tiny_dataset, setup / "tune", **kwargs)
    trials = study["tune_result"]["trials"]
    retry = next(t for t in trials if t["retry_of"] == 1)
    assert retry["state"] == "COMPLETE" and (f"trial-{retry['number']}", True) in calls  # resumed the interrupted checkpoint
    assert not (setup / "tune" / "runs" / "trial-1").exists()
    assert sum(t["state"] == "COMPLETE" for t in trials) == 4 and len(set(_trained(setup / "tune"))) == 4 == len(_trained(setup / "tune"))
    assert study["kind"] == "tune" and study["tune"]["grid_size"] == 4
    with pytest.raises(IgkdError, match="epochs"):
        run_tune(tiny_dataset, setup / "tune", **{**kwargs, "epochs": 2})


WORKER = textwrap.dedent(
    """
    import sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from conftest import make_tiny_dataset
    from igkd.experiments.tune import run_tune
    run_tune(make_tiny_dataset(), {out!r}, method="kd", grid_file={grid!r}, student="k17", teacher={teacher!r},
             epochs=1, batch_size=16, val_fraction=0.25, device="cpu", progress=False)
    """
)


@pytest.mark.slow
def test_two_worker_processes_finish_the_grid_once(setup):
    out = setup / "tune"
    script = WORKER.format(tests=str(TESTS), out=str(out), grid=str(setup / "grid.yaml"), teacher=str(setup / "teacher.safetensors"))
    workers = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err
    trials = _trials(out)
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    assert len(complete) == 4 and len({tuple(sorted(t["params"].items())) for t in complete}) == 4
    assert all(t["state"] == "PRUNED" and t["duplicate_of"] is not None for t in trials if t["state"] != "COMPLETE")
    trained = _trained(out)
    assert len(trained) == 4 and len(set(trained)) == 4  # no point trained twice
    assert len({t["worker"] for t in complete}) >= 1


def test_cli_tune_json(tiny_dataset, setup, monkeypatch):
    import igkd.data
    from igkd.cli import app

    monkeypatch.setattr(igkd.data, "load_dataset", lambda name, data_dir=None, **kw: tiny_dataset)
    args = ["tune", "--dataset", "tiny", "--out", str(setup / "tune"), "--method", "kd", "--params", "T", "--sampler", "tpe", "--trials", "2",
            "--teacher", str(setup / "teacher.safetensors"), "--student", "k17", "--epochs", "1", "--batch-size", "16", "--val-fraction", "0.25",
            "--device", "cpu", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    tune = json.loads(result.stdout)
    assert tune["sampler"] == "tpe" and tune["counts"] == {"COMPLETE": 2} and tune["best"]["params"]["temperature"] >= 1.0
    assert tune["objective"].startswith("val_accuracy")


def test_failed_trial_is_kept_not_retried_and_best_is_chosen_on_validation(tiny_dataset, setup, monkeypatch):
    def trainer(config, dataset, out_dir, **kwargs):
        if (config.temperature, config.alpha) == (2.0, 0.5):
            raise IgkdError("the training loss became NaN/inf in epoch 1")
        out_dir.mkdir(parents=True)
        # validation favours high T + alpha; test accuracy the opposite: the best must follow validation
        return {"val_accuracy": 10 * config.temperature + config.alpha, "test_accuracy": 100 - 10 * config.temperature, "wall_time_s": 0.0}

    monkeypatch.setattr(studies, "run_training", trainer)
    kwargs = dict(method="kd", grid_file=setup / "grid.yaml", student="k17", teacher=setup / "teacher.safetensors", **FAST)
    for _ in range(2):  # the second call finds nothing to do: the failed point is not retried
        result = run_tune(tiny_dataset, setup / "tune", **kwargs)["tune_result"]
    assert result["counts"] == {"COMPLETE": 3, "FAIL": 1} and len(result["trials"]) == 4
    failed = next(t for t in result["trials"] if t["state"] == "FAIL")
    assert "NaN" in failed["error"] and failed["params"] == {"temperature": 2.0, "alpha": 0.5}
    assert result["best"]["params"] == {"temperature": 2.0, "alpha": 0.1} and result["best"]["val_accuracy"] == 20.1


def test_grid_in_cohorts_trains_every_point_once_as_run_by_run(tiny_dataset, setup, float64):
    """--cohort-size 2 on the 4-point grid: two cohorts of two trials, the same points and the same validation
    accuracies as the grid trained one trial at a time (in float64, where a cohort member is its single run on
    any CPU; in float32 the two differ by rounding, which training amplifies: docs/training.md, "Cohorts")."""
    kwargs = dict(method="kd", grid_file=setup / "grid.yaml", student="k17", teacher=setup / "teacher.safetensors", **FAST)
    by_one = run_tune(tiny_dataset, setup / "one", **kwargs)
    in_cohorts = run_tune(tiny_dataset, setup / "two", cohort_size=2, **kwargs)
    for study in (by_one, in_cohorts):
        assert study["tune_result"]["complete"] and study["tune_result"]["counts"] == {"COMPLETE": 4}
    sizes = [json.loads(p.read_text())["cohort_size"] for p in sorted((setup / "two" / "runs").glob("trial-*/summary.json"))]
    assert sizes == [2, 2, 2, 2]
    assert sorted(_trained(setup / "one")) == sorted(_trained(setup / "two"))

    def val(study):
        return {tuple(t["params"].values()): t["val_accuracy"] for t in study["tune_result"]["trials"]}

    assert val(by_one).keys() == val(in_cohorts).keys()
    for point, accuracy in val(by_one).items():
        assert val(in_cohorts)[point] == pytest.approx(accuracy, abs=1e-6)
