"""Image-folder datasets: ``train/<class>/*`` and ``test/<class>/*`` JPEG/PNG files.

The source is a directory, a ``.zip`` or a ``.tar.gz``; archive members are read
in memory, never extracted. Classes are the sorted folder names of ``train/``
(``test/`` must have the same set); samples go class by class, files sorted by
name within a class. A single top-level folder holding ``train/`` and ``test/``
is accepted too (archives often wrap their content in one).

Decoding tens of thousands of small images is the slow part, so it happens once,
in a pool of processes, and the decoded uint8 arrays are cached (see
:mod:`igkd.data.sources.cache`) under a key derived from the source fingerprint
(:mod:`igkd.data.sources.file_tree`): the next load reads one file.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import multiprocessing
import os
import re
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch

from igkd.data.dataset import Dataset, ImageSet, content_fingerprint
from igkd.data.sources.cache import cache_root, read_arrays, write_arrays
from igkd.data.sources.file_tree import FileTree, open_tree
from igkd.progress import progress_bar
from igkd.errors import IgkdError

NAME = "folder"
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CACHE_FORMAT = 1
WORKERS_ENV = "IGKD_DECODE_WORKERS"
POOL_MIN_IMAGES = 4096  # below this, starting worker processes costs more than it saves
CHUNK = 1024  # images per task sent to a worker
_LAYOUT_HELP = "a folder dataset holds train/<class>/*.jpg|png and test/<class>/*.jpg|png"


@dataclass(frozen=True)
class Layout:
    classes: tuple[str, ...]
    files: dict[str, list[str]]  # split -> file paths in sample order
    labels: dict[str, np.ndarray]  # split -> int64 label of each file


# the source signature that load_dataset calls: every source repeats it, on purpose (a module-level interface)
def load(
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    url: str | None = None,
    progress: bool = True,
) -> Dataset:
    """Load an image-folder dataset, decoding it only if the cache has no copy for this exact source."""
    if download or url:
        raise IgkdError("the folder dataset reads local files and cannot be downloaded; pass --data-dir instead")
    if data_dir is None:
        raise IgkdError(f"the folder dataset needs --data-dir: a folder, .zip or .tar.gz ({_LAYOUT_HELP})")
    tree = open_tree(data_dir, keep=IMAGE_SUFFIXES)
    source_fingerprint = tree.fingerprint()
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, source_fingerprint, _pillow_version()]).encode()).hexdigest()[:32]
    cache_file = cache_root(cache_dir) / NAME / f"{key}.npz"
    cached = read_arrays(cache_file)
    if cached is not None and cached[2].get("source_fingerprint") == source_fingerprint:
        arrays, classes, _ = cached
    else:
        layout = find_layout(tree)
        classes = layout.classes
        arrays = decode_layout(tree, layout, progress=progress)
        meta = {
            "format": CACHE_FORMAT,
            "source": str(tree.path),
            "source_fingerprint": source_fingerprint,
            "pillow": _pillow_version(),
        }
        write_arrays(cache_file, arrays, classes, meta)
    train = ImageSet(torch.from_numpy(arrays["train_images"]), torch.from_numpy(arrays["train_labels"]))
    test = ImageSet(torch.from_numpy(arrays["test_images"]), torch.from_numpy(arrays["test_labels"]))
    fingerprint = content_fingerprint(train.images, train.labels, test.images, test.labels, extra=NAME)
    return Dataset(NAME, classes, train, test, fingerprint, source=str(tree.path))


def find_layout(tree: FileTree) -> Layout:
    """Classes and the ordered image files of each split; IgkdError for anything off-layout."""
    folders, files = set(), []
    for name, is_dir in tree.entries():
        parts = name.split("/")
        folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
        if is_dir:
            folders.add(name)
        else:
            files.append(name)
    prefix = _root_prefix(tree, folders)
    classes = {split: _subfolders(folders, prefix + split) for split in SPLITS}
    if not classes["train"]:
        raise IgkdError(f"{prefix}train/ in {tree.path} has no class folders; {_LAYOUT_HELP}")
    if classes["test"] != classes["train"]:
        missing, extra = sorted(classes["train"] - classes["test"]), sorted(classes["test"] - classes["train"])
        raise IgkdError(
            f"the test classes of {tree.path} do not match the train classes: "
            f"missing in test/: {missing or 'none'}, only in test/: {extra or 'none'}"
        )
    ordered = tuple(sorted(classes["train"]))
    per_folder = collections.defaultdict(list)
    for name in files:
        folder, _, base = name.rpartition("/")
        if base.lower().endswith(IMAGE_SUFFIXES) and not base.startswith("."):
            per_folder[folder].append(name)
    layout_files, layout_labels = {}, {}
    for split in SPLITS:
        layout_files[split], labels = [], []
        for label, name in enumerate(ordered):
            images = sorted(per_folder.get(f"{prefix}{split}/{name}", []))
            if not images:
                raise IgkdError(f"the class folder {prefix}{split}/{name} in {tree.path} holds no .jpg, .jpeg or .png image")
            layout_files[split] += images
            labels += [label] * len(images)
        layout_labels[split] = np.asarray(labels, dtype=np.int64)
    return Layout(ordered, layout_files, layout_labels)


def decode_layout(tree: FileTree, layout: Layout, *, progress: bool = True) -> dict[str, np.ndarray]:
    """Decode every image of the layout into ``{split}_images`` uint8 [N, 3, H, W] and ``{split}_labels``."""
    names = layout.files["train"] + layout.files["test"]
    where = [tree.describe(name) for name in names]
    first = decode_image(next(tree.read(names[:1])), where[0])
    size = first.shape[:2]
    images = np.empty((len(names), 3, *size), dtype=np.uint8)
    blobs = tree.read(names)
    chunks = [(start, min(start + CHUNK, len(names))) for start in range(0, len(names), CHUNK)]
    workers = decode_workers() if len(names) >= POOL_MIN_IMAGES else 1
    description = f"decoding {tree.path.name}"
    if workers == 1:
        with progress_bar(len(names), description, enabled=progress) as bar:
            for start, stop in chunks:
                images[start:stop] = decode_images(list(islice(blobs, stop - start)), where[start:stop], size)
                bar.advance(stop - start, items=stop - start)
    else:
        executor = _process_pool(workers)
        try:
            executor.submit(int).result()  # start the workers before the progress bar starts its thread
            pending: collections.deque[tuple[int, int, Future]] = collections.deque()
            with progress_bar(len(names), description, enabled=progress) as bar:
                for start, stop in chunks:
                    batch = list(islice(blobs, stop - start))
                    pending.append((start, stop, executor.submit(decode_images, batch, where[start:stop], size)))
                    while len(pending) > 2 * workers or (pending and stop == len(names)):
                        done_start, done_stop, future = pending.popleft()
                        images[done_start:done_stop] = future.result()
                        bar.advance(done_stop - done_start, items=done_stop - done_start)
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
    n_train = len(layout.files["train"])
    return {
        "train_images": images[:n_train],
        "train_labels": layout.labels["train"],
        "test_images": images[n_train:],
        "test_labels": layout.labels["test"],
    }


def decode_images(blobs: list[bytes], where: list[str], size: tuple[int, int]) -> np.ndarray:
    """uint8 [n, 3, H, W] from encoded images that must all be ``size`` (H, W); runs in worker processes."""
    out = np.empty((len(blobs), *size, 3), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        out[i] = decode_image(blob, where[i], size)
    return out.transpose(0, 3, 1, 2)


def decode_image(blob: bytes, where: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """One RGB image as uint8 [H, W, 3]."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob), formats=("JPEG", "PNG")) as image:
            pixels = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except Exception as err:  # noqa: BLE001 - any failure to decode a file is bad input
        reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(err)).strip() or "unreadable data"
        raise IgkdError(f"cannot decode the image {where} ({type(err).__name__}: {reason}); replace or remove it") from None
    if size is not None and pixels.shape[:2] != tuple(size):
        raise IgkdError(
            f"images of mixed sizes: {where} is {pixels.shape[1]}x{pixels.shape[0]} while the first image is "
            f"{size[1]}x{size[0]}; every image of a folder dataset must have the same size"
        )
    return pixels


