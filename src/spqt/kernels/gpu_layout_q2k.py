"""The CUDA GEMV's copy of a zigzag Q2_K matrix (zigzag_q4k.cu, TYPE 2).

A zigzag Q2_K block (GGUF, 84 bytes: 16 bytes of sc | mn << 4 per 16 weights, 64 of 2-bit levels,
d, dmin) runs down 256 rows of one column, w = d sc[m] q - dmin mn[m], q = 0..3, tile m = rows
16 m .. 16 m + 15 (GGUF's sub-block m). The kernel reads (exact: the same levels, scales, d, dmin):

* ``quants`` (R, 2, K, 8) int32: the levels as Q3_K's low bit pairs (gpu_layout_q3k.py): lane group
  g's two words (tiles 0-7, 8-15) in plane g // 4 at words 2 (g % 4), +1; tile m in byte u = (m // 2)
  % 4, even m row g at bits 0-1, row g + 8 at 4-5, odd m at 2-3 and 6-7. Per tile one byte permute per
  slot pair and one AND per row give the fp16 subnormals q 2^-24 / q 2^-20 (even), q 2^-22 / q 2^-18
  (odd). 64 bytes a column-superblock.
* ``scales`` (ceil(R / 4), K, 4, 4) int32: GGUF's 16 scale bytes unchanged, grouped by 4 superblock rows
  as Q4_K's heads (one 64-byte unit a column); lane g loads the 8-byte half holding its bytes 2 g, 2 g + 1
  (tiles 2 g, 2 g + 1: the two whose output column n = g the kernel keeps).
* ``d`` (R, K) int32: d | dmin << 16 (GGUF's last 4 bytes).

84 bytes a column-superblock: the format's own.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from spqt.checkpoint import QuantizedWeight
from spqt.kernels import gpu_layout
from spqt.kernels.gpu_layout_planes import ColumnSuperblocks, zigzag_blocks
from spqt.kernels.gpu_layout_q3k import low_pairs_of, pack_low_pairs
from spqt.kernels.gpu_layout_types import q2_k_levels


@dataclass
class GpuQ2KPlanes(ColumnSuperblocks):
    """A zigzag Q2_K matrix for zigzag_q4k.cu (TYPE 2): level planes, grouped scales, d | dmin."""

    quants: torch.Tensor
    scales: torch.Tensor
    d: torch.Tensor
    shape: tuple[int, int]
    layout: str = "zigzag"
    fmt: str = "q2_k"
    BYTES: ClassVar[int] = 84  # GGUF's block


def pack_levels(levels: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Levels (R * K, 256) 0..3 in weight order -> (R, 2, K, 8) int32: Q3_K's low-pair planes (module docstring)."""
    return pack_low_pairs(levels, rows, cols)


def levels_of(w: GpuQ2KPlanes) -> torch.Tensor:
    """The levels (R * K, 256) int64 0..3 in weight order, from the kernel arrays alone."""
    return low_pairs_of(w.quants)


def repack(weight: QuantizedWeight, device: str | torch.device) -> GpuQ2KPlanes:
    """Zigzag Q2_K blocks (ceil(N / 256), K, 84) -> the CUDA GEMV's arrays (exact)."""
    blocks = zigzag_blocks(weight, "q2_k", device)
    rows, cols, _ = blocks.shape
    flat = blocks.reshape(-1, 84)
    quants = pack_levels(q2_k_levels(flat), rows, cols)
    scales = gpu_layout.group_heads(flat[:, 0:16].contiguous().view(torch.int32).reshape(rows, cols, 4))
    d = flat[:, 80:84].contiguous().view(torch.int32).reshape(rows, cols)
    return GpuQ2KPlanes(quants, scales, d, tuple(weight.shape))


def blocks_of(w: GpuQ2KPlanes) -> torch.Tensor:
    """The inverse of repack: the zigzag Q2_K blocks (R, K, 84) uint8, from the kernel arrays alone."""
    rows, cols = w.grid
    q = levels_of(w).reshape(-1, 2, 4, 32)  # [block, half, shift j, byte l]: weight 128 half + 32 j + l
    out = torch.empty((rows * cols, 84), dtype=torch.uint8, device=w.quants.device)
    out[:, 0:16] = gpu_layout.ungroup_heads(w.scales, rows).reshape(-1, 4).contiguous().view(torch.uint8)
    out[:, 16:80] = (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64).to(
        torch.uint8)
    out[:, 80:84] = w.d.reshape(-1, 1).contiguous().view(torch.uint8)
    return out.reshape(rows, cols, 84)
