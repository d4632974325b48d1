"""Scalar multipliers folded into the weights as they are read (IBM's Granite), so model.py stays the one network.

Granite is Llama plus four scalars (transformers' GraniteConfig names them; llama.cpp's converter writes them as
the GGUF keys in brackets):

    embedding_multiplier  [embedding_scale]   the input embeddings are multiplied by it
    attention_multiplier  [attention.scale]   the attention scores' scale, in place of 1 / sqrt(head_dim)
    residual_multiplier   [residual_scale]    each attention output and MLP output, times it, joins the residual
    logits_scaling        [logit_scale]       the logits are divided by it

Each is, in real arithmetic, a scale of some weights (names as in sources.py):

    wq, bq          * attention * sqrt(head_dim)   RoPE is linear: q scaled before or after it is the same
    wo, bo, w2, b2  * residual
    tok_embeddings  * embedding
    norm            / (embedding * logits)         a tied head: the scaled table is the head too, and the head's
                                                   input is the final RMSNorm's output, linear in its weight
    output          / logits                       an untied head

Gemma's norms are folded here too (gemma_norms): its RMSNorm multiplies by 1 + w, so 1 is added to each norm
weight of a Hugging Face checkpoint (llama.cpp's converter has added it in a GGUF), and its attention scale,
query_pre_attn_scalar^-1/2 in place of head_dim^-1/2, is a factor sqrt(head_dim / query_pre_attn_scalar) of q: of
q_norm's weight where q is normed per head (Gemma 3: the factor after the norm), else of wq and bq (Gemma 2; RoPE is
linear, so it commutes either way).

Partial RoPE (Phi-4-mini) is a permutation folded in (partial_rope_rows): transformers and llama.cpp (NEOX, the
first rope.dimension_count dimensions) rotate each head's first rot dimensions in the pairs (j, j + rot/2) and pass
the others through; every path of ours rotates the pairs (i, i + hd/2) of the whole head. The rows of wq and wk (and
bq, bk) are reordered within each head by rope_dim_order, which makes our pairs i < rot/2 theirs and our pairs above
two passed-through dimensions each (rope_table gives them frequency 0: cos 1, sin 0). q . k is the same sum over
the same products in another order, so the scores are unchanged; v and o are untouched. GLM-4 pairs its rotated
dimensions otherwise, (2j, 2j + 1) (transformers' Glm4 rotates x[0::2] against x[1::2]; llama.cpp's glm4 runs NORM,
adjacent-pair, RoPE on the same rows): rope_dim_order(interleaved=True) makes our pair i < rot/2 theirs (2i, 2i + 1).

A per-head RMSNorm of q (Qwen3's q_norm) would undo q's scale, so such a model is refused. Each multiplier is
taken as float32 (a GGUF stores it so, and a float32 forward multiplies by that value); each folded tensor is
computed in float64 and cast to float32. What gets quantized is the scaled weights.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from spqt.config import ModelConfig

# each multiplier's config.json key, and its GGUF key (after "{arch}.")
HF_KEYS = {"embedding": "embedding_multiplier", "attention": "attention_multiplier",
           "residual": "residual_multiplier", "logits": "logits_scaling"}
GGUF_KEYS = {"embedding": "embedding_scale", "attention": "attention.scale", "residual": "residual_scale",
             "logits": "logit_scale"}


_FLOAT32_TINY, _FLOAT32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Multipliers:
    """Granite's scalars; attention None: the usual 1 / sqrt(head_dim)."""

    embedding: float = 1.0
    attention: float | None = None
    residual: float = 1.0
    logits: float = 1.0

    def record(self) -> dict:
        """The multipliers, for a model's provenance."""
        return {"embedding": self.embedding, "attention": self.attention, "residual": self.residual,
                "logits": self.logits}


def _float32(name: str, value) -> float:
    """A multiplier as float32 (as a Python float); ValueError unless a positive number float32 holds."""
    if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    with np.errstate(over="ignore", under="ignore"):
        single = float(np.float32(value))
    if not (math.isfinite(single) and single > 0):
        raise ValueError(f"{name} {value!r} lies outside float32's range")
    return single


def hf_multipliers(cfg: dict) -> Multipliers:
    """From a Granite config.json whose left-out keys are filled as GraniteConfig fills them (sources.py's
    _with_class_defaults: 1.0 each, attention too: a scale of 1, not 1 / sqrt(head_dim)); ValueError on a value
    that is not a positive number."""
    return Multipliers(**{ours: _float32(key, cfg[key]) for ours, key in HF_KEYS.items()})


def gguf_multipliers(field_value: Callable, arch: str) -> Multipliers:
    """From a granite GGUF's keys (field_value(key, default)), as llama.cpp reads them: a key absent or 0 means none
    (attention: 1 / sqrt(head_dim)); ValueError on a value that is not a number, negative or not finite."""
    values = {}
    for ours, key in GGUF_KEYS.items():
        value = field_value(f"{arch}.{key}", 0.0)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{arch}.{key} is not a number ({value!r})") from None
        if value != 0.0:
            values[ours] = _float32(f"{arch}.{key}", value)
    return Multipliers(**values)


