"""Atomic writes: a file is either its old content or its complete new content.

Every artefact igkd writes (checkpoints, caches, JSON summaries, reports) goes
through these helpers: write to a temporary file in the same folder, flush and
fsync, then ``os.replace`` it onto the destination.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path``; on success rename it onto ``path``."""
    path = Path(path)
    if not path.parent.is_dir():
        from igkd.errors import IgkdError

        raise IgkdError(f"cannot write {path}: folder {path.parent} does not exist (create it first)")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.filename is None and err.errno is not None:
            raise _with_path(err, path) from err  # e.g. ENOSPC from write(): say which file
        raise


def _with_path(err: OSError, path: Path) -> OSError:
    return type(err)(err.errno, err.strerror or os.strerror(err.errno), str(path))


def remove_stale_temporaries(directory: str | os.PathLike, names) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files that writes killed half-way (``kill -9``) left in ``directory``."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for name in names:
        for stale in directory.glob(f".{name}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
                removed.append(stale)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    import torch

    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and fsync (metrics logs)."""
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        if err.filename is None and err.errno is not None:
            raise _with_path(err, Path(path)) from err
        raise


MAX_JSON_BYTES = 8 * 2**20  # every JSON file igkd writes is far smaller; a bigger one came from elsewhere


def read_json_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of the JSON file ``path``, read only when it is at most :data:`MAX_JSON_BYTES`.

    Raises OSError (missing, unreadable) or, for a bigger file, IgkdError naming it.
    """
    with open(path, "rb") as handle:
        data = handle.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        from igkd.errors import IgkdError

        raise IgkdError(f"{path} is over {MAX_JSON_BYTES // 2**20} MiB, far more than any JSON file igkd writes: "
                        "it did not come from igkd; remove or replace it")
    return data


def load_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path`` (at most :data:`MAX_JSON_BYTES`): every reader of igkd's JSON files goes
    through here. Raises OSError (missing, unreadable), ValueError (not UTF-8 JSON) or IgkdError (too big)."""
    return json.loads(read_json_bytes(path).decode("utf-8"))


def read_json_object(path: str | os.PathLike) -> dict | None:
    """The JSON object in ``path``, or None when it is missing, unreadable or not an object
    (the reading side of these helpers: callers treat None as 'not written yet'). A file over
    :data:`MAX_JSON_BYTES` is an error (IgkdError), not None."""
    try:
        data = load_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
