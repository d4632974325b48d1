"""The Llama-family network in one file: RMSNorm, RoPE (Llama-3, YaRN, longrope scaling too), grouped-query
attention with a preallocated KV cache, SwiGLU, tied or separate output head. Family switches
(config.py): Qwen3's per-head RMSNorm of q and k here; SmolLM3's NoPE layers, which get an identity
table (cos 1, sin 0: every path's rotation leaves q and k exactly as they are) instead of the RoPE table;
output biases (Qwen2) belong to the linear maps that make_linear returns. Gemma 3's: a norm of the attention's and
of the MLP's output before the residual sum (post_norms), GELU-gated MLP, scaled input embeddings, and sliding-window
layers, which get a mask of their own (layer_masks) and their own RoPE table (rope_for). Gemma 2's soft-caps: of the
attention scores (functional.attention's softcap, on every route) and of the logits (Transformer.logits). OLMo 2's:
no norm before the attention or the MLP (pre_norms: the maps get norm None and read the residual stream), Gemma's
post-norms, and q/k norms over the whole of q and of k, which the attention runs as it runs the per-head ones (their
weights' sizes say which). Olmo 3's: OLMo 2's with Gemma 3's sliding layers, their masks and their own table.

It knows no formats, kernels or thresholds: every linear map comes from ``make_linear(name,
out_features, in_features)``, which returns a module mapping (..., in) -> (..., out); called
with ``norm=`` it applies that RMSNorm to its input first (so an implementation may fuse the two). The four
per-layer maps are ``layers.{i}.qkv`` (q|k|v stacked), ``layers.{i}.o``, ``layers.{i}.gate_up``
(gate|up stacked) and ``layers.{i}.down``. Blocks, attention, feed-forward and norms are DirectCallModules
(a call without torch's hook dispatch unless a hook is registered: the CPU decode step's Python).

One forward handles both prefill (T prompt tokens) and decode (T = 1): tokens (B, T) int64 at
positions ``start_pos .. start_pos+T-1`` attend to the cache up to their own position.
"""

import math

import torch
from torch import nn

from spqt import functional
from spqt.config import ModelConfig
from spqt.direct_call import DirectCallModule


class RMSNorm(DirectCallModule):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.rms_norm(x, self.weight, self.eps)


def _layer_norm(config: ModelConfig, name: str) -> RMSNorm | None:
    """A layer's RMSNorm `name` at its size (config.layer_norms: the norms the family has), or None where it has
    none."""
    size = config.layer_norms().get(name)
    return None if size is None else RMSNorm(size, config.norm_eps)


