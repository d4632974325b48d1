"""The other zigzag types (Q5_K, Q6_K, Q8_0, Q3_K, Q2_K) in the CUDA GEMV's layouts dequantized a tile at a time,
as q4k_tiles does Q4_K: the prefill's whole matrix in fp16 / bf16 / fp32 for cuBLAS (gemv.dequantize's path for them).

A tile is the 32 G rows of G lane groups g0 .. g0 + G - 1 of one superblock row r (rows 256 r + 16 m + 8 h + g: tile
m = 0..15, half h, lane group g; the CUDA GEMV's zigzag order) in BK consecutive columns. Every layout keeps a lane
group's levels of a column in a few contiguous words (gpu_layout_q5k.py ... gpu_layout_q2k.py), so a program loads
them as one vector a column, decodes (BK, 32 G) float32 with each column's scales broadcast over its rows, and
stores each row's BK columns contiguous (q4k_tiles.store_tile). The arithmetic is the format's decode in float32, in
its order (the same weights, bit for bit):

  Q5_K  Q4_K's nibble planes and heads (q4k_tiles.load_nibbles, scale_levels) and fifth-bit word g;
  Q6_K  the same nibble planes, top-pair words 2 g, 2 g + 1, the 16 int8 scales of the grouped unit, d:
        w = (d sc[m]) (q - 32);
  Q8_0  words 4 (g % 4) .. + 3 of planes g // 4 and 2 + g // 4 (a byte a level, u = q + 128), the column's 8 d:
        w = d (u - 128);
  Q3_K  low-pair words 2 (g % 4), + 1 of plane g // 4, third-bit word g, the 16-byte grouped head:
        w = (d (s[m] - 32)) (q - 4);
  Q2_K  low-pair words as Q3_K's, the 16 scale bytes of the grouped unit, d | dmin: w = (d sc[m]) q - dmin mn[m].

A tile's rows are kept in the order its words hold them (t = 2 m + h within a lane group, lane groups outer; Q8_0:
tile halves m // 8 outer); _group_rows gives their matrix rows (Q8_0's kernel its own)."""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from spqt.kernels import zigzag_cuda, zigzag_mma
from spqt.kernels.q4k_bits import half_to_float, load_words, small_minus, small_to_float
from spqt.kernels.q4k_tiles import dequant_out, load_nibbles, scale_levels, store_tile, tile_setup

GROUPS = 8  # lane groups of a superblock row (32 rows each)


