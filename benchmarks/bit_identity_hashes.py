"""Hashes of what a training wrote in the current folder, without what legitimately differs between two identical
runs (timings, wall time, a cohort save's random id); used by benchmarks/bit_identity.sh."""

import hashlib
import json
import pathlib

import torch

TIMING = ("time", "_s", "per_s", "seconds", "started", "finished", "date", "wall", "load", "throughput")


def without_timings(record):
    if isinstance(record, dict):
        return {k: without_timings(v) for k, v in sorted(record.items()) if not any(t in k for t in TIMING)}
    return record


def checkpoint_digest(path: pathlib.Path) -> str:
    """Every tensor and value of a checkpoint but its wall time and its cohort save's random id."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state.pop("wall_time_s", None)
    (state.get("cohort") or {}).pop("save", None)
    digest = hashlib.sha256()

    def feed(value, key=""):
        if isinstance(value, dict):
            for k in sorted(value, key=str):
                feed(value[k], f"{key}/{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                feed(v, f"{key}/{i}")
        elif isinstance(value, torch.Tensor):
            digest.update(key.encode())
            if value.numel():
                digest.update(value.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        else:
            digest.update(f"{key}={value!r}".encode())

    feed(state)
    return digest.hexdigest()[:16]


for path in sorted(pathlib.Path(".").rglob("*")):
    if path.name.endswith(".pt"):
        print(checkpoint_digest(path), path)
    elif path.suffix in (".safetensors", ".npy"):
        print(hashlib.sha256(path.read_bytes()).hexdigest()[:16], path)
    elif path.name == "metrics.jsonl":
        lines = [json.dumps(without_timings(json.loads(line)), sort_keys=True) for line in path.read_text().splitlines() if line.strip()]
        print(hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16], path)
