"""The CUDA GEMV's copy of a zigzag Q5_K matrix: Q4_K's arrays for the low four bits, one more for the fifth.

A Q5_K block (GGUF, 176 bytes: d, dmin, the 12 packed 6-bit scales and mins, 32 bytes of fifth
bits, 128 bytes of low nibbles) has Q4_K's head and Q4_K's formula with levels 0..31, so
zigzag_q4k.cu runs it with TYPE 5 from (exact: the same levels, scales and fp16 factors):

* ``quants`` (R, 2, K, 16) int32: the levels' low nibbles in Q4_K's zigzag planes
  (gpu_layout.pack_levels + to_planes: byte 16 g + m = nibble of weight 16 m + g | of 16 m + 8 + g << 4);
* ``head`` (ceil(R / 4), K, 4, 4) int32: the blocks' first 16 bytes, grouped as Q4_K's (group_heads);
* ``fifth`` (R, K, 8) int32: word g of a block holds the fifth bits lane group g needs, byte q bit s
  = weight 16 m + g's and bit s + 4 = weight 16 m + 8 + g's, m = 4 q + s. In the kernel one byte
  permute puts byte q of two slots' words at bytes 0 and 2 and one shift by 4 - s moves the two
  bits of tile m to bits 4 and 8 (20 and 24): the fifth bit of the fp16 subnormals q 2^-24 and
  q 2^-20 that carry rows g and g + 8. 32 bytes a block, as GGUF's qh.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from spqt.checkpoint import QuantizedWeight
from spqt.kernels import gpu_layout
from spqt.kernels.gpu_layout_planes import ColumnSuperblocks, zigzag_blocks
from spqt.kernels.gpu_layout_types import q5_k_levels


@dataclass
class GpuQ5KPlanes(ColumnSuperblocks):
    """A zigzag Q5_K matrix for zigzag_q4k.cu (TYPE 5); quants and head as GpuQ4K's zigzag arrays."""

    quants: torch.Tensor
    head: torch.Tensor
    fifth: torch.Tensor
    shape: tuple[int, int]
    layout: str = "zigzag"
    fmt: str = "q5_k"
    BYTES: ClassVar[int] = 176  # GGUF's block


def _shifts(device) -> torch.Tensor:
    """(1, q, s, h, 1): the bit of word g that holds weight 16 (4 q + s) + 8 h + g's fifth bit."""
    return (8 * torch.arange(4, device=device).reshape(1, 4, 1, 1, 1) + torch.arange(4, device=device).reshape(1, 1, 4, 1, 1)
            + 4 * torch.arange(2, device=device).reshape(1, 1, 1, 2, 1))


def pack_fifth(levels: torch.Tensor) -> torch.Tensor:
    """Levels (n, 256) 0..31 in weight order -> (n, 8) int32 fifth-bit words (module docstring)."""
    top = (levels.to(torch.int64) >> 4).reshape(-1, 4, 4, 2, 8)  # [block, q, s, h, g] = weight 16 (4 q + s) + 8 h + g
    words = (top << _shifts(levels.device)).sum(dim=(1, 2, 3))  # (n, 8): bits do not overlap
    return words.to(torch.uint32).view(torch.int32)


def unpack_fifth(words: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_fifth: (n, 8) int32 -> the fifth bits (n, 256) int64 in weight order."""
    w64 = words.to(torch.int64).reshape(-1, 1, 1, 1, 8) & 0xFFFFFFFF
    return ((w64 >> _shifts(words.device)) & 1).reshape(-1, 256)


def repack(weight: QuantizedWeight, device: str | torch.device) -> GpuQ5KPlanes:
    """Zigzag Q5_K blocks -> the CUDA GEMV's arrays (exact)."""
    blocks = zigzag_blocks(weight, "q5_k", device)
    rows, cols, _ = blocks.shape
    flat = blocks.reshape(-1, 176)
    levels = q5_k_levels(flat)
    quants = gpu_layout.to_planes(gpu_layout.pack_levels(levels & 15, "zigzag").reshape(rows, cols, 32))
    head = gpu_layout.group_heads(flat[:, :16].contiguous().view(torch.int32).reshape(rows, cols, 4))
    return GpuQ5KPlanes(quants, head, pack_fifth(levels).reshape(rows, cols, 8), tuple(weight.shape))


def levels_of(w: GpuQ5KPlanes) -> torch.Tensor:
    """The levels (R * K, 256) int64 in weight order, from the kernel arrays alone."""
    low = gpu_layout.unpack_levels(gpu_layout.from_planes(w.quants).reshape(-1, 32), "zigzag")
    return low | (unpack_fifth(w.fifth.reshape(-1, 8)) << 4)
