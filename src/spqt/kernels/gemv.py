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
x_k dmin m_j summed once per sub-block.

Weights come in the kernel layout of gpu_layout.py; x is (K,) fp16/bf16/fp32, y is x's dtype.
"""

import torch
import triton
import triton.language as tl

from spqt.kernels.gpu_layout import GpuQ4K

MODE_DENSE, MODE_STATIC, MODE_INDEXED = 0, 1, 2


@triton.jit
def _scales(h_ptr, blk, m):
    """Decode the 16-byte head of blocks `blk` (BK,): d, dmin (BK,) and 6-bit scale/min (BK, 4)
    for sub-blocks 0-3 (lo) and 4-7 (hi), as float32."""
    w0 = tl.load(h_ptr + blk * 4 + 0, mask=m, other=0)
    w1 = tl.load(h_ptr + blk * 4 + 1, mask=m, other=0)
    w2 = tl.load(h_ptr + blk * 4 + 2, mask=m, other=0)
    w3 = tl.load(h_ptr + blk * 4 + 3, mask=m, other=0)
    d = (w0 & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    dmin = ((w0 >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    s = tl.arange(0, 4) * 8
    w1 = w1[:, None]
    w2 = w2[:, None]
    w3 = w3[:, None]
    sc_lo = ((w1 >> s[None, :]) & 63).to(tl.float32)
    m_lo = ((w2 >> s[None, :]) & 63).to(tl.float32)
    sc_hi = (((w3 >> s[None, :]) & 15) | (((w1 >> (s[None, :] + 6)) & 3) << 4)).to(tl.float32)
    m_hi = (((w3 >> (s[None, :] + 4)) & 15) | (((w2 >> (s[None, :] + 6)) & 3) << 4)).to(tl.float32)
    return d, dmin, sc_lo, m_lo, sc_hi, m_hi


@triton.jit
def _zigzag_kernel(q_ptr, h_ptr, x_ptr, t_ptr, idx_ptr, count_ptr, part_ptr, K, NP,
                   SPLIT, MODE: tl.constexpr, BLOCK_K: tl.constexpr):
    r = tl.program_id(0)
    s = tl.program_id(1)
    if MODE == 2:
        total = tl.load(count_ptr)
    else:
        total = K
    per = tl.cdiv(tl.cdiv(total, SPLIT), BLOCK_K) * BLOCK_K
    lo = s * per
    hi = tl.minimum(total, lo + per)
    e = tl.arange(0, 4)[:, None] * 32 + tl.arange(0, 32)[None, :]  # (4, 32) byte index in block
    acc_lo = tl.zeros((BLOCK_K, 4, 32), dtype=tl.float32)
    acc_hi = tl.zeros((BLOCK_K, 4, 32), dtype=tl.float32)
    bias_lo = tl.zeros((BLOCK_K, 4), dtype=tl.float32)
    bias_hi = tl.zeros((BLOCK_K, 4), dtype=tl.float32)
    if MODE == 1:
        t = tl.load(t_ptr)
    for j in range(lo, hi, BLOCK_K):
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
        d, dmin, sc_lo, m_lo, sc_hi, m_hi = _scales(h_ptr, blk, m)
        xd = (x * d)[:, None]
        xm = (x * dmin)[:, None]
        q = tl.load(q_ptr + blk[:, None, None] * 128 + e[None, :, :], mask=m[:, None, None], other=0)
        acc_lo += (xd * sc_lo)[:, :, None] * (q & 15).to(tl.float32)
        acc_hi += (xd * sc_hi)[:, :, None] * (q >> 4).to(tl.float32)
        bias_lo += xm * m_lo
        bias_hi += xm * m_hi
    y_lo = tl.sum(acc_lo, axis=0) - tl.sum(bias_lo, axis=0)[:, None]
    y_hi = tl.sum(acc_hi, axis=0) - tl.sum(bias_hi, axis=0)[:, None]
    out = part_ptr + s * NP + r * 256 + e
    tl.store(out, y_lo)
    tl.store(out + 128, y_hi)


@triton.jit
def _reduce_kernel(part_ptr, y_ptr, N, NP, SPLIT, BLOCK: tl.constexpr):
    """y[n] = sum over s of part[s, n], in the order s = 0, 1, ... (deterministic)."""
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = n < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(part_ptr + s * NP + n, mask=m, other=0.0)
    tl.store(y_ptr + n, acc.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _row_kernel(q_ptr, h_ptr, x_ptr, t_ptr, y_ptr, N, K, KB, SPARSE: tl.constexpr, BLOCK_N: tl.constexpr):
    """B0 / B1: BLOCK_N rows per program, all their blocks. SPARSE: per-weight predicate on loads."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = n < N
    e = tl.arange(0, 4)[:, None] * 32 + tl.arange(0, 32)[None, :]
    acc = tl.zeros((BLOCK_N, 4, 32), dtype=tl.float32)
    bias = tl.zeros((BLOCK_N, 4), dtype=tl.float32)
    if SPARSE:
        t = tl.load(t_ptr)
    for b in range(KB):
        k_lo = b * 256 + e
        x_lo = tl.load(x_ptr + k_lo, mask=k_lo < K, other=0.0).to(tl.float32)
        x_hi = tl.load(x_ptr + k_lo + 128, mask=k_lo + 128 < K, other=0.0).to(tl.float32)
        qmask_lo = mn[:, None, None]
        qmask_hi = mn[:, None, None]
        if SPARSE:
            keep_lo = tl.abs(x_lo) > t
            keep_hi = tl.abs(x_hi) > t
            x_lo = tl.where(keep_lo, x_lo, 0.0)
            x_hi = tl.where(keep_hi, x_hi, 0.0)
            qmask_lo = qmask_lo & keep_lo[None, :, :]
            qmask_hi = qmask_hi & keep_hi[None, :, :]
        blk = n * KB + b
        d, dmin, sc_lo, m_lo, sc_hi, m_hi = _scales(h_ptr, blk, mn)
        qp = q_ptr + blk[:, None, None] * 128 + e[None, :, :]
        q_lo = tl.load(qp, mask=qmask_lo, other=0) & 15
        q_hi = tl.load(qp, mask=qmask_hi, other=0) >> 4
        acc += (d[:, None] * sc_lo)[:, :, None] * (q_lo.to(tl.float32) * x_lo[None, :, :])
        acc += (d[:, None] * sc_hi)[:, :, None] * (q_hi.to(tl.float32) * x_hi[None, :, :])
        bias += (dmin[:, None] * m_lo) * tl.sum(x_lo, axis=1)[None, :]
        bias += (dmin[:, None] * m_hi) * tl.sum(x_hi, axis=1)[None, :]
    y = tl.sum(tl.sum(acc, axis=2), axis=1) - tl.sum(bias, axis=1)
    tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=mn)


