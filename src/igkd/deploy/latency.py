"""Honest latency: warm-up, at least 20 timed repetitions, order statistics, stated threads.

The paper's "140 ms -> 13 ms" came from one un-warmed forward pass, which mostly
times one-off costs (lazy initialisation, allocator growth, kernel selection). Here a
figure is the median (with p90, mean, min, max) of ``repeats`` timed calls made after
``warmup`` untimed ones, on a fixed input, with the thread count set and recorded
(``torch.set_num_threads`` for eager, ``intra_op_num_threads`` for ONNX Runtime).
The garbage collector is paused while timing. On CUDA every call is bracketed by CUDA
events and synchronised, so asynchronous kernel launches are not mistaken for speed.
When several models are compared they are timed in interleaved rounds, so that a change
in the machine's load during the run does not favour the models measured first.

Absolute times depend on the machine and on whatever else runs on it; the ratio of
medians teacher / student measured in one run is the figure that travels.

On the CPU every backend -- eager PyTorch, ONNX Runtime, ExecuTorch (XNNPACK), LiteRT -- follows
one protocol (``igkd.deploy.runners``): its file is made once (not timed), then loaded (load
time), called once (first-inference time), warmed up and timed; the file size is recorded.
Thread counts (default 1) are set per backend. Never-trained models are measured with
BatchNorm statistics calibrated on random inputs and denormals flushed, and the output says so.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import platform
import statistics
import time
from typing import Callable, Iterable

import numpy as np
import torch

from igkd.devices import prepare_model, resolve_device
from igkd.errors import IgkdError

MIN_REPEATS = 20
DEFAULT_ROUNDS = 5
BACKENDS = ("eager", "onnxruntime", "executorch", "litert")
DEFAULT_CPU_BACKENDS = ("eager", "onnxruntime")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
RANDOM_INIT = "random init (seed 0)"


def summarize(samples_ms: list[float]) -> dict:
    """Median, p90 (linear interpolation), mean, min, max of per-call times in ms."""
    ordered = sorted(samples_ms)
    return {
        "median_ms": statistics.median(ordered),
        "p90_ms": float(np.percentile(ordered, 90)),
        "mean_ms": statistics.fmean(ordered),
        "min_ms": ordered[0],
        "max_ms": ordered[-1],
        "repeats": len(ordered),
    }


def _time_once(fn: Callable[[], object], cuda: bool) -> float:
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - begin) / 1e6


def time_interleaved(
    fns: list[Callable[[], object]],
    *,
    warmup: int,
    repeats: int,
    rounds: int = DEFAULT_ROUNDS,
    device: torch.device | str = "cpu",
) -> list[list[float]]:
    """Per-call times in ms of several callables, ``repeats`` each, measured in interleaved rounds.

    Each callable first makes ``warmup`` untimed calls. Then, in each of ``rounds`` rounds,
    every callable in turn (the starting one rotates) makes one untimed call -- to re-warm
    caches the previous callable may have evicted -- followed by its share of the timed
    calls. A slow change in the machine's load (another job starting) thus falls on every
    model alike instead of on whichever ran last, which keeps the ratios honest.
    """
    cuda = torch.device(device).type == "cuda"
    rounds = max(1, min(rounds, repeats))
    shares = [repeats // rounds + (1 if r < repeats % rounds else 0) for r in range(rounds)]
    for fn in fns:
        for _ in range(warmup):
            fn()
    if cuda:
        torch.cuda.synchronize(device)
    samples: list[list[float]] = [[] for _ in fns]
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r, share in enumerate(shares):
            for offset in range(len(fns)):
                i = (r + offset) % len(fns)
                fns[i]()
                samples[i].extend(_time_once(fns[i], cuda) for _ in range(share))
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def time_callable(fn: Callable[[], object], *, warmup: int, repeats: int, device: torch.device | str = "cpu") -> list[float]:
    """Per-call wall time in ms of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    return time_interleaved([fn], warmup=warmup, repeats=repeats, rounds=1, device=device)[0]


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run with ``threads`` intra-op threads, restoring the previous count afterwards."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def precisions_for(device: torch.device, backend: str) -> tuple[str, ...]:
    """fp32 everywhere; on CUDA eager also bf16 and fp16 autocast."""
    return ("fp32", "bf16", "fp16") if device.type == "cuda" and backend == "eager" else ("fp32",)


