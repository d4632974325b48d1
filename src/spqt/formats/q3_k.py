"""Q3_K blocks, byte-compatible with llama.cpp / GGUF. 256 weights in 110 bytes (3.4375 bits)::

    bytes   0..31   hmask   3rd bits, inverted: byte l, bit j set means weight 32j + l is >= 0
    bytes  32..95   qs      low 2 bits: 2 halves of 32 bytes; byte l of half h holds weight
                            128h + 32j + l at bits 2j
    bytes  96..107  16 scales of 6 bits, stored as s + 32:
                      byte j (j < 8): low nibble scale j, high nibble scale j + 8 (low 4 bits)
                      byte 8 + m: bits 2k..2k+1 hold the top 2 bits of scale 4k + m
    bytes 108..109  d       fp16

Weight i is ``d * s_{i // 16} * (q_i - 4)``, q_i the 3-bit value in 0..7.

The encoder is llama.cpp's ``quantize_row_q3_K_ref``: per sub-block of 16 ``make_q3_quants``
(nmax 4, weights x^2, level-by-level refinement), 6-bit signed scales under d = -max_scale / 32,
every weight requantized against the stored values.
"""

import torch

from spqt.formats import per_weight_grid, replaced_codes
from spqt.formats.search import f32, first_abs_max, make_q3_quants_rmse, nearest_int

BLOCK_SIZE = 256
BLOCK_BYTES = 110
SUB_BLOCKS = 16


def pack_scales(s: torch.Tensor) -> torch.Tensor:
    """(n, 16) int in 0..63 -> (n, 12) uint8, the packing drawn above."""
    s = s.to(torch.int64)
    low = (s[:, :8] & 0xF) | ((s[:, 8:] & 0xF) << 4)
    top = s >> 4  # (n, 16)
    high = top[:, 0:4] | (top[:, 4:8] << 2) | (top[:, 8:12] << 4) | (top[:, 12:16] << 6)
    return torch.cat([low, high], dim=1).to(torch.uint8)


def unpack_scales(packed: torch.Tensor) -> torch.Tensor:
    """(n, 12) uint8 -> (n, 16) int64 in 0..63 (the stored s + 32)."""
    p = packed.to(torch.int64)
    low = torch.cat([p[:, :8] & 0xF, p[:, :8] >> 4], dim=1)
    high = p[:, 8:12]
    top = torch.cat([(high >> (2 * k)) & 3 for k in range(4)], dim=1)
    return low | (top << 4)


def encode(x: torch.Tensor) -> torch.Tensor:
    """Quantize blocks. x: (n_blocks, 256) float32 (any device) -> (n_blocks, 110) uint8."""
    if x.dim() != 2 or x.shape[1] != BLOCK_SIZE:
        raise ValueError(f"q3_k.encode expects (n_blocks, {BLOCK_SIZE}), got {tuple(x.shape)}")
    x = x.to(torch.float32)
    n = x.shape[0]
    groups = x.reshape(n * SUB_BLOCKS, 16).t().contiguous()
    scales, levels = make_q3_quants_rmse(groups, 4)
    scales = scales.reshape(n, SUB_BLOCKS)
    levels = levels.t().reshape(n, SUB_BLOCKS, 16)
    # fabsf(NaN) > amax is false in C: a NaN scale never becomes the maximum.
    _, max_scale = first_abs_max(torch.nan_to_num(scales, nan=0.0).t())
    has = max_scale != 0
    iscale = f32(-32.0, x) / torch.where(has, max_scale, f32(1.0, x))
    l = nearest_int(iscale[:, None] * scales)
    l = ((l + 128) & 0xFF) - 128  # int8_t
    stored = torch.where(has[:, None], torch.clamp(l, -32, 31) + 32, torch.zeros_like(l))
    d16 = torch.where(has, f32(1.0, x) / iscale, f32(0.0, x)).to(torch.float16)
    d = d16.float()[:, None] * (stored - 32).float()  # (n, 16)
    safe_d = torch.where(d != 0, d, f32(1.0, x))
    requant = torch.clamp(nearest_int(x.reshape(n, SUB_BLOCKS, 16) / safe_d[..., None]), -4, 3) + 4
    q = torch.where((d != 0)[..., None], requant, levels)
    out = torch.empty((n, BLOCK_BYTES), dtype=torch.uint8, device=x.device)
    _put_codes(out, q)
    out[:, 96:108] = pack_scales(stored)
    out[:, 108:110] = d16.reshape(n, 1).view(torch.uint8)
    return out


def _put_codes(out: torch.Tensor, q: torch.Tensor) -> None:
    """Write 3-bit codes q (n, 256) or (n, 16, 16), int in 0..7 (q_i), into hmask and qs of blocks out (n, 110) in
    place."""
    n = out.shape[0]
    q = q.to(torch.int64).reshape(n, 8, 32)  # (n, bit j, byte l)
    bit = torch.tensor([1 << j for j in range(8)], device=out.device, dtype=torch.int64)
    out[:, 0:32] = ((q > 3).to(torch.int64) * bit[None, :, None]).sum(dim=1).to(torch.uint8)
    low = (q & 3).reshape(n, 2, 4, 32)
    qs = low[:, :, 0] | (low[:, :, 1] << 2) | (low[:, :, 2] << 4) | (low[:, :, 3] << 6)
    out[:, 32:96] = qs.reshape(n, 64).to(torch.uint8)


def _parts(blocks: torch.Tensor):
    """blocks (n, 110) uint8 -> per sub-block scale d * s (n, 16) float32, codes (n, 16, 16) int64 in 0..7."""
    n = blocks.shape[0]
    shifts = torch.arange(4, device=blocks.device).reshape(1, 1, 4, 1)
    hm = blocks[:, 0:32].to(torch.int64).reshape(n, 1, 32)
    high = (hm >> torch.arange(8, device=blocks.device).reshape(1, 8, 1)) & 1  # (n, 8, 32)
    qs = blocks[:, 32:96].to(torch.int64).reshape(n, 2, 1, 32)
    low = ((qs >> (2 * shifts)) & 3).reshape(n, 8, 32)
    s = (unpack_scales(blocks[:, 96:108]) - 32).float()
    d = blocks[:, 108:110].contiguous().view(torch.float16).float()
    return d * s, (low | (high << 2)).reshape(n, SUB_BLOCKS, 16)


def decode(blocks: torch.Tensor) -> torch.Tensor:
    """Dequantize. blocks: (n_blocks, 110) uint8 -> (n_blocks, 256) float32, same device."""
    if blocks.dim() != 2 or blocks.shape[1] != BLOCK_BYTES or blocks.dtype != torch.uint8:
        raise ValueError(f"q3_k.decode expects uint8 (n_blocks, {BLOCK_BYTES}), got {blocks.dtype} {tuple(blocks.shape)}")
    scale, q = _parts(blocks)
    return (scale[..., None] * (q - 4).float()).reshape(blocks.shape[0], BLOCK_SIZE)


CODE_MAX = 7


def grid(blocks: torch.Tensor):
    """blocks (n, 110) uint8 -> scale, offset (n, 256) float32 and codes (n, 256) int64 in 0..CODE_MAX, a weight
    decoding to scale * code - offset (offset = 4 * scale; formats/__init__.py: grids)."""
    scale, q = _parts(blocks)
    return per_weight_grid(scale, 4 * scale, q)


def with_codes(blocks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """A copy of blocks (n, 110) with every weight's code replaced by codes (n, 256), int in 0..CODE_MAX."""
    return replaced_codes(blocks, codes, _put_codes)
