"""Packs and files read from elsewhere (issue 26): hostile packs built here with tarfile, unpack into a folder
that holds results, JSON files over the size cap, study run ids outside the study, model files too big to build.

Every case ends in one error line (IgkdError) and writes nothing outside --out (mostly nothing at all)."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch

from igkd.cli import main
from igkd.errors import IgkdError
from igkd.experiments import pack as pack_module
from igkd.experiments.pack import LISTING, PACK_LIMIT, pack, plain_name, unpack

STATE = {"format": "igkd-reproduce", "quick": True, "stages": {"teacher": {"wall_s": 1.0, "done": True, "result": {}}}}


def cli(argv: list, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err


def one_error(argv: list, capsys) -> str:
    """The command fails with exactly one ``error:`` line on stderr, no traceback, no 'Aborted.'; returns it."""
    status, _, err = cli(argv, capsys)
    assert status == 2, err
    assert "Traceback" not in err and "Aborted" not in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err.strip()


def member(name: str, data: bytes = b"", kind=tarfile.REGTYPE, mode: int = 0o644, **attrs) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size = kind, mode, len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def listing(files, **extra) -> tuple[tarfile.TarInfo, bytes]:
    return member(LISTING, json.dumps({"format": "igkd-reproduce-pack", "files": files, **extra}).encode())


def good_members(*more: tuple[tarfile.TarInfo, bytes], files=None) -> list:
    """A valid pack's members: pack.json, reproduce.json, teacher/summary.json (+ ``more``, listed unless ``files``)."""
    body = [member("reproduce.json", json.dumps(STATE).encode()), member("teacher/summary.json", b'{"test_accuracy": 50.0}'), *more]
    names = [info.name for info, _ in body if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE)] if files is None else files
    return [listing(names), *body]


def write_pack(path: Path, members, tar_format=tarfile.PAX_FORMAT) -> Path:
    with tarfile.open(path, "w:gz", format=tar_format) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.size else None)
    return path


def unpack_args(archive, out, *extra) -> list:
    return ["reproduce", "--dataset", "digits", "--quick", "--out", out, "--unpack", archive, *extra]


def tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


