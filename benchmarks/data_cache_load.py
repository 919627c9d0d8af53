"""First (decode + cache write) vs cached load of an image-folder dataset.

    python benchmarks/data_cache_load.py --data-dir /work/shared/data/cifar10-jpeg.zip \
        > benchmarks/results/data_cache_load_cpu.json

Times ``igkd.data.load_dataset("folder", ...)`` twice against a fresh, empty
cache folder (made inside ``--cache-dir`` and removed afterwards) and prints one
JSON object: image count, both wall times, their ratio, and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="image folder, .zip or .tar.gz (train/<class>/, test/<class>/)")
    parser.add_argument("--cache-dir", default=None, help="where to make the fresh cache folder (default: system temp)")
    parser.add_argument("--dataset", default="folder", help="dataset name (default: folder)")
    args = parser.parse_args()

    from igkd.data import load_dataset
    from igkd.data.sources.image_folder import decode_workers
    from igkd.provenance import environment

    if args.cache_dir:
        Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="igkd-bench-cache-", dir=args.cache_dir))
    try:
        start = time.perf_counter()
        first = load_dataset(args.dataset, args.data_dir, cache_dir=cache, progress=False)
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        cached = load_dataset(args.dataset, args.data_dir, cache_dir=cache, progress=False)
        cached_s = time.perf_counter() - start
        cache_bytes = sum(path.stat().st_size for path in cache.rglob("*") if path.is_file())
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    result = {
        "dataset": args.dataset,
        "source": str(Path(args.data_dir).resolve()),
        "source_bytes": Path(args.data_dir).stat().st_size if Path(args.data_dir).is_file() else None,
        "images": len(first.train) + len(first.test),
        "first_load_s": round(first_s, 3),
        "cached_load_s": round(cached_s, 3),
        "speedup": round(first_s / cached_s, 1),
        "fingerprint": first.fingerprint,
        "fingerprints_match": first.fingerprint == cached.fingerprint,
        "cache_bytes": cache_bytes,
        "decode_workers": decode_workers(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "machine": environment("cpu"),
    }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
