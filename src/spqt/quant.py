"""The public quantize / dequantize API: a float matrix <-> its blocks in a named format and layout."""

import numpy as np
import torch

from spqt.formats import codec, get_format
from spqt.layouts import blocks_to_matrix, check_layout, grid_shape, matrix_to_blocks

# Weights encoded per call: bounds the encoder's temporaries (about 40 floats per weight); the GPU
# takes bigger chunks to keep its ~7,000 small launches per chunk few.
_CHUNK_WEIGHTS = {"cpu": 16384 * 256, "cuda": 262144 * 256}


def _as_tensor(a) -> tuple[torch.Tensor, bool]:
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a)), True
    if isinstance(a, torch.Tensor):
        return a, False
    raise TypeError(f"expected a numpy array or torch tensor, got {type(a).__name__}")


def quantize(w, fmt: str = "q4_k", layout: str = "row"):
    """Quantize a float matrix into blocks.

    w: (N, K) float numpy array or torch tensor (a CUDA tensor is quantized on its GPU, same bytes).
    Returns uint8 blocks of the same kind: (N, ceil(K/B), bytes) for ``row``, (ceil(N/B), K, bytes)
    for ``zigzag`` (B = 256, or 32 for q8_0; bytes per block in spqt.formats). Padding (to a
    multiple of B) is zero weights.
    """
    spec = get_format(fmt)
    check_layout(layout)
    tensor, was_numpy = _as_tensor(w)
    if tensor.dim() != 2:
        raise ValueError(f"quantize expects a 2-D matrix, got shape {tuple(tensor.shape)}")
    encode, _ = codec(spec.name)
    values = matrix_to_blocks(tensor, layout, spec.block_size)
    out = torch.empty((values.shape[0], spec.block_bytes), dtype=torch.uint8, device=values.device)
    chunk = _CHUNK_WEIGHTS.get(values.device.type, _CHUNK_WEIGHTS["cpu"]) // spec.block_size
    for start in range(0, values.shape[0], chunk):
        out[start : start + chunk] = encode(values[start : start + chunk])
    out = out.reshape(*grid_shape(layout, tuple(tensor.shape), spec.block_size), spec.block_bytes)
    return out.cpu().numpy() if was_numpy else out


def dequantize(blocks, fmt: str = "q4_k", layout: str = "row", shape: tuple[int, int] | None = None):
    """Blocks from :func:`quantize` -> float32 (N, K) of the same kind (numpy or torch)."""
    spec = get_format(fmt)
    check_layout(layout)
    if shape is None:
        raise ValueError("dequantize needs the matrix shape=(N, K)")
    tensor, was_numpy = _as_tensor(blocks)
    _, decode = codec(spec.name)
    flat = tensor.reshape(-1, spec.block_bytes)
    values = decode(flat)
    w = blocks_to_matrix(values, layout, tuple(shape), spec.block_size)
    return w.cpu().numpy() if was_numpy else w
