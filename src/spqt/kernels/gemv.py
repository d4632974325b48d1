"""Q4_K GEMV kernels for one token, the paper's comparison set (design.md section 4):

  B0 row_dense            row layout, dense                        (llama.cpp's kernel, ours)
  B1 row_sparse_naive     row layout, masked weights skipped inside blocks (per-weight predicate)
  B2 zigzag_dense         zigzag layout, dense
  B3 zigzag_sparse_static zigzag, columns split statically, a block skipped when |x_k| <= t
  B4 zigzag_sparse        zigzag, the active-index list split evenly among the programs (SpQt)

Zigzag parallelism: superblock row r (256 outputs) gets SPLIT programs of WARPS warps; each
program accumulates its columns' contributions in registers, writes fp32 partial sums, and a
second small kernel adds the SPLIT partials in a fixed order (deterministic: no atomics).
Per block the math is one FMA per weight: y_i += (x_k d sc_j) q_i, with the min term
x_k dmin m_j summed once per sub-block; a nibble becomes a float by an OR into the mantissa of
2^23 and one subtraction (int->float conversion runs at a quarter of the FMA rate).

Weights come in the kernel layout of gpu_layout.py; x is (K,) fp16/bf16/fp32, y is x's dtype.
"""

import torch
import triton
import triton.language as tl

from spqt.kernels.gpu_layout import GpuQ4K

MODE_DENSE, MODE_STATIC, MODE_INDEXED = 0, 1, 2


