"""Small fused Triton kernels for the decode step: one launch where eager torch needs several
(in a CUDA graph each launch costs at least ~1.2 us on the H100, design.md section 8).

  rms_norm   x (R, D) -> x * rsqrt(mean(x^2) + eps) * w, fp32 math, x's dtype out
  rope_kv    qkv (B, T, (H + 2 Hkv) hd) -> q rotated; k rotated and v written into the KV cache
  silu_mul   gu (R, 2F) -> silu(gu[:, :F]) * gu[:, F:]
Their torch twins are in spqt.functional, which picks one or the other.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, D, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    m = offs < D
    x = tl.load(x_ptr + row * D + offs, mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    tl.store(out_ptr + row * D + offs, (x * inv * w).to(out_ptr.dtype.element_ty), mask=m)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    d = x.shape[-1]
    xc = x.contiguous()
    out = torch.empty_like(xc)
    _rms_norm_kernel[(xc.numel() // d,)](xc, w, out, d, eps, BLOCK=triton.next_power_of_2(d), num_warps=4)
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
def _silu_mul_kernel(gu_ptr, out_ptr, F, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < F
    g = tl.load(gu_ptr + row * 2 * F + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * F + F + offs, mask=m, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * F + offs, y.to(out_ptr.dtype.element_ty), mask=m)


def silu_mul(gu: torch.Tensor, f: int) -> torch.Tensor:
    g = gu.contiguous()
    rows = g.numel() // (2 * f)
    out = torch.empty((*g.shape[:-1], f), dtype=g.dtype, device=g.device)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(f, block))](g, out, f, BLOCK=block, num_warps=4)
    return out
