"""CIFAR-10 python-pickle source, on tiny home-built archives in the official format."""

from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from igkd.data import load_dataset
from igkd.data.sources import cifar10
from igkd.errors import IgkdError

PER_BATCH = 3


def write_batches(folder: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A cifar-10-batches-py folder with PER_BATCH random images per batch; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    written = {}
    for number, name in enumerate((*cifar10.TRAIN_FILES, cifar10.TEST_FILE)):
        data = rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, PER_BATCH).tolist()
        # Python 2 wrote the official files; read with encoding="bytes" their keys are bytes. Mix both kinds.
        if number % 2:
            batch = {b"data": data, b"labels": labels, b"batch_label": name.encode()}
        else:
            batch = {"data": data, "labels": labels}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        written[name] = (data, np.asarray(labels))
    meta = {b"label_names": [name.encode() for name in cifar10.CLASSES], b"num_vis": 3072}
    (folder / cifar10.META_FILE).write_bytes(pickle.dumps(meta, protocol=2))
    train = [written[name] for name in cifar10.TRAIN_FILES]
    test = written[cifar10.TEST_FILE]
    return (
        np.concatenate([d for d, _ in train]).reshape(-1, 3, 32, 32),
        np.concatenate([l for _, l in train]),
        test[0].reshape(-1, 3, 32, 32),
        test[1],
    )


def write_archive(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=cifar10.BATCH_FOLDER)
    return archive


@pytest.fixture()
def batches(tmp_path):
    folder = tmp_path / "data" / cifar10.BATCH_FOLDER
    return folder, write_batches(folder)


def cli_error(capsys, *args: str) -> str:
    from igkd.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["data", "info", *args])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_folder_parent_and_archive_give_the_same_dataset(batches, tmp_path):
    folder, (train_x, train_y, test_x, test_y) = batches
    archive = write_archive(folder, tmp_path / cifar10.ARCHIVE_NAME)
    loaded = [cifar10.load(path, verify_md5=False) for path in (folder, folder.parent, archive)]
    for data in loaded:
        assert data.classes == cifar10.CLASSES
        assert np.array_equal(data.train.images.numpy(), train_x) and np.array_equal(data.train.labels.numpy(), train_y)
        assert np.array_equal(data.test.images.numpy(), test_x) and np.array_equal(data.test.labels.numpy(), test_y)
        assert data.fingerprint == loaded[0].fingerprint
    assert len(loaded[0].train) == 5 * PER_BATCH and len(loaded[0].test) == PER_BATCH


def test_md5_of_official_files_is_checked_by_default(batches, capsys):
    folder, _ = batches
    with pytest.raises(IgkdError, match=r"data_batch_1 has md5 .* expected c99cafc152244af753f735de768cd75f"):
        load_dataset("cifar10", folder)
    assert "data_batch_1" in cli_error(capsys, "--dataset", "cifar10", "--data-dir", str(folder))


def test_env_var_turns_md5_off_for_home_built_copies(batches, monkeypatch):
    folder, (train_x, *_) = batches
    monkeypatch.setenv(cifar10.VERIFY_ENV, "0")
    assert np.array_equal(load_dataset("cifar10", folder).train.images.numpy(), train_x)


def test_truncated_pickle_is_refused(batches, monkeypatch, capsys):
    folder, _ = batches
    path = folder / "data_batch_3"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(IgkdError, match=r"data_batch_3 is not a readable dataset pickle: it ends early"):
        cifar10.load(folder, verify_md5=False)
    monkeypatch.setenv(cifar10.VERIFY_ENV, "0")
    assert "data_batch_3" in cli_error(capsys, "--dataset", "cifar10", "--data-dir", str(folder))


def test_corrupt_pickle_is_refused(batches, monkeypatch, capsys):
    folder, _ = batches
    (folder / "test_batch").write_bytes(b"\x80\x02}q\x00garbage" + os.urandom(64))
    with pytest.raises(IgkdError, match="test_batch is not a readable dataset pickle"):
        cifar10.load(folder, verify_md5=False)
    monkeypatch.setenv(cifar10.VERIFY_ENV, "0")
    assert "test_batch" in cli_error(capsys, "--dataset", "cifar10", "--data-dir", str(folder))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_cannot_run_code(batches, tmp_path, monkeypatch):
    folder, _ = batches
    monkeypatch.chdir(tmp_path)
    (folder / "data_batch_2").write_bytes(pickle.dumps({"data": _Exploit(), "labels": []}))
    with pytest.raises(IgkdError, match=r"data_batch_2 .*refusing to load the global (posix|os)\.system"):
        cifar10.load(folder, verify_md5=False)
    assert not (tmp_path / "pwned").exists()


def test_missing_file_and_missing_folder(batches, tmp_path, capsys):
    folder, _ = batches
    (folder / "test_batch").unlink()
    with pytest.raises(IgkdError, match=r"test_batch is missing"):
        cifar10.load(folder, verify_md5=False)
    missing = tmp_path / "nowhere"
    with pytest.raises(IgkdError, match=r"CIFAR-10 not found: .*nowhere does not exist"):
        load_dataset("cifar10", missing)
    assert "nowhere does not exist" in cli_error(capsys, "--dataset", "cifar10", "--data-dir", str(missing))


def test_truncated_archive_is_refused(batches, tmp_path):
    folder, _ = batches
    archive = write_archive(folder, tmp_path / cifar10.ARCHIVE_NAME)
    archive.write_bytes(archive.read_bytes()[:4000])
    with pytest.raises(IgkdError, match=r"cannot read the archive .*cifar-10-python.tar.gz"):
        cifar10.load(archive, verify_md5=False)


def test_download_from_url_and_from_env(batches, tmp_path, monkeypatch):
    folder, (train_x, *_) = batches
    archive = write_archive(folder, tmp_path / "mirror.tar.gz")
    cache = tmp_path / "cache"
    monkeypatch.setenv(cifar10.VERIFY_ENV, "0")
    data = load_dataset("cifar10", cache_dir=cache, download=True, url=archive.as_uri())
    assert np.array_equal(data.train.images.numpy(), train_x)
    assert (cache / "cifar10" / cifar10.ARCHIVE_NAME).read_bytes() == archive.read_bytes()
    assert load_dataset("cifar10", cache_dir=cache).fingerprint == data.fingerprint  # found without --download
    monkeypatch.setenv(cifar10.URL_ENV, archive.as_uri())
    target = tmp_path / "elsewhere"
    assert load_dataset("cifar10", target, download=True).fingerprint == data.fingerprint
    assert (target / cifar10.ARCHIVE_NAME).is_file()


def test_download_with_wrong_md5_leaves_nothing(batches, tmp_path):
    folder, _ = batches
    archive = write_archive(folder, tmp_path / "mirror.tar.gz")
    target = tmp_path / "target"
    with pytest.raises(IgkdError, match=r"has md5 .* expected c58f30108f718f92721af3b95e74349a"):
        cifar10.load(target, download=True, url=archive.as_uri())
    assert list(target.iterdir()) == []
    with pytest.raises(IgkdError, match=r"cannot download"):
        cifar10.load(tmp_path / "t2", download=True, url=(tmp_path / "absent.tar.gz").as_uri())
