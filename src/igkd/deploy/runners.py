"""One protocol for every backend: a file made once (not timed), then load -> first call -> warm-up -> timed calls.

``prepare(backend, model, batch_size, ...)`` returns a :class:`Prepared`: the bytes a device
would receive (eager: the model's safetensors) and ``load()``, which turns them into a
callable running one fixed batch -- exactly what ``igkd.deploy.latency`` times (load time,
first-inference time, then the steady state in interleaved rounds).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import torch

from igkd.errors import IgkdError

BACKENDS = ("eager", "onnxruntime", "executorch", "litert")
FLUSH_NOTE = (
    "denormals flushed to zero on the timing thread (torch.set_flush_denormal(True)); "
    "never-trained models also get BatchNorm statistics calibrated on random inputs, which covers runtime worker threads"
)


@dataclass
class Prepared:
    backend: str
    precision: str
    batch_size: int
    data: bytes
    load: Callable[[], Callable[[], object]]  # load the bytes; returns a no-argument call running the fixed batch


def calibrate_batchnorm(model: torch.nn.Module, image_size=(32, 32), batches: int = 8, size: int = 32, seed: int = 0) -> torch.nn.Module:
    """A copy whose BatchNorm running statistics are the exact averages over ``batches`` random uniform batches.

    A never-trained model keeps mean 0 / var 1 statistics that do not match its activations; in
    eval mode its activations then shrink layer after layer into denormal floats, which some CPUs
    process hundreds of times slower -- a latency artefact no trained model shows.
    """
    model = copy.deepcopy(model).cpu()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.rand(size, 3, *image_size, generator=generator))
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


def _fixed_input(batch_size: int, image_size, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch_size, 3, *image_size, generator=torch.Generator().manual_seed(seed))


def prepare(
    backend: str,
    model: torch.nn.Module,
    batch_size: int,
    *,
    threads: int,
    image_size=None,
    precision: str = "fp32",
    calibration: torch.Tensor | None = None,
    data: bytes | None = None,
) -> Prepared:
    """The file for ``backend`` (export / conversion, parity-checked) and its loader at ``threads`` threads.

    ``image_size``: (H, W) of the input, by default the model's (:func:`igkd.models.registry.input_size`).
    ``precision`` int8 needs ``calibration`` images for executorch / litert; for onnxruntime pass the
    int8 file as ``data`` (from ``igkd quantize``). ``data`` reuses a file made earlier.
    """
    from igkd.deploy.extras import require

    if backend not in BACKENDS:
        raise IgkdError(f"unknown backend {backend!r}: use {', '.join(BACKENDS)}")
    if backend != "eager":
        require(backend)
    if image_size is None:
        from igkd.models.registry import input_size

        image_size = input_size(model)
    x = _fixed_input(batch_size, image_size)
    if backend == "eager":
        return _prepare_eager(model, x, threads, precision)
    if precision == "int8" and data is None and (backend == "onnxruntime" or calibration is None):
        raise IgkdError(f"int8 {backend} needs calibration images (executorch, litert) or the int8 file (onnxruntime)")
    if backend == "onnxruntime":
        from igkd.deploy.export import export_bytes
        from igkd.deploy.runtime import ort_session

        data = data or export_bytes(model, "onnx", threads=threads)[0]

        def load():
            session = ort_session(data, threads)
            feed = {session.get_inputs()[0].name: x.numpy()}
            return lambda: session.run(None, feed)

        return Prepared(backend, precision, batch_size, data, load)
    from igkd.deploy.accuracy import load_file
    from igkd.deploy.export import export_bytes

    file_batch = batch_size if backend == "executorch" else 1  # ExecuTorch's batch axis is static; LiteRT resizes
    if data is None:
        data = export_bytes(model, backend, batch=_fixed_input(max(file_batch, 2), image_size, seed=1), threads=threads,
                            batch_size=file_batch, calibration=calibration)[0]

    def load():
        run, _ = load_file(backend, data, threads, batch_size)
        return lambda: run(x)

    return Prepared(backend, precision, batch_size, data, load)


def _prepare_eager(model: torch.nn.Module, x: torch.Tensor, threads: int, precision: str) -> Prepared:
    """Eager PyTorch: the 'file' is the model's safetensors; loading builds the model and reads them."""
    from safetensors.torch import load as load_safetensors
    from safetensors.torch import save as save_safetensors

    import copy

    from igkd.devices import prepare_model
    from igkd.models import build_model, spec_of

    if precision != "fp32":
        raise IgkdError("eager is measured in fp32 on the CPU")
    model = model.cpu().eval()
    spec = spec_of(model)
    data = save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()})

    def load():
        net = build_model(spec) if spec["arch"] != "external" else copy.deepcopy(model)  # an external one: its own structure
        net.load_state_dict(load_safetensors(data))
        net = prepare_model(net.eval(), torch.device("cpu"))
        batch = x.contiguous(memory_format=torch.channels_last)  # the layout prepare_model gives the weights

        def call():
            with torch.inference_mode():
                return net(batch)

        return call

    return Prepared("eager", precision, x.shape[0], data, load)


def load_and_first_call(prepared: Prepared) -> tuple[Callable[[], object], float, float]:
    """(call, load ms, first-inference ms)."""
    begin = time.perf_counter_ns()
    call = prepared.load()
    loaded = time.perf_counter_ns()
    call()
    first = time.perf_counter_ns()
    return call, (loaded - begin) / 1e6, (first - loaded) / 1e6