def check_setting(backend: str, device: torch.device, precision: str = "fp32") -> None:
    if backend not in BACKENDS:
        raise IgkdError(f"unknown backend {backend!r}: use {' or '.join(BACKENDS)}")
    if backend != "eager" and device.type != "cpu":
        raise IgkdError(f"the {backend} backend is measured on CPU only: use --device cpu")
    if backend != "eager":
        from igkd.deploy.extras import require

        require(backend)
    if precision not in precisions_for(device, backend):
        raise IgkdError(f"precision {precision!r} is not measured for {backend} on {device.type}: use {', '.join(precisions_for(device, backend))}")


def _inference_context(device: torch.device, backend: str, precision: str):
    """Eager: inference mode (+ autocast for bf16 / fp16); ONNX Runtime needs nothing."""
    if backend != "eager":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    if precision in AUTOCAST_DTYPES:
        stack.enter_context(torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision]))
    return stack


def _runner(model, *, backend: str, device: torch.device, batch_size: int, session, threads: int, image_size, seed: int):
    """A no-argument callable running one forward pass of a fixed batch."""
    x = torch.rand(batch_size, 3, *image_size, generator=torch.Generator().manual_seed(seed))
    if backend == "eager":
        net = prepare_model(model.eval(), device)
        x = x.to(device).contiguous(memory_format=torch.channels_last)  # the layout prepare_model gives the weights
        return lambda: net(x)
    if session is None:
        from igkd.deploy.export import export_bytes
        from igkd.deploy.runtime import ort_session

        session = ort_session(export_bytes(model, "onnx", threads=threads)[0], threads)
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def _record(backend: str, device: torch.device, precision: str, batch_size: int, threads: int, warmup: int, samples: list[float]) -> dict:
    stats = summarize(samples)
    return {
        "backend": backend,
        "device": str(device),
        "precision": precision,
        "batch_size": batch_size,
        "threads": threads if device.type == "cpu" else None,
        "warmup": warmup,
        **stats,
        "per_image_ms": stats["median_ms"] / batch_size,
        "images_per_s": 1000.0 * batch_size / stats["median_ms"],
    }


def check_counts(repeats: int, warmup: int, batch_sizes: Iterable[int] = (1,)) -> None:
    """Refuse too few timed calls, a negative warm-up or a batch size below 1 (one error line)."""
    if repeats < MIN_REPEATS:
        raise IgkdError(f"--repeats {repeats} is too few for a median and p90: use at least {MIN_REPEATS}")
    if warmup < 0 or min(batch_sizes) < 1:
        raise IgkdError(f"warm-up must be >= 0 and batch sizes >= 1 (got {warmup}, {list(batch_sizes)})")


def measure_latency(
    model: torch.nn.Module,
    *,
    batch_size: int = 1,
    backend: str = "eager",
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    warmup: int = 5,
    repeats: int = MIN_REPEATS,
    threads: int | None = None,
    session=None,
    image_size: tuple[int, int] = (32, 32),
    seed: int = 0,
) -> dict:
    """Latency of one forward pass of a batch: median / p90 / mean / min / max in ms over ``repeats``.

    ``backend``: ``eager`` (eval mode, ``torch.inference_mode``; on CUDA channels_last and
    ``precision`` fp32 / bf16 / fp16 autocast) or ``onnxruntime`` (CPUExecutionProvider;
    pass a ``session`` to reuse one, else the model is exported and parity-checked first).
    ``threads``: intra-op threads (default: torch's current count), recorded in the result.
    """
    check_counts(repeats, warmup, [batch_size])
    device = resolve_device(str(device))
    check_setting(backend, device, precision)
    with torch_threads(threads) as used:
        run = _runner(model, backend=backend, device=device, batch_size=batch_size, session=session,
                      threads=used, image_size=image_size, seed=seed)
        with _inference_context(device, backend, precision):
            samples = time_callable(run, warmup=warmup, repeats=repeats, device=device)
    return _record(backend, device, precision, batch_size, used, warmup, samples)


