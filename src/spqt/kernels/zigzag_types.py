"""Zigzag GEMV for one token on Q8_0, Q6_K, Q5_K, Q3_K and Q2_K weights: B2 (dense) and B4
(load-balanced sparse, driven by collect()'s active-index list), in plain Triton.

Structure of the Q4_K kernel (zigzag_mma.py), without its tensor cores: program (g, s) takes
the outputs of row group g (one 256-row block row for the K-quants; `rows` 32-row block rows
for Q8_0, 8 by default = 256 outputs) and share s of the columns, and writes fp32 partial sums
into part[s, outputs] of a (split, NP) workspace; gemv._reduce_kernel then adds the split
partials in a fixed order (deterministic) and applies the epilogue (none, residual, SwiGLU).
Shares: B2 takes a contiguous range of columns; B4 takes the list's steps s, s + split, ...
(a step = block_k list positions), so every share gets the same number of active columns
whatever their place in the matrix. A position past the share's end (B2) or past the count
(B4) reads column 0's blocks against x = 0: weight loads carry no mask.

Decoding (these kernels are bound by instructions per weight, not by bytes: issue 15): a lane takes one
piece a step, 16 level bytes of one column's block (one 16-byte load) with the bits and scales
that go with them (Q8_0 half a block; Q6_K two 16-weight sub-blocks; Q5_K one 32-weight
sub-block; Q3_K and Q2_K four 16-weight sub-blocks; layouts in gpu_layout_types.py), and keeps one
fp32 accumulator per weight slot and column: every product is one FFMA, no shuffles, no layout
conversion (the column sum of a program is taken once, at the end). A level becomes fp32 without
an int->float conversion (I2F runs at a quarter of the rate): its bits are merged where the
layout put them (one LOP3 per 4-8 weights: Q6_K's top 2 bits, Q5_K's fifth, Q3_K's third bit
next to the low bits), then one AND-OR (AND-XOR for Q8_0's signed bytes) puts the field, in
place, into the mantissa of the power of two whose mantissa bit there is worth 1, and one
subtraction removes that power and the level offset (exact). Q5_K and Q2_K sum their min term
x dmin m per sub-block and subtract it once at the end. sm_90 SASS, main loop per weight (B2, default
configs; before: 3.9 Q8_0, 13.0 Q6_K, 28.7 Q5_K, 26.2 Q3_K, 16.7 Q2_K): 4.5, 5.1, 5.5, 4.7, 4.4
(scripts/types_sass.py). Constants the AND-ORs need are derived from the kernel argument magic
(0x4B000000) so that they stay in registers: a LOP3 takes one immediate.
Products and sums in fp32, the same products as before (level x (sc (x d))); each program
adds its columns in a fixed order (deterministic).

x is (K,) fp16/bf16/fp32 and y x's dtype; every product and sum is in fp32.
Not tuned: the defaults (tuning.default_config, variants "zigzag_dense_<type>" and
"zigzag_sparse_<type>") have not been timed on a GPU.
"""

import torch
import triton
import triton.language as tl

from spqt.kernels import gemv as kg
from spqt.kernels.gpu_layout_types import Q8_ROW_GROUP, TYPES, GpuZigzag, dequantize_kernel_layout
from spqt.kernels.q4k_bits import MAGIC, half_to_float, small_to_float, split_head, unpack_scales
from spqt.kernels.zigzag_mma import uses_pdl

MODE_DENSE, MODE_INDEXED = kg.MODE_DENSE, kg.MODE_INDEXED  # B2, B4


