"""SpQt: activation-sparse decoding of LLMs on K-quantized weights in the zigzag layout.

``import spqt`` needs neither a GPU nor Triton; kernels import Triton lazily. It does not import torch either:
``spqt.quantize`` / ``spqt.dequantize`` load it on first use (so the `spqt` command can say "interrupted" to a
Ctrl-C during torch's import instead of a traceback).
"""

__version__ = "0.1.0"

__all__ = ["quantize", "dequantize", "__version__"]


def __getattr__(name: str):
    """spqt.quantize / spqt.dequantize, and any submodule (spqt.layouts, ...), loaded on first use."""
    import importlib.util

    if name in ("quantize", "dequantize"):
        return getattr(importlib.import_module("spqt.quant"), name)
    if importlib.util.find_spec(f"spqt.{name}") is not None:
        return importlib.import_module(f"spqt.{name}")
    raise AttributeError(f"module 'spqt' has no attribute {name!r}")