def compare_sessions(
    sessions: dict[str, object],
    *,
    batch_sizes: Iterable[int] = (1, 64),
    warmup: int = 5,
    repeats: int = MIN_REPEATS,
    rounds: int = DEFAULT_ROUNDS,
    threads: int,
    image_size: tuple[int, int] = (32, 32),
) -> dict[str, dict[str, dict]]:
    """ONNX Runtime sessions (e.g. fp32 and int8) timed against each other, interleaved: {name: {batch: figures}}."""
    batch_sizes = [int(b) for b in batch_sizes]
    check_counts(repeats, warmup, batch_sizes)
    cpu = torch.device("cpu")
    result: dict[str, dict[str, dict]] = {name: {} for name in sessions}
    for batch_size in batch_sizes:
        runs = [
            _runner(None, backend="onnxruntime", device=cpu, batch_size=batch_size, session=session,
                    threads=threads, image_size=image_size, seed=0)
            for session in sessions.values()
        ]
        samples = time_interleaved(runs, warmup=warmup, repeats=repeats, rounds=rounds)
        for name, times in zip(sessions, samples):
            result[name][str(batch_size)] = {**_record("onnxruntime", cpu, "fp32", batch_size, threads, warmup, times), "precision": name}
    return result


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _load_average_1m() -> float | None:
    """The 1-minute load average, or None where the platform has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def machine_info(threads: int, device: torch.device) -> dict:
    """CPU model, cores, threads used, library versions, load average (other work skews timings)."""
    import onnx
    import onnxruntime

    info = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "load_average_1m": _load_average_1m(),
    }
    from importlib import metadata

    for package in ("executorch", "litert-torch", "ai-edge-litert"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[package] = metadata.version(package)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    return info


def benchmark_latency(
    entries: Iterable[tuple[torch.nn.Module, str]],
    *,
    batch_sizes: Iterable[int] = (1, 64),
    backends: Iterable[str] = BACKENDS,
    device: str | torch.device = "cpu",
    warmup: int = 5,
    repeats: int = MIN_REPEATS,
    rounds: int = DEFAULT_ROUNDS,
    threads: int | Iterable[int] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Footprint and latency of each (model, source) entry for every backend x precision x batch size.

    For each setting all models are timed together in interleaved rounds (``time_interleaved``).
    Speed-up is the teacher's median / the model's median for the same backend, device,
    precision and batch size (present only when a teacher is among the entries).
    ``progress(description, done, total)`` is called before each step. ``threads``: one count or
    several (each a separate setting on the CPU); default torch's current count.
    """
    from igkd.models.registry import input_size

    entries, batch_sizes, backends = list(entries), [int(b) for b in batch_sizes], list(backends)
    check_counts(repeats, warmup, batch_sizes)
    device = resolve_device(str(device))
    for backend in backends:
        check_setting(backend, device, "fp32")
    if device.type == "cpu":
        counts = [int(t) for t in ([threads] if isinstance(threads, int) else threads or [torch.get_num_threads()])]
        return _benchmark_cpu(entries, batch_sizes, backends, counts, warmup, repeats, rounds, progress)
    threads = threads if isinstance(threads, int) or threads is None else int(list(threads)[0])
    settings = [(b, p, n) for b in backends for p in precisions_for(device, b) for n in batch_sizes]
    report = progress or (lambda _description, _done, _total: None)
    models, measurements = [], []
    with torch_threads(threads) as used:
        machine = machine_info(used, device)
        sessions: list = [None] * len(entries)
        for index, (model, source) in enumerate(entries):
            row = _model_row(model, source)
            models.append(row)
            if "onnxruntime" in backends:
                from igkd.deploy.export import export_bytes
                from igkd.deploy.runtime import ort_session

                report(f"{row['label']}: exporting ONNX", 0, len(settings))
                data, export_report = export_bytes(model, "onnx", threads=used)
                row["onnx_parity_max_abs_diff"] = export_report["parity"]["max_abs_diff"]
                sessions[index] = ort_session(data, used)
        for done, (backend, precision, batch_size) in enumerate(settings):
            report(f"{backend} {precision} batch {batch_size}: {len(entries)} models, interleaved", done, len(settings))
            runs = [
                _runner(model, backend=backend, device=device, batch_size=batch_size, session=session,
                        threads=used, image_size=input_size(model), seed=0)
                for (model, _), session in zip(entries, sessions)
            ]
            with _inference_context(device, backend, precision):
                samples = time_interleaved(runs, warmup=warmup, repeats=repeats, rounds=rounds, device=device)
            for row, times in zip(models, samples):
                measurements.append({"model": row["label"], "k": row["k"], **_record(backend, device, precision, batch_size, used, warmup, times)})
        for model, _ in entries:
            model.cpu()
        machine["load_average_1m_after"] = _load_average_1m()
    return _result(
        device, models, measurements, machine, then_by="precision",
        settings=_settings(batch_sizes, backends, device, used, warmup, repeats, rounds),
        definitions=_definitions("backend x precision x batch size", "device"),
    )


