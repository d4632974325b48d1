"""The public quantize / dequantize API: a float matrix <-> its blocks in a named format and layout."""

import operator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from spqt.errors import SpqtError
from spqt.formats import codec, get_format
from spqt.layouts import blocks_to_matrix, check_layout, grid_shape, matrix_to_blocks

# Weights encoded per call, so that every format (32- or 256-weight blocks) gets the same working
# set. The GPU takes big chunks to keep its ~7,000 small launches per chunk few. On the CPU a
# chunk's ~10 live float32 temporaries stay in cache at 1024 Q4_K blocks = 262,144 weights
# (measured 2,000 blocks/s per thread on a loaded 2-core EPYC, against 1,300 at 4096 blocks and
# 700 at 256, where the ~2,500 small ops per chunk dominate).
_CHUNK_WEIGHTS = {"cpu": 1024 * 256, "cuda": 262144 * 256}


def _encode_chunks(encode, values: torch.Tensor, out: torch.Tensor, chunk: int) -> None:
    """out[i] = encode(values[i]) chunk by chunk. On the CPU the chunks go to one worker thread
    per core, each running its ops on one thread: torch's own intra-op threads synchronise at
    every one of the encoder's thousands of small ops, which was 20x slower on a busy 2-core
    machine (108 against 2,011 blocks/s for 1024 blocks), and the ops release the GIL."""
    starts = range(0, values.shape[0], chunk)
    if values.device.type != "cpu" or len(starts) == 1 or torch.get_num_threads() == 1:
        for start in starts:
            out[start : start + chunk] = encode(values[start : start + chunk])
        return
    workers = torch.get_num_threads()

    def work(start: int) -> None:
        torch.set_num_threads(1)  # this worker's ops run on the worker alone
        out[start : start + chunk] = encode(values[start : start + chunk])

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(work, starts))  # re-raises a worker's exception here
    finally:
        torch.set_num_threads(workers)  # new threads take their count from the last setting


def _as_tensor(a) -> tuple[torch.Tensor, bool]:
    """A numpy array (any byte order: torch takes the machine's alone) or torch tensor as a tensor, and whether it
    was numpy."""
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("="))), True
    if isinstance(a, torch.Tensor):
        return a, False
    raise TypeError(f"expected a numpy array or torch tensor, got {type(a).__name__}")


def count_nonfinite(t: torch.Tensor) -> int:
    """How many NaN or infinite values a tensor holds (0 for an integer one): its sum first, one pass and no
    temporary; only where that is not finite (a NaN or inf value, or an overflow) the count."""
    if not t.is_floating_point() or torch.isfinite(t.sum()):
        return 0
    return int((~torch.isfinite(t)).sum())


def quantize(w, fmt: str = "q4_k", layout: str = "row", search: str = "reference"):
    """Quantize a float matrix into blocks.

    w: (N, K) float numpy array or torch tensor (a CUDA tensor is quantized on its GPU, same bytes).
    search: the encoder's search, "reference" (llama.cpp's bytes) or "mse" (q4_k and q5_k only:
    a lower plain squared error per block, spqt.formats.mse_search).
    Returns uint8 blocks of the same kind: (N, ceil(K/B), bytes) for ``row``, (ceil(N/B), K, bytes)
    for ``zigzag`` (B = 256, or 32 for q8_0; bytes per block in spqt.formats). Padding (to a
    multiple of B) is zero weights.
    """
    spec = get_format(fmt)
    check_layout(layout)
    encode, _ = codec(spec.name, search)
    tensor, was_numpy = _as_tensor(w)
    if tensor.dim() != 2:
        raise ValueError(f"quantize expects a 2-D matrix, got shape {tuple(tensor.shape)}")
    if tensor.is_complex():  # the cast to float32 would drop the imaginary parts with a warning alone
        raise TypeError(f"quantize expects a real matrix, got {str(tensor.dtype).replace('torch.', '')}")
    values = matrix_to_blocks(tensor, layout, spec.block_size)
    # counted in float32, as encoded: a float64 value past float32's range is infinite there
    bad = count_nonfinite(values)
    if bad:
        raise SpqtError(f"quantize: the matrix holds {bad} NaN or infinite values (as float32), which have no "
                        "quantized form")
    out = torch.empty((values.shape[0], spec.block_bytes), dtype=torch.uint8, device=values.device)
    chunk = max(1, _CHUNK_WEIGHTS.get(values.device.type, _CHUNK_WEIGHTS["cpu"]) // spec.block_size)
    _encode_chunks(encode, values, out, chunk)
    out = out.reshape(*grid_shape(layout, tuple(tensor.shape), spec.block_size), spec.block_bytes)
    return out.cpu().numpy() if was_numpy else out


def _matrix_shape(shape) -> tuple[int, int]:
    """dequantize's shape as (N, K): two integers >= 0 (Python's or numpy's); anything else is a ValueError."""
    try:
        n, k = (operator.index(d) for d in shape)
    except (TypeError, ValueError):
        n = k = -1
    if n < 0 or k < 0:
        raise ValueError(f"dequantize needs the matrix shape=(N, K), two integers >= 0, got {shape!r}")
    return n, k


def dequantize(blocks, fmt: str = "q4_k", layout: str = "row", shape: tuple[int, int] | None = None):
    """Blocks from :func:`quantize` -> float32 (N, K) of the same kind (numpy or torch)."""
    spec = get_format(fmt)
    check_layout(layout)
    shape = _matrix_shape(shape)
    tensor, was_numpy = _as_tensor(blocks)
    grid = grid_shape(layout, shape, spec.block_size)
    # the whole block grid, not only its byte count: another matrix's blocks, another format's, or the other
    # layout's (576x192 in Q4_K: 3 x 192 zigzag blocks, 576 x 1 row blocks)
    if tensor.dtype != torch.uint8 or tuple(tensor.shape) != (*grid, spec.block_bytes):
        raise SpqtError(f"{spec.name} {layout} blocks of a {shape[0]}x{shape[1]} matrix are uint8 "
                        f"{(*grid, spec.block_bytes)}, got {str(tensor.dtype).replace('torch.', '')} {tuple(tensor.shape)}")
    _, decode = codec(spec.name)
    flat = tensor.reshape(-1, spec.block_bytes)
    values = decode(flat)
    w = blocks_to_matrix(values, layout, tuple(shape), spec.block_size)
    return w.cpu().numpy() if was_numpy else w
