"""What every benchmark JSON records about the machine it ran on: threads, load, device, versions.

Ratios measured in one run on one machine mean more than absolute times on a shared machine, so
each benchmark runs its compared sides interleaved and records the load average before and
after: a loaded machine shows there, not silently in the numbers.
"""

from __future__ import annotations

import os

import torch

from igkd.provenance import environment, load_average


def machine_record(device, load_before: list[float] | None) -> dict:
    env = environment(device)
    return {
        "device": env["device"],
        "device_name": env["device_name"],
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15_min": {"before": load_before, "after": load_average()},
        "torch": env["torch"],
        "cuda": env["cuda"],
        "git_sha": env["git_sha"],
        "command": env["command"],
    }


def emit(result: dict, out=None) -> dict:
    """Print a benchmark's JSON, and write it atomically to ``out`` (a path) when given."""
    import json

    from igkd.atomic import atomic_write_text

    text = json.dumps(result, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text + "\n")
    print(text)
    return result