def _benchmark_cpu(entries, batch_sizes, backends, counts, warmup, repeats, rounds, progress) -> dict:
    """Every backend through ``igkd.deploy.runners``: file made once, load, first call, warm-up, interleaved timing."""
    from igkd.deploy.runners import FLUSH_NOTE, calibrate_batchnorm, load_and_first_call, prepare

    cpu = torch.device("cpu")
    report = progress or (lambda _description, _done, _total: None)
    models, nets = [], []
    for model, source in entries:
        row = _model_row(model, source)
        if source == RANDOM_INIT:
            model = calibrate_batchnorm(model)
            row["batchnorm_statistics"] = "calibrated on 8 random uniform batches of 32 (never-trained model)"
        models.append(row)
        nets.append(model)
    settings = [(t, b, n) for t in counts for b in backends for n in batch_sizes]
    files: dict = {}
    measurements = []
    flushed = torch.set_flush_denormal(True)
    try:
        with torch_threads(counts[0]):
            machine = machine_info(counts[0], cpu)
        for done, (threads, backend, batch_size) in enumerate(settings):
            report(f"{backend} batch {batch_size}, {threads} thread(s): {len(entries)} models", done, len(settings))
            with torch_threads(threads):
                prepared = []
                for index, net in enumerate(nets):
                    key = (index, backend, batch_size if backend == "executorch" else 0)
                    item = prepare(backend, net, batch_size, threads=threads, data=files.get(key))
                    files[key] = item.data
                    prepared.append(item)
                loaded = [load_and_first_call(item) for item in prepared]
                samples = time_interleaved([call for call, _, _ in loaded], warmup=warmup, repeats=repeats, rounds=rounds)
            for row, item, (_, load_ms, first_ms), times in zip(models, prepared, loaded, samples):
                measurements.append({
                    "model": row["label"], "k": row["k"], **_record(backend, cpu, "fp32", batch_size, threads, warmup, times),
                    "load_ms": load_ms, "first_inference_ms": first_ms, "file_bytes": len(item.data),
                })
        machine["load_average_1m_after"] = _load_average_1m()
    finally:
        torch.set_flush_denormal(False)
    denormals = FLUSH_NOTE if flushed else "flush-to-zero not supported on this CPU; never-trained models' BatchNorm statistics calibrated"
    return _result(
        cpu, models, measurements, machine, then_by="threads",
        settings=_settings(batch_sizes, backends, cpu, counts[0] if len(counts) == 1 else counts, warmup, repeats, rounds,
                           denormals=denormals),
        definitions=_definitions(
            "threads x backend x batch size", "threads",
            p90_ms="90th percentile of the same calls (MLPerf's edge latency figure)",
            load_ms="time to turn the file's bytes into a ready runtime (session / program / interpreter / model)",
            first_inference_ms="the first call after loading, before any warm-up",
            file_bytes="the file a device receives: safetensors (eager), .onnx, .pte (static batch), .tflite",
        ),
    )


