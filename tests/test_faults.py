"""What igkd does when things go wrong (docs/faults.md): each bad input or failure through the CLI gives
one ``error:`` line (no traceback), a non-zero exit, no damaged file, and a resumable state."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from igkd.cli import main
from igkd.distill import executor
from igkd.errors import IgkdError
from igkd.models import build_model, save_model

CLASSES = 4


def write_folder(root: Path, seed: int = 0) -> Path:
    """train/c<k>/*.png (8 per class) and test/c<k>/*.png (2 per class), 16x16."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", 8), ("test", 2)):
        for c in range(CLASSES):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
                r, q = divmod(c, 2)
                pixels[r * 8 : (r + 1) * 8, q * 8 : (q + 1) * 8] += 150
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.png")
    return root


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    code = exit_info.value.code
    return (0 if code is None else code), out, err


def one_error(argv: list[str], capsys, code: int = 2) -> str:
    """The command fails with exactly one ``error:`` line on stderr and no traceback; returns that line."""
    status, _, err = cli(argv, capsys)
    assert status == code, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.strip() == errors[0], err
    return errors[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny image folder, a teacher file and its IG cache (shared by the tests of this module; copy before damaging)."""
    root = tmp_path_factory.mktemp("faults")
    folder = write_folder(root / "data")
    torch.manual_seed(0)
    teacher = root / "teacher.safetensors"
    save_model(teacher, build_model("teacher", width=0.25, num_classes=CLASSES))
    cache = root / "ig"
    with pytest.raises(SystemExit) as exit_info:
        main(["attributions", "compute", "--teacher", str(teacher), "--dataset", "folder", "--data-dir", str(folder),
              "--out", str(cache), "--steps", "2", "--device", "cpu", "--json"])
    assert exit_info.value.code in (0, None)
    return {"data": folder, "teacher": teacher, "cache": cache}


def distill_args(world, out: Path, *extra) -> list:
    return ["distill", "--method", "student", "--dataset", "folder", "--data-dir", world["data"], "--out", out,
            "--student", "k17", "--width", "0.25", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--json", *extra]


def copy_cache(world, dest: Path) -> Path:
    dest.mkdir()
    for name in ("maps.npy", "manifest.json"):
        (dest / name).write_bytes((world["cache"] / name).read_bytes())
    return dest


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# -- item 4: a damaged IG cache --------------------------------------------------------------------


def test_a_damaged_ig_cache_is_refused_before_training(world, tmp_path, capsys):
    cache = copy_cache(world, tmp_path / "ig")
    maps = cache / "maps.npy"
    data = bytearray(maps.read_bytes())
    data[-10:] = b"\xff" * 10  # flipped bytes in the last map (NaN patterns in float16)
    maps.write_bytes(bytes(data))
    ig = ["--method", "ig", "--teacher", world["teacher"], "--attributions", cache]
    line = one_error(distill_args(world, tmp_path / "run", *ig), capsys)
    assert str(maps) in line and "sha256" in line and "--force" in line
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_nan_maps_with_a_matching_checksum_are_refused(world, tmp_path, capsys):
    from igkd.provenance import sha256_file

    cache = copy_cache(world, tmp_path / "ig")
    maps = np.load(cache / "maps.npy")
    maps[3] = np.nan
    np.save(cache / "maps.npy", maps)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["maps_sha256"] = sha256_file(cache / "maps.npy")
    (cache / "manifest.json").write_text(json.dumps(manifest))
    ig = ["--method", "ig", "--teacher", world["teacher"], "--attributions", cache]
    line = one_error(distill_args(world, tmp_path / "run", *ig), capsys)
    assert "NaN/inf values in 1 of 32 maps" in line and "--force" in line and "lower --lr" not in line


# -- item 5: a corrupt summary.json ----------------------------------------------------------------


def test_a_run_with_a_corrupt_summary_is_finished_again_on_resume(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(distill_args(world, out), capsys)[0] == 0
    good = json.loads((out / "summary.json").read_text())
    model = (out / "model.safetensors").read_bytes()
    (out / "summary.json").write_text('{"method": "stud')  # cut short
    status, stdout, _ = cli(distill_args(world, out, "--resume"), capsys)
    assert status == 0
    again = json.loads((out / "summary.json").read_text())
    assert json.loads(stdout)["test_accuracy"] == again["test_accuracy"] == good["test_accuracy"]
    assert (out / "model.safetensors").read_bytes() == model


def test_a_study_retrains_a_run_whose_summary_is_unreadable(tmp_path, monkeypatch):
    from conftest import as_cohort_trainer, make_tiny_dataset

    from igkd.experiments import studies

    calls = []

    def trainer(config, dataset, out_dir, **kwargs):
        calls.append(out_dir.name)
        out_dir.mkdir(parents=True, exist_ok=True)
        summary = {"method": config.method, "seed": config.seed, "test_accuracy": 50.0, "val_accuracy": 50.0}
        (out_dir / "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(executor, "_train", as_cohort_trainer(trainer))
    data, out = make_tiny_dataset(), tmp_path / "s"
    args = dict(methods="student", seeds=2, student="k17", epochs=1, device="cpu", progress=False)
    studies.run_ablation(data, out, **args)
    (out / "runs" / "student-s1" / "summary.json").write_text("{not json")
    (out / ".results.csv.x1y2.tmp").write_text("half a write")  # item 8: a write killed mid-way
    calls.clear()
    study = studies.run_ablation(data, out, **args)
    assert calls == ["student-s1"]
    assert [r["status"] for r in study["runs"]] == ["finished", "finished"]
    assert len((out / "results.csv").read_text().splitlines()) == 3
    assert not list(out.glob(".*.tmp"))


# -- item 6: operating-system errors and wrong types -------------------------------------------------


def test_an_output_path_that_is_a_file_is_one_error_line(world, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    line = one_error(distill_args(world, taken), capsys)
    assert str(taken) in line and "--out" in line
    assert taken.read_text() == "keep me"
    line = one_error(distill_args(world, taken / "run"), capsys)
    assert str(taken) in line and "not a folder" in line


def test_a_read_only_folder_is_one_error_line(world, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() != 0:
        locked.chmod(0o500)
    else:  # root writes through chmod: refuse the writes the way a read-only folder does
        import igkd.atomic

        real = igkd.atomic.tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if Path(dir).resolve() == (locked / "run").resolve():
                raise PermissionError(errno.EACCES, "Permission denied", str(dir))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(igkd.atomic.tempfile, "mkstemp", mkstemp)
    try:
        line = one_error(distill_args(world, locked / "run"), capsys)
    finally:
        locked.chmod(0o700)
    assert str(locked) in line and "Permission denied" in line and "writable --out" in line


def test_disk_full_keeps_the_last_checkpoint_and_the_run_resumes_identically(world, tmp_path, capsys, monkeypatch):
    import igkd.atomic

    reference = tmp_path / "reference"
    assert cli(distill_args(world, reference, "--epochs", "2"), capsys)[0] == 0

    out = tmp_path / "run"
    real_fsync, writes = os.fsync, []

    def fsync(fd):
        writes.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else fd)
        if sum(".checkpoint.pt." in str(w) for w in writes) == 2:  # the epoch-2 checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(igkd.atomic.os, "fsync", fsync)
    line = one_error(distill_args(world, out, "--epochs", "2"), capsys)
    assert line.startswith(f"error: disk full while writing {out / 'checkpoint.pt'}") and "re-run" in line
    assert not list(out.glob(".*.tmp"))  # the failed write left nothing behind
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1  # the last good checkpoint is intact

    monkeypatch.setattr(igkd.atomic.os, "fsync", real_fsync)
    assert cli(distill_args(world, out, "--epochs", "2", "--resume"), capsys)[0] == 0
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_a_truncated_checkpoint_on_resume_is_one_error_line(world, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    line = one_error(distill_args(world, out, "--resume"), capsys)
    assert str(out / "checkpoint.pt") in line and "truncated" in line
    assert (out / "checkpoint.pt").read_bytes() == b"PK\x03\x04 truncated"


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo igkd-should-never-run-this",))


def test_a_checkpoint_holding_code_is_refused_in_our_words(world, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"model": _Payload()}, out / "checkpoint.pt")
    line = one_error(distill_args(world, out, "--resume"), capsys)
    assert str(out / "checkpoint.pt") in line and "holds code or Python objects that igkd will not load" in line
    assert "if you trust the file" in line and "Weights only load failed" not in line
    model_file = tmp_path / "model.pt"
    with open(model_file, "wb") as handle:
        pickle.dump(_Payload(), handle, protocol=2)
    line = one_error(["evaluate", "--checkpoint", model_file, "--dataset", "folder", "--data-dir", world["data"]], capsys)
    assert str(model_file) in line and "will not load" in line


@pytest.mark.parametrize(
    "text, key",
    [("epochs: abc\n", "epochs = 'abc'"), ("epochs: 1.5\n", "epochs = 1.5"), ("augment: 1\n", "augment = 1"), ("lr: [1]\n", "lr = [1]")],
)
def test_wrong_types_in_a_config_file_are_one_error_line(world, tmp_path, capsys, text, key):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    line = one_error(distill_args(world, tmp_path / "run", "--config", config), capsys)
    assert key in line and str(config) in line
    assert not (tmp_path / "run").exists()


def test_numeric_strings_and_ints_are_accepted_for_float_keys(tmp_path):
    from igkd.distill.config import load_yaml, resolve_config

    config = tmp_path / "config.yaml"
    config.write_text("lr: 1e-3\nwidth: 1\nepochs: 3\n")  # YAML 1.1 reads 1e-3 as text
    values = load_yaml(config)
    resolved = resolve_config("student", "paper", values)
    assert resolved.lr == 0.001 and resolved.width == 1 and resolved.epochs == 3


def test_bad_counts_are_one_error_line(world, tmp_path, capsys):
    line = one_error(["attributions", "compute", "--teacher", world["teacher"], "--dataset", "folder", "--data-dir", world["data"],
                      "--out", tmp_path / "ig", "--max-batch", "-1"], capsys)
    assert "--max-batch must be at least 1" in line and not (tmp_path / "ig").exists()
    line = one_error(["evaluate", "--checkpoint", world["teacher"], "--dataset", "folder", "--data-dir", world["data"], "--batch-size", "0"], capsys)
    assert "--batch-size" in line


# -- item 7 is above (the checkpoint holding code); item 8: resume bookkeeping, Ctrl-C -------------------


def test_metrics_of_a_run_killed_before_its_first_checkpoint_are_not_duplicated(world, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 9.9}\n{"epoch": 2, "tr')  # then killed
    (out / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    assert cli(distill_args(world, out, "--resume"), capsys)[0] == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1] and rows[0]["train_loss"] != 9.9
    assert not list(out.glob(".*.tmp"))


def test_ctrl_c_prints_one_line_and_exits_130(world, tmp_path, capsys, monkeypatch):
    import igkd.distill.run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(igkd.distill.run, "run_training", interrupted)
    line = one_error(distill_args(world, tmp_path / "run"), capsys, code=130)
    assert line.startswith("error: interrupted")


# -- item 9: one attribution computation per cache folder ---------------------------------------------


def test_attributions_compute_refuses_a_cache_being_written(world, tmp_path, capsys):
    from igkd.locking import sibling_lock

    out = tmp_path / "ig"
    with sibling_lock(out):  # as if another process were computing it
        line = one_error(["attributions", "compute", "--teacher", world["teacher"], "--dataset", "folder", "--data-dir", world["data"],
                          "--out", out, "--steps", "2", "--device", "cpu"], capsys)
    assert "being run by another process" in line and str(out) in line
    assert not (out / "manifest.json").exists()


# -- item 10: threads and device type of a resumed run ----------------------------------------------


def test_resuming_with_other_threads_warns(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(distill_args(world, out), capsys)[0] == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["threads"] == torch.get_num_threads() and state["device_type"] == "cpu"
    state["threads"] += 3
    torch.save(state, out / "checkpoint.pt")
    (out / "summary.json").unlink()
    status, _, err = cli(distill_args(world, out, "--resume"), capsys)
    assert status == 0
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"threads {state['threads']} -> {torch.get_num_threads()}" in warnings[0]


# -- item 11 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", ["0", "-1"])
def test_a_width_that_is_not_positive_is_refused(world, tmp_path, capsys, width):
    argv = distill_args(world, tmp_path / "run")
    argv[argv.index("--width") + 1] = width
    assert "width must be positive" in one_error(argv, capsys)


def test_distill_refuses_an_out_that_is_a_cache_or_a_study(world, tmp_path, capsys):
    cache = copy_cache(world, tmp_path / "ig")
    before = snapshot(cache)
    assert "attribution cache" in one_error(distill_args(world, cache), capsys)
    assert snapshot(cache) == before
    study = tmp_path / "study"
    study.mkdir()
    (study / "study.json").write_text("{}")
    assert "study folder" in one_error(distill_args(world, study), capsys)
    assert sorted(p.name for p in study.iterdir()) == ["study.json"]


def test_quantize_checks_the_calibration_method_before_any_work(tmp_path, capsys):
    line = one_error(["quantize", tmp_path / "absent.safetensors", "--dataset", "digits", "--calibration-method", "median"], capsys)
    assert "unknown calibration method 'median'" in line  # refused before the checkpoint is even looked at


def test_an_undecodable_image_in_an_archive_is_named(tmp_path, capsys):
    folder = write_folder(tmp_path / "data")
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(folder.rglob("*.png")):
            blob = b"not a png at all" if path.name == "3.png" and path.parent.name == "c2" and path.parent.parent.name == "train" else path.read_bytes()
            handle.writestr(path.relative_to(folder).as_posix(), blob)
    save_model(tmp_path / "m.safetensors", build_model("k17", width=0.25, num_classes=CLASSES))
    line = one_error(["evaluate", "--checkpoint", tmp_path / "m.safetensors", "--dataset", "folder", "--data-dir", archive], capsys)
    assert "train/c2/3.png" in line and str(archive) in line and "BytesIO" not in line


def _append_invocation(out: str, worker: int, rounds: int) -> None:
    from igkd.experiments import tune

    for i in range(rounds):
        new = json.loads((Path(out) / "template.json").read_text())
        new["invocations"] = [{"worker": worker, "round": i}]
        tune.join_study_file(Path(out), new)


def test_concurrent_tune_workers_keep_every_invocation(tmp_path):
    from igkd.experiments import study_folder as studies

    out = tmp_path / "tune"
    template = {
        "format": studies.FORMAT, "format_version": studies.FORMAT_VERSION, "kind": "ablation", "methods": ["student"],
        "students": ["k5"], "runs": [0], "subset": 1.0, "independent": False, "configs": {}, "dataset": {"fingerprint": "x"},
        "teacher": None, "attributions": None, "extras": {}, "created": "t", "updated": "t", "invocations": [],
    }
    out.mkdir()
    (tmp_path / "template.json").write_text(json.dumps(template))
    (out / "study.json").write_text(json.dumps(template))
    (out / "template.json").symlink_to(tmp_path / "template.json")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_invocation, args=(str(out), w, 15)) for w in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert all(worker.exitcode == 0 for worker in workers)
    invocations = json.loads((out / "study.json").read_text())["invocations"]
    assert sorted((i["worker"], i["round"]) for i in invocations) == [(w, r) for w in range(3) for r in range(15)]


def test_identical_models_give_identical_safetensors_bytes(tmp_path):
    from safetensors.torch import save

    from igkd.models import load_model
    from igkd.models.checkpoint import canonical_safetensors

    torch.manual_seed(0)
    model = build_model("k17", width=0.25, num_classes=CLASSES)
    path = tmp_path / "m.safetensors"
    save_model(path, model, {"summary": {"test_accuracy": 50.0}})
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"]) and list(header)[1:] == sorted(list(header)[1:])
    # the same tensors and metadata with the header in another order (as safetensors writes it in another process)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {f"key{i}": str(i) for i in range(12)}
    shuffled = save(state, metadata=metadata)
    (length,) = struct.unpack("<Q", shuffled[:8])
    header = json.loads(shuffled[8 : 8 + length])
    header["__metadata__"] = dict(reversed(list(header["__metadata__"].items())))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    other = struct.pack("<Q", len(text)) + text + shuffled[8 + length :]
    assert other != shuffled
    assert canonical_safetensors(other) == canonical_safetensors(shuffled)
    reloaded, _ = load_model(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))


# -- bad input, second probe (issue 26, item 8; docs/faults.md "Bad input (second probe)") -------------


def tree(folder: Path) -> dict:
    """Every file under ``folder`` (relative path -> bytes): what "no data changed" compares."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_finished_run_without_its_checkpoint_is_never_trained_over(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(distill_args(world, out), capsys)[0] == 0
    summary = json.loads((out / "summary.json").read_text())
    (out / "checkpoint.pt").unlink()  # deleted to save space, or unpacked from a pack (which leaves it out)
    before = tree(out)
    line = one_error(distill_args(world, out), capsys)
    assert str(out) in line and "finished run" in line and "another --out" in line
    assert tree(out) == before
    status, stdout, err = cli(distill_args(world, out, "--resume"), capsys)  # resume: reported as it is, nothing trained
    assert status == 0 and "Traceback" not in err
    assert json.loads(stdout)["test_accuracy"] == summary["test_accuracy"]
    assert tree(out) == before
    (out / "summary.json").unlink()  # only the model file left: neither a finished nor a resumable run
    before = tree(out)
    assert "finished run" in one_error(distill_args(world, out), capsys)
    line = one_error(distill_args(world, out, "--resume"), capsys)
    assert "model.safetensors" in line and "cannot be resumed" in line
    assert tree(out) == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "nan"], "--budget must be a positive, finite duration"),
        (["--budget", "inf"], "--budget must be a positive, finite duration"),
        (["--stages="], "names no stage"),
        (["--stages", " , "], "names no stage"),
        (["--stages", "7-9"], "within 1-6"),
        (["--stages", "3-1"], "within 1-6"),
        (["--stages", "7"], "unknown stage '7'"),
    ],
    ids=["budget-nan", "budget-inf", "stages-empty", "stages-commas", "stages-out-of-range", "stages-reversed", "stage-7"],
)
def test_reproduce_refuses_a_budget_or_stages_that_would_run_forever_or_nothing(world, tmp_path, capsys, args, message):
    out = tmp_path / "repro"
    line = one_error(["reproduce", "--out", out, "--dataset", "folder", "--data-dir", world["data"], *args], capsys)
    assert message in line
    assert not out.exists()


def test_stage_parsing_keeps_what_is_valid():
    from igkd.experiments.reproduce import STAGES, parse_budget, parse_stages

    assert parse_stages(None) == list(STAGES) and parse_stages("1-6") == list(STAGES) and parse_stages("2-2,report") == ["ig", "report"]
    assert parse_budget("1e3") == 1000.0


@pytest.mark.parametrize(
    "yaml_text, options, message",
    [
        ("mix_prob: 0.3\n", ["--method", "kd"], "mix_prob = 0.3 from the --config file has no effect on method 'kd': it acts only with mix cutmix or mixup"),
        ("dkd_beta: 2\n", ["--method", "kd"], "dkd_beta = 2 from the --config file has no effect on method 'kd': it acts only with logit_loss dkd"),
        ("dkd_alpha: 0.5\n", ["--method", "kd"], "dkd_alpha = 0.5 from the --config file"),
        ("dist_gamma: 1\n", ["--method", "dkd"], "dist_gamma = 1 from the --config file has no effect on method 'dkd': it acts only with logit_loss dist"),
        ("", ["--method", "student", "-T", "4"], "temperature = 4.0 from --temperature has no effect on method 'student'"),
        ("", ["--method", "dkd", "-T", "4"], "temperature = 4.0 from --temperature has no effect on method 'dkd'"),
        ("", ["--method", "kd", "--at-teacher-layer", "features.3"], "at_teacher_layer = 'features.3' from --at-teacher-layer"),
        ("momentum: 0.5\n", ["--method", "kd"], "it acts only with optimizer sgd"),
        ("warmup_epochs: 3\n", ["--method", "kd"], "it acts only with warmup_fraction > 0"),
    ],
    ids=["mix_prob", "dkd_beta", "dkd_alpha", "dist_gamma", "T-student", "T-dkd", "at-layer", "momentum-adam", "warmup-paper"],
)
def test_a_key_the_method_never_uses_is_refused(world, tmp_path, capsys, yaml_text, options, message):
    argv = distill_args(world, tmp_path / "run", "--teacher", world["teacher"], *options)
    argv.remove("--method"), argv.remove("student")  # the options above choose the method
    if yaml_text:
        (tmp_path / "c.yaml").write_text(yaml_text)
        argv += ["--config", tmp_path / "c.yaml"]
    line = one_error(argv, capsys)
    assert message in line and "remove it" in line
    assert not (tmp_path / "run").exists()


def test_keys_that_act_or_restate_their_preset_are_accepted():
    from igkd.distill.config import resolve_config

    assert resolve_config("kd_cutmix", yaml_values={"mix_prob": 0.3}).mix_prob == 0.3  # acts
    assert resolve_config("kd", yaml_values={"mix_prob": 1.0}).mix_prob == 1.0  # the preset's value: changes nothing
    assert resolve_config("kd", logit_std=True, logit_std_temperature=3.0).logit_std_temperature == 3.0
    assert resolve_config("dkd", dkd_beta=2.0, dkd_temperature=2.0).dkd_beta == 2.0
    assert resolve_config("student", "teacher", warmup_epochs=1).warmup_epochs == 1
    assert resolve_config("student", "teacher", warmup_epochs=0, warmup_fraction=0.0).warmup_fraction == 0  # "no warm-up", said twice
    saved = resolve_config("kd_cutmix", seed=3).to_dict()  # a saved config, fed back whole, is accepted
    assert resolve_config(**{k: v for k, v in saved.items() if k != "extra"}).to_dict() == saved


def test_a_study_config_key_that_acts_on_none_of_its_methods_is_refused():
    from igkd.experiments.studies import StudyOptions, check_inputs

    options = StudyOptions(config_values={"dkd_beta": 2.0}, device="cpu")
    configs = {m: options.config(m, "k17", 0) for m in ("student", "kd")}
    with pytest.raises(IgkdError, match="dkd_beta = 2.0 from the --config file has no effect on any of the methods student, kd"):
        check_inputs(configs, options, {"path": "t"}, None)
    configs["dkd"] = options.config("dkd", "k17", 0)  # one method of the study uses it: the file is fine
    check_inputs(configs, options, {"path": "t"}, None)


def test_tuning_a_parameter_the_method_never_uses_is_refused(world, tmp_path):
    from conftest import make_tiny_dataset

    from igkd.experiments.tune import run_tune

    with pytest.raises(IgkdError, match="temperature = 2.5 from --params has no effect on method 'student'"):
        run_tune(make_tiny_dataset(), tmp_path / "tune", method="student", params="T", student="k17", epochs=1, device="cpu", progress=False)
    assert not (tmp_path / "tune").exists()


def test_report_skips_metrics_lines_that_are_not_records(tmp_path, capsys, monkeypatch):
    from conftest import as_cohort_trainer, make_tiny_dataset

    from igkd.experiments import studies

    def trainer(config, dataset, out_dir, **kwargs):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.jsonl").write_text('{"epoch": 1, "val_accuracy": 40.0, "train_loss": 1.5}\n5\n"x"\n[1, 2]\nnull\n')
        summary = {"method": config.method, "seed": config.seed, "test_accuracy": 50.0 + config.seed, "val_accuracy": 50.0}
        (out_dir / "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(executor, "_train", as_cohort_trainer(trainer))
    study = tmp_path / "study"
    studies.run_ablation(make_tiny_dataset(), study, methods="student", seeds=2, student="k17", epochs=1, device="cpu", progress=False)
    before = tree(study)
    status, _, err = cli(["report", study, "--out", tmp_path / "rep"], capsys)
    assert status == 0 and "Traceback" not in err, err
    figure = json.loads((tmp_path / "rep" / "report.json").read_text())["studies"][0]["figures"]["curves"]
    assert "file" in figure and (tmp_path / "rep" / figure["file"]).is_file()  # drawn from the one record of each run
    from igkd.experiments.studies import load_study
    from igkd.report.tables import curves

    assert [(c["epoch"], c["val_accuracy"]) for c in curves(load_study(study))] == [([1], [40.0])] * 2
    assert tree(study) == before


@pytest.mark.parametrize(
    "argv",
    [
        ["evaluate", "--checkpoint", "{teacher}", "--dataset", "folder", "--data-dir", "{data}", "--device", "meta"],
        ["bench", "latency", "--models", "k17", "--device", "meta"],
        ["distill", "--method", "student", "--dataset", "folder", "--data-dir", "{data}", "--out", "{out}", "--student", "k17", "--device", "mps"],
        ["ablation", "--dataset", "folder", "--data-dir", "{data}", "--out", "{out}", "--methods", "student", "--device", "mps"],
        ["doctor", "--device", "meta"],
    ],
    ids=["evaluate-meta", "bench-meta", "distill-mps", "ablation-mps", "doctor-meta"],
)
def test_a_device_igkd_has_no_path_for_is_one_error_line(world, tmp_path, capsys, argv):
    names = {"teacher": world["teacher"], "data": world["data"], "out": tmp_path / "out"}
    line = one_error([str(a).format(**names) for a in argv], capsys)
    assert "is not supported" in line and "auto, cpu, cuda or cuda:N" in line
    assert not (tmp_path / "out").exists()


def test_the_device_check_is_one_function():
    from igkd.devices import parse_device, resolve_device

    assert parse_device("auto") is None and parse_device("cuda:1") == torch.device("cuda:1") and resolve_device("cpu") == torch.device("cpu")
    for bad, message in (("meta", "not supported"), ("mps", "not supported"), ("gpu", "unknown device"), ("cpu:2", "no index")):
        with pytest.raises(IgkdError, match=message):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(IgkdError, match="no CUDA GPU"):
            resolve_device("cuda")
    else:
        with pytest.raises(IgkdError, match="CUDA GPU\\(s\\)"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_export_takes_a_run_folder(world, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(world["teacher"].read_bytes())
    (run / "summary.json").write_text("{}")
    status, stdout, err = cli(["export", run, "--format", "torchscript"], capsys)
    assert status == 0 and "Traceback" not in err, err
    assert str(run / "model.torchscript.pt") in stdout and (run / "model.torchscript.pt").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_error(["export", empty], capsys)
    assert f"{empty} is a folder without model.safetensors" in line and "finished run folder" in line
    assert not list(empty.iterdir())


def test_methods_all_is_what_can_run_in_one_study(capsys):
    from igkd.distill import METHODS
    from igkd.experiments.plan import parse_methods

    everything = parse_methods("all")
    assert "kd_saliency" not in everything and everything == [m for m in METHODS if m != "kd_saliency"]
    assert parse_methods("kd,kd_saliency") == ["kd", "kd_saliency"]  # still runnable by name, with a saliency cache
    status, stdout, _ = cli(["ablation", "--help"], capsys)
    assert status == 0 and "kd_saliency" in " ".join(stdout.split())
