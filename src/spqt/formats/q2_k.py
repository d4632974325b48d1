"""Q2_K blocks, byte-compatible with llama.cpp / GGUF. 256 weights in 84 bytes (2.625 bits)::

    bytes   0..15   scales  per sub-block of 16: low nibble the scale, high nibble the min
    bytes  16..79   qs      2-bit quants: 2 halves of 32 bytes; byte l of half h holds weight
                            128h + 32j + l at bits 2j
    bytes  80..81   d       fp16   scale of the 4-bit scales
    bytes  82..83   dmin    fp16   scale of the 4-bit mins

Weight i of sub-block j is ``d * sc_j * q_i - dmin * m_j``, q_i in 0..3.

The encoder is llama.cpp's ``quantize_row_q2_K_ref``: per sub-block ``make_qkx2_quants`` (nmax 3,
importance |x|, absolute error, candidates (3 - 0.5 + 0.1 i) / range, i = 0..15), 4-bit scales
and mins, every weight requantized against the stored values.
"""

import torch

from spqt.formats import per_weight_grid, replaced_codes
from spqt.formats.search import f32, make_qkx2_quants, nearest_int

BLOCK_SIZE = 256
BLOCK_BYTES = 84
SUB_BLOCKS = 16


def encode(x: torch.Tensor) -> torch.Tensor:
    """Quantize blocks. x: (n_blocks, 256) float32 (any device) -> (n_blocks, 84) uint8."""
    if x.dim() != 2 or x.shape[1] != BLOCK_SIZE:
        raise ValueError(f"q2_k.encode expects (n_blocks, {BLOCK_SIZE}), got {tuple(x.shape)}")
    x = x.to(torch.float32)
    n = x.shape[0]
    groups = x.reshape(n * SUB_BLOCKS, 16).t().contiguous()
    scales, mins, levels = make_qkx2_quants(groups, groups.abs(), 3, -0.5, 0.1, 15, use_mad=True)
    scales = scales.reshape(n, SUB_BLOCKS)
    mins = mins.reshape(n, SUB_BLOCKS)
    levels = levels.t().reshape(n, SUB_BLOCKS, 16).to(torch.int64)
    zero = f32(0.0, x)
    c15 = f32(15.0, x)
    max_scale = torch.maximum(scales.max(dim=1).values, zero)
    max_min = torch.maximum(mins.max(dim=1).values, zero)
    has_s, has_m = max_scale > 0, max_min > 0
    ls = nearest_int((c15 / torch.where(has_s, max_scale, c15))[:, None] * scales)
    lm = nearest_int((c15 / torch.where(has_m, max_min, c15))[:, None] * mins)
    ls = torch.where(has_s[:, None], ls & 0xFF, torch.zeros_like(ls))
    packed = torch.where(has_m[:, None], (ls | (lm << 4)) & 0xFF, ls)
    d16 = torch.where(has_s, max_scale / c15, zero).to(torch.float16)
    dmin16 = torch.where(has_m, max_min / c15, zero).to(torch.float16)
    d = d16.float()[:, None] * (packed & 0xF).float()  # (n, 16)
    dm = dmin16.float()[:, None] * (packed >> 4).float()
    safe_d = torch.where(d != 0, d, f32(1.0, x))
    requant = torch.clamp(nearest_int((x.reshape(n, SUB_BLOCKS, 16) + dm[..., None]) / safe_d[..., None]), 0, 3)
    q = torch.where((d != 0)[..., None], requant, levels)
    out = torch.empty((n, BLOCK_BYTES), dtype=torch.uint8, device=x.device)
    out[:, 0:16] = packed.to(torch.uint8)
    _put_codes(out, q)
    out[:, 80:82] = d16.reshape(n, 1).view(torch.uint8)
    out[:, 82:84] = dmin16.reshape(n, 1).view(torch.uint8)
    return out


def _put_codes(out: torch.Tensor, q: torch.Tensor) -> None:
    """Write 2-bit codes q (n, 256) or (n, 16, 16), int in 0..3, into qs of blocks out (n, 84) in place."""
    n = out.shape[0]
    q = q.to(torch.int64).reshape(n, 2, 4, 32)
    qs = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    out[:, 16:80] = qs.reshape(n, 64).to(torch.uint8)


def _parts(blocks: torch.Tensor):
    """blocks (n, 84) uint8 -> per sub-block scale and offset (n, 16) float32, codes (n, 16, 16) int64 in 0..3."""
    n = blocks.shape[0]
    sc = blocks[:, 0:16].to(torch.int64)
    qs = blocks[:, 16:80].to(torch.int64).reshape(n, 2, 1, 32)
    shifts = torch.arange(4, device=blocks.device).reshape(1, 1, 4, 1)
    q = ((qs >> (2 * shifts)) & 3).reshape(n, SUB_BLOCKS, 16)
    d = blocks[:, 80:82].contiguous().view(torch.float16).float()
    dmin = blocks[:, 82:84].contiguous().view(torch.float16).float()
    return d * (sc & 0xF).float(), dmin * (sc >> 4).float(), q


def decode(blocks: torch.Tensor) -> torch.Tensor:
    """Dequantize. blocks: (n_blocks, 84) uint8 -> (n_blocks, 256) float32, same device."""
    if blocks.dim() != 2 or blocks.shape[1] != BLOCK_BYTES or blocks.dtype != torch.uint8:
        raise ValueError(f"q2_k.decode expects uint8 (n_blocks, {BLOCK_BYTES}), got {blocks.dtype} {tuple(blocks.shape)}")
    scale, offset, q = _parts(blocks)
    return (scale[..., None] * q.float() - offset[..., None]).reshape(blocks.shape[0], BLOCK_SIZE)


CODE_MAX = 3


def grid(blocks: torch.Tensor):
    """blocks (n, 84) uint8 -> scale, offset (n, 256) float32 and codes (n, 256) int64 in 0..CODE_MAX, a weight
    decoding to scale * code - offset (formats/__init__.py: grids)."""
    return per_weight_grid(*_parts(blocks))


def with_codes(blocks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """A copy of blocks (n, 84) with every weight's code replaced by codes (n, 256), int in 0..CODE_MAX."""
    return replaced_codes(blocks, codes, _put_codes)
