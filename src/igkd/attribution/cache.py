"""Teacher attribution maps computed once, stored in dataset index order, checked on every use.

A cache folder holds:

* ``maps.npy``: one float16 array [N, H, W] (numpy ``.npy``, memory-mapped), row i =
  the map of image i of the split, computed on the image as stored (no shuffling, no
  crop, no flip). The trainer applies each batch's crop/flip to the maps it looks up.
* ``manifest.json``: what the maps are (teacher checkpoint sha256, dataset name and
  fingerprint, split, N/H/W, method and all its parameters, reduction, target), how they
  were made (precision, chunking, environment, wall time, images/s), completeness-error
  statistics, the sha256 of ``maps.npy``, and ``"complete": true`` once finished.
* ``maps.partial.npy`` and ``progress.json`` while a computation runs: the maps are
  staged (with their disk space reserved up front) beside any finished cache, and the
  progress file counts the chunks done. Each chunk's maps are flushed to disk before the
  progress file is replaced (atomically) to count it, so a run killed at any point (even
  ``kill -9``) resumes at the first chunk not counted and ends byte-identical to an
  uninterrupted run. Everything is deterministic given the chunking, which a resumed run
  takes from the progress file. Only a complete build is moved onto ``maps.npy`` (its
  manifest written last), so ``--force`` never leaves the folder without a usable cache,
  and every option is checked on one image before anything in the folder changes.

:func:`open_attributions` refuses a cache that is incomplete or was built for another
teacher, dataset, split or parameters, with one line naming the field and both values.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from igkd.atomic import atomic_write_json, read_json_bytes, read_json_object
from igkd.attribution.engine import default_max_batch
from igkd.attribution.maps import REDUCTIONS, reduce_map
from igkd.attribution.methods import get_method, method_parameters, run_method
from igkd.devices import resolve_device
from igkd.errors import IgkdError
from igkd.progress import progress_bar
from igkd.provenance import environment, sha256_file

FORMAT = "igkd-attributions"
FORMAT_VERSION = 1
MAPS_FILE, MANIFEST_FILE, PROGRESS_FILE = "maps.npy", "manifest.json", "progress.json"
STAGED_MAPS_FILE = "maps.partial.npy"  # a build in progress; moved onto MAPS_FILE when complete
PRECISIONS = ("auto", "fp32", "bf16")
TARGETS = ("label", "predicted")
DEFAULT_CHUNK = {"cpu": 64, "cuda": 1024}
COMPLETENESS_TOLERANCE = 0.01
# Manifest fields that say how a run went rather than what it computed.
RUN_FIELDS = ("environment", "wall_s", "images_per_s", "sessions")
REBUILD_HINT = "rebuild it with 'igkd attributions compute ... --force' (force=True), or use another output folder"


@dataclass(frozen=True)
class AttributionCache:
    """An opened, verified cache: ``maps`` is a read-only float16 memmap [N, H, W] in dataset index order."""

    path: Path
    maps: np.ndarray
    manifest: dict
    manifest_sha256: str
    reused: bool = False  # set by compute_attributions when it found this cache already complete

    def __len__(self) -> int:
        return self.maps.shape[0]

    def tensor(self) -> torch.Tensor:
        """All maps as an in-memory float16 tensor [N, H, W]."""
        return torch.from_numpy(np.array(self.maps))


def model_state_sha256(model: torch.nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the model's state dict."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()




def _first_mismatch(found: dict, wanted: dict) -> str | None:
    for key, value in wanted.items():
        if found.get(key) != value:
            return f"{key}={found.get(key)!r}, not the requested {key}={value!r}"
    return None


def _split(dataset, split: str):
    if split not in ("train", "test"):
        raise IgkdError(f"unknown split {split!r}: use train or test")
    images = getattr(dataset, split)
    if len(images) == 0:
        raise IgkdError(f"dataset {dataset.name} has no {split} images")
    return images


def _open_maps(directory: Path, manifest: dict, mode: str = "r", name: str = MAPS_FILE) -> np.memmap:
    path = directory / name
    shape = (manifest.get("n"), manifest.get("height"), manifest.get("width"))
    try:
        maps = np.load(path, mmap_mode=mode)
    except (OSError, ValueError) as err:
        raise IgkdError(f"attribution maps {path} are missing or unreadable ({type(err).__name__}): {REBUILD_HINT}") from None
    if maps.dtype != np.float16 or maps.shape != shape:
        raise IgkdError(f"attribution maps {path} hold {maps.dtype} {maps.shape}, but the manifest says float16 {shape}: {REBUILD_HINT}")
    return maps


def open_attributions(
    out_dir: str | Path,
    *,
    teacher_sha256: str | None = None,
    dataset_fingerprint: str | None = None,
    split: str | None = None,
    expect: dict | None = None,
    verify: bool = False,
) -> AttributionCache:
    """Open the cache in ``out_dir``, refusing it unless complete and built for what is asked.

    ``teacher_sha256``/``dataset_fingerprint``/``split`` and every ``expect`` item (manifest
    field -> value, e.g. ``{"n_steps": 50, "baseline": "black"}``) must equal the manifest's.
    ``verify`` also checks the sha256 of the maps file (reads it whole).
    """
    directory = Path(out_dir)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        if (directory / PROGRESS_FILE).is_file():
            raise IgkdError(
                f"attribution cache {directory} is incomplete (its computation was interrupted): rerun 'igkd attributions compute' "
                "with the same arguments to resume it, or add --force to rebuild it"
            )
        raise IgkdError(f"no attribution cache in {directory} (no {MANIFEST_FILE}): build one with 'igkd attributions compute'")
    raw = read_json_bytes(manifest_path)
    try:
        manifest = json.loads(raw)
    except ValueError as err:
        raise IgkdError(f"attribution manifest {manifest_path} is not valid JSON ({err}): {REBUILD_HINT}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IgkdError(f"{manifest_path} is not an igkd attribution manifest: {REBUILD_HINT}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IgkdError(f"attribution cache {directory} has format version {manifest.get('format_version')!r}, this igkd reads {FORMAT_VERSION}: {REBUILD_HINT}")
    if manifest.get("complete") is not True:
        raise IgkdError(
            f"attribution cache {directory} is incomplete (its computation was interrupted): rerun 'igkd attributions compute' "
            "with the same arguments to resume it, or add --force to rebuild it"
        )
    wanted = {"teacher_sha256": teacher_sha256, "dataset_fingerprint": dataset_fingerprint, "split": split}
    wanted = {k: v for k, v in wanted.items() if v is not None} | dict(expect or {})
    mismatch = _first_mismatch(manifest, wanted)
    if mismatch:
        raise IgkdError(f"attribution cache {directory} was built for {mismatch}: {REBUILD_HINT}")
    maps = _open_maps(directory, manifest)
    if verify and sha256_file(directory / MAPS_FILE) != manifest.get("maps_sha256"):
        raise IgkdError(f"attribution maps {directory / MAPS_FILE} do not match the sha256 in the manifest (damaged file): {REBUILD_HINT}")
    return AttributionCache(directory, maps, manifest, hashlib.sha256(raw).hexdigest())


def content_identity(manifest: dict) -> str:
    """sha256 of what a cache's maps are (teacher, data, method, parameters, precision), not of how or
    when they were made: a cache recomputed for the same teacher and settings on another machine (the
    next GPU job) has the same content identity, though its manifest bytes differ."""
    keys = [k for k in manifest if k not in RUN_FIELDS and k not in ("maps_sha256", "max_batch", "chunk_size", "precision_requested", "precision_check", "completeness", "maps_file")]
    text = json.dumps({k: manifest[k] for k in sorted(keys)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _identity(model, dataset, split, n, height, width, method, params, reduction, target, teacher_sha256) -> dict:
    """The manifest fields that define the maps; a cache is reused only if all are equal."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "teacher_sha256": teacher_sha256,
        "model_state_sha256": model_state_sha256(model),
        "dataset": dataset.name,
        "dataset_fingerprint": dataset.fingerprint,
        "split": split,
        "n": n,
        "height": height,
        "width": width,
        "order": "dataset index",
        "dtype": "float16",
        "method": method,
        **params,
        "reduction": reduction,
        "target": target,
        **_architecture(model),
    }