def rope_frequencies(config: ModelConfig, context: int | None = None, local: bool = False) -> torch.Tensor:
    """(head_dim/2,) float64 inverse frequencies, with Llama-3 scaling when configured (as HF
    parameters, or as llama.cpp's per-frequency divisors from a GGUF) or linear scaling (divisors too).
    context: the run's context, which picks longrope's long divisors where it exceeds the original context.
    local: the sliding layers' own frequencies (base rope_local_theta, never scaled). Partial RoPE (rope_dims): the
    first rope_dims/2 are those of a head of rope_dims dimensions, base^(-2j / rope_dims), scaled as above; the
    passed-through pairs after them get 0."""
    rot = config.rotary_dims
    inv = _rotated_frequencies(config, context, local, rot)
    return torch.cat([inv, torch.zeros((config.head_dim - rot) // 2, dtype=torch.float64)])


def _rotated_frequencies(config: ModelConfig, context: int | None, local: bool, rot: int) -> torch.Tensor:
    """(rot/2,) float64: rope_frequencies' rotated pairs."""
    theta = config.rope_local_theta if local else config.rope_theta
    inv = 1.0 / (theta ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    if local:
        return inv
    factors = config.rope_freq_factors
    if config.rope_long_freq_factors is not None and context is not None and context > config.rope_original_context:
        factors = config.rope_long_freq_factors
    if factors is not None:
        return inv / torch.tensor(factors, dtype=torch.float64)
    s = config.rope_scaling
    if not s:
        return inv
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_mid, mid, scaled)


def rope_table(config: ModelConfig, length: int, context: int | None = None, local: bool = False) -> torch.Tensor:
    """(length, head_dim) float32 cos | sin halves: [:, :hd/2] cos, [:, hd/2:] sin, each times the attention factor
    (YaRN's, longrope's; 1 otherwise), for a run of `context` tokens (default: length). Every path (torch, the CPU's
    C, the GPU kernels) rotates by this table. local: the sliding layers' table (rope_local_theta; no scaling, no
    attention factor). Partial RoPE (rope_dims): the passed-through pairs, columns rope_dims/2 .. hd/2 - 1 of each
    half, are cos 1 and sin 0 exactly, without the attention factor (transformers and llama.cpp scale the rotated
    part alone)."""
    pos = torch.arange(length, dtype=torch.float64)
    angles = torch.outer(pos, rope_frequencies(config, length if context is None else context, local))
    factor = torch.ones(config.head_dim // 2, dtype=torch.float64)
    factor[: config.rotary_dims // 2] = 1.0 if local else config.rope_attention_factor
    return torch.cat([angles.cos() * factor, angles.sin() * factor], dim=-1).float()


def causal_mask(positions: torch.Tensor, length: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(T, length) additive mask of tokens at `positions` (T,) int64 over `length` cached keys: 0 where key <= the
    token's position, -inf above it."""
    key_pos = torch.arange(length, device=device)
    return torch.zeros((positions.shape[0], length), dtype=dtype, device=device).masked_fill_(
        key_pos[None, :] > positions[:, None], float("-inf"))


def scaled_embedding(tokens: torch.Tensor, table: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """tokens (B, T) int64, table (vocab, D) -> the layers' input (B, T, D) in the table's dtype: the table's rows,
    times the embeddings' scale (Gemma: sqrt(dim), a float32 scalar tensor, cast to their dtype as transformers
    does; None: 1). Transformer.embed and GPTQ's calibration states (gptq.quantize_layers) both take this one."""
    x = torch.nn.functional.embedding(tokens, table)
    return x if scale is None else x * scale.to(x.dtype)


def layer_masks(config: ModelConfig, mask: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's attention mask (n_layers entries): the causal `mask` (T, length), additive float or bool (True:
    attend), and for the sliding layers, where their window can cut (length > window), that mask with the keys at
    positions <= position - window masked too (the token at p sees p - window < k <= p, as transformers and llama.cpp
    mask). The layers share the tensors (at most two are made)."""
    length = mask.shape[-1]
    window = config.sliding_window
    if not config.sliding_layers or length <= window:
        return [mask] * config.n_layers
    key_pos = torch.arange(length, device=mask.device)
    outside = key_pos[None, :] <= positions[:, None] - window  # (T, length)
    windowed = mask & ~outside if mask.dtype == torch.bool else mask.masked_fill(outside, float("-inf"))
    return [windowed if config.window(i) else mask for i in range(config.n_layers)]


def identity_table(config: ModelConfig, length: int) -> torch.Tensor:
    """(length, head_dim) float32 [cos | sin] = [1 | 0]: a NoPE layer's table. Every path's rotation by it (torch,
    the CPU's C, the GPU kernels) leaves q and k exactly as they are: x * 1 + y * 0 is x."""
    half = config.head_dim // 2
    return torch.cat([torch.ones(length, half), torch.zeros(length, half)], dim=-1).to(torch.float32)


def rope_tables(config: ModelConfig, length: int, context: int | None = None) -> tuple:
    """A model's (length, hd) float32 tables, as layer_table picks from them: (the RoPE table for a run of `context`
    tokens, the NoPE layers' identity table or None, the sliding layers' own table or None)."""
    identity = identity_table(config, length) if config.nope_layers else None
    local = rope_table(config, length, local=True) if config.rope_local_theta else None
    return rope_table(config, length, context=context), identity, local


def layer_table(config: ModelConfig, layer: int, rope: torch.Tensor, identity: torch.Tensor | None,
                local: torch.Tensor | None) -> torch.Tensor:
    """Which of a model's tables layer `layer` rotates by: the RoPE table `rope`, the NoPE layers' `identity`
    (identity_table), or the sliding layers' `local` one (rope_table(local=True))."""
    if not config.rotates(layer):
        return identity
    return local if config.rotates_locally(layer) else rope


class KVCache(nn.Module):
    """Preallocated keys and values: (B, kv_heads, max_len, head_dim) each (functional.rope_kv writes them)."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)


class Attention(DirectCallModule):
    def __init__(self, config: ModelConfig, layer: int, make_linear):
        super().__init__()
        c = config
        self.n_heads, self.n_kv, self.hd = c.n_heads, c.n_kv_heads, c.head_dim
        self.qkv = make_linear(f"layers.{layer}.qkv", c.q_dim + 2 * c.kv_dim, c.dim)
        self.o = make_linear(f"layers.{layer}.o", c.dim, c.q_dim)
        # q's and k's norms (qk_norm: a head wide, or all of q and of k: qk_norm_scope), or None
        self.q_norm, self.k_norm = _layer_norm(c, "q_norm"), _layer_norm(c, "k_norm")
        self.window = c.window(layer)  # a sliding layer's window (its mask cuts where the keys outnumber it), or 0
        self.softcap = c.attn_logit_softcap  # Gemma 2's cap of the attention scores, or 0
        self.cache: KVCache | None = None
        self.native = False  # the CPU's native maps: a decode token's attention in C too (build_model sets it)

    def forward(self, x: torch.Tensor, norm: RMSNorm | None, rope: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor | None, length: int, post_norm: RMSNorm | None = None) -> torch.Tensor:
        """x + attention(norm(x)), or x + post_norm(attention(norm(x))) (Gemma, OLMo 2) over the first `length`
        cached keys; norm None: attention(x) (OLMo 2); rope: the layer's whole (max_seq_len, hd) table
        (Transformer.rope_for); mask: the layer's (layer_masks), or None where the fused decode kernels run
        (functional.decode_attention_fused). The norm is handed to the q|k|v map, which may fuse it with its input's
        sparsification."""
        b, t, _ = x.shape
        qkv = self.qkv(x, norm=norm)
        # Qwen3's and Gemma 3's per-head norms of q and k, which the attention runs (the fused decode kernels as they
        # load q and k), or OLMo 2's over the whole of q and of k (weights of all heads' size)
        qk_norm = None if self.q_norm is None else (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
        out = functional.attention(qkv, rope, positions, self.cache.k, self.cache.v, self.n_heads, self.n_kv, mask,
                                   length, native=self.native, window=self.window, qk_norm=qk_norm,
                                   softcap=self.softcap)
        out = out.reshape(b, t, self.n_heads * self.hd)
        if post_norm is None:
            return self.o(out, residual=x)
        return functional.add_rms_norm(x, self.o(out), post_norm.weight, post_norm.eps)


class FeedForward(DirectCallModule):
    def __init__(self, config: ModelConfig, layer: int, make_linear):
        super().__init__()
        self.ffn_dim = config.ffn_dim
        self.swiglu = config.activation == "silu"  # else gelu_tanh: the gate|up map's plain output, gated in torch
        self.gate_up = make_linear(f"layers.{layer}.gate_up", 2 * config.ffn_dim, config.dim)
        self.down = make_linear(f"layers.{layer}.down", config.dim, config.ffn_dim)

    def forward(self, x: torch.Tensor, norm: RMSNorm | None, post_norm: RMSNorm | None = None) -> torch.Tensor:
        """x + down(act(gate) * up) of norm(x) (the norm handed to the gate|up map, as in Attention; None: of x itself,
        OLMo 2; act: silu, fused into the map's epilogue, or gelu_tanh), or x + post_norm(down(...)) (Gemma, OLMo 2)."""
        if self.swiglu:
            act = self.gate_up(x, norm=norm, swiglu=True)
        else:
            act = functional.gelu_tanh_mul(self.gate_up(x, norm=norm), self.ffn_dim)
        if post_norm is None:
            return self.down(act, residual=x)
        return functional.add_rms_norm(x, self.down(act), post_norm.weight, post_norm.eps)


class Block(DirectCallModule):
    def __init__(self, config: ModelConfig, layer: int, make_linear):
        super().__init__()
        # the norms of the attention's and the MLP's inputs (None: each map reads the residual stream, OLMo 2)
        self.attention_norm = _layer_norm(config, "attention_norm")
        self.attention = Attention(config, layer, make_linear)
        self.ffn_norm = _layer_norm(config, "ffn_norm")
        self.feed_forward = FeedForward(config, layer, make_linear)
        # Gemma's and OLMo 2's norms of the attention's and the MLP's outputs (None: each output joins the residual as
        # it is)
        self.post_attention_norm = _layer_norm(config, "post_attention_norm")
        self.post_ffn_norm = _layer_norm(config, "post_ffn_norm")

    def forward(self, x, rope, positions, mask, length: int | None = None):
        """rope: the layer's (max_seq_len, hd) table (Transformer.rope_for); mask: the layer's (T, length) bool or
        additive float mask (layer_masks: a sliding layer's window applied), or None where the fused decode kernels
        attend (functional.decode_attention_fused) and `length` gives the keys (else the mask's width)."""
        if length is None and mask is None:
            raise ValueError("a block without a mask needs the keys' count (length)")
        length = mask.shape[-1] if length is None else length
        h = self.attention(x, self.attention_norm, rope, positions, mask, length, self.post_attention_norm)
        return self.feed_forward(h, self.ffn_norm, self.post_ffn_norm)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, make_linear):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_embeddings.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Block(config, i, make_linear) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = make_linear("output", config.vocab_size, config.dim)
        # the RoPE table, the NoPE layers' and the sliding layers' own (Gemma 3), where the model has them (rope_for)
        rope, nope, local = rope_tables(config, config.max_seq_len)
        self.register_buffer("rope", rope, persistent=False)
        self.register_buffer("rope_identity", nope, persistent=False)
        self.register_buffer("rope_local", local, persistent=False)
        # the input embeddings' scale (Gemma: sqrt(dim)), float32 as transformers holds it; None: 1
        scale = torch.tensor(config.embed_scale, dtype=torch.float32) if config.embed_scale != 1.0 else None
        self.register_buffer("embed_scale", scale, persistent=False)
        self.max_len = 0
        self.cache_generation = 0  # counts setup_cache calls: a captured CUDA graph holds the caches of its generation
        self.decode_chain = None  # a DecodeChain (decode_chain.py) where the Generator set one up

    def rope_for(self, layer: int) -> torch.Tensor:
        """The (max_seq_len, hd) float32 table layer `layer` rotates q and k by: the RoPE table, a NoPE layer's
        identity table, or a sliding layer's own table (Gemma 3). Whatever runs a block (the forward, calibration,
        the decode chain) passes this one."""
        return layer_table(self.config, layer, self.rope, self.rope_identity, self.rope_local)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) int64 -> the layers' input (B, T, D) in the embedding's dtype (scaled_embedding)."""
        return scaled_embedding(tokens, self.tok_embeddings.weight, self.embed_scale)

    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype) -> None:
        """Allocate the KV cache for `batch` sequences of up to `max_len` tokens."""
        device = self.tok_embeddings.weight.device
        if max_len > self.config.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds the model's context {self.config.max_seq_len}")
        self.max_len = max_len
        if self.config.rope_long_freq_factors is not None:  # longrope: the table of this run's context, in place
            with torch.inference_mode(self.rope.is_inference()):  # (a buffer made under inference mode stays one)
                self.rope.copy_(rope_table(self.config, self.config.max_seq_len, context=max_len))
        self.cache_generation += 1
        if self.decode_chain is not None:
            self.decode_chain.forget()  # its chains hold the old caches
        for block in self.layers:
            block.attention.cache = KVCache(batch, self.config.n_kv_heads, max_len, self.config.head_dim, dtype, device)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int | None = None,
                select: torch.Tensor | None = None, head: bool = True) -> torch.Tensor:
        """tokens: (B, T) int64; positions: (T,) int64 ascending. Returns logits (B, T, vocab) float32.

        kv_len: keys attended (defaults to the whole cache; a smaller value saves work when the
        caller knows the largest position, and must exceed it). select: (S,) int64 indices into T, the
        only positions whose logits are computed (B, S, vocab) (a prefill wants its last token's alone).
        head False: the last layer's output (B, T or S, D) instead, for self.logits to take a slice at a time
        (perplexity: a long chunk's logits whole are positions x vocab floats).
        """
        length = kv_len or self.max_len
        x = self.embed(tokens)
        if self.decode_chain is not None and self.decode_chain.runs(x, positions, length):
            x = self.decode_chain(x, positions, length)  # every layer in one launch (decode_chain.py)
        else:
            masks = self._masks(x, positions, length)
            for i, block in enumerate(self.layers):
                x = block(x, self.rope_for(i), positions, masks[i], length)
        if select is not None:
            x = x.index_select(1, select)
        return self.logits(x) if head else x

    def _masks(self, x: torch.Tensor, positions: torch.Tensor, length: int) -> list:
        """Every layer's (T, length) additive mask, made once per forward (a bool mask is converted in every layer;
        layer_masks), or None for all where every layer's attention runs in the fused decode kernels, which mask by
        position (a CUDA decode step: the mask's kernels left out of it)."""
        c = self.config
        if all(functional.decode_attention_fused(x, positions.shape[0], length, c.n_heads, c.n_kv_heads, c.head_dim,
                                                 window)
               for window in {c.window(i) for i in range(c.n_layers)}):
            return [None] * c.n_layers
        mask = causal_mask(positions, length, x.dtype, x.device)
        if x.device.type == "cpu" and 1 < positions.shape[0] == length:  # positions ascending: 0 .. T - 1
            setattr(mask, functional.CAUSAL, True)
        return layer_masks(c, mask, positions)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's output (B, T, D) -> logits (B, T, vocab) float32: the final norm, the head, and Gemma 2's
        soft-cap of the logits (torch ops inside the forward: a captured decode or prefill graph holds them too; a
        non-finite head output stays so under the cap, for the generator's check of the logits)."""
        return functional.soft_cap(self.output(self.norm(x)).float(), self.config.final_logit_softcap)
