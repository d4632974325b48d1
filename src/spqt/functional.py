"""The few elementwise/row operations of the network, each with a torch definition (CPU, and the
reference) and a fused Triton kernel on CUDA (spqt.kernels.fused). model.py calls these."""

import functools
import os
import weakref

import torch
import torch.nn.functional as F


def _fused(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32)


# The attribute a residual map's output may carry on the GPU: the fp32 sums of squares of its stored values,
# one per program of the reduction that wrote it, so that the next map can fold the RMSNorm of it into its
# GEMV (kernels/gpu_linear.py). The values are the tensor's as long as nothing writes it in between: code that
# changes such a tensor in place must drop the attribute (a hooked module call does: direct_call.py).
NORM_SUMS = "spqt_norm_sums"
# Set (True) on an attention mask that is exactly causal: T tokens at positions 0 .. T - 1 over T keys (a prefill from
# the start); the CPU's torch attention then runs is_causal, which skips the blocks above the diagonal.
CAUSAL = "spqt_causal"

_NORM_CONSTANTS: dict[tuple[int, float], tuple[torch.Tensor, torch.Tensor]] = {}


def _norm_constants(n: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, eps) as 0-dim fp32 CPU tensors, made once: the values torch's own ops convert them to."""
    if (n, eps) not in _NORM_CONSTANTS:
        _NORM_CONSTANTS[(n, eps)] = (torch.tensor(float(n)), torch.tensor(eps, dtype=torch.float32))
    return _NORM_CONSTANTS[(n, eps)]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D) -> same shape and dtype; float32 math."""
    if _fused(x):
        from spqt.kernels import fused

        return fused.rms_norm(x, weight, eps)
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        # torch's rms_norm's own arithmetic (x^2 is x * x in its pow kernel, its mean is sum / n, then
        # + eps: eps + 1 * (sum / n) in one addcdiv), bit-identical to it: it runs 24 aten calls on
        # the CPU, converting its scalars each time; these run 7 (a CPU decode step runs 61 norms)
        n, e = _norm_constants(x.shape[-1], eps)
        return (x * torch.addcdiv(e, (x * x).sum(-1, keepdim=True), n).rsqrt_()).mul_(weight)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


# id(table) -> (a weak reference to it, its _version, its rotation table): built once per RoPE
# table, dropped with it (a WeakKeyDictionary would compare tensors with ==)
_ROTATIONS: dict[int, tuple] = {}


def _rotation(table: torch.Tensor) -> torch.Tensor:
    """(L, hd) [cos | sin] -> (L, 2, hd): [cos | cos] and [-sin | sin] of every position, so RoPE
    is x * row[0] + roll(x, hd/2) * row[1] (the same products and sums as x1 cos - x2 sin,
    x2 cos + x1 sin: negation is exact). Cached per table (rebuilt if the table is changed in place,
    unless it is an inference tensor)."""
    key = id(table)
    version = None if table.is_inference() else table._version  # inference tensors keep no version
    known = _ROTATIONS.get(key)
    if known is not None and known[0]() is table and known[1] == version:
        return known[2]
    cos, sin = table.chunk(2, dim=-1)
    rotation = torch.stack([torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)], dim=1)
    _ROTATIONS[key] = (weakref.ref(table, lambda _: _ROTATIONS.pop(key, None)), version, rotation)
    return rotation


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, heads, hd); cos, sin: (1, T, 1, hd), the _rotation rows of x's positions. Half-split
    (rotate_half) RoPE in 4 ops (a CPU decode step runs it in each layer; each op costs 3-12 us on
    the 2-core VM)."""
    xf = x if x.dtype == torch.float32 else x.float()
    y = xf * cos
    y.add_(xf.roll(x.shape[-1] // 2, -1).mul_(sin))
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
    rows = _rotation(table).index_select(0, positions)[None, :, None]  # (1, T, 1, 2, hd)
    qk = _rope(qkv[..., :qk_dim].reshape(b, t, n_heads + n_kv, hd), rows[..., 0, :], rows[..., 1, :])
    cache_k.index_copy_(2, positions, qk[:, :, n_heads:].transpose(1, 2))
    cache_v.index_copy_(2, positions, qkv[..., qk_dim:].reshape(b, t, n_kv, hd).transpose(1, 2))
    return qk[:, :, :n_heads]


def silu_mul(gate_up: torch.Tensor, ffn_dim: int) -> torch.Tensor:
    """(..., 2F) stacked gate|up -> silu(gate) * up, (..., F)."""
    if _fused(gate_up):
        from spqt.kernels import fused

        return fused.silu_mul(gate_up, ffn_dim)
    return F.silu(gate_up[..., :ffn_dim]).mul_(gate_up[..., ffn_dim:])  # slices: Tensor.split is Python


def gelu_tanh_mul(gate_up: torch.Tensor, ffn_dim: int) -> torch.Tensor:
    """(..., 2F) stacked gate|up -> gelu_tanh(gate) * up, (..., F) in its dtype (Gemma's GeGLU: GELU's tanh
    approximation, transformers' gelu_pytorch_tanh): one fused kernel on the GPU, torch ops elsewhere."""
    if _fused(gate_up):
        from spqt.kernels import fused

        return fused.gelu_tanh_mul(gate_up, ffn_dim)
    return F.gelu(gate_up[..., :ffn_dim], approximate="tanh").mul_(gate_up[..., ffn_dim:])


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x + rms_norm(y) * weight (Gemma's post-norms: an output normed before it joins the residual x), x and y (..., D)
    of one dtype: one fused kernel on the GPU, rms_norm and the sum elsewhere."""
    if _fused(x):
        from spqt.kernels import fused

        return fused.add_rms_norm(x, y, weight, eps)
    return x + rms_norm(y, weight, eps)


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """x -> cap * tanh(x / cap), same shape and dtype (Gemma 2's soft-capping of attention scores and logits, in
    transformers' order of operations); cap 0: x itself. A non-finite x stays itself: tanh would turn an overflow
    (+-inf) into +-cap, a finite score or logit that the generator's check of the logits passes."""
    if not cap:
        return x
    return torch.where(torch.isfinite(x), torch.tanh(x / cap) * cap, x)


# Attention scores a capped attention (_capped_attention) holds at once, float32: 2^26 (256 MB; a 4,096-token prefill of
# Gemma 2 9B's 16 heads takes its queries 1,024 at a time)
CAPPED_SCORES_MAX = 1 << 26


def _capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      softcap: float) -> torch.Tensor:
    """softmax(soft_cap(q k^T / sqrt(hd)) + mask) v with the scores made explicitly (torch's
    scaled_dot_product_attention cannot soft-cap them): q (B, T, H, hd); k, v (B, Hkv, L, hd), H a multiple of
    Hkv; mask (T, L) additive, or bool (True: attend). Scores and softmax in float32, the probabilities rounded to v's
    dtype for p v (as transformers' eager attention); queries taken in chunks of at most CAPPED_SCORES_MAX scores.
    Returns (B, T, H, hd) in q's dtype."""
    b, t, h, hd = q.shape
    if k.shape[1] != h:
        k, v = (x.repeat_interleave(h // k.shape[1], dim=1) for x in (k, v))
    keys = k.transpose(-1, -2).float()
    rows = max(1, CAPPED_SCORES_MAX // (b * h * k.shape[2]))
    out = []
    for first in range(0, t, rows):
        qc = q[:, first:first + rows].transpose(1, 2).float()  # (B, H, rows, hd)
        scores = soft_cap(torch.matmul(qc, keys) * hd**-0.5, softcap)
        m = mask[first:first + rows]
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
        p = torch.softmax(scores, dim=-1).to(v.dtype)
        out.append(torch.matmul(p, v).transpose(1, 2))
    return (out[0] if len(out) == 1 else torch.cat(out, dim=1)).to(q.dtype)


def linear_epilogue(y: torch.Tensor, residual: torch.Tensor | None, swiglu: bool) -> torch.Tensor:
    """What a linear map does after W x, unfused: residual + y, or silu_mul of stacked gate|up."""
    if swiglu:
        return silu_mul(y, y.shape[-1] // 2)
    return y if residual is None else residual + y


@functools.lru_cache(maxsize=None)
def fused_decode_attention_on() -> bool:
    """SPQT_FUSED_ATTENTION=0 runs a CUDA decode token's attention as rope_kv + torch's attention at every span
    instead of the fused kernels (measurement: scripts/switch_probe.py; a way around them); read once."""
    return os.environ.get("SPQT_FUSED_ATTENTION", "1") != "0"


def norm_heads(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float, n_heads: int,
               n_kv: int) -> torch.Tensor:
    """qkv (B, T, (H + 2 Hkv) hd) -> the same with q and k RMS-normalized (rms_norm) in pieces of their weights'
    length: every head of q and of k for weights (hd,) (Qwen3's and Gemma 3's q / k norms), the whole of q and of k
    for weights (H hd,) and (Hkv hd,) (OLMo 2's)."""
    b, t, width = qkv.shape
    hd = width // (n_heads + 2 * n_kv)
    q, k, v = qkv.split([n_heads * hd, n_kv * hd, n_kv * hd], dim=-1)
    q = rms_norm(q.reshape(b, t, -1, q_weight.shape[-1]), q_weight, eps).reshape(b, t, -1)
    k = rms_norm(k.reshape(b, t, -1, k_weight.shape[-1]), k_weight, eps).reshape(b, t, -1)
    return torch.cat([q, k, v], dim=-1)


def decode_attention_fused(x: torch.Tensor, tokens: int, length: int, n_heads: int, n_kv: int, hd: int,
                           window: int = 0) -> bool:
    """Whether attention() runs the attention of `tokens` new tokens (x: a tensor of the step's device and dtype) in
    CUDA's fused decode kernels (fused.decode_attention_route), which mask by position: then it needs no mask."""
    if not (_fused(x) and tokens == 1 and hd % 2 == 0 and fused_decode_attention_on()):
        return False
    from spqt.kernels import fused

    return fused.decode_attention_route(length, n_heads, n_kv, hd, window) != "torch"


def attention(qkv: torch.Tensor, table: torch.Tensor, positions: torch.Tensor, cache_k: torch.Tensor,
              cache_v: torch.Tensor, n_heads: int, n_kv: int, mask: torch.Tensor | None, length: int,
              native: bool = False, window: int = 0, qk_norm: tuple | None = None,
              softcap: float = 0.0) -> torch.Tensor:
    """Attention of T new tokens after the q|k|v projection: RoPE, the KV-cache write (rope_kv),
    then softmax(q k^T / sqrt(hd) + mask) v over the first `length` cached keys (grouped-query).
    qkv (B, T, (H + 2 Hkv) hd); mask (T, length) additive, -inf above each token's position (None where
    decode_attention_fused holds: the fused kernels need none).
    Returns (B, T, H, hd) in qkv's dtype. On CUDA a decode token runs fused.decode_attention_route's kernels;
    with native (the CPU's native maps) one decode token is one C call (kernels/cpu_native.py), which adds the mask
    to the scores as torch's attention does. window: a sliding layer's (0: none), which the mask cuts already
    (model.layer_masks); CUDA's fused decode kernels, which mask by position, cut it themselves. qk_norm: (q's norm
    weight, k's, eps) where q and k are normed first, each head (weights (hd,)) or all of q and all of k (OLMo 2's:
    weights of all heads' size; norm_heads; the fused decode kernels norm as they load), else None. softcap: Gemma 2's
    (0: none), the scores soft_cap(q k^T / sqrt(hd), softcap) before the mask, on every route (CUDA's fused decode
    kernels and the CPU's C cap them themselves; the torch route makes its scores explicitly: _capped_attention)."""
    hd = cache_k.shape[-1]
    if decode_attention_fused(qkv, qkv.shape[1], length, n_heads, n_kv, hd, window):
        from spqt.kernels import fused

        return fused.rope_attention_decode(qkv, table, positions, cache_k, cache_v, n_heads, n_kv, length, window,
                                           qk_norm, softcap)
    if mask is None:
        raise ValueError("attention without a mask where the fused decode kernels do not run")
    if qk_norm is not None:
        qkv = norm_heads(qkv, *qk_norm, n_heads, n_kv)
    if native:
        from spqt.kernels import cpu_native

        if cpu_native.decode_attention_runs(qkv, cache_k, mask):
            return cpu_native.rope_attention_decode(qkv, table, positions, cache_k, cache_v, n_heads, n_kv, mask,
                                                    length, softcap)
    q = rope_kv(qkv, table, positions, cache_k, cache_v, n_heads, n_kv)
    if softcap:
        return _capped_attention(q, cache_k[:, :, :length], cache_v[:, :, :length], mask, softcap)
    causal = getattr(mask, CAUSAL, False) and not qkv.is_cuda
    out = F.scaled_dot_product_attention(q.transpose(1, 2), cache_k[:, :, :length], cache_v[:, :, :length],
                                         attn_mask=None if causal else mask, is_causal=causal,
                                         enable_gqa=n_kv != n_heads)
    return out.transpose(1, 2)
