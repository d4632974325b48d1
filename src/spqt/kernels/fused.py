"""Small fused Triton kernels for the decode step: one launch where eager torch needs several
(in a CUDA graph each launch costs at least ~1.2 us on the H100, design.md section 8).

  rms_norm   x (R, D) -> x * rsqrt(mean(x^2) + eps) * w, fp32 math, x's dtype out
  rope_kv    qkv (B, T, (H + 2 Hkv) hd) -> q rotated; k rotated and v written into the KV cache
  silu_mul   gu (R, 2F) -> silu(gu[:, :F]) * gu[:, F:]
  gelu_tanh_mul  gu (R, 2F) -> gelu_tanh(gu[:, :F]) * gu[:, F:]   (Gemma's GeGLU)
  add_rms_norm   x, y (R, D) -> x + rms_norm(y) * w   (Gemma's post-norms joining the residual)
  rms_norm_collect       one row: rms_norm, and the sparse index list of its output (collect())
  rope_attention_decode  one token: RoPE of q and k, the KV-cache write and the attention
Their torch twins are in spqt.functional, which picks one or the other.
"""

import math
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, D, eps, res_ptr, BLOCK: tl.constexpr, ADD: tl.constexpr):
    """Row r: rms_norm(x) * w; with ADD, res + that, the norm rounded to the output dtype first, then the sum."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    m = offs < D
    x = tl.load(x_ptr + row * D + offs, mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    y = x * inv * w
    if ADD:
        y = tl.load(res_ptr + row * D + offs, mask=m, other=0.0).to(tl.float32) + y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * D + offs, y.to(out_ptr.dtype.element_ty), mask=m)


def norm_warps(block: int) -> int:
    """Warps of a norm program: the same for rms_norm and rms_norm_collect, so that both sum a row
    in the same order (the same normed bits)."""
    return max(4, min(16, block // 512))


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    d = x.shape[-1]
    xc = x.contiguous()
    out = torch.empty_like(xc)
    block = triton.next_power_of_2(d)
    _rms_norm_kernel[(xc.numel() // d,)](xc, w, out, d, eps, out, BLOCK=block, ADD=False,
                                         num_warps=norm_warps(block))
    return out


@triton.jit
def _rope_kv_kernel(x_ptr, t_ptr, pos_ptr, q_ptr, k_ptr, v_ptr, H, HKV, T, L, sb, st, HALF, BLOCK: tl.constexpr):
    """One program per (b, t, head) of the stacked q|k|v heads: q heads rotated into q, k heads
    rotated and v heads copied into their caches at position pos[t]."""
    pid = tl.program_id(0)
    heads = H + 2 * HKV
    hh = pid % heads
    t = (pid // heads) % T
    b = pid // (heads * T)
    offs = tl.arange(0, BLOCK)
    m = offs < HALF
    base = x_ptr + b * sb + t * st + hh * 2 * HALF
    x1 = tl.load(base + offs, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + offs, mask=m, other=0.0).to(tl.float32)
    pos = tl.load(pos_ptr + t)
    cos = tl.load(t_ptr + pos * 2 * HALF + offs, mask=m, other=0.0)
    sin = tl.load(t_ptr + pos * 2 * HALF + HALF + offs, mask=m, other=0.0)
    if hh < H + HKV:
        r1 = x1 * cos - x2 * sin
        r2 = x2 * cos + x1 * sin
    else:
        r1 = x1
        r2 = x2
    if hh < H:
        out = q_ptr + ((b * T + t) * H + hh) * 2 * HALF
    elif hh < H + HKV:
        out = k_ptr + ((b * HKV + hh - H) * L + pos) * 2 * HALF
    else:
        out = v_ptr + ((b * HKV + hh - H - HKV) * L + pos) * 2 * HALF
    tl.store(out + offs, r1.to(q_ptr.dtype.element_ty), mask=m)
    tl.store(out + HALF + offs, r2.to(q_ptr.dtype.element_ty), mask=m)


def rope_kv(qkv: torch.Tensor, table: torch.Tensor, positions: torch.Tensor, cache_k: torch.Tensor,
            cache_v: torch.Tensor, n_heads: int, n_kv: int) -> torch.Tensor:
    """qkv (B, T, (H + 2 Hkv) hd), unit last stride; table (L_max, hd) fp32; positions (T,) int64;
    caches (B, Hkv, L, hd) contiguous, qkv's dtype. Returns q (B, T, H, hd) contiguous."""
    b, t, _ = qkv.shape
    hd = cache_k.shape[-1]
    if qkv.stride(2) != 1:
        qkv = qkv.contiguous()
    q = torch.empty((b, t, n_heads, hd), dtype=qkv.dtype, device=qkv.device)
    _rope_kv_kernel[(b * t * (n_heads + 2 * n_kv),)](
        qkv, table, positions, q, cache_k, cache_v, n_heads, n_kv, t, cache_k.shape[2], qkv.stride(0), qkv.stride(1),
        hd // 2, BLOCK=triton.next_power_of_2(hd // 2), num_warps=1)
    return q


@triton.jit
def _gate_mul_kernel(gu_ptr, out_ptr, F, BLOCK: tl.constexpr, GELU: tl.constexpr):
    """Program (row, slice): act(gate) * up of a row of stacked gate|up, act silu, or (GELU) gelu_tanh rounded to the
    output dtype first (torch's F.gelu's result, then the product)."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < F
    g = tl.load(gu_ptr + row * 2 * F + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * F + F + offs, mask=m, other=0.0).to(tl.float32)
    if GELU:
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2 / pi) (g + 0.044715 g^3)
        z = tl.minimum(tl.maximum(z, -15.0), 15.0)  # tanh is +-1 in fp32 past 9: no exp overflow
        tanh = 1.0 - 2.0 / (1.0 + tl.exp(2.0 * z))
        y = (0.5 * g * (1.0 + tanh)).to(out_ptr.dtype.element_ty).to(tl.float32) * u
    else:
        y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * F + offs, y.to(out_ptr.dtype.element_ty), mask=m)


def _gated(gu: torch.Tensor, f: int, gelu: bool) -> torch.Tensor:
    """_gate_mul_kernel over gu (..., 2F) stacked gate|up -> (..., F) in gu's dtype."""
    g = gu.contiguous()
    rows = g.numel() // (2 * f)
    out = torch.empty((*g.shape[:-1], f), dtype=g.dtype, device=g.device)
    block = 1024
    _gate_mul_kernel[(rows, triton.cdiv(f, block))](g, out, f, BLOCK=block, GELU=gelu, num_warps=4)
    return out


def silu_mul(gu: torch.Tensor, f: int) -> torch.Tensor:
    return _gated(gu, f, gelu=False)


def gelu_tanh_mul(gu: torch.Tensor, f: int) -> torch.Tensor:
    """gu (..., 2F) stacked gate|up -> gelu_tanh(gate) * up (..., F) in gu's dtype, one launch (functional's torch
    twin: F.gelu(approximate="tanh"), rounded, then the product)."""
    return _gated(gu, f, gelu=True)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x + rms_norm(y) * w for x, y (..., D) of one dtype, w (D,): one launch instead of rms_norm's and the sum's
    (Gemma's post-norms; the norm's arithmetic and warps rms_norm's, so the normed values are its bits)."""
    d = x.shape[-1]
    xc, yc = x.contiguous(), y.contiguous()
    out = torch.empty_like(xc)
    block = triton.next_power_of_2(d)
    _rms_norm_kernel[(xc.numel() // d,)](yc, w, out, d, eps, xc, BLOCK=block, ADD=True, num_warps=norm_warps(block))
    return out


@triton.jit
def _rms_norm_collect_kernel(x_ptr, w_ptr, out_ptr, t_ptr, idx_ptr, count_ptr, D, eps, scale_ptr,
                             BLOCK: tl.constexpr, SEGMENT: tl.constexpr, PDL: tl.constexpr, HAS_SCALE: tl.constexpr):
    """One row, program p owns segment p: out = rms_norm(x) there, in out's dtype, and the
    ascending k with |out_k| > t (the stored, rounded value, as collect() would see it; with a
    scale, |out_k| * scale_k > t, WINA) at their list positions. Every program normalises the whole row (x is small and L2-resident) to count
    the kept entries before its segment: no atomics, one round trip, the same list every run.
    The last program writes the count."""
    pid = tl.program_id(0)
    if PDL:  # launched while the kernel before it finishes: x is read after it is written
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    offs = tl.arange(0, BLOCK)
    m = offs < D
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    t = tl.load(t_ptr)
    start = pid * SEGMENT
    mb = offs < start
    xb = tl.where(mb, x, 0.0)
    wb = tl.load(w_ptr + offs, mask=mb, other=0.0).to(tl.float32)
    ab = tl.abs((xb * inv * wb).to(out_ptr.dtype.element_ty).to(tl.float32))
    if HAS_SCALE:
        ab = ab * tl.load(scale_ptr + offs, mask=mb, other=0.0)
    before = tl.sum(((ab > t) & mb).to(tl.int32), axis=0)
    k = start + tl.arange(0, SEGMENT)
    mk = k < D
    xs = tl.load(x_ptr + k, mask=mk, other=0.0).to(tl.float32)
    ws = tl.load(w_ptr + k, mask=mk, other=0.0).to(tl.float32)
    y = (xs * inv * ws).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + k, y, mask=mk)
    a = tl.abs(y.to(tl.float32))
    if HAS_SCALE:
        a = a * tl.load(scale_ptr + k, mask=mk, other=0.0)
    keep = (a > t) & mk
    keep_i = keep.to(tl.int32)
    tl.store(idx_ptr + before + tl.cumsum(keep_i, axis=0) - 1, k, mask=keep)
    if pid == tl.num_programs(0) - 1:
        tl.store(count_ptr, before + tl.sum(keep_i, axis=0))


def rms_norm_collect(x: torch.Tensor, w: torch.Tensor, eps: float, threshold: torch.Tensor, out: torch.Tensor,
                     idx: torch.Tensor, count: torch.Tensor, segment: int = 256,
                     scale: torch.Tensor | None = None) -> torch.Tensor:
    """The RMSNorm in front of a sparse linear map and the map's index collection in one launch
    (one token). x (D,) contiguous; w (D,) fp32; threshold () fp32; out (D,) x's dtype; idx (>= D,)
    int32 and count () int32 as collect() writes them (entries past the count untouched); scale
    (D,) fp32 or None, as collect()'s. Returns out.
    (Saves the collect launch of the q|k|v and gate|up inputs, 2.5 us a call on the H200. One
    program for the whole row took 5.5 us at D = 4096: the scan of 4096 entries in one program.)"""
    from spqt.kernels.zigzag_mma import uses_pdl

    d = x.shape[-1]
    if x.numel() != d or out.numel() != d or idx.numel() < d:
        raise ValueError(f"rms_norm_collect takes one row of {d}: x {tuple(x.shape)}, out {tuple(out.shape)}, "
                         f"idx {tuple(idx.shape)}")
    block = triton.next_power_of_2(d)
    pdl = uses_pdl(x.device)
    if scale is not None and (scale.shape != (d,) or scale.dtype != torch.float32 or not scale.is_contiguous()):
        raise ValueError(f"rms_norm_collect expects a contiguous fp32 ({d},) scale")
    _rms_norm_collect_kernel[(triton.cdiv(d, segment),)](
        x, w, out, threshold, idx, count, d, eps, w if scale is None else scale, BLOCK=block, SEGMENT=segment,
        PDL=pdl, HAS_SCALE=scale is not None, num_warps=norm_warps(block), launch_pdl=pdl)
    return out


ATTN_BLOCK_N = 64  # keys of a program of the decode attention; fixed, so any span adds in the same order
ATTN_COMBINE_GROUP = 32  # key blocks the decode attention's combination merges at once (in order, group by group)
# The long spans' merge: a program per query head and slice of this many columns of hd, this many blocks at once
ATTN_LONG_COMBINE_COLS, ATTN_LONG_COMBINE_GROUP = 32, 128
ATTN_PREFETCH_BLOCKS = 7  # a program's later key blocks asked of L2 ahead of the one it attends to
# Which kernels a decode token's attention runs (decode_attention_route). Both spans are powers of two from
# generate.KV_BUCKET_MIN, so that a graph's key bucket (a power of two from it, or the cache's length) and an eager
# step's span (pos + 1 keys) pick the same kernels at every position. H200, step device time (docs/RESULTS.md,
# twentieth session): grouped-query models past 512 keys run the long spans' two launches (a program per kv head and
# key block, then a merge per query head): against the per-head kernel -1.3 % (Llama-3-8B) and -2.7 % (70B) at 700
# keys, -5.7 % / -8.4 % at 1,500; against torch's attention -5.3 % / -1.1 % at 3,000, level (8B) at 7,000. The others
# run the per-head kernel up to 2,048 keys and torch's attention past them (there the long launches lost 3 % of the
# 7B's step).
ATTN_LONG_FROM = 512
ATTN_PER_HEAD_MAX = 2048
ATTN_LONG_GROUPED_ONLY = 1  # 0: models without grouped queries take the long spans' kernels too (a probe's setting)


def attention_long_warps(hd: int) -> int:
    """Warps of the long spans' first kernel: 4, and 8 from hd 256 (Gemma's), where 4 spill 928-936 bytes of stack
    a thread and 8 none (compiled for sm_90: docs/RESULTS.md, forty-first session; the speed not yet measured).
    SPQT_ATTN_LONG_WARPS=4 forces 4 (measurement)."""
    if hd >= 256 and os.environ.get("SPQT_ATTN_LONG_WARPS", "") != "4":
        return 8
    return 4


def decode_attention_route(length: int, n_heads: int, n_kv: int, hd: int, window: int = 0) -> str:
    """The kernels of one decode token's attention over `length` keys, or over the last `window` of them at most (a
    sliding layer's window; 0: none): "long" (_rope_attention_blocks_kernel, then _attention_combine_kernel),
    "per-head" (_rope_attention_decode_kernel) or "torch" (rope_kv and torch's attention, functional.attention's).
    Long needs hd >= 32 (its dots' K = hd / 2 >= 16) and grouped queries (unless ATTN_LONG_GROUPED_ONLY is 0)."""
    if window:
        length = min(length, window)
    if length > ATTN_LONG_FROM and (n_heads > n_kv or not ATTN_LONG_GROUPED_ONLY) and hd >= 32:
        return "long"
    return "per-head" if length <= ATTN_PER_HEAD_MAX else "torch"


# The decode attention's kernels take a half of hd as d = tl.arange(0, HP), HP the next power of two of HALF = hd / 2
# (Phi-3's hd 96: 48 of 64 lanes), every access to a half masked with d < HALF (Triton drops the mask where HP is
# HALF: the power-of-two head dims compile as without it, scripts/attention_sass.py), and a sliding window by a
# WINDOWED constexpr (off: the code of a model without one, no mask of the window's start).


@triton.jit
def _window(pos, window, BLOCK_N: tl.constexpr, WINDOWED: tl.constexpr):
    """(low, s): the keys at or below low lie outside the sliding window of `window` keys that ends at pos (WINDOWED;
    else none do: -1), s the key block that holds the window's first key (0 without one)."""
    if WINDOWED:
        low = pos - window
        return low, tl.maximum(low + 1, 0) // BLOCK_N
    else:
        return -1, 0


@triton.jit
def _seen(n, pos, low, WINDOWED: tl.constexpr):
    """Whether the keys n (any shape) are seen by the token at pos: at or below pos and, in a window, above low."""
    if WINDOWED:
        return (n <= pos) & (n > low)
    else:
        return n <= pos


@triton.jit
def _normed(x1, x2, inv, w_ptr, at, m, HALF: tl.constexpr, dt: tl.constexpr):
    """A head's halves x1, x2 (fp32; or a group's, a head a row) times inv (a head's RMS scale, _head_norm's, or all of
    q's or k's, _whole_scale's) and their weights at w_ptr + at and at + HALF (m: the loads' mask), rounded to dt as
    the unfused path stores them, back in fp32."""
    w1 = tl.load(w_ptr + at, mask=m, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + at + HALF, mask=m, other=0.0).to(tl.float32)
    return (x1 * inv * w1).to(dt).to(tl.float32), (x2 * inv * w2).to(dt).to(tl.float32)


@triton.jit
def _head_norm(x1, x2, w_ptr, eps, d, HALF: tl.constexpr, dt: tl.constexpr):
    """A head's RMSNorm (Qwen3's, Gemma 3's q / k norm) of its halves x1, x2 (fp32, 0 past HALF; (HP,) or one head a
    row, (rows, HP)) times the norm's weight (hd,) fp32 at w_ptr, rounded to dt as the unfused path stores it (the
    rms_norm kernel's formula; the halves summed apart, so an ulp of dt off functional.norm_heads at times: graphs and
    eager steps take the same kernels), back in fp32."""
    axis: tl.constexpr = len(x1.shape) - 1
    sq = tl.sum(x1 * x1, axis=axis, keep_dims=True) + tl.sum(x2 * x2, axis=axis, keep_dims=True)
    return _normed(x1, x2, 1.0 / tl.sqrt(sq / (2 * HALF) + eps), w_ptr, d, d < HALF, HALF, dt)


@triton.jit
def _whole_scale(x_ptr, n, eps, NP: tl.constexpr, CH: tl.constexpr):
    """OLMo 2's q or k norm: 1 / sqrt(mean(x^2) + eps) over the n values at x_ptr (all heads of q, or all of k; NP the
    next power of two of n, read CH at a time), fp32 (the rms_norm kernel's formula, summed in another order)."""
    offs = tl.arange(0, CH)
    acc = tl.zeros((CH,), tl.float32)
    for c in tl.static_range(NP // CH):
        x = tl.load(x_ptr + c * CH + offs, mask=c * CH + offs < n, other=0.0).to(tl.float32)
        acc += x * x
    return 1.0 / tl.sqrt(tl.sum(acc, axis=0) / n + eps)


@triton.jit
def _new_kv(base, cos, sin, H, HKV, j, d, kw_ptr, eps, HALF: tl.constexpr, dt: tl.constexpr, QK_NORM: tl.constexpr,
            KN: tl.constexpr = 1, KC: tl.constexpr = 1):
    """Kv head j's new key (its norm where QK_NORM: 1 the head's, 2 all of k's, KN the next power of two of their
    count, read KC at a time; then RoPE) and value from the q|k|v row at base, in the cache dtype dt: the two halves
    of hd of each (0 past HALF)."""
    dm = d < HALF
    k1 = tl.load(base + (H + j) * 2 * HALF + d, mask=dm, other=0.0).to(tl.float32)
    k2 = tl.load(base + (H + j) * 2 * HALF + HALF + d, mask=dm, other=0.0).to(tl.float32)
    if QK_NORM == 1:
        k1, k2 = _head_norm(k1, k2, kw_ptr, eps, d, HALF, dt)
    elif QK_NORM == 2:
        inv = _whole_scale(base + H * 2 * HALF, HKV * 2 * HALF, eps, KN, KC)
        k1, k2 = _normed(k1, k2, inv, kw_ptr, j * 2 * HALF + d, dm, HALF, dt)
    kn1 = (k1 * cos - k2 * sin).to(dt)
    kn2 = (k2 * cos + k1 * sin).to(dt)
    vn1 = tl.load(base + (H + HKV + j) * 2 * HALF + d, mask=dm, other=0.0).to(dt)
    vn2 = tl.load(base + (H + HKV + j) * 2 * HALF + HALF + d, mask=dm, other=0.0).to(dt)
    return kn1, kn2, vn1, vn2


@triton.jit
def _store_new_kv(k_ptr, v_ptr, cache, pos, d, kn1, kn2, vn1, vn2, HALF: tl.constexpr):
    """The new key and value (_new_kv's halves) into the caches' row pos."""
    dm = d < HALF
    tl.store(k_ptr + cache + pos * 2 * HALF + d, kn1, mask=dm)
    tl.store(k_ptr + cache + pos * 2 * HALF + HALF + d, kn2, mask=dm)
    tl.store(v_ptr + cache + pos * 2 * HALF + d, vn1, mask=dm)
    tl.store(v_ptr + cache + pos * 2 * HALF + HALF + d, vn2, mask=dm)


@triton.jit
def _prefetch_rows(ptr, rows, W: tl.constexpr):
    """Ask L2 for the first `rows` rows of W bytes at ptr (bytes), one 128-byte line a lane."""
    line = tl.arange(0, 128)
    for i in range(0, rows * (W // 128), 128):
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l",
                                  [(ptr + (i + line) * 128).to(tl.int64)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _load_block(k_ptr, v_ptr, cache, first, pos, low, d, HALF: tl.constexpr, BLOCK_N: tl.constexpr,
                WINDOWED: tl.constexpr):
    """The cached keys and values first .. first + BLOCK_N - 1 below pos (and above low: WINDOWED; 0 elsewhere), in
    the cache dtype: the two halves of hd of each."""
    n = first + tl.arange(0, BLOCK_N)
    if WINDOWED:
        old = (n < pos) & (n > low)
    else:
        old = n < pos
    old = old[:, None] & (d < HALF)[None, :]
    rows = cache + n[:, None] * 2 * HALF + d[None, :]
    return (tl.load(k_ptr + rows, mask=old, other=0.0), tl.load(k_ptr + rows + HALF, mask=old, other=0.0),
            tl.load(v_ptr + rows, mask=old, other=0.0), tl.load(v_ptr + rows + HALF, mask=old, other=0.0))


@triton.jit
def _soft_cap(s, SOFTCAP: tl.constexpr):
    """Gemma 2's cap of attention scores s (fp32), SOFTCAP * tanh(s / SOFTCAP), from exp alone (the interpreter has
    no tanh): tanh |x| = (1 - e) / (1 + e) with e = exp(-2 |x|) in (0, 1], which never overflows; the sign put back.
    Against tanh: within 9e-8 absolute with the CPU's float32 exp (the interpreter's), times SOFTCAP; the GPU's exp is
    approximate (ex2.approx), a few ulp more (not measured). A non-finite s stays itself (functional.soft_cap's
    rule: an overflow is not capped into a finite score)."""
    e = tl.exp(-2.0 * tl.abs(s) / SOFTCAP)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(tl.abs(s) < float("inf"), tl.where(s < 0, -t, t) * SOFTCAP, s)


@triton.jit
def _attend_loaded(c1, c2, u1, u2, first, pos, low, r1, r2, kn1, kn2, vn1, vn2, scale, BLOCK_N: tl.constexpr,
                   WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr):
    """Keys first .. first + BLOCK_N - 1 (those seen from pos, _seen: at least one) of one query, the cached ones
    loaded (_load_block): the scores' max m, sum l of exp(score - m) and the unnormalized sums of p v (two halves of
    hd). The key at pos is the new one (kn, vn; its cache row may be in flight). SOFTCAP: Gemma 2's cap of the
    scores (_soft_cap), 0.0: none."""
    n = first + tl.arange(0, BLOCK_N)
    new = (n == pos)[:, None]
    c1 = tl.where(new, kn1.to(tl.float32)[None, :], c1.to(tl.float32))
    c2 = tl.where(new, kn2.to(tl.float32)[None, :], c2.to(tl.float32))
    s = (tl.sum(c1 * r1[None, :], axis=1) + tl.sum(c2 * r2[None, :], axis=1)) * scale
    if SOFTCAP > 0.0:  # (a float constexpr: a compiled `if` takes a comparison, not the float)
        s = _soft_cap(s, SOFTCAP)
    s = tl.where(_seen(n, pos, low, WINDOWED), s, -float("inf"))
    m = tl.max(s, axis=0)
    p = tl.exp(s - m)
    u1 = tl.where(new, vn1.to(tl.float32)[None, :], u1.to(tl.float32))
    u2 = tl.where(new, vn2.to(tl.float32)[None, :], u2.to(tl.float32))
    return m, tl.sum(p, axis=0), tl.sum(p[:, None] * u1, axis=0), tl.sum(p[:, None] * u2, axis=0)


@triton.jit
def _prefetch_block(k_ptr, v_ptr, cache, blk, pos, HALF: tl.constexpr, BLOCK_N: tl.constexpr):
    """Ask L2 for key block blk's cached keys and values (its rows below pos), where a row is whole 128-byte lines."""
    row_bytes: tl.constexpr = 2 * HALF * k_ptr.dtype.element_ty.primitive_bitwidth // 8
    if row_bytes % 128 == 0:
        cached = cache + blk * BLOCK_N * 2 * HALF
        rows = tl.minimum(pos - blk * BLOCK_N, BLOCK_N)
        _prefetch_rows((k_ptr + cached).to(tl.pointer_type(tl.int8)), rows, row_bytes)
        _prefetch_rows((v_ptr + cached).to(tl.pointer_type(tl.int8)), rows, row_bytes)


@triton.jit
def _prefetch_then_wait(k_ptr, v_ptr, cache, prog, programs, blocks, pos, HALF: tl.constexpr, BLOCK_N: tl.constexpr,
                        AHEAD: tl.constexpr):
    """PDL: ask L2 for a program's next AHEAD key blocks (_prefetch_block), then wait for the kernel before this one
    and release the next."""
    for blk in range(prog + programs, tl.minimum(blocks, prog + (AHEAD + 1) * programs), programs):
        _prefetch_block(k_ptr, v_ptr, cache, blk, pos, HALF, BLOCK_N)
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _first_block(k_ptr, v_ptr, t_ptr, cache, prog, programs, blocks, pos, low, d, HALF: tl.constexpr,
                 BLOCK_N: tl.constexpr, AHEAD: tl.constexpr, PDL: tl.constexpr, WINDOWED: tl.constexpr):
    """A program's first key block, prog, loaded (its cached rows in low < key < pos: no kernel of this step writes
    them), then (PDL) its next AHEAD blocks (prog + programs, ... below blocks) asked of L2 and the wait for the kernel
    before; the RoPE table's cos and sin of pos."""
    kc1, kc2, vc1, vc2 = _load_block(k_ptr, v_ptr, cache, prog * BLOCK_N, pos, low, d, HALF, BLOCK_N, WINDOWED)
    if PDL:
        _prefetch_then_wait(k_ptr, v_ptr, cache, prog, programs, blocks, pos, HALF, BLOCK_N, AHEAD)
    cos = tl.load(t_ptr + pos * 2 * HALF + d, mask=d < HALF, other=0.0)
    sin = tl.load(t_ptr + pos * 2 * HALF + HALF + d, mask=d < HALF, other=0.0)
    return kc1, kc2, vc1, vc2, cos, sin


@triton.jit
def _next_block(k_ptr, v_ptr, cache, blk, programs, blocks, pos, low, d, HALF: tl.constexpr, BLOCK_N: tl.constexpr,
                AHEAD: tl.constexpr, PDL: tl.constexpr, WINDOWED: tl.constexpr):
    """A program's later key block blk loaded (_load_block), after asking L2 for its block AHEAD on (PDL: Hopper's
    path; the interpreter has no PTX)."""
    if PDL and blk + AHEAD * programs < blocks:
        _prefetch_block(k_ptr, v_ptr, cache, blk + AHEAD * programs, pos, HALF, BLOCK_N)
    return _load_block(k_ptr, v_ptr, cache, blk * BLOCK_N, pos, low, d, HALF, BLOCK_N, WINDOWED)


@triton.jit
def _combine_blocks(part_ptr, ml_ptr, head, start, blocks, slots, cols, out, HD: tl.constexpr, GROUP: tl.constexpr):
    """Columns `cols` (offsets into the head's HD; a power of two of them, those past HD masked) of a query head's
    output at out, from its blocks' scratch sums (slots head slots + i, start <= i < blocks; a slot's sums HD fp32):
    GROUP blocks at once in one fixed shape (the missing ones masked), the groups merged in order (a running max; the
    first group's sums exactly as a single merge's)."""
    wider: tl.constexpr = cols.shape[0] > HD  # a padded row (the per-head kernel's at an hd past a power of two)
    run_m = -float("inf")
    total = 0.0
    acc = tl.zeros(cols.shape, dtype=tl.float32)
    for first in range(start, blocks, GROUP):
        i = first + tl.arange(0, GROUP)
        got = i < blocks
        at = head * slots + i
        # .cg: from L2, where the other programs' stores are (never a stale L1 line)
        mi = tl.load(ml_ptr + 2 * at, mask=got, other=-float("inf"), cache_modifier=".cg")
        li = tl.load(ml_ptr + 2 * at + 1, mask=got, other=0.0, cache_modifier=".cg")
        mg = tl.max(mi, axis=0)
        w = tl.exp(mi - mg)
        if wider:
            a = tl.load(part_ptr + at[:, None] * HD + cols[None, :], mask=got[:, None] & (cols < HD)[None, :],
                        other=0.0, cache_modifier=".cg")
        else:
            a = tl.load(part_ptr + at[:, None] * HD + cols[None, :], mask=got[:, None], other=0.0, cache_modifier=".cg")
        new_m = tl.maximum(run_m, mg)
        keep = tl.exp(run_m - new_m)  # 0 for the first group (run_m = -inf; mg is finite: block `first` exists)
        add = tl.exp(mg - new_m)
        total = total * keep + tl.sum(li * w, axis=0) * add
        acc = acc * keep + tl.sum(a * w[:, None], axis=0) * add
        run_m = new_m
    if wider:
        tl.store(out + cols, (acc / total).to(out.dtype.element_ty), mask=cols < HD)
    else:
        tl.store(out + cols, (acc / total).to(out.dtype.element_ty))


@triton.jit
def _rope_attention_decode_kernel(x_ptr, t_ptr, pos_ptr, k_ptr, v_ptr, o_ptr, part_ptr, ml_ptr, cnt_ptr, H, HKV, L,
                                  length, window, sx, scale, slots, qw_ptr, kw_ptr, eps, HALF: tl.constexpr,
                                  HP: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, AHEAD: tl.constexpr,
                                  PDL: tl.constexpr, WINDOWED: tl.constexpr, QK_NORM: tl.constexpr,
                                  SOFTCAP: tl.constexpr, QN: tl.constexpr = 1, QC: tl.constexpr = 1,
                                  KN: tl.constexpr = 1, KC: tl.constexpr = 1):
    """Program (h, p, b): query head h of sequence b at position pos (one new token), key blocks
    s + p, s + p + P, ... (P programs a head, BLOCK_N keys a block) of the span 0 .. pos, or with WINDOWED (a sliding
    layer's) pos - window < key <= pos, s its first block (flash-decoding). hd = 2 HALF, HP the next power of two
    of HALF. QK_NORM: q and the new k normed first (1: each head's RMSNorm, weights (hd,) at qw_ptr / kw_ptr, eps;
    2: OLMo 2's over all of q and all of k, weights (H hd,) and (HKV hd,), QN / KN the next powers of two of H hd and
    HKV hd, summed QC / KC at a time: every program sums the row's squares itself). SOFTCAP: Gemma 2's cap of the
    scores (_soft_cap), 0.0: none.
    RoPE of its q, its kv head's new k (RoPE) and v (the program of the block holding pos, of the
    group's first query head, writes them into the cache). A span of one block: its softmax(q k^T
    scale) v is stored. Else each block's max m, sum l and unnormalized sum of p v go to the head's
    scratch slot of that block, each program counts its arrival, and the last to arrive combines the
    blocks (_combine_blocks: GROUP at a time, in order; `slots` scratch slots a head): a block's sums
    and the combination depend on the position only, not on P or the span's bucket. While it attends
    to a block, a program asks L2 for its block AHEAD on.
    PDL: until griddepcontrol.wait it reads only what earlier steps wrote (the position, copied in
    before the step, its first block's cached keys and values, into registers, and its later blocks', asked
    of L2), then q|k|v: after the wait, one round trip for q|k|v before the first block's scores, not three. The position
    decides which programs work, so it must never be written by a kernel of the same step. Program 0
    always has a block and waits: that keeps the PDL chain (a launch completes only after its wait,
    hence after the launch before it), on which the scratch's reuse by the next layer relies."""
    h = tl.program_id(0)
    prog = tl.program_id(1)
    b = tl.program_id(2)
    programs = tl.num_programs(1)
    group = H // HKV
    j = h // group
    d = tl.arange(0, HP)
    dm = d < HALF
    pos = tl.load(pos_ptr)
    low, start = _window(pos, window, BLOCK_N, WINDOWED)
    blocks = tl.cdiv(tl.minimum(pos + 1, length), BLOCK_N)  # the span's blocks: start .. blocks - 1
    cache = ((b * HKV + j) * L) * 2 * HALF
    if prog < blocks - start:
        mine = start + prog
        kc1, kc2, vc1, vc2, cos, sin = _first_block(k_ptr, v_ptr, t_ptr, cache, mine, programs, blocks, pos, low, d,
                                                    HALF, BLOCK_N, AHEAD, PDL, WINDOWED)
        base = x_ptr + b * sx
        q1 = tl.load(base + h * 2 * HALF + d, mask=dm, other=0.0).to(tl.float32)
        q2 = tl.load(base + h * 2 * HALF + HALF + d, mask=dm, other=0.0).to(tl.float32)
        dt = o_ptr.dtype.element_ty
        if QK_NORM == 1:
            q1, q2 = _head_norm(q1, q2, qw_ptr, eps, d, HALF, dt)
        elif QK_NORM == 2:
            q1, q2 = _normed(q1, q2, _whole_scale(base, H * 2 * HALF, eps, QN, QC), qw_ptr, h * 2 * HALF + d, dm,
                                   HALF, dt)
        # rounded to the cache dtype as the unfused path stores q and k before attending
        r1 = (q1 * cos - q2 * sin).to(dt).to(tl.float32)
        r2 = (q2 * cos + q1 * sin).to(dt).to(tl.float32)
        kn1, kn2, vn1, vn2 = _new_kv(base, cos, sin, H, HKV, j, d, kw_ptr, eps, HALF, dt, QK_NORM, KN, KC)
        if (h % group == 0) & ((blocks - 1 - start) % programs == prog):
            _store_new_kv(k_ptr, v_ptr, cache, pos, d, kn1, kn2, vn1, vn2, HALF)
        head = b * H + h
        out = o_ptr + head * 2 * HALF
        m, l_sum, acc1, acc2 = _attend_loaded(kc1, kc2, vc1, vc2, mine * BLOCK_N, pos, low, r1, r2, kn1, kn2, vn1, vn2,
                                              scale, BLOCK_N, WINDOWED, SOFTCAP)  # block mine (one: the whole span)
        if blocks - start == 1:
            tl.store(out + d, (acc1 / l_sum).to(dt), mask=dm)
            tl.store(out + HALF + d, (acc2 / l_sum).to(dt), mask=dm)
        else:
            for blk in range(mine, blocks, programs):
                if blk != mine:
                    kc1, kc2, vc1, vc2 = _next_block(k_ptr, v_ptr, cache, blk, programs, blocks, pos, low, d, HALF,
                                                     BLOCK_N, AHEAD, PDL, WINDOWED)
                    m, l_sum, acc1, acc2 = _attend_loaded(kc1, kc2, vc1, vc2, blk * BLOCK_N, pos, low, r1, r2, kn1, kn2,
                                                          vn1, vn2, scale, BLOCK_N, WINDOWED, SOFTCAP)
                slot = head * slots + blk
                tl.store(part_ptr + slot * 2 * HALF + d, acc1, mask=dm)
                tl.store(part_ptr + slot * 2 * HALF + HALF + d, acc2, mask=dm)
                tl.store(ml_ptr + 2 * slot, m)
                tl.store(ml_ptr + 2 * slot + 1, l_sum)
            # acq_rel at GPU scope after a barrier (zigzag_mma._arrive's): every block's stores are seen by the last
            tl.debug_barrier()
            ticket = tl.atomic_add(cnt_ptr + head, 1, sem="acq_rel", scope="gpu")
            if ticket == tl.minimum(blocks - start, programs) - 1:
                tl.debug_barrier()
                tl.store(cnt_ptr + head, 0)  # zero for the next launch
                _combine_blocks(part_ptr, ml_ptr, head, start, blocks, slots, tl.arange(0, 2 * HP), out, 2 * HALF,
                                GROUP)


@triton.jit
def _attend_group(c1, c2, u1, u2, first, pos, low, r1, r2, kn1, kn2, vn1, vn2, scale, BLOCK_N: tl.constexpr,
                  PREC: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr):
    """_attend_loaded for the GP query rows of a kv head's group at once (r1, r2 (GP, HALF) in the cache dtype; rows
    past the group's heads are zero and never stored): per row the scores' max m (GP,), sum l (GP,) and the
    unnormalized sums of p v (GP, HALF) halves, as tensor-core dots with fp32 sums (PREC "ieee" for fp32 caches: no
    TF32). The scores' products are exact (fp16 / bf16 operands); p is rounded to the cache dtype for p v, as
    flash attention does (the per-head kernel keeps it in fp32). SOFTCAP: Gemma 2's cap of the scores (_soft_cap),
    0.0: none."""
    n = first + tl.arange(0, BLOCK_N)
    new = (n == pos)[:, None]
    c1 = tl.where(new, kn1[None, :], c1)
    c2 = tl.where(new, kn2[None, :], c2)
    s = (tl.dot(r1, tl.trans(c1), input_precision=PREC) + tl.dot(r2, tl.trans(c2), input_precision=PREC)) * scale
    if SOFTCAP > 0.0:  # (a float constexpr: a compiled `if` takes a comparison, not the float)
        s = _soft_cap(s, SOFTCAP)
    s = tl.where(_seen(n, pos, low, WINDOWED)[None, :], s, -float("inf"))
    m = tl.max(s, axis=1)
    p = tl.exp(s - m[:, None])
    u1 = tl.where(new, vn1[None, :], u1)
    u2 = tl.where(new, vn2[None, :], u2)
    pd = p.to(u1.dtype)
    return m, tl.sum(p, axis=1), tl.dot(pd, u1, input_precision=PREC), tl.dot(pd, u2, input_precision=PREC)


@triton.jit
def _rope_attention_blocks_kernel(x_ptr, t_ptr, pos_ptr, k_ptr, v_ptr, part_ptr, ml_ptr, H, HKV, L, length, window, sx,
                                  scale, slots, qw_ptr, kw_ptr, eps, HALF: tl.constexpr, HP: tl.constexpr,
                                  BLOCK_N: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, AHEAD: tl.constexpr,
                                  PREC: tl.constexpr, PDL: tl.constexpr, WINDOWED: tl.constexpr,
                                  QK_NORM: tl.constexpr, SOFTCAP: tl.constexpr, QN: tl.constexpr = 1,
                                  QC: tl.constexpr = 1, KN: tl.constexpr = 1, KC: tl.constexpr = 1):
    """The long spans' first launch: program (j, p, b) takes the G = H / HKV query heads of kv head j of sequence b
    (GP >= 16 rows, a power of two, the ones past G masked) over key blocks s + p, s + p + P, ... of the per-head
    kernel's span (HALF, HP, WINDOWED, QK_NORM, SOFTCAP, QN, QC, KN and KC as there), so each cached block is read
    once for its group (the per-head kernel reads it G times). RoPE of the group's q, the new k (RoPE) and v, written
    into the cache by the program of the block holding pos. Every block's max m, sum l and unnormalized sums of p v go
    to its query heads' scratch slots (`slots` a head); _attention_combine_kernel merges them. A block's sums depend on
    the position only, not on P or the span's bucket. PDL as the per-head kernel's: the first block loaded and the next
    AHEAD asked of L2 before the wait. At hd 256 it runs 8 warps (attention_long_warps: 4 spill 928-936 bytes of
    stack a thread, compiled for sm_90: scripts/attention_sass.py)."""
    j = tl.program_id(0)
    prog = tl.program_id(1)
    b = tl.program_id(2)
    programs = tl.num_programs(1)
    d = tl.arange(0, HP)
    g = tl.arange(0, GP)
    real = g < G
    both = real[:, None] & (d < HALF)[None, :]
    pos = tl.load(pos_ptr)
    low, start = _window(pos, window, BLOCK_N, WINDOWED)
    blocks = tl.cdiv(tl.minimum(pos + 1, length), BLOCK_N)
    cache = ((b * HKV + j) * L) * 2 * HALF
    if prog < blocks - start:
        mine = start + prog
        kc1, kc2, vc1, vc2, cos, sin = _first_block(k_ptr, v_ptr, t_ptr, cache, mine, programs, blocks, pos, low, d,
                                                    HALF, BLOCK_N, AHEAD, PDL, WINDOWED)
        base = x_ptr + b * sx
        h = j * G + g
        rows_q = base + h[:, None] * 2 * HALF + d[None, :]
        q1 = tl.load(rows_q, mask=both, other=0.0).to(tl.float32)
        q2 = tl.load(rows_q + HALF, mask=both, other=0.0).to(tl.float32)
        dt = k_ptr.dtype.element_ty
        if QK_NORM == 1:
            q1, q2 = _head_norm(q1, q2, qw_ptr, eps, d, HALF, dt)
        elif QK_NORM == 2:
            q1, q2 = _normed(q1, q2, _whole_scale(base, H * 2 * HALF, eps, QN, QC), qw_ptr,
                                   h[:, None] * 2 * HALF + d[None, :], both, HALF, dt)
        # rounded to the cache dtype as the unfused path stores q and k before attending
        r1 = (q1 * cos[None, :] - q2 * sin[None, :]).to(dt)
        r2 = (q2 * cos[None, :] + q1 * sin[None, :]).to(dt)
        kn1, kn2, vn1, vn2 = _new_kv(base, cos, sin, H, HKV, j, d, kw_ptr, eps, HALF, dt, QK_NORM, KN, KC)
        if (blocks - 1 - start) % programs == prog:
            _store_new_kv(k_ptr, v_ptr, cache, pos, d, kn1, kn2, vn1, vn2, HALF)
        at = (b * H + h) * slots
        for blk in range(mine, blocks, programs):
            if blk != mine:
                kc1, kc2, vc1, vc2 = _next_block(k_ptr, v_ptr, cache, blk, programs, blocks, pos, low, d, HALF, BLOCK_N,
                                                 AHEAD, PDL, WINDOWED)
            m, l_sum, acc1, acc2 = _attend_group(kc1, kc2, vc1, vc2, blk * BLOCK_N, pos, low, r1, r2, kn1, kn2, vn1,
                                                 vn2, scale, BLOCK_N, PREC, WINDOWED, SOFTCAP)
            slot = at + blk
            tl.store(part_ptr + slot[:, None] * 2 * HALF + d[None, :], acc1, mask=both)
            tl.store(part_ptr + slot[:, None] * 2 * HALF + HALF + d[None, :], acc2, mask=both)
            tl.store(ml_ptr + 2 * slot, m, mask=real)
            tl.store(ml_ptr + 2 * slot + 1, l_sum, mask=real)


@triton.jit
def _attention_combine_kernel(pos_ptr, o_ptr, part_ptr, ml_ptr, H, length, window, slots, HD: tl.constexpr,
                              COLS: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, PDL: tl.constexpr,
                              WINDOWED: tl.constexpr):
    """The long spans' second launch: program (h, c, b) merges COLS columns (slice c) of query head h's block sums
    (_combine_blocks, GROUP blocks at a time) into its output row, after _rope_attention_blocks_kernel (PDL: waits for
    it, then releases the next launch)."""
    h = tl.program_id(0)
    c = tl.program_id(1)
    b = tl.program_id(2)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pos = tl.load(pos_ptr)
    _, start = _window(pos, window, BLOCK_N, WINDOWED)
    blocks = tl.cdiv(tl.minimum(pos + 1, length), BLOCK_N)
    head = b * H + h
    _combine_blocks(part_ptr, ml_ptr, head, start, blocks, slots, c * COLS + tl.arange(0, COLS), o_ptr + head * HD, HD,
                    GROUP)


_ATTENTION_SCRATCH: dict = {}


def _attention_scratch(device: torch.device, heads: int, hd: int, slots: int) -> tuple:
    """The decode attention's per-head scratch on a device for caches of `slots` key blocks, kept between calls (a
    CUDA graph replays the addresses its capture saw; allocated by the eager warm-up before it): each head's `slots`
    block sums (fp32, hd each) and (max, sum) pairs, and its arrival counter (int32, zero between launches: the
    last arrival resets it). Calls on one device share it in stream order: one decode at a time (serve's single
    worker, Generator's capture ordered after its warm-up); two streams attending at once would race on the
    counters."""
    key = (str(device), heads, hd, slots)
    if key not in _ATTENTION_SCRATCH:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # a capture would only record the counters' zero fill: outside a replay they would hold garbage
            raise RuntimeError("rope_attention_decode: run it once before capturing a CUDA graph (its scratch and "
                               "zeroed counters are made then)")
        _ATTENTION_SCRATCH[key] = (torch.empty(heads * slots * hd, dtype=torch.float32, device=device),
                                   torch.empty(heads * slots * 2, dtype=torch.float32, device=device),
                                   torch.zeros(heads, dtype=torch.int32, device=device))
    return _ATTENTION_SCRATCH[key]


ATTN_PROGRAMS_PER_SM = 4  # heads x programs the decode attention launches at most, per SM of the GPU. H200, step
# device time against 1 (scripts/attention_programs_probe.py, 56a0ce0): 70B -2.0 % at 300 keys, -7.0 % at 1,500; 7B
# -1.4 % / -9.4 %; 8 and 16 a SM: 70B -1.5 % / -0.4 % more at 1,500 keys, 7B +1.8 % (idle programs)


def attention_programs(blocks: int, heads: int, device: torch.device) -> int:
    """Programs a head's key blocks get: as many as the blocks of the launch's span, but no more heads x programs
    than ATTN_PROGRAMS_PER_SM a SM; at least one program a head. A program whose blocks lie past the position still
    takes a launch slot (on the H200 the 70B step ran 150 us slower with 4 programs a head, 3 of them idle, at spans
    of one block)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 128
    return max(1, min(blocks, ATTN_PROGRAMS_PER_SM * sms // heads))


def rope_attention_decode(qkv: torch.Tensor, table: torch.Tensor, positions: torch.Tensor, cache_k: torch.Tensor,
                          cache_v: torch.Tensor, n_heads: int, n_kv: int, length: int, window: int = 0,
                          qk_norm: tuple | None = None, softcap: float = 0.0,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step of attention in one launch, two on the long spans (decode_attention_route; replaces rope_kv +
    the attention kernels):
    qkv (B, 1, (H + 2 Hkv) hd) unit last stride; table (L_max, hd) fp32 [cos | sin]; positions (1,)
    int64 on the device; caches (B, Hkv, L, hd) contiguous, qkv's dtype (k, v written at pos);
    length: keys the caller attends to at most (> pos), the caches' L at most: any span (ATTN_BLOCK_N keys a
    block, a scratch slot each); window: a sliding layer's (the token at pos sees pos - window < key <= pos: the
    blocks before the window's first are not read) or 0; qk_norm: (q's norm weight, k's, eps), fp32 on the device, to
    norm q and the new k first: each (hd,), each head (Qwen3, Gemma 3), or (H hd,) and (Hkv hd,), all of q and all of
    k (OLMo 2; functional.norm_heads's two scopes); or None; softcap: Gemma 2's cap of the
    scores, softcap * tanh(score / softcap) before the softmax (functional.soft_cap's; a constexpr of the kernels: a
    compile each value), or 0. Returns (B, 1, H, hd) in qkv's dtype (into `out` where given: the tests poison it).
    Needs hd even (a half past a power of two runs masked: Phi-3's 96)."""
    b, t, _ = qkv.shape
    hd = cache_k.shape[-1]
    if t != 1 or positions.numel() != 1 or hd % 2:
        raise ValueError("rope_attention_decode takes one token and an even head_dim")
    if length > cache_k.shape[2]:
        raise ValueError(f"rope_attention_decode attends to the cache's {cache_k.shape[2]} keys at most; got {length}")
    blocks = triton.cdiv(length, ATTN_BLOCK_N)
    if window < 0 or not softcap >= 0:
        raise ValueError(f"rope_attention_decode: a window of {window} keys, a soft-cap of {softcap}")
    norm_scope = 0 if qk_norm is None else {(hd, hd): 1, (n_heads * hd, n_kv * hd): 2}.get(
        (qk_norm[0].numel(), qk_norm[1].numel()))
    if norm_scope is None:
        raise ValueError(f"rope_attention_decode norms each head (weights of {hd}) or all of q and of k (weights of "
                         f"{n_heads * hd} and {n_kv * hd}); got weights of {qk_norm[0].numel()} and "
                         f"{qk_norm[1].numel()}")
    if window:  # a window's keys lie in at most this many blocks
        blocks = min(blocks, triton.cdiv(window - 1, ATTN_BLOCK_N) + 1)
    switches = dict(HALF=hd // 2, HP=triton.next_power_of_2(hd // 2), WINDOWED=window > 0,
                    QK_NORM=norm_scope, SOFTCAP=float(softcap))  # the kernels' constexprs
    if norm_scope == 2:  # all of q's and of k's squares summed by every program, a chunk of at most 1,024 at a time
        for name, n in (("Q", n_heads * hd), ("K", n_kv * hd)):
            switches |= {f"{name}N": triton.next_power_of_2(n), f"{name}C": min(1024, triton.next_power_of_2(n))}
    norms = qk_norm if qk_norm is not None else (table, table, 0.0)  # (unread without QK_NORM)
    if qkv.stride(2) != 1:
        qkv = qkv.contiguous()
    from spqt.kernels.zigzag_mma import uses_pdl

    out = torch.empty((b, 1, n_heads, hd), dtype=qkv.dtype, device=qkv.device) if out is None else out
    slots = triton.cdiv(cache_k.shape[2], ATTN_BLOCK_N)
    part, ml, counters = _attention_scratch(qkv.device, b * n_heads, hd, slots)
    pdl = uses_pdl(qkv.device)
    if decode_attention_route(length, n_heads, n_kv, hd, window) == "long":
        group = n_heads // n_kv
        programs = attention_programs(blocks, b * n_kv, qkv.device)
        _rope_attention_blocks_kernel[(n_kv, programs, b)](
            qkv, table, positions, cache_k, cache_v, part, ml, n_heads, n_kv, cache_k.shape[2], length, window,
            qkv.stride(0), hd**-0.5, slots, *norms, **switches, BLOCK_N=ATTN_BLOCK_N, G=group,
            GP=max(16, triton.next_power_of_2(group)),
            AHEAD=ATTN_PREFETCH_BLOCKS, PREC="ieee" if qkv.dtype == torch.float32 else "tf32", PDL=pdl,
            num_warps=attention_long_warps(hd),
            launch_pdl=pdl)
        cols = math.gcd(hd, ATTN_LONG_COMBINE_COLS)  # COLS a power of two: whole slices of any even hd
        _attention_combine_kernel[(n_heads, hd // cols, b)](
            positions, out, part, ml, n_heads, length, window, slots, HD=hd, COLS=cols, BLOCK_N=ATTN_BLOCK_N,
            GROUP=ATTN_LONG_COMBINE_GROUP, PDL=pdl, WINDOWED=switches["WINDOWED"], num_warps=4, launch_pdl=pdl)
        return out
    programs = attention_programs(blocks, b * n_heads, qkv.device)
    _rope_attention_decode_kernel[(n_heads, programs, b)](
        qkv, table, positions, cache_k, cache_v, out, part, ml, counters, n_heads, n_kv, cache_k.shape[2], length,
        window, qkv.stride(0), hd**-0.5, slots, *norms, **switches, BLOCK_N=ATTN_BLOCK_N, GROUP=ATTN_COMBINE_GROUP,
        AHEAD=ATTN_PREFETCH_BLOCKS, PDL=pdl, num_warps=4,
        launch_pdl=pdl)
    return out