@triton.jit
def _dequant_q5k_kernel(q_ptr, h_ptr, f_ptr, out_ptr, N, K, WN: tl.constexpr, BK: tl.constexpr):
    """Zigzag Q5_K (gpu_layout_q5k.GpuQ5KPlanes) -> out (N, K) row-major in out's dtype. Program (tile, column block):
    words w0 .. w0 + WN - 1 (lane groups w0 / 4 ..) of superblock row r in BK columns. Word 4 g + j's nibble s
    (weight 16 m + 8 h + g, m = 4 j + s // 2, h = s % 2) has its fifth bit in fifth word g (f_ptr (R, K, 8) int32)
    at bit 8 j + s // 2 + 4 h; then Q4_K's head: w = (d sc) q - dmin mn."""
    r, word, shifts, row = tile_setup(WN)
    G: tl.constexpr = WN // 4
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    live = cols < K
    levels = load_nibbles(q_ptr, r, word, cols, live, shifts, K, WN, BK)  # (BK, G, 4 j, 2, 4): s = 4 (s // 4) + s % 4
    g0 = (tl.program_id(0) % (32 // WN)) * G
    fifth = tl.load(f_ptr + (r * K + cols[:, None]) * 8 + g0 + tl.arange(0, G)[None, :], mask=live[:, None], other=0)
    s = shifts // 4  # (1, 1, 1, 2, 4): the nibble s
    j = tl.arange(0, 4)[None, None, :, None, None]
    bit = 8 * j + s // 2 + 4 * (s % 2)
    levels = levels | (((tl.reshape(fifth, (BK, G, 1, 1, 1)) >> bit) & 1) << 4)
    store_tile(out_ptr, scale_levels(levels, h_ptr, r, cols, live, K, WN, BK), row, cols, live, N, K)


@triton.jit
def _dequant_q6k_kernel(q_ptr, hb_ptr, s_ptr, d_ptr, out_ptr, N, K, WN: tl.constexpr, BK: tl.constexpr):
    """Zigzag Q6_K (gpu_layout_q6k.GpuQ6KPlanes) -> out (N, K) row-major in out's dtype. Program (tile, column block):
    words w0 .. w0 + WN - 1 as _dequant_q5k_kernel's, viewed (BK, G, 4 j, 4 c, 2 h), s = 2 c + h, m = 4 j + c. The top
    pair of word 4 g + j's nibble s: top-pair word 2 g + j // 2 (hb_ptr (R, K, 16) int32), bit 16 (j % 2) + 8 (c // 2) +
    2 (c % 2) + 4 h; scale m: byte m of the grouped 16-byte unit (s_ptr int8), d at d_ptr (R, K) fp16;
    w = (d sc[m]) (q - 32), formats/q6_k.decode's order."""
    r, word, shifts, row = tile_setup(WN)
    G: tl.constexpr = WN // 4
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    live = cols < K
    s = tl.reshape(shifts, (1, 1, 1, 4, 2)) // 4  # s = 2 c + h
    levels = load_nibbles(q_ptr, r, word, cols, live, 4 * s, K, WN, BK)  # (BK, G, 4 j, 4 c, 2 h)
    g0 = (tl.program_id(0) % (32 // WN)) * G
    top = tl.load(hb_ptr + (r * K + cols[:, None]) * 16 + 2 * g0 + tl.arange(0, 2 * G)[None, :], mask=live[:, None],
                  other=0)  # (BK, 2 G): words 2 g + j // 2
    top = tl.reshape(tl.join(top, top), (BK, G, 4, 1, 1))  # word 2 g + j // 2 at j
    j = tl.arange(0, 4)[None, None, :, None, None]
    c = s // 2
    bit = 16 * (j % 2) + 8 * (c // 2) + 2 * (c % 2) + 4 * (s % 2)
    q = levels | (((top >> bit) & 3) << 4)
    sc = tl.load(s_ptr + zigzag_mma.head_index(r, cols, K)[:, None] * 16 + tl.arange(0, 16)[None, :],
                 mask=live[:, None], other=0).to(tl.float32)  # (BK, 16)
    d = tl.load(d_ptr + r * K + cols, mask=live, other=0.0).to(tl.float32)
    scale = tl.reshape(d[:, None] * sc, (BK, 1, 4, 4, 1))
    level = small_minus(q, 32)
    store_tile(out_ptr, tl.reshape(scale * level, (BK, 8 * WN)), row, cols, live, N, K)


@triton.jit
def _tile_start(G: tl.constexpr, BK: tl.constexpr):
    """Program (tile, column block) -> (superblock row r, first lane group g0 of the tile's G, columns (BK,))."""
    tile = tl.program_id(0)
    r = tile // (8 // G)
    return r, (tile % (8 // G)) * G, tl.program_id(1) * BK + tl.arange(0, BK)


@triton.jit
def _dequant_q8_0_kernel(q_ptr, d_ptr, out_ptr, N, K, G: tl.constexpr, BK: tl.constexpr):
    """Zigzag Q8_0 (gpu_layout_q8_0.GpuQ8_0Planes) -> out (N, K) row-major in out's dtype. Program (tile, column
    block): lane groups g = g0 .. g0 + G - 1 (G <= 4: one p = g // 4) of superblock row r in BK columns. Weight
    16 (8 H + mm) + 8 h + g is byte 2 (mm % 2) + h of word 4 (g % 4) + mm // 2 of plane 2 H + p (q_ptr (R, 4, K, 16)
    int32), u = q + 128: (BK, 2 H, G, 4, 2, 2) from one (BK, 2, 4 G) load; d of block 4 H + mm // 2 is fp16
    8 head_index + 4 H + mm // 2 (d_ptr); w = d (u - 128), formats/q8_0.decode's product."""
    r, g0, cols = _tile_start(G, BK)
    live = cols < K
    p = g0 // 4
    half = tl.arange(0, 2)[None, :, None]
    words = tl.load(q_ptr + ((r * 4 + 2 * half + p) * K + cols[:, None, None]) * 16 + 4 * (g0 % 4)
                    + tl.arange(0, 4 * G)[None, None, :], mask=live[:, None, None], other=0)  # (BK, 2, 4 G)
    byte = 2 * tl.arange(0, 2)[:, None] + tl.arange(0, 2)[None, :]  # (2 mm % 2, 2 h)
    u = (tl.reshape(words, (BK, 2, G, 4, 1, 1)) >> (8 * byte)[None, None, None, None, :, :]) & 255
    d = tl.load(d_ptr + zigzag_mma.head_index(r, cols, K)[:, None] * 8 + tl.arange(0, 8)[None, :],
                mask=live[:, None], other=0.0).to(tl.float32)  # (BK, 8)
    level = small_minus(u, 128)
    w = tl.reshape(tl.reshape(d, (BK, 2, 1, 4, 1, 1)) * level, (BK, 32 * G))
    t = tl.arange(0, 32 * G)  # (H, i, mm // 2, mm % 2, h)
    mm = (t % 16) // 2
    row = r * 256 + 16 * (8 * (t // (16 * G)) + mm) + 8 * (t % 2) + g0 + (t // 16) % G
    store_tile(out_ptr, w, row, cols, live, N, K)


@triton.jit
def _low_pairs(q_ptr, r, g0, cols, live, K, G: tl.constexpr, BK: tl.constexpr):
    """Q3_K's low bit pairs (Q2_K's levels; gpu_layout_q3k.py) of lane groups g0 .. g0 + G - 1 (G <= 4: one plane
    g // 4) in columns `cols`: words 2 (g % 4) + m // 8 of plane g // 4 (q_ptr (R, 2, K, 8) int32), one (BK, 2 G)
    load, row 16 m + 8 h + g at bit 8 u + 2 (m % 2) + 4 h, u = (m // 2) % 4: (BK, G, 2 m // 8, 4 u, 2 m % 2, 2 h)
    int32 0..3, m = 8 (m // 8) + 2 u + m % 2."""
    words = tl.load(q_ptr + ((r * 2 + g0 // 4) * K + cols[:, None]) * 8 + 2 * (g0 % 4)
                    + tl.arange(0, 2 * G)[None, :], mask=live[:, None], other=0)  # (BK, 2 G)
    u = tl.arange(0, 4)[:, None, None]
    odd = tl.arange(0, 2)[None, :, None]
    h = tl.arange(0, 2)[None, None, :]
    bit = 8 * u + 2 * odd + 4 * h  # (4, 2, 2)
    return (tl.reshape(words, (BK, G, 2, 1, 1, 1)) >> bit[None, None, None, :, :, :]) & 3


@triton.jit
def _group_rows(r, g0, G: tl.constexpr):
    """The matrix rows (32 G,) of a tile of lane groups g0 .. in the order _low_pairs and the nibble types hold
    them: t = 32 i + 2 m + h -> 256 r + 16 m + 8 h + g0 + i."""
    t = tl.arange(0, 32 * G)
    return r * 256 + 16 * ((t % 32) // 2) + 8 * (t % 2) + g0 + t // 32


@triton.jit
def _dequant_q3k_kernel(q_ptr, hb_ptr, h_ptr, out_ptr, N, K, G: tl.constexpr, BK: tl.constexpr):
    """Zigzag Q3_K (gpu_layout_q3k.GpuQ3KPlanes) -> out (N, K) row-major in out's dtype. Program (tile, column block):
    lane groups g0 .. g0 + G - 1 of superblock row r in BK columns. Low pairs: _low_pairs; third bit of row
    16 m + 8 h + g in word g of hb_ptr (R, K, 8) int32 at bit 8 u + 2 + 4 h (even m) or 8 u + 4 / 8 ((u + 1) % 4)
    (odd m, h = 0 / 1), plus m // 8; scale s[m] and d from the grouped head (h_ptr as int64 pairs): s[2 j] = byte j
    & 63, s[2 j + 1] = byte j >> 6 | nibble j of word 2 << 2, d word 3's low half; w = (d (s - 32)) (q - 4),
    formats/q3_k.decode's order."""
    r, g0, cols = _tile_start(G, BK)
    live = cols < K
    low = _low_pairs(q_ptr, r, g0, cols, live, K, G, BK)  # (BK, G, 2, 4, 2, 2)
    third = tl.load(hb_ptr + (r * K + cols[:, None]) * 8 + g0 + tl.arange(0, G)[None, :], mask=live[:, None],
                    other=0)  # (BK, G)
    m8 = tl.arange(0, 2)[:, None, None, None]
    u = tl.arange(0, 4)[None, :, None, None]
    odd = tl.arange(0, 2)[None, None, :, None]
    h = tl.arange(0, 2)[None, None, None, :]
    bit = tl.where(odd == 0, 8 * u + 2 + 4 * h, tl.where(h == 0, 8 * u + 4, 8 * ((u + 1) % 4))) + m8  # (2, 4, 2, 2)
    q = low | (((tl.reshape(third, (BK, G, 1, 1, 1, 1)) >> bit[None, None, :, :, :, :]) & 1) << 2)
    w0, w1, w2, w3 = load_words(h_ptr, zigzag_mma.head_index(r, cols, K), live)
    m = tl.arange(0, 16)[None, :]
    j = m // 2
    pair = (tl.where(j < 4, w0[:, None], w1[:, None]) >> (8 * (j % 4))) & 255  # (BK, 16)
    s = tl.where(m % 2 == 0, pair & 63, (pair >> 6) | (((w2[:, None] >> (4 * j)) & 15) << 2))
    scale = half_to_float(w3)[:, None] * small_minus(s, 32)  # d (s - 32)
    level = small_minus(q, 4)
    w = tl.reshape(tl.reshape(scale, (BK, 1, 2, 4, 2, 1)) * level, (BK, 32 * G))
    store_tile(out_ptr, w, _group_rows(r, g0, G), cols, live, N, K)


@triton.jit
def _dequant_q2k_kernel(q_ptr, s_ptr, d_ptr, out_ptr, N, K, G: tl.constexpr, BK: tl.constexpr):
    """Zigzag Q2_K (gpu_layout_q2k.GpuQ2KPlanes) -> out (N, K) row-major in out's dtype. Program (tile, column block):
    lane groups g0 .. g0 + G - 1 of superblock row r in BK columns. Levels: _low_pairs; scale byte m of the grouped
    16-byte unit (s_ptr as int64 pairs: sc low nibble, mn high); d | dmin << 16 at d_ptr (R, K) int32;
    w = (d sc) q - dmin mn, formats/q2_k.decode's order (exact, so an FFMA rounds as its product and difference)."""
    r, g0, cols = _tile_start(G, BK)
    live = cols < K
    q = _low_pairs(q_ptr, r, g0, cols, live, K, G, BK)  # (BK, G, 2, 4, 2, 2)
    w0, w1, w2, w3 = load_words(s_ptr, zigzag_mma.head_index(r, cols, K), live)
    m = tl.arange(0, 16)[None, :]
    word = tl.where(m < 8, tl.where(m < 4, w0[:, None], w1[:, None]), tl.where(m < 12, w2[:, None], w3[:, None]))
    byte = (word >> (8 * (m % 4))) & 255  # (BK, 16)
    dd = tl.load(d_ptr + r * K + cols, mask=live, other=0)
    scale = half_to_float(dd)[:, None] * small_to_float(byte & 15)
    minimum = half_to_float(dd >> 16)[:, None] * small_to_float(byte >> 4)
    w = (tl.reshape(scale, (BK, 1, 2, 4, 2, 1)) * small_to_float(q)
         - tl.reshape(minimum, (BK, 1, 2, 4, 2, 1)))
    store_tile(out_ptr, tl.reshape(w, (BK, 32 * G)), _group_rows(r, g0, G), cols, live, N, K)


# The shipped tiles: (lane groups a tile, columns a program), 4 warps: the only tile at 32 registers for every type;
# 2.9-3.5 TB/s read plus written on a 7B's maps on the H200, 2 lane groups x 64 columns 1.3-3.4
# (benchmarks/results/session30/dequant-probe-types-30fad11.log)
TILES = {"q5_k": (1, 128), "q6_k": (1, 128), "q8_0": (1, 128), "q3_k": (1, 128), "q2_k": (1, 128)}


@dataclass(frozen=True)
class _Kernel:
    """A type's kernel and its arguments before out: (w's attribute, the dtype it is viewed as or None) and the Triton
    type of each (compile_sm90); `words`: its tile is given as WN = 4 lane groups words (the nibble types), else as
    G lane groups."""

    kernel: object
    arrays: tuple
    types: tuple
    words: bool


_KERNELS = {
    "q5_k": _Kernel(_dequant_q5k_kernel, (("quants", None), ("head", torch.int64), ("fifth", None)),
                    ("*i32", "*i64", "*i32"), True),
    "q6_k": _Kernel(_dequant_q6k_kernel, (("quants", None), ("high", None), ("scales", torch.int8), ("d", None)),
                    ("*i32", "*i32", "*i8", "*fp16"), True),
    "q8_0": _Kernel(_dequant_q8_0_kernel, (("quants", None), ("d", None)), ("*i32", "*fp16"), False),
    "q3_k": _Kernel(_dequant_q3k_kernel, (("quants", None), ("high", None), ("head", torch.int64)),
                    ("*i32", "*i32", "*i64"), False),
    "q2_k": _Kernel(_dequant_q2k_kernel, (("quants", None), ("scales", torch.int64), ("d", None)),
                    ("*i32", "*i64", "*i32"), False),
}


def _tile(spec: _Kernel, groups: int) -> dict:
    return {"WN": 4 * groups} if spec.words else {"G": groups}


def supports(w) -> bool:
    """Whether w is a zigzag matrix of a type this module dequantizes, in the CUDA GEMV's layout
    (zigzag_cuda.kquant_layout's classes)."""
    return zigzag_cuda.in_kquant_layout(w) and w.fmt in _KERNELS


def dequantize(w, dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None, groups: int | None = None,
               bk: int | None = None) -> torch.Tensor:
    """The zigzag matrix w (gpu_layout_q5k.GpuQ5KPlanes, gpu_layout_q6k.GpuQ6KPlanes, ...) whole: (N, K) row-major in
    `dtype` (out's, where given: contiguous (N, K)); groups (1, 2, 4 lane groups a tile: Q8_0's, Q3_K's and Q2_K's
    words of a column lie in one plane) and bk (columns a program, a power of two) default to TILES."""
    if not supports(w):
        raise ValueError(f"type_tiles.dequantize runs zigzag {', '.join(_KERNELS)} in the CUDA GEMV's layouts, not "
                         f"{type(w).__name__} {w.layout} {w.fmt}")
    shipped_groups, shipped_bk = TILES[w.fmt]
    groups = shipped_groups if groups is None else groups
    bk = shipped_bk if bk is None else bk
    if groups not in (1, 2, 4):
        raise ValueError(f"a tile holds 1, 2 or 4 lane groups, not {groups}")
    out = dequant_out(w, dtype, out)
    spec = _KERNELS[w.fmt]
    arrays = [getattr(w, name) if view is None else getattr(w, name).view(view) for name, view in spec.arrays]
    spec.kernel[(w.grid[0] * (GROUPS // groups), triton.cdiv(w.shape[1], bk))](
        *arrays, out, *w.shape, **_tile(spec, groups), BK=bk, num_warps=4)
    return out


def compile_sm90(fmt: str, groups: int | None = None, bk: int | None = None, dtype: str = "fp16"):
    """fmt's kernel at a tile (TILES' by default) compiled for Hopper here, without a GPU (sass.compile_sm90): the
    pointers, N and K taken as multiples of 16, as a model's maps specialize them; 4 warps. Needs TRITON_INTERPRET
    unset."""
    from spqt.kernels import sass

    spec = _KERNELS[fmt]
    shipped_groups, shipped_bk = TILES[fmt]
    tile = _tile(spec, shipped_groups if groups is None else groups)
    pointers = dict(zip(spec.kernel.arg_names, spec.types))
    sig = {**pointers, "out_ptr": f"*{dtype}", "N": "i32", "K": "i32", **{c: "constexpr" for c in tile},
           "BK": "constexpr"}
    return sass.compile_sm90(spec.kernel, sig, {**tile, "BK": shipped_bk if bk is None else bk}, len(pointers) + 3,
                             {"num_warps": 4})
