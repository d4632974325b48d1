"""Q4_K GEMV kernels for one token, the paper's comparison set (design.md section 4):

  B0 row_dense            row layout, dense                        (llama.cpp's kernel, ours)
  B1 row_sparse_naive     row layout, masked weights skipped inside blocks (per-weight predicate)
  B2 zigzag_dense         zigzag layout, dense
  B3 zigzag_sparse_static zigzag, columns split statically, a block skipped when |x_k| <= t
  B4 zigzag_sparse        zigzag, the active-index list split evenly among the programs (SpQt)

The zigzag variants are one tensor-core kernel (zigzag_mma.py) in three modes; for fp16 / bf16 x, B2
and B4 also run as CUDA C++ (zigzag_cuda.py), where the tuned config says "impl": "cuda". Superblock row r
(256 outputs) gets SPLIT programs of WARPS warps; each program writes fp32 partial sums. Fused
(one launch): each program counts its arrival on the row's counter and the last program of a
row adds the SPLIT partials in a fixed order (deterministic: the atomic only elects who adds,
not the order). Unfused (the default): a second small kernel adds them, launched with PDL so
that it starts while the GEMV finishes. Either applies the residual add or the SwiGLU product.
(H100, fused vs unfused: the tuner found fused faster only on some shapes with a small SPLIT,
and a 70B decode step at 50 % sparsity with every map fused ran 70.0 tok/s against 79.8
unfused: the finishing program's serial sum and the atomics cost more than the launch.)

The row kernels: a thread owns 4 words of a block (32 weights of one sub-block), so it decodes
one 6-bit scale per 32 weights; a nibble becomes an exact float with one AND-OR into the
mantissa of 2^23 (q4k_bits.nibble_at).

Weights come in the kernel layout of gpu_layout.py; x is (K,) fp16/bf16/fp32, y is x's dtype.
"""

import torch
import triton
import triton.language as tl

from spqt.kernels import q4k_tiles, type_tiles, zigzag_cuda, zigzag_mma
from spqt.kernels.gpu_layout import GpuQ4K
from spqt.kernels.q4k_bits import MAGIC, load_head, nibble_at, unpack_scales

MODE_DENSE, MODE_STATIC, MODE_INDEXED = zigzag_mma.MODE_DENSE, zigzag_mma.MODE_STATIC, zigzag_mma.MODE_INDEXED
MODE_KEPT = zigzag_cuda.MODE_KEPT  # B4 over each program's own list of its share's kept inputs (the CUDA GEMV only)
EPILOGUE_NONE, EPILOGUE_RESIDUAL, EPILOGUE_SWIGLU = 0, 1, 2


@triton.jit
def _reduce_kernel(part_ptr, y_ptr, r_ptr, N, NP, SPLIT, F, BLOCK: tl.constexpr, SPLIT_P2: tl.constexpr,
                   EPILOGUE: tl.constexpr, PDL: tl.constexpr, sq_ptr=None, SUMSQ: tl.constexpr = False):
    """The unfused finish of a zigzag GEMV: y[n] = sum over s of part[s, n], one (SPLIT, BLOCK)
    tile, a fixed reduction tree (deterministic), all partial loads in flight at once; then the
    epilogue in fp32: RESIDUAL y[n] = r[n] + sum, n < N; SWIGLU (rows gate|up stacked, F = N / 2)
    y[n] = silu(sum[n]) * sum[F + n], n < F. One rounding to y's dtype at the end. PDL: launched
    while the GEMV finishes; reads the partials after it has. SUMSQ (not SWIGLU): program p also
    writes sq[p], the sum of its stored y's squares in fp32 (fixed order): the next map's RMSNorm,
    folded into its GEMV (gpu_linear's dense_normed), adds the programs' sums instead of reading y twice."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    s = tl.arange(0, SPLIT_P2)
    m = (s[:, None] < SPLIT) & (n[None, :] < (F if EPILOGUE == 2 else N))
    acc = tl.sum(tl.load(part_ptr + s[:, None] * NP + n[None, :], mask=m, other=0.0), axis=0)
    up = acc
    if EPILOGUE == 2:
        up = tl.sum(tl.load(part_ptr + s[:, None] * NP + F + n[None, :], mask=m, other=0.0), axis=0)
    out = zigzag_mma.store_epilogue(y_ptr, r_ptr, n, acc, up, N, F, EPILOGUE)
    if SUMSQ:
        v = tl.where(n < N, out.to(tl.float32), 0.0)
        tl.store(sq_ptr + tl.program_id(0), tl.sum(v * v, axis=0))


@triton.jit
def _row_nibble(dot, xsum, words, x_ptr, t, col, K, ROWS_OK, magic, N: tl.constexpr, P: tl.constexpr,
                SPARSE: tl.constexpr):
    """Nibble N of every word (read at bit P) against x[col + N], col (8, 4) the words' first columns."""
    x = tl.load(x_ptr + col + N, mask=col + N < K, other=0.0).to(tl.float32)
    q = nibble_at(words, P, magic)
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
        d, dmin, w1, w2, w3 = load_head(h_ptr, blk, rows_ok)
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
        sc, mn = unpack_scales(w1[:, None], w2[:, None], w3[:, None], J)
        acc += (d[:, None] * sc)[:, :, None] * dot
        bias += (dmin[:, None] * mn) * tl.sum(xsum, axis=1)[None, :]
    y = tl.sum(tl.sum(acc, axis=2), axis=1) - tl.sum(bias, axis=1)
    tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=rows_ok)


