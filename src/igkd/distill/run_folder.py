"""A run's folder: the files it writes, the checks before it starts or resumes, its checkpoints (a cohort's
saved as one unit), its metrics log and the environment a resume must share."""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from pathlib import Path

import torch

from igkd.atomic import atomic_torch_save, atomic_write_json, atomic_write_text, load_json, remove_stale_temporaries
from igkd.distill.config import TrainConfig
from igkd.errors import IgkdError
from igkd.torch_io import load_torch

CHECKPOINT = "checkpoint.pt"
#: A cohort member's new checkpoint, written next to its last one until every member has one (see :func:`resume_checkpoint`).
PENDING = "checkpoint.next.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.json"
MODEL = "model.safetensors"
#: The files a run writes atomically; a kill mid-write leaves ``.<name>.*.tmp``, removed when the run starts again.
RUN_FILES = (CHECKPOINT, PENDING, METRICS, SUMMARY, CONFIG, MODEL)


def rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "overlay": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """The process-wide RNG states of a checkpoint (the overlay generators are set per member)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """Keep only epochs <= last_epoch, so a resumed run logs every epoch exactly once."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and _metrics_epoch(line) <= last_epoch]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def _metrics_epoch(line: str) -> float:
    """The epoch of a metrics line; a line cut short by a kill counts as past every checkpoint (dropped)."""
    try:
        return int(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def read_summary(path: Path) -> dict | None:
    """A finished run's summary.json, or None when it is missing or unreadable (then the run is not finished)."""
    try:
        summary = load_json(path)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and "test_accuracy" in summary else None


def _saved_config(path: Path) -> dict:
    """The config.json of a run being resumed (a JSON object), or one error line naming it."""
    try:
        saved = load_json(path)
    except (OSError, ValueError) as err:
        raise IgkdError(f"cannot resume {path.parent}: its {path.name} is unreadable ({type(err).__name__}); remove the folder to train again, or use another --out") from None
    if not isinstance(saved, dict):
        raise IgkdError(f"cannot resume {path.parent}: its {path.name} holds a JSON {type(saved).__name__}, not a run config; remove the folder to train again, or use another --out")
    return saved


def resume_checkpoint(out: Path) -> Path | None:
    """The checkpoint the run in ``out`` resumes from (None: it starts at epoch 1). Reads, never writes.

    A cohort saves its members' checkpoints as one unit, in two phases (:func:`write_checkpoints`):
    every member's new checkpoint is written as ``checkpoint.next.pt`` beside its last one, then each is
    renamed onto ``checkpoint.pt``. A kill between two members' writes leaves some members a pending
    checkpoint: the run resumes from it when the renames had begun (a fellow member's ``checkpoint.pt``
    is of the same save, so every member has the new epoch), else from its ``checkpoint.pt``, like every
    other member. Either way all members resume at one epoch, and each folder alone is a single run's.
    """
    out = Path(out)
    pending = out / PENDING
    if pending.exists() and _renames_began(out, pending):
        return pending
    return out / CHECKPOINT if (out / CHECKPOINT).exists() else None


def _renames_began(out: Path, pending: Path) -> bool:
    """Whether some other member of the pending checkpoint's cohort save holds that save as its ``checkpoint.pt``."""
    save = load_torch(pending, map_location="cpu", what="training checkpoint").get("cohort") or {}
    for relative in save.get("members", []):
        other = (out / relative).resolve()
        if other == out.resolve() or not (other / CHECKPOINT).exists():
            continue
        if (load_torch(other / CHECKPOINT, map_location="cpu", what="training checkpoint").get("cohort") or {}).get("save") == save["save"]:
            return True
    return False


def settle_checkpoint(out: Path) -> None:
    """Finish or undo a cohort save that a kill cut short (:func:`resume_checkpoint`): afterwards ``checkpoint.pt``
    is the checkpoint to resume from and no pending one is left."""
    pending = Path(out) / PENDING
    if not pending.exists():
        return
    if resume_checkpoint(out) == pending:
        _commit_checkpoint(Path(out))
    else:
        pending.unlink()


def _commit_checkpoint(out: Path) -> None:
    """Phase 2 of a cohort's save, for one member: its pending checkpoint replaces its last one (one rename)."""
    os.replace(out / PENDING, out / CHECKPOINT)


def run_environment(device: torch.device) -> dict:
    """What a resumed run must share to continue bit-identically (docs/faults.md): CPU threads and device type."""
    return {"threads": torch.get_num_threads(), "device_type": device.type}


def prepare_folder(config: TrainConfig, out: Path, resume: bool) -> None:
    """Make ``out`` ready for ``config``: refuse to train over a finished run or another run's checkpoint (unless
    ``resume``), refuse to resume with another config, then write ``config.json``, remove temporaries left by a
    killed write, settle a cohort's cut-short save and drop the metrics of epochs no checkpoint holds."""
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / CONFIG
    finished = read_summary(out / SUMMARY) is not None
    if not resume and (finished or (out / SUMMARY).exists() or (out / MODEL).exists()):
        raise IgkdError(f"{out} holds a finished run ({SUMMARY} or {MODEL} is there): use another --out, or remove that folder")
    if ((out / CHECKPOINT).exists() or (out / PENDING).exists()) and not resume:
        raise IgkdError(f"{out} already holds a run: continue it with --resume, or choose another --out")
    if resume and not finished and (out / MODEL).exists() and not (out / CHECKPOINT).exists():
        raise IgkdError(f"{out} holds {MODEL} but neither a readable {SUMMARY} nor {CHECKPOINT}: it cannot be resumed; use another --out, or remove that folder")
    if resume and config_path.exists():
        saved = _saved_config(config_path)
        current = json.loads(json.dumps(config.to_dict()))
        defaults = TrainConfig().to_dict()  # a key added since the run was saved has its default there
        changed = sorted(k for k in current if saved.get(k, defaults.get(k)) != current[k] and k not in ("device", "compile"))
        if changed:
            raise IgkdError(
                f"cannot resume {out}: its saved config differs in {', '.join(changed)} "
                f"(e.g. {changed[0]}={saved.get(changed[0])!r} there vs {current[changed[0]]!r} now); use the same options or another --out"
            )
    if finished:
        return  # resumed when finished: run() reports its summary, and nothing in the folder is rewritten
    atomic_write_json(config_path, config.to_dict())
    remove_stale_temporaries(out, RUN_FILES)  # left by a write killed half-way
    settle_checkpoint(out)  # a cohort's save cut short between two members: finish or undo it
    if not (out / CHECKPOINT).exists():
        truncate_metrics(out / METRICS, 0)  # killed before its first checkpoint: its epochs start over


def read_checkpoints(outs: list[Path]) -> list[dict] | None:
    """The checkpoints of a run's (or a cohort's) folders, settled by :func:`prepare_folder`, on the CPU;
    None when none has one (the run starts at epoch 1). Members stopped at different epochs are refused."""
    paths = [out / CHECKPOINT for out in outs]
    if not any(p.exists() for p in paths):
        return None
    # On the CPU: RNG states must be CPU ByteTensors (torch.set_rng_state, Generator.set_state);
    # load_state_dict then copies weights and optimizer state onto the model's device.
    states = [load_torch(p, map_location="cpu", what="training checkpoint") if p.exists() else None for p in paths]
    epochs = {str(out): (int(s["epoch"]) if s else 0) for out, s in zip(outs, states)}
    if len(set(epochs.values())) > 1:
        raise IgkdError(
            f"the runs of this cohort stopped at different epochs ({', '.join(f'{k}: {v}' for k, v in epochs.items())}): "
            "train them in separate cohorts (studies group runs by their checkpoint's epoch)"
        )
    return states


def write_checkpoints(outs: list[Path], states: list[dict]) -> None:
    """Each folder's checkpoint; a cohort's as one unit (all members at the new epoch, or all at the last): every
    member's new checkpoint is written beside its last one, then they are renamed into place (:func:`resume_checkpoint`)."""
    if len(outs) == 1:
        atomic_torch_save(outs[0] / CHECKPOINT, states[0])
        return
    save = uuid.uuid4().hex
    for out, state in zip(outs, states):
        members = [os.path.relpath(other.resolve(), out.resolve()) for other in outs]
        atomic_torch_save(out / PENDING, {**state, "cohort": {"members": members, "save": save}})
    for out in outs:
        _commit_checkpoint(out)


def check_environment(state: dict, out: Path, device: torch.device) -> None:
    """Warn (one line) when the run resumes with other CPU threads or another device type than it was saved with."""
    saved = {key: state.get(key) for key in ("threads", "device_type")}
    now = run_environment(device)
    changed = [f"{key} {saved[key]} -> {now[key]}" for key in now if saved[key] is not None and saved[key] != now[key]]
    if changed:
        print(
            f"warning: resuming {out} with {', '.join(changed)}: the result will not be bit-identical to an uninterrupted run "
            "(set the same threads, e.g. OMP_NUM_THREADS, and device to reproduce it)",
            file=sys.stderr,
        )
