"""The kernels' copy of a zigzag Q8_0, Q6_K, Q5_K, Q3_K or Q2_K matrix: GGUF's blocks split into arrays so
that the GEMV kernels (zigzag_types.py) read each block's bytes once, in 16-byte pieces.

On disk a block is GGUF's (formats/). At load time (torch, any device, exact: the same levels,
scales and fp16 factors) every block (r, k) of the zigzag grid (ceil(N / B), K) becomes, with
``R`` rows of blocks and one column's block contiguous in each array:

* Q8_0 (B = 32 rows of one column), 34 bytes:
  ``quants`` (R8, K, 32) int8 the levels, weight order (32 bytes: two 16-byte loads);
  ``d`` (R8, K) fp16. R8 = R rounded up to Q8_ROW_GROUP with zero blocks, so that a program
  that takes 1-8 block rows (256 outputs at 8) reads no block without a mask.
* Q6_K (B = 256), 210 bytes: weight ``16 s + 4 j + m`` (sub-block s < 16, j, m < 4):
  ``quants`` (R, K, 32) int32: the low nibble at bit 8 m + 4 (j % 2) of word 2 s + j // 2;
  ``high`` (R, K, 16) int32: the top 2 bits at bit 8 m + 2 ((j + 2) % 4) of word s;
  ``scales`` (R, K, 16) int8 (GGUF's, sub-block order); ``d`` (R, K) fp16.
  A lane takes words 4p..4p+3 and 2p, 2p+1 (sub-blocks 2p, 2p+1); one LOP3 on (low word >> 4 (j % 2),
  high word shifted) puts weight (j, m)'s 6 bits at byte m.
* Q5_K (B = 256), 176 bytes: weight ``32 s + 4 j + m`` (sub-block s < 8, j < 8, m < 4):
  ``quants`` (R, K, 32) int32: the low nibble at bit 8 m + 4 (j % 2) of word 4 s + j // 2;
  ``high`` (R, K, 8) int32: the fifth bit at bit 8 m + (j + 4) % 8 of word s;
  ``head`` (R, K, 4) int32 = GGUF's first 16 bytes (d | dmin << 16, the packed 6-bit scales and
  mins, as Q4_K's head, decoded by q4k_bits). A lane takes one sub-block.
* Q3_K (B = 256), 110 bytes: weight ``16 s + e`` (sub-block s < 16, e < 16):
  ``quants`` (R, K, 16) int32: the low 2 bits at bit 2 e of word 4 (s % 4) + s // 4;
  ``high`` (R, K, 8) int32: the third bit in word 2 (s % 4) + s // 8, which holds sub-blocks
  s0 = s % 4 + 8 (s // 8) and s0 + 4: s0's at bit 2 e + 2 - e % 2, s0 + 4's two bits lower (_q3_k_bit);
  ``scales`` (R, K, 3) int32 = GGUF's 12 packed 6-bit scales; ``d`` (R, K) fp16.
  A lane takes sub-blocks p, p + 4, p + 8, p + 12 (their scales are byte p of the packed words).
* Q2_K (B = 256), 84 bytes: weight ``16 s + n`` (s, n < 16):
  ``quants`` (R, K, 16) int32: the level at bit 2 n of word s;
  ``scales`` (R, K, 16) uint8 = GGUF's (scale | min << 4, sub-block order);
  ``d`` (R, K) int32 = d | dmin << 16 (fp16 bits). A lane takes 4 sub-blocks.

Every array's per-block slice is a multiple of 16 bytes except the fp16 ``d``, which the kernels
read for 16 neighbouring columns at once (32 contiguous bytes).
"""

from dataclasses import dataclass

import torch

from spqt.checkpoint import QuantizedWeight
from spqt.formats import get_format
from spqt.layouts import blocks_to_matrix

TYPES = ("q8_0", "q6_k", "q5_k", "q3_k", "q2_k")
Q8_ROW_GROUP = 8  # Q8_0 block rows padded to a multiple of this: programs of up to 8 x 32 outputs


