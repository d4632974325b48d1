"""Zigzag Q4_K decoded a tile at a time in registers, and the whole matrix dequantized that way.

A tile is WN of a block's 32 level words (gpu_layout.py: zigzag quants (R, PLANES, K, 16) int32, the 128 level bytes of
column c's block of superblock row r) for BK columns: 8 WN rows of the matrix. Word w's nibble s (bits 4 s .. 4 s + 3)
is tile row t = 8 w + s, which is block byte b = 4 w + s // 2, lane group g = b // 16, index m = b % 16, and row
e = 16 m + 8 (s % 2) + g of the superblock row (gpu_layout.py's zigzag order): the rows are permuted, the words loaded
as they lie (one (BK, WN) int32 load, WN words of each column contiguous) and the permutation undone where the tile is
stored. Row t's sub-block (its scale and min) is e // 32 = m // 2 = 2 (w % 4) + s // 4, so the (BK, WN, 8) levels
reshape to (BK, WN / 4, 4, 2, 4) and meet the (BK, 4, 2) scales by broadcasting. The arithmetic is formats/q4_k's
decode in float32 (the same weights).

Users: gemm_q4k (the prefill's product for short prompts), type_tiles (Q5_K's and Q6_K's nibble planes) and
dequantize (the prefill's other path: the whole matrix in fp16 / bf16 / fp32 for cuBLAS, gemv.dequantize's zigzag
Q4_K path)."""

import torch
import triton
import triton.language as tl

from spqt.kernels import gpu_layout, zigzag_mma
from spqt.kernels.gpu_layout import GpuQ4K
from spqt.kernels.q4k_bits import load_head, small_to_float, unpack_scales

