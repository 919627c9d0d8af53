"""What a reproduction folder carries to the next job, and how it is restored safely.

``igkd reproduce --pack`` writes what is small (summaries, metrics, tables, report, the teacher's
weights, one student per method, an interrupted run's checkpoint) into one .tar.gz under 16 MiB,
what a GPU job can hand back; ``--unpack`` restores it into another folder so that the next job
continues there. The IG maps are rebuilt there, not packed. ``--results`` copies what a user
commits (tables, report, summaries) with :func:`export_results`.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import tarfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from igkd.atomic import MAX_JSON_BYTES, atomic_open, atomic_write_json, read_json_object
from igkd.errors import IgkdError

STATE_FILE = "reproduce.json"
PACK_LIMIT = 16 * 2**20 - 2**19  # what comes back from a GPU job: 16 MiB a file (half a MiB kept for the tar itself)

RESULT_FILES = ("reproduce.json", "paper-vs-ours.md", "latency.json", "ablation/results.csv", "montecarlo/results.csv", "sweep/results.csv",
                "ablation/study.json", "montecarlo/study.json", "sweep/study.json", "teacher/summary.json", "ig/manifest.json", "precision.json")


def export_results(out: Path, results: Path) -> list[str]:
    """Copy the files a user would commit (tables, report, summaries) into ``results``."""
    copied = []
    for name in RESULT_FILES:
        if (out / name).is_file():
            target = results / name.replace("/", "-")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / name, target)
            copied.append(target.name)
    if (out / "report").is_dir():
        for path in sorted((out / "report").iterdir()):
            if path.is_file():
                (results / "report").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, results / "report" / path.name)
                copied.append(f"report/{path.name}")
    return copied


SMALL_SUFFIXES = (".json", ".jsonl", ".csv", ".md", ".png", ".txt")
# The IG maps are rebuilt, not packed (progress.json is a build's record: useless without its staged maps).
NEVER_PACKED = ("maps.npy", "maps.partial.npy", "progress.json", ".lock")
PACK_FORMAT = "igkd-reproduce-pack"
LISTING = "pack.json"
MAX_MEMBERS = 20_000  # a full reproduction packs about a thousand files
# The tar stream of a pack: its files, pack.json, and per member a header and padding (generous).
STREAM_LIMIT = PACK_LIMIT + MAX_JSON_BYTES + MAX_MEMBERS * 2048
# What each stage leaves in the folder: a stage done here keeps these from any pack (unpack --force).
STAGE_PATHS = {"teacher": ("teacher/",), "ig": ("ig/",), "ablation": ("ablation/",), "montecarlo": ("montecarlo/",),
               "sweep": ("sweep/",), "report": ("report/", "latency.json", "paper-vs-ours.md")}


def pack(out: Path, archive: Path, limit: int = PACK_LIMIT) -> dict:
    """One .tar.gz of what the next job needs and a person reads, under ``limit`` bytes (raw sizes, a safe bound).

    ``pack.json`` comes first in the archive and lists every file; each is a plain file of mode 644
    (links and names that :func:`plain_name` refuses are left out, so that :func:`unpack` takes every pack).
    """
    out = Path(out)
    if not (out / STATE_FILE).is_file():
        raise IgkdError(f"{out} holds no reproduction ({STATE_FILE}): run 'igkd reproduce --out {out}' first")
    files = sorted(p for p in out.rglob("*") if _packable(p, out))
    must = [p for p in files if p.suffix in SMALL_SUFFIXES]
    optional = []  # by value: the teacher, interrupted runs' checkpoints (to resume), one student per method
    teacher = out / "teacher" / "model.safetensors"
    if teacher in files:
        optional.append(teacher)
    optional += [p for p in files if p.name in ("checkpoint.pt", "checkpoint.next.pt") and not (p.parent / "summary.json").exists()]
    seen_methods = set()
    for path in files:
        if path.name == "model.safetensors" and path.parent.parent.name == "runs":
            method = (read_json_object(path.parent / "summary.json") or {}).get("method")
            if method and method not in seen_methods:
                seen_methods.add(method)
                optional.append(path)
    chosen, left_out, size = list(must), [], sum(p.stat().st_size for p in must)
    if size > limit:
        raise IgkdError(f"the small files of {out} alone are {size / 2**20:.1f} MiB, over the {limit / 2**20:.1f} MiB pack limit")
    if len(must) >= MAX_MEMBERS:
        raise IgkdError(f"{out} holds {len(must)} small files, more than the {MAX_MEMBERS} a pack may hold")
    for path in optional:
        if size + path.stat().st_size <= limit and len(chosen) < MAX_MEMBERS:
            chosen.append(path)
            size += path.stat().st_size
        else:
            left_out.append(path.relative_to(out).as_posix())
    listing = {"format": PACK_FORMAT, "files": [p.relative_to(out).as_posix() for p in chosen], "left_out": left_out, "bytes_raw": size}
    archive.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(archive, "wb") as handle, tarfile.open(fileobj=handle, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        data = json.dumps(listing, indent=2).encode()
        tar.addfile(_member(LISTING, len(data)), io.BytesIO(data))
        for path in chosen:
            with open(path, "rb") as source:
                tar.addfile(_member(path.relative_to(out).as_posix(), os.fstat(source.fileno()).st_size), source)
    listing["archive_bytes"] = archive.stat().st_size
    return listing


def _packable(path: Path, out: Path) -> bool:
    """A plain file (no link) with a plain name, that the next job needs or a person reads."""
    if path.is_symlink() or not path.is_file() or path.name in NEVER_PACKED or path.name.endswith(".tmp"):
        return False
    name = path.relative_to(out)
    return plain_name(name.as_posix()) and not any((out / folder).is_symlink() for folder in name.parents if str(folder) != ".")


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, int(time.time())
    return info


def plain_name(name) -> bool:
    """A relative file name of plain parts: a str, no '..' or '.', not absolute, no backslash, NUL or control character."""
    if not isinstance(name, str) or not name or name.startswith("/") or any(c == "\\" or ord(c) < 32 or c == "\x7f" for c in name):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


# -- unpack -----------------------------------------------------------------------------------------


class _Bounded:
    """A reader that refuses to give more than ``limit`` bytes of ``raw`` (the decompressed tar stream)."""

    def __init__(self, raw, limit: int, archive: Path):
        self.raw, self.limit, self.left, self.archive = raw, limit, limit, archive

    def read(self, size: int = -1) -> bytes:
        want = self.left + 1 if size is None or size < 0 else min(size, self.left + 1)
        data = self.raw.read(want)
        self.left -= len(data)
        if self.left < 0:
            raise IgkdError(f"{self.archive} unpacks to more than {self.limit / 2**20:.0f} MiB, more than any pack 'igkd reproduce --pack' writes: refused")
        return data


@contextlib.contextmanager
def _stream(archive: Path):
    """The pack's members in order (tar stream mode over gzip, at most STREAM_LIMIT bytes, fully read and checked)."""
    with open(archive, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
        bounded = _Bounded(unzipped, STREAM_LIMIT, archive)
        with tarfile.open(fileobj=bounded, mode="r|") as tar:
            yield tar
        while bounded.read(2**20):  # the rest of the gzip stream: its end and checksum are verified too
            pass


def _kind(member: tarfile.TarInfo) -> str:
    """What a member is, in words ('a file' and 'a folder' are the kinds a pack may hold)."""
    if member.sparse is not None or member.type == tarfile.GNUTYPE_SPARSE:
        return "a sparse file"
    if member.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
        return "a file"
    if member.type == tarfile.DIRTYPE:
        return "a folder"
    return {tarfile.SYMTYPE: "a link", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a device", tarfile.BLKTYPE: "a device",
            tarfile.FIFOTYPE: "a pipe"}.get(member.type, f"a tar member of type {member.type!r}")


def _read_through(tar: tarfile.TarFile, member: tarfile.TarInfo, keep: bool) -> tuple[bytes | None, int]:
    """Read a member's data in blocks: (its bytes when ``keep``, its line count). Data cut short is an EOFError."""
    handle, left, lines, kept = tar.extractfile(member), member.size, 0, []
    while left > 0:
        block = handle.read(min(left, 2**20))
        if not block:
            raise EOFError(f"{member.name} is cut short")
        left -= len(block)
        lines += block.count(b"\n")
        if keep:
            kept.append(block)
    return (b"".join(kept) if keep else None), lines


@dataclass
class _Scan:
    """What :func:`_scan` found: pack.json, the pack's reproduce.json, its files (name -> size) and how far
    each run folder in it got (folder -> epochs in metrics.jsonl; a finished run counts as infinite)."""

    listing: dict
    state: dict
    files: dict
    progress: dict


def _scan(archive: Path) -> _Scan:
    """Every member's header checked before anything is written (and pack.json, reproduce.json and metrics read)."""
    files: dict[str, int] = {}
    progress: dict[str, float] = {}
    folders, seen, total = set(), set(), 0
    texts: dict[str, bytes] = {}
    with _stream(archive) as tar:
        for count, member in enumerate(tar, 1):
            if count > MAX_MEMBERS:
                raise IgkdError(f"{archive} holds more than {MAX_MEMBERS} members, more than any pack 'igkd reproduce --pack' writes: refused")
            name, kind = member.name, _kind(member)
            if not plain_name(name):
                raise IgkdError(f"{archive} holds {name!r}, which is not a plain file inside the folder: refused")
            if name in seen:
                raise IgkdError(f"{archive} holds {name!r} twice: refused (a pack names each file once)")
            seen.add(name)
            if name == LISTING and kind != "a file":
                raise IgkdError(f"{archive}: its {LISTING} is {kind}, not a file: refused (make the pack with 'igkd reproduce --pack')")
            if kind == "a folder":
                folders.add(name)
                continue
            if kind != "a file":
                raise IgkdError(f"{archive} holds {name!r}, which is {kind}, not a plain file inside the folder: refused")
            total += member.size
            if total > PACK_LIMIT + MAX_JSON_BYTES:
                raise IgkdError(f"{archive} holds more than {(PACK_LIMIT + MAX_JSON_BYTES) / 2**20:.0f} MiB, more than any pack 'igkd reproduce --pack' writes: refused")
            if name in (LISTING, STATE_FILE) and member.size > MAX_JSON_BYTES:
                raise IgkdError(f"{archive}: its {name} is over {MAX_JSON_BYTES // 2**20} MiB, more than igkd ever writes: refused")
            data, lines = _read_through(tar, member, keep=name in (LISTING, STATE_FILE))  # a cut member is refused here
            if data is not None:
                texts[name] = data
            folder, base = str(PurePosixPath(name).parent), PurePosixPath(name).name
            if base == "summary.json":
                progress[folder] = float("inf")
            elif base == "metrics.jsonl":
                progress.setdefault(folder, lines)
            if name != LISTING:
                files[name] = member.size
    listing = _listing(texts.get(LISTING), archive)
    listed = listing["files"]
    unlisted = sorted(set(files) - set(listed))
    if unlisted:
        raise IgkdError(f"{archive} holds {unlisted[0]!r}, which its {LISTING} does not list: refused (a pack holds only what it lists)")
    missing = [name for name in listed if name not in files]
    if missing:
        raise IgkdError(f"{archive} lists {missing[0]!r} but does not hold it (a damaged or cut pack): make it again with 'igkd reproduce --pack'")
    parents = {str(PurePosixPath(name).parent) for name in listed} | {str(p) for name in listed for p in PurePosixPath(name).parents}
    stray = sorted(folders - parents)
    if stray:
        raise IgkdError(f"{archive} holds the folder {stray[0]!r}, which holds no file of the pack: refused")
    if STATE_FILE not in files:
        raise IgkdError(f"{archive} holds no {STATE_FILE}: it is not a pack of a reproduction folder")
    from igkd.experiments.reproduce import check_state

    state = check_state(_json(texts[STATE_FILE], f"{archive}: its {STATE_FILE}"), f"{archive}: its {STATE_FILE}")
    return _Scan(listing, state, files, progress)


def _json(data: bytes, where: str):
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError as err:
        raise IgkdError(f"{where} is not valid JSON ({err}): make the pack again with 'igkd reproduce --pack'") from None


def _listing(data: bytes | None, archive: Path) -> dict:
    """pack.json: format igkd-reproduce-pack and ``files``, a list of distinct plain names."""
    how = "make one with 'igkd reproduce --pack'"
    if data is None:
        raise IgkdError(f"{archive} is not an igkd reproduce pack (no {LISTING}): {how}")
    listing = _json(data, f"{archive}: its {LISTING}")
    if not isinstance(listing, dict) or listing.get("format") != PACK_FORMAT:
        raise IgkdError(f"{archive}: its {LISTING} is not an igkd reproduce pack listing (format {PACK_FORMAT!r}): {how}")
    files = listing.get("files")
    if not isinstance(files, list):
        raise IgkdError(f"{archive}: its {LISTING} has no list of files: {how}")
    bad = next((name for name in files if not plain_name(name) or name == LISTING), None)
    if bad is not None:
        raise IgkdError(f"{archive}: its {LISTING} lists {bad!r}, which is not a plain file inside the folder: refused")
    if len(set(files)) != len(files):
        raise IgkdError(f"{archive}: its {LISTING} lists a file twice: refused")
    return listing


def unpack(archive: Path, out: Path, *, force: bool = False) -> dict:
    """Restore a pack into ``out``, an empty or new folder (``force``: merge it into a reproduction there).

    Every member is checked before anything is written (:func:`_scan`): only the plain files that
    pack.json lists, each once, within the sizes ``--pack`` writes. Each is then written by igkd
    itself (atomically, mode 644, never through a link), so nothing lands outside ``out`` and no
    file keeps an exec bit. With ``force``, nothing done here moves back (:func:`_merge`).
    Returns pack.json plus ``restored`` and ``kept`` (the names written and those kept as they were).
    """
    archive, out = Path(archive), Path(out)
    if not archive.is_file():
        raise IgkdError(f"pack {archive} does not exist")
    if out.exists() and not out.is_dir():
        raise IgkdError(f"--out {out} is a file: give a folder to unpack into")
    occupied = out.is_dir() and any(out.iterdir())
    if occupied and not force:
        what = "a reproduction" if (out / STATE_FILE).exists() else "files"
        raise IgkdError(f"{out} already holds {what}: unpack into an empty or new folder, or add --force to merge the pack "
                        "into it (stages done and runs finished there are kept)")
    if archive.stat().st_size > STREAM_LIMIT:
        raise IgkdError(f"{archive} is {archive.stat().st_size / 2**20:.0f} MiB, more than any pack 'igkd reproduce --pack' writes: refused")
    try:
        found = _scan(archive)
        state, keep = _merge(out, found, archive) if occupied else (found.state, set())
        write = {name for name in found.files if name not in keep and name != STATE_FILE}
        out.mkdir(parents=True, exist_ok=True)
        with _stream(archive) as tar:
            for member in tar:
                if member.name in write:
                    _write(tar, member, out)
    except (tarfile.TarError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError, caught below
        raise IgkdError(f"{archive} is not a readable pack (cut short or damaged: {type(err).__name__}: {err}): make it again with 'igkd reproduce --pack'") from None
    except OSError as err:
        if err.filename is not None:
            raise  # writing into --out failed: the CLI names the path
        raise IgkdError(f"{archive} is not a readable pack ({type(err).__name__}: {err}): make it again with 'igkd reproduce --pack'") from None
    atomic_write_json(out / STATE_FILE, state)  # last: a folder cut short by a failure above holds no state newer than its files
    return {**found.listing, "restored": sorted(write | {STATE_FILE}), "kept": sorted(keep - {STATE_FILE})}


def _target(out: Path, name: str) -> Path:
    """``out/name`` with its folders made; refused where a folder on the way is a link or a file."""
    target, folder = out / name, out
    for part in PurePosixPath(name).parts[:-1]:
        folder = folder / part
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise IgkdError(f"cannot unpack {name}: {folder} is a link or a file, not a folder (unpack into a new folder)")
        folder.mkdir(exist_ok=True)
    if target.is_dir() and not target.is_symlink():
        raise IgkdError(f"cannot unpack {name}: {target} is a folder (unpack into a new folder)")
    return target


def _write(tar: tarfile.TarFile, member: tarfile.TarInfo, out: Path) -> None:
    """One listed file, copied in bounded blocks and written atomically (the new file's mode is 644 less the umask)."""
    source, left = tar.extractfile(member), member.size
    with atomic_open(_target(out, member.name), "wb") as handle:
        while left > 0:
            block = source.read(min(left, 2**20))
            if not block:
                raise EOFError(f"{member.name} is cut short")
            handle.write(block)
            left -= len(block)


def _merge(out: Path, found: _Scan, archive: Path) -> tuple[dict, set]:
    """unpack --force into a folder that holds results: (the state to write, the pack's names to leave alone).

    Nothing done here moves back: a stage done here stays done, and its files (STAGE_PATHS) are kept;
    a run finished here (a folder holding summary.json) is kept whole, and so is an interrupted run
    that got at least as far here (epochs in metrics.jsonl) and an IG cache whose maps are here.
    Stages done only in the pack become done; the report is then made again (from both).
    """
    from igkd.experiments.reproduce import read_state

    packed, local = found.state, read_state(out)
    modes = (local or {}).get("quick"), packed.get("quick")
    if None not in modes and modes[0] != modes[1]:
        raise IgkdError(f"{out} holds a {'--quick' if local.get('quick') else 'full'} reproduction and {archive} the other kind: unpack into another folder")
    profiles = (local or {}).get("profile", "paper"), packed.get("profile", "paper")
    if local is not None and profiles[0] != profiles[1]:
        raise IgkdError(f"{out} holds a reproduction of --profile {profiles[0]} and {archive} one of --profile {profiles[1]}: unpack into another folder")
    state = packed if local is None else local
    if local is not None:
        gained = [name for name, record in packed["stages"].items() if record.get("done") and not local["stages"].get(name, {}).get("done")]
        for name in gained:
            state["stages"][name] = packed["stages"][name]
        if gained and state["stages"].get("report", {}).get("done"):
            state["stages"]["report"]["done"] = False  # made again from the results of both
    done_here = [name for name, record in (local or {"stages": {}})["stages"].items() if record.get("done")]
    kept_prefixes = tuple(path for name in done_here for path in STAGE_PATHS.get(name, ()))
    keep = {STATE_FILE}
    for name in found.files:
        folders = [str(p) for p in PurePosixPath(name).parents if str(p) != "."]
        if (
            name.startswith(kept_prefixes)
            or any((out / folder / "summary.json").is_file() for folder in folders)
            or (name.startswith("ig/") and (out / "ig" / "maps.npy").is_file())
            or any(_epochs_here(out / folder) >= max(found.progress.get(folder, 0), 1) for folder in folders)
        ):
            keep.add(name)
    return state, keep


def _epochs_here(folder: Path) -> int:
    """Epochs an interrupted run here got to (lines of metrics.jsonl beside a checkpoint); 0 for none."""
    if not (folder / "checkpoint.pt").is_file() or not (folder / "metrics.jsonl").is_file():
        return 0
    with open(folder / "metrics.jsonl", "rb") as handle:
        return sum(block.count(b"\n") for block in iter(lambda: handle.read(2**20), b""))
