"""Unpickle the dataset batches of CIFAR-10 and Imagenet32 without running foreign code.

Those files are pickled dicts of numpy arrays, lists, ints and strings. A plain
``pickle.load`` would import and call anything the file names, so this
unpickler resolves only the few numpy constructors such dicts need and refuses
every other global. Any failure (truncated file, garbage, a forbidden global)
becomes an :class:`IgkdError` that names the file.
"""

from __future__ import annotations

import codecs
import io
import pickle

import numpy as np

from igkd.errors import IgkdError


def _allowed_globals() -> dict[tuple[str, str], object]:
    # Take the constructors from numpy itself: their module moved from numpy.core to numpy._core in numpy 2,
    # and files written by either (or by Python 2, as the CIFAR-10 batches were) must load.
    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    scalar = np.int64(0).__reduce__()[0]
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return allowed


_ALLOWED = _allowed_globals()


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}") from None


def load_pickled_dict(data: bytes, where: str) -> dict[str, object]:
    """The dict pickled in ``data`` with str keys (Python 2 files give bytes keys)."""
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as err:  # noqa: BLE001 - any failure of a foreign file is bad input
        truncated = isinstance(err, EOFError) or "truncated" in str(err)
        reason = "it ends early (truncated)" if truncated else f"{type(err).__name__}: {err}"
        raise IgkdError(f"{where} is not a readable dataset pickle: {reason}; replace the file with a good copy") from None
    if not isinstance(obj, dict):
        raise IgkdError(f"{where} holds a {type(obj).__name__}, not the dict of a dataset batch; is it the right file?")
    return {key.decode("latin-1") if isinstance(key, bytes) else str(key): value for key, value in obj.items()}


def decode_text(value: object) -> str:
    """A string stored by Python 2 (bytes under ``encoding="bytes"``) or 3."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
