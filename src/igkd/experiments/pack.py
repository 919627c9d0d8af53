"""What a reproduction folder carries to the next job, and how it is restored safely.

``igkd reproduce --pack`` writes what is small (summaries, metrics, tables, report, the teacher's
weights, one student per method, an interrupted run's checkpoint) into one .tar.gz under 16 MiB,
what a GPU job can hand back; ``--unpack`` restores it into another folder so that the next job
continues there. The IG maps are rebuilt there, not packed. ``--results`` copies what a user
commits (tables, report, summaries) with :func:`export_results`.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

from igkd.atomic import atomic_open, read_json_object
from igkd.errors import IgkdError

STATE_FILE = "reproduce.json"
PACK_LIMIT = 16 * 2**20 - 2**19  # what comes back from a GPU job: 16 MiB a file (half a MiB kept for the tar itself)

RESULT_FILES = ("reproduce.json", "paper-vs-ours.md", "latency.json", "ablation/results.csv", "montecarlo/results.csv", "sweep/results.csv",
                "ablation/study.json", "montecarlo/study.json", "sweep/study.json", "teacher/summary.json", "ig/manifest.json")


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
NEVER_PACKED = ("maps.npy", "maps.partial.npy", ".lock")


def pack(out: Path, archive: Path, limit: int = PACK_LIMIT) -> dict:
    """One .tar.gz of what the next job needs and a person reads, under ``limit`` bytes (raw sizes, a safe bound)."""
    out = Path(out)
    if not (out / STATE_FILE).is_file():
        raise IgkdError(f"{out} holds no reproduction ({STATE_FILE}): run 'igkd reproduce --out {out}' first")
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name not in NEVER_PACKED and not p.name.endswith(".tmp"))
    must = [p for p in files if p.suffix in SMALL_SUFFIXES]
    optional = []  # by value: the teacher, interrupted runs' checkpoints (to resume), one student per method
    teacher = out / "teacher" / "model.safetensors"
    if teacher.exists():
        optional.append(teacher)
    optional += [p for p in files if p.name == "checkpoint.pt" and not (p.parent / "summary.json").exists()]
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
    for path in optional:
        if size + path.stat().st_size <= limit:
            chosen.append(path)
            size += path.stat().st_size
        else:
            left_out.append(str(path.relative_to(out)))
    listing = {"format": "igkd-reproduce-pack", "files": [str(p.relative_to(out)) for p in chosen], "left_out": left_out, "bytes_raw": size}
    archive.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(archive, "wb") as handle, tarfile.open(fileobj=handle, mode="w:gz") as tar:
        for path in chosen:
            tar.add(path, arcname=str(path.relative_to(out)))
        data = json.dumps(listing, indent=2).encode()
        info = tarfile.TarInfo("pack.json")
        info.size = len(data)
        import io

        tar.addfile(info, io.BytesIO(data))
    listing["archive_bytes"] = archive.stat().st_size
    return listing


def unpack(archive: Path, out: Path) -> dict:
    """Restore a pack into ``out`` (safe extraction: no absolute paths, no '..', no links)."""
    archive, out = Path(archive), Path(out)
    if not archive.is_file():
        raise IgkdError(f"pack {archive} does not exist")
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            names = {m.name for m in members}
            if "pack.json" not in names:
                raise IgkdError(f"{archive} is not an igkd reproduce pack (no pack.json): make one with 'igkd reproduce --pack'")
            for member in members:
                if not (member.isfile() or member.isdir()) or member.name.startswith("/") or ".." in Path(member.name).parts:
                    raise IgkdError(f"{archive} holds {member.name!r}, which is not a plain file inside the folder: refused")
            out.mkdir(parents=True, exist_ok=True)
            tar.extractall(out, members=[m for m in members if m.name != "pack.json"], filter="data")
            listing = json.loads(tar.extractfile("pack.json").read())
    except (tarfile.TarError, OSError, ValueError) as err:
        raise IgkdError(f"{archive} is not a readable pack ({type(err).__name__}: {err})") from None
    return listing
