"""igkd reproduce --quick on digits: every stage end to end, a stop by --budget, a resume that finishes
the rest, and a pack -> unpack round trip that continues on "another machine" (another folder)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest

from igkd.cli import main
from igkd.errors import IgkdError
from igkd.experiments.pack import pack, unpack
from igkd.experiments.reproduce import STAGES, Budget, BudgetSpent, parse_budget, parse_stages


def run(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code or 0


def quick(out, *extra):
    return ["reproduce", "--dataset", "digits", "--quick", "--device", "cpu", "--out", str(out), *extra]


def state(out) -> dict:
    return json.loads((out / "reproduce.json").read_text())


def test_quick_reproduction_stops_by_budget_resumes_elsewhere_and_packs(tmp_path, capsys, monkeypatch):
    first = tmp_path / "job1"
    checks = []

    def spent_after_first_epoch(self, stage, needed):  # wall time is not deterministic; the budget's verdict is
        checks.append((stage, needed))
        raise BudgetSpent(stage)

    monkeypatch.setattr(Budget, "check", spent_after_first_epoch)
    assert run(quick(first, "--budget", "1h")) == 3  # a budget spent is a clean, resumable stop (exit 3)
    monkeypatch.undo()
    assert checks[0][0] == "teacher" and checks[0][1] > 1.0  # asked at the end of epoch 1: 1.3 x its time + 1 s
    err = capsys.readouterr().err
    assert "stopped at stage 1 (teacher)" in err and "resume with the same command" in err
    assert (first / "teacher" / "checkpoint.pt").exists() and not (first / "teacher" / "summary.json").exists()
    assert state(first)["stopped_at"] == {"stage": 1, "name": "teacher"}

    # the GPU job ends: pack what is small, unpack it on the next machine and continue there
    archive = tmp_path / "pack1.tar.gz"
    assert run(quick(first, "--pack", str(archive))) == 0
    second = tmp_path / "job2"
    assert run(quick(second, "--unpack", str(archive))) == 0
    assert (second / "teacher" / "checkpoint.pt").exists()
    results = tmp_path / "results"
    assert run(quick(second, "--results", str(results))) == 0
    finished = state(second)
    assert all(finished["stages"][name]["done"] for name in STAGES) and finished["stopped_at"] is None
    epochs = [json.loads(line)["epoch"] for line in (second / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]  # epoch 1 from the first job, epoch 2 here: resumed, not retrained
    for study, runs in (("ablation", 8), ("montecarlo", 4), ("sweep", 2)):
        assert len(list((second / study / "runs").glob("*/summary.json"))) == runs
    table = (second / "paper-vs-ours.md").read_text()
    assert "| kd_ig | 92.45 |" in table and "| kd_ig | 92.02 | 0.34 |" in table
    assert (second / "report" / "report.md").exists() and (second / "latency.json").exists()
    assert (results / "paper-vs-ours.md").exists() and (results / "report" / "report.md").exists()

    # a finished reproduction packs under the limit, with the teacher and one student per method
    archive2 = tmp_path / "pack2.tar.gz"
    listing = pack(second, archive2)
    assert archive2.stat().st_size < 16 * 2**20 and "teacher/model.safetensors" in listing["files"]
    assert not any(name.endswith("maps.npy") for name in listing["files"])  # IG maps are rebuilt, not packed
    students = [name for name in listing["files"] if name.endswith("model.safetensors") and "/runs/" in name]
    assert len(students) == 8
    third = tmp_path / "job3"
    unpack(archive2, third)
    capsys.readouterr()
    assert run(quick(third)) == 0  # nothing left: every stage is done, and no IG maps are needed any more
    err = capsys.readouterr().err
    assert err.count("done earlier, skipped") == len(STAGES)


@pytest.mark.slow
def test_a_pack_made_after_any_stage_continues_on_another_machine(tmp_path, capsys, monkeypatch):
    """One folder runs stage by stage (--stages 1-N) and is packed after each, and once while stage 2 (IG) is
    stopped half-way by --budget; every pack is unpacked into a new folder, with the first folder gone, and
    the same command finishes there (issue 26, item 2)."""
    source, packs = tmp_path / "source", {}
    for n in range(1, len(STAGES) + 1):
        if n == 2:  # stopped by the budget after the first chunk of IG maps
            def spent_in_ig(self, stage, needed):
                if stage == "ig":
                    raise BudgetSpent(stage)

            monkeypatch.setattr(Budget, "check", spent_in_ig)
            assert run(quick(source, "--stages", "1-2", "--budget", "1h")) == 3
            monkeypatch.undo()
            assert (source / "ig" / "progress.json").exists() and not (source / "ig" / "manifest.json").exists()
            packs["during 2"] = tmp_path / "during-2.tar.gz"
            assert run(quick(source, "--pack", str(packs["during 2"]))) == 0
        assert run(quick(source, "--stages", f"1-{n}")) == 0
        packs[n] = tmp_path / f"after-{n}.tar.gz"
        assert run(quick(source, "--pack", str(packs[n]))) == 0
    shutil.rmtree(source)  # another machine: nothing of the first folder is left
    for n, archive in packs.items():
        elsewhere = tmp_path / f"job-{n}".replace(" ", "-")
        assert run(quick(elsewhere, "--unpack", str(archive))) == 0
        capsys.readouterr()
        assert run(quick(elsewhere)) == 0, n
        err = capsys.readouterr().err
        finished = state(elsewhere)
        assert all(finished["stages"][name]["done"] for name in STAGES) and finished["stopped_at"] is None
        done = 1 if n == "during 2" else n
        maps_needed = 2 <= done <= 4  # finished IG maps are rebuilt only where a later stage still trains with them
        skipped = [name for name in STAGES[:done] if not (name == "ig" and maps_needed)]
        assert [line.split()[2].rstrip(":") for line in err.splitlines() if "done earlier, skipped" in line] == skipped, err
        assert (elsewhere / "ig" / "maps.npy").exists() == (done <= 4)
        epochs = [json.loads(line)["epoch"] for line in (elsewhere / "teacher" / "metrics.jsonl").read_text().splitlines()]
        assert epochs == [1, 2]  # the teacher was trained once, by the first job
        for study, runs in (("ablation", 8), ("montecarlo", 4), ("sweep", 2)):
            assert len(list((elsewhere / study / "runs").glob("*/summary.json"))) == runs
        assert (elsewhere / "report" / "report.md").exists() and (elsewhere / "paper-vs-ours.md").exists()


def test_unpack_refuses_paths_outside_the_folder(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in (("pack.json", b"{}"), ("../escape.txt", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(IgkdError, match="not a plain file inside the folder"):
        unpack(archive, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_budget_check_stops_when_the_next_unit_does_not_fit():
    budget = Budget(100.0)
    budget.check("ablation", 50.0)
    with pytest.raises(BudgetSpent):
        budget.check("ablation", 150.0)
    assert Budget(None).left() == float("inf")


def test_budget_and_stage_parsing():
    assert parse_budget("25m") == 1500 and parse_budget("90s") == 90 and parse_budget("1.5h") == 5400 and parse_budget("30") == 30
    assert parse_stages("1-3") == ["teacher", "ig", "ablation"] and parse_stages("report,teacher") == ["teacher", "report"]
    for bad in ("soon", "-5m"):
        with pytest.raises(IgkdError):
            parse_budget(bad)
    with pytest.raises(IgkdError, match="unknown stage"):
        parse_stages("9")


@pytest.mark.slow
def test_cpu_profile_quick_trains_the_teacher_on_all_and_the_students_on_their_subset(tmp_path, capsys):
    """--profile cpu, tiny: the teacher sees every training image, the students and the IG maps the first N
    per class, five methods x 2 paired seeds, bf16 chosen by timing and recorded, and the report says
    what the profile changes; another profile on the same folder is refused."""
    from igkd.devices import CPU_BF16
    from igkd.experiments.studies import load_study

    out = tmp_path / "cpu"
    assert run(quick(out, "--profile", "cpu")) == 0
    done = state(out)
    assert done["profile"] == "cpu" and all(done["stages"][name]["done"] for name in STAGES)
    assert done["stages"]["montecarlo"]["result"] == {"skipped": "not part of the cpu profile"}
    session = done["sessions"][-1]
    assert session["machine"]["threads"] >= 1 and session["wall_s"] > 0 and "cpu_capability" in session["machine"]
    teacher = json.loads((out / "teacher" / "summary.json").read_text())
    assert teacher["train_size"] == done["data"]["train"] == 240 and teacher["val_size"] == 0  # all 24 per class
    assert json.loads((out / "ig" / "manifest.json").read_text())["n"] == 120  # the students' 12 per class
    finished = [r for r in load_study(out / "ablation")["runs"] if r["status"] == "finished"]
    assert sorted({r["method"] for r in finished}) == ["ig", "kd", "kd_ig", "kd_shuffled", "student"] and len(finished) == 10
    summary = finished[0]["summary"]
    assert summary["train_size"] == 120 and summary["config"]["recipe"] == "improved"
    precision = json.loads((out / "precision.json").read_text())
    assert precision["cpu_bf16"] in CPU_BF16 and summary["config"]["cpu_bf16"] == precision["cpu_bf16"]
    assert precision["teacher_test"]["images"] == done["data"]["test"]
    tables = (out / "paper-vs-ours.md").read_text()
    assert "What the cpu profile changes" in tables and "kd_shuffled (not in the paper)" in tables
    assert "In words:" in (out / "report" / "report.md").read_text()
    capsys.readouterr()
    assert run(quick(out)) != 0  # the paper profile on the cpu profile's folder
    assert "holds a reproduction of --profile cpu" in capsys.readouterr().err
    # --seeds 3 grows the finished ablation by seed 2 (the 10 runs done are kept, not trained again) and the report follows
    before = {r["run_id"]: r["summary"]["test_accuracy"] for r in finished}
    assert run(quick(out, "--profile", "cpu", "--seeds", "3")) == 0
    grown = [r for r in load_study(out / "ablation")["runs"] if r["status"] == "finished"]
    assert len(grown) == 15 and all(r["summary"]["test_accuracy"] == before[r["run_id"]] for r in grown if r["run_id"] in before)
    assert state(out)["stages"]["ablation"]["result"] == {"runs_finished": 15, "runs_planned": 15}
    assert "x 3 paired seeds" in (out / "paper-vs-ours.md").read_text()
    assert run(quick(out, "--profile", "cpu")) == 0 and "stage 3 ablation: done earlier" in capsys.readouterr().err  # 3 seeds stay
