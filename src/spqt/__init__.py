"""SpQt: activation-sparse decoding of LLMs on K-quantized weights in the zigzag layout.

``import spqt`` needs neither a GPU nor Triton; kernels import Triton lazily. ``quantize`` and
``dequantize`` are imported on first use, so that a module free of torch (spqt.tokenizer_spec,
which runs in its own process beside a conversion) can be imported without torch's ~2 s.
"""

__version__ = "0.1.0"

__all__ = ["quantize", "dequantize", "__version__"]


def __getattr__(name: str):
    if name in ("quantize", "dequantize"):
        from spqt import quant

        return getattr(quant, name)
    raise AttributeError(f"module 'spqt' has no attribute {name!r}")
