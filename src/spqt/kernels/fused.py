"""Small fused Triton kernels for the decode step: one launch where eager torch needs several
(in a CUDA graph each launch costs at least ~1.2 us on the H100, design.md section 8).

  rms_norm   x (R, D) -> x * rsqrt(mean(x^2) + eps) * w, fp32 math, x's dtype out
  rope       x (B, T, H, hd) strided view -> rotated contiguous copy (half-split convention)
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
def _rope_kernel(x_ptr, t_ptr, out_ptr, H, T, sb, st, sh, HALF: tl.constexpr):
    pid = tl.program_id(0)  # over B * T * H
    h = pid % H
    t = (pid // H) % T
    b = pid // (H * T)
    offs = tl.arange(0, HALF)
    base = x_ptr + b * sb + t * st + h * sh
    x1 = tl.load(base + offs).to(tl.float32)
    x2 = tl.load(base + HALF + offs).to(tl.float32)
    cos = tl.load(t_ptr + t * 2 * HALF + offs)
    sin = tl.load(t_ptr + t * 2 * HALF + HALF + offs)
    o = out_ptr + pid * 2 * HALF
    tl.store(o + offs, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty))
    tl.store(o + HALF + offs, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty))


def rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, hd) with unit last stride; table: (T, hd) fp32 contiguous [cos | sin]."""
    b, t, h, hd = x.shape
    if x.stride(3) != 1:
        x = x.contiguous()
    out = torch.empty((b, t, h, hd), dtype=x.dtype, device=x.device)
    _rope_kernel[(b * t * h,)](x, table.contiguous(), out, h, t, x.stride(0), x.stride(1), x.stride(2),
                               HALF=hd // 2, num_warps=1)
    return out


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