@triton.jit
def _start(SPLIT, K, count_ptr, MODE: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Every GEMV program's start: (its row group, its share s, first position, step between
    positions, end). PDL: launched while the kernel before it finishes, so x, the list and the
    count are read only after the wait. Shares: B2 a contiguous column range, B4 the list steps
    s, s + SPLIT, ... up to the count."""
    g = tl.program_id(0)
    s = tl.program_id(1)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if MODE == 2:
        first = s * BLOCK_K
        stride = SPLIT * BLOCK_K
        hi = tl.load(count_ptr)
    else:
        per = tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K
        first = s * per
        stride = BLOCK_K
        hi = tl.minimum(K, first + per)
    return g, s, first, stride, hi


@triton.jit
def _columns(idx_ptr, x_ptr, pos, hi, K, MODE: tl.constexpr):
    """The columns at positions pos (BLOCK_K,) and x there in fp32. B4 reads the list (the
    position clamped into [0, K): entries past the count were never written). A position >= hi
    is column 0 with x = 0."""
    ok = pos < hi
    if MODE == 2:
        col = tl.load(idx_ptr + tl.minimum(pos, K - 1))
        col = tl.where(ok & (col >= 0) & (col < K), col, 0)
    else:
        col = tl.where(ok, pos, 0)
    x = tl.load(x_ptr + col, mask=ok, other=0.0).to(tl.float32)
    return col, x


@triton.jit
def _q8_0_step(q_ptr, d_ptr, blk, x, c):
    """Blocks blk (BLOCK_K, 2 RB) (each block row twice: a lane takes half a block, 16 level
    bytes), x (BLOCK_K, 1) -> the products level x d (BLOCK_K, 2 RB, 2, 2, 2, 2), slots as
    _q8_0_in_rows."""
    half = tl.arange(0, blk.shape[1])[None, :] % 2
    lo = tl.load(q_ptr + (blk * 8 + 4 * half)[:, :, None] + tl.arange(0, 4)[None, None, :])  # (BLOCK_K, 2 RB, 4)
    f = x * tl.load(d_ptr + blk).to(tl.float32)
    return _fields(tl.reshape(lo, (lo.shape[0], lo.shape[1], 2, 2)), c, 4) * _repeat(f, 16)


@triton.jit
def _q8_0_in_rows(v):
    """(n, 2 RB, 2, 2, 2, 2) from _q8_0_step -> (n, 32 RB) in row order: byte 4 w + m of half h of
    block row i is at lane q = 2 i + h; word w = 2 a + b ([a, b] = the reshape), m = i1 + 2 i2."""
    return tl.reshape(tl.permute(v, (0, 1, 2, 3, 5, 4)), (v.shape[0], 16 * v.shape[1]))


@triton.jit
def _q8_0_kernel(q_ptr, d_ptr, x_ptr, idx_ptr, count_ptr, part_ptr, K, NP, SPLIT, magic, MODE: tl.constexpr,
                RB: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Program (g, s): block rows RB g .. RB g + RB - 1 (32 outputs each), share s of the columns
    -> part[s, 32 RB g : 32 RB (g + 1)]. q_ptr: the levels as int32 words (R8, K, 8)."""
    g, s, first, stride, hi = _start(SPLIT, K, count_ptr, MODE, BLOCK_K, PDL)
    rb = g * RB + tl.arange(0, 2 * RB)[None, :] // 2  # (1, 2 RB): a lane's block row
    c = _field_consts(tl.zeros((1, 1, 1, 1), tl.int32), 4, 8, 8, 2, 16, magic, 0.0, 128)
    # one accumulator per slot and column: Triton spreads the columns over lanes, so a sum over them
    # each step would be shuffles; summed once at the end
    acc = tl.zeros((BLOCK_K, 2 * RB, 2, 2, 2, 2), dtype=tl.float32)
    for j in range(first, hi, stride):
        col, x = _columns(idx_ptr, x_ptr, j + tl.arange(0, BLOCK_K)[:, None], hi, K, MODE)
        acc += _q8_0_step(q_ptr, d_ptr, rb * K + col, x, c)
    tl.store(part_ptr + s * NP + g * RB * 32 + tl.arange(0, 32 * RB)[None, :],
             _q8_0_in_rows(tl.sum(acc, axis=0, keep_dims=True)))


@triton.jit
def _in_register(VALUE: tl.constexpr, magic):
    """VALUE computed from the kernel argument magic (= 0x4B000000), so that the compiler keeps it
    in a register: a LOP3 takes one immediate, and a mask that is a literal next to another literal
    (or its own complement) costs a second LOP3."""
    return magic + (VALUE - 0x4B000000)


@triton.jit
def _select(a, b, mask):
    """Bits of a under mask, of b elsewhere (mask in a register: one LOP3)."""
    return b ^ ((a ^ b) & mask)


@triton.jit
def _join4(a, b, c, d):
    """Four tensors of one shape -> one with two more (in-thread) dimensions of 2: [..., i, j] is
    (a, b, c, d)[2 j + i]."""
    return tl.join(tl.join(a, b), tl.join(c, d))


@triton.jit
def _count(v, STEP: tl.constexpr, N: tl.constexpr):
    """v + STEP n for n < N (2, 4, 8 or 16) in log2 N trailing dimensions of 2, n = i1 + 2 i2 +
    4 i3 + 8 i4 at [..., i1, i2, i3, i4] (the order of _join4 and of joins of _join4s)."""
    r = tl.join(v, v + STEP)
    if N >= 4:
        r = tl.join(r, r + 2 * STEP)
    if N >= 8:
        r = tl.join(r, r + 4 * STEP)
    if N >= 16:
        r = tl.join(r, r + 8 * STEP)
    return r


@triton.jit
def _repeat(v, N: tl.constexpr):
    """v repeated into N (2-16) slots, log2 N trailing dimensions of 2, by joins: the layout of the
    decoded levels (expand_dims + broadcast can cost a layout conversion through shared memory)."""
    r = tl.join(v, v)
    if N >= 4:
        r = tl.join(r, r)
    if N >= 8:
        r = tl.join(r, r)
    if N >= 16:
        r = tl.join(r, r)
    return r


@triton.jit
def _field_consts(z, N: tl.constexpr, WIDTH: tl.constexpr, STRIDE: tl.constexpr, SPLIT: tl.constexpr,
                  SHIFT: tl.constexpr, magic, OFFSET: tl.constexpr, SIGN: tl.constexpr):
    """The constants of _fields for words of z's rank (int32 zeros (1, ...)): N fields of WIDTH bits
    at bits STRIDE n of a word, those from SPLIT on read from the word >> SHIFT (a field must end
    below bit 23); per slot (log2 N trailing dimensions of 2, as _count) the shift, the mask, the
    word to XOR in (SIGN: the sign bit of a signed field, flipped) and the value to subtract."""
    n = _count(z, 1, N)
    shift = tl.where(n < SPLIT, 0, SHIFT)
    pos = STRIDE * n - shift
    mag = magic - (pos << 23)  # 2^(23 - pos): its mantissa bit pos is worth 1
    # an add, not an OR: LLVM would fold an OR into the AND-XOR as a second immediate
    flip = mag + (SIGN << pos)
    # the subtrahend from literals (an FADD immediate: no register), the AND-XOR's word from magic
    sub = (0x4B000000 - (pos << 23)).to(tl.float32, bitcast=True) + (OFFSET + SIGN)
    return shift, ((1 << WIDTH) - 1) << pos, flip, sub


