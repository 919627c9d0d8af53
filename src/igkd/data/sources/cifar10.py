"""CIFAR-10 from its official python distribution (``cifar-10-python.tar.gz``).

The data can be the extracted ``cifar-10-batches-py/`` folder (or a folder that
holds it), the archive itself (read in memory, never extracted), or a download
of the archive. Official files are checked against their published md5s before
they are unpickled; a home-built copy in the same format (tests, a re-packed
subset) can switch that off with ``verify_md5=False`` or the environment variable
``IGKD_CIFAR10_VERIFY_MD5=0``. Unpickling itself only accepts numpy arrays and
plain values (see :mod:`igkd.data.sources.safe_pickle`).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from igkd.data.dataset import Dataset, ImageSet, content_fingerprint
from igkd.data.sources.cache import cache_root
from igkd.data.sources.download import download_file
from igkd.data.sources.safe_pickle import decode_text, load_pickled_dict
from igkd.errors import IgkdError

NAME = "cifar10"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DEFAULT_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
URL_ENV = "IGKD_CIFAR10_URL"
VERIFY_ENV = "IGKD_CIFAR10_VERIFY_MD5"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
BATCH_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
FILE_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
_FILES = (*TRAIN_FILES, TEST_FILE, META_FILE)
_HOW_TO_GET = (
    f"pass --data-dir with a folder holding {BATCH_FOLDER}/ or {ARCHIVE_NAME}, or add --download "
    f"(from {DEFAULT_URL}, or the URL in ${URL_ENV})"
)


# the source signature that load_dataset calls: every source repeats it, on purpose (a module-level interface)
def load(
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    url: str | None = None,
    progress: bool = True,
    verify_md5: bool | None = None,
) -> Dataset:
    """Load CIFAR-10 (50,000 train + 10,000 test, 32 x 32); without ``data_dir`` it lives under the cache root.

    ``verify_md5=None`` verifies unless ``$IGKD_CIFAR10_VERIFY_MD5`` is ``0``.
    """
    verify = os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no") if verify_md5 is None else verify_md5
    root = Path(data_dir).expanduser() if data_dir is not None else cache_root(cache_dir) / NAME
    source = _find_source(root)
    if source is None:
        if not download:
            where = f"{root} does not exist" if not root.exists() else f"{root} holds neither {BATCH_FOLDER}/ nor {ARCHIVE_NAME}"
            raise IgkdError(f"CIFAR-10 not found: {where}; {_HOW_TO_GET}")
        target = root if root.name.endswith((".tar.gz", ".tgz")) else root / ARCHIVE_NAME
        source = download_file(
            url or os.environ.get(URL_ENV) or DEFAULT_URL,
            target,
            md5=ARCHIVE_MD5 if verify else None,
            progress=progress,
            hint=f"Set ${URL_ENV} to a mirror or pass --data-dir with a local copy.",
        )
    files = _read_directory(source) if source.is_dir() else _read_archive(source)
    if verify:
        for name, expected in FILE_MD5.items():
            got = hashlib.md5(files[name][1], usedforsecurity=False).hexdigest()
            if got != expected:
                raise IgkdError(
                    f"{files[name][0]} has md5 {got}, expected {expected} (official CIFAR-10): the file is corrupt or "
                    f"modified; replace it (e.g. with --download), or set {VERIFY_ENV}=0 for a home-built copy in this format"
                )
    classes = _read_classes(*files[META_FILE])
    train = [_read_batch(*files[name], len(classes)) for name in TRAIN_FILES]
    test = _read_batch(*files[TEST_FILE], len(classes))
    train_set = ImageSet(torch.cat([images for images, _ in train]), torch.cat([labels for _, labels in train]))
    test_set = ImageSet(*test)
    fingerprint = content_fingerprint(train_set.images, train_set.labels, test_set.images, test_set.labels, extra=NAME)
    return Dataset(NAME, classes, train_set, test_set, fingerprint, source=str(source))


def _find_source(root: Path) -> Path | None:
    """The batch folder or the archive found at ``root``; None if neither is there."""
    if root.is_file():
        return root
    if not root.is_dir():
        return None
    if any((root / name).exists() for name in _FILES):
        return root
    if (root / BATCH_FOLDER).is_dir():
        return root / BATCH_FOLDER
    if (root / ARCHIVE_NAME).is_file():
        return root / ARCHIVE_NAME
    return None


def _read_directory(folder: Path) -> dict[str, tuple[str, bytes]]:
    files = {}
    for name in _FILES:
        path = folder / name
        if not path.is_file():
            raise IgkdError(f"{path} is missing: a CIFAR-10 folder holds {', '.join(_FILES)}; {_HOW_TO_GET}")
        files[name] = (str(path), path.read_bytes())
    return files


def _read_archive(archive: Path) -> dict[str, tuple[str, bytes]]:
    """The batch files of a CIFAR-10 tarball, read in memory (members matched by file name)."""
    files = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = PurePosixPath(member.name).name
                if member.isfile() and name in _FILES and name not in files:
                    files[name] = (f"{member.name} in {archive}", tar.extractfile(member).read())
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise IgkdError(
            f"cannot read the archive {archive} ({type(err).__name__}: {err}): it is truncated or corrupt; "
            "delete it and download it again"
        ) from None
    missing = [name for name in _FILES if name not in files]
    if missing:
        raise IgkdError(f"{archive} lacks {', '.join(missing)}: it is not the CIFAR-10 python archive ({ARCHIVE_NAME})")
    return files


def _read_classes(where: str, data: bytes) -> tuple[str, ...]:
    meta = load_pickled_dict(data, where)
    names = meta.get("label_names")
    if not isinstance(names, (list, tuple)) or not names:
        raise IgkdError(f"{where} has no 'label_names' list: it is not a CIFAR-10 batches.meta file")
    return tuple(decode_text(name) for name in names)


def _read_batch(where: str, data: bytes, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 [N, 3, 32, 32], int64 [N]) from one batch: ``data`` is [N, 3072] in channel-planar order."""
    batch = load_pickled_dict(data, where)
    pixels, labels = batch.get("data"), batch.get("labels")
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32:
        described = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise IgkdError(f"{where}: 'data' must be a uint8 array [N, 3072], got {described}; not a CIFAR-10 batch")
    try:
        labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        labels = np.empty(0, dtype=np.int64)
    if labels.shape != (pixels.shape[0],) or (labels.size and (labels.min() < 0 or labels.max() >= num_classes)):
        raise IgkdError(f"{where}: 'labels' must hold {pixels.shape[0]} integers in 0..{num_classes - 1}")
    return torch.from_numpy(pixels.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)
