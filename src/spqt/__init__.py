"""SpQt: activation-sparse decoding of LLMs on K-quantized weights in the zigzag layout.

``import spqt`` needs neither a GPU nor Triton; kernels import Triton lazily. It does not import torch either:
``spqt.quantize`` / ``spqt.dequantize`` load it on first use (so the `spqt` command can say "interrupted" to a
Ctrl-C during torch's import instead of a traceback).
"""

__version__ = "0.1.0"

__all__ = ["quantize", "dequantize", "__version__"]


def __getattr__(name: str):
    if name in ("quantize", "dequantize"):
        from spqt import quant

        return getattr(quant, name)
    raise AttributeError(f"module 'spqt' has no attribute {name!r}")