@triton.jit
def _fields(t, c, N: tl.constexpr):
    """int32 words t (...) -> their N fields as exact float32 minus the offset, (..., 2, ...) with
    log2 N dimensions of 2 (c = _field_consts), without an int->float conversion: one AND-XOR (LOP3)
    puts a field where it is into the mantissa of 2^(23 - pos), one subtraction removes that power
    of two and the offset (the fields past SPLIT after one shift a word: LLVM keeps one t >> SHIFT)."""
    shift, mask, flip, sub = c
    return (((_repeat(t, N) >> shift) & mask) ^ flip).to(tl.float32, bitcast=True) - sub


@triton.jit
def _q6_k_sub(la, lb, hw, f, nib, c):
    """One 16-weight sub-block (kernel layout, gpu_layout_types) -> its products (level - 32) f,
    (..., 2, 2, 2, 2), slots as _q6_k_in_rows: the low nibbles of words la, lb and the top bits
    of hw merged into one byte a weight (one LOP3 per 4 weights; bits 6-7 left over, masked later)."""
    t = _select(_join4(la, la >> 4, lb, lb >> 4), _join4(hw, hw >> 2, hw << 4, hw << 2), nib)
    return _fields(t, c, 4) * f[:, :, None, None, None, None]


@triton.jit
def _q6_k_step(q_ptr, hb_ptr, sc_ptr, d_ptr, blk, x, nib, c):
    """Blocks blk (BLOCK_K, 1), x (BLOCK_K, 1): a lane takes piece p (sub-blocks 2p, 2p + 1: 16
    level bytes, 8 top-bit bytes, 2 scales) of one column -> the products (BLOCK_K, 8, 2, 2, 2, 2,
    2), slots as _q6_k_in_rows."""
    p = tl.arange(0, 8)[None, :]
    lo = tl.load(q_ptr + (blk * 32 + 4 * p)[:, :, None] + tl.arange(0, 4)[None, None, :])  # (BLOCK_K, 8, 4)
    hw = tl.load(hb_ptr + (blk * 16 + 2 * p)[:, :, None] + tl.arange(0, 2)[None, None, :])  # (BLOCK_K, 8, 2)
    sc = tl.load(sc_ptr + (blk * 16 + 2 * p)[:, :, None] + tl.arange(0, 2)[None, None, :]).to(tl.float32)
    xd = x * tl.load(d_ptr + blk).to(tl.float32)
    la, lb = tl.split(tl.reshape(lo, (lo.shape[0], 8, 2, 2)))  # words 0, 2 and 1, 3
    la0, la1 = tl.split(la)
    lb0, lb1 = tl.split(lb)
    h0, h1 = tl.split(hw)
    s0, s1 = tl.split(sc)
    return tl.join(_q6_k_sub(la0, lb0, h0, s0 * xd, nib, c), _q6_k_sub(la1, lb1, h1, s1 * xd, nib, c))


@triton.jit
def _q6_k_in_rows(v):
    """(n, 8, 2, 2, 2, 2, 2) from _q6_k_step -> (n, 256) in row order: weight 4 j + m of sub-block
    2 p + h at [p, j % 2, j // 2, m % 2, m // 2, h] (_fields on the joined words, then the halves)."""
    return tl.reshape(tl.permute(v, (0, 1, 6, 3, 2, 5, 4)), (v.shape[0], 256))


