"""ExecuTorch files (.pte) lowered to the XNNPACK backend: fp32, or int8 through the PT2E flow.

* fp32: ``torch.export`` -> ``to_edge_transform_and_lower(XnnpackPartitioner)`` -> ``.pte``.
* int8: ``torch.export`` -> ``prepare_pt2e`` with the XNNPACK quantiser (symmetric int8,
  weights per output channel, static activations) -> calibration on training images ->
  ``convert_pt2e`` -> the same lowering.

The batch size is fixed at export (``batch_size``, default 1, stored in the metadata).
With executorch 1.5.1 and torch 2.13.0 a dynamic batch axis exported and lowered, but the
XNNPACK-lowered program's input was memory-planned for 15 images whatever the declared
bound, and larger batches failed at run time ("Attempted to resize a bounded tensor"), so
igkd writes static shapes -- what on-device deployments use anyway. A ``.pte`` file has no
free-form metadata slot: the metadata is written beside it (``<file>.json``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings

import torch

from igkd.deploy.extras import require
from igkd.errors import IgkdError


@contextlib.contextmanager
def quiet():
    """Silence Python warnings, stdout and the libraries' INFO logging during export."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def calibrate_pt2e(prepared, images: torch.Tensor, batch_size: int) -> None:
    """Run whole static-size batches of float [0, 1] images through the observers (a short tail is dropped)."""
    usable = images.shape[0] - images.shape[0] % batch_size
    if usable == 0:
        raise IgkdError(f"int8 calibration needs at least {batch_size} images (the file's batch size), got {images.shape[0]}")
    with torch.no_grad():
        for start in range(0, usable, batch_size):
            prepared(images[start : start + batch_size])


def executorch_bytes(model: torch.nn.Module, example: torch.Tensor, *, calibration: torch.Tensor | None = None) -> bytes:
    """An XNNPACK-lowered .pte for input shape ``example.shape``; int8 when ``calibration`` images are given."""
    require("executorch")
    with quiet():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        try:
            program = torch.export.export(model, (example,))
            if calibration is not None:
                from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                    XNNPACKQuantizer,
                    get_symmetric_quantization_config,
                )
                from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

                quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
                prepared = prepare_pt2e(program.module(), quantizer)
                calibrate_pt2e(prepared, calibration, example.shape[0])
                program = torch.export.export(convert_pt2e(prepared), (example,))
            lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            return bytes(lowered.to_executorch().buffer)
        except IgkdError:
            raise
        except Exception as err:  # noqa: BLE001 - any exporter / lowering failure is one line
            raise IgkdError(f"ExecuTorch export failed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}") from None


def set_threads(threads: int) -> None:
    """ExecuTorch's XNNPACK thread pool is process-wide: size it before loading/running."""
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != threads:
        portable_lib._unsafe_reset_threadpool(int(threads))


def load_executorch(data: bytes | str | os.PathLike, threads: int = 1):
    """(run, batch_size): ``run(x)`` -> logits for a float batch of exactly the file's batch size."""
    require("executorch")
    with quiet():
        from executorch.runtime import Runtime

        set_threads(threads)
        source = data if isinstance(data, bytes) else os.fspath(data)
        try:
            # keep the Program (it holds the bytes the method's tensors point into): a Method alone
            # does not, and once the Program was freed runs failed at random ("resize a static tensor")
            program = Runtime.get().load_program(source)
            method = program.load_method("forward")
        except Exception as err:  # noqa: BLE001
            raise IgkdError(f"ExecuTorch cannot load {'the exported program' if isinstance(data, bytes) else data}: {err}") from None
    batch_size = int(method.metadata.input_tensor_meta(0).sizes()[0])

    def run(x: torch.Tensor, _keep=(program, source)) -> torch.Tensor:
        return method.execute([x.detach().float().contiguous()])[0]

    return run, batch_size
