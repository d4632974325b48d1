"""Q5_K blocks, byte-compatible with llama.cpp / GGUF. 256 weights in 176 bytes (5.5 bits)::

    bytes   0..1    d       fp16   scale of the 6-bit sub-block scales
    bytes   2..3    dmin    fp16   scale of the 6-bit sub-block mins
    bytes   4..15   8 x (scale, min), 6 bits each, packed exactly as in Q4_K (see q4_k.py)
    bytes  16..47   qh      5th bits: byte l, bit j holds weight 32j + l
    bytes  48..175  qs      low 4 bits, as Q4_K's quants: 4 groups of 32 bytes; byte l of group
                            g holds weight 64g + l (low nibble) and 64g + 32 + l (high nibble)

Weight i of sub-block j (32 weights each) is ``d * sc_j * q_i - dmin * m_j``, q_i in 0..31.

The encoder is llama.cpp's ``quantize_row_q5_K_ref``: Q4_K's algorithm with nmax 31 and the
make_qkx2_quants candidates (31 - 0.5 + 0.1 i) / range, i = 0..15. ``search="mse"`` runs the
optional search of mse_search.py on top of it instead (lower plain squared error, other bytes).
"""

import torch

from spqt.formats import check_search, per_weight_grid, q4_k, replaced_codes
from spqt.formats.mse_search import search_levels

BLOCK_SIZE = 256
BLOCK_BYTES = 176
SUB_BLOCKS = 8
SUB_BLOCK_SIZE = 32


def encode(x: torch.Tensor, search: str = "reference") -> torch.Tensor:
    """Quantize blocks. x: (n_blocks, 256) float32 (any device) -> (n_blocks, 176) uint8.

    search: "reference" (llama.cpp's bytes) or "mse" (formats/mse_search.py)."""
    check_search(search, "q5_k")
    if x.dim() != 2 or x.shape[1] != BLOCK_SIZE:
        raise ValueError(f"q5_k.encode expects (n_blocks, {BLOCK_SIZE}), got {tuple(x.shape)}")
    levels = q4_k.encode_levels(x, 31, -0.5, 0.1, 15)
    if search == "mse":
        levels = search_levels(x, 31, levels)
    d16, dmin16, ls, lm, q = levels
    n = x.shape[0]
    out = torch.empty((n, BLOCK_BYTES), dtype=torch.uint8, device=x.device)
    out[:, 0:2] = d16.reshape(n, 1).view(torch.uint8)
    out[:, 2:4] = dmin16.reshape(n, 1).view(torch.uint8)
    out[:, 4:16] = q4_k.pack_scales(ls, lm)
    _put_codes(out, q)
    return out


def _put_codes(out: torch.Tensor, q: torch.Tensor) -> None:
    """Write 5-bit codes q (n, 256) or (n, 8, 32), int in 0..31, into qh and qs of blocks out (n, 176) in place."""
    n = out.shape[0]
    q = q.to(torch.int64).reshape(n, SUB_BLOCKS, SUB_BLOCK_SIZE)
    high = q >> 4
    weights = torch.tensor([1 << j for j in range(SUB_BLOCKS)], device=out.device, dtype=torch.int64)
    out[:, 16:48] = (high * weights[None, :, None]).sum(dim=1).to(torch.uint8)
    low = (q & 0xF).reshape(n, 4, 2, SUB_BLOCK_SIZE)
    out[:, 48:] = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128).to(torch.uint8)


def _parts(blocks: torch.Tensor):
    """blocks (n, 176) uint8 -> per sub-block scale and offset (n, 8) float32, codes (n, 8, 32) int64."""
    n = blocks.shape[0]
    d = blocks[:, 0:2].contiguous().view(torch.float16).float()
    dmin = blocks[:, 2:4].contiguous().view(torch.float16).float()
    sc, mn = q4_k.unpack_scales(blocks[:, 4:16])
    qh = blocks[:, 16:48].to(torch.int64).reshape(n, 1, SUB_BLOCK_SIZE)
    bits = (qh >> torch.arange(SUB_BLOCKS, device=blocks.device).reshape(1, SUB_BLOCKS, 1)) & 1
    qs = blocks[:, 48:].to(torch.int64).reshape(n, 4, 1, SUB_BLOCK_SIZE)
    low = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(n, SUB_BLOCKS, SUB_BLOCK_SIZE)
    return d * sc.float(), dmin * mn.float(), low | (bits << 4)


def decode(blocks: torch.Tensor) -> torch.Tensor:
    """Dequantize. blocks: (n_blocks, 176) uint8 -> (n_blocks, 256) float32, same device."""
    if blocks.dim() != 2 or blocks.shape[1] != BLOCK_BYTES or blocks.dtype != torch.uint8:
        raise ValueError(f"q5_k.decode expects uint8 (n_blocks, {BLOCK_BYTES}), got {blocks.dtype} {tuple(blocks.shape)}")
    scale, offset, q = _parts(blocks)
    return (scale[..., None] * q.float() - offset[..., None]).reshape(blocks.shape[0], BLOCK_SIZE)


CODE_MAX = 31


def grid(blocks: torch.Tensor):
    """blocks (n, 176) uint8 -> scale, offset (n, 256) float32 and codes (n, 256) int64 in 0..CODE_MAX, a weight
    decoding to scale * code - offset (formats/__init__.py: grids)."""
    return per_weight_grid(*_parts(blocks))


def with_codes(blocks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """A copy of blocks (n, 176) with every weight's code replaced by codes (n, 256), int in 0..CODE_MAX."""
    return replaced_codes(blocks, codes, _put_codes)
