"""Folder locks: two igkd processes never write the same study or attribution cache at once.

An OS file lock (``fcntl.flock``) on a small file in the folder is released when its
process dies, so a killed run never leaves a stale lock. Where ``fcntl`` is missing
(Windows) there is no lock.
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Iterator

from igkd.errors import IgkdError

LOCK_FILE = ".lock"


@contextlib.contextmanager
def lock_file(path: str | os.PathLike, *, wait: bool = False, what: str | None = None) -> Iterator[None]:
    """Hold the OS lock of the file ``path`` (created if missing) while the block runs.

    ``wait=False``: refuse at once (IgkdError naming the holder) when another process holds it;
    ``wait=True``: block until it is free (for short read-modify-write sections).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = Path(path)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise IgkdError(f"{what or path.parent} is being run by another process ({holder}); wait for it or stop it first") from None
        try:
            handle.truncate(0)
            handle.write(f"pid {os.getpid()} on {platform.node()}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def folder_lock(folder: str | os.PathLike, *, name: str = LOCK_FILE, wait: bool = False, what: str | None = None):
    """:func:`lock_file` of ``folder/name`` (the folder must exist)."""
    return lock_file(Path(folder) / name, wait=wait, what=what or str(folder))


def sibling_lock(folder: str | os.PathLike, *, wait: bool = False, what: str | None = None):
    """:func:`lock_file` of ``.<name>.lock`` beside ``folder``: holds even while the folder itself is replaced.

    The parent folder is created if needed.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return lock_file(folder.parent / f".{folder.name}.lock", wait=wait, what=what or str(folder))
