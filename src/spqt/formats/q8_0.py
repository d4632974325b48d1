"""Q8_0 blocks, byte-compatible with llama.cpp / GGUF. 32 weights in 34 bytes (8.5 bits per weight)::

    bytes  0..1   d    fp16   the block's scale, max|x| / 127
    bytes  2..33  qs   int8   weight i is d * qs[i]

The encoder is llama.cpp's ``quantize_row_q8_0_ref``: qs = roundf(x / d) computed as
x * (1 / d) in float32 with the unrounded d, halves rounded away from zero.
"""

import torch

from spqt.formats import replaced_codes
from spqt.formats.search import f32, round_away

BLOCK_SIZE = 32
BLOCK_BYTES = 34


def encode(x: torch.Tensor) -> torch.Tensor:
    """Quantize blocks. x: (n_blocks, 32) float32 (any device) -> (n_blocks, 34) uint8."""
    if x.dim() != 2 or x.shape[1] != BLOCK_SIZE:
        raise ValueError(f"q8_0.encode expects (n_blocks, {BLOCK_SIZE}), got {tuple(x.shape)}")
    x = x.to(torch.float32)
    d = x.abs().max(dim=1).values / f32(127.0, x)
    inv = torch.where(d != 0, f32(1.0, x) / torch.where(d != 0, d, f32(1.0, x)), f32(0.0, x))
    qs = round_away(x * inv[:, None]).to(torch.int8)
    out = torch.empty((x.shape[0], BLOCK_BYTES), dtype=torch.uint8, device=x.device)
    out[:, 0:2] = d.to(torch.float16).reshape(-1, 1).view(torch.uint8)
    out[:, 2:] = qs.view(torch.uint8)
    return out


def decode(blocks: torch.Tensor) -> torch.Tensor:
    """Dequantize. blocks: (n_blocks, 34) uint8 -> (n_blocks, 32) float32, same device."""
    if blocks.dim() != 2 or blocks.shape[1] != BLOCK_BYTES or blocks.dtype != torch.uint8:
        raise ValueError(f"q8_0.decode expects uint8 (n_blocks, {BLOCK_BYTES}), got {blocks.dtype} {tuple(blocks.shape)}")
    d = blocks[:, 0:2].contiguous().view(torch.float16).float()  # (n, 1)
    return d * blocks[:, 2:].contiguous().view(torch.int8).float()


CODE_MAX = 255


def grid(blocks: torch.Tensor):
    """blocks (n, 34) uint8 -> scale, offset (n, 32) float32 and codes (n, 32) int64 in 0..CODE_MAX (the int8 qs
    + 128), a weight decoding to scale * code - offset (offset = 128 * d; formats/__init__.py: grids)."""
    d = blocks[:, 0:2].contiguous().view(torch.float16).float().expand(-1, BLOCK_SIZE)
    return d, 128 * d, blocks[:, 2:].contiguous().view(torch.int8).to(torch.int64) + 128


def with_codes(blocks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """A copy of blocks (n, 34) with every weight's code replaced by codes (n, 32), int in 0..CODE_MAX."""
    return replaced_codes(blocks, codes, _put_codes)


def _put_codes(out: torch.Tensor, codes: torch.Tensor) -> None:
    """Write codes (n, 32), int in 0..255, as the int8 qs (code - 128) of blocks out (n, 34) in place."""
    out[:, 2:] = (codes.to(torch.int64) - 128).to(torch.int8).view(torch.uint8)
