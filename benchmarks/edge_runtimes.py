"""Each trained model in every edge format: parity, test accuracy of the file, latency under one protocol.

    python benchmarks/edge_runtimes.py RUN/model.safetensors [...] --dataset digits --out benchmarks/results/edge_cpu.json

For each checkpoint and format (eager PyTorch fp32, ONNX Runtime fp32 / int8 QDQ, ExecuTorch
XNNPACK fp32 / int8 PT2E, LiteRT fp32 / int8 PT2E): the file is made once (int8 calibrated on
512 training images, seed 0), its accuracy on the test split is measured with the same guard as
`igkd quantize` (drop vs eager fp32, at most --max-drop points), then -- per batch size -- every
file is loaded (load time), called once (first inference) and all of them are timed together in
`--rounds` interleaved rounds (`igkd.deploy.latency.time_interleaved`), so a change of load on a
shared machine falls on every model and backend alike. 1 thread, denormals flushed. The load
average is recorded before and after each phase. Prints JSON (machine, versions, command) and
writes it to --out; --table prints the markdown table of docs/benchmarks.md from it.

ExecuTorch files have a static batch axis: the batch-1 file is the one whose accuracy is
measured; the batch-64 timing uses a second file exported (and, for int8, calibrated on the
same 512 images in batches of 64) at batch 64. ONNX Runtime and LiteRT use one file per model
and precision (LiteRT's interpreter resizes its batch axis at load time).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import load_average, machine_record  # noqa: E402

from igkd.atomic import atomic_write_json  # noqa: E402
from igkd.data import load_dataset  # noqa: E402
from igkd.deploy.accuracy import file_accuracy, load_file  # noqa: E402
from igkd.deploy.export import export_bytes  # noqa: E402
from igkd.deploy.extras import available  # noqa: E402
from igkd.deploy.latency import machine_info, summarize, time_interleaved, torch_threads  # noqa: E402
from igkd.deploy.quantize import calibration_indices, quantize_static_bytes  # noqa: E402
from igkd.deploy.runners import load_and_first_call, prepare  # noqa: E402
from igkd.evaluate import accuracy_report, predict_logits  # noqa: E402
from igkd.models import load_model  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] load {load_average()} {message}", file=sys.stderr, flush=True)


def cached(cache: Path | None, key: str, make):
    """``make()``'s (bytes, info) -- from ``cache/key`` (+ ``.json``) when there, else made and stored there."""
    if cache is None:
        return make()
    path, meta = cache / key, cache / f"{key}.json"
    if path.is_file() and meta.is_file():
        return path.read_bytes(), json.loads(meta.read_text())
    data, info = make()
    cache.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    meta.write_text(json.dumps(info, default=str))
    return data, info


