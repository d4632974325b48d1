"""Q4_K GEMV kernels for one token, the paper's comparison set (design.md section 4):

  B0 row_dense            row layout, dense                        (llama.cpp's kernel, ours)
  B1 row_sparse_naive     row layout, masked weights skipped inside blocks (per-weight predicate)
  B2 zigzag_dense         zigzag layout, dense
  B3 zigzag_sparse_static zigzag, columns split statically, a block skipped when |x_k| <= t
  B4 zigzag_sparse        zigzag, the active-index list split evenly among the programs (SpQt)

Zigzag parallelism: superblock row r (256 outputs) gets SPLIT programs of WARPS warps; each
program accumulates its columns' contributions in registers, writes fp32 partial sums, and a
second small kernel adds the SPLIT partials in a fixed order (deterministic: no atomics).

A tile is BLOCK_K columns x 8 sub-blocks x 4 words (gpu_layout.py: word p holds weights
8p..8p+7 of its block, all of sub-block p // 4). One thread owns one (column, sub-block) row of
4 words, so it decodes one 6-bit scale and min per 32 weights. Per weight the math is one
AND-OR, one subtraction and one FMA: y_i += (x_k d sc_j) q_i, the nibble made an exact float
by OR-ing it, in place, into the mantissa of 2^23 (value q * 2^P, the 2^P undone once at the
end); the min term x_k dmin m_j is summed once per sub-block. The instruction budget is the
point: with a scale per word instead of per nibble the kernel issues about 4 instructions per
weight instead of 15 (SASS counts in docs/RESULTS.md), which is what lets it run at memory speed.

Weights come in the kernel layout of gpu_layout.py; x is (K,) fp16/bf16/fp32, y is x's dtype.
"""

import torch
import triton
import triton.language as tl

from spqt.kernels.gpu_layout import GpuQ4K

MODE_DENSE, MODE_STATIC, MODE_INDEXED = 0, 1, 2
MAGIC = 0x4B000000  # the bits of float32 2^23, see _nibble_at


