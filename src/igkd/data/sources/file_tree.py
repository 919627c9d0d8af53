"""A directory, a zip or a tar(.gz) read as one tree of files, without extracting anything.

:class:`FileTree` lists the entries (files and folders, ``/``-separated paths)
and reads file contents, and gives a fingerprint of the source that keys the
decoded-image cache: for an archive its size and sha256 (a path, size and mtime
would not notice an archive replaced in place), for a directory the sorted
relative paths, sizes and modification times of its files.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Iterable, Iterator

from igkd.errors import IgkdError
from igkd.provenance import sha256_file

ZIP_SUFFIXES = (".zip",)
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def open_tree(path: str | os.PathLike, *, keep: tuple[str, ...] = ()) -> "FileTree":
    """The tree at ``path``: a directory, ``.zip``, ``.tar.gz``/``.tgz`` or ``.tar``.

    ``keep``: file suffixes (lower case) whose contents a tar keeps in memory when
    it is listed; a tar is read in one sequential pass, as gzip allows no seeking.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise IgkdError(f"{path} does not exist: give a folder, a .zip or a .tar.gz")
    if path.is_dir():
        return DirectoryTree(path)
    name = path.name.lower()
    if name.endswith(ZIP_SUFFIXES):
        return ZipTree(path)
    if name.endswith(TAR_SUFFIXES):
        return TarTree(path, keep)
    raise IgkdError(f"{path} is neither a folder nor a .zip, .tar.gz, .tgz or .tar archive")


class FileTree:
    path: Path

    def entries(self) -> list[tuple[str, bool]]:
        """(relative path, is a folder) of every entry; folders may also be implied by file paths."""
        raise NotImplementedError

    def read(self, names: Iterable[str]) -> Iterator[bytes]:
        """Contents of the named files, in the order given."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def describe(self, name: str) -> str:
        """How to name one file of the tree in a message."""
        return f"{name} in {self.path}"


class DirectoryTree(FileTree):
    def __init__(self, path: Path):
        self.path = path

    def entries(self) -> list[tuple[str, bool]]:
        found = []
        for folder, dirs, files in os.walk(self.path, followlinks=True):
            relative = Path(folder).relative_to(self.path).as_posix()
            prefix = "" if relative == "." else relative + "/"
            found += [(prefix + name, True) for name in dirs] + [(prefix + name, False) for name in files]
        return found

    def read(self, names: Iterable[str]) -> Iterator[bytes]:
        for name in names:
            try:
                yield (self.path / name).read_bytes()
            except OSError as err:
                raise IgkdError(f"cannot read {self.path / name}: {err.strerror or err}") from None

    def fingerprint(self) -> str:
        listing = []
        for name, is_dir in sorted(self.entries()):
            if not is_dir:
                stat = (self.path / name).stat()
                listing.append((name, stat.st_size, stat.st_mtime_ns))
        return "dir:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()

    def describe(self, name: str) -> str:
        return str(self.path / name)


class ZipTree(FileTree):
    def __init__(self, path: Path):
        self.path = path
        self._zip: zipfile.ZipFile | None = None

    def _open(self) -> zipfile.ZipFile:
        if self._zip is None:
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as err:
                raise IgkdError(f"cannot open {self.path} as a zip archive ({err}): it is truncated or corrupt") from None
        return self._zip

    def entries(self) -> list[tuple[str, bool]]:
        return [(info.filename.rstrip("/"), info.is_dir()) for info in self._open().infolist()]

    def read(self, names: Iterable[str]) -> Iterator[bytes]:
        archive = self._open()
        for name in names:
            try:
                yield archive.read(name)
            except (zipfile.BadZipFile, zlib.error, OSError, KeyError) as err:
                raise IgkdError(f"cannot read {self.describe(name)} ({err}): the archive is corrupt") from None

    def fingerprint(self) -> str:
        return f"zip:{self.path.stat().st_size}:{sha256_file(self.path)}"


class TarTree(FileTree):
    def __init__(self, path: Path, keep: tuple[str, ...]):
        self.path, self.keep = path, keep
        self._entries: list[tuple[str, bool]] | None = None
        self._contents: dict[str, bytes] = {}

    def entries(self) -> list[tuple[str, bool]]:
        if self._entries is None:
            self._entries = []
            try:
                with tarfile.open(self.path, "r|*") as tar:
                    for member in tar:
                        name = member.name.removeprefix("./").rstrip("/")
                        self._entries.append((name, member.isdir()))
                        if member.isfile() and name.lower().endswith(self.keep):
                            self._contents[name] = tar.extractfile(member).read()
            except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
                raise IgkdError(
                    f"cannot read the archive {self.path} ({type(err).__name__}: {err}): it is truncated or corrupt"
                ) from None
        return self._entries

    def read(self, names: Iterable[str]) -> Iterator[bytes]:
        self.entries()
        for name in names:
            if name not in self._contents:
                raise IgkdError(f"{self.describe(name)} is not a regular file of the archive")
            yield self._contents[name]

    def fingerprint(self) -> str:
        return f"tar:{self.path.stat().st_size}:{sha256_file(self.path)}"