def make_files(name, model, data, calibration, sizes, threads, max_drop, cache=None, digest="") -> tuple[list[dict], dict]:
    """Rows (accuracy, parity, export time) and {(row index, batch size): file bytes} for one checkpoint.

    ``cache``: a folder keeping each exported file (keyed by the checkpoint's sha256), so a rerun
    -- or an export phase run ahead while other models still train -- does not export again.
    """
    eager = accuracy_report(predict_logits(model, data.test.images, device="cpu"), data.test.labels, data.classes)["accuracy"]
    parity_batch = data.test.images[:16]
    variants = [("eager", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")]
    variants += [(b, p) for b in ("executorch", "litert") if available(b) for p in ("fp32", "int8")]
    rows, files = [], {}
    for backend, precision in variants:
        log(f"{name}: {backend} {precision}: export and test accuracy")
        row = {"model": name, "backend": backend, "precision": precision, "eager_fp32_accuracy": eager, "latency": {}}
        if backend == "eager":
            row.update(file_accuracy=eager, accuracy_drop_points=0.0, parity_max_abs_diff=0.0)
            rows.append(row)
            continue
        fmt = "onnx" if backend == "onnxruntime" else backend
        cal = calibration if precision == "int8" and backend != "onnxruntime" else None

        def make_b1(fmt=fmt, cal=cal, backend=backend, precision=precision):
            begin = time.perf_counter()
            data_b1, report = export_bytes(model, fmt, batch=parity_batch, calibration=cal, batch_size=1, threads=threads)
            if backend == "onnxruntime" and precision == "int8":
                data_b1 = quantize_static_bytes(data_b1, calibration)
                run, _ = load_file("onnx", data_b1, threads)
                with torch.inference_mode():
                    out = run(parity_batch.float().div(255))
                    ref = model(parity_batch.float().div(255))
                report["parity"] = {"max_abs_diff": float((out - ref).abs().max()),
                                    "top1_agreement": float((out.argmax(1) == ref.argmax(1)).float().mean())}
            report["export_s"] = round(time.perf_counter() - begin, 1)
            return data_b1, report

        data_b1, report = cached(cache, f"{digest}.{backend}.{precision}.b1", make_b1)
        row["export_s"] = report["export_s"]
        row["parity_max_abs_diff"] = report["parity"]["max_abs_diff"]
        row["top1_agreement_parity_batch"] = report["parity"].get("top1_agreement")
        run, static = load_file(fmt, data_b1, threads)
        row["file_accuracy"] = file_accuracy(run, static, data)["accuracy"]
        row["accuracy_drop_points"] = round(eager - row["file_accuracy"], 4)
        if precision == "int8":
            row["int8_guard"] = {"max_drop": max_drop, "passed": row["accuracy_drop_points"] <= max_drop}
        index = len(rows)
        for size in sizes:
            if backend == "executorch" and size != 1:

                def make(fmt=fmt, cal=cal, size=size):
                    begin = time.perf_counter()
                    made = export_bytes(model, fmt, batch=parity_batch, calibration=cal, batch_size=size, threads=threads)[0]
                    return made, {"export_s": round(time.perf_counter() - begin, 1)}

                files[(index, size)], info = cached(cache, f"{digest}.{backend}.{precision}.b{size}", make)
                row[f"export_s_batch{size}"] = info["export_s"]
            else:
                files[(index, size)] = data_b1
        rows.append(row)
    return rows, files


def markdown_table(result: dict) -> str:
    """The docs/benchmarks.md table: one line per model x backend x precision."""
    sizes = [str(s) for s in result["settings"]["batch_sizes"]]
    head = ["model", "backend", "prec.", "test acc % (drop)"]
    for s in sizes:
        head += [f"b{s} median / p90 ms"]
    head += ["load ms (b1)", "first call ms (b1)", "file bytes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for row in result["rows"]:
        b1 = row["latency"][sizes[0]]
        acc = f"{row['file_accuracy']:.2f}"
        if row["backend"] != "eager":
            acc += f" ({row['accuracy_drop_points']:+.2f})"
        cells = [row["model"], row["backend"], row["precision"], acc]
        for s in sizes:
            v = row["latency"][s]
            cells.append(f"{v['median_ms']:.2f} / {v['p90_ms']:.2f}")
        size_text = f"{b1['file_bytes']:,}"
        if row["backend"] == "executorch" and len(sizes) > 1:
            size_text += " (b" + sizes[-1] + ": " + f"{row['latency'][sizes[-1]]['file_bytes']:,})"
        cells += [f"{b1['load_ms']:.1f}", f"{b1['first_inference_ms']:.1f}", size_text]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoints", nargs="*", type=Path)
    parser.add_argument("--names", default=None, help="comma-separated labels (default: the checkpoints' folder names)")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-drop", type=float, default=1.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--cache", type=Path, help="folder keeping the exported files between runs (keyed by checkpoint sha256)")
    parser.add_argument("--export-only", action="store_true", help="make (and cache) the files and accuracies, time nothing")
    parser.add_argument("--table", type=Path, help="print the markdown table of this result JSON and exit")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(args.table.read_text())))
        return
    if not args.checkpoints:
        parser.error("give at least one checkpoint")
    names = args.names.split(",") if args.names else [c.parent.name for c in args.checkpoints]
    load_before = load_average()
    phases = {"start": load_before}
    data = load_dataset(args.dataset, None, progress=False)
    calibration = data.train.images[calibration_indices(len(data.train), 512, 0)]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows, files = [], {}
    flushed = torch.set_flush_denormal(True)
    with torch_threads(args.threads):
        machine = machine_record("cpu", load_before)
        machine.update({k: v for k, v in machine_info(args.threads, torch.device("cpu")).items() if k not in machine})
        models = []
        for checkpoint, name in zip(args.checkpoints, names):
            model = load_model(checkpoint)[0].eval()
            offset = len(rows)
            digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:16]
            new_rows, new_files = make_files(name, model, data, calibration, sizes, args.threads, args.max_drop,
                                             cache=args.cache, digest=digest)
            for row in new_rows:
                row["checkpoint"] = str(checkpoint)
            rows += new_rows
            files.update({(offset + i, s): v for (i, s), v in new_files.items()})
            models += [model] * len(new_rows)
        phases["after_export"] = load_average()
        if args.export_only:
            print(json.dumps(rows, indent=2))
            return
        for size in sizes:
            log(f"batch {size}: load + first call of {len(rows)} files, then {args.rounds} interleaved rounds")
            calls = []
            for index, row in enumerate(rows):
                item = prepare(row["backend"], models[index], size, threads=args.threads,
                               data=files.get((index, size)), precision=row["precision"])
                call, load_ms, first_ms = load_and_first_call(item)
                row["latency"][str(size)] = {"load_ms": load_ms, "first_inference_ms": first_ms, "file_bytes": len(item.data)}
                calls.append(call)
            samples = time_interleaved(calls, warmup=args.warmup, repeats=args.repeats, rounds=args.rounds)
            for row, times in zip(rows, samples):
                row["latency"][str(size)].update(summarize(times))
            del calls
            phases[f"after_batch_{size}"] = load_average()
    machine["load_average_1_5_15_min"].update(after=load_average(), phases=phases)  # machine_record's "after" is its call time
    result = {
        "kind": "igkd-edge-runtimes",
        "dataset": data.name, "test_images": len(data.test), "dataset_fingerprint": data.fingerprint,
        "settings": {"threads": args.threads, "repeats": args.repeats, "warmup": args.warmup, "rounds": args.rounds,
                     "batch_sizes": sizes, "max_drop": args.max_drop, "checkpoints": [str(c) for c in args.checkpoints],
                     "calibration": "512 training images, seed 0",
                     "input": "float32 NCHW 3x32x32, uniform [0, 1], seed 0",
                     "schedule": "per batch size, every model x backend x precision loaded (load_ms), called once "
                                 "(first_inference_ms), warmed up, then timed in `rounds` interleaved rounds",
                     "executorch_batch": "static: batch-1 file for accuracy and b1 timing, a batch-64 file for b64",
                     "denormals": "flushed (torch.set_flush_denormal)" if flushed else "flush not supported"},
        "machine": machine,
        "rows": rows,
    }
    if args.out:
        os.makedirs(args.out.parent, exist_ok=True)
        atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))
    print(markdown_table(result), file=sys.stderr)


if __name__ == "__main__":
    main()