@dataclass
class GpuZigzag:
    """A zigzag Q8_0 / Q6_K / Q5_K / Q3_K / Q2_K matrix in kernel layout (module docstring).
    Arrays a format lacks are None."""

    fmt: str
    shape: tuple[int, int]
    quants: torch.Tensor
    d: torch.Tensor | None = None
    high: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    head: torch.Tensor | None = None
    layout: str = "zigzag"

    @property
    def rows(self) -> int:
        """Block rows in the arrays (Q8_0: padded to Q8_ROW_GROUP)."""
        return self.quants.shape[0]

    @property
    def block_size(self) -> int:
        return get_format(self.fmt).block_size

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks of the matrix (GGUF's block size each; Q8_0's padding rows not counted)."""
        spec = get_format(self.fmt)
        return spec.block_bytes * -(-self.shape[0] // spec.block_size) * self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.quants.device


def _to_int32(v: torch.Tensor) -> torch.Tensor:
    """Values 0..2^32 - 1 (int64) -> int32 of the same 32 bits."""
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32).contiguous()


def q6_k_levels(blocks: torch.Tensor) -> torch.Tensor:
    """GGUF Q6_K blocks (n, 210) uint8 -> levels (n, 256) int64 0..63 in weight order."""
    n = blocks.shape[0]
    ql = blocks[:, 0:128].to(torch.int64).reshape(n, 2, 2, 32)
    qh = blocks[:, 128:192].to(torch.int64).reshape(n, 2, 1, 32)
    low = torch.cat([ql & 0xF, ql >> 4], dim=2)
    high = (qh >> (2 * torch.arange(4, device=blocks.device)).reshape(1, 1, 4, 1)) & 3
    return (low | (high << 4)).reshape(n, 256)


def q5_k_levels(blocks: torch.Tensor) -> torch.Tensor:
    """GGUF Q5_K blocks (n, 176) uint8 -> levels (n, 256) int64 0..31 in weight order (sub-block
    s = weights 32 s ..: low nibbles of qs byte 32 (s // 2) + l (high nibble for odd s), fifth bit =
    bit s of qh byte l)."""
    n = blocks.shape[0]
    qs = blocks[:, 48:176].to(torch.int64).reshape(n, 4, 1, 32)
    low = torch.cat([qs & 15, qs >> 4], dim=2).reshape(n, 8, 32)
    qh = blocks[:, 16:48].to(torch.int64).reshape(n, 1, 32)
    fifth = (qh >> torch.arange(8, device=blocks.device).reshape(1, 8, 1)) & 1
    return (low | (fifth << 4)).reshape(n, 256)


def q3_k_levels(blocks: torch.Tensor) -> torch.Tensor:
    """GGUF Q3_K blocks (n, 110) uint8 -> levels (n, 256) int64 0..7 in weight order (the weight
    is d (s - 32) (level - 4))."""
    n = blocks.shape[0]
    hm = blocks[:, 0:32].to(torch.int64).reshape(n, 1, 32)
    high = (hm >> torch.arange(8, device=blocks.device).reshape(1, 8, 1)) & 1  # (n, 8, 32)
    qs = blocks[:, 32:96].to(torch.int64).reshape(n, 2, 1, 32)
    low = ((qs >> (2 * torch.arange(4, device=blocks.device).reshape(1, 1, 4, 1))) & 3).reshape(n, 8, 32)
    return (low | (high << 2)).reshape(n, 256)


def q2_k_levels(blocks: torch.Tensor) -> torch.Tensor:
    """GGUF Q2_K blocks (n, 84) uint8 -> levels (n, 256) int64 0..3 in weight order."""
    n = blocks.shape[0]
    qs = blocks[:, 16:80].to(torch.int64).reshape(n, 2, 1, 32)
    return ((qs >> (2 * torch.arange(4, device=blocks.device).reshape(1, 1, 4, 1))) & 3).reshape(n, 256)


def _q3_k_bit(device) -> torch.Tensor:
    """(16 s, 16 e): the bit of weight e of sub-block s in its third-bit word 2 (s % 4) + s // 8,
    which holds sub-blocks s0 = s % 4 + 8 (s // 8) and s0 + 4: s0's even e at 2 e + 2, odd e at
    2 e + 1; s0 + 4's at 2 e and 2 e - 1 (each next to its low bits once merged, zigzag_types)."""
    s = torch.arange(16, device=device)[:, None]
    e = torch.arange(16, device=device)[None, :]
    return 2 * e + 2 - e % 2 - 2 * ((s // 4) % 2)


def repack(weight: QuantizedWeight, device: str | torch.device) -> GpuZigzag:
    """Canonical zigzag blocks -> kernel layout on `device` (exact)."""
    if weight.fmt not in TYPES or weight.layout != "zigzag":
        raise ValueError(f"gpu_layout_types repacks zigzag {', '.join(TYPES)}, not {weight.layout} {weight.fmt}")
    blocks = weight.blocks.to(device)
    rows, cols, nbytes = blocks.shape
    flat = blocks.reshape(-1, nbytes)
    shape = tuple(weight.shape)
    if weight.fmt == "q8_0":
        pad = -rows % Q8_ROW_GROUP
        if pad:
            blocks = torch.cat([blocks, blocks.new_zeros(pad, cols, nbytes)])
        quants = blocks[..., 2:].contiguous().view(torch.int8)
        d = blocks[..., 0:2].contiguous().view(torch.float16).reshape(rows + pad, cols)
        return GpuZigzag("q8_0", shape, quants, d=d)
    if weight.fmt == "q6_k":
        lv = q6_k_levels(flat).reshape(-1, 16, 2, 2, 4)  # [block, sub-block s, j >> 1, j & 1, m]: weight 16 s + 4 j + m
        m8 = 8 * torch.arange(4, device=lv.device)
        lo = ((lv & 15) << (m8 + 4 * torch.arange(2, device=lv.device)[:, None])).sum(dim=(3, 4))  # (n, 16, 2)
        top = (torch.arange(4, device=lv.device) + 2) % 4  # j -> 2-bit slot of its byte
        hi = ((lv >> 4).reshape(-1, 16, 4, 4) << (m8 + 2 * top[:, None])).sum(dim=(2, 3))  # (n, 16)
        return GpuZigzag("q6_k", shape, _to_int32(lo).reshape(rows, cols, 32),
                         d=flat[:, 208:210].contiguous().view(torch.float16).reshape(rows, cols),
                         high=_to_int32(hi).reshape(rows, cols, 16),
                         scales=flat[:, 192:208].contiguous().view(torch.int8).reshape(rows, cols, 16))
    if weight.fmt == "q3_k":
        lv = q3_k_levels(flat).reshape(-1, 16, 16)  # [block, sub-block s, weight e]
        e2 = 2 * torch.arange(16, device=lv.device)
        low = ((lv & 3) << e2).sum(dim=2)  # (n, 16): word of sub-block s
        high = ((lv >> 2) << _q3_k_bit(lv.device)).sum(dim=2).reshape(-1, 2, 2, 4).sum(dim=2)  # [k, p]
        return GpuZigzag("q3_k", shape, _to_int32(low.reshape(-1, 4, 4).transpose(1, 2)).reshape(rows, cols, 16),
                         d=flat[:, 108:110].contiguous().view(torch.float16).reshape(rows, cols),
                         high=_to_int32(high.transpose(1, 2)).reshape(rows, cols, 8),
                         scales=flat[:, 96:108].contiguous().view(torch.int32).reshape(rows, cols, 3))
    if weight.fmt == "q2_k":  # word s: weight 16 s + n at bits 2 n
        lv = q2_k_levels(flat).reshape(-1, 16, 16)
        words = (lv << (2 * torch.arange(16, device=lv.device))).sum(dim=2)
        return GpuZigzag("q2_k", shape, _to_int32(words).reshape(rows, cols, 16),
                         d=flat[:, 80:84].contiguous().view(torch.int32).reshape(rows, cols),
                         scales=flat[:, 0:16].reshape(rows, cols, 16).contiguous())
    # q5_k: sub-block s = weights 32 s .. 32 s + 31, weight 4 j + m of it (j < 8, m < 4)
    lv = q5_k_levels(flat).reshape(-1, 8, 4, 2, 4)  # [block, s, j >> 1, j & 1, m]
    m8 = 8 * torch.arange(4, device=lv.device)
    lo = ((lv & 15) << (m8 + 4 * torch.arange(2, device=lv.device)[:, None])).sum(dim=(3, 4))  # (n, 8, 4)
    fifth = (torch.arange(8, device=lv.device) + 4) % 8  # j -> its bit in each byte of the fifth-bit word
    hi = ((lv >> 4).reshape(-1, 8, 8, 4) << (m8 + fifth[:, None])).sum(dim=(2, 3))  # (n, 8)
    return GpuZigzag("q5_k", shape, _to_int32(lo).reshape(rows, cols, 32), high=_to_int32(hi).reshape(rows, cols, 8),
                     head=flat[:, 0:16].contiguous().view(torch.int32).reshape(rows, cols, 4))


def dequantize_kernel_layout(w: GpuZigzag) -> torch.Tensor:
    """Torch twin of the kernels' decode: kernel layout -> float32 (N, K), from the kernel arrays
    alone (not the GGUF blocks), each weight as its format defines it."""
    if w.fmt == "q8_0":
        rows = -(-w.shape[0] // 32)
        values = w.d[:rows].float()[..., None] * w.quants[:rows].float()  # (R, K, 32)
        return blocks_to_matrix(values.reshape(-1, 32), "zigzag", w.shape, 32)
    if w.fmt == "q6_k":
        rows, cols = w.quants.shape[:2]
        j = torch.arange(4, device=w.device)[:, None]  # [j, m]: weight 4 j + m of a sub-block
        m8 = 8 * torch.arange(4, device=w.device)[None, :]
        words = w.quants.to(torch.int64).reshape(rows, cols, 16, 2).repeat_interleave(2, dim=3)[..., None]
        low = (words >> (m8 + 4 * (j % 2))) & 15  # word 2 s + j // 2
        top = (w.high.to(torch.int64).reshape(rows, cols, 16, 1, 1) >> (m8 + 2 * ((j + 2) % 4))) & 3
        q = low | (top << 4)  # [r, k, s, j, m]
        v = w.d.float().reshape(rows, cols, 1, 1, 1) * w.scales.float().reshape(rows, cols, 16, 1, 1) * (q - 32).float()
        return blocks_to_matrix(v.reshape(-1, 256), "zigzag", w.shape, 256)
    if w.fmt == "q2_k":
        rows, cols = w.quants.shape[:2]
        q = (w.quants.to(torch.int64).reshape(rows, cols, 16, 1) >> (2 * torch.arange(16, device=w.device))) & 3
        dd = w.d.reshape(-1, 1).contiguous().view(torch.float16).float()  # (n, 2): d, dmin
        sc = w.scales.to(torch.int64).reshape(rows, cols, 16, 1)
        d = dd[:, 0].reshape(rows, cols, 1, 1)
        dmin = dd[:, 1].reshape(rows, cols, 1, 1)
        v = (d * (sc & 0xF).float()) * q.float() - dmin * (sc >> 4).float()  # [r, k, s, n]: weight 16 s + n
        return blocks_to_matrix(v.reshape(-1, 256), "zigzag", w.shape, 256)
    if w.fmt == "q3_k":
        from spqt.formats import q3_k

        rows, cols = w.quants.shape[:2]
        sb = torch.arange(16, device=w.device)
        low = w.quants.to(torch.int64)[..., 4 * (sb % 4) + sb // 4]  # (rows, cols, 16 s)
        high = w.high.to(torch.int64)[..., 2 * (sb % 4) + sb // 8]
        e2 = 2 * torch.arange(16, device=w.device)
        q = ((low[..., None] >> e2) & 3) | (((high[..., None] >> _q3_k_bit(w.device)) & 1) << 2)  # [r, k, s, e]
        s = (q3_k.unpack_scales(w.scales.reshape(-1, 3).contiguous().view(torch.uint8)) - 32).float()
        v = (w.d.float().reshape(rows, cols, 1, 1) * s.reshape(rows, cols, 16, 1)) * (q - 4).float()
        return blocks_to_matrix(v.reshape(-1, 256), "zigzag", w.shape, 256)
    from spqt.formats import q4_k

    rows, cols = w.quants.shape[:2]
    j = torch.arange(8, device=w.device)[:, None]  # [j, m]: weight 4 j + m of a sub-block
    m8 = 8 * torch.arange(4, device=w.device)[None, :]
    words = w.quants.to(torch.int64).reshape(rows, cols, 8, 4).repeat_interleave(2, dim=3)[..., None]
    low = (words >> (m8 + 4 * (j % 2))) & 15  # word 4 s + j // 2
    fifth = (w.high.to(torch.int64).reshape(rows, cols, 8, 1, 1) >> (m8 + (j + 4) % 8)) & 1
    q = low | (fifth << 4)  # [r, k, s, j, m]
    head = w.head.reshape(-1, 4).contiguous().view(torch.uint8)  # (n, 16)
    d = head[:, 0:2].contiguous().view(torch.float16).float().reshape(rows, cols, 1, 1, 1)
    dmin = head[:, 2:4].contiguous().view(torch.float16).float().reshape(rows, cols, 1, 1, 1)
    sc, mn = q4_k.unpack_scales(head[:, 4:16])
    v = d * sc.float().reshape(rows, cols, 8, 1, 1) * q.float() - dmin * mn.float().reshape(rows, cols, 8, 1, 1)
    return blocks_to_matrix(v.reshape(-1, 256), "zigzag", w.shape, 256)