def fold_factors(m: Multipliers, config: ModelConfig) -> dict[str, float]:
    """Canonical tensor name -> the float64 factor it is read with (only those other than 1). ValueError where q is
    normed per head and its scale would have to change."""
    q = 1.0 if m.attention is None else m.attention * math.sqrt(config.head_dim)
    if config.qk_norm and q != 1.0:
        raise ValueError("an attention multiplier cannot be folded into q where q is RMS-normed per head (q_norm)")
    factors = {"tok_embeddings": m.embedding}
    if config.tie_embeddings:
        factors["norm"] = 1.0 / (m.embedding * m.logits)
    else:
        factors["output"] = 1.0 / m.logits
    for i in range(config.n_layers):
        factors |= {f"layers.{i}.{name}": q for name in ("wq", "bq")}
        factors |= {f"layers.{i}.{name}": m.residual for name in ("wo", "bo", "w2", "b2")}
    if not all(_FLOAT32_TINY <= f <= _FLOAT32_MAX for f in factors.values()):
        raise ValueError(f"the multipliers {m.record()} scale weights by factors float32 cannot hold")
    return {name: f for name, f in factors.items() if f != 1.0}


def folded(load: Callable[[str], torch.Tensor], factors: dict[str, float]) -> Callable[[str], torch.Tensor]:
    """A reader's per-tensor load function that returns each tensor times its factor (float64, then float32)."""
    if not factors:
        return load

    def load_folded(name: str) -> torch.Tensor:
        w = load(name)
        f = factors.get(name)
        return w if f is None else (w.double() * f).to(torch.float32)

    return load_folded


# Gemma's norms (our names' last part; "norm" is the final one)
GEMMA_NORMS = ("attention_norm", "post_attention_norm", "ffn_norm", "post_ffn_norm", "q_norm", "k_norm", "norm")


def gemma_norms(load: Callable[[str], torch.Tensor], shift: float, query_scale: float,
                q_normed: bool = True) -> Callable[[str], torch.Tensor]:
    """A reader's per-tensor load function that returns each of Gemma's norm weights (GEMMA_NORMS) as w + shift, and
    the tensors that take q's scale (q_normed: q_norm, Gemma 3's; else wq and bq, Gemma 2's) times query_scale, each
    computed in float64 and cast to float32 (shift 1: a Hugging Face checkpoint's w, which Gemma's RMSNorm uses as
    1 + w; the sum is float32's own 1 + w, both correctly rounded); other tensors as they are. ValueError where
    query_scale is not a positive number float32 holds."""
    query_scale = _float32("the attention scale's factor of q", query_scale)
    scaled = () if query_scale == 1.0 else ("q_norm",) if q_normed else ("wq", "bq")
    if shift == 0.0 and not scaled:
        return load

    def load_gemma(name: str) -> torch.Tensor:
        w = load(name)
        kind = name.rsplit(".", 1)[-1]
        if kind not in GEMMA_NORMS and kind not in scaled:
            return w
        w = w.double() + shift if kind in GEMMA_NORMS else w.double()
        return (w * query_scale if kind in scaled else w).to(torch.float32)

    return load_gemma


def rope_dim_order(head_dim: int, rope_dims: int, interleaved: bool = False) -> torch.Tensor:
    """(head_dim,) int64: for each dimension of our head, the source's dimension it holds. With r = rope_dims / 2
    and m = head_dim / 2 (rope_dims 0: all rotated, the identity):

        ours      0 .. r-1 | r .. m-1          | m .. m+r-1    | m+r .. 2m-1
        source    0 .. r-1 | 2r .. 2r+m-r-1    | r .. 2r-1     | 2r+m-r .. 2m-1
        (interleaved)
        source    0, 2, .. 2r-2 | as above     | 1, 3, .. 2r-1 | as above

    so our pair (i, i + m) is the source's rotated pair (i, i + r), or interleaved (2i, 2i + 1), for i < r and two
    passed-through dimensions above."""
    r, m = (rope_dims or head_dim) // 2, head_dim // 2
    passed = torch.arange(2 * r, head_dim)
    first, second = (torch.arange(0, 2 * r, 2), torch.arange(1, 2 * r, 2)) if interleaved else (
        torch.arange(r), torch.arange(r, 2 * r))
    return torch.cat([first, passed[: m - r], second, passed[m - r:]])


def partial_rope_rows(load: Callable[[str], torch.Tensor], config: ModelConfig,
                      interleaved: bool = False) -> Callable[[str], torch.Tensor]:
    """A reader's per-tensor load function that returns wq, bq, wk and bk (n_heads * hd rows, or entries) with each
    head's rows in rope_dim_order, and q_norm / k_norm (hd,) likewise; other tensors as they are. interleaved: the
    source pairs its rotated dimensions (2j, 2j + 1) (GLM-4), whole heads too. The identity (load itself) where every
    dimension is rotated in our pairing already."""
    if not config.rope_dims and not interleaved:
        return load
    order = rope_dim_order(config.head_dim, config.rope_dims, interleaved)

    def load_permuted(name: str) -> torch.Tensor:
        w = load(name)
        if name.rsplit(".", 1)[-1] not in ("wq", "bq", "wk", "bk", "q_norm", "k_norm"):
            return w
        heads = w.shape[0] // config.head_dim
        return w.reshape(heads, config.head_dim, *w.shape[1:])[:, order].reshape(w.shape).contiguous()

    return load_permuted
