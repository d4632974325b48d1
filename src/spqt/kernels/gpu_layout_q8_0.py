"""The CUDA GEMV's copy of a zigzag Q8_0 matrix (zigzag_q4k.cu, TYPE 8).

A zigzag Q8_0 block (GGUF, 34 bytes: fp16 d, 32 int8 qs) runs down 32 rows of one column, w = d q.
The kernel takes a superblock row (256 rows: 8 blocks, 16 tiles of 16 rows, tiles 2 b and 2 b + 1
in block b) of 16 columns a warp and reads (exact: the same levels and d):

* ``quants`` (R, 4, K, 16) int32: the unsigned levels u = q + 128 (q's bits with bit 7 flipped),
  one byte each. Lane group g (rows g and g + 8 of every tile) needs 32 bytes of a column: byte
  2 (m % 8) + h = u[16 m + 8 h + g] of tile half H = m // 8 (16 bytes). Plane 2 H + g // 4 holds
  the halves H of lane groups 4 (g // 4) .. + 3, 16 bytes each, 64 bytes a column, column after
  column: Q4_K's zigzag planes (gpu_layout.to_planes), twice as many. A 16-byte load phase of the
  kernel (groups 2 s, 2 s + 1 of 4 consecutive columns) then reads two 128-byte lines, and a sparse
  kernel a column's 256 bytes as four 64-byte pieces. In the kernel one byte permute puts tile m's
  pair of bytes of two slots side by side and two more split it into the fp16 subnormals u 2^-24 of
  rows g and g + 8 (the high byte of each half zero).
* ``d`` (ceil(R / 4), K, 4, 8) fp16: the 8 d of a column's superblock row (block order), grouped by
  4 superblock rows as Q4_K's heads (gpu_layout.group_heads: one 64-byte unit a column); lane group
  g reads d of block g, whose tiles 2 g, 2 g + 1 are the two whose output column n = g the kernel
  keeps.

Block rows are padded to a multiple of 8 with zero blocks (d = 0: outputs past N are 0, cut off).
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from spqt.checkpoint import QuantizedWeight
from spqt.kernels import gpu_layout
from spqt.kernels.gpu_layout_planes import ColumnSuperblocks, zigzag_blocks

ROWS = 8  # Q8_0 block rows (32 rows each) in a superblock row of the kernel (256 outputs)


@dataclass
class GpuQ8_0Planes(ColumnSuperblocks):
    """A zigzag Q8_0 matrix for zigzag_q4k.cu (TYPE 8): level planes and grouped d (module docstring)."""

    quants: torch.Tensor
    d: torch.Tensor
    shape: tuple[int, int]
    layout: str = "zigzag"
    fmt: str = "q8_0"
    BYTES: ClassVar[int] = 34 * ROWS  # 8 GGUF blocks


def repack(weight: QuantizedWeight, device: str | torch.device) -> GpuQ8_0Planes:
    """Zigzag Q8_0 blocks (ceil(N / 32), K, 34) -> the CUDA GEMV's arrays (exact)."""
    blocks = zigzag_blocks(weight, "q8_0", device)
    brows, cols, _ = blocks.shape
    pad = -brows % ROWS
    if pad:
        blocks = torch.cat([blocks, blocks.new_zeros(pad, cols, 34)])
    rows = (brows + pad) // ROWS
    by_block = blocks.reshape(rows, ROWS, cols, 34)
    u = (by_block[..., 2:] ^ 0x80).permute(0, 2, 1, 3).reshape(rows, cols, 256)  # [r, c, weight 32 b + i]
    # weight 16 (8 H + mm) + 8 h + 4 p + gg -> plane 2 H + p, column c, byte 16 gg + 2 mm + h
    u = u.reshape(rows, cols, 2, 8, 2, 2, 4).permute(0, 2, 5, 1, 6, 3, 4)  # [r, H, p, c, gg, mm, h]
    quants = u.reshape(rows, 4, cols, 64).contiguous().view(torch.int32)
    d = by_block[..., :2].permute(0, 2, 1, 3).reshape(rows, cols, 16).contiguous().view(torch.int32)  # (R, K, 4)
    d = gpu_layout.group_heads(d).view(torch.float16)  # (ceil(R / 4), K, 4, 8)
    return GpuQ8_0Planes(quants, d, tuple(weight.shape))


def levels_of(w: GpuQ8_0Planes) -> torch.Tensor:
    """The signed levels (R, K, 256) int64 of every column's superblock row in weight order, from the
    kernel arrays alone."""
    rows, _, cols, _ = w.quants.shape
    u = w.quants.contiguous().view(torch.uint8).reshape(rows, 2, 2, cols, 4, 8, 2)  # [r, H, p, c, gg, mm, h]
    return u.permute(0, 3, 1, 5, 6, 2, 4).reshape(rows, cols, 256).to(torch.int64) - 128


def d_of(w: GpuQ8_0Planes) -> torch.Tensor:
    """The block factors (R, K, 8) fp16 (block b: rows 32 b .. of the superblock row)."""
    rows = w.grid[0]
    return gpu_layout.ungroup_heads(w.d.view(torch.int32), rows).contiguous().view(torch.float16)


def blocks_of(w: GpuQ8_0Planes) -> torch.Tensor:
    """The inverse of repack: the zigzag Q8_0 blocks (ceil(N / 32), K, 34) uint8, from the kernel arrays alone."""
    rows, cols = w.grid
    qs = (levels_of(w).reshape(rows, cols, ROWS, 32).permute(0, 2, 1, 3) & 0xFF).to(torch.uint8)
    d = d_of(w).permute(0, 2, 1).contiguous().view(torch.uint8).reshape(rows, ROWS, cols, 2)
    blocks = torch.cat([d, qs], dim=3).reshape(rows * ROWS, cols, 34)
    return blocks[: -(-w.shape[0] // 32)]
