"""The attribution cache: index alignment through the real precompute path, resume after
SIGKILL, refusal of mismatching caches, and the ``igkd attributions`` commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from igkd.attribution import compute_attributions, open_attributions
from igkd.attribution.cache import MANIFEST_FILE, MAPS_FILE, PROGRESS_FILE, RUN_FIELDS
from igkd.data.dataset import Dataset, ImageSet, content_fingerprint
from igkd.errors import IgkdError
from igkd.models.mobilenetv2 import Normalize

SIZE, CLASSES = 8, 4


class LinearModel(nn.Module):
    """normalize -> flatten -> linear: IG is exactly (x - x') * dF_t/dx for every rule but trapezoid."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.normalize = Normalize()
        self.fc = nn.Linear(3 * SIZE * SIZE, CLASSES)

    def forward(self, x):
        return self.fc(self.normalize(x).flatten(1))

    def expected_abs_sum_maps(self, images: torch.Tensor, targets: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
        """sum_c |(x - x') * w_t / std|, computed from the weights, not by autograd."""
        weights = self.fc.weight.detach().view(CLASSES, 3, SIZE, SIZE) / self.normalize.std
        return ((images - baseline) * weights[targets]).abs().sum(1)


def make_dataset(n: int = 50, seed: int = 0, name: str = "toy") -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    test = ImageSet(images[:8].clone(), labels[:8].clone())
    train = ImageSet(images, labels)
    fingerprint = content_fingerprint(images, labels, extra=name)
    return Dataset(name, tuple(f"c{i}" for i in range(CLASSES)), train, test, fingerprint, "memory")


def precompute(out_dir, *, slow: float = 0.0, n: int = 50, chunk_size: int = 16, **kwargs):
    """The cache computation the resume test runs in a subprocess (and in-process for the reference)."""
    on_chunk = (lambda done, total: time.sleep(slow)) if slow else None
    params = dict(n_steps=6, chunk_size=chunk_size, max_batch=20, teacher_sha256="a" * 64, progress=False, on_chunk=on_chunk)
    return compute_attributions(LinearModel(), make_dataset(n), out_dir, **{**params, **kwargs})


def deterministic_fields(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in RUN_FIELDS}


@pytest.mark.parametrize("baseline", ["black", "mean"])
def test_map_i_is_the_map_of_image_i(tmp_path, baseline):
    # 50 images in chunks of 16 (the last has 2), 20 samples per pass (3 images x 6 steps):
    # every batching boundary falls mid-way somewhere, yet row i must be image i's map.
    cache = precompute(tmp_path / "cache", baseline=baseline)
    model, data = LinearModel(), make_dataset()
    x = data.train.images.float() / 255
    reference = torch.zeros(1, 3, 1, 1) if baseline == "black" else model.normalize.mean
    expected = model.expected_abs_sum_maps(x, data.train.labels, reference)
    assert cache.maps.shape == (50, SIZE, SIZE) and cache.maps.dtype == np.float16
    np.testing.assert_allclose(cache.maps.astype(np.float32), expected.numpy(), rtol=2e-3, atol=1e-5)
    assert not cache.maps.flags.writeable
    manifest = cache.manifest
    assert manifest["complete"] is True and list(manifest)[-1] == "complete"
    assert (manifest["n"], manifest["height"], manifest["width"], manifest["split"]) == (50, SIZE, SIZE, "train")
    assert (manifest["method"], manifest["n_steps"], manifest["baseline"], manifest["rule"]) == ("ig", 6, baseline, "gausslegendre")
    assert manifest["precision"] == "fp32" and manifest["completeness"]["relative"] < 1e-5
    assert manifest["dataset_fingerprint"] == data.fingerprint and manifest["teacher_sha256"] == "a" * 64
    assert not (tmp_path / "cache" / PROGRESS_FILE).exists()


def test_predicted_target_and_interrupted_in_process_run_stay_aligned(tmp_path):
    model, data = LinearModel(), make_dataset()
    calls = []

    def stop_after_two(done, total):
        calls.append(done)
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        precompute(tmp_path, target="predicted", chunk_size=7, on_chunk=stop_after_two)
    with pytest.raises(IgkdError, match="incomplete"):
        open_attributions(tmp_path)
    cache = precompute(tmp_path, target="predicted", chunk_size=99)  # resumes with the recorded chunk size 7
    assert cache.manifest["chunk_size"] == 7 and cache.manifest["sessions"] == 2
    x = data.train.images.float() / 255
    with torch.no_grad():
        predicted = model(x).argmax(1)
    expected = model.expected_abs_sum_maps(x, predicted, torch.zeros(1, 3, 1, 1))
    np.testing.assert_allclose(cache.maps.astype(np.float32), expected.numpy(), rtol=2e-3, atol=1e-5)


def test_resume_after_sigkill_is_byte_identical(tmp_path):
    straight = precompute(tmp_path / "straight", n=40, chunk_size=4)
    killed = tmp_path / "killed"
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_attribution_cache as t; "
        "t.precompute(sys.argv[2], slow=0.25, n=40, chunk_size=4)"
    )
    process = subprocess.Popen([sys.executable, "-c", script, str(Path(__file__).parent), str(killed)])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            progress = json.loads((killed / PROGRESS_FILE).read_text()) if (killed / PROGRESS_FILE).exists() else {}
            if progress.get("done", 0) >= 1:
                break
            assert process.poll() is None, "precompute subprocess ended before it could be killed"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert not (killed / MANIFEST_FILE).exists()  # a build in progress has no manifest, only progress + staged maps
    with pytest.raises(IgkdError, match="incomplete"):
        open_attributions(killed)
    done = json.loads((killed / PROGRESS_FILE).read_text())["done"]
    assert 1 <= done < 10

    resumed = precompute(killed, n=40, chunk_size=4)
    assert (killed / MAPS_FILE).read_bytes() == (tmp_path / "straight" / MAPS_FILE).read_bytes()
    assert deterministic_fields(resumed.manifest) == deterministic_fields(straight.manifest)
    assert resumed.manifest["sessions"] == 2 and straight.manifest["sessions"] == 1
    assert not (killed / PROGRESS_FILE).exists() and not list(killed.glob(".*.tmp"))


def test_mismatching_caches_are_refused_with_one_clear_line(tmp_path):
    cache = precompute(tmp_path, n=20)
    again = precompute(tmp_path, n=20)  # same computation: reused, not recomputed
    assert again.reused and again.manifest_sha256 == cache.manifest_sha256
    other_data = make_dataset(20, seed=1)
    cases = [
        (lambda: open_attributions(tmp_path, teacher_sha256="b" * 64), "teacher_sha256", "a" * 64, "b" * 64),
        (lambda: open_attributions(tmp_path, dataset_fingerprint=other_data.fingerprint), "dataset_fingerprint", cache.manifest["dataset_fingerprint"], other_data.fingerprint),
        (lambda: open_attributions(tmp_path, split="test"), "split", "train", "test"),
        (lambda: open_attributions(tmp_path, expect={"n_steps": 50}), "n_steps", "6", "50"),
        (lambda: precompute(tmp_path, n=20, n_steps=7), "n_steps", "6", "7"),
        (lambda: precompute(tmp_path, n=20, teacher_sha256="c" * 64), "teacher_sha256", "a" * 64, "c" * 64),
        (lambda: compute_attributions(LinearModel(), other_data, tmp_path, n_steps=6, teacher_sha256="a" * 64, progress=False), "dataset_fingerprint", cache.manifest["dataset_fingerprint"], other_data.fingerprint),
    ]
    for call, field, old, new in cases:
        with pytest.raises(IgkdError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and field in message and old in message and new in message and "--force" in message, message
    rebuilt = precompute(tmp_path, n=20, n_steps=7, force=True)
    assert rebuilt.manifest["n_steps"] == 7 and not rebuilt.reused
    with pytest.raises(IgkdError, match="no attribution cache"):
        open_attributions(tmp_path / "nowhere")
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(IgkdError, match="not valid JSON"):
        open_attributions(tmp_path)


def test_damaged_maps_file_is_refused(tmp_path):
    precompute(tmp_path, n=20)
    with open(tmp_path / MAPS_FILE, "r+b") as handle:
        handle.seek(-2, os.SEEK_END)
        handle.write(b"\x00\x7c")
    open_attributions(tmp_path)  # shape/dtype still fine
    with pytest.raises(IgkdError, match="sha256"):
        open_attributions(tmp_path, verify=True)
    (tmp_path / MAPS_FILE).write_bytes(b"junk")
    with pytest.raises(IgkdError, match="unreadable"):
        open_attributions(tmp_path)


# --- CLI: a real checkpoint (the 1,994-parameter k17 student) on the offline digits test split


@pytest.fixture(scope="module")
def small_teacher(tmp_path_factory):
    from igkd.models import build_model, save_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "k17.safetensors"
    save_model(path, build_model("k17").eval())
    return path


def _main(args, capsys):
    from igkd.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_cli_compute_reuse_refuse_and_show(tmp_path, small_teacher, capsys):
    from igkd.cli import app
    from igkd.data import load_dataset
    from igkd.provenance import sha256_file

    out = tmp_path / "maps"
    args = ["attributions", "compute", "--teacher", str(small_teacher), "--dataset", "digits", "--split", "test", "--out", str(out), "--steps", "2", "--chunk-size", "100"]
    runner = CliRunner()
    first = runner.invoke(app, [*args, "--json"])
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert report["reused"] is False and report["manifest"]["n"] == 359 and report["manifest"]["teacher_sha256"] == sha256_file(small_teacher)
    data = load_dataset("digits")
    cache = open_attributions(out, teacher_sha256=sha256_file(small_teacher), dataset_fingerprint=data.fingerprint, split="test")
    assert cache.manifest_sha256 == report["manifest_sha256"] and cache.maps.shape == (359, 32, 32)

    second = runner.invoke(app, args)
    assert second.exit_code == 0 and "reused existing cache" in second.stdout

    code, _, err = _main([*args[:-4], "--steps", "3"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: attribution cache") and "n_steps=2" in lines[0] and "--force" in lines[0]

    png = tmp_path / "figure" / "map.png"
    shown = runner.invoke(app, ["attributions", "show", str(out), "--dataset", "digits", "--index", "358", "--out", str(png)])
    assert shown.exit_code == 0, shown.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = _main(["attributions", "show", str(out), "--dataset", "digits", "--index", "359", "--out", str(png)], capsys)
    assert code == 2 and err.strip().startswith("error: index 359 is out of range") and len(err.strip().splitlines()) == 1

    code, _, err = _main(["attributions", "compute", "--teacher", str(tmp_path / "missing.safetensors"), "--dataset", "digits", "--out", str(out)], capsys)
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
