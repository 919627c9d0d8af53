"""The one way igkd reads a PyTorch pickle file (``torch.load``): weights only, errors in our words.

``torch.load(weights_only=True)`` refuses files that hold code or arbitrary Python
objects; PyTorch's own message for that suggests ``weights_only=False``, which would
run whatever the file holds. igkd never does that: it says what the file is and how to
convert a file you trust.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from igkd.errors import IgkdError

CONVERT_HINT = (
    "if you trust the file and its source, convert it in your own Python session: load it there, "
    "then save only the weights (torch.save(model.state_dict(), 'weights.pt'), or igkd.models.save_model(path, model) "
    "for an igkd .safetensors file) and give igkd that file"
)


def load_torch(path: str | Path, *, map_location: Any = "cpu", what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)``; IgkdError (one line) if the file is refused, truncated or not PyTorch's."""
    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err):  # the weights-only unpickler refused a class or function reference: the file holds code
            raise IgkdError(
                f"{what} {path} holds code or Python objects that igkd will not load (only tensors and plain containers are read); {CONVERT_HINT}"
            ) from None
        raise IgkdError(f"cannot read {what} {path} as a PyTorch file (not a weights-only pickle): it is damaged or of another format; restore it, or delete it to start over") from None
    except (OSError, MemoryError) as err:
        if isinstance(err, OSError) and err.filename is not None:
            raise
        raise IgkdError(f"cannot read {what} {path} ({type(err).__name__}): it is truncated or damaged; restore it, or delete it to start over") from None
    except Exception as err:  # noqa: BLE001 - RuntimeError (bad zip), EOFError, ValueError ...: the file is not usable
        first = (str(err).splitlines() or [""])[0][:160]
        raise IgkdError(
            f"cannot read {what} {path} as a PyTorch file ({type(err).__name__}: {first}): it is truncated, damaged or of another format; "
            "restore it, or delete it to start over"
        ) from None