@triton.jit
def _q6_k_kernel(q_ptr, hb_ptr, sc_ptr, d_ptr, x_ptr, idx_ptr, count_ptr, part_ptr, K, NP, SPLIT, magic,
                 MODE: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Program (r, s): block row r (256 outputs), share s -> part[s, 256 r : 256 r + 256]."""
    r, s, first, stride, hi = _start(SPLIT, K, count_ptr, MODE, BLOCK_K, PDL)
    acc = tl.zeros((BLOCK_K, 8, 2, 2, 2, 2, 2), dtype=tl.float32)
    nib = _in_register(0x0F0F0F0F, magic)
    c = _field_consts(tl.zeros((1, 1, 1, 1), tl.int32), 4, 6, 8, 3, 16, magic, 32.0, 0)
    for j in range(first, hi, stride):
        col, x = _columns(idx_ptr, x_ptr, j + tl.arange(0, BLOCK_K)[:, None], hi, K, MODE)
        acc += _q6_k_step(q_ptr, hb_ptr, sc_ptr, d_ptr, r * K + col, x, nib, c)
    y = _q6_k_in_rows(tl.sum(acc, axis=0, keep_dims=True))
    tl.store(part_ptr + s * NP + r * 256 + tl.arange(0, 256)[None, :], y)


@triton.jit
def _q5_k_step(q_ptr, hb_ptr, h_ptr, blk, x, nib, c):
    """Blocks blk (BLOCK_K, 1), x (BLOCK_K, 1): a lane takes piece p = sub-block p (16 level
    bytes, its 4 fifth-bit bytes, the block's 16-byte head) of one column -> the products level
    x d sc (BLOCK_K, 8, 2, 2, 2, 2, 2), slots as _q5_k_in_rows, and x dmin m (BLOCK_K, 8)."""
    p = tl.arange(0, 8)[None, :]
    lo = tl.reshape(tl.load(q_ptr + blk * 32 + tl.arange(0, 32)[None, :]), (blk.shape[0], 8, 4))
    hw = tl.load(hb_ptr + blk * 8 + p)  # (BLOCK_K, 8)
    hlo, hhi = tl.split(tl.load(h_ptr + (blk * 2)[:, :, None] + tl.arange(0, 2)[None, None, :]))  # (BLOCK_K, 1)
    d, dmin, w1, w2, w3 = split_head(hlo, hhi)
    sc, mn = unpack_scales(w1, w2, w3, p)
    f = sc * (x * d)
    la, lb = tl.split(tl.reshape(lo, (lo.shape[0], 8, 2, 2)))  # words 0, 2 and 1, 3
    l0, l2 = tl.split(la)
    l1, l3 = tl.split(lb)
    # weight 4 j + m: low nibble at 8 m + 4 (j % 2) of word j // 2, fifth bit at 8 m + (j + 4) % 8 of hw
    # (moved to 8 m + 4, next to the nibble)
    f = _repeat(f, 4)  # as the slots of _fields
    v0 = _fields(_select(l0, hw, nib), c, 4) * f
    v1 = _fields(_select(l0 >> 4, hw >> 1, nib), c, 4) * f
    v2 = _fields(_select(l1, hw >> 2, nib), c, 4) * f
    v3 = _fields(_select(l1 >> 4, hw >> 3, nib), c, 4) * f
    v4 = _fields(_select(l2, hw << 4, nib), c, 4) * f
    v5 = _fields(_select(l2 >> 4, hw << 3, nib), c, 4) * f
    v6 = _fields(_select(l3, hw << 2, nib), c, 4) * f
    v7 = _fields(_select(l3 >> 4, hw << 1, nib), c, 4) * f
    return tl.join(_join4(v0, v1, v2, v3), _join4(v4, v5, v6, v7)), mn * (x * dmin)


@triton.jit
def _q5_k_in_rows(v):
    """(n, 8, 2, 2, 2, 2, 2) from _q5_k_step -> (n, 256) in row order: weight 4 j + m of sub-block
    p at [p, m % 2, m // 2, j % 2, (j // 2) % 2, j // 4] (_fields on each word, then the words joined)."""
    return tl.reshape(tl.permute(v, (0, 1, 6, 5, 4, 3, 2)), (v.shape[0], 256))


@triton.jit
def _q5_k_kernel(q_ptr, hb_ptr, h_ptr, x_ptr, idx_ptr, count_ptr, part_ptr, K, NP, SPLIT, magic,
                 MODE: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Program (r, s): block row r (256 outputs), share s -> part[s, 256 r : 256 r + 256]."""
    r, s, first, stride, hi = _start(SPLIT, K, count_ptr, MODE, BLOCK_K, PDL)
    acc = tl.zeros((BLOCK_K, 8, 2, 2, 2, 2, 2), dtype=tl.float32)
    bias = tl.zeros((BLOCK_K, 8), dtype=tl.float32)  # the min term x dmin m of each lane's sub-block
    nib = _in_register(0x0F0F0F0F, magic)
    c = _field_consts(tl.zeros((1, 1), tl.int32), 4, 5, 8, 3, 16, magic, 0.0, 0)
    for j in range(first, hi, stride):
        col, x = _columns(idx_ptr, x_ptr, j + tl.arange(0, BLOCK_K)[:, None], hi, K, MODE)
        w, mb = _q5_k_step(q_ptr, hb_ptr, h_ptr, r * K + col, x, nib, c)
        acc += w
        bias += mb
    y = tl.sum(acc, axis=0, keep_dims=True) - tl.sum(bias, axis=0, keep_dims=True)[:, :, None, None, None, None, None]
    tl.store(part_ptr + s * NP + r * 256 + tl.arange(0, 256)[None, :], _q5_k_in_rows(y))


@triton.jit
def _q3_k_scale(lo4, hi2):
    """A 6-bit scale from its low nibble and top 2 bits (int32, above them other bits) -> s - 32
    as float32 (exact, no int->float conversion)."""
    return (((lo4 & 15) | ((hi2 & 3) << 4)) | 0x4B000000).to(tl.float32, bitcast=True) - 8388640.0


@triton.jit
def _q3_k_step(q_ptr, hb_ptr, sc_ptr, d_ptr, blk, x, m33, c):
    """Blocks blk (BLOCK_K, 1), x (BLOCK_K, 1): a lane takes piece p (sub-blocks p, p + 4, p + 8,
    p + 12: 16 low-bit bytes, 8 third-bit bytes) of one column and the block's packed scales ->
    the products (level - 4) x d (s - 32) (BLOCK_K, 4, 2, 2, 2, 2, 2, 2), slots as _q3_k_in_rows."""
    p = tl.arange(0, 4)[None, :]
    lo = tl.load(q_ptr + (blk * 16 + 4 * p)[:, :, None] + tl.arange(0, 4)[None, None, :])  # (BLOCK_K, 4, 4)
    hw = tl.load(hb_ptr + (blk * 8 + 2 * p)[:, :, None] + tl.arange(0, 2)[None, None, :])  # (BLOCK_K, 4, 2)
    xd = x * tl.load(d_ptr + blk).to(tl.float32)
    # scale p + 4 i: low nibble i // 2 of byte p of word i % 2, top 2 bits at 2 i of byte p of word 2
    b0 = tl.load(sc_ptr + blk * 3) >> (8 * p)
    b1 = tl.load(sc_ptr + blk * 3 + 1) >> (8 * p)
    b2 = tl.load(sc_ptr + blk * 3 + 2) >> (8 * p)
    f = _join4(_q3_k_scale(b0, b2) * xd, _q3_k_scale(b1, b2 >> 2) * xd, _q3_k_scale(b0 >> 4, b2 >> 4) * xd,
               _q3_k_scale(b1 >> 4, b2 >> 6) * xd)
    la, lb = tl.split(tl.reshape(lo, (lo.shape[0], 4, 2, 2)))  # words 0, 2 and 1, 3
    l0, l2 = tl.split(la)
    l1, l3 = tl.split(lb)
    h0, h1 = tl.split(hw)
    # weight e of sub-block i: low bits at 2 e of word i; third bit (hw word i // 2) moved next to
    # them at 4 (e // 2) + 2: even e from words 0, 1, 2, 3, odd e from the words >> 2
    ll = _join4(l0, l1, l2, l3)
    t = tl.join(_select(ll, _join4(h0, h0 << 2, h1, h1 << 2), m33),
                _select(ll >> 2, _join4(h0 >> 1, h0 << 1, h1 >> 1, h1 << 1), m33))
    return _fields(t, c, 8) * _repeat(tl.join(f, f), 8)


@triton.jit
def _q3_k_in_rows(v):
    """(n, 4, 2, 2, 2, 2, 2, 2) from _q3_k_step -> (n, 256) in row order: weight 2 n' + e % 2 of
    sub-block p + 4 i at [p, i % 2, i // 2, e % 2, n' % 2, (n' // 2) % 2, n' // 4]."""
    return tl.reshape(tl.permute(v, (0, 3, 2, 1, 7, 6, 5, 4)), (v.shape[0], 256))


@triton.jit
def _q3_k_kernel(q_ptr, hb_ptr, sc_ptr, d_ptr, x_ptr, idx_ptr, count_ptr, part_ptr, K, NP, SPLIT, magic,
                 MODE: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Program (r, s): block row r (256 outputs), share s -> part[s, 256 r : 256 r + 256]."""
    r, s, first, stride, hi = _start(SPLIT, K, count_ptr, MODE, BLOCK_K, PDL)
    m33 = _in_register(0x33333333, magic)
    c = _field_consts(tl.zeros((1, 1, 1, 1, 1), tl.int32), 8, 3, 4, 6, 24, magic, 4.0, 0)
    acc = tl.zeros((BLOCK_K, 4, 2, 2, 2, 2, 2, 2), dtype=tl.float32)
    for j in range(first, hi, stride):
        col, x = _columns(idx_ptr, x_ptr, j + tl.arange(0, BLOCK_K)[:, None], hi, K, MODE)
        acc += _q3_k_step(q_ptr, hb_ptr, sc_ptr, d_ptr, r * K + col, x, m33, c)
    y = _q3_k_in_rows(tl.sum(acc, axis=0, keep_dims=True))
    tl.store(part_ptr + s * NP + r * 256 + tl.arange(0, 256)[None, :], y)


@triton.jit
def _q2_k_step(q_ptr, sc_ptr, dd_ptr, blk, x, c):
    """Blocks blk (BLOCK_K, 1), x (BLOCK_K, 1): a lane takes piece p (sub-blocks 4p .. 4p + 3: 16
    level bytes, 4 scale bytes) of one column -> the products level x d sc (BLOCK_K, 4, 2, 2, 2, 2,
    2, 2), slots as _q2_k_in_rows, and x dmin m (BLOCK_K, 4, 2, 2)."""
    p = tl.arange(0, 4)[None, :]
    lo = tl.load(q_ptr + (blk * 16 + 4 * p)[:, :, None] + tl.arange(0, 4)[None, None, :])  # (BLOCK_K, 4, 4)
    sm = tl.load(sc_ptr + (blk * 16 + 4 * p)[:, :, None] + tl.arange(0, 4)[None, None, :]).to(tl.int32)
    dd = tl.load(dd_ptr + blk)
    d = half_to_float(dd)
    dmin = half_to_float(dd >> 16)
    lo = tl.reshape(lo, (lo.shape[0], 4, 2, 2))  # word 2 a + b of the piece at [a, b]
    sm = tl.reshape(sm, (sm.shape[0], 4, 2, 2))
    xd = (x * d)[:, :, None, None]
    f = small_to_float(sm & 15) * xd
    return (_fields(lo, c, 16) * _repeat(f, 16),
            small_to_float(sm >> 4) * (x * dmin)[:, :, None, None])


@triton.jit
def _q2_k_in_rows(v):
    """(n, 4, 2, 2, 2, 2, 2, 2) from _q2_k_step -> (n, 256) in row order: weight n' of sub-block
    4 p + 2 a + b at [p, a, b, n' % 2, (n' // 2) % 2, (n' // 4) % 2, n' // 8]."""
    return tl.reshape(tl.permute(v, (0, 1, 2, 3, 7, 6, 5, 4)), (v.shape[0], 256))


@triton.jit
def _q2_k_kernel(q_ptr, sc_ptr, dd_ptr, x_ptr, idx_ptr, count_ptr, part_ptr, K, NP, SPLIT, magic,
                 MODE: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Program (r, s): block row r (256 outputs), share s -> part[s, 256 r : 256 r + 256]."""
    r, s, first, stride, hi = _start(SPLIT, K, count_ptr, MODE, BLOCK_K, PDL)
    c = _field_consts(tl.zeros((1, 1, 1, 1), tl.int32), 16, 2, 2, 11, 22, magic, 0.0, 0)
    acc = tl.zeros((BLOCK_K, 4, 2, 2, 2, 2, 2, 2), dtype=tl.float32)
    bias = tl.zeros((BLOCK_K, 4, 2, 2), dtype=tl.float32)  # the min term x dmin m of each sub-block
    for j in range(first, hi, stride):
        col, x = _columns(idx_ptr, x_ptr, j + tl.arange(0, BLOCK_K)[:, None], hi, K, MODE)
        w, mb = _q2_k_step(q_ptr, sc_ptr, dd_ptr, r * K + col, x, c)
        acc += w
        bias += mb
    y = tl.sum(acc, axis=0, keep_dims=True) - _repeat(tl.sum(bias, axis=0, keep_dims=True), 16)
    tl.store(part_ptr + s * NP + r * 256 + tl.arange(0, 256)[None, :], _q2_k_in_rows(y))


@triton.jit
def _dequant_kernel(a_ptr, b_ptr, c_ptr, d_ptr, out_ptr, N, K, magic, FMT: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (r, b): block row r (Q8_0: 8 block rows), columns BLOCK_K b .. -> out (N, K)
    row-major in out's dtype; the GEMV's decode with x = 1 (each weight as its format's decode
    computes it: d sc exact in fp32, one rounding of the product). Arrays a..d: the type's, in
    the order of its GEMV kernel."""
    r = tl.program_id(0)
    col = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = col < K
    if FMT == 0:  # q8_0: 8 block rows of 32 (the levels as int32 words)
        rb = r * 8 + tl.arange(0, 16)[None, :] // 2
        cq = tl.where(ok, col, 0)[:, None]
        w = _q8_0_step(a_ptr, b_ptr, rb * K + cq, tl.full((BLOCK_K, 1), 1.0, tl.float32),
                       _field_consts(tl.zeros((1, 1, 1, 1), tl.int32), 4, 8, 8, 2, 16, magic, 0.0, 128))
        w = _q8_0_in_rows(w)
    elif FMT == 2:  # q5_k
        cq = tl.where(ok, col, 0)[:, None]
        w, mb = _q5_k_step(a_ptr, b_ptr, c_ptr, r * K + cq, tl.full((BLOCK_K, 1), 1.0, tl.float32),
                           _in_register(0x0F0F0F0F, magic),
                           _field_consts(tl.zeros((1, 1), tl.int32), 4, 5, 8, 3, 16, magic, 0.0, 0))
        w = w - mb[:, :, None, None, None, None, None]
        w = _q5_k_in_rows(w)
    elif FMT == 1:  # q6_k
        cq = tl.where(ok, col, 0)[:, None]
        w = _q6_k_step(a_ptr, b_ptr, c_ptr, d_ptr, r * K + cq, tl.full((BLOCK_K, 1), 1.0, tl.float32),
                       _in_register(0x0F0F0F0F, magic),
                       _field_consts(tl.zeros((1, 1, 1, 1), tl.int32), 4, 6, 8, 3, 16, magic, 32.0, 0))
        w = _q6_k_in_rows(w)
    elif FMT == 3:  # q3_k
        cq = tl.where(ok, col, 0)[:, None]
        w = _q3_k_step(a_ptr, b_ptr, c_ptr, d_ptr, r * K + cq, tl.full((BLOCK_K, 1), 1.0, tl.float32),
                       _in_register(0x33333333, magic),
                       _field_consts(tl.zeros((1, 1, 1, 1, 1), tl.int32), 8, 3, 4, 6, 24, magic, 4.0, 0))
        w = _q3_k_in_rows(w)
    else:  # q2_k
        cq = tl.where(ok, col, 0)[:, None]
        w, mb = _q2_k_step(a_ptr, b_ptr, c_ptr, r * K + cq, tl.full((BLOCK_K, 1), 1.0, tl.float32),
                           _field_consts(tl.zeros((1, 1, 1, 1), tl.int32), 16, 2, 2, 11, 22, magic, 0.0, 0))
        w = w - _repeat(mb, 16)
        w = _q2_k_in_rows(w)
    rows = 256 * r + tl.arange(0, 256)[None, :]  # (Q8_0: 8 block rows of 32)
    tl.store(out_ptr + rows * K + col[:, None], w.to(out_ptr.dtype.element_ty), mask=ok[:, None] & (rows < N))


# ---------------------------------------------------------------- launchers

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class TypesWorkspace:
    """Preallocated buffers of one matrix's GEMV (so that a decode step can be a CUDA graph):
    partials (split, NP) fp32, NP = the block rows' outputs; the index list and count; y."""

    def __init__(self, w: GpuZigzag, split: int, dtype: torch.dtype):
        n, k = w.shape
        if split < 1:
            raise ValueError(f"split must be at least 1, not {split}")
        dev = w.device
        self.split = split
        self.np = w.rows * w.block_size
        self.partials = torch.empty((split, self.np), dtype=torch.float32, device=dev)
        self.idx = torch.empty(k, dtype=torch.int32, device=dev)
        self.count = torch.empty((), dtype=torch.int32, device=dev)
        self.y = torch.empty(n, dtype=dtype, device=dev)


def _check(w: GpuZigzag, x: torch.Tensor, mode: int, ws: TypesWorkspace, idx, count, residual, swiglu,
           num_warps: int, block_k: int, rows: int) -> None:
    n, k = w.shape
    if w.fmt not in TYPES or w.layout != "zigzag":
        raise ValueError(f"zigzag_types runs zigzag {', '.join(TYPES)}, not {w.layout} {w.fmt}")
    if x.dim() != 1 or x.shape[0] != k:
        raise ValueError(f"GEMV takes one token: x must be ({k},), got {tuple(x.shape)}")
    if x.dtype not in _DTYPES or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous fp16/bf16/fp32 vector, got {x.dtype}")
    if x.device != w.device:
        raise ValueError("x and the weights must be on the same device")
    if ws.y.dtype != x.dtype:
        raise ValueError(f"workspace output is {ws.y.dtype}, x is {x.dtype}")
    if mode not in (MODE_DENSE, MODE_INDEXED):
        raise ValueError(f"mode must be MODE_DENSE (B2) or MODE_INDEXED (B4), not {mode}")
    if mode == MODE_INDEXED and (idx is None or count is None or idx.numel() < k):
        raise ValueError(f"B4 needs idx (K = {k} entries) and count from collect()")
    if num_warps not in (1, 2, 4, 8) or block_k not in (8, 16, 32, 64) or rows not in (1, 2, 4, 8):
        raise ValueError(f"num_warps must be 1-8, block_k 8-64 and rows 1-8 (powers of two), not {num_warps}, "
                         f"{block_k}, {rows}")
    if residual is not None and (residual.shape != (n,) or residual.dtype != x.dtype or not residual.is_contiguous()):
        raise ValueError(f"the residual must be a contiguous ({n},) {x.dtype} vector")
    if swiglu and (n % 2 or residual is not None):
        raise ValueError("swiglu needs an even N (gate|up stacked) and no residual")


def gemv(w: GpuZigzag, x: torch.Tensor, mode: int, ws: TypesWorkspace, num_warps: int = 4, block_k: int = 16,
         rows: int = Q8_ROW_GROUP, idx: torch.Tensor | None = None, count: torch.Tensor | None = None,
         residual: torch.Tensor | None = None, swiglu: bool = False) -> torch.Tensor:
    """B2 (MODE_DENSE) or B4 (MODE_INDEXED: idx, count from collect) of a zigzag Q8_0, Q6_K,
    Q5_K, Q3_K or Q2_K matrix. num_warps, block_k (columns a step), rows (Q8_0: 32-row block rows a program)
    and ws.split: the launch config. Returns ws.y (N,) in x's dtype (overwritten by the next call
    on this workspace); residual (N,) -> residual + W x; swiglu (W = gate|up stacked) ->
    silu(gate) * up, a view ws.y[:N / 2]."""
    _check(w, x, mode, ws, idx, count, residual, swiglu, num_warps, block_k, rows)
    n, k = w.shape
    pdl = uses_pdl(x.device)
    idx = idx if idx is not None else ws.idx
    count = count if count is not None else ws.count
    common = dict(magic=MAGIC, MODE=mode, BLOCK_K=block_k, PDL=pdl, num_warps=num_warps, launch_pdl=pdl)
    if w.fmt == "q8_0":
        _q8_0_kernel[(w.rows // rows, ws.split)](w.quants.view(torch.int32), w.d, x, idx, count, ws.partials, k, ws.np,
                                                 ws.split, RB=rows, **common)
    elif w.fmt == "q6_k":
        _q6_k_kernel[(w.rows, ws.split)](w.quants, w.high, w.scales, w.d, x, idx, count, ws.partials, k, ws.np,
                                         ws.split, **common)
    elif w.fmt == "q3_k":
        _q3_k_kernel[(w.rows, ws.split)](w.quants, w.high, w.scales, w.d, x, idx, count, ws.partials, k, ws.np,
                                         ws.split, **common)
    elif w.fmt == "q2_k":
        _q2_k_kernel[(w.rows, ws.split)](w.quants, w.scales, w.d, x, idx, count, ws.partials, k, ws.np, ws.split,
                                         **common)
    else:
        _q5_k_kernel[(w.rows, ws.split)](w.quants, w.high, w.head.view(torch.int64), x, idx, count, ws.partials, k,
                                         ws.np, ws.split, **common)
    epilogue = kg.EPILOGUE_SWIGLU if swiglu else kg.EPILOGUE_RESIDUAL if residual is not None else kg.EPILOGUE_NONE
    kg.sum_shares(ws.partials, ws.y, n, ws.np, ws.split, epilogue, residual, pdl)
    return ws.y[: n // 2] if swiglu else ws.y


def gemv_twin(w: GpuZigzag, x: torch.Tensor, mode: int, idx: torch.Tensor | None = None,
              count: torch.Tensor | None = None, residual: torch.Tensor | None = None,
              swiglu: bool = False) -> torch.Tensor:
    """Torch twin of gemv: the same result from the kernel layout, in fp32 (any device). B4 uses
    the columns idx[:count] of x (the others count as zero)."""
    wf = dequantize_kernel_layout(w)
    xf = x.float()
    if mode == MODE_INDEXED:
        keep = torch.zeros_like(xf, dtype=torch.bool)
        keep[idx[: int(count)].long()] = True
        xf = torch.where(keep, xf, torch.zeros_like(xf))
    y = wf @ xf
    if swiglu:
        f = y.shape[0] // 2
        y = torch.nn.functional.silu(y[:f]) * y[f:]
    elif residual is not None:
        y = residual.float() + y
    return y.to(x.dtype)


_FMT_IDS = {"q8_0": 0, "q6_k": 1, "q5_k": 2, "q3_k": 3, "q2_k": 4}


def _arrays(w: GpuZigzag) -> tuple:
    """The kernel arrays of a type in the order its kernels take them (unused slots: quants)."""
    q8 = w.quants.view(torch.int32) if w.fmt == "q8_0" else None
    return {"q8_0": (q8, w.d, q8, q8), "q6_k": (w.quants, w.high, w.scales, w.d),
            "q5_k": (w.quants, w.high, w.head.view(torch.int64) if w.head is not None else None, w.quants),
            "q3_k": (w.quants, w.high, w.scales, w.d), "q2_k": (w.quants, w.scales, w.d, w.quants)}[w.fmt]


def dequantize(w: GpuZigzag, dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None,
               block_k: int = 32) -> torch.Tensor:
    """The whole matrix (N, K) in `dtype`, row-major (prefill's GEMM): one launch, each weight
    equal to QuantizedWeight.dequantize's (fp32) rounded once to dtype. block_k 32 columns a program
    (sm_90: 56-64 registers, no spills; not timed)."""
    n, k = w.shape
    out = torch.empty((n, k), dtype=dtype, device=w.device) if out is None else out
    if out.shape != (n, k) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({n}, {k}) tensor")
    rows = w.rows // Q8_ROW_GROUP if w.fmt == "q8_0" else w.rows
    _dequant_kernel[(rows, triton.cdiv(k, block_k))](*_arrays(w), out, n, k, MAGIC, FMT=_FMT_IDS[w.fmt],
                                                     BLOCK_K=block_k,
                                                     num_warps=4)
    return out


def compile_sm90(fmt: str, mode: int = MODE_DENSE, dtype: str = "fp16", num_warps: int = 4, block_k: int = 16,
                 rows: int = Q8_ROW_GROUP):
    """One type's kernel compiled for Hopper here, without a GPU (Triton's bundled ptxas): the
    compiled object, with .asm["ttgir"], ["ptx"], ["cubin"]. For tests and probes; needs
    TRITON_INTERPRET unset."""
    from spqt.kernels.sass import compile_sm90 as compile_for_sm90

    common = {"x_ptr": f"*{dtype}", "idx_ptr": "*i32", "count_ptr": "*i32", "part_ptr": "*fp32", "K": "i32",
              "NP": "i32", "SPLIT": "i32", "magic": "i32"}
    kernel, sig, const = {
        "q8_0": (_q8_0_kernel, {"q_ptr": "*i32", "d_ptr": "*fp16"}, {"RB": rows}),
        "q6_k": (_q6_k_kernel, {"q_ptr": "*i32", "hb_ptr": "*i32", "sc_ptr": "*i8", "d_ptr": "*fp16"}, {}),
        "q5_k": (_q5_k_kernel, {"q_ptr": "*i32", "hb_ptr": "*i32", "h_ptr": "*i64"}, {}),
        "q3_k": (_q3_k_kernel, {"q_ptr": "*i32", "hb_ptr": "*i32", "sc_ptr": "*i32", "d_ptr": "*fp16"}, {}),
        "q2_k": (_q2_k_kernel, {"q_ptr": "*i32", "sc_ptr": "*u8", "dd_ptr": "*i32"}, {}),
    }[fmt]
    const = {"MODE": mode, "BLOCK_K": block_k, "PDL": True, **const}
    sig = {**sig, **common, **{name: "constexpr" for name in const}}
    n_ptrs = sum(1 for v in sig.values() if v.startswith("*"))
    return compile_for_sm90(kernel, sig, const, n_ptrs, {"num_warps": num_warps})


def compile_dequant_sm90(fmt: str, dtype: str = "fp16", block_k: int = 32):
    """The dequantize kernel of one type compiled for Hopper without a GPU (as compile_sm90)."""
    from spqt.kernels.sass import compile_sm90 as compile_for_sm90

    ptrs = {"q8_0": ("*i32", "*fp16", "*i32", "*i32"), "q6_k": ("*i32", "*i32", "*i8", "*fp16"),
            "q5_k": ("*i32", "*i32", "*i64", "*i32"), "q3_k": ("*i32", "*i32", "*i32", "*fp16"),
            "q2_k": ("*i32", "*u8", "*i32", "*i32")}[fmt]
    sig = dict(zip(("a_ptr", "b_ptr", "c_ptr", "d_ptr"), ptrs)) | {"out_ptr": f"*{dtype}", "N": "i32", "K": "i32",
                                                                   "magic": "i32",
                                                                   "FMT": "constexpr", "BLOCK_K": "constexpr"}
    return compile_for_sm90(_dequant_kernel, sig, {"FMT": _FMT_IDS[fmt], "BLOCK_K": block_k}, 5, {"num_warps": 4})