def _root_prefix(tree: FileTree, folders: set[str]) -> str:
    """``""`` if train/ and test/ are at the top, ``"<top>/"`` if one top-level folder holds them."""
    if {"train", "test"} <= folders:
        return ""
    tops = sorted(f for f in folders if "/" not in f and not f.startswith((".", "__MACOSX")))
    wrapped = [top for top in tops if {f"{top}/train", f"{top}/test"} <= folders]
    if len(wrapped) == 1:
        return wrapped[0] + "/"
    found = ", ".join(tops[:8]) + (", ..." if len(tops) > 8 else "") if tops else "no folders"
    raise IgkdError(f"{tree.path} has no train/ and test/ folders (top level: {found}); {_LAYOUT_HELP}")


def _subfolders(folders: set[str], parent: str) -> set[str]:
    start = parent + "/"
    names = (folder[len(start):] for folder in folders if folder.startswith(start))
    return {name for name in names if "/" not in name and not name.startswith(".")}


def decode_workers() -> int:
    """Processes that decode images: ``$IGKD_DECODE_WORKERS``, else the usable cores (at most 8).

    A daemonic process (e.g. a multiprocessing pool worker) may not start children: it decodes alone.
    """
    if multiprocessing.current_process().daemon:
        return 1
    if os.environ.get(WORKERS_ENV):
        try:
            return max(1, int(os.environ[WORKERS_ENV]))
        except ValueError:
            raise IgkdError(f"${WORKERS_ENV} must be a whole number of processes, got {os.environ[WORKERS_ENV]!r}") from None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, 8)


def _process_pool(workers: int) -> ProcessPoolExecutor:
    # fork starts workers in milliseconds; spawn (the only choice on some platforms) re-imports igkd and torch.
    methods = multiprocessing.get_all_start_methods()
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork" if "fork" in methods else None))


def _pillow_version() -> str:
    import PIL

    return PIL.__version__
