"""What every benchmark JSON records about the machine it ran on (threads, load, device, versions),
and how a benchmark starts (``--threads``, ``--out``, the load before) and ends (its JSON printed and written).

Ratios measured in one run on one machine mean more than absolute times on a shared machine, so
each benchmark runs its compared sides interleaved and records the load average before and
after: a loaded machine shows there, not silently in the numbers.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

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


def run_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, list[float] | None]:
    """Add ``--threads`` and ``--out`` (a benchmark's last options), parse ``argv`` and set the torch threads asked for;
    returns the arguments and the load average before the run (for :func:`machine_record`)."""
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--out", type=Path, default=None, help="Also write the JSON to this file.")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args, load_average()


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