@triton.jit
def _dequant_kernel(q_ptr, h_ptr, out_ptr, N, K, COLS, TOTAL, BLOCK_B: tl.constexpr):
    """Row-layout Q4_K blocks -> out (N, K) row-major in out's dtype. Block bid = (row rr, block column cc) of the
    (N, COLS) grid: weight e = 32 j + i (sub-block j) in word e // 8 at bits 4 (e % 8) (gpu_layout.py), head bid."""
    bid = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mb = bid < TOTAL
    e = (tl.arange(0, 8)[:, None] * 32 + tl.arange(0, 32)[None, :])[None, :, :]  # (1, 8 j, 32 i)
    words = tl.load(q_ptr + bid[:, None, None] * 32 + e // 8, mask=mb[:, None, None], other=0)
    level = (words >> (4 * (e % 8))) & 15
    d, dmin, w1, w2, w3 = load_head(h_ptr, bid, mb)
    sc, mn = unpack_scales(w1[:, None], w2[:, None], w3[:, None], tl.arange(0, 8)[None, :])
    w = (d[:, None] * sc)[:, :, None] * level.to(tl.float32) - (dmin[:, None] * mn)[:, :, None]
    row = bid[:, None, None] // COLS + e * 0
    col = (bid[:, None, None] % COLS) * 256 + e
    tl.store(out_ptr + row * K + col, w.to(out_ptr.dtype.element_ty), mask=mb[:, None, None] & (row < N) & (col < K))


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


def reduce_block(split: int, sums: int = 4096) -> int:
    """Outputs a program of _reduce_kernel finishes: its (SPLIT, BLOCK) tile holds about `sums` partial sums (16-256
    outputs)."""
    return max(16, min(256, sums // triton.next_power_of_2(split)))


class ZigzagWorkspace:
    """Preallocated buffers of one zigzag matrix (so a decode step can be a CUDA graph). sumsq: the
    reduction programs' sums of squares of y (gemv_zigzag's sumsq)."""

    def __init__(self, w: GpuQ4K, split: int, dtype: torch.dtype):
        n, k = w.shape
        dev = w.quants.device
        self.split = split
        self.np = w.grid[0] * 256
        self.sumsq = torch.empty(triton.cdiv(n, reduce_block(split)), dtype=torch.float32, device=dev)
        self.partials = torch.empty((split, self.np), dtype=torch.float32, device=dev)
        self.idx = torch.empty(k, dtype=torch.int32, device=dev)
        self.count = torch.empty((), dtype=torch.int32, device=dev)
        self.counters = torch.zeros(w.grid[0], dtype=torch.int32, device=dev)  # zero between launches
        self.y = torch.empty(n, dtype=dtype, device=dev)


# the CUDA GEMV's TYPE of each format (zigzag_cuda.launch's bits); all but Q4_K run in CUDA layouts only
TYPE_BITS = {"q2_k": 2, "q3_k": 3, "q4_k": 4, "q5_k": 5, "q6_k": 6, "q8_0": 8}


def finish_plan(w: GpuQ4K, x: torch.Tensor, mode: int, split: int, epilogue: int, impl: str = "triton",
                fused: bool = False, cluster: bool = False) -> tuple[bool, bool, bool]:
    """How gemv_zigzag runs these arguments: (the CUDA GEMV runs, its programs finish as a cluster, the GEMV
    finishes y itself); where the last is False, _reduce_kernel finishes y (and can write the sums of squares)."""
    n = w.shape[0]
    if TYPE_BITS[w.fmt] != 4 or ((zigzag_cuda.choice() or impl) == "cuda" and zigzag_cuda.supports(x, mode)):
        # the cluster finish has run on a GPU for Q4_K only (Q5_K / Q6_K: the reduction or fused finish)
        cluster = (cluster and w.fmt == "q4_k" and zigzag_cuda.fused_choice(True) and zigzag_cuda.clusters_run(x.device)
                   and zigzag_cuda.cluster_dims(n, epilogue, split) is not None)
        return True, cluster, cluster or (zigzag_cuda.fused_choice(fused) and zigzag_cuda.fusable(n, epilogue))
    return False, False, fused


def gemv_zigzag(w: GpuQ4K, x: torch.Tensor, mode: int, ws: ZigzagWorkspace, threshold: torch.Tensor | None = None,
                num_warps: int = 2, chunks: int = 1, maxnreg: int = 0, ahead: int = 0, acc: int = 16, pipe: int = 0,
                fused: bool = False, impl: str = "triton",
                idx: torch.Tensor | None = None, count: torch.Tensor | None = None,
                residual: torch.Tensor | None = None, swiglu: bool = False, cluster: bool = False,
                extra: tuple = (), norm: tuple | None = None, sumsq: bool = False,
                scale: torch.Tensor | None = None) -> torch.Tensor:
    """B2 (MODE_DENSE), B3 (MODE_STATIC: threshold), B4 (MODE_INDEXED: idx, count from collect), B4 over each
    program's own list (MODE_KEPT, the CUDA GEMV only: threshold () fp32 and scale (K,) fp32 or None, WINA's column
    norms; B2's split, grid and finishes, norm allowed; no collection).
    num_warps, chunks, maxnreg, ahead, acc, pipe (and ws.split): the tuned config. fused: the last program of a row
    finishes it (one launch) instead of the reduction kernel (the module docstring says why it is off).
    impl: "triton" (zigzag_mma.py) or "cuda" (zigzag_cuda.py: fp16 or bf16 x, B2 / B4, num_warps, pipe, acc and
    fused (a SwiGLU map whose N / 2 is not a multiple of 256 unfused); elsewhere Triton); the
    environment's SPQT_GEMV=cuda|triton overrides it. cluster (CUDA GEMV, sm_90): the split programs of an
    output tile are a thread block cluster that finishes it (zigzag_cuda.cluster_dims; where it cannot, the
    fused / reduction finish as configured). extra: more -D options of the CUDA GEMV (probes, e.g.
    "-DPROBE_XOR=1": its arithmetic replaced by an XOR of the loaded words, wrong sums, for timing only).
    norm (B2 or MODE_KEPT on the CUDA GEMV): (gamma (K,) fp32, sq (P,) fp32, eps): x is an RMSNorm's input, and W
    multiplies rms_norm(x) * gamma, its rstd from the sums of squares sq that the reduction before wrote (sumsq).
    sumsq (no SwiGLU, finish_plan's reduction finish): the reduction also writes ws.sumsq, its programs' sums of
    y's squares (ws.sumsq[p] over outputs p BLOCK ..., reduce_block).
    Returns ws.y (N,) in x's dtype (overwritten by the next call on the same workspace), or with
    an epilogue: residual (N,) x's dtype -> residual + W x; swiglu (W is gate|up stacked, N even)
    -> silu(gate) * up, a view ws.y[:N / 2]. w may also be a zigzag Q2_K, Q3_K, Q5_K, Q6_K or Q8_0 matrix in the CUDA
    GEMV's layout (gpu_layout_q2k.GpuQ2KPlanes, gpu_layout_q3k.GpuQ3KPlanes, gpu_layout_q5k.GpuQ5KPlanes,
    gpu_layout_q6k.GpuQ6KPlanes, gpu_layout_q8_0.GpuQ8_0Planes: B2 / B4, fp16 or bf16 x, sm_80+ with NVRTC; no Triton
    twin)."""
    if w.layout != "zigzag":
        raise ValueError("gemv_zigzag needs the zigzag layout")
    bits = TYPE_BITS[w.fmt]
    if bits != 4 and not (mode in (MODE_DENSE, MODE_INDEXED, MODE_KEPT) and zigzag_cuda.supports(x, mode)):
        raise ValueError(f"a {w.fmt} matrix in the CUDA layout runs B2 / B4 on the CUDA GEMV only (fp16 or bf16 x, "
                         f"sm_80+, NVRTC)")
    _check_x(w, x)
    if mode in (MODE_STATIC, MODE_KEPT) and threshold is None:
        raise ValueError("B3 and MODE_KEPT need the threshold")
    if mode == MODE_INDEXED and (idx is None or count is None):
        raise ValueError("B4 needs idx and count from collect()")
    if ws.y.dtype != x.dtype:
        raise ValueError(f"workspace output is {ws.y.dtype}, x is {x.dtype}")
    if num_warps not in (1, 2, 4, 8) or chunks not in (1, 2) or not (maxnreg == 0 or 24 <= maxnreg <= 255):
        raise ValueError(f"num_warps must be 1, 2, 4 or 8, chunks 1 or 2 and maxnreg 0 or 24-255, not {num_warps}, "
                         f"{chunks}, {maxnreg}")
    if ahead not in (0, 1, 2, 3, 4):
        raise ValueError(f"ahead must be 0-4 steps, not {ahead}")
    if acc not in ((2, 4, 8, 16) if impl == "cuda" else (2, 4, 16)):
        raise ValueError(f"acc must be 2, 4 or 16 accumulators (the CUDA GEMV also 8), not {acc}")
    if pipe not in (0, 1) or (pipe and chunks != 1):
        raise ValueError(f"pipe (loads one step ahead) is 0 or 1, and 1 only with one chunk a step: {pipe}, {chunks}")
    n, k = w.shape
    if residual is not None and (residual.shape != (n,) or residual.dtype != x.dtype or not residual.is_contiguous()):
        raise ValueError(f"the residual must be a contiguous ({n},) {x.dtype} vector")
    if swiglu and (n % 2 or residual is not None):
        raise ValueError("swiglu needs an even N (gate|up stacked) and no residual")
    if idx is not None and idx.numel() < k:
        raise ValueError(f"idx must hold K = {k} entries")
    dummy = ws.count
    pdl = zigzag_mma.uses_pdl(x.device)
    epilogue = EPILOGUE_SWIGLU if swiglu else EPILOGUE_RESIDUAL if residual is not None else EPILOGUE_NONE
    if impl not in ("triton", "cuda"):
        raise ValueError(f"impl must be triton or cuda, not {impl}")
    cuda, cluster, fused = finish_plan(w, x, mode, ws.split, epilogue, impl, fused, cluster)
    if not cuda and acc == 8:  # a CUDA entry run by Triton (fp32 x, no NVRTC, SPQT_GEMV=triton): acc 2
        acc = 2
    if norm is not None and not (cuda and mode in (MODE_DENSE, MODE_KEPT)):
        raise ValueError("a folded RMSNorm runs B2 or MODE_KEPT on the CUDA GEMV only (fp16 or bf16 x, sm_80+, NVRTC)")
    if mode == MODE_KEPT and not cuda:
        raise ValueError("MODE_KEPT runs on the CUDA GEMV only (impl cuda, fp16 or bf16 x, sm_80+, NVRTC)")
    if sumsq and (fused or swiglu):
        raise ValueError("the sums of squares come from the reduction kernel's finish, not SwiGLU's or a fused one")
    if cuda:
        head = {2: getattr(w, "scales", None), 6: getattr(w, "scales", None), 8: getattr(w, "d", None)}.get(
            bits, getattr(w, "head", None))
        zigzag_cuda.launch(w.quants, head, x, idx if idx is not None else dummy, count if count is not None else dummy,
                           ws.partials, k, ws.np, ws.split, mode, num_warps, pdl, pipe,
                           epilogue=epilogue if fused else -1, y=ws.y, residual=residual, counters=ws.counters, n=n,
                           acc=acc, high=getattr(w, "fifth", getattr(w, "high", None)),
                           d=getattr(w, "d", None) if bits in (2, 6) else None, bits=bits, cluster=cluster,
                           extra=extra, norm=norm, threshold=threshold if mode == MODE_KEPT else None,
                           scale=scale)
    else:
        zigzag_mma.launch(w.quants, w.head.view(torch.int64), x, threshold if threshold is not None else x,
                          idx if idx is not None else dummy, count if count is not None else dummy, ws.partials,
                          ws.y, residual if residual is not None else ws.y, ws.counters, n, k, ws.np, ws.split, mode,
                          num_warps, chunks, epilogue, fused, pdl, maxnreg, ahead, acc, pipe)
    if not fused:
        sum_shares(ws.partials, ws.y, n, ws.np, ws.split, epilogue, residual, pdl, ws.sumsq if sumsq else None)
    return ws.y[: n // 2] if swiglu else ws.y


def sum_shares(partials: torch.Tensor, y: torch.Tensor, n: int, np_: int, split: int,
               epilogue: int = EPILOGUE_NONE, residual: torch.Tensor | None = None, pdl: bool = False,
               sumsq: torch.Tensor | None = None) -> None:
    """_reduce_kernel's launch: y[i] = the sum of partials[s, i] over the split shares (partials (split, np_) fp32,
    fixed tree), i < n, then the epilogue (residual (n,) added; SwiGLU: y (n / 2,)); sumsq: its programs' sums of
    squares of y (not SwiGLU); pdl: launched under programmatic dependent launch."""
    block = reduce_block(split)
    _reduce_kernel[(triton.cdiv(n // 2 if epilogue == EPILOGUE_SWIGLU else n, block),)](
        partials, y, residual if residual is not None else y, n, np_, split, n // 2, BLOCK=block,
        SPLIT_P2=triton.next_power_of_2(split), EPILOGUE=epilogue, PDL=pdl, sq_ptr=sumsq, SUMSQ=sumsq is not None,
        num_warps=4, launch_pdl=pdl)


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


DEQUANT_BLOCKS = 16  # blocks a program of the row layout's dequant kernel


def dequantize(w: GpuQ4K, dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None) -> torch.Tensor:
    """The whole matrix, (N, K) in `dtype`: the first half of the dense prefill GEMM. w: a GpuQ4K, or a
    zigzag Q2_K / Q3_K / Q5_K / Q6_K / Q8_0 in the CUDA GEMV's layout (gpu_layout_q2k.GpuQ2KPlanes,
    gpu_layout_q3k.GpuQ3KPlanes, gpu_layout_q5k.GpuQ5KPlanes, gpu_layout_q6k.GpuQ6KPlanes,
    gpu_layout_q8_0.GpuQ8_0Planes)."""
    if w.fmt == "q4_k" and w.layout == "zigzag":  # a tile of words a program: 1.7x the block kernel's rate here
        return q4k_tiles.dequantize(w, dtype, out)
    if type_tiles.supports(w):  # the other zigzag types a tile at a time, as Q4_K
        return type_tiles.dequantize(w, dtype, out)
    if w.fmt != "q4_k" or w.layout != "row":
        raise ValueError(f"dequantize takes Q4_K or a zigzag type in the CUDA GEMV's layout, not "
                         f"{type(w).__name__} {w.layout} {w.fmt}")
    n, k = w.shape
    out = q4k_tiles.dequant_out(w, dtype, out)
    rows, cols = w.grid
    _dequant_kernel[(triton.cdiv(rows * cols, DEQUANT_BLOCKS),)](w.quants, w.head.view(torch.int64), out, n, k, cols,
                                                                 rows * cols, BLOCK_B=DEQUANT_BLOCKS, num_warps=4)
    return out
