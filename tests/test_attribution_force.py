"""A finished IG cache survives bad options, --force, kills during a rebuild, and a full disk.

Every option is checked before the folder changes; a rebuild is staged beside the finished cache
and moved into place only when complete; the staged maps get real disk blocks up front, so a full
disk is one error line and not a SIGBUS from a memory-mapped page.
"""

from __future__ import annotations

import errno
import os
import subprocess

import pytest
import torch

from igkd.attribution import compute_attributions, open_attributions
from igkd.attribution import cache as cache_module
from igkd.attribution.cache import MANIFEST_FILE, MAPS_FILE, PROGRESS_FILE, STAGED_MAPS_FILE
from igkd.cli import main
from igkd.errors import IgkdError

from test_attribution_cache import LinearModel, make_dataset, precompute


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def one_error_line(argv, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from igkd.models import build_model, save_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "k17.safetensors"
    save_model(path, build_model("k17").eval())
    return path


def cli_args(teacher, out, *extra):
    return ["attributions", "compute", "--teacher", str(teacher), "--dataset", "digits", "--split", "test", "--out", str(out),
            "--steps", "2", "--chunk-size", "100", "--device", "cpu", *extra]


@pytest.mark.parametrize("bad", [["--steps", "0"], ["--baseline", "foo"], ["--max-batch", "-1"], ["--rule", "simpson"], ["--precision", "fp8"]])
def test_force_with_a_bad_option_keeps_the_finished_cache(bad, teacher, tmp_path, capsys):
    out = tmp_path / "maps"
    with pytest.raises(SystemExit):
        main(cli_args(teacher, out))
    before = snapshot(out)
    line = one_error_line(cli_args(teacher, out, "--force", *bad), capsys)  # a repeated option: the last one counts
    assert "Traceback" not in line
    assert snapshot(out) == before
    open_attributions(out, verify=True)


def test_a_bad_option_leaves_nothing_that_refuses_the_corrected_command(teacher, tmp_path, capsys):
    out = tmp_path / "maps"
    one_error_line(cli_args(teacher, out, "--max-batch", "-1"), capsys)
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        main(cli_args(teacher, out))
    assert exit_info.value.code in (0, None)
    open_attributions(out, verify=True)


def test_an_interrupted_force_rebuild_keeps_the_old_cache_and_the_same_command_finishes_it(tmp_path):
    old = precompute(tmp_path / "c", n=40, chunk_size=8)
    old_bytes = (tmp_path / "c" / MAPS_FILE).read_bytes()

    def stop_at_two(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        precompute(tmp_path / "c", n=40, chunk_size=8, n_steps=7, force=True, on_chunk=stop_at_two)
    kept = open_attributions(tmp_path / "c", verify=True)  # still the old, complete cache
    assert kept.manifest["n_steps"] == 6 and (tmp_path / "c" / MAPS_FILE).read_bytes() == old_bytes
    assert (tmp_path / "c" / STAGED_MAPS_FILE).exists() and (tmp_path / "c" / PROGRESS_FILE).exists()

    with pytest.raises(IgkdError, match="was built for n_steps=6"):
        precompute(tmp_path / "c", n=40, chunk_size=8, n_steps=8)  # neither the old nor the staged one
    rebuilt = precompute(tmp_path / "c", n=40, chunk_size=8, n_steps=7, force=True)  # the same command resumes
    straight = precompute(tmp_path / "straight", n=40, chunk_size=8, n_steps=7)
    assert rebuilt.manifest["sessions"] == 2 and rebuilt.manifest["n_steps"] == 7 and old.manifest["n_steps"] == 6
    assert (tmp_path / "c" / MAPS_FILE).read_bytes() == (tmp_path / "straight" / MAPS_FILE).read_bytes()
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [MANIFEST_FILE, MAPS_FILE]
    assert straight.manifest["maps_sha256"] == rebuilt.manifest["maps_sha256"]


def test_a_kill_between_moving_the_maps_and_writing_the_manifest_is_finished_by_a_rerun(tmp_path, monkeypatch):
    precompute(tmp_path / "c", n=24, chunk_size=8)
    real = cache_module.atomic_write_json

    def die_on_manifest(path, obj):
        if path.name == MANIFEST_FILE:
            raise KeyboardInterrupt
        real(path, obj)

    monkeypatch.setattr(cache_module, "atomic_write_json", die_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        precompute(tmp_path / "c", n=24, chunk_size=8, n_steps=5, force=True)
    monkeypatch.setattr(cache_module, "atomic_write_json", real)
    assert not (tmp_path / "c" / MANIFEST_FILE).exists()  # the old manifest never describes the new maps
    with pytest.raises(IgkdError, match="incomplete"):
        open_attributions(tmp_path / "c")
    finished = precompute(tmp_path / "c", n=24, chunk_size=8, n_steps=5)
    straight = precompute(tmp_path / "straight", n=24, chunk_size=8, n_steps=5)
    assert finished.manifest["n_steps"] == 5 and finished.manifest["maps_sha256"] == straight.manifest["maps_sha256"]
    open_attributions(tmp_path / "c", verify=True)


def test_staged_maps_have_their_disk_blocks_reserved(tmp_path):
    seen = []

    def look(done, total):
        staged = tmp_path / "c" / STAGED_MAPS_FILE
        seen.append(staged.stat().st_blocks * 512 >= staged.stat().st_size)

    precompute(tmp_path / "c", n=64, chunk_size=16, on_chunk=look)
    assert seen and all(seen)


def test_disk_full_when_reserving_is_one_error_and_keeps_the_old_cache(tmp_path, monkeypatch):
    precompute(tmp_path / "c", n=24, chunk_size=8)
    before = snapshot(tmp_path / "c")

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(IgkdError, match=r"disk full: the maps need .* MiB in .*free space there and re-run"):
        precompute(tmp_path / "c", n=24, chunk_size=8, n_steps=5, force=True)
    assert snapshot(tmp_path / "c") == {k: v for k, v in before.items()}


def test_disk_full_mid_run_names_the_chunk_and_the_rerun_resumes(tmp_path, monkeypatch):
    real = cache_module.atomic_write_json
    calls = {"n": 0}

    def full_on_third(path, obj):
        if path.name == PROGRESS_FILE:
            calls["n"] += 1
            if calls["n"] == 3:  # the write that would count chunk 2
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, obj)

    monkeypatch.setattr(cache_module, "atomic_write_json", full_on_third)
    with pytest.raises(IgkdError, match=r"disk full at chunk 2 of 3 in .*re-run the same command to resume"):
        precompute(tmp_path / "c", n=24, chunk_size=8)
    monkeypatch.setattr(cache_module, "atomic_write_json", real)
    resumed = precompute(tmp_path / "c", n=24, chunk_size=8)
    straight = precompute(tmp_path / "straight", n=24, chunk_size=8)
    assert resumed.manifest["sessions"] == 2 and resumed.manifest["maps_sha256"] == straight.manifest["maps_sha256"]


def _tmpfs(path) -> bool:
    path.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def test_a_really_full_disk_is_an_error_not_a_crash(tmp_path):
    """On a 1 MiB tmpfs (where this machine lets us mount one), maps of 2.5 MB are refused up front."""
    mount = tmp_path / "small"
    if not _tmpfs(mount):
        pytest.skip("cannot mount a tmpfs here (needs root); the ENOSPC paths are covered by the monkeypatched tests above")
    try:
        dataset = make_dataset(20_000)
        with pytest.raises(IgkdError, match="disk full"):
            compute_attributions(LinearModel(), dataset, mount / "c", n_steps=2, teacher_sha256="a" * 64, progress=False, device="cpu")
        assert not (mount / "c" / STAGED_MAPS_FILE).exists()
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True, timeout=10)
