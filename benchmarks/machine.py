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
