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

import torch

from spqt.checkpoint import QuantizedWeight
from spqt.kernels import gpu_layout
from spqt.kernels.gpu_layout_q3k import _low_shift, _to_int32
from spqt.kernels.gpu_layout_types import q2_k_levels


@dataclass
class GpuQ2KPlanes:
    """A zigzag Q2_K matrix for zigzag_q4k.cu (TYPE 2): level planes, grouped scales, d | dmin."""

    quants: torch.Tensor
    scales: torch.Tensor
    d: torch.Tensor
    shape: tuple[int, int]
    layout: str = "zigzag"
    fmt: str = "q2_k"

    @property
    def grid(self) -> tuple[int, int]:
        """(superblock rows R, columns K)."""
        return self.quants.shape[0], self.quants.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads for the whole matrix (84 a column-superblock)."""
        rows, cols = self.grid
        return 84 * rows * cols


def pack_levels(levels: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Levels (R * K, 256) 0..3 in weight order -> (R, 2, K, 8) int32 (module docstring)."""
    lv = levels.to(torch.int64).reshape(-1, 16, 2, 8)  # [block, m, h, g]
    low = (lv << _low_shift(lv.device)[None, :, :, None]).reshape(-1, 2, 8, 2, 8).sum(dim=(2, 3))  # [block, word, g]
    quants = _to_int32(low.permute(0, 2, 1)).reshape(rows, cols, 2, 8)
    return quants.permute(0, 2, 1, 3).contiguous()


def levels_of(w: GpuQ2KPlanes) -> torch.Tensor:
    """The levels (R * K, 256) int64 0..3 in weight order, from the kernel arrays alone."""
    low = (w.quants.to(torch.int64) & 0xFFFFFFFF).permute(0, 2, 1, 3).reshape(-1, 8, 2)  # [block, g, word]
    words = low[:, :, torch.arange(16, device=low.device) >> 3]  # [block, g, m]
    pairs = (words[:, :, :, None] >> _low_shift(low.device)[None, None]) & 3  # [block, g, m, h]
    return pairs.permute(0, 2, 3, 1).reshape(-1, 256)


def repack(weight: QuantizedWeight, device: str | torch.device) -> GpuQ2KPlanes:
    """Zigzag Q2_K blocks (ceil(N / 256), K, 84) -> the CUDA GEMV's arrays (exact)."""
    if weight.fmt != "q2_k" or weight.layout != "zigzag":
        raise ValueError(f"the Q2_K CUDA layout takes zigzag q2_k, not {weight.layout} {weight.fmt}")
    blocks = weight.blocks.to(device)
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
