"""Q6_K blocks, byte-compatible with llama.cpp / GGUF. 256 weights in 210 bytes (6.5625 bits)::

    bytes    0..127  ql      low 4 bits: 2 halves of 64 bytes; in half h, byte l holds weight
                             128h + l (low nibble) and 128h + 64 + l (high nibble), byte 32 + l
                             weights 128h + 32 + l and 128h + 96 + l
    bytes  128..191  qh      high 2 bits: byte 32h + l holds weights 128h + 32j + l at bits 2j
    bytes  192..207  scales  int8, one per sub-block of 16 weights
    bytes  208..209  d       fp16

Weight i is ``d * scales[i // 16] * (q_i - 32)``, q_i the 6-bit value.

The encoder is llama.cpp's ``quantize_row_q6_K_ref``: per sub-block ``make_qx_quants`` (nmax 32,
weights x^2, 19 candidate scales), int8 scales under d = -max_scale / 128 (the signed scale of
largest magnitude), every weight requantized against the stored values.
"""

import torch

from spqt.formats import per_weight_grid, replaced_codes
from spqt.formats.search import GROUP_MAX_EPS, f32, first_abs_max, make_qx_quants_rmse1, nearest_int

BLOCK_SIZE = 256
BLOCK_BYTES = 210
SUB_BLOCKS = 16


def encode(x: torch.Tensor) -> torch.Tensor:
    """Quantize blocks. x: (n_blocks, 256) float32 (any device) -> (n_blocks, 210) uint8."""
    if x.dim() != 2 or x.shape[1] != BLOCK_SIZE:
        raise ValueError(f"q6_k.encode expects (n_blocks, {BLOCK_SIZE}), got {tuple(x.shape)}")
    x = x.to(torch.float32)
    n = x.shape[0]
    groups = x.reshape(n * SUB_BLOCKS, 16).t().contiguous()
    scales, levels = make_qx_quants_rmse1(groups, 32)
    scales = scales.reshape(n, SUB_BLOCKS)
    levels = levels.t().reshape(n, SUB_BLOCKS, 16)
    amax, max_scale = first_abs_max(scales.t())
    empty = amax < GROUP_MAX_EPS
    max_scale = torch.where(empty, f32(1.0, x), max_scale)
    iscale = f32(-128.0, x) / max_scale
    d16 = (f32(1.0, x) / iscale).to(torch.float16)
    sc = torch.clamp(nearest_int(iscale[:, None] * scales), max=127)
    sc = ((sc + 128) & 0xFF) - 128  # stored as int8
    d = d16.float()[:, None] * sc.float()  # (n, 16)
    safe_d = torch.where(d != 0, d, f32(1.0, x))
    requant = torch.clamp(nearest_int(x.reshape(n, SUB_BLOCKS, 16) / safe_d[..., None]), -32, 31) + 32
    q = torch.where((d != 0)[..., None], requant, levels)
    out = torch.empty((n, BLOCK_BYTES), dtype=torch.uint8, device=x.device)
    _put_codes(out, q)
    out[:, 192:208] = (sc & 0xFF).to(torch.uint8)
    out[:, 208:210] = d16.reshape(n, 1).view(torch.uint8)
    out[empty] = 0  # an all-zero block is all zero bytes
    return out


def _put_codes(out: torch.Tensor, q: torch.Tensor) -> None:
    """Write 6-bit codes q (n, 256) or (n, 16, 16), int in 0..63 (the stored q_i), into ql and qh of blocks out
    (n, 210) in place."""
    n = out.shape[0]
    q = q.to(torch.int64).reshape(n, 2, 4, 32)
    low = q & 0xF
    ql = torch.stack([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=2)
    hi = q >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    out[:, 0:128] = ql.reshape(n, 128).to(torch.uint8)
    out[:, 128:192] = qh.reshape(n, 64).to(torch.uint8)


def _parts(blocks: torch.Tensor):
    """blocks (n, 210) uint8 -> per sub-block scale d * scales (n, 16) float32, codes (n, 16, 16) int64 in 0..63."""
    n = blocks.shape[0]
    ql = blocks[:, 0:128].to(torch.int64).reshape(n, 2, 2, 32)  # (half, byte group, l)
    qh = blocks[:, 128:192].to(torch.int64).reshape(n, 2, 1, 32)
    low = torch.cat([ql & 0xF, ql >> 4], dim=2)  # quarters 0, 1 (low nibbles), 2, 3 (high)
    high = (qh >> (2 * torch.arange(4, device=blocks.device)).reshape(1, 1, 4, 1)) & 3
    q = (low | (high << 4)).reshape(n, SUB_BLOCKS, 16)
    sc = blocks[:, 192:208].contiguous().view(torch.int8).float()  # (n, 16)
    d = blocks[:, 208:210].contiguous().view(torch.float16).float()  # (n, 1)
    return d * sc, q


def decode(blocks: torch.Tensor) -> torch.Tensor:
    """Dequantize. blocks: (n_blocks, 210) uint8 -> (n_blocks, 256) float32, same device."""
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != BLOCK_BYTES:
        raise ValueError(f"q6_k.decode expects uint8 (n_blocks, {BLOCK_BYTES}), got {blocks.dtype} {tuple(blocks.shape)}")
    scale, q = _parts(blocks)
    return (scale[..., None] * (q - 32).float()).reshape(blocks.shape[0], BLOCK_SIZE)


CODE_MAX = 63


def grid(blocks: torch.Tensor):
    """blocks (n, 210) uint8 -> scale, offset (n, 256) float32 and codes (n, 256) int64 in 0..CODE_MAX, a weight
    decoding to scale * code - offset (offset = 32 * scale; formats/__init__.py: grids)."""
    scale, q = _parts(blocks)
    return per_weight_grid(scale, 32 * scale, q)


def with_codes(blocks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """A copy of blocks (n, 210) with every weight's code replaced by codes (n, 256), int in 0..CODE_MAX."""
    return replaced_codes(blocks, codes, _put_codes)
