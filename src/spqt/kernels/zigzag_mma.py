"""Zigzag Q4_K GEMV on the tensor cores (B2 dense, B3 static, B4 indexed): one mma.sync per 256
weights.

Why: a scalar kernel spends about 5 instructions per weight (unpack, int->float, FMA); on an
H100 that capped the previous zigzag kernel at 62 % of the copy bandwidth. Here a warp takes 16
columns (a "chunk") of a superblock row (256 outputs) and runs 16 mma.m16n8k16, one per 16-row
tile m:

    A (16 rows x 16 columns)  the 4-bit levels, exact small numbers in 16-bit floats
    B (16 columns x 8 n)      B[k, n] = x_k * d_k * sc[k, n]: n is the sub-block (8 per column)
    C (16 rows x 8 n)         C[i, n] = sum_k A[i, k] B[k, n]; row i wants n = its sub-block i // 32

The 7 other columns of C are wasted tensor-core work, which costs nothing we can measure; what
counts is that per 8 weights a thread issues 2 byte permutes, 4 ANDs and one mma, and decodes
one 6-bit scale per 32 weights (sm_90 SASS: 333 instructions per chunk and lane, 2.6 per weight).
The min term x_k dmin_k m[k, j] is summed per lane in fp32.

Lanes. Lane (g, t) = 4 g + t of a warp (the mma fragment's groupID and threadID_in_group) owns
the chunk's columns 2t, 2t+1, 2t+8, 2t+9 ("slots" 0..3), computes B for them at sub-block
n = g, and of each column loads the 16 bytes holding rows {16m + g, 16m + 8 + g : m < 16}: in
the kernel layout (gpu_layout.py, zigzag) byte 16 g + m of a column's 128 level bytes is
level[16 m + g] | level[16 m + 8 + g] << 4 (bytes 64 p .. 64 p + 63 in plane p). Every tensor is (32 W, ...) with row 32 w + 4 g + t,
so Triton's layout gives row i to thread i and the trailing 4 to its registers
(tests/test_kernels.py::test_mma_lane_layout checks the compiled TTGIR).

Numerics. B is x d sc as 16-bit floats, products and sums in fp32: fp16 x -> one fp16 term
(relative error 2^-11 per product: the error of multiplying by a weight dequantized to fp16,
the same order as rounding y to fp16); bf16 x -> two bf16 terms (about 2^-16); fp32 x -> three
bf16 terms (about 2^-24). A: fp16 holds a level q as the subnormal q 2^-24 (one AND, no
conversion; the high nibble of a byte q 2^-20), undone by a per-row power of two at the end;
bf16 holds 128 + q (OR into 128's bits, subtract 128).

Under TRITON_INTERPRET=1 (CI) the mma, which is PTX, is replaced by a tensor emulation of the
same fragment semantics; the rest of the kernel (layout, B, sums, extraction) is the same code.
"""

import functools
import os

import torch
import triton
import triton.language as tl

from spqt.kernels import gpu_layout
from spqt.kernels.q4k_bits import split_head, unpack_scales

MODE_DENSE, MODE_STATIC, MODE_INDEXED = 0, 1, 2  # B2, B3, B4
HEAD_GROUP = tl.constexpr(gpu_layout.HEAD_GROUP)
PLANES = tl.constexpr(gpu_layout.PLANES)  # a block's level bytes in PLANES planes (gpu_layout.to_planes)
CHUNK = tl.constexpr(16)  # columns per warp step = the mma's k
BTYPE_FP16, BTYPE_BF16, BTYPE_BF16X3 = 0, 1, 2
TERMS = {BTYPE_FP16: 1, BTYPE_BF16: 2, BTYPE_BF16X3: 3}  # 16-bit terms of B per input dtype

# PRMT selectors: byte b of the first column -> result byte 0, byte b of the second -> byte 2.
_SEL = [b | (b << 4) | ((4 + b) << 8) | ((4 + b) << 12) for b in range(4)]



def _tile_asm(m: int, btype: int, masked: bool = True) -> str:
    """PTX of tile m (rows 16 m .. 16 m + 15), one instance per lane (pack 4, operands $n):
    0-3 out C (fp32); 4-19 the 4 words of slots 0-3 (int32; word m // 4, byte m % 4 is this
    tile's); per B term i two packed 16-bit pairs, each broadcast 4-fold: slots 0|1 at 20 + 8 i,
    slots 2|3 at 24 + 8 i; then the 4 C inputs; then the lane's group g (int32, 4-fold).
    masked: B goes in only where g = m // 2 (the tile's sub-block), zero elsewhere, so that the tile
    adds into C's column m // 2 alone and several tiles share one accumulator (module docstring);
    else B goes in whole and the tile has an accumulator of its own (ACC 16)."""
    terms = TERMS[btype]
    q, b = m // 4, m % 4
    c0 = 20 + 8 * terms
    lines = ["{", ".reg .b32 p, q, a0, a1, a2, a3;", ".reg .pred own;",
             ".reg .b32 " + ", ".join(f"s{i}, t{i}" for i in range(terms)) + ";",
             f"setp.eq.u32 own, ${c0 + 4}, {m // 2};" if masked else "setp.eq.u32 own, 0, 0;"]
    lines += [f"selp.b32 s{i}, ${20 + 8 * i}, 0, own;\nselp.b32 t{i}, ${24 + 8 * i}, 0, own;" if masked else
              f"mov.b32 s{i}, ${20 + 8 * i};\nmov.b32 t{i}, ${24 + 8 * i};" for i in range(terms)]
    lines += [f"prmt.b32 p, ${4 + q}, ${8 + q}, {_SEL[b]};", f"prmt.b32 q, ${12 + q}, ${16 + q}, {_SEL[b]};"]
    if btype == BTYPE_FP16:
        lines += ["and.b32 a0, p, 0x000F000F;", "and.b32 a1, p, 0x00F000F0;",
                  "and.b32 a2, q, 0x000F000F;", "and.b32 a3, q, 0x00F000F0;"]
        kind = "f16.f16"
    else:
        # bf16 has 7 mantissa bits: the high nibble is shifted down first
        lines += [".reg .b32 m, ph, qh;", "mov.b32 m, 0x43004300;", "shr.b32 ph, p, 4;", "shr.b32 qh, q, 4;",
                  "lop3.b32 a0, p, 0x000F000F, m, 0xEA;", "lop3.b32 a1, ph, 0x000F000F, m, 0xEA;",
                  "lop3.b32 a2, q, 0x000F000F, m, 0xEA;", "lop3.b32 a3, qh, 0x000F000F, m, 0xEA;",
                  "sub.bf16x2 a0, a0, m;", "sub.bf16x2 a1, a1, m;", "sub.bf16x2 a2, a2, m;", "sub.bf16x2 a3, a3, m;"]
        kind = "bf16.bf16"
    acc = f"{{${c0}, ${c0 + 1}, ${c0 + 2}, ${c0 + 3}}}"
    for i in range(terms):
        lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.f32 {{$0, $1, $2, $3}}, {{a0, a1, a2, a3}}, "
                     f"{{s{i}, t{i}}}, {acc};")
        acc = "{$0, $1, $2, $3}"
    lines.append("}")
    return "\n".join(lines)