def _architecture(model) -> dict:
    """An external teacher's architecture as the cache records it (factory, arguments, normalisation), beside its
    weights' sha256; nothing for the family's models, whose caches keep the fields they always had."""
    from igkd.models.external import is_external
    from igkd.models.registry import spec_of

    spec = spec_of(model)
    if not is_external(spec):
        return {}
    return {"teacher_arch": {k: spec[k] for k in ("factory", "kwargs", "normalize", "input_shape")}}


def _chunk_stats(values: torch.Tensor, delta: torch.Tensor | None) -> dict | None:
    """Completeness error of one chunk: sums and maxima of |delta| and |F(x) - F(x')| (gain = sum(values) - delta)."""
    if delta is None:
        return None
    delta = delta.double()
    gain = values.double().sum((1, 2, 3)) - delta
    return {
        "n": int(delta.numel()),
        "sum_abs_delta": float(delta.abs().sum()),
        "max_abs_delta": float(delta.abs().max()),
        "sum_abs_gain": float(gain.abs().sum()),
        "over_tolerance": int((delta.abs() > COMPLETENESS_TOLERANCE * gain.abs()).sum()),
    }


def _completeness(stats: list) -> dict | None:
    if not stats or any(s is None for s in stats):
        return None
    n = sum(s["n"] for s in stats)
    total_delta, total_gain = sum(s["sum_abs_delta"] for s in stats), sum(s["sum_abs_gain"] for s in stats)
    return {
        "definition": "delta = sum(attributions) - (F_t(x) - F_t(baseline)) per image, before the map reduction",
        "mean_abs_delta": total_delta / n,
        "max_abs_delta": max(s["max_abs_delta"] for s in stats),
        "mean_abs_output_change": total_gain / n,
        "relative": total_delta / total_gain if total_gain > 0 else None,
        "fraction_over_1pct": sum(s["over_tolerance"] for s in stats) / n,
    }


