"""Where each quantization block's weights come from in the matrix: the row and zigzag layouts.

For W of shape (N, K) and blocks of B weights (256 for the K-quants, 32 for Q8_0: a Q8_0 zigzag
block runs down 32 rows of one column):

* ``row`` (llama.cpp's): block (n, b) holds ``W[n, B*b : B*b + B]``; blocks are stored n-major,
  as an array of shape (N, ceil(K / B), bytes). K is padded with zero columns.
* ``zigzag`` (SpQt's): block (r, k) holds ``W[B*r : B*r + B, k]``, B weights running DOWN
  column k; blocks are stored superblock-row-major, as (ceil(N / B), K, bytes): all K blocks of
  superblock row r, then row r + 1. N is padded with zero rows. Skipping input k skips block
  (r, k) for every r, and the outputs of one superblock row stay contiguous.

Padding never changes a result: padded columns meet zero inputs (row) and padded rows are
outputs that are cut off (zigzag). The functions here move float values between a matrix and its
(n_blocks, B) block contents; the byte encoding is the format's business.
"""

import torch

from spqt.errors import SpqtError

LAYOUTS = ("row", "zigzag")


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise SpqtError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return layout


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def grid_shape(layout: str, shape: tuple[int, int], block_size: int) -> tuple[int, int]:
    """The 2-D grid of blocks: (N, ceil(K/B)) for row, (ceil(N/B), K) for zigzag."""
    n, k = shape
    if check_layout(layout) == "row":
        return n, _ceil_div(k, block_size)
    return _ceil_div(n, block_size), k


def matrix_to_blocks(w: torch.Tensor, layout: str, block_size: int) -> torch.Tensor:
    """(N, K) float -> (n_blocks, B) float32, blocks in storage order, zero padded."""
    n, k = w.shape
    rows, cols = grid_shape(layout, (n, k), block_size)
    w = w.to(torch.float32)
    if layout == "row":
        padded = torch.nn.functional.pad(w, (0, cols * block_size - k))
        return padded.reshape(rows * cols, block_size)
    padded = torch.nn.functional.pad(w, (0, 0, 0, rows * block_size - n))
    return padded.reshape(rows, block_size, k).permute(0, 2, 1).reshape(rows * cols, block_size)


def blocks_to_matrix(values: torch.Tensor, layout: str, shape: tuple[int, int], block_size: int) -> torch.Tensor:
    """(n_blocks, B) float, blocks in storage order -> (N, K), padding cut off."""
    n, k = shape
    rows, cols = grid_shape(layout, shape, block_size)
    if values.shape != (rows * cols, block_size):
        raise SpqtError(f"{layout} blocks of a {n}x{k} matrix must be {rows * cols}x{block_size}, got {tuple(values.shape)}")
    if layout == "row":
        return values.reshape(rows, cols * block_size)[:, :k]
    return values.reshape(rows, k, block_size).permute(0, 2, 1).reshape(rows * block_size, k)[:n]