WORDS = 32  # level words (int32) of a block: 256 4-bit levels
BLOCK_WORDS = tl.constexpr(WORDS)  # the same, for the kernel
PLANES = tl.constexpr(gpu_layout.PLANES)  # planes a block's words are split into
PLANE_WORDS = tl.constexpr(WORDS // gpu_layout.PLANES)  # words of a block in one plane


@triton.jit
def load_nibbles(q_ptr, r, word, cols, live, shifts, K, WN: tl.constexpr, BK: tl.constexpr):
    """The low nibbles of words `word` (WN,) of superblock row r's blocks in columns `cols` (BK,; `live` masks them):
    (BK, WN / 4, 4, 2, 4) int32 0..15, one (BK, WN) load of WN contiguous words a column. shifts: the (1, 1, 1, 2, 4)
    nibble shifts 4 s (module docstring's view; Q5_K's and Q6_K's low nibbles too)."""
    words = tl.load(q_ptr + ((r * PLANES + word[None, :] // PLANE_WORDS) * K + cols[:, None]) * PLANE_WORDS
                    + word[None, :] % PLANE_WORDS, mask=live[:, None], other=0)  # (BK, WN)
    return (tl.reshape(words, (BK, WN // 4, 4, 1, 1)) >> shifts) & 15  # (BK, WN / 4, 4, 2, 4)


@triton.jit
def scale_levels(levels, h_ptr, r, cols, live, K, WN: tl.constexpr, BK: tl.constexpr):
    """Levels (BK, WN / 4, 4, 2, 4) int32 (Q4_K 0..15, Q5_K 0..31) of superblock row r's blocks in columns `cols`
    against their grouped Q4_K heads: (BK, 8 WN) float32, d sc q - dmin mn (formats/q4_k.decode's order; exact, so
    an FFMA rounds as the decode's product and difference)."""
    d, dmin, h1, h2, h3 = load_head(h_ptr, zigzag_mma.head_index(r, cols, K), live)
    sc, mn = unpack_scales(h1[:, None], h2[:, None], h3[:, None], tl.arange(0, 8)[None, :])  # (BK, 8) each
    scale = tl.reshape(d[:, None] * sc, (BK, 1, 4, 2, 1))
    minimum = tl.reshape(dmin[:, None] * mn, (BK, 1, 4, 2, 1))
    return tl.reshape(scale * small_to_float(levels) - minimum, (BK, 8 * WN))


@triton.jit
def decode_tile(q_ptr, h_ptr, r, word, cols, live, shifts, K, WN: tl.constexpr, BK: tl.constexpr):
    """Words `word` (WN,) of superblock row r's blocks in columns `cols` (BK,; `live` masks them), decoded: (BK, 8 WN)
    float32, tile row t = 8 (word t // 8) + nibble t % 8 (tile_setup gives their matrix rows). shifts: the
    (1, 1, 1, 2, 4) nibble shifts 4 s of the (WN / 4, 4, 2, 4) view (module docstring)."""
    levels = load_nibbles(q_ptr, r, word, cols, live, shifts, K, WN, BK)
    return scale_levels(levels, h_ptr, r, cols, live, K, WN, BK)


@triton.jit
def tile_setup(WN: tl.constexpr):
    """Program axis 0 -> (superblock row r, its words (WN,), the nibble shifts (1, 1, 1, 2, 4) of decode_tile, the
    matrix rows (8 WN,) of the tile's rows)."""
    GROUPS: tl.constexpr = BLOCK_WORDS // WN
    tile = tl.program_id(0)
    r = tile // GROUPS
    w0 = (tile % GROUPS) * WN
    word = w0 + tl.arange(0, WN)  # the block's words 0..31: plane word // 16, word % 16 in it
    nibble = (tl.arange(0, 2)[:, None] * 4 + tl.arange(0, 4)[None, :])  # (2, 4): s = 4 (s // 4) + s % 4
    shifts = (4 * nibble)[None, None, None, :, :]
    t = tl.arange(0, 8 * WN)
    b = 4 * (w0 + t // 8) + (t % 8) // 2  # the block byte of tile row t
    return r, word, shifts, r * 256 + 16 * (b % 16) + 8 * (t % 2) + b // 16


# The dequantization's tile: 4 words (32 rows) x 128 columns a program, 4 warps: 32 registers, every warp slot of an SM
# filled, 3.0-3.6 TB/s read plus written on a 7B's maps on the H200, where a program of 16 whole blocks (the block
# kernel, 64 registers) or of 16 words (90 registers) reached 1.7-2.2 (scripts/dequant_probe.py, 2b11204)
DEQUANT_WN = 4
DEQUANT_BK = 128


@triton.jit
def _dequant_kernel(q_ptr, h_ptr, out_ptr, N, K, WN: tl.constexpr, BK: tl.constexpr):
    """out (N, K) row-major in out's dtype: program (tile, column block) decodes words w0 .. w0 + WN - 1 of superblock
    row r in columns BK c .. BK c + BK - 1 and stores them, each row's BK columns contiguous."""
    r, word, shifts, row = tile_setup(WN)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    live = cols < K
    w = decode_tile(q_ptr, h_ptr, r, word, cols, live, shifts, K, WN, BK)
    store_tile(out_ptr, w, row, cols, live, N, K)


@triton.jit
def store_tile(out_ptr, w, row, cols, live, N, K):
    """w (BK, T) float32 -> out[row, cols] (out (N, K) row-major in its dtype; row (T,) the tile rows' matrix rows,
    rows past N and columns past `live` skipped): each row's BK columns contiguous."""
    tl.store(out_ptr + row[None, :] * K + cols[:, None], w.to(out_ptr.dtype.element_ty),
             mask=live[:, None] & (row[None, :] < N))


def dequant_out(w, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    """A dequantization's output for w (N, K): out, checked to be a contiguous (N, K) on w's device (its dtype
    wins), or a new one in `dtype`."""
    n, k = w.shape
    if out is None:
        return torch.empty((n, k), dtype=dtype, device=w.quants.device)
    if out.shape != (n, k) or not out.is_contiguous() or out.device != w.quants.device:
        raise ValueError(f"dequantize's out must be ({n}, {k}) contiguous on {w.quants.device}, got "
                         f"{tuple(out.shape)} strides {out.stride()} on {out.device}")
    return out


def dequantize(w: GpuQ4K, dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None,
               wn: int = DEQUANT_WN, bk: int = DEQUANT_BK) -> torch.Tensor:
    """The zigzag Q4_K matrix w whole: (N, K) row-major in `dtype` (out's, where given: contiguous (N, K)); wn
    words (4, 8, 16 or 32) x bk columns (a power of two) a program."""
    if w.layout != "zigzag" or w.fmt != "q4_k":
        raise ValueError(f"q4k_tiles.dequantize runs zigzag Q4_K, not {w.layout} {w.fmt}")
    if wn not in (4, 8, 16, 32):
        raise ValueError(f"a tile holds 4, 8, 16 or 32 words of a block, not {wn}")
    n, k = w.shape
    out = dequant_out(w, dtype, out)
    grid = (w.grid[0] * (WORDS // wn), triton.cdiv(k, bk))
    _dequant_kernel[grid](w.quants, w.head.view(torch.int64), out, n, k, WN=wn, BK=bk, num_warps=4)
    return out