def _model_row(model: torch.nn.Module, source: str) -> dict:
    """A model's footprint, its source and its label (name, and the file it came from); the model goes to eval mode."""
    from igkd.deploy.footprint import model_footprint

    model.eval()
    row = {**model_footprint(model), "source": source}
    row["label"] = row["name"] if source == RANDOM_INIT else f"{row['name']} ({os.path.basename(source)})"
    return row


def _settings(batch_sizes, backends, device: torch.device, threads, warmup: int, repeats: int, rounds: int, **extra) -> dict:
    """What a benchmark was run with; ``extra``: what only one schedule records."""
    return {
        "batch_sizes": batch_sizes,
        "backends": backends,
        "device": str(device),
        "threads": threads,
        "warmup": warmup,
        "repeats": repeats,
        "rounds": min(rounds, repeats),
        "input": "float32 NCHW 3x32x32, uniform [0, 1], seed 0 (latency does not depend on the values)",
        **extra,
    }


def _definitions(timed_per: str, compared_within: str, **extra) -> dict:
    """What each figure means: models are timed together per ``timed_per`` setting, and a speed-up compares
    models of the same backend, ``compared_within``, precision and batch size; ``extra``: one schedule's own figures."""
    return {
        "median_ms": "median over `repeats` timed calls (one call = one batch) after `warmup` untimed ones",
        **extra,
        "schedule": f"per {timed_per}, all models are timed in `rounds` interleaved rounds: "
        "in each round every model (rotating start) makes 1 untimed call, then repeats/rounds timed calls",
        "speedup_vs_teacher": f"teacher median / model median, same backend, {compared_within}, precision and batch size "
        "(the first teacher in the run)",
        "cf": "teacher parameters / model parameters",
        "size_bytes": "state-dict bytes: floating tensors x 4 (fp32) or 2 (fp16); int8 = conv/linear weights "
        "x 1 byte + one fp32 scale per output channel, other tensors fp32; BatchNorm counters not counted",
    }


def _result(
    device: torch.device, models: list[dict], measurements: list[dict], machine: dict, *, then_by: str, settings: dict, definitions: dict
) -> dict:
    """The benchmark's document (either schedule): measurements ordered by model, backend, ``then_by`` and batch size, with speed-ups."""
    from igkd.provenance import environment

    order = {row["label"]: i for i, row in enumerate(models)}
    measurements.sort(key=lambda m: (order[m["model"]], settings["backends"].index(m["backend"]), m[then_by], m["batch_size"]))
    _add_speedups(measurements)
    return {
        "kind": "igkd-latency-benchmark",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "machine": machine,
        "environment": environment(device),
        "models": models,
        "measurements": measurements,
        "definitions": definitions,
    }


def _add_speedups(measurements: list[dict]) -> None:
    key = lambda m: (m["backend"], m["device"], m["precision"], m["batch_size"], m.get("threads"))  # noqa: E731
    teacher: dict = {}
    for m in measurements:
        if m["k"] == 0:
            teacher.setdefault(key(m), m["median_ms"])
    for m in measurements:
        reference = teacher.get(key(m))
        m["speedup_vs_teacher"] = round(reference / m["median_ms"], 3) if reference else None