@triton.jit
def _head(h_ptr, blk, m):
    """The 16-byte heads of blocks `blk` (h_ptr: the head array viewed as int64 pairs, two 8-byte
    loads instead of four 4-byte ones): d and dmin as float32, and the packed scale words 1-3."""
    lo = tl.load(h_ptr + blk * 2 + 0, mask=m, other=0)
    hi = tl.load(h_ptr + blk * 2 + 1, mask=m, other=0)
    w0 = lo.to(tl.int32)
    w1 = (lo >> 32).to(tl.int32)
    w2 = hi.to(tl.int32)
    w3 = (hi >> 32).to(tl.int32)
    d = (w0 & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    dmin = ((w0 >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return d, dmin, w1, w2, w3


@triton.jit
def _small_to_float(v):
    """Non-negative int32 below 2^23 -> the same value as float32, exactly: OR into the mantissa of
    2^23 and subtract 2^23 (two full-rate ops instead of a quarter-rate int->float)."""
    return (v | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _scales(w1, w2, w3, J):
    """6-bit scale and min of sub-block J (int32 tensor of 0..7, broadcast against the packed head
    words w1..w3 of the same blocks) as float32."""
    s8 = 8 * (J & 3)
    lo = J < 4
    sc = tl.where(lo, (w1 >> s8) & 63, ((w3 >> s8) & 15) | (((w1 >> (s8 + 6)) & 3) << 4))
    mn = tl.where(lo, (w2 >> s8) & 63, ((w3 >> (s8 + 4)) & 15) | (((w2 >> (s8 + 6)) & 3) << 4))
    return _small_to_float(sc), _small_to_float(mn)


@triton.jit
def _nibble_at(words, P: tl.constexpr, magic):
    """Bits P..P+3 of int32 words (P <= 16) as the exact float32 nibble * 2^P: one AND-OR puts them
    where they are into the mantissa of 2^23, one subtraction removes the 2^23; no shift.
    magic = 0x4B000000 (the bits of 2^23) comes in as a kernel argument: held in a register, the
    AND-OR is one LOP3 (a literal would make two immediates, which ptxas splits into two LOP3s)."""
    return ((words & (15 << P)) | magic).to(tl.float32, bitcast=True) - 8388608.0


# Nibble n of a word is read at bit P_n of the word (n < 5) or of the word shifted right by 12
# (n >= 5): P = 0, 4, 8, 12, 16, 8, 12, 16. Sums of nibble n carry the factor 2^P_n.


@triton.jit
def _zigzag_columns(idx_ptr, j, hi, MODE: tl.constexpr, BLOCK_K: tl.constexpr):
    """The column numbers (BLOCK_K,) at list positions j.., and which are below hi."""
    jj = j + tl.arange(0, BLOCK_K)
    m = jj < hi
    if MODE == 2:
        k = tl.load(idx_ptr + jj, mask=m, other=0)
    else:
        k = jj
    return k, m


@triton.jit
def _zigzag_tile(q_ptr, h_ptr, x_ptr, t, r, k, m, K, MODE: tl.constexpr):
    """Issue the loads of columns k (BLOCK_K,) of superblock row r: x*d and x*dmin (BLOCK_K,),
    the quant words (BLOCK_K, 8, 4) [column, sub-block, word] and the packed scale words."""
    x = tl.load(x_ptr + k, mask=m, other=0.0).to(tl.float32)
    if MODE == 1:
        m = m & (tl.abs(x) > t)
        x = tl.where(m, x, 0.0)
    blk = r * K + k
    word = tl.arange(0, 8)[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]
    words = tl.load(q_ptr + blk[:, None, None] * 32 + word, mask=m[:, None, None], other=0)
    d, dmin, w1, w2, w3 = _head(h_ptr, blk, m)
    return x * d, x * dmin, words, w1, w2, w3


@triton.jit
def _zigzag_accumulate(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, bias, xd, xm, words, w1, w2, w3, magic,
                       MATH: tl.constexpr):
    """Add one tile: acc_n (BLOCK_K, 8, 4) += x d sc * nibble n * 2^P_n, bias (BLOCK_K, 8) += x dmin m."""
    if not MATH:
        acc0 += words.to(tl.float32, bitcast=True) + (xd + xm + (w1 + w2 + w3).to(tl.float32))[:, None, None]
    else:
        sc, mn = _scales(w1[:, None], w2[:, None], w3[:, None], tl.arange(0, 8)[None, :])
        bias += xm[:, None] * mn
        s3 = (xd[:, None] * sc)[:, :, None]
        acc0 += s3 * _nibble_at(words, 0, magic)
        acc1 += s3 * _nibble_at(words, 4, magic)
        acc2 += s3 * _nibble_at(words, 8, magic)
        acc3 += s3 * _nibble_at(words, 12, magic)
        acc4 += s3 * _nibble_at(words, 16, magic)
        upper = words >> 12
        acc5 += s3 * _nibble_at(upper, 8, magic)
        acc6 += s3 * _nibble_at(upper, 12, magic)
        acc7 += s3 * _nibble_at(upper, 16, magic)
    return acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, bias


@triton.jit
def _zigzag_step(q_ptr, h_ptr, x_ptr, t, r, k, m, K, acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, bias,
                 xd, xm, words, w1, w2, w3, magic, MODE: tl.constexpr, MATH: tl.constexpr):
    """One pipeline step: issue the loads of columns k, then add the tile loaded before them.
    Returns the accumulators and the new tile (still in flight)."""
    nxd, nxm, nwords, nw1, nw2, nw3 = _zigzag_tile(q_ptr, h_ptr, x_ptr, t, r, k, m, K, MODE)
    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, bias = _zigzag_accumulate(
        acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, bias, xd, xm, words, w1, w2, w3, magic, MATH)
    return acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, bias, nxd, nxm, nwords, nw1, nw2, nw3


@triton.jit
def _store_nibble_sums(out, acc, b, N: tl.constexpr, P: tl.constexpr):
    """Outputs 8 p + N (out: (8, 4) pointers to outputs 8 p): the column sums of acc (read at bit P,
    so carrying 2^P) scaled back, less the min term b of their sub-blocks."""
    tl.store(out + N, tl.sum(acc, axis=0) * (2.0 ** -P) - b)


@triton.jit
def _zigzag_kernel(q_ptr, h_ptr, x_ptr, t_ptr, idx_ptr, count_ptr, part_ptr, K, NP, SPLIT, magic,
                   MODE: tl.constexpr, BLOCK_K: tl.constexpr, AHEAD: tl.constexpr, TILES: tl.constexpr = 1,
                   MATH: tl.constexpr = True):
    """Program (r, s): superblock row r, list share s -> part[s, 256 r : 256 r + 256] (fp32).
    TILES = 2 (with AHEAD = 1): each step loads two tiles of BLOCK_K columns that add into the same
    accumulators, so a thread has twice the words in flight for the same accumulator registers.
    MATH=False is a probe, not a result: the same loads, one add per word instead of the
    dequantize-and-FMA, to measure what the memory path alone can do (benchmarks only)."""
    r = tl.program_id(0)
    s = tl.program_id(1)
    if MODE == 2:
        total = tl.load(count_ptr)
    else:
        total = K
    per = tl.cdiv(tl.cdiv(total, SPLIT), TILES * BLOCK_K) * TILES * BLOCK_K
    lo = s * per
    hi = tl.minimum(total, lo + per)
    acc0 = tl.zeros((BLOCK_K, 8, 4), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_K, 8, 4), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_K, 8, 4), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_K, 8, 4), dtype=tl.float32)
    acc4 = tl.zeros((BLOCK_K, 8, 4), dtype=tl.float32)
    acc5 = tl.zeros((BLOCK_K, 8, 4), dtype=tl.float32)
    acc6 = tl.zeros((BLOCK_K, 8, 4), dtype=tl.float32)
    acc7 = tl.zeros((BLOCK_K, 8, 4), dtype=tl.float32)
    bias = tl.zeros((BLOCK_K, 8), dtype=tl.float32)
    t = 0.0
    if MODE == 1:
        t = tl.load(t_ptr)
    # Register prefetch, AHEAD (1 or 2) tiles deep: tile j + AHEAD's loads are in flight while tile
    # j is computed (Little's law: the bytes in flight per SM set the bandwidth). The column
    # indices (MODE 2) run one tile further ahead, so the weight loads never wait on them.
    k, m = _zigzag_columns(idx_ptr, lo, hi, MODE, BLOCK_K)
    xd, xm, words, w1, w2, w3 = _zigzag_tile(q_ptr, h_ptr, x_ptr, t, r, k, m, K, MODE)
    k, m = _zigzag_columns(idx_ptr, lo + BLOCK_K, hi, MODE, BLOCK_K)
    if TILES == 2:
        # tile pairs (j, j + BLOCK_K): pair j + 2 BLOCK_K in flight while pair j is computed
        xd1, xm1, words1, w11, w21, w31 = _zigzag_tile(q_ptr, h_ptr, x_ptr, t, r, k, m, K, MODE)
        k, m = _zigzag_columns(idx_ptr, lo + 2 * BLOCK_K, hi, MODE, BLOCK_K)
        k1, m1 = _zigzag_columns(idx_ptr, lo + 3 * BLOCK_K, hi, MODE, BLOCK_K)
        for j in range(lo, hi, 2 * BLOCK_K):
            nk, nm = _zigzag_columns(idx_ptr, j + 4 * BLOCK_K, hi, MODE, BLOCK_K)
            nk1, nm1 = _zigzag_columns(idx_ptr, j + 5 * BLOCK_K, hi, MODE, BLOCK_K)
            nxd, nxm, nwords, nw1, nw2, nw3 = _zigzag_tile(q_ptr, h_ptr, x_ptr, t, r, k, m, K, MODE)
            nxd1, nxm1, nwords1, nw11, nw21, nw31 = _zigzag_tile(q_ptr, h_ptr, x_ptr, t, r, k1, m1, K, MODE)
            acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, bias = _zigzag_accumulate(
                acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, bias, xd, xm, words, w1, w2, w3, magic, MATH)
            acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, bias = _zigzag_accumulate(
                acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, bias, xd1, xm1, words1, w11, w21, w31, magic, MATH)
            xd, xm, words, w1, w2, w3 = nxd, nxm, nwords, nw1, nw2, nw3
            xd1, xm1, words1, w11, w21, w31 = nxd1, nxm1, nwords1, nw11, nw21, nw31
            k, m, k1, m1 = nk, nm, nk1, nm1
    elif AHEAD == 1:
        for j in range(lo, hi, BLOCK_K):
            nk, nm = _zigzag_columns(idx_ptr, j + 2 * BLOCK_K, hi, MODE, BLOCK_K)
            acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, bias, xd, xm, words, w1, w2, w3 = _zigzag_step(
                q_ptr, h_ptr, x_ptr, t, r, k, m, K, acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, bias,
                xd, xm, words, w1, w2, w3, magic, MODE, MATH)
            k, m = nk, nm
    else:
        xd1, xm1, words1, w11, w21, w31 = _zigzag_tile(q_ptr, h_ptr, x_ptr, t, r, k, m, K, MODE)
        k, m = _zigzag_columns(idx_ptr, lo + 2 * BLOCK_K, hi, MODE, BLOCK_K)
        for j in range(lo, hi, BLOCK_K):
            nk, nm = _zigzag_columns(idx_ptr, j + 3 * BLOCK_K, hi, MODE, BLOCK_K)
            acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, bias, nxd, nxm, nwords, nw1, nw2, nw3 = _zigzag_step(
                q_ptr, h_ptr, x_ptr, t, r, k, m, K, acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, bias,
                xd, xm, words, w1, w2, w3, magic, MODE, MATH)
            xd, xm, words, w1, w2, w3 = xd1, xm1, words1, w11, w21, w31
            xd1, xm1, words1, w11, w21, w31 = nxd, nxm, nwords, nw1, nw2, nw3
            k, m = nk, nm
    # word p = 4 J + g holds outputs 8 p + n of this superblock row
    out = part_ptr + s * NP + r * 256 + tl.arange(0, 8)[:, None] * 32 + tl.arange(0, 4)[None, :] * 8
    b = tl.sum(bias, axis=0)[:, None]
    _store_nibble_sums(out, acc0, b, 0, 0)
    _store_nibble_sums(out, acc1, b, 1, 4)
    _store_nibble_sums(out, acc2, b, 2, 8)
    _store_nibble_sums(out, acc3, b, 3, 12)
    _store_nibble_sums(out, acc4, b, 4, 16)
    _store_nibble_sums(out, acc5, b, 5, 8)
    _store_nibble_sums(out, acc6, b, 6, 12)
    _store_nibble_sums(out, acc7, b, 7, 16)


EPILOGUE_NONE, EPILOGUE_RESIDUAL, EPILOGUE_SWIGLU = 0, 1, 2


@triton.jit
def _reduce_kernel(part_ptr, y_ptr, r_ptr, N, NP, SPLIT, F, BLOCK: tl.constexpr, SPLIT_P2: tl.constexpr,
                   EPILOGUE: tl.constexpr):
    """y[n] = sum over s of part[s, n]: one (SPLIT, BLOCK) tile, a fixed reduction tree
    (deterministic run to run), all partial loads in flight at once; then the epilogue, in fp32:
    RESIDUAL y[n] = r[n] + sum, n < N; SWIGLU (rows gate|up stacked, F = N / 2)
    y[n] = silu(sum[n]) * sum[F + n], n < F. One rounding to y's dtype at the end."""
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    s = tl.arange(0, SPLIT_P2)
    if EPILOGUE == 2:
        m = (s[:, None] < SPLIT) & (n[None, :] < F)
        gate = tl.sum(tl.load(part_ptr + s[:, None] * NP + n[None, :], mask=m, other=0.0), axis=0)
        up = tl.sum(tl.load(part_ptr + s[:, None] * NP + F + n[None, :], mask=m, other=0.0), axis=0)
        y = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=n < F)
    else:
        m = (s[:, None] < SPLIT) & (n[None, :] < N)
        y = tl.sum(tl.load(part_ptr + s[:, None] * NP + n[None, :], mask=m, other=0.0), axis=0)
        if EPILOGUE == 1:
            y += tl.load(r_ptr + n, mask=n < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=n < N)


