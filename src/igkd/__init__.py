"""igkd: compress CNNs by knowledge distillation guided by integrated gradients."""

__version__ = "0.1.0"

from igkd.errors import IgkdError

__all__ = ["IgkdError", "__version__"]