def repro_folder(root: Path, state: dict = STATE) -> Path:
    """A small reproduction folder as the stages leave it (no training: the files only)."""
    (root / "teacher").mkdir(parents=True)
    (root / "reproduce.json").write_text(json.dumps(state))
    (root / "teacher" / "summary.json").write_text('{"test_accuracy": 50.0, "epochs": 2}')
    (root / "teacher" / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    return root


# -- the pack and its listing ---------------------------------------------------------------------------


def test_a_valid_pack_restores_exactly_its_listed_files(tmp_path):
    archive = write_pack(tmp_path / "ok.tar.gz", good_members())
    result = unpack(archive, tmp_path / "out")
    assert tree(tmp_path / "out") == {"reproduce.json": json.dumps(STATE, indent=2).encode() + b"\n", "teacher/summary.json": b'{"test_accuracy": 50.0}'}
    assert result["restored"] == ["reproduce.json", "teacher/summary.json"] and result["kept"] == []


@pytest.mark.parametrize(
    "text, words",
    [
        (b"[]", "not an igkd reproduce pack listing"),
        (b"{}", "not an igkd reproduce pack listing"),
        (b'{"format": "igkd-reproduce-pack", "files": 5}', "no list of files"),
        (b'{"format": "igkd-reproduce-pack"}', "no list of files"),
        (b'{"format": "igkd-reproduce-pack", "files": [5]}', "not a plain file"),
        (b'{"format": "igkd-reproduce-pack", "files": ["../x"]}', "not a plain file"),
        (b'{"format": "igkd-reproduce-pack", "files": ["reproduce.json", "reproduce.json"]}', "twice"),
        (b'{"format": "igkd-repro', "not valid JSON"),
    ],
)
def test_a_pack_listing_that_is_not_a_listing_is_one_line(tmp_path, capsys, text, words):
    body = good_members()[1:]
    archive = write_pack(tmp_path / "p.tar.gz", [member(LISTING, text), *body])
    assert words in one_error(unpack_args(archive, tmp_path / "out"), capsys)
    assert tree(tmp_path / "out") == {}


def test_a_folder_named_pack_json_is_one_line(tmp_path, capsys):
    archive = write_pack(tmp_path / "p.tar.gz", [member(LISTING, kind=tarfile.DIRTYPE, mode=0o755), *good_members()[1:]])
    assert "its pack.json is a folder, not a file" in one_error(unpack_args(archive, tmp_path / "out"), capsys)


def test_a_pack_without_a_listing_or_a_state_is_refused(tmp_path):
    with pytest.raises(IgkdError, match="no pack.json"):
        unpack(write_pack(tmp_path / "a.tar.gz", good_members()[1:]), tmp_path / "a")
    with pytest.raises(IgkdError, match="holds no reproduce.json"):
        unpack(write_pack(tmp_path / "b.tar.gz", [listing(["x.json"]), member("x.json", b"{}")]), tmp_path / "b")
    assert tree(tmp_path / "a") == tree(tmp_path / "b") == {}


@pytest.mark.parametrize("state", [{"format": "igkd-reproduce", "stages": []}, [], {"format": "igkd-reproduce", "stages": {"teacher": 5}},
                                   {"format": "igkd-reproduce", "stages": {"nine": {}}}, {"format": "other", "stages": {}}])
def test_a_pack_whose_state_is_not_a_reproduction_is_refused(tmp_path, state):
    members = [member("reproduce.json", json.dumps(state).encode())]
    with pytest.raises(IgkdError, match="reproduce.json"):
        unpack(write_pack(tmp_path / "p.tar.gz", [listing(["reproduce.json"]), *members]), tmp_path / "out")
    assert tree(tmp_path / "out") == {}


@pytest.mark.parametrize("name, mode", [("notes.txt", 0o644), (".lock", 0o644), ("teacher/run.sh", 0o755), ("teacher/model.safetensors", 0o644)])
def test_a_member_the_listing_does_not_name_is_refused(tmp_path, name, mode):
    archive = write_pack(tmp_path / "p.tar.gz", good_members(member(name, b"#!/bin/sh\necho hi\n", mode=mode), files=["reproduce.json", "teacher/summary.json"]))
    with pytest.raises(IgkdError, match="does not list"):
        unpack(archive, tmp_path / "out")
    assert tree(tmp_path / "out") == {}


@pytest.mark.parametrize("twice", ["teacher/summary.json", "reproduce.json", LISTING])
def test_a_name_twice_is_refused(tmp_path, twice):
    members = good_members()
    members.append(next(m for m in members if m[0].name == twice))
    with pytest.raises(IgkdError, match="twice"):
        unpack(write_pack(tmp_path / "p.tar.gz", members), tmp_path / "out")
    assert tree(tmp_path / "out") == {}


def test_a_listed_file_the_pack_does_not_hold_is_refused(tmp_path):
    archive = write_pack(tmp_path / "p.tar.gz", good_members(files=["reproduce.json", "teacher/summary.json", "teacher/model.safetensors"]))
    with pytest.raises(IgkdError, match="lists 'teacher/model.safetensors' but does not hold it"):
        unpack(archive, tmp_path / "out")


@pytest.mark.parametrize(
    "odd, words",
    [
        (member("link", kind=tarfile.SYMTYPE, linkname="/etc/passwd"), "a link"),
        (member("hard", kind=tarfile.LNKTYPE, linkname="reproduce.json"), "a hard link"),
        (member("dev", kind=tarfile.CHRTYPE, devmajor=1, devminor=3), "a device"),
        (member("blk", kind=tarfile.BLKTYPE, devmajor=8, devminor=0), "a device"),
        (member("fifo", kind=tarfile.FIFOTYPE), "a pipe"),
        (member("elsewhere", kind=tarfile.DIRTYPE, mode=0o755), "holds no file of the pack"),
    ],
)
def test_links_devices_and_stray_folders_are_refused(tmp_path, odd, words):
    with pytest.raises(IgkdError, match=words):
        unpack(write_pack(tmp_path / "p.tar.gz", good_members(odd)), tmp_path / "out")
    assert tree(tmp_path / "out") == {} and not (tmp_path / "out" / "link").is_symlink()


def test_a_folder_that_holds_a_listed_file_is_allowed(tmp_path):
    archive = write_pack(tmp_path / "p.tar.gz", good_members(member("teacher", kind=tarfile.DIRTYPE, mode=0o777)))
    unpack(archive, tmp_path / "out")
    assert (tmp_path / "out" / "teacher" / "summary.json").is_file()


def test_a_sparse_member_is_refused(tmp_path):
    sparse = member("teacher/sparse.json", b"{}", kind=tarfile.GNUTYPE_SPARSE)
    archive = write_pack(tmp_path / "p.tar.gz", good_members(sparse), tar_format=tarfile.GNU_FORMAT)
    with pytest.raises(IgkdError, match="a sparse file"):
        unpack(archive, tmp_path / "out")


@pytest.mark.parametrize("name", ["../escape.txt", "/tmp/absolute.txt", "teacher/../../escape.txt", "a\\b.txt", "./x.txt", "a//b.txt", "bell\x07.txt"])
def test_names_outside_the_folder_or_not_plain_are_refused(tmp_path, name):
    with pytest.raises(IgkdError, match="not a plain file inside the folder"):
        unpack(write_pack(tmp_path / "p.tar.gz", good_members(member(name, b"x"))), tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists() and tree(tmp_path / "out") == {}


def test_plain_names():
    assert plain_name("ablation/runs/kd_ig-s0/summary.json") and plain_name("reproduce.json")
    for bad in ("", "/a", "a/../b", "..", ".", "a//b", "a/", "a\\b", "a\x00b", 5, None, ["a"]):
        assert not plain_name(bad), bad


def test_a_pack_over_the_size_limit_is_refused_from_its_headers(tmp_path, monkeypatch):
    read = []
    real = pack_module._read_through
    monkeypatch.setattr(pack_module, "_read_through", lambda tar, m, keep: read.append(m.name) or real(tar, m, keep))
    big = member("teacher/model.safetensors", bytes(PACK_LIMIT + 8 * 2**20 + 1))  # zeros: a small .tar.gz
    archive = write_pack(tmp_path / "p.tar.gz", good_members(big))
    assert archive.stat().st_size < 2**20
    with pytest.raises(IgkdError, match="more than any pack 'igkd reproduce --pack' writes"):
        unpack(archive, tmp_path / "out")
    assert "teacher/model.safetensors" not in read and tree(tmp_path / "out") == {}


def test_a_tar_stream_longer_than_any_pack_is_refused(tmp_path, monkeypatch):
    archive = write_pack(tmp_path / "p.tar.gz", good_members(*(member(f"teacher/f{i}.json", b"{}") for i in range(40))))
    monkeypatch.setattr(pack_module, "STREAM_LIMIT", 16 * 1024)  # the 43 members' headers alone are more
    with pytest.raises(IgkdError, match="unpacks to more than"):
        unpack(archive, tmp_path / "out")
    assert tree(tmp_path / "out") == {}


def test_a_json_member_over_the_cap_is_refused(tmp_path):
    archive = write_pack(tmp_path / "p.tar.gz", [listing(["reproduce.json"]), member("reproduce.json", b" " * (8 * 2**20 + 1))])
    with pytest.raises(IgkdError, match="reproduce.json is over 8 MiB"):
        unpack(archive, tmp_path / "out")


@pytest.mark.parametrize("cut", [0.5, 0.9, -8])
def test_a_truncated_or_foreign_pack_is_one_line(tmp_path, capsys, cut):
    archive = write_pack(tmp_path / "p.tar.gz", good_members(member("teacher/metrics.jsonl", os.urandom(200_000))))
    data = archive.read_bytes()
    archive.write_bytes(data[: int(len(data) * cut) if cut > 0 else cut])
    assert "is not a readable pack" in one_error(unpack_args(archive, tmp_path / "out"), capsys)
    assert tree(tmp_path / "out") == {}
    archive.write_bytes(b"PK\x03\x04 a zip, not a pack")
    assert "is not a readable pack" in one_error(unpack_args(archive, tmp_path / "out2"), capsys)


def test_files_are_written_by_igkd_itself_without_exec_bits(tmp_path, monkeypatch):
    def no_extraction(*args, **kwargs):  # Python 3.10.0-3.10.11 / 3.11.0-3.11.3 lack extractall(filter=); nothing here needs it
        raise AssertionError("unpack must not call tarfile's extraction")

    monkeypatch.setattr(tarfile.TarFile, "extractall", no_extraction)
    monkeypatch.setattr(tarfile.TarFile, "extract", no_extraction)
    exe = member("teacher/metrics.jsonl", b'{"epoch": 1}\n', mode=0o4777)
    unpack(write_pack(tmp_path / "p.tar.gz", good_members(exe)), tmp_path / "out")
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o7111 == 0, path


# -- unpack into a folder that holds results -------------------------------------------------------------


def test_unpack_refuses_a_folder_that_holds_files_unless_forced(tmp_path, capsys):
    archive = tmp_path / "a.tar.gz"
    pack(repro_folder(tmp_path / "a"), archive)
    other = repro_folder(tmp_path / "b", {**STATE, "stages": {"teacher": {"wall_s": 1.0, "done": True}, "ig": {"wall_s": 5.0, "done": True}}})
    before = tree(other)
    line = one_error(unpack_args(archive, other), capsys)
    assert "already holds a reproduction" in line and "--force" in line and tree(other) == before
    stray = tmp_path / "c"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    assert "already holds files" in one_error(unpack_args(archive, stray), capsys)
    assert "--force goes with --unpack" in one_error(["reproduce", "--dataset", "digits", "--quick", "--out", stray, "--force"], capsys)


def test_unpack_force_never_moves_what_is_done_here_back(tmp_path, capsys):
    """An older pack over a folder that got further: stages done stay done, finished runs and runs that got as
    far here are kept whole; what the pack has further (a stage, a run) comes in, and the report is made again."""
    done = {"wall_s": 1.0, "done": True}
    older = repro_folder(tmp_path / "older", {**STATE, "stages": {"teacher": done, "ig": done, "ablation": {"wall_s": 3.0}}})
    runs = older / "montecarlo" / "runs"
    for run, epochs, finished in (("a", 1, False), ("b", 4, False), ("c", 2, True)):
        (runs / run).mkdir(parents=True)
        (runs / run / "metrics.jsonl").write_text("".join(f'{{"epoch": {e}}}\n' for e in range(1, epochs + 1)))
        (runs / run / "checkpoint.pt").write_bytes(b"older checkpoint")
        if finished:
            (runs / run / "summary.json").write_text('{"test_accuracy": 40.0}')
    (older / "ablation").mkdir()
    (older / "ablation" / "study.json").write_text('{"older": true}')
    archive = tmp_path / "older.tar.gz"
    pack(older, archive)

    here = repro_folder(tmp_path / "here", {**STATE, "stages": {"teacher": done, "ablation": done, "report": done}})
    (here / "teacher" / "summary.json").write_text('{"test_accuracy": 60.0, "epochs": 2}')
    (here / "ablation").mkdir()
    (here / "ablation" / "study.json").write_text('{"here": true}')
    runs = here / "montecarlo" / "runs"
    for run, epochs, finished in (("a", 3, False), ("b", 2, False), ("c", 5, False), ("d", 2, True)):
        (runs / run).mkdir(parents=True)
        (runs / run / "metrics.jsonl").write_text("".join(f'{{"epoch": {e}}}\n' for e in range(1, epochs + 1)))
        (runs / run / "checkpoint.pt").write_bytes(b"checkpoint here")
        if finished:
            (runs / run / "summary.json").write_text('{"test_accuracy": 70.0}')
    before = tree(here)
    status, stdout, err = cli(unpack_args(archive, here, "--force"), capsys)
    assert status == 0, err
    after = tree(here)
    state = json.loads(after["reproduce.json"])["stages"]
    assert state["teacher"]["done"] and state["ablation"]["done"] and state["ig"]["done"]  # nothing done here undone; ig from the pack
    assert state["ablation"] == done and state["report"]["done"] is False  # the report is made again from both
    for kept in ("teacher/summary.json", "ablation/study.json", "montecarlo/runs/a/metrics.jsonl", "montecarlo/runs/a/checkpoint.pt",
                 "montecarlo/runs/d/summary.json"):
        assert after[kept] == before[kept], kept
    # further in the pack: run b (4 epochs against 2 here) and run c (finished there) come in
    assert after["montecarlo/runs/b/metrics.jsonl"].count(b"\n") == 4 and after["montecarlo/runs/b/checkpoint.pt"] == b"older checkpoint"
    assert after["montecarlo/runs/c/summary.json"] == b'{"test_accuracy": 40.0}'
    assert "kept" in stdout


def test_unpack_force_refuses_the_other_mode(tmp_path):
    archive = tmp_path / "p.tar.gz"
    pack(repro_folder(tmp_path / "quick"), archive)
    full = repro_folder(tmp_path / "full", {**STATE, "quick": False})
    with pytest.raises(IgkdError, match="the other kind"):
        unpack(archive, full, force=True)


def test_unpack_never_writes_through_a_link_in_the_folder(tmp_path):
    archive = tmp_path / "p.tar.gz"
    pack(repro_folder(tmp_path / "src", {**STATE, "stages": {}}), archive)
    outside = tmp_path / "outside"
    outside.mkdir()
    here = tmp_path / "here"
    here.mkdir()
    (here / "teacher").symlink_to(outside, target_is_directory=True)
    with pytest.raises(IgkdError, match="is a link or a file"):
        unpack(archive, here, force=True)
    assert list(outside.iterdir()) == []


def test_pack_leaves_out_links_and_writes_its_listing_first(tmp_path):
    folder = repro_folder(tmp_path / "src")
    secret = tmp_path / "secret.json"
    secret.write_text('{"secret": 1}')
    (folder / "teacher" / "linked.json").symlink_to(secret)
    (folder / "teacher" / "run.json").write_text("{}")
    (folder / "teacher" / "run.json").chmod(0o755)
    listing_ = pack(folder, tmp_path / "p.tar.gz")
    assert "teacher/linked.json" not in listing_["files"] and "teacher/run.json" in listing_["files"]
    with tarfile.open(tmp_path / "p.tar.gz") as tar:
        members = tar.getmembers()
    assert members[0].name == LISTING and all(m.isreg() and m.mode == 0o644 for m in members)
    unpack(tmp_path / "p.tar.gz", tmp_path / "dst")
    assert not (tmp_path / "dst" / "teacher" / "linked.json").exists()


# -- reproduce.json, config.json, JSON size cap ----------------------------------------------------------


@pytest.mark.parametrize("text", ['{"format": "igkd-reproduce", "stages": []}', "[]", '{"stages": {"ig": []}}', '{"stages": {"ig": {"done": "yes"}}}',
                                  '{"stages": {}, "quick": "no"}', '{"stages": {"teacher": {"wall_s": "1"}}}', "{not json"])
def test_a_damaged_reproduce_json_is_one_line(tmp_path, capsys, text):
    out = tmp_path / "repro"
    out.mkdir()
    (out / "reproduce.json").write_text(text)
    line = one_error(["reproduce", "--dataset", "digits", "--quick", "--device", "cpu", "--out", out], capsys)
    assert "reproduce.json" in line and "remove it" in line


def test_a_run_config_that_is_a_list_is_one_line_on_resume(tmp_path, tiny_dataset):
    from igkd.distill import resolve_config, run_training

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("[1, 2]")
    config = resolve_config("student", "paper", student="k17", epochs=1, batch_size=16, width=0.25, device="cpu")
    with pytest.raises(IgkdError, match="config.json holds a JSON list, not a run config"):
        run_training(config, tiny_dataset, out, resume=True, progress=False)


def test_json_files_over_the_cap_are_one_line_naming_them(tmp_path):
    from igkd.atomic import MAX_JSON_BYTES, read_json_object
    from igkd.distill.run_folder import read_summary
    from igkd.experiments.study_folder import read_study_file

    big = tmp_path / "summary.json"
    big.write_text('{"test_accuracy": 1, "pad": "' + "x" * MAX_JSON_BYTES + '"}')
    for read in (read_json_object, read_summary, read_study_file):
        with pytest.raises(IgkdError, match=f"{big} is over 8 MiB"):
            read(big)
    big.write_text('{"test_accuracy": 1, "pad": "' + "x" * (MAX_JSON_BYTES - 64) + '"}')
    assert read_json_object(big)["test_accuracy"] == 1  # at the cap: read


# -- study run ids -------------------------------------------------------------------------------------------


@pytest.fixture
def study(tmp_path, monkeypatch):
    """A finished 2-method x 2-seed ablation, trained by a stand-in (no real training)."""
    from conftest import as_cohort_trainer, make_tiny_dataset

    from igkd.distill import executor
    from igkd.experiments import studies
    from igkd.models import build_model, save_model

    def trainer(config, dataset, out_dir, **kwargs):
        out_dir.mkdir(parents=True, exist_ok=True)
        summary = {"method": config.method, "seed": config.seed, "test_accuracy": 50.0 + config.seed, "val_accuracy": 50.0}
        (out_dir / "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(executor, "_train", as_cohort_trainer(trainer))
    out, teacher = tmp_path / "study", tmp_path / "teacher.safetensors"
    save_model(teacher, build_model("teacher", width=0.25, num_classes=4))
    studies.run_ablation(make_tiny_dataset(), out, methods="student,kd", seeds=2, student="k17", epochs=1, device="cpu", progress=False, teacher=teacher)
    return out


@pytest.mark.parametrize("run_id", ["../../elsewhere", "/abs/run", "a/b", "..", ".", "", "a\\b", 7, None])
def test_a_study_run_id_outside_its_folder_is_one_line(study, tmp_path, capsys, run_id):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "summary.json").write_text('{"test_accuracy": 99.0}')
    data = json.loads((study / "study.json").read_text())
    data["plan"][0]["run_id"] = run_id
    (study / "study.json").write_text(json.dumps(data))
    for argv in (["stats", "--study", study], ["report", study, "--out", tmp_path / "report"]):
        line = one_error(argv, capsys)
        assert "is not one folder name under runs/" in line, line
    assert not (tmp_path / "report" / "report.md").exists()


def test_plain_study_run_ids_are_read(study, capsys):
    status, out, err = cli(["stats", "--study", study], capsys)
    assert status == 0, err


# -- model files ---------------------------------------------------------------------------------------------


def safetensors_file(path: Path, spec: dict, state: dict | None = None) -> Path:
    from safetensors.torch import save_file

    from igkd.models import build_model

    state = state if state is not None else {k: v.contiguous() for k, v in build_model("k17", width=0.25, num_classes=4).state_dict().items()}
    save_file(state, str(path), metadata={"igkd_spec": json.dumps(spec), "igkd_meta": "{}"})
    return path


@pytest.mark.parametrize(
    "change, words",
    [
        ({"width": 1000.0}, "'width' is 1000.0"),
        ({"width": float("nan")}, "'width'"),
        ({"num_classes": 10**9}, "'num_classes' is 1000000000"),
        ({"num_classes": 0}, "'num_classes'"),
        ({"k": 99}, "'k' is 99"),
        ({"keep": 40}, "'keep' is 40"),
        ({"name": "k3"}, "'name'"),
        ({"std": [1.0, 0.0, 1.0]}, "'std'"),
        ({"arch": "resnet"}, "unknown architecture"),
    ],
)
def test_a_model_spec_out_of_bounds_is_refused_before_any_model_is_built(tmp_path, monkeypatch, change, words):
    from igkd.models import checkpoint, model_spec

    built = []
    monkeypatch.setattr(checkpoint, "build_model", lambda spec: built.append(spec))
    path = safetensors_file(tmp_path / "m.safetensors", {**model_spec("k17", width=0.25, num_classes=4), **change})
    with pytest.raises(IgkdError, match=words):
        checkpoint.load_model(path)
    assert built == []


def test_tensor_shapes_are_checked_on_the_meta_device_before_memory_is_allocated(tmp_path, monkeypatch):
    from igkd.models import checkpoint, model_spec

    devices = []
    real = checkpoint.build_model
    monkeypatch.setattr(checkpoint, "build_model", lambda spec: devices.append(next(real(spec).parameters()).device.type) or real(spec))
    state = {"classifier.1.weight": torch.zeros(4, 8)}
    path = safetensors_file(tmp_path / "m.safetensors", model_spec("k17", width=0.25, num_classes=4), state)
    with pytest.raises(IgkdError, match="does not match the k17 architecture"):
        checkpoint.load_model(path)
    assert devices == ["meta"]  # only the meta model was built


def test_running_out_of_memory_while_loading_a_model_is_one_line(tmp_path, monkeypatch):
    from igkd.models import checkpoint, model_spec

    path = safetensors_file(tmp_path / "m.safetensors", model_spec("k17", width=0.25, num_classes=4))
    assert checkpoint.load_model(path)[1]["spec"]["name"] == "k17"

    def no_memory(self, *args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 99999999999 bytes")

    monkeypatch.setattr(torch.nn.Module, "load_state_dict", no_memory)
    with pytest.raises(IgkdError, match="out of memory for a k17 model of width 0.25 and 4 classes"):
        checkpoint.load_model(path)