@triton.jit
def _row_nibble(dot, xsum, words, x_ptr, t, col, K, ROWS_OK, magic, N: tl.constexpr, P: tl.constexpr,
                SPARSE: tl.constexpr):
    """Nibble N of every word (read at bit P) against x[col + N], col (8, 4) the words' first columns."""
    x = tl.load(x_ptr + col + N, mask=col + N < K, other=0.0).to(tl.float32)
    q = _nibble_at(words, P, magic)
    if SPARSE:
        keep = tl.abs(x) > t
        x = tl.where(keep, x, 0.0)
        # per-weight branching: weights whose input is dropped are not used (B1, the naive way)
        q = tl.where(keep[None, :, :] & ROWS_OK[:, None, None], q, 0.0)
    dot += q * (x * (2.0 ** -P))[None, :, :]
    return dot, xsum + x


@triton.jit
def _row_kernel(q_ptr, h_ptr, x_ptr, t_ptr, y_ptr, N, K, KB, magic, SPARSE: tl.constexpr, BLOCK_N: tl.constexpr):
    """B0 / B1: BLOCK_N rows per program, all their blocks; words as (BLOCK_N, 8, 4) tiles."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_ok = n < N
    J = tl.arange(0, 8)[None, :]
    word = tl.arange(0, 8)[:, None] * 4 + tl.arange(0, 4)[None, :]
    acc = tl.zeros((BLOCK_N, 8, 4), dtype=tl.float32)
    bias = tl.zeros((BLOCK_N, 8), dtype=tl.float32)
    t = 0.0
    if SPARSE:
        t = tl.load(t_ptr)
    for b in range(KB):
        blk = n * KB + b
        words = tl.load(q_ptr + blk[:, None, None] * 32 + word[None, :, :], mask=rows_ok[:, None, None], other=0)
        d, dmin, w1, w2, w3 = _head(h_ptr, blk, rows_ok)
        col = b * 256 + word * 8
        dot = tl.zeros((BLOCK_N, 8, 4), dtype=tl.float32)
        xsum = tl.zeros((8, 4), dtype=tl.float32)
        dot, xsum = _row_nibble(dot, xsum, words, x_ptr, t, col, K, rows_ok, magic, 0, 0, SPARSE)
        dot, xsum = _row_nibble(dot, xsum, words, x_ptr, t, col, K, rows_ok, magic, 1, 4, SPARSE)
        dot, xsum = _row_nibble(dot, xsum, words, x_ptr, t, col, K, rows_ok, magic, 2, 8, SPARSE)
        dot, xsum = _row_nibble(dot, xsum, words, x_ptr, t, col, K, rows_ok, magic, 3, 12, SPARSE)
        dot, xsum = _row_nibble(dot, xsum, words, x_ptr, t, col, K, rows_ok, magic, 4, 16, SPARSE)
        upper = words >> 12
        dot, xsum = _row_nibble(dot, xsum, upper, x_ptr, t, col, K, rows_ok, magic, 5, 8, SPARSE)
        dot, xsum = _row_nibble(dot, xsum, upper, x_ptr, t, col, K, rows_ok, magic, 6, 12, SPARSE)
        dot, xsum = _row_nibble(dot, xsum, upper, x_ptr, t, col, K, rows_ok, magic, 7, 16, SPARSE)
        sc, mn = _scales(w1[:, None], w2[:, None], w3[:, None], J)
        acc += (d[:, None] * sc)[:, :, None] * dot
        bias += (dmin[:, None] * mn) * tl.sum(xsum, axis=1)[None, :]
    y = tl.sum(tl.sum(acc, axis=2), axis=1) - tl.sum(bias, axis=1)
    tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=rows_ok)


@triton.jit
def _dequant_nibble(out_ptr, words, dsc, dmn, rr, cc, mb, N, K, magic, NIB: tl.constexpr, P: tl.constexpr,
                    ZIGZAG: tl.constexpr):
    """Weights 8 p + NIB of the blocks (BLOCK_B, 8, 4) -> out."""
    w = dsc * (_nibble_at(words, P, magic) * (2.0 ** -P)) - dmn
    e = (tl.arange(0, 8)[:, None] * 32 + tl.arange(0, 4)[None, :] * 8 + NIB)[None, :, :]  # weight in block
    if ZIGZAG:
        row = rr[:, None, None] * 256 + e
        col = cc[:, None, None] + e * 0
    else:
        row = rr[:, None, None] + e * 0
        col = cc[:, None, None] * 256 + e
    ok = mb[:, None, None] & (row < N) & (col < K)
    tl.store(out_ptr + row * K + col, w.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dequant_kernel(q_ptr, h_ptr, out_ptr, N, K, COLS, TOTAL, magic, ZIGZAG: tl.constexpr, BLOCK_B: tl.constexpr):
    """Blocks -> out (N, K) row-major in out's dtype. Block bid = (grid row rr, grid col cc)."""
    bid = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mb = bid < TOTAL
    rr = bid // COLS
    cc = bid % COLS
    word = tl.arange(0, 8)[:, None] * 4 + tl.arange(0, 4)[None, :]
    words = tl.load(q_ptr + bid[:, None, None] * 32 + word[None, :, :], mask=mb[:, None, None], other=0)
    d, dmin, w1, w2, w3 = _head(h_ptr, bid, mb)
    sc, mn = _scales(w1[:, None], w2[:, None], w3[:, None], tl.arange(0, 8)[None, :])
    dsc = (d[:, None] * sc)[:, :, None]
    dmn = (dmin[:, None] * mn)[:, :, None]
    _dequant_nibble(out_ptr, words, dsc, dmn, rr, cc, mb, N, K, magic, 0, 0, ZIGZAG)
    _dequant_nibble(out_ptr, words, dsc, dmn, rr, cc, mb, N, K, magic, 1, 4, ZIGZAG)
    _dequant_nibble(out_ptr, words, dsc, dmn, rr, cc, mb, N, K, magic, 2, 8, ZIGZAG)
    _dequant_nibble(out_ptr, words, dsc, dmn, rr, cc, mb, N, K, magic, 3, 12, ZIGZAG)
    _dequant_nibble(out_ptr, words, dsc, dmn, rr, cc, mb, N, K, magic, 4, 16, ZIGZAG)
    upper = words >> 12
    _dequant_nibble(out_ptr, upper, dsc, dmn, rr, cc, mb, N, K, magic, 5, 8, ZIGZAG)
    _dequant_nibble(out_ptr, upper, dsc, dmn, rr, cc, mb, N, K, magic, 6, 12, ZIGZAG)
    _dequant_nibble(out_ptr, upper, dsc, dmn, rr, cc, mb, N, K, magic, 7, 16, ZIGZAG)


