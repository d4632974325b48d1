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
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        # torch's own op: the same formula in one call (the CPU decode step runs 61 norms)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def _rope(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x (B, T, heads, hd); rows (T, hd) float32 [cos | sin]. Half-split (rotate_half) RoPE."""
    half = x.shape[-1] // 2
    cos = rows[:, :half][None, :, None, :]
    sin = rows[:, half:][None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    if x.dtype != torch.float32:
        x1, x2 = x1.float(), x2.float()
    y = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def rope_kv(qkv: torch.Tensor, table: torch.Tensor, positions: torch.Tensor, cache_k: torch.Tensor,
            cache_v: torch.Tensor, n_heads: int, n_kv: int) -> torch.Tensor:
    """The attention's step after the q|k|v projection. qkv (B, T, (H + 2 Hkv) hd); table
    (L_max, hd) float32 [cos | sin] of every position; positions (T,) int64; caches (B, Hkv, L, hd).
    Writes RoPE(k) and v into the caches at `positions`; returns RoPE(q) (B, T, H, hd)."""
    if _fused(qkv):
        from spqt.kernels import fused

        return fused.rope_kv(qkv, table, positions, cache_k, cache_v, n_heads, n_kv)
    b, t, _ = qkv.shape
    hd = cache_k.shape[-1]
    qk_dim = (n_heads + n_kv) * hd
    # q and k heads rotated in one pass (half the small ops of a CPU decode step's RoPE)
    qk = _rope(qkv[..., :qk_dim].reshape(b, t, n_heads + n_kv, hd), table[positions])
    q, k = qk.split([n_heads, n_kv], dim=2)
    cache_k.index_copy_(2, positions, k.transpose(1, 2))
    cache_v.index_copy_(2, positions, qkv[..., qk_dim:].reshape(b, t, n_kv, hd).transpose(1, 2))
    return q


def silu_mul(gate_up: torch.Tensor, ffn_dim: int) -> torch.Tensor:
    """(..., 2F) stacked gate|up -> silu(gate) * up, (..., F)."""
    if _fused(gate_up):
        from spqt.kernels import fused

        return fused.silu_mul(gate_up, ffn_dim)
    gate, up = gate_up.split(ffn_dim, dim=-1)
    return F.silu(gate).mul_(up)


def linear_epilogue(y: torch.Tensor, residual: torch.Tensor | None, swiglu: bool) -> torch.Tensor:
    """What a linear map does after W x, unfused: residual + y, or silu_mul of stacked gate|up."""
    if swiglu:
        return silu_mul(y, y.shape[-1] // 2)
    return y if residual is None else residual + y


# Spans up to this many keys run the one-launch decode attention (one program per query head);
# longer ones go to torch's attention, which splits the keys over more programs.
DECODE_ATTENTION_MAX_SPAN = 2048


def attention(qkv: torch.Tensor, table: torch.Tensor, positions: torch.Tensor, cache_k: torch.Tensor,
              cache_v: torch.Tensor, n_heads: int, n_kv: int, mask: torch.Tensor, length: int) -> torch.Tensor:
    """Attention of T new tokens after the q|k|v projection: RoPE, the KV-cache write (rope_kv),
    then softmax(q k^T / sqrt(hd) + mask) v over the first `length` cached keys (grouped-query).
    qkv (B, T, (H + 2 Hkv) hd); mask (T, length) additive, -inf above each token's position.
    Returns (B, T, H, hd) in qkv's dtype. On CUDA one decode token is one fused launch."""
    hd = cache_k.shape[-1]
    if _fused(qkv) and qkv.shape[1] == 1 and hd & (hd - 1) == 0 and length <= DECODE_ATTENTION_MAX_SPAN:
        from spqt.kernels import fused

        return fused.rope_attention_decode(qkv, table, positions, cache_k, cache_v, n_heads, n_kv, length)
    q = rope_kv(qkv, table, positions, cache_k, cache_v, n_heads, n_kv)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), cache_k[:, :, :length], cache_v[:, :, :length],
                                         attn_mask=mask, enable_gqa=n_kv != n_heads)
    return out.transpose(1, 2)
