"""Every dataset igkd can load, by name: ``load_dataset("cifar10", data_dir)``.

Each source module has ``load(data_dir, *, cache_dir, download, url, progress)``
returning a :class:`~igkd.data.dataset.Dataset`. Modules are imported on demand,
so loading one dataset never pulls in another's dependencies.
"""

from __future__ import annotations

import importlib
import os

from igkd.data.dataset import Dataset
from igkd.errors import IgkdError

_MODULES = {
    "cifar10": "igkd.data.sources.cifar10",
    "folder": "igkd.data.sources.image_folder",
    "digits": "igkd.data.sources.digits",
    "imagenet32-cifar": "igkd.data.sources.imagenet32",
}
DATASETS: tuple[str, ...] = tuple(_MODULES)


# the sources' own signature after ``name``: passed on whole, so it repeats theirs on purpose
def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    url: str | None = None,
    progress: bool = True,
) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`) as uint8 images + int64 labels.

    ``data_dir``: where the files are (folder or archive, per dataset); ``cache_dir``:
    the cache root (default ``$IGKD_CACHE`` or ``~/.cache/igkd``); ``download``/``url``:
    fetch the data if absent (cifar10 only); ``progress``: show progress bars on stderr.
    """
    key = str(name).strip().lower()
    if key not in _MODULES:
        raise IgkdError(f"unknown dataset {name!r}: known datasets are {', '.join(DATASETS)}")
    module = importlib.import_module(_MODULES[key])
    return module.load(data_dir, cache_dir=cache_dir, download=download, url=url, progress=progress)
