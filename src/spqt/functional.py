"""The few elementwise/row operations of the network, each with a torch definition (CPU, and the
reference) and a fused Triton kernel on CUDA (spqt.kernels.fused). model.py calls these."""

import torch
import torch.nn.functional as F


def _fused(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D) -> same shape and dtype; float32 math."""
    if _fused(x):
        from spqt.kernels import fused

        return fused.rms_norm(x, weight, eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x (B, T, heads, hd); table (T, hd) float32 [cos | sin]. Half-split (rotate_half) RoPE."""
    if _fused(x):
        from spqt.kernels import fused

        return fused.rope(x, table)
    half = x.shape[-1] // 2
    cos = table[:, :half][None, :, None, :]
    sin = table[:, half:][None, :, None, :]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def silu_mul(gate_up: torch.Tensor, ffn_dim: int) -> torch.Tensor:
    """(..., 2F) stacked gate|up -> silu(gate) * up, (..., F)."""
    if _fused(gate_up):
        from spqt.kernels import fused

        return fused.silu_mul(gate_up, ffn_dim)
    gate, up = gate_up.split(ffn_dim, dim=-1)
    return F.silu(gate) * up
