"""The CUDA GEMV's copy of a zigzag Q6_K matrix (zigzag_q4k.cu, TYPE 6).

A Q6_K block (GGUF, 210 bytes: 128 bytes of low nibbles, 64 of top bit pairs, 16 signed 8-bit
scales of 16 weights each, d) holds w = d sc[s] (q - 32), q = 0..63, s = weight // 16. The kernel
reads (exact: the same levels, scales and d):

* ``quants`` (R, 2, K, 16) int32: the levels' low nibbles in Q4_K's zigzag planes (gpu_layout);
* ``high`` (R, K, 16) int32: words 2 g and 2 g + 1 hold the top bit pairs lane group g needs:
  word 2 g + m // 8, byte (m // 2) % 4, bits 2 n .. 2 n + 1 (n = m % 2) = weight 16 m + g's and bits
  4 + 2 n .. 5 + 2 n = weight 16 m + 8 + g's. In the kernel one byte permute puts that byte of two
  slots side by side and one shift by 4 - 2 n moves the pairs to bits 4-5 and 8-9 (+16): the top
  bits of the fp16 subnormals q 2^-24 and q 2^-20 that carry rows g and g + 8. 64 bytes a block;
* ``scales`` (ceil(R / 4), K, 4, 4) int32: the 16 scale bytes, grouped by 4 block rows as Q4_K's
  heads (one 64-byte unit a column); tile m (rows 16 m ..) has scale m;
* ``d`` (R, K) fp16.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from spqt.checkpoint import QuantizedWeight
from spqt.kernels import gpu_layout
from spqt.kernels.gpu_layout_planes import ColumnSuperblocks, zigzag_blocks
from spqt.kernels.gpu_layout_types import q6_k_levels


@dataclass
class GpuQ6KPlanes(ColumnSuperblocks):
    """A zigzag Q6_K matrix for zigzag_q4k.cu (TYPE 6); quants as GpuQ4K's zigzag planes, scales grouped
    as its heads."""

    quants: torch.Tensor
    high: torch.Tensor
    scales: torch.Tensor
    d: torch.Tensor
    shape: tuple[int, int]
    layout: str = "zigzag"
    fmt: str = "q6_k"
    BYTES: ClassVar[int] = 210  # GGUF's block


def _shifts(device) -> torch.Tensor:
    """[byte b, n, h] -> the bit of a word that holds weight 16 m + 8 h + g's top pair, m = 8 w + 2 b + n."""
    return (8 * torch.arange(4, device=device).reshape(4, 1, 1) + 2 * torch.arange(2, device=device).reshape(1, 2, 1)
            + 4 * torch.arange(2, device=device).reshape(1, 1, 2))


def pack_high(levels: torch.Tensor) -> torch.Tensor:
    """Levels (n, 256) 0..63 in weight order -> (n, 16) int32 top-pair words (module docstring)."""
    top = (levels.to(torch.int64) >> 4).reshape(-1, 2, 4, 2, 2, 8)  # [block, w, b, n, h, g]: weight 16 (8w+2b+n) + 8h + g
    words = (top << _shifts(levels.device)[None, None, :, :, :, None]).sum(dim=(2, 3, 4))  # [block, w, g]
    words = words.permute(0, 2, 1)  # [block, g, w] -> word 2 g + w
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).reshape(-1, 16)


def unpack_high(words: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_high: (n, 16) int32 -> the top pairs (n, 256) int64 in weight order."""
    w64 = (words.to(torch.int64) & 0xFFFFFFFF).reshape(-1, 8, 2).permute(0, 2, 1)  # [block, w, g]
    bits = (w64[:, :, None, None, None, :] >> _shifts(words.device)[None, None, :, :, :, None]) & 3
    return bits.reshape(-1, 256)


def repack(weight: QuantizedWeight, device: str | torch.device) -> GpuQ6KPlanes:
    """Zigzag Q6_K blocks -> the CUDA GEMV's arrays (exact)."""
    blocks = zigzag_blocks(weight, "q6_k", device)
    rows, cols, _ = blocks.shape
    flat = blocks.reshape(-1, 210)
    levels = q6_k_levels(flat)
    quants = gpu_layout.to_planes(gpu_layout.pack_levels(levels & 15, "zigzag").reshape(rows, cols, 32))
    scales = gpu_layout.group_heads(flat[:, 192:208].contiguous().view(torch.int32).reshape(rows, cols, 4))
    d = flat[:, 208:210].contiguous().view(torch.float16).reshape(rows, cols)
    return GpuQ6KPlanes(quants, pack_high(levels).reshape(rows, cols, 16), scales, d, tuple(weight.shape))


def levels_of(w: GpuQ6KPlanes) -> torch.Tensor:
    """The levels (R * K, 256) int64 in weight order, from the kernel arrays alone."""
    low = gpu_layout.unpack_levels(gpu_layout.from_planes(w.quants).reshape(-1, 32), "zigzag")
    return low | (unpack_high(w.high.reshape(-1, 16)) << 4)