def _remove_temporaries(directory: Path) -> None:
    """Delete temporaries that a killed atomic write left behind."""
    for name in (PROGRESS_FILE, MAPS_FILE, MANIFEST_FILE):
        for stale in directory.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)


def _remove_build(directory: Path) -> None:
    """Delete an unfinished build (its progress record and staged maps); a finished cache is untouched."""
    (directory / PROGRESS_FILE).unlink(missing_ok=True)
    (directory / STAGED_MAPS_FILE).unlink(missing_ok=True)
    _remove_temporaries(directory)


def _resumable(directory: Path, identity: dict) -> dict | None:
    """The progress record of an interrupted build of the same computation, or None."""
    progress = read_json_object(directory / PROGRESS_FILE)
    if progress is None or progress.get("identity") != identity:
        return None
    n_chunks = -(-identity["n"] // progress.get("chunk_size", 0)) if progress.get("chunk_size", 0) > 0 else -1
    if progress.get("n_chunks") != n_chunks or not 0 <= progress.get("done", -1) <= n_chunks:
        return None
    if len(progress.get("stats", [])) != progress["done"]:
        return None
    staged = directory / STAGED_MAPS_FILE
    if not staged.exists() and progress["done"] == n_chunks and not read_json_object(directory / MANIFEST_FILE):
        staged = directory / MAPS_FILE  # killed between moving the finished maps into place and writing the manifest
    try:
        _open_maps(directory, identity, name=staged.name)
    except IgkdError:
        return None
    return {**progress, "maps_file": staged.name}


def _reserve(path: Path) -> None:
    """Give the staged maps file real disk blocks now, so running out of space is an error here and
    not a SIGBUS when a memory-mapped page is written later."""
    size = path.stat().st_size
    try:
        with open(path, "r+b") as handle:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(handle.fileno(), 0, size)
            else:  # write every block: no sparse holes
                block = 1 << 20
                for offset in range(0, size, block):
                    handle.seek(offset)
                    handle.write(b"\0" * min(block, size - offset))
                handle.flush()
                os.fsync(handle.fileno())
    except OSError as err:
        path.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise IgkdError(f"disk full: the maps need {size / 2**20:.1f} MiB in {path.parent}; free space there and re-run") from None
        raise


def _validate_options(model, images, target: str, method: str, params: dict, max_batch, precision: str, device: torch.device) -> None:
    """Run the computation on one image, so that every bad option fails before the cache folder is touched."""
    if max_batch is not None and max_batch < 1:
        raise IgkdError(f"--max-batch must be at least 1 (interpolated samples per pass), got {max_batch}")
    x = images.images[:1].to(device).float().div_(255)
    wanted = images.labels[:1].to(device) if target == "label" else "predicted"
    run_method(model, x, wanted, method, **params, max_batch=max_batch, precision=precision)


def compute_attributions(
    model: torch.nn.Module,
    dataset,
    out_dir: str | Path,
    *,
    split: str = "train",
    method: str = "ig",
    reduction: str = "abs_sum",
    n_steps: int = 50,
    baseline: str = "black",
    rule: str = "gausslegendre",
    target: str = "label",
    method_options: dict | None = None,
    chunk_size: int | None = None,
    max_batch: int | None = None,
    precision: str = "auto",
    device: str | torch.device = "auto",
    teacher_sha256: str | None = None,
    force: bool = False,
    progress: bool = True,
    on_chunk: Callable[[int, int], None] | None = None,
) -> AttributionCache:
    """Compute one map per image of ``dataset``'s ``split`` into ``out_dir``, or reuse/resume a matching cache.

    ``model`` (moved to ``device``) is the teacher; ``teacher_sha256`` is its checkpoint's sha256
    (``igkd.provenance.sha256_file``), which consumers check. ``n_steps``/``baseline``/``rule``
    apply to the methods that take them; ``method_options`` holds further method parameters
    (e.g. ``{"nt_samples": 10}``). ``target``: ``label`` (the true class) or ``predicted``.
    A complete cache with the same identity is reused; an interrupted one resumes; one built
    for anything else is refused unless ``force``, which rebuilds. ``on_chunk(done, total)``
    is called after each chunk is committed.
    """
    if reduction not in REDUCTIONS:
        raise IgkdError(f"unknown reduction {reduction!r}: use one of {', '.join(REDUCTIONS)}")
    if target not in TARGETS:
        raise IgkdError(f"unknown target {target!r}: use label or predicted")
    if precision not in PRECISIONS:
        raise IgkdError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if not isinstance(baseline, str):
        raise IgkdError("cached attributions take a named baseline (black, mean or blur)")
    if chunk_size is not None and chunk_size < 1:
        raise IgkdError(f"chunk size must be >= 1, got {chunk_size}")
    shared = {"n_steps": n_steps, "baseline": baseline, "rule": rule}
    defaults = get_method(method).defaults
    params = method_parameters(method, **{k: v for k, v in shared.items() if k in defaults}, **(method_options or {}))
    images = _split(dataset, split)
    n, height, width = len(images), *images.images.shape[-2:]
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and num_classes != len(dataset.classes):
        raise IgkdError(f"the teacher has {num_classes} outputs but dataset {dataset.name} has {len(dataset.classes)} classes")
    device = device if isinstance(device, torch.device) else resolve_device(device)
    model = model.to(device)

    directory = Path(out_dir)
    if directory.exists() and not directory.is_dir():
        raise IgkdError(f"--out {directory} is a file: give a folder for the attribution cache")
    identity = _identity(model, dataset, split, n, height, width, method, params, reduction, target, teacher_sha256)
    existing = read_json_object(directory / MANIFEST_FILE)
    if (directory / MANIFEST_FILE).exists() and not force:
        if existing is None:
            raise IgkdError(f"{directory / MANIFEST_FILE} is unreadable: {REBUILD_HINT}")
        mismatch = _first_mismatch(existing, identity) or _precision_mismatch(existing, precision)
        if mismatch:
            raise IgkdError(f"attribution cache {directory} was built for {mismatch}: {REBUILD_HINT}")
        if existing.get("complete") is True:
            return dataclasses.replace(open_attributions(directory, expect=identity), reused=True)
    state = _resumable(directory, identity) if directory.is_dir() else None
    if state is not None and _precision_mismatch(state, precision):
        if not force:
            raise IgkdError(f"{directory} holds an interrupted computation in {_precision_mismatch(state, precision)}: rerun it with that precision (or auto), or add --force")
        state = None
    if state is None and not force and (directory / PROGRESS_FILE).exists():
        found = (read_json_object(directory / PROGRESS_FILE) or {}).get("identity") or {}
        mismatch = _first_mismatch(found, identity) or "another computation"
        raise IgkdError(
            f"{directory} holds an interrupted computation of {mismatch}: rerun that command to resume it, "
            "add --force to replace it, or use another output folder"
        )
    # Nothing has been written yet: every option is checked on one image first, so a bad one
    # fails here and a cache already in the folder stays as it was.
    _validate_options(model, images, target, method, params, max_batch, state["precision"] if state else precision, device)

    # A new build is staged beside any finished cache (maps.partial.npy + progress.json) and moved
    # into place only when complete: --force never leaves the folder without a usable cache.
    directory.mkdir(parents=True, exist_ok=True)
    if state is None:
        _remove_build(directory)
        chunk = chunk_size or DEFAULT_CHUNK["cuda" if device.type == "cuda" else "cpu"]
        state = {"identity": identity, "chunk_size": chunk, "n_chunks": -(-n // chunk), "done": 0, "precision": None, "stats": [], "elapsed_s": 0.0, "sessions": 0}
        np.lib.format.open_memmap(directory / STAGED_MAPS_FILE, mode="w+", dtype=np.float16, shape=(n, height, width)).flush()
        _reserve(directory / STAGED_MAPS_FILE)
        state["maps_file"] = STAGED_MAPS_FILE
        _commit_progress(directory, state, 0)
    else:
        _remove_temporaries(directory)
    state["sessions"] += 1

    chunk = state["chunk_size"]
    maps = _open_maps(directory, identity, mode="r+", name=state["maps_file"])
    started = time.perf_counter()
    with progress_bar(n, f"{method} maps ({dataset.name} {split})", enabled=progress) as bar:
        bar.advance(min(n, state["done"] * chunk), items=0)
        for index in range(state["done"], state["n_chunks"]):
            start, stop = index * chunk, min(n, (index + 1) * chunk)
            x = images.images[start:stop].to(device).float().div_(255)
            wanted = images.labels[start:stop].to(device) if target == "label" else "predicted"
            result = run_method(model, x, wanted, method, **params, max_batch=max_batch, precision=state["precision"] or precision)
            maps[start:stop] = reduce_map(result.values, reduction).to(torch.float16).cpu().numpy()
            maps.flush()
            state.update(
                done=index + 1,
                precision=result.precision,
                elapsed_s=state["elapsed_s"] + (time.perf_counter() - started),
            )
            state["stats"].append(_chunk_stats(result.values, result.delta))
            if result.precision_check is not None:
                state["precision_check"] = result.precision_check
            started = time.perf_counter()
            _commit_progress(directory, state, index + 1)
            bar.advance(stop - start, items=stop - start, status=result.precision)
            if on_chunk is not None:
                on_chunk(index + 1, state["n_chunks"])
    del maps

    wall = state["elapsed_s"]
    manifest = {
        **identity,
        "precision": state["precision"],
        "precision_requested": precision,
        "precision_check": state.get("precision_check"),
        "chunk_size": chunk,
        "max_batch": max_batch or default_max_batch(device, height, width),
        "completeness": _completeness(state["stats"]) if get_method(method).has_delta else None,
        "maps_file": MAPS_FILE,
        "maps_sha256": sha256_file(directory / state["maps_file"]),
        "environment": environment(device),
        "wall_s": round(wall, 3),
        "images_per_s": round(n / wall, 2) if wall > 0 else None,
        "sessions": state["sessions"],
        "complete": True,
    }
    _swap_in(directory, state["maps_file"], manifest)
    return open_attributions(directory, expect=identity)


def _precision_mismatch(manifest: dict, requested: str) -> str | None:
    """A finished cache serves ``auto`` whatever precision it used; an explicit fp32/bf16 must match."""
    used = manifest.get("precision")
    if requested != "auto" and used is not None and used != requested:
        return f"precision={used!r}, not the requested precision={requested!r}"
    return None


def _commit_progress(directory: Path, state: dict, chunk: int) -> None:
    try:
        atomic_write_json(directory / PROGRESS_FILE, state)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise IgkdError(f"disk full at chunk {chunk} of {state['n_chunks']} in {directory}: free space and re-run the same command to resume") from None
        raise


def _swap_in(directory: Path, staged: str, manifest: dict) -> None:
    """Replace the folder's cache by the finished build. A kill at any point leaves either the old
    cache, or no manifest plus a build that the same command finishes (see :func:`_resumable`)."""
    if staged != MAPS_FILE:
        (directory / MANIFEST_FILE).unlink(missing_ok=True)  # the old manifest must never describe the new maps
        os.replace(directory / staged, directory / MAPS_FILE)
    atomic_write_json(directory / MANIFEST_FILE, manifest)
    (directory / PROGRESS_FILE).unlink(missing_ok=True)
