"""SpQt: activation-sparse decoding of LLMs on K-quantized weights in the zigzag layout.

``import spqt`` needs neither a GPU nor Triton; kernels import Triton lazily.
"""

__version__ = "0.1.0"

from spqt.quant import dequantize, quantize

__all__ = ["quantize", "dequantize", "__version__"]
