"""Optional runtimes: which extra installs each one, and the one-line refusal when it is missing."""

from __future__ import annotations

import importlib.util

from igkd.errors import IgkdError

# backend / format -> (modules it imports, the pip extra that installs them)
EXTRAS = {
    "onnx": (("onnx", "onnxruntime", "onnxscript"), "deploy"),
    "onnxruntime": (("onnx", "onnxruntime", "onnxscript"), "deploy"),
    "executorch": (("executorch", "torchao"), "executorch"),
    "litert": (("litert_torch", "ai_edge_litert"), "litert"),
}


def missing_modules(name: str) -> list[str]:
    modules, _ = EXTRAS.get(name, ((), ""))
    return [module for module in modules if importlib.util.find_spec(module) is None]


def available(name: str) -> bool:
    return not missing_modules(name)


def require(name: str) -> None:
    """Raise one line naming the extra to install when ``name``'s runtime is not installed."""
    missing = missing_modules(name)
    if missing:
        extra = EXTRAS[name][1]
        raise IgkdError(
            f"{name} needs the optional extra '{extra}' ({', '.join(missing)} not installed): "
            f'pip install -c constraints.txt -e ".[{extra}]"'
        )
