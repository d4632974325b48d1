"""The CUDA GEMV's copy of a zigzag Q3_K matrix (zigzag_q4k.cu, TYPE 3).

A zigzag Q3_K block (GGUF, 110 bytes: 32 bytes of third bits, 64 of low bit pairs, 12 of packed
6-bit scales s, d) runs down 256 rows of one column, w = d (s[m] - 32) (q - 4), q = 0..7, tile m =
rows 16 m .. 16 m + 15 (GGUF's sub-block m). Lane group g of the kernel (rows g and g + 8 of every
tile) needs 32 levels of a column: 12 bytes. The kernel reads (exact: the same levels, scales, d):

* ``quants`` (R, 2, K, 8) int32, the low bit pairs: lane group g's two words L0, L1 (tiles 0-7, 8-15)
  in plane g // 4 at words 2 (g % 4), +1 (32 bytes a column a plane, column after column: an 8-byte
  load phase of 16 lanes, groups 4 p .. 4 p + 3 of 4 consecutive columns, reads one 128-byte line).
  Tile m sits in word m // 8, byte u = (m // 2) % 4: even m row g at bits 0-1, row g + 8 at 4-5; odd
  m at 2-3 and 6-7.
* ``high`` (R, K, 8) int32, the third bits: word g of a column (one line for 4 columns and 8 groups),
  bit 8 u + k (k < 8) of word g holds, for the tile of byte u (L0: k even, L1: k odd, the L1 bit one
  above L0's): k = 2 / 3 row g of the even tile, 6 / 7 its row g + 8; k = 4 / 5 row g of the odd tile;
  k = 0 / 1 row g + 8 of the odd tile of byte u - 1 (mod 4). In the kernel two bit selects per slot
  and word (LOP3: L0 with H under 0x33333333 for the even tiles, 0xCCCCCCCC for the odd; L1 with
  H >> 1) complete every level, then per tile one byte permute per slot pair [u, u or u + 1] and one
  AND per row give the fp16 subnormals q 2^-24 (even row g), q 2^-20 (even row g + 8), q 2^-22 (odd
  row g), q 2^-18 (odd row g + 8): every level within bits 0-8 of its half.
* ``head`` (ceil(R / 4), K, 4, 4) int32, grouped by 4 superblock rows as Q4_K's heads (one 64-byte
  unit a column): bytes 0-7 byte g = s[2 g] | (s[2 g + 1] & 3) << 6, bytes 8-11 nibble g =
  s[2 g + 1] >> 2, bytes 12-13 d, 14-15 zero. Lane g (whose output column n = g carries tiles 2 g,
  2 g + 1) decodes its two scales with one permute and a funnel shift.

112 bytes a column-superblock: the format's 110 and 2 bytes that make the head one 16-byte load
(a 14-byte head would take three loads, 8 + 4 + 2 bytes).
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from spqt.checkpoint import QuantizedWeight
from spqt.kernels import gpu_layout
from spqt.kernels.gpu_layout_planes import ColumnSuperblocks, zigzag_blocks
from spqt.kernels.gpu_layout_types import q3_k_levels

BYTES = 112  # a column-superblock: 64 low-pair bytes, 32 third-bit bytes, a 16-byte head


def _low_shift(device) -> torch.Tensor:
    """[m, h]: the bit of word m // 8 of a lane group's low pairs that holds row 16 m + 8 h + g's pair."""
    m = torch.arange(16, device=device)[:, None]
    h = torch.arange(2, device=device)[None, :]
    return 8 * ((m >> 1) & 3) + 2 * (m & 1) + 4 * h


def _high_bit(device) -> torch.Tensor:
    """[m, h]: the bit of a lane group's third-bit word that holds row 16 m + 8 h + g's third bit."""
    m = torch.arange(16, device=device)[:, None]
    h = torch.arange(2, device=device)[None, :]
    u = (m >> 1) & 3
    even = 8 * u + 2 + 4 * h
    odd = torch.where(h == 0, 8 * u + 4, 8 * ((u + 1) & 3))
    return torch.where(m & 1 == 0, even, odd) + (m >> 3)