# ---------------------------------------------------------------- launchers

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_x(w: GpuQ4K, x: torch.Tensor) -> None:
    n, k = w.shape
    if x.dim() != 1 or x.shape[0] != k:
        raise ValueError(f"GEMV takes one token: x must be ({k},), got {tuple(x.shape)}")
    if x.dtype not in _DTYPES or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous fp16/bf16/fp32 vector, got {x.dtype}")
    if x.device != w.quants.device:
        raise ValueError("x and the weights must be on the same device")


class ZigzagWorkspace:
    """Preallocated buffers of one zigzag matrix (so a decode step can be a CUDA graph)."""

    def __init__(self, w: GpuQ4K, split: int, dtype: torch.dtype):
        n, k = w.shape
        dev = w.quants.device
        self.split = split
        self.np = w.quants.shape[0] * 256
        self.partials = torch.empty((split, self.np), dtype=torch.float32, device=dev)
        self.idx = torch.empty(k, dtype=torch.int32, device=dev)
        self.count = torch.empty((), dtype=torch.int32, device=dev)
        self.y = torch.empty(n, dtype=dtype, device=dev)


def gemv_zigzag(w: GpuQ4K, x: torch.Tensor, mode: int, ws: ZigzagWorkspace, threshold: torch.Tensor | None = None,
                block_k: int = 16, num_warps: int = 4, ahead: int = 1, tiles: int = 1, maxnreg: int | None = None,
                idx: torch.Tensor | None = None,
                count: torch.Tensor | None = None, residual: torch.Tensor | None = None, swiglu: bool = False,
                _probe_no_math: bool = False) -> torch.Tensor:
    """B2 (MODE_DENSE), B3 (MODE_STATIC: threshold), B4 (MODE_INDEXED: idx, count from collect).
    block_k, num_warps, ahead, tiles, maxnreg (a register cap for ptxas): the tuned config.
    Returns ws.y (N,) in x's dtype (overwritten by the next call on the same workspace), or with
    an epilogue fused into the reduction: residual (N,) x's dtype -> residual + W x; swiglu (W is
    gate|up stacked, N even) -> silu(gate) * up, a view ws.y[:N / 2]."""
    if w.layout != "zigzag":
        raise ValueError("gemv_zigzag needs the zigzag layout")
    _check_x(w, x)
    if mode == MODE_STATIC and threshold is None:
        raise ValueError("B3 needs the threshold")
    if mode == MODE_INDEXED and (idx is None or count is None):
        raise ValueError("B4 needs idx and count from collect()")
    if ws.y.dtype != x.dtype:
        raise ValueError(f"workspace output is {ws.y.dtype}, x is {x.dtype}")
    if tiles not in (1, 2) or ahead not in (1, 2) or (tiles == 2 and ahead != 1):
        raise ValueError(f"tiles {tiles}, ahead {ahead}: supported are ahead 1 or 2 with one tile, ahead 1 with two")
    n, k = w.shape
    if residual is not None and (residual.shape != (n,) or residual.dtype != x.dtype or not residual.is_contiguous()):
        raise ValueError(f"the residual must be a contiguous ({n},) {x.dtype} vector")
    if swiglu and (n % 2 or residual is not None):
        raise ValueError("swiglu needs an even N (gate|up stacked) and no residual")
    rows = w.quants.shape[0]
    dummy = ws.count
    _zigzag_kernel[(rows, ws.split)](
        w.quants, w.head.view(torch.int64), x, threshold if threshold is not None else x, idx if idx is not None else dummy,
        count if count is not None else dummy, ws.partials, k, ws.np, ws.split, MAGIC,
        MODE=mode, BLOCK_K=block_k, AHEAD=ahead, TILES=tiles, MATH=not _probe_no_math, num_warps=num_warps,
        maxnreg=maxnreg)
    split_p2 = triton.next_power_of_2(ws.split)
    block = max(16, min(256, 4096 // split_p2))
    epilogue = EPILOGUE_SWIGLU if swiglu else EPILOGUE_RESIDUAL if residual is not None else EPILOGUE_NONE
    outputs = n // 2 if swiglu else n
    _reduce_kernel[(triton.cdiv(outputs, block),)](
        ws.partials, ws.y, residual if residual is not None else ws.y, n, ws.np, ws.split, n // 2,
        BLOCK=block, SPLIT_P2=split_p2, EPILOGUE=epilogue, num_warps=4)
    return ws.y[:outputs] if swiglu else ws.y


def gemv_row(w: GpuQ4K, x: torch.Tensor, threshold: torch.Tensor | None = None, out: torch.Tensor | None = None,
             block_n: int = 8, num_warps: int = 2) -> torch.Tensor:
    """B0 (threshold None) or B1 (row_sparse_naive: weights with |x_k| <= t skipped one by one)."""
    if w.layout != "row":
        raise ValueError("gemv_row needs the row layout")
    _check_x(w, x)
    n, k = w.shape
    out = torch.empty(n, dtype=x.dtype, device=x.device) if out is None else out
    kb = w.quants.shape[1]
    _row_kernel[(triton.cdiv(n, block_n),)](
        w.quants, w.head.view(torch.int64), x, threshold if threshold is not None else x, out, n, k, kb, MAGIC,
        SPARSE=threshold is not None, BLOCK_N=block_n, num_warps=num_warps)
    return out


def dequantize(w: GpuQ4K, dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None) -> torch.Tensor:
    """The whole matrix, (N, K) in `dtype`: the first half of the dense prefill GEMM."""
    n, k = w.shape
    out = torch.empty((n, k), dtype=dtype, device=w.quants.device) if out is None else out
    cols = w.quants.shape[1]
    total = w.quants.shape[0] * cols
    block_b = 16
    _dequant_kernel[(triton.cdiv(total, block_b),)](w.quants, w.head.view(torch.int64), out, n, k, cols, total, MAGIC,
                                                     ZIGZAG=w.layout == "zigzag", BLOCK_B=block_b, num_warps=4)
    return out
