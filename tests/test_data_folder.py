"""Image-folder source: directory, zip and tar.gz of tiny PNG/JPEG files, the decoded cache, bad layouts."""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from igkd.data import load_dataset
from igkd.data.sources import image_folder
from igkd.data.sources.file_tree import open_tree
from igkd.errors import IgkdError

CLASSES = ("bee", "ant", "cow")  # written unsorted: the loader sorts them
COUNTS = {"train": 3, "test": 2}


def write_folder(root: Path, size: tuple[int, int] = (6, 5), seed: int = 0) -> dict[str, dict[str, list[np.ndarray]]]:
    """train/<class>/<i>.png and test/<class>/<i>.png of random pixels; returns split -> class -> arrays in file order."""
    rng = np.random.default_rng(seed)
    written: dict[str, dict[str, list[np.ndarray]]] = {}
    for split, count in COUNTS.items():
        written[split] = {}
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            written[split][name] = []
            for i in reversed(range(count)):  # created in reverse: order must come from the names
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i:04d}.png")
                written[split][name].insert(0, pixels)
    return written


def zip_folder(root: Path, archive: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(root.rglob("*")):
            zf.write(path, prefix + path.relative_to(root).as_posix())
    return archive


def tar_folder(root: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(root.iterdir()):
            tar.add(path, arcname=path.name)
    return archive


def expected(written, split):
    ordered = sorted(CLASSES)
    images = [img.transpose(2, 0, 1) for name in ordered for img in written[split][name]]
    labels = [label for label, name in enumerate(ordered) for _ in written[split][name]]
    return np.stack(images), np.asarray(labels)


def cli_error(capsys, *args: str) -> str:
    from igkd.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["data", "info", *args])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "images"
    return root, write_folder(root)


def test_directory_zip_and_targz_load_alike(folder, tmp_path):
    root, written = folder
    sources = [root, zip_folder(root, tmp_path / "images.zip"), tar_folder(root, tmp_path / "images.tgz")]
    loaded = [load_dataset("folder", source, cache_dir=tmp_path / "cache") for source in sources]
    for data in loaded:
        assert data.classes == tuple(sorted(CLASSES))
        for split in COUNTS:
            images, labels = expected(written, split)
            assert np.array_equal(getattr(data, split).images.numpy(), images)
            assert np.array_equal(getattr(data, split).labels.numpy(), labels)
        assert data.fingerprint == loaded[0].fingerprint  # same pixels, same fingerprint, whatever the container
    assert len(list((tmp_path / "cache" / "folder").glob("*.npz"))) == 3  # one cache entry per source


def test_second_load_comes_from_the_cache(folder, tmp_path, monkeypatch):
    root, _ = folder
    archive = zip_folder(root, tmp_path / "images.zip")
    first = load_dataset("folder", archive, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "folder").glob("*.npz"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache holds this source")

    monkeypatch.setattr(Image, "open", no_decoding)
    second = load_dataset("folder", archive, cache_dir=tmp_path / "cache")
    assert second.fingerprint == first.fingerprint
    assert np.array_equal(second.train.images.numpy(), first.train.images.numpy())


def test_changed_source_is_decoded_again(folder, tmp_path, monkeypatch):
    root, _ = folder
    monkeypatch.setenv("IGKD_CACHE", str(tmp_path / "env-cache"))
    first = load_dataset("folder", root)
    Image.fromarray(np.zeros((5, 6, 3), np.uint8)).save(root / "train" / "ant" / "0000.png")
    second = load_dataset("folder", root)
    assert second.fingerprint != first.fingerprint
    assert second.train.images[0].sum() == 0
    assert len(list((tmp_path / "env-cache" / "folder").glob("*.npz"))) == 2


def test_jpeg_and_wrapping_folder(tmp_path):
    root = tmp_path / "jpegs"
    for split in COUNTS:
        for name in ("x", "y"):
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (4, 4), (200, 10, 10)).save(root / split / name / "a.jpg", quality=95)
            Image.new("L", (4, 4), 128).save(root / split / name / "b.jpeg")
            (root / split / name / "notes.txt").write_text("ignored")
    archive = zip_folder(root, tmp_path / "wrapped.zip", prefix="cifar10-jpeg/")
    data = load_dataset("folder", archive, cache_dir=tmp_path / "cache")
    assert data.classes == ("x", "y") and len(data.train) == 4 and len(data.test) == 4
    assert abs(int(data.train.images[0, 0, 0, 0]) - 200) <= 3 and (data.train.images[1] == 128).all()


def test_process_pool_path(folder, tmp_path, monkeypatch):
    root, written = folder
    monkeypatch.setattr(image_folder, "POOL_MIN_IMAGES", 1)
    monkeypatch.setattr(image_folder, "CHUNK", 4)
    monkeypatch.setenv(image_folder.WORKERS_ENV, "2")
    data = load_dataset("folder", root, cache_dir=tmp_path / "cache")
    assert np.array_equal(data.test.images.numpy(), expected(written, "test")[0])
    Image.new("RGB", (9, 9)).save(root / "test" / "cow" / "0001.png")
    with pytest.raises(IgkdError, match=r"mixed sizes: .*test/cow/0001.png is 9x9"):
        load_dataset("folder", root, cache_dir=tmp_path / "cache")


def test_missing_folder(tmp_path, capsys):
    with pytest.raises(IgkdError, match="does not exist"):
        load_dataset("folder", tmp_path / "absent")
    assert "absent does not exist" in cli_error(capsys, "--dataset", "folder", "--data-dir", str(tmp_path / "absent"))
    with pytest.raises(IgkdError, match="needs --data-dir"):
        load_dataset("folder")


def test_archive_without_train_and_test(tmp_path, capsys):
    archive = tmp_path / "flat.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("images/cat/0.png", b"x")
    with pytest.raises(IgkdError, match=r"has no train/ and test/ folders \(top level: images\)"):
        load_dataset("folder", archive, cache_dir=tmp_path)
    message = cli_error(capsys, "--dataset", "folder", "--data-dir", str(archive), "--cache-dir", str(tmp_path))
    assert "no train/ and test/" in message


def test_empty_class_folder(folder, tmp_path, capsys):
    root, _ = folder
    for png in (root / "test" / "bee").iterdir():
        png.unlink()
    with pytest.raises(IgkdError, match=r"class folder test/bee .* holds no .jpg"):
        load_dataset("folder", root, cache_dir=tmp_path / "cache")
    message = cli_error(capsys, "--dataset", "folder", "--data-dir", str(root), "--cache-dir", str(tmp_path / "cache"))
    assert "test/bee" in message
    archive = tmp_path / "empty-class.zip"
    with zipfile.ZipFile(archive, "w") as zf:  # an empty folder inside a zip is a directory entry only
        zf.writestr("train/a/0.png", (root / "train" / "ant" / "0000.png").read_bytes())
        zf.writestr("train/b/", b"")
        zf.writestr("test/a/0.png", (root / "train" / "ant" / "0000.png").read_bytes())
        zf.writestr("test/b/0.png", (root / "train" / "ant" / "0000.png").read_bytes())
    with pytest.raises(IgkdError, match=r"class folder train/b"):
        load_dataset("folder", archive, cache_dir=tmp_path / "cache")


def test_mixed_sizes_name_the_file(folder, tmp_path, capsys):
    root, _ = folder
    Image.new("RGB", (7, 7)).save(root / "train" / "cow" / "0002.png")
    with pytest.raises(IgkdError, match=r"mixed sizes: .*train/cow/0002.png is 7x7 while the first image is 6x5"):
        load_dataset("folder", root, cache_dir=tmp_path / "cache")
    message = cli_error(capsys, "--dataset", "folder", "--data-dir", str(root), "--cache-dir", str(tmp_path / "cache"))
    assert "train/cow/0002.png" in message


def test_unreadable_image_and_class_mismatch(folder, tmp_path):
    root, _ = folder
    (root / "test" / "ant" / "0001.png").write_bytes(b"not an image")
    with pytest.raises(IgkdError, match=r"cannot decode the image .*test/ant/0001.png"):
        load_dataset("folder", root, cache_dir=tmp_path / "cache")
    (root / "test" / "ant" / "0001.png").unlink()
    (root / "test" / "ant").rename(root / "test" / "ants")
    with pytest.raises(IgkdError, match=r"missing in test/: \['ant'\], only in test/: \['ants'\]"):
        load_dataset("folder", root, cache_dir=tmp_path / "cache")


def test_bad_containers(tmp_path):
    (tmp_path / "list.txt").write_text("x")
    with pytest.raises(IgkdError, match="neither a folder nor"):
        open_tree(tmp_path / "list.txt")
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(IgkdError, match="cannot open .*broken.zip as a zip archive"):
        load_dataset("folder", tmp_path / "broken.zip", cache_dir=tmp_path)
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b\x08\x00 truncated")
    with pytest.raises(IgkdError, match="cannot read the archive .*broken.tar.gz"):
        load_dataset("folder", tmp_path / "broken.tar.gz", cache_dir=tmp_path)
    with pytest.raises(IgkdError, match="cannot be downloaded"):
        load_dataset("folder", tmp_path, download=True)