@triton.jit
def _head(h_ptr, blk, m):
    """The 4 head words of blocks `blk` (BK,) and d, dmin as float32."""
    w0 = tl.load(h_ptr + blk * 4 + 0, mask=m, other=0)
    w1 = tl.load(h_ptr + blk * 4 + 1, mask=m, other=0)
    w2 = tl.load(h_ptr + blk * 4 + 2, mask=m, other=0)
    w3 = tl.load(h_ptr + blk * 4 + 3, mask=m, other=0)
    d = (w0 & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    dmin = ((w0 >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return d, dmin, w1, w2, w3


@triton.jit
def _scale_min(w1, w2, w3, J: tl.constexpr):
    """6-bit scale and min of sub-block J (compile-time) from the packed head words, as float32."""
    if J < 4:
        sc = (w1 >> (8 * J)) & 63
        mn = (w2 >> (8 * J)) & 63
    else:
        sc = ((w3 >> (8 * (J - 4))) & 15) | (((w1 >> (8 * (J - 4) + 6)) & 3) << 4)
        mn = ((w3 >> (8 * (J - 4) + 4)) & 15) | (((w2 >> (8 * (J - 4) + 6)) & 3) << 4)
    # 6-bit ints to float by the mantissa trick, not I2F (a quarter-rate instruction; per row and
    # sub-block it cost as much as the weights' own FMAs in the tile layout we use).
    scf = (sc | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    mnf = (mn | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    return scf, mnf


@triton.jit
def _nibble(words, J: tl.constexpr):
    """Nibble J of int32 words as exact float32 0..15 without an int->float conversion:
    OR the nibble into the mantissa of 2^23, subtract 2^23 (two full-rate ops)."""
    bits = ((words >> (4 * J)) & 15) | 0x4B000000
    return bits.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _zigzag_tile(q_ptr, h_ptr, x_ptr, idx_ptr, t, r, j, hi, K, MODE: tl.constexpr, BLOCK_K: tl.constexpr):
    """Issue the loads of one tile of BLOCK_K columns starting at list position j."""
    jj = j + tl.arange(0, BLOCK_K)
    m = jj < hi
    if MODE == 2:
        k = tl.load(idx_ptr + jj, mask=m, other=0)
    else:
        k = jj
    x = tl.load(x_ptr + k, mask=m, other=0.0).to(tl.float32)
    if MODE == 1:
        m = m & (tl.abs(x) > t)
        x = tl.where(m, x, 0.0)
    blk = r * K + k
    words = tl.load(q_ptr + blk[:, None] * 32 + tl.arange(0, 32)[None, :], mask=m[:, None], other=0)
    d, dmin, w1, w2, w3 = _head(h_ptr, blk, m)
    return x * d, x * dmin, words, w1, w2, w3


@triton.jit
def _zigzag_kernel(q_ptr, h_ptr, x_ptr, t_ptr, idx_ptr, count_ptr, part_ptr, K, NP, SPLIT,
                   MODE: tl.constexpr, BLOCK_K: tl.constexpr, MATH: tl.constexpr = True):
    """MATH=False is a probe, not a result: the same loads, one add per word instead of the
    dequantize-and-FMA, to measure what the memory path alone can do (benchmarks only)."""
    r = tl.program_id(0)
    s = tl.program_id(1)
    if MODE == 2:
        total = tl.load(count_ptr)
    else:
        total = K
    per = tl.cdiv(tl.cdiv(total, SPLIT), BLOCK_K) * BLOCK_K
    lo = s * per
    hi = tl.minimum(total, lo + per)
    w_idx = tl.arange(0, 32)
    acc0 = tl.zeros((BLOCK_K, 32), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_K, 32), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_K, 32), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_K, 32), dtype=tl.float32)
    acc4 = tl.zeros((BLOCK_K, 32), dtype=tl.float32)
    acc5 = tl.zeros((BLOCK_K, 32), dtype=tl.float32)
    acc6 = tl.zeros((BLOCK_K, 32), dtype=tl.float32)
    acc7 = tl.zeros((BLOCK_K, 32), dtype=tl.float32)
    bias0 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    bias1 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    bias2 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    bias3 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    bias4 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    bias5 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    bias6 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    bias7 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    t = 0.0
    if MODE == 1:
        t = tl.load(t_ptr)
    # Register prefetch: the loads of tile j + 1 are in flight while tile j is computed.
    xd, xm, words, w1, w2, w3 = _zigzag_tile(q_ptr, h_ptr, x_ptr, idx_ptr, t, r, lo, hi, K, MODE, BLOCK_K)
    for j in range(lo, hi, BLOCK_K):
        nxd, nxm, nwords, nw1, nw2, nw3 = _zigzag_tile(q_ptr, h_ptr, x_ptr, idx_ptr, t, r, j + BLOCK_K, hi, K,
                                                       MODE, BLOCK_K)
        if not MATH:
            acc0 += words.to(tl.float32, bitcast=True) + (xd + xm + (w1 + w2 + w3).to(tl.float32))[:, None]
        else:
            sc, mn = _scale_min(w1, w2, w3, 0)
            acc0 += (xd * sc)[:, None] * _nibble(words, 0)
            bias0 += xm * mn
            sc, mn = _scale_min(w1, w2, w3, 1)
            acc1 += (xd * sc)[:, None] * _nibble(words, 1)
            bias1 += xm * mn
            sc, mn = _scale_min(w1, w2, w3, 2)
            acc2 += (xd * sc)[:, None] * _nibble(words, 2)
            bias2 += xm * mn
            sc, mn = _scale_min(w1, w2, w3, 3)
            acc3 += (xd * sc)[:, None] * _nibble(words, 3)
            bias3 += xm * mn
            sc, mn = _scale_min(w1, w2, w3, 4)
            acc4 += (xd * sc)[:, None] * _nibble(words, 4)
            bias4 += xm * mn
            sc, mn = _scale_min(w1, w2, w3, 5)
            acc5 += (xd * sc)[:, None] * _nibble(words, 5)
            bias5 += xm * mn
            sc, mn = _scale_min(w1, w2, w3, 6)
            acc6 += (xd * sc)[:, None] * _nibble(words, 6)
            bias6 += xm * mn
            sc, mn = _scale_min(w1, w2, w3, 7)
            acc7 += (xd * sc)[:, None] * _nibble(words, 7)
            bias7 += xm * mn
        xd, xm, words, w1, w2, w3 = nxd, nxm, nwords, nw1, nw2, nw3
    out = part_ptr + s * NP + r * 256 + w_idx
    tl.store(out + 0, tl.sum(acc0, axis=0) - tl.sum(bias0, axis=0))
    tl.store(out + 32, tl.sum(acc1, axis=0) - tl.sum(bias1, axis=0))
    tl.store(out + 64, tl.sum(acc2, axis=0) - tl.sum(bias2, axis=0))
    tl.store(out + 96, tl.sum(acc3, axis=0) - tl.sum(bias3, axis=0))
    tl.store(out + 128, tl.sum(acc4, axis=0) - tl.sum(bias4, axis=0))
    tl.store(out + 160, tl.sum(acc5, axis=0) - tl.sum(bias5, axis=0))
    tl.store(out + 192, tl.sum(acc6, axis=0) - tl.sum(bias6, axis=0))
    tl.store(out + 224, tl.sum(acc7, axis=0) - tl.sum(bias7, axis=0))


@triton.jit
def _reduce_kernel(part_ptr, y_ptr, N, NP, SPLIT, BLOCK: tl.constexpr, SPLIT_P2: tl.constexpr):
    """y[n] = sum over s of part[s, n]: one (SPLIT, BLOCK) tile, a fixed reduction tree
    (deterministic run to run), all partial loads in flight at once."""
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    s = tl.arange(0, SPLIT_P2)
    m = (s[:, None] < SPLIT) & (n[None, :] < N)
    parts = tl.load(part_ptr + s[:, None] * NP + n[None, :], mask=m, other=0.0)
    tl.store(y_ptr + n, tl.sum(parts, axis=0).to(y_ptr.dtype.element_ty), mask=n < N)


@triton.jit
def _row_subblock(acc, bias, words, x_ptr, t, base, K, d, dmin, w1, w2, w3, J: tl.constexpr, SPARSE: tl.constexpr,
                  ROWS_OK):
    """One sub-block J of a row-layout block for BLOCK_N rows: 32 weights against x[base + 32J + w]."""
    kk = base + 32 * J + tl.arange(0, 32)
    x = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
    q = _nibble(words, J)
    if SPARSE:
        keep = tl.abs(x) > t
        x = tl.where(keep, x, 0.0)
        # per-weight branching: weights whose input is dropped are not used (B1, the naive way)
        q = tl.where(keep[None, :] & ROWS_OK[:, None], q, 0.0)
    sc, mn = _scale_min(w1, w2, w3, J)
    acc += (d * sc)[:, None] * (q * x[None, :])
    bias += dmin * mn * tl.sum(x, axis=0)
    return acc, bias


@triton.jit
def _row_kernel(q_ptr, h_ptr, x_ptr, t_ptr, y_ptr, N, K, KB, SPARSE: tl.constexpr, BLOCK_N: tl.constexpr):
    """B0 / B1: BLOCK_N rows per program, all their blocks."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mn_rows = n < N
    w_idx = tl.arange(0, 32)
    acc = tl.zeros((BLOCK_N, 32), dtype=tl.float32)
    bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = 0.0
    if SPARSE:
        t = tl.load(t_ptr)
    for b in range(KB):
        blk = n * KB + b
        words = tl.load(q_ptr + blk[:, None] * 32 + w_idx[None, :], mask=mn_rows[:, None], other=0)
        d, dmin, w1, w2, w3 = _head(h_ptr, blk, mn_rows)
        base = b * 256
        acc, bias = _row_subblock(acc, bias, words, x_ptr, t, base, K, d, dmin, w1, w2, w3, 0, SPARSE, mn_rows)
        acc, bias = _row_subblock(acc, bias, words, x_ptr, t, base, K, d, dmin, w1, w2, w3, 1, SPARSE, mn_rows)
        acc, bias = _row_subblock(acc, bias, words, x_ptr, t, base, K, d, dmin, w1, w2, w3, 2, SPARSE, mn_rows)
        acc, bias = _row_subblock(acc, bias, words, x_ptr, t, base, K, d, dmin, w1, w2, w3, 3, SPARSE, mn_rows)
        acc, bias = _row_subblock(acc, bias, words, x_ptr, t, base, K, d, dmin, w1, w2, w3, 4, SPARSE, mn_rows)
        acc, bias = _row_subblock(acc, bias, words, x_ptr, t, base, K, d, dmin, w1, w2, w3, 5, SPARSE, mn_rows)
        acc, bias = _row_subblock(acc, bias, words, x_ptr, t, base, K, d, dmin, w1, w2, w3, 6, SPARSE, mn_rows)
        acc, bias = _row_subblock(acc, bias, words, x_ptr, t, base, K, d, dmin, w1, w2, w3, 7, SPARSE, mn_rows)
    y = tl.sum(acc, axis=1) - bias
    tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=mn_rows)


@triton.jit
def _dequant_sub(out_ptr, words, d, dmin, w1, w2, w3, rr, cc, mb, N, K, J: tl.constexpr, ZIGZAG: tl.constexpr):
    sc, mn = _scale_min(w1, w2, w3, J)
    w = (d * sc)[:, None] * _nibble(words, J) - (dmin * mn)[:, None]
    e = 32 * J + tl.arange(0, 32)[None, :]  # weight index in the block
    if ZIGZAG:
        row = rr[:, None] * 256 + e
        col = cc[:, None] + e * 0
    else:
        row = rr[:, None] + e * 0
        col = cc[:, None] * 256 + e
    ok = mb[:, None] & (row < N) & (col < K)
    tl.store(out_ptr + row * K + col, w.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dequant_kernel(q_ptr, h_ptr, out_ptr, N, K, COLS, TOTAL, ZIGZAG: tl.constexpr, BLOCK_B: tl.constexpr):
    """Blocks -> out (N, K) row-major in out's dtype. Block bid = (grid row rr, grid col cc)."""
    bid = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mb = bid < TOTAL
    rr = bid // COLS
    cc = bid % COLS
    words = tl.load(q_ptr + bid[:, None] * 32 + tl.arange(0, 32)[None, :], mask=mb[:, None], other=0)
    d, dmin, w1, w2, w3 = _head(h_ptr, bid, mb)
    _dequant_sub(out_ptr, words, d, dmin, w1, w2, w3, rr, cc, mb, N, K, 0, ZIGZAG)
    _dequant_sub(out_ptr, words, d, dmin, w1, w2, w3, rr, cc, mb, N, K, 1, ZIGZAG)
    _dequant_sub(out_ptr, words, d, dmin, w1, w2, w3, rr, cc, mb, N, K, 2, ZIGZAG)
    _dequant_sub(out_ptr, words, d, dmin, w1, w2, w3, rr, cc, mb, N, K, 3, ZIGZAG)
    _dequant_sub(out_ptr, words, d, dmin, w1, w2, w3, rr, cc, mb, N, K, 4, ZIGZAG)
    _dequant_sub(out_ptr, words, d, dmin, w1, w2, w3, rr, cc, mb, N, K, 5, ZIGZAG)
    _dequant_sub(out_ptr, words, d, dmin, w1, w2, w3, rr, cc, mb, N, K, 6, ZIGZAG)
    _dequant_sub(out_ptr, words, d, dmin, w1, w2, w3, rr, cc, mb, N, K, 7, ZIGZAG)


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
                block_k: int = 8, num_warps: int = 4, idx: torch.Tensor | None = None,
                count: torch.Tensor | None = None, _probe_no_math: bool = False) -> torch.Tensor:
    """B2 (MODE_DENSE), B3 (MODE_STATIC: threshold), B4 (MODE_INDEXED: idx, count from collect).
    Returns ws.y (N,) in x's dtype (overwritten by the next call on the same workspace)."""
    if w.layout != "zigzag":
        raise ValueError("gemv_zigzag needs the zigzag layout")
    _check_x(w, x)
    if mode == MODE_STATIC and threshold is None:
        raise ValueError("B3 needs the threshold")
    if mode == MODE_INDEXED and (idx is None or count is None):
        raise ValueError("B4 needs idx and count from collect()")
    if ws.y.dtype != x.dtype:
        raise ValueError(f"workspace output is {ws.y.dtype}, x is {x.dtype}")
    n, k = w.shape
    rows = w.quants.shape[0]
    dummy = ws.count
    _zigzag_kernel[(rows, ws.split)](
        w.quants, w.head, x, threshold if threshold is not None else x, idx if idx is not None else dummy,
        count if count is not None else dummy, ws.partials, k, ws.np, ws.split,
        MODE=mode, BLOCK_K=block_k, MATH=not _probe_no_math, num_warps=num_warps)
    split_p2 = triton.next_power_of_2(ws.split)
    block = max(16, min(256, 4096 // split_p2))
    _reduce_kernel[(triton.cdiv(n, block),)](ws.partials, ws.y, n, ws.np, ws.split, BLOCK=block, SPLIT_P2=split_p2,
                                             num_warps=4)
    return ws.y


def gemv_row(w: GpuQ4K, x: torch.Tensor, threshold: torch.Tensor | None = None, out: torch.Tensor | None = None,
             block_n: int = 4, num_warps: int = 4) -> torch.Tensor:
    """B0 (threshold None) or B1 (row_sparse_naive: weights with |x_k| <= t skipped one by one)."""
    if w.layout != "row":
        raise ValueError("gemv_row needs the row layout")
    _check_x(w, x)
    n, k = w.shape
    out = torch.empty(n, dtype=x.dtype, device=x.device) if out is None else out
    kb = w.quants.shape[1]
    _row_kernel[(triton.cdiv(n, block_n),)](
        w.quants, w.head, x, threshold if threshold is not None else x, out, n, k, kb,
        SPARSE=threshold is not None, BLOCK_N=block_n, num_warps=num_warps)
    return out


def dequantize(w: GpuQ4K, dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None) -> torch.Tensor:
    """The whole matrix, (N, K) in `dtype`: the first half of the dense prefill GEMM."""
    n, k = w.shape
    out = torch.empty((n, k), dtype=dtype, device=w.quants.device) if out is None else out
    cols = w.quants.shape[1]
    total = w.quants.shape[0] * cols
    block_b = 16
    _dequant_kernel[(triton.cdiv(total, block_b),)](w.quants, w.head, out, n, k, cols, total,
                                                     ZIGZAG=w.layout == "zigzag", BLOCK_B=block_b, num_warps=4)
    return out