def _to_int32(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def pack_low_pairs(pairs: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Bit pairs (R * K, 256) 0..3 in weight order -> the ``quants`` planes (R, 2, K, 8) int32 (module docstring;
    Q2_K's levels too, gpu_layout_q2k.py)."""
    lv = pairs.to(torch.int64).reshape(-1, 16, 2, 8)  # [block, m, h, g]: weight 16 m + 8 h + g
    low = (lv << _low_shift(lv.device)[None, :, :, None]).reshape(-1, 2, 8, 2, 8).sum(dim=(2, 3))  # [block, word, g]
    quants = _to_int32(low.permute(0, 2, 1)).reshape(rows, cols, 2, 8)  # [r, c, p, 2 (g % 4) + word]
    return quants.permute(0, 2, 1, 3).contiguous()


def low_pairs_of(quants: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_low_pairs: (R, 2, K, 8) int32 -> the bit pairs (R * K, 256) int64 in weight order."""
    low = (quants.to(torch.int64) & 0xFFFFFFFF).permute(0, 2, 1, 3).reshape(-1, 8, 2)  # [block, g, word]
    words = low[:, :, torch.arange(16, device=low.device) >> 3]  # [block, g, m]
    pairs = (words[:, :, :, None] >> _low_shift(low.device)[None, None]) & 3  # [block, g, m, h]
    return pairs.permute(0, 2, 3, 1).reshape(-1, 256)


@dataclass
class GpuQ3KPlanes(ColumnSuperblocks):
    """A zigzag Q3_K matrix for zigzag_q4k.cu (TYPE 3): low-pair planes, third-bit words, grouped heads."""

    quants: torch.Tensor
    high: torch.Tensor
    head: torch.Tensor
    shape: tuple[int, int]
    layout: str = "zigzag"
    fmt: str = "q3_k"
    BYTES: ClassVar[int] = BYTES  # the module's (112)


def pack_head(scales: torch.Tensor, d_bits: torch.Tensor) -> torch.Tensor:
    """Stored scales s (n, 16) 0..63 and d (n,) fp16 -> (n, 4) int32 heads (module docstring)."""
    s = scales.to(torch.int64)
    pair = s[:, 0::2] | ((s[:, 1::2] & 3) << 6)  # (n, 8): byte g
    top = (s[:, 1::2] >> 2) << (4 * torch.arange(8, device=s.device))  # nibble g
    w0 = (pair[:, 0:4] << (8 * torch.arange(4, device=s.device))).sum(dim=1)
    w1 = (pair[:, 4:8] << (8 * torch.arange(4, device=s.device))).sum(dim=1)
    w2 = top.sum(dim=1)
    w3 = d_bits.to(torch.int64) & 0xFFFF
    return _to_int32(torch.stack([w0, w1, w2, w3], dim=1))


def unpack_head(head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of pack_head: (n, 4) int32 -> (stored scales (n, 16) int64, d (n,) fp16)."""
    w = head.to(torch.int64) & 0xFFFFFFFF
    g = torch.arange(8, device=head.device)
    pair = (torch.where(g < 4, w[:, 0:1], w[:, 1:2]) >> (8 * (g % 4))) & 0xFF  # (n, 8)
    top = (w[:, 2:3] >> (4 * g)) & 15
    s = torch.stack([pair & 63, (pair >> 6) | (top << 2)], dim=2).reshape(-1, 16)
    d = (w[:, 3] & 0xFFFF).to(torch.int16).contiguous().view(torch.float16)
    return s, d


def repack(weight: QuantizedWeight, device: str | torch.device) -> GpuQ3KPlanes:
    """Zigzag Q3_K blocks (ceil(N / 256), K, 110) -> the CUDA GEMV's arrays (exact)."""
    from spqt.formats import q3_k

    blocks = zigzag_blocks(weight, "q3_k", device)
    rows, cols, _ = blocks.shape
    flat = blocks.reshape(-1, 110)
    levels = q3_k_levels(flat)
    quants = pack_low_pairs(levels & 3, rows, cols)
    lv = levels.reshape(-1, 16, 2, 8)  # [block, m, h, g]: weight 16 m + 8 h + g
    high = ((lv >> 2) << _high_bit(lv.device)[None, :, :, None]).sum(dim=(1, 2))  # [block, g]
    head = pack_head(q3_k.unpack_scales(flat[:, 96:108]), flat[:, 108:110].contiguous().view(torch.int16)[:, 0])
    head = gpu_layout.group_heads(head.reshape(rows, cols, 4))
    return GpuQ3KPlanes(quants, _to_int32(high).reshape(rows, cols, 8).contiguous(), head, tuple(weight.shape))


def levels_of(w: GpuQ3KPlanes) -> torch.Tensor:
    """The levels (R * K, 256) int64 0..7 in weight order, from the kernel arrays alone."""
    hw = (w.high.to(torch.int64) & 0xFFFFFFFF).reshape(-1, 8)
    third = (hw[:, :, None, None] >> _high_bit(hw.device)[None, None]) & 1  # [block, g, m, h]
    return low_pairs_of(w.quants) | (third.permute(0, 2, 3, 1).reshape(-1, 256) << 2)


def scales_of(w: GpuQ3KPlanes) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored scales s (R * K, 16) int64 0..63, d (R * K,) fp16), from the kernel arrays alone."""
    return unpack_head(gpu_layout.ungroup_heads(w.head, w.grid[0]).reshape(-1, 4))


def blocks_of(w: GpuQ3KPlanes) -> torch.Tensor:
    """The inverse of repack: the zigzag Q3_K blocks (R, K, 110) uint8, from the kernel arrays alone."""
    from spqt.formats import q3_k

    rows, cols = w.grid
    q = levels_of(w).reshape(-1, 8, 32)  # [block, bit j, byte l]: weight 32 j + l
    out = torch.empty((rows * cols, 110), dtype=torch.uint8, device=w.quants.device)
    bit = (1 << torch.arange(8, device=q.device))[None, :, None]
    out[:, 0:32] = ((q >> 2) * bit).sum(dim=1).to(torch.uint8)
    pairs = (q & 3).reshape(-1, 2, 4, 32)
    out[:, 32:96] = (pairs[:, :, 0] | (pairs[:, :, 1] << 2) | (pairs[:, :, 2] << 4) | (pairs[:, :, 3] << 6)).reshape(
        -1, 64).to(torch.uint8)
    s, d = scales_of(w)
    out[:, 96:108] = q3_k.pack_scales(s)
    out[:, 108:110] = d.reshape(-1, 1).view(torch.uint8)
    return out.reshape(rows, cols, 110)
