"""Where a result came from: versions, device, git commit, command line."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path


def git_sha() -> str | None:
    """The commit of the igkd source tree, or None when not run from a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    sha = out.stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True
    ).stdout.strip()
    return sha + ("-dirty" if dirty else "")


def device_name(device) -> str:
    """A readable name of ``device`` (any spec igkd takes: ``auto``, ``cpu``, ``cuda:N`` or a torch.device)."""
    import torch

    from igkd.devices import resolve_device

    device = device if isinstance(device, torch.device) else resolve_device(str(device))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device="cpu") -> dict:
    """Versions, device and command line, recorded in every summary and manifest."""
    import numpy
    import torch

    from igkd import __version__
    from igkd.devices import resolve_device

    device = device if isinstance(device, torch.device) else resolve_device(str(device))

    return {
        "igkd": __version__,
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": device_name(device),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "cwd": os.getcwd(),
    }


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or None where the platform has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_facts() -> dict:
    """What decides a CPU result's rounding and speed: the CPU, the kernels PyTorch picked for it
    (``ATEN_CPU_CAPABILITY`` can force older ones), native bf16, threads, and the load right now."""
    import torch

    from igkd.devices import cpu_has_bf16

    return {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_bf16(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15_min": load_average(),
        "torch": torch.__version__,
    }


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
