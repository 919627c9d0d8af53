"""Each trained model in every edge format: parity, test accuracy of the file, latency under one protocol.

    python benchmarks/edge_runtimes.py RUN/model.safetensors [...] --dataset digits --out benchmarks/results/edge_cpu.json

For each checkpoint and format (ONNX Runtime fp32 / int8 QDQ, ExecuTorch XNNPACK fp32 / int8 PT2E,
LiteRT fp32 / int8 PT2E): the file is made (int8 calibrated on 512 training images, seed 0), its
accuracy on the test split is measured with the same guard as `igkd quantize` (drop vs eager fp32),
then load time, first inference, median and p90 of `--repeats` calls at each batch size, 1 thread,
denormals flushed. Prints JSON (machine, versions, command) and writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import load_average, machine_record  # noqa: E402

from igkd.atomic import atomic_write_json  # noqa: E402
from igkd.data import load_dataset  # noqa: E402
from igkd.deploy.accuracy import file_accuracy, load_file  # noqa: E402
from igkd.deploy.export import export_bytes  # noqa: E402
from igkd.deploy.extras import available  # noqa: E402
from igkd.deploy.latency import summarize, time_interleaved, torch_threads  # noqa: E402
from igkd.deploy.quantize import calibration_indices, quantize_static_bytes  # noqa: E402
from igkd.deploy.runners import load_and_first_call, prepare  # noqa: E402
from igkd.evaluate import accuracy_report, predict_logits  # noqa: E402
from igkd.models import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    load_before = load_average()
    data = load_dataset(args.dataset, None, progress=False)
    calibration = data.train.images[calibration_indices(len(data.train), 512, 0)]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows = []
    torch.set_flush_denormal(True)
    with torch_threads(args.threads):
        for checkpoint in args.checkpoints:
            model = load_model(checkpoint)[0].eval()
            eager = accuracy_report(predict_logits(model, data.test.images, device="cpu"), data.test.labels, data.classes)["accuracy"]
            parity_batch = data.test.images[:16]
            variants = [("eager", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")]
            variants += [(b, p) for b in ("executorch", "litert") if available(b) for p in ("fp32", "int8")]
            for backend, precision in variants:
                row = {"checkpoint": str(checkpoint), "model": checkpoint.parent.name,
                       "backend": backend, "precision": precision, "eager_fp32_accuracy": eager, "latency": {}}
                fmt = "onnx" if backend == "onnxruntime" else backend
                cal = calibration if precision == "int8" and backend in ("executorch", "litert") else None
                files = {}
                if backend != "eager":
                    data_b1, report = export_bytes(model, fmt, batch=parity_batch, calibration=cal, batch_size=1, threads=args.threads)
                    if backend == "onnxruntime" and precision == "int8":
                        data_b1 = quantize_static_bytes(data_b1, calibration)
                    row["parity_max_abs_diff"] = report["parity"]["max_abs_diff"]
                    row["top1_agreement_parity_batch"] = report["parity"]["top1_agreement"]
                    run, static = load_file(fmt, data_b1, args.threads)
                    row["file_accuracy"] = file_accuracy(run, static, data)["accuracy"]
                    row["accuracy_drop_points"] = round(eager - row["file_accuracy"], 4)
                    files[1] = data_b1
                for size in sizes:
                    payload = files.get(size if backend == "executorch" else 1)
                    if backend == "executorch" and payload is None:
                        payload = export_bytes(model, fmt, batch=parity_batch, calibration=cal, batch_size=size, threads=args.threads)[0]
                    item = prepare(backend, model, size, threads=args.threads, data=payload, precision=precision)
                    call, load_ms, first_ms = load_and_first_call(item)
                    stats = summarize(time_interleaved([call], warmup=args.warmup, repeats=args.repeats, rounds=1)[0])
                    row["latency"][str(size)] = {**stats, "load_ms": load_ms, "first_inference_ms": first_ms, "file_bytes": len(item.data)}
                rows.append(row)
                print(json.dumps({k: row[k] for k in row if k != "latency"} | {"median_ms": {b: v["median_ms"] for b, v in row["latency"].items()}}), file=sys.stderr)
    result = {
        "kind": "igkd-edge-runtimes",
        "dataset": data.name, "test_images": len(data.test), "dataset_fingerprint": data.fingerprint,
        "settings": {"threads": args.threads, "repeats": args.repeats, "warmup": args.warmup, "batch_sizes": sizes,
                     "calibration": "512 training images, seed 0", "denormals": "flushed (torch.set_flush_denormal)"},
        "machine": machine_record("cpu", load_before),
        "rows": rows,
    }
    if args.out:
        atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
