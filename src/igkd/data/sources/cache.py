"""Where igkd keeps what it can rebuild: ``$IGKD_CACHE``, else ``~/.cache/igkd``.

Decoded image folders are cached as one uncompressed ``.npz`` per source
(arrays already in the final N x 3 x H x W layout, so a cached load is a read and
no transposition). The file is written atomically and named after a key that
hashes the source fingerprint and the decoder version, so a changed source or a
new Pillow never reuses stale pixels. A cache file that cannot be read is
ignored and rebuilt.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np

from igkd.atomic import atomic_open

ARRAY_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$IGKD_CACHE``, else ``~/.cache/igkd``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("IGKD_CACHE"):
        return Path(os.environ["IGKD_CACHE"]).expanduser()
    return Path.home() / ".cache" / "igkd"


def read_arrays(path: Path) -> tuple[dict[str, np.ndarray], tuple[str, ...], dict] | None:
    """The arrays, class names and metadata of a cache file; None if absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {key: stored[key] for key in ARRAY_KEYS}
            classes = tuple(str(name) for name in stored["classes"])
            meta = json.loads(str(stored["meta"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as err:
        warnings.warn(f"ignoring unreadable cache file {path} ({err}); it will be rebuilt", stacklevel=2)
        return None
    return arrays, classes, meta


def write_arrays(path: Path, arrays: dict[str, np.ndarray], classes: tuple[str, ...], meta: dict) -> bool:
    """Atomically write a cache file; a cache that cannot be written is a warning, not an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "wb") as handle:
            np.savez(handle, **arrays, classes=np.array(classes, dtype=str), meta=np.array(json.dumps(meta)))
    except OSError as err:
        warnings.warn(f"could not write the cache file {path} ({err}); the next load decodes again", stacklevel=2)
        return False
    return True