@triton.jit
def _dequant_kernel(q_ptr, h_ptr, out_ptr, N, K, COLS, ZIGZAG: tl.constexpr, BLOCK_B: tl.constexpr):
    """Blocks -> out (N, K) row-major in out's dtype. Block bid = (grid row, grid col)."""
    bid = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    total = tl.cdiv(N, 256) * COLS if ZIGZAG else N * COLS
    mb = bid < total
    rr = bid // COLS
    cc = bid % COLS
    e = tl.arange(0, 4)[:, None] * 32 + tl.arange(0, 32)[None, :]
    d, dmin, sc_lo, m_lo, sc_hi, m_hi = _scales(h_ptr, bid, mb)
    q = tl.load(q_ptr + bid[:, None, None] * 128 + e[None, :, :], mask=mb[:, None, None], other=0)
    w_lo = (d[:, None] * sc_lo)[:, :, None] * (q & 15).to(tl.float32) - (dmin[:, None] * m_lo)[:, :, None]
    w_hi = (d[:, None] * sc_hi)[:, :, None] * (q >> 4).to(tl.float32) - (dmin[:, None] * m_hi)[:, :, None]
    if ZIGZAG:
        row_lo = rr[:, None, None] * 256 + e[None, :, :]
        col = cc[:, None, None] + e[None, :, :] * 0
        ok_lo = mb[:, None, None] & (row_lo < N)
        ok_hi = mb[:, None, None] & (row_lo + 128 < N)
        tl.store(out_ptr + row_lo * K + col, w_lo.to(out_ptr.dtype.element_ty), mask=ok_lo)
        tl.store(out_ptr + (row_lo + 128) * K + col, w_hi.to(out_ptr.dtype.element_ty), mask=ok_hi)
    else:
        row = rr[:, None, None] + e[None, :, :] * 0
        col_lo = cc[:, None, None] * 256 + e[None, :, :]
        ok_lo = mb[:, None, None] & (col_lo < K)
        ok_hi = mb[:, None, None] & (col_lo + 128 < K)
        tl.store(out_ptr + row * K + col_lo, w_lo.to(out_ptr.dtype.element_ty), mask=ok_lo)
        tl.store(out_ptr + row * K + col_lo + 128, w_hi.to(out_ptr.dtype.element_ty), mask=ok_hi)


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
                count: torch.Tensor | None = None) -> torch.Tensor:
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
        MODE=mode, BLOCK_K=block_k, num_warps=num_warps)
    block = 256
    _reduce_kernel[(triton.cdiv(n, block),)](ws.partials, ws.y, n, ws.np, ws.split, BLOCK=block, num_warps=4)
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
    _dequant_kernel[(triton.cdiv(total, block_b),)](w.quants, w.head, out, n, k, cols,
                                                     ZIGZAG=w.layout == "zigzag", BLOCK_B=block_b, num_warps=4)
    return out