@functools.lru_cache(maxsize=None)
def tile_asms(btype: int, acc: int = 2) -> tuple:
    """The 16 tiles' PTX for one B type and accumulator count (a constexpr kernel argument; built
    once, not per launch)."""
    return tuple(_tile_asm(m, btype, acc < 16) for m in range(16))


# Per-row factor that undoes the A encoding: (row g, row g + 8) of a tile.
ROW_SCALES = {BTYPE_FP16: (2.0**24, 2.0**20), BTYPE_BF16: (1.0, 1.0), BTYPE_BF16X3: (1.0, 1.0)}


@triton.jit
def _slots_kt(v0, v1, v2, v3, W: tl.constexpr):
    """Slots (W, 8, 4 t) x 4 -> (W, 8, 16 k), k = 8 s + 2 t + e for slot 2 s + e."""
    stk = tl.join(tl.join(v0, v2), tl.join(v1, v3))  # [w, g, t, s, e]
    return tl.reshape(tl.permute(stk, (0, 1, 3, 2, 4)), (W, 8, 16))


@triton.jit
def _emulate_tile(w0, w1, w2, w3, e0, e1, e2, e3, gi, M: tl.constexpr, W: tl.constexpr, MASKED: tl.constexpr):
    """Interpreter twin of one tile's mma over all lanes: the C fragment increment (32 W, 4 regs).
    w*: the slots' words (32 W, 4); e*: the slots' B values (32 W,) fp32, kept only in lanes of
    group gi = M // 2 if MASKED (as the PTX does); row 32 w + 4 g + t.
    Fragments (PTX m16n8k16): lane (g, t) holds A rows g, g + 8 at k = 2t, 2t+1, 2t+8, 2t+9,
    B at n = g for the same k, and C at rows g, g + 8 (r = 0, 1 | 2, 3), n = 2t, 2t+1."""
    word = tl.arange(0, 4)[None, :]
    SH: tl.constexpr = 8 * (M % 4)
    v0 = tl.reshape(tl.sum(tl.where(word == M // 4, w0, 0), axis=1), (W, 8, 4))
    v1 = tl.reshape(tl.sum(tl.where(word == M // 4, w1, 0), axis=1), (W, 8, 4))
    v2 = tl.reshape(tl.sum(tl.where(word == M // 4, w2, 0), axis=1), (W, 8, 4))
    v3 = tl.reshape(tl.sum(tl.where(word == M // 4, w3, 0), axis=1), (W, 8, 4))
    a = _slots_kt(v0, v1, v2, v3, W)  # [w, g, k]
    own = (gi == M // 2) | (not MASKED)
    e0 = tl.where(own, e0, 0.0)
    e1 = tl.where(own, e1, 0.0)
    e2 = tl.where(own, e2, 0.0)
    e3 = tl.where(own, e3, 0.0)
    b = _slots_kt(tl.reshape(e0, (W, 8, 4)), tl.reshape(e1, (W, 8, 4)), tl.reshape(e2, (W, 8, 4)),
                  tl.reshape(e3, (W, 8, 4)), W)  # [w, n, k]
    a_lo = ((a >> SH) & 15).to(tl.float32)
    a_hi = ((a >> (SH + 4)) & 15).to(tl.float32)
    d_lo = tl.sum(a_lo[:, :, None, :] * b[:, None, :, :], axis=3)  # (W, 8 g, 8 n)
    d_hi = tl.sum(a_hi[:, :, None, :] * b[:, None, :, :], axis=3)
    d = tl.join(tl.reshape(d_lo, (W, 8, 4, 2)), tl.reshape(d_hi, (W, 8, 4, 2)))  # [w, g, t, e, h]
    return tl.reshape(tl.permute(d, (0, 1, 2, 4, 3)), (32 * W, 4))  # r = 2 h + e


@triton.jit
def _tile(c, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, M: tl.constexpr, ASMS: tl.constexpr,
          BTYPE: tl.constexpr, EMULATE: tl.constexpr, W: tl.constexpr, MASKED: tl.constexpr):
    """C (32 W lanes, 4 regs) += A_M B_M, every lane's mma.sync (or its emulation); B_M is B in
    the lanes of group gi = M // 2 and zero in the others (MASKED), else B.
    p/q/u: the B terms as packed 16-bit pairs (32 W, 1) int32 (only the B type's terms are
    passed to the PTX); e*: the B values in fp32, for the emulation."""
    if EMULATE:
        c = c + _emulate_tile(w0, w1, w2, w3, e0, e1, e2, e3, gi, M, W, MASKED)
    elif BTYPE == 0:
        c = tl.inline_asm_elementwise(ASMS[M], "=f,=f,=f,=f," + "r," * 24 + "f,f,f,f,r,r,r,r",
                                      [w0, w1, w2, w3, p01, p23, c, gi[:, None]], dtype=tl.float32, is_pure=True, pack=4)
    elif BTYPE == 1:
        c = tl.inline_asm_elementwise(ASMS[M], "=f,=f,=f,=f," + "r," * 32 + "f,f,f,f,r,r,r,r",
                                      [w0, w1, w2, w3, p01, p23, q01, q23, c, gi[:, None]], dtype=tl.float32, is_pure=True,
                                      pack=4)
    else:
        c = tl.inline_asm_elementwise(ASMS[M], "=f,=f,=f,=f," + "r," * 40 + "f,f,f,f,r,r,r,r",
                                      [w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, c, gi[:, None]], dtype=tl.float32,
                                      is_pure=True, pack=4)
    return c


@triton.jit
def _pair(lo, hi, DT: tl.constexpr):
    """Two fp32 (32 W,) tensors rounded to DT (fp16 / bf16), packed low | high << 16, (32 W, 1) int32."""
    a = lo.to(DT).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    b = hi.to(DT).to(tl.int16, bitcast=True).to(tl.int32)
    return (a | (b << 16))[:, None]


@triton.jit
def _terms(v, BTYPE: tl.constexpr):
    """v (fp32) as TERMS[BTYPE] 16-bit terms, each an fp32 exactly representable in fp16/bf16; the
    terms a B type lacks are zeros."""
    if BTYPE == 0:
        t0 = v.to(tl.float16).to(tl.float32)
        t1 = tl.zeros_like(v)
        t2 = tl.zeros_like(v)
    else:
        t0 = v.to(tl.bfloat16).to(tl.float32)
        t1 = (v - t0).to(tl.bfloat16).to(tl.float32)
        t2 = tl.zeros_like(v)
        if BTYPE == 2:
            t2 = (v - t0 - t1).to(tl.bfloat16).to(tl.float32)
    return t0, t1, t2


@triton.jit
def head_index(r, col, K):
    """The 16-byte head of block (superblock row r, column col) in the grouped zigzag head array
    (gpu_layout.group_heads), in 16-byte units."""
    return ((r // HEAD_GROUP) * K + col) * HEAD_GROUP + r % HEAD_GROUP


@triton.jit
def _slot_load(q_ptr, h_ptr, x_ptr, t, r, col, m, K, gi, li, MODE: tl.constexpr):
    """Loads of one slot (col, m: (32 W,) per lane): the lane's 16 quant bytes (32 W, 4) int32,
    the head as two int64 and x, (32 W,). Dense and indexed: only x is masked; a column past the
    end reads column 0 (finite weights) against x = 0, so B and the min term are 0 and no register
    is zeroed (indexed columns come clamped from _list_columns: the weight address waits for no
    mask). Static (B3): x is read first and a column with |x| <= t is not loaded at all."""
    x = tl.load(x_ptr + col, mask=m, other=0.0).to(tl.float32)
    if MODE == 1:
        m = m & (tl.abs(x) > t)
        x = tl.where(m, x, 0.0)
    elif MODE == 0:
        col = tl.where(m, col, 0)
    PG: tl.constexpr = 8 // PLANES  # lane groups a plane holds
    q_ptrs = q_ptr + (((r * PLANES + gi // PG) * K + col) * (4 * PG) + (gi % PG) * 4)[:, None] + li[None, :]
    h_ptrs = h_ptr + (head_index(r, col, K) * 2)[:, None] + tl.arange(0, 2)[None, :]  # one 16-byte load
    if MODE == 1:
        words = tl.load(q_ptrs, mask=m[:, None], other=0)
        head = tl.load(h_ptrs, mask=m[:, None], other=0)
    else:
        words = tl.load(q_ptrs)
        head = tl.load(h_ptrs)
    hlo, hhi = tl.split(head)
    return words, hlo, hhi, x


@triton.jit
def _slot_b(hlo, hhi, x, gi, BTYPE: tl.constexpr):
    """B of one slot at n = g: x d sc[g] in TERMS[BTYPE] terms, and the min term x dmin m[g]."""
    d, dmin, w1, w2, w3 = split_head(hlo, hhi)
    sc, mn = unpack_scales(w1, w2, w3, gi)
    t0, t1, t2 = _terms(x * d * sc, BTYPE)
    return t0, t1, t2, x * dmin * mn


@triton.jit
def _list_columns(idx_ptr, pos, K):
    """Columns at list positions pos (32 W,), loaded without waiting for the count: the position
    and the value are clamped into [0, K), so an entry past the count (never written) still
    addresses a real block; its x is masked to 0 where the count is known."""
    col = tl.load(idx_ptr + tl.minimum(pos, K - 1))
    return tl.where((col >= 0) & (col < K), col, 0)


@triton.jit
def _chunk_columns(idx_ptr, pos, K, MODE: tl.constexpr):
    """The columns of a chunk's 4 slots, pos = the list position of slot 0 (32 W,)."""
    if MODE == 2:
        return (_list_columns(idx_ptr, pos, K), _list_columns(idx_ptr, pos + 1, K),
                _list_columns(idx_ptr, pos + 8, K), _list_columns(idx_ptr, pos + 9, K))
    else:
        return pos, pos + 1, pos + 8, pos + 9


@triton.jit
def _chunk_loads(q_ptr, h_ptr, x_ptr, t, r, k0, k1, k2, k3, pos, hi, K, gi, li, MODE: tl.constexpr):
    """The loads of one chunk: slot i at column k_i, list position pos + (0, 1, 8, 9)[i] < hi."""
    w0, hl0, hh0, x0 = _slot_load(q_ptr, h_ptr, x_ptr, t, r, k0, pos < hi, K, gi, li, MODE)
    w1, hl1, hh1, x1 = _slot_load(q_ptr, h_ptr, x_ptr, t, r, k1, pos + 1 < hi, K, gi, li, MODE)
    w2, hl2, hh2, x2 = _slot_load(q_ptr, h_ptr, x_ptr, t, r, k2, pos + 8 < hi, K, gi, li, MODE)
    w3, hl3, hh3, x3 = _slot_load(q_ptr, h_ptr, x_ptr, t, r, k3, pos + 9 < hi, K, gi, li, MODE)
    return w0, hl0, hh0, x0, w1, hl1, hh1, x1, w2, hl2, hh2, x2, w3, hl3, hh3, x3


@triton.jit
def _acc_tile(c, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, M: tl.constexpr,
              ASMS: tl.constexpr, BTYPE: tl.constexpr, EMULATE: tl.constexpr, W: tl.constexpr, ACC: tl.constexpr):
    """Tile M into its accumulator c = accumulator M % ACC (ACC 2 or 4: the tiles sharing one have
    distinct sub-blocks M // 2, B masked; ACC 16: one a tile, B whole)."""
    return _tile(c, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, M, ASMS, BTYPE, EMULATE, W,
                 ACC < 16)


@triton.jit
def _chunk(c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15, bias, w0, hl0, hh0, x0, w1, hl1, hh1, x1, w2, hl2, hh2, x2, w3, hl3, hh3, x3, gi,
           ASMS: tl.constexpr, BTYPE: tl.constexpr, EMULATE: tl.constexpr, W: tl.constexpr, ACC: tl.constexpr):
    """Add one chunk (16 columns per warp): B of the 4 slots, then the 16 tiles' mma into the ACC
    accumulators c0 .. c{ACC - 1} (the others pass through)."""
    DT: tl.constexpr = tl.float16 if BTYPE == 0 else tl.bfloat16
    a0, b0, z0, m0 = _slot_b(hl0, hh0, x0, gi, BTYPE)
    a1, b1, z1, m1 = _slot_b(hl1, hh1, x1, gi, BTYPE)
    a2, b2, z2, m2 = _slot_b(hl2, hh2, x2, gi, BTYPE)
    a3, b3, z3, m3 = _slot_b(hl3, hh3, x3, gi, BTYPE)
    bias += (m0 + m1) + (m2 + m3)
    p01 = _pair(a0, a1, DT)
    p23 = _pair(a2, a3, DT)
    q01 = _pair(b0, b1, DT)
    q23 = _pair(b2, b3, DT)
    u01 = _pair(z0, z1, DT)
    u23 = _pair(z2, z3, DT)
    e0 = a0 + b0 + z0
    e1 = a1 + b1 + z1
    e2 = a2 + b2 + z2
    e3 = a3 + b3 + z3
    A: tl.constexpr = ACC
    if A == 16:
        c0 = _acc_tile(c0, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 0, ASMS, BTYPE, EMULATE, W, ACC)
    elif A == 4:
        c0 = _acc_tile(c0, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 0, ASMS, BTYPE, EMULATE, W, ACC)
    else:
        c0 = _acc_tile(c0, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 0, ASMS, BTYPE, EMULATE, W, ACC)
    if A == 16:
        c1 = _acc_tile(c1, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 1, ASMS, BTYPE, EMULATE, W, ACC)
    elif A == 4:
        c1 = _acc_tile(c1, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 1, ASMS, BTYPE, EMULATE, W, ACC)
    else:
        c1 = _acc_tile(c1, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 1, ASMS, BTYPE, EMULATE, W, ACC)
    if A == 16:
        c2 = _acc_tile(c2, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 2, ASMS, BTYPE, EMULATE, W, ACC)
    elif A == 4:
        c2 = _acc_tile(c2, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 2, ASMS, BTYPE, EMULATE, W, ACC)
    else:
        c0 = _acc_tile(c0, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 2, ASMS, BTYPE, EMULATE, W, ACC)
    if A == 16:
        c3 = _acc_tile(c3, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 3, ASMS, BTYPE, EMULATE, W, ACC)
    elif A == 4:
        c3 = _acc_tile(c3, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 3, ASMS, BTYPE, EMULATE, W, ACC)
    else:
        c1 = _acc_tile(c1, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 3, ASMS, BTYPE, EMULATE, W, ACC)
    if A == 16:
        c4 = _acc_tile(c4, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 4, ASMS, BTYPE, EMULATE, W, ACC)
    elif A == 4:
        c0 = _acc_tile(c0, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 4, ASMS, BTYPE, EMULATE, W, ACC)
    else:
        c0 = _acc_tile(c0, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 4, ASMS, BTYPE, EMULATE, W, ACC)
    if A == 16:
        c5 = _acc_tile(c5, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 5, ASMS, BTYPE, EMULATE, W, ACC)
    elif A == 4:
        c1 = _acc_tile(c1, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 5, ASMS, BTYPE, EMULATE, W, ACC)
    else:
        c1 = _acc_tile(c1, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 5, ASMS, BTYPE, EMULATE, W, ACC)
    if A == 16:
        c6 = _acc_tile(c6, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 6, ASMS, BTYPE, EMULATE, W, ACC)
    elif A == 4:
        c2 = _acc_tile(c2, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 6, ASMS, BTYPE, EMULATE, W, ACC)
    else:
        c0 = _acc_tile(c0, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 6, ASMS, BTYPE, EMULATE, W, ACC)
    if A == 16:
        c7 = _acc_tile(c7, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 7, ASMS, BTYPE, EMULATE, W, ACC)
    elif A == 4:
        c3 = _acc_tile(c3, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 7, ASMS, BTYPE, EMULATE, W, ACC)
    else:
        c1 = _acc_tile(c1, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 7, ASMS, BTYPE, EMULATE, W, ACC)
    if A == 16:
        c8 = _acc_tile(c8, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 8, ASMS, BTYPE, EMULATE, W, ACC)
    elif A == 4:
        c0 = _acc_tile(c0, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 8, ASMS, BTYPE, EMULATE, W, ACC)
    else:
        c0 = _acc_tile(c0, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 8, ASMS, BTYPE, EMULATE, W, ACC)
    if A == 16:
        c9 = _acc_tile(c9, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 9, ASMS, BTYPE, EMULATE, W, ACC)
    elif A == 4:
        c1 = _acc_tile(c1, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 9, ASMS, BTYPE, EMULATE, W, ACC)
    else:
        c1 = _acc_tile(c1, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 9, ASMS, BTYPE, EMULATE, W, ACC)
    if A == 16:
        c10 = _acc_tile(c10, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 10, ASMS, BTYPE, EMULATE, W, ACC)
    elif A == 4:
        c2 = _acc_tile(c2, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 10, ASMS, BTYPE, EMULATE, W, ACC)
    else:
        c0 = _acc_tile(c0, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 10, ASMS, BTYPE, EMULATE, W, ACC)
    if A == 16:
        c11 = _acc_tile(c11, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 11, ASMS, BTYPE, EMULATE, W, ACC)
    elif A == 4:
        c3 = _acc_tile(c3, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 11, ASMS, BTYPE, EMULATE, W, ACC)
    else:
        c1 = _acc_tile(c1, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 11, ASMS, BTYPE, EMULATE, W, ACC)
    if A == 16:
        c12 = _acc_tile(c12, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 12, ASMS, BTYPE, EMULATE, W, ACC)
    elif A == 4:
        c0 = _acc_tile(c0, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 12, ASMS, BTYPE, EMULATE, W, ACC)
    else:
        c0 = _acc_tile(c0, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 12, ASMS, BTYPE, EMULATE, W, ACC)
    if A == 16:
        c13 = _acc_tile(c13, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 13, ASMS, BTYPE, EMULATE, W, ACC)
    elif A == 4:
        c1 = _acc_tile(c1, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 13, ASMS, BTYPE, EMULATE, W, ACC)
    else:
        c1 = _acc_tile(c1, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 13, ASMS, BTYPE, EMULATE, W, ACC)
    if A == 16:
        c14 = _acc_tile(c14, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 14, ASMS, BTYPE, EMULATE, W, ACC)
    elif A == 4:
        c2 = _acc_tile(c2, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 14, ASMS, BTYPE, EMULATE, W, ACC)
    else:
        c0 = _acc_tile(c0, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 14, ASMS, BTYPE, EMULATE, W, ACC)
    if A == 16:
        c15 = _acc_tile(c15, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 15, ASMS, BTYPE, EMULATE, W, ACC)
    elif A == 4:
        c3 = _acc_tile(c3, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 15, ASMS, BTYPE, EMULATE, W, ACC)
    else:
        c1 = _acc_tile(c1, w0, w1, w2, w3, p01, p23, q01, q23, u01, u23, e0, e1, e2, e3, gi, 15, ASMS, BTYPE, EMULATE, W, ACC)
    return c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15, bias


@triton.jit
def _quarter(ca, cb, cc, cd, bj, MQ: tl.constexpr, SCALE_LO: tl.constexpr, SCALE_HI: tl.constexpr, W: tl.constexpr):
    """Lane (g, t) holds tile 4 t + MQ's wanted column n = its sub-block j = 2 t + MQ // 2 in regs
    MQ // 2 (row g) and 2 + MQ // 2 (row g + 8) of the tile's accumulator: ca when ACC < 16 (the
    accumulator MQ % ACC, the same for every t), else ca, cb, cc, cd for t = 0..3 (tiles MQ, 4 + MQ,
    8 + MQ, 12 + MQ). Returns those two values (32 W,) each, scaled; warp 0 also subtracts the
    sub-block's min term bj[j] (so the sum over warps has it once)."""
    lanes = tl.arange(0, 32 * W)
    ti = lanes % 4
    reg = tl.arange(0, 4)[None, :]
    c = tl.where(ti[:, None] == 0, ca, tl.where(ti[:, None] == 1, cb, tl.where(ti[:, None] == 2, cc, cd)))
    E: tl.constexpr = MQ // 2
    j = 2 * ti + E
    bsel = tl.sum(tl.where(tl.arange(0, 8)[None, :] == j[:, None], bj[None, :], 0.0), axis=1)
    bsel = tl.where(lanes < 32, bsel, 0.0)
    lo = tl.sum(tl.where(reg == E, c, 0.0), axis=1) * SCALE_LO - bsel
    hi = tl.sum(tl.where(reg == 2 + E, c, 0.0), axis=1) * SCALE_HI - bsel
    return tl.join(lo, hi)  # (32 W, 2 h)


@triton.jit
def _prefetch_l2(q_ptr, h_ptr, r, col, K):
    """Ask L2 for the level bytes (one piece a plane; PLANES = 2) and the head of blocks (r, col (32 W,))."""
    PW: tl.constexpr = 32 // PLANES
    plane = (r * PLANES * K + col) * PW  # plane 0's piece; plane p is p K PW words on
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; prefetch.global.L2 [$2]; prefetch.global.L2 [$3]; "
                              "mov.u32 $0, 0;", "=r,l,l,l",
                              [(q_ptr + plane).to(tl.int64), (q_ptr + plane + K * PW).to(tl.int64),
                               (h_ptr + head_index(r, col, K) * 2).to(tl.int64)], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _prefetch_ahead(q_ptr, h_ptr, idx_ptr, r, kp, j, stride, hi, ahead_pos, K, MODE: tl.constexpr,
                    AHEAD: tl.constexpr):
    """At step j, ask L2 for the blocks of step j + AHEAD stride (no register waits for them), one
    column a lane. B4: kp holds that step's columns, read a step earlier; returns the next step's.
    B2: the columns stay within the share (past its end are the next program's blocks, which it
    fetches itself); kp passes through."""
    if MODE == 2:
        _prefetch_l2(q_ptr, h_ptr, r, kp, K)
        kp = _list_columns(idx_ptr, j + (AHEAD + 1) * stride + ahead_pos, K)
    else:
        _prefetch_l2(q_ptr, h_ptr, r, tl.minimum(j + AHEAD * stride + ahead_pos, hi - 1), K)
    return kp


@triton.jit
def _finish_tile(part_ptr, y_ptr, r_ptr, cnt_ptr, g, N, F, NP, SPLIT, EPILOGUE: tl.constexpr, SB: tl.constexpr):
    """Output tile g (rows 256 g ...), run by the last program to finish its inputs: y = the sum
    of the SPLIT partials of each row in a fixed order (SB shares at a time, each a fixed tree),
    then the epilogue in fp32 (RESIDUAL r + sum; SWIGLU silu(gate) up, gate = row n, up = row
    F + n of the stacked matrix), one rounding to y's dtype. Resets the tile's counter to 0."""
    tl.store(cnt_ptr + g, 0)
    n = g * 256 + tl.arange(0, 256)
    sh = tl.arange(0, SB)
    acc = tl.zeros((256,), dtype=tl.float32)
    up = tl.zeros((256,), dtype=tl.float32)
    for s0 in range(0, SPLIT, SB):
        ms = (s0 + sh < SPLIT)[:, None]
        ptrs = part_ptr + (s0 + sh)[:, None] * NP + n[None, :]
        # .cg: read from L2, where the other programs' partials are (never a stale L1 line)
        acc += tl.sum(tl.load(ptrs, mask=ms, other=0.0, cache_modifier=".cg"), axis=0)
        if EPILOGUE == 2:
            up += tl.sum(tl.load(ptrs + F, mask=ms & (n < F)[None, :], other=0.0, cache_modifier=".cg"), axis=0)
    store_epilogue(y_ptr, r_ptr, n, acc, up, N, F, EPILOGUE)


@triton.jit
def store_epilogue(y_ptr, r_ptr, n, acc, up, N, F, EPILOGUE: tl.constexpr):
    """y[n] from the fp32 sums acc (rows n) and, for SWIGLU, up (rows F + n): NONE acc, n < N;
    RESIDUAL r[n] + acc, n < N; SWIGLU silu(acc) * up, n < F. One rounding to y's dtype. Both
    finishes (the fused one here, gemv._reduce_kernel) end with it. Returns the stored values
    (y's dtype; masked lanes hold garbage)."""
    if EPILOGUE == 2:
        out = (acc / (1.0 + tl.exp(-acc)) * up).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + n, out, mask=n < F)
    else:
        if EPILOGUE == 1:
            acc += tl.load(r_ptr + n, mask=n < N, other=0.0).to(tl.float32)
        out = acc.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + n, out, mask=n < N)
    return out


@triton.jit
def _arrive(part_ptr, y_ptr, r_ptr, cnt_ptr, g, ok, target, N, F, NP, SPLIT, EPILOGUE: tl.constexpr,
            SB: tl.constexpr):
    """One arrival at output tile g (if ok); the arrival that makes `target` finishes the tile.
    The atomic is acq_rel at GPU scope, after a barrier: this program's partial stores are
    visible to whoever finishes, and the finisher sees every other program's."""
    ticket = tl.atomic_add(cnt_ptr + g, 1, mask=ok, sem="acq_rel", scope="gpu")
    if ok & (ticket == target - 1):
        tl.debug_barrier()
        _finish_tile(part_ptr, y_ptr, r_ptr, cnt_ptr, g, N, F, NP, SPLIT, EPILOGUE, SB)


@triton.jit
def _tile_rows(g, F):
    """SwiGLU tile g: how many distinct superblock rows hold its gate and up rows."""
    b1 = (F + 256 * g) // 256
    b2 = (F + tl.minimum(256 * g + 255, F - 1)) // 256
    return 1 + (b1 != g).to(tl.int32) + (b2 != b1).to(tl.int32)


@triton.jit
def _zigzag_mma_kernel(q_ptr, h_ptr, x_ptr, t_ptr, idx_ptr, count_ptr, part_ptr, y_ptr, r_ptr, cnt_ptr, N, F, K,
                       NP, SPLIT, MODE: tl.constexpr, BTYPE: tl.constexpr, ASMS: tl.constexpr,
                       EMULATE: tl.constexpr, W: tl.constexpr, CHUNKS: tl.constexpr, EPILOGUE: tl.constexpr,
                       SB: tl.constexpr, SCALE_LO: tl.constexpr, SCALE_HI: tl.constexpr, PDL: tl.constexpr,
                       FUSED: tl.constexpr, AHEAD: tl.constexpr = 0, ACC: tl.constexpr = 16,
                       PIPE: tl.constexpr = 0):
    """Program (r, s): superblock row r, share s of its columns -> part[s, 256 r : 256 r + 256]
    (fp32); FUSED: the last program to finish an output tile sums its partials into y
    (_finish_tile), else a second kernel does (gemv._reduce_kernel, the default: gemv.py says why).

    Shares. B2 / B3: s takes a contiguous range of columns. B4: s takes the list's steps s,
    s + SPLIT, ... (a step = CHUNKS chunks per warp): its first list entries are read at once,
    together with the count, not after it; the next step's entries are read ahead, at the top
    of the current step. Warp w takes chunk w (CHUNKS of them) of each step; the loads of a
    step are issued at its top and used right after; the other warps on the SM hide the latency.
    AHEAD (B2 / B4): each step first asks L2 for the blocks of the step AHEAD steps on, one column
    a lane (B4: list entries read a step earlier), so that its loads find them there (H100,
    B2 28672x8192: 56.6 us without, 53.6 with AHEAD 1; benchmarks/results/ahead-probe-h100.txt).
    (H100, 28672x8192, B2 / B4 at 50 %: plain loads 55.8 / 39.6 us; the next chunk prefetched in
    registers 55.3 / 46.3 us; 2-4 cp.async stages through shared memory 76.7-80.0 / 50.2-60.4 us.)

    PDL (programmatic dependent launch, sm_90): the program may start while the kernel before it
    in the stream finishes. Until griddepcontrol.wait it touches only the weights, which no kernel
    writes: B2 / B3 ask L2 for the blocks of their first 32 W columns; everything else (x, the
    count, the list, every store) comes after the wait."""
    r = tl.program_id(0)
    s = tl.program_id(1)
    STEP: tl.constexpr = CHUNK * W
    STEPS: tl.constexpr = STEP * CHUNKS
    lanes = tl.arange(0, 32 * W)  # 32 w + 4 g + t: dim 0 of every tensor, one row per thread
    gi = (lanes // 4) % 8
    li = tl.arange(0, 4)
    base = CHUNK * (lanes // 32) + 2 * (lanes % 4)  # slot 0's list position in the warp's chunk
    if MODE != 2:
        per = tl.cdiv(tl.cdiv(K, SPLIT), STEPS) * STEPS
        first = s * per
        stride = STEPS
        hi = tl.minimum(K, first + per)
    if PDL:
        if MODE != 2:
            _prefetch_l2(q_ptr, h_ptr, r, tl.minimum(first + lanes, K - 1), K)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    ahead_pos = lanes % STEPS  # AHEAD: lane i asks L2 for column i of a step (the blocks' lines)
    kp = ahead_pos  # B4 with AHEAD: the columns of the step AHEAD on (read from the list below)
    if MODE == 2:
        first = s * STEPS
        stride = SPLIT * STEPS
        ka0, ka1, ka2, ka3 = _chunk_columns(idx_ptr, first + base, K, MODE)
        if CHUNKS == 2:
            kb0, kb1, kb2, kb3 = _chunk_columns(idx_ptr, first + STEP + base, K, MODE)
        if AHEAD > 0:
            kp = _list_columns(idx_ptr, first + AHEAD * stride + ahead_pos, K)
        hi = tl.load(count_ptr)
    zero = tl.zeros((32 * W, 4), dtype=tl.float32)
    c0, c1, c2, c3, c4, c5, c6, c7 = zero, zero, zero, zero, zero, zero, zero, zero
    c8, c9, c10, c11, c12, c13, c14, c15 = zero, zero, zero, zero, zero, zero, zero, zero
    bias = tl.zeros((32 * W,), dtype=tl.float32)
    t = 0.0
    if MODE == 1:
        t = tl.load(t_ptr)
    if PIPE:
        # one step ahead in registers: step j + stride's loads are issued before step j's arithmetic
        # (the list entries of MODE 2 are then read two steps ahead)
        if MODE != 2:
            ka0, ka1, ka2, ka3 = _chunk_columns(idx_ptr, first + base, K, MODE)
        wa0, hla0, hha0, xa0, wa1, hla1, hha1, xa1, wa2, hla2, hha2, xa2, wa3, hla3, hha3, xa3 = _chunk_loads(
            q_ptr, h_ptr, x_ptr, t, r, ka0, ka1, ka2, ka3, first + base, hi, K, gi, li, MODE)
        if MODE == 2:
            ka0, ka1, ka2, ka3 = _chunk_columns(idx_ptr, first + stride + base, K, MODE)
        for j in range(first, hi, stride):
            pn = j + stride + base
            if AHEAD > 0 and MODE != 1:
                kp = _prefetch_ahead(q_ptr, h_ptr, idx_ptr, r, kp, j, stride, hi, ahead_pos, K, MODE, AHEAD)
            if MODE != 2:
                ka0, ka1, ka2, ka3 = _chunk_columns(idx_ptr, pn, K, MODE)
            wb0, hlb0, hhb0, xb0, wb1, hlb1, hhb1, xb1, wb2, hlb2, hhb2, xb2, wb3, hlb3, hhb3, xb3 = _chunk_loads(
                q_ptr, h_ptr, x_ptr, t, r, ka0, ka1, ka2, ka3, pn, hi, K, gi, li, MODE)
            if MODE == 2:
                ka0, ka1, ka2, ka3 = _chunk_columns(idx_ptr, pn + stride, K, MODE)
            c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15, bias = _chunk(
                c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15, bias,
                wa0, hla0, hha0, xa0, wa1, hla1, hha1, xa1, wa2, hla2, hha2, xa2, wa3, hla3,
                hha3, xa3, gi, ASMS, BTYPE, EMULATE, W, ACC)
            wa0, hla0, hha0, xa0, wa1, hla1, hha1, xa1 = wb0, hlb0, hhb0, xb0, wb1, hlb1, hhb1, xb1
            wa2, hla2, hha2, xa2, wa3, hla3, hha3, xa3 = wb2, hlb2, hhb2, xb2, wb3, hlb3, hhb3, xb3
    else:
        for j in range(first, hi, stride):
            pa = j + base
            if AHEAD > 0 and MODE != 1:
                kp = _prefetch_ahead(q_ptr, h_ptr, idx_ptr, r, kp, j, stride, hi, ahead_pos, K, MODE, AHEAD)
            if MODE != 2:
                ka0, ka1, ka2, ka3 = _chunk_columns(idx_ptr, pa, K, MODE)
            wa0, hla0, hha0, xa0, wa1, hla1, hha1, xa1, wa2, hla2, hha2, xa2, wa3, hla3, hha3, xa3 = _chunk_loads(
                q_ptr, h_ptr, x_ptr, t, r, ka0, ka1, ka2, ka3, pa, hi, K, gi, li, MODE)
            if CHUNKS == 2:
                if MODE != 2:
                    kb0, kb1, kb2, kb3 = _chunk_columns(idx_ptr, pa + STEP, K, MODE)
                wb0, hlb0, hhb0, xb0, wb1, hlb1, hhb1, xb1, wb2, hlb2, hhb2, xb2, wb3, hlb3, hhb3, xb3 = _chunk_loads(
                    q_ptr, h_ptr, x_ptr, t, r, kb0, kb1, kb2, kb3, pa + STEP, hi, K, gi, li, MODE)
            if MODE == 2:  # the next step's list entries, read ahead
                ka0, ka1, ka2, ka3 = _chunk_columns(idx_ptr, pa + stride, K, MODE)
                if CHUNKS == 2:
                    kb0, kb1, kb2, kb3 = _chunk_columns(idx_ptr, pa + stride + STEP, K, MODE)
            c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15, bias = _chunk(
                c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15, bias,
                wa0, hla0, hha0, xa0, wa1, hla1, hha1, xa1, wa2, hla2, hha2, xa2, wa3, hla3, hha3,
                xa3, gi, ASMS, BTYPE, EMULATE, W, ACC)
            if CHUNKS == 2:
                c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15, bias = _chunk(
                    c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15, bias,
                    wb0, hlb0, hhb0, xb0, wb1, hlb1, hhb1, xb1, wb2, hlb2, hhb2, xb2, wb3, hlb3,
                    hhb3, xb3, gi, ASMS, BTYPE, EMULATE, W, ACC)
    bj = tl.sum(tl.sum(tl.reshape(bias, (W, 8, 4)), axis=0), axis=1)  # (8,) the min term of sub-block j
    if ACC == 16:
        v0 = _quarter(c0, c4, c8, c12, bj, 0, SCALE_LO, SCALE_HI, W)
        v1 = _quarter(c1, c5, c9, c13, bj, 1, SCALE_LO, SCALE_HI, W)
        v2 = _quarter(c2, c6, c10, c14, bj, 2, SCALE_LO, SCALE_HI, W)
        v3 = _quarter(c3, c7, c11, c15, bj, 3, SCALE_LO, SCALE_HI, W)
    else:
        v0 = _quarter(c0, c0, c0, c0, bj, 0, SCALE_LO, SCALE_HI, W)
        v1 = _quarter(c1, c1, c1, c1, bj, 1, SCALE_LO, SCALE_HI, W)
        if ACC == 4:
            v2 = _quarter(c2, c2, c2, c2, bj, 2, SCALE_LO, SCALE_HI, W)
            v3 = _quarter(c3, c3, c3, c3, bj, 3, SCALE_LO, SCALE_HI, W)
        else:
            v2 = _quarter(c0, c0, c0, c0, bj, 2, SCALE_LO, SCALE_HI, W)
            v3 = _quarter(c1, c1, c1, c1, bj, 3, SCALE_LO, SCALE_HI, W)
    # one sum over the warps for all 8 values of a lane, then one store of the 256 rows;
    # value i = 4 h + 2 a + b of lane (g, t) is tile 4 t + MQ (MQ = a + 2 b), row 8 h + g of it
    vals = tl.sum(tl.reshape(tl.join(tl.join(v0, v1), tl.join(v2, v3)), (W, 32, 8)), axis=0)
    lane = tl.arange(0, 32)[:, None]
    i = tl.arange(0, 8)[None, :]
    rows = 16 * (4 * (lane % 4) + (i // 2) % 2 + 2 * (i % 2)) + 8 * (i // 4) + lane // 4
    tl.store(part_ptr + s * NP + r * 256 + rows, vals)
    if not FUSED:
        return
    tl.debug_barrier()  # every thread's partials are stored before the arrival is released
    if EPILOGUE == 2:
        # Tile g (gate rows 256 g ..., up rows F + 256 g ...) waits for the superblock rows holding
        # them: row r is gate row g = r (256 r < F) and holds up rows of tiles u // 256 and
        # (u + 255) // 256, u = 256 r - F (one tile when F is a multiple of 256).
        G = tl.cdiv(F, 256)
        u = 256 * r - F + 256 * G  # shifted by 256 G so that the floor division is of a non-negative
        g1 = u // 256 - G
        g2 = (u + 255) // 256 - G
        _arrive(part_ptr, y_ptr, r_ptr, cnt_ptr, r, 256 * r < F, SPLIT * _tile_rows(r, F), N, F, NP, SPLIT,
                EPILOGUE, SB)
        _arrive(part_ptr, y_ptr, r_ptr, cnt_ptr, g1, (g1 >= 0) & (g1 < G) & (g1 != r), SPLIT * _tile_rows(g1, F),
                N, F, NP, SPLIT, EPILOGUE, SB)
        _arrive(part_ptr, y_ptr, r_ptr, cnt_ptr, g2, (g2 >= 0) & (g2 < G) & (g2 != g1) & (g2 != r),
                SPLIT * _tile_rows(g2, F), N, F, NP, SPLIT, EPILOGUE, SB)
    else:
        _arrive(part_ptr, y_ptr, r_ptr, cnt_ptr, r, r >= 0, SPLIT, N, F, NP, SPLIT, EPILOGUE, SB)


def btype_for(dtype: torch.dtype) -> int:
    return {torch.float16: BTYPE_FP16, torch.bfloat16: BTYPE_BF16, torch.float32: BTYPE_BF16X3}[dtype]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


def uses_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch for the kernels on this device: compiled GPU code on sm_90+
    (SPQT_PDL=0 turns it off, for comparisons)."""
    if device.type != "cuda" or interpreting() or os.environ.get("SPQT_PDL", "1") == "0":
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device())[0] >= 9


def compile_sm90(num_warps: int, mode: int = MODE_DENSE, dtype: str = "fp16", chunks: int = 1, epilogue: int = 0,
                 pdl: bool = True, fused: bool = True, maxnreg: int = 0, ahead: int = 0, acc: int = 16,
                 pipe: int = 0):
    """The kernel compiled for Hopper here, without a GPU (Triton's bundled ptxas): the compiled
    object, with .asm["ttgir"], ["ptx"], ["cubin"]. For tests and scripts/sass_report.py; needs
    TRITON_INTERPRET unset."""
    from spqt.kernels.sass import compile_sm90 as compile_for_sm90

    btype = {"fp16": BTYPE_FP16, "bf16": BTYPE_BF16, "fp32": BTYPE_BF16X3}[dtype]
    sig = {"q_ptr": "*i32", "h_ptr": "*i64", "x_ptr": f"*{dtype}", "t_ptr": "*fp32", "idx_ptr": "*i32",
           "count_ptr": "*i32", "part_ptr": "*fp32", "y_ptr": f"*{dtype}", "r_ptr": f"*{dtype}", "cnt_ptr": "*i32",
           "N": "i32", "F": "i32", "K": "i32", "NP": "i32", "SPLIT": "i32"}
    const = {"MODE": mode, "BTYPE": btype, "ASMS": tile_asms(btype, acc), "EMULATE": False, "W": num_warps,
             "CHUNKS": chunks, "EPILOGUE": epilogue, "SB": reduce_block(num_warps),
             "SCALE_LO": ROW_SCALES[btype][0], "SCALE_HI": ROW_SCALES[btype][1], "PDL": pdl,
             "FUSED": fused, "AHEAD": ahead, "ACC": acc, "PIPE": pipe}
    sig.update({name: "constexpr" for name in const})
    options = {"num_warps": num_warps} | ({"maxnreg": maxnreg} if maxnreg else {})
    return compile_for_sm90(_zigzag_mma_kernel, sig, const, 10, options)


def reduce_block(num_warps: int) -> int:
    """Shares summed per step when a tile is finished: (SB, 256) fp32, 64 registers a thread."""
    return 8 * num_warps


def launch(quants, head64, x, threshold, idx, count, partials, y, residual, counters, n, k, np_, split, mode,
           num_warps, chunks, epilogue, fused, pdl, maxnreg=0, ahead=0, acc=16, pipe=0):
    """Grid (rows, split) of the tensor-core kernel: partials (split, NP) fp32 get every row;
    fused: y (N,) or (N / 2,) for SwiGLU the finished outputs, counters (rows,) int32, zero before
    and after; pdl: uses_pdl(x.device); maxnreg: registers per thread at most (0: the compiler's
    choice; fewer registers, more warps on an SM, more loads in flight); ahead: a step asks L2 for
    the blocks `ahead` steps on (0: none; not under the interpreter, which has no L2).
    quants (rows, PLANES, K, 32 / PLANES) int32 in the zigzag kernel layout, head64 (ceil(rows / 4), K, 4, 2) int64
    (gpu_layout.group_heads)."""
    btype = btype_for(x.dtype)
    emulate = interpreting()
    lo, hi = (1.0, 1.0) if emulate else ROW_SCALES[btype]
    _zigzag_mma_kernel[(quants.shape[0], split)](
        quants, head64, x, threshold, idx, count, partials, y, residual, counters, n, n // 2, k, np_, split,
        MODE=mode, BTYPE=btype, ASMS=tile_asms(btype, acc), EMULATE=emulate, W=num_warps, CHUNKS=chunks,
        EPILOGUE=epilogue, SB=reduce_block(num_warps), SCALE_LO=lo, SCALE_HI=hi, PDL=pdl, FUSED=fused,
        AHEAD=0 if emulate else ahead, ACC=acc, PIPE=pipe, num_warps=num_warps, launch_pdl=pdl, maxnreg=maxnreg or None)
