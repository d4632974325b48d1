"""The Llama-family architecture as data: everything model.py needs to build the network.

A family (Llama 2/3/3.1/3.2, SmolLM, SmolLM3, Mistral, Qwen2/2.5, Qwen3, Phi-3, Granite 3, Gemma 2/3, OLMo 2/3) is
these numbers plus a few switches: output biases on some linear maps (Qwen2's q, k, v), a per-head RMSNorm of q and k
(Qwen3), Llama-3 RoPE scaling given as parameters (HF) or as per-frequency factors (GGUF), linear and YaRN RoPE
scaling as per-frequency factors (YaRN's attention factor beside them), Phi-3's longrope as two sets of them (short,
long) and an attention factor, layers whose q and k are not rotated at all (SmolLM3's NoPE layers). Phi-3's fused
matrices need no switch: the readers split them into the names every family has; nor do Granite's four multipliers:
the readers fold them into the weights (folding.py). Gemma 3 adds four: a norm after the attention and after the MLP
of each layer (post_norms), a GELU-gated MLP (activation), scaled input embeddings (embed_scale) and sliding-window
attention in some layers, rotated by a table of their own (sliding_window, sliding_layers, rope_local_theta); its
q/k norms are Qwen3's switch, and its norms' 1 + w and its attention scale need none (the readers fold them into the
norm weights). The sliding windows of Mistral, Phi-3 and Qwen (use_sliding_window) are sliding_window and
sliding_layers too, without a table of their own. Gemma 2 is Gemma 3's switches without q/k norms or a local table
(its sliding layers rotate by the model's one), plus two soft-caps: of the attention scores (attn_logit_softcap) and
of the final logits (final_logit_softcap), each cap * tanh(x / cap) (a non-finite x kept). Phi-4-mini's partial
RoPE (rope_dims: the leading 96 of each head's 128 dimensions rotated, the rest passed through) needs no change to the
rotation either: the readers permute the head dimensions of q and k into its pairing (folding.py) and the table gives
the passed-through pairs frequency 0. OLMo 2 is Gemma's post-norms without the norms before the attention and the MLP
(pre_norms off: each map reads the residual stream as it is), and q/k norms over the whole of q and of k
(qk_norm_scope "all": one RMSNorm over all heads of q, another over all heads of k, before RoPE) instead of per head.
GLM-4 0414 needs no switch of its own: Gemma's four norms a layer (plain weights) with a SiLU-gated MLP, Qwen2's q/k/v
biases, and Phi-4-mini's partial RoPE, whose pairs (2j, 2j + 1) the readers permute into ours as they read.
Olmo 3 is OLMo 2's switches with Gemma 3's sliding layers (sliding_window, sliding_layers: all but every fourth) and
their own table (rope_local_theta: the model's base, plain, where the full layers' table is YaRN-scaled).
EXAONE 4.0 needs no switch of its own either: OLMo 2's post-norms alone (pre_norms off) with Qwen3's per-head q/k norms,
and, where it has a window, sliding layers (all but every fourth) rotated by the model's table while the full layers
are SmolLM3's NoPE layers (nope_layers). ERNIE 4.5 (dense) needs none: Llama's network whose RoPE pairs (2j, 2j + 1)
of each whole head, which the readers permute into ours as GLM-4's, and (use_bias) a bias on each of the seven maps.
Seed-OSS needs none: Llama's network with an explicit head_dim and biases as its config asks (q, k and v by
default; o's and the MLP's where attention_out_bias and mlp_bias say so).
"""

import math
from dataclasses import asdict, dataclass, field

# The per-layer linear maps, q|k|v and gate|up stacked (model.py builds them under these names).
LINEAR_KINDS = ("qkv", "o", "gate_up", "down")

# The MLP activations: silu(gate) * up (SwiGLU: Llama and most families), gelu_tanh(gate) * up (Gemma's GeGLU, the
# tanh approximation of GELU).
ACTIVATIONS = ("silu", "gelu_tanh")

# What a q/k norm (qk_norm) normalizes: each head of q and of k alone (Qwen3, Gemma 3), or all of q's heads together and
# all of k's (OLMo 2: weights (n_heads * head_dim,) and (n_kv_heads * head_dim,)).
QK_NORM_SCOPES = ("head", "all")

# Bounds a configuration read from a file must respect before anything is allocated from it; the
# largest models we know stay far inside (Llama-3.1-405B: 126 layers, dim 16384, ffn 53248,
# 128 heads; Gemma: vocabulary 262,144; contexts up to 1M).
_LIMITS = {"vocab_size": 1 << 22, "dim": 1 << 16, "n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024,
           "ffn_dim": 1 << 18, "head_dim": 1024, "max_seq_len": 1 << 20}


@dataclass(frozen=True)
class ModelConfig:
    """Grouped-query attention, SwiGLU, RMSNorm, half-split RoPE; the family's switches at the end."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int = 0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama-3 style frequency scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None for plain RoPE.
    rope_scaling: dict | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = field(default_factory=tuple)
    add_bos: bool = False
    # Which family the source declared (llama, mistral, qwen2, qwen3, phi3): shown to people; the
    # network itself follows the switches below, never this name.
    family: str = "llama"
    # (head_dim/2,) divisors of the inverse frequencies: Llama-3 scaling as llama.cpp stores it (GGUF tensor
    # rope_freqs), linear scaling (one factor in every place), or both multiplied; None for none. Exclusive with
    # rope_scaling.
    rope_freq_factors: tuple[float, ...] | None = None
    # YaRN's and longrope's attention factor: the RoPE table's cos and sin scaled by it (its frequencies come as
    # rope_freq_factors)
    rope_attention_factor: float = 1.0
    # longrope (Phi-3 128k, Phi-3.5): (head_dim/2,) divisors that replace rope_freq_factors (its short ones) in a
    # run whose context exceeds rope_original_context, for the whole run (llama.cpp's choice); None for none
    rope_long_freq_factors: tuple[float, ...] | None = None
    rope_original_context: int = 0
    # Linear maps that add an output bias after W x (never thresholded): a subset of
    # LINEAR_KINDS; Qwen2 has ("qkv",).
    linear_biases: tuple[str, ...] = ()
    # RMSNorm of q and of k, before RoPE: over each head (Qwen3, Gemma 3), weights (head_dim,) each, or, with
    # qk_norm_scope "all", over the whole of q and of k (OLMo 2), weights (q_dim,) and (kv_dim,)
    qk_norm: bool = False
    # Layers (ascending indices) whose attention rotates neither q nor k: no position encoding ("NoPE", SmolLM3's
    # every fourth layer); every other layer applies RoPE.
    nope_layers: tuple[int, ...] = ()
    # Gemma 3, GLM-4: an RMSNorm of the attention's output and of the MLP's output before each joins the residual
    # (four norms a layer: "sandwich" norms), weights (dim,) each
    post_norms: bool = False
    # the MLP's gate activation (ACTIVATIONS)
    activation: str = "silu"
    # the input embeddings times this (Gemma: sqrt(dim)); a tied head multiplies by the unscaled table
    embed_scale: float = 1.0
    # Layers (ascending indices) whose token at position p attends only to the keys at positions p - window < k <= p
    # (Gemma 3's local layers); 0 / (): none
    sliding_window: int = 0
    sliding_layers: tuple[int, ...] = ()
    # the RoPE base of the sliding layers' own table, plain (no scaling, no attention factor: Gemma 3's, Olmo 3's); 0:
    # they rotate by the model's table
    rope_local_theta: float = 0.0
    # Gemma 2's soft-caps, x -> cap * tanh(x / cap): of every attention score (after its 1 / sqrt(head_dim) scale,
    # before the mask) and of every logit the head gives; 0 (or None, read as 0): none
    attn_logit_softcap: float = 0.0
    final_logit_softcap: float = 0.0
    # partial RoPE (Phi-4-mini: 96 of 128; GLM-4: 64 of 128): the leading dimensions of each head of q and k, in the
    # source's order, that RoPE rotates (pairing j with j + rope_dims/2; GLM-4: 2j with 2j + 1), the others passed
    # through; 0 (or head_dim, read as 0): all.
    # The readers permute q's and k's head dimensions (folding.rope_dim_order), so that the pairs of the rotation
    # every path runs, (i, i + head_dim/2), are the rotated pairs for i < rope_dims/2 and passed-through pairs above
    # (rope_table: frequency 0); the frequency factors then hold rope_dims/2 entries.
    rope_dims: int = 0
    # OLMo 2: no RMSNorm before the attention and the MLP (False: each map reads the residual stream; its post_norms
    # norm the outputs), and its q/k norms over the whole of q and of k (QK_NORM_SCOPES). A file written before these
    # keys reads as True and "head": every earlier family's.
    pre_norms: bool = True
    qk_norm_scope: str = "head"

    def __post_init__(self):
        """Checks every field (ValueError naming the field): a configuration comes from a file."""
        for name, limit in _LIMITS.items():
            value = getattr(self, name)
            if name == "head_dim" and value in (0, None):
                continue
            if type(value) is not int or not 1 <= value <= limit:
                raise ValueError(f"model configuration: {name} must be an integer in [1, {limit}], got {value!r}")
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"model configuration: head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model configuration: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        for name in ("norm_eps", "rope_theta", "rope_attention_factor"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"model configuration: {name} must be a positive number, got {value!r}")
        if self.rope_dims == self.head_dim:
            object.__setattr__(self, "rope_dims", 0)
        if type(self.rope_dims) is not int or self.rope_dims < 0 or self.rope_dims > self.head_dim or (
                self.rope_dims % 2):
            raise ValueError(f"model configuration: rope_dims must be an even integer in [0, head_dim "
                             f"{self.head_dim}] (0: all rotated), got {self.rope_dims!r}")
        if not isinstance(self.eos_ids, (tuple, list)):
            raise ValueError(f"model configuration: eos_ids must be a list, got {self.eos_ids!r}")
        object.__setattr__(self, "eos_ids", tuple(self.eos_ids))
        for name, ids in (("bos_id", () if self.bos_id is None else (self.bos_id,)), ("eos_ids", self.eos_ids)):
            if any(type(i) is not int or not 0 <= i < self.vocab_size for i in ids):
                raise ValueError(f"model configuration: {name} {ids} lies outside the vocabulary of {self.vocab_size}")
        if self.rope_scaling is not None:
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            ok = isinstance(self.rope_scaling, dict) and all(
                type(self.rope_scaling.get(k)) in (int, float) and self.rope_scaling[k] > 0 for k in keys)
            if not ok or self.rope_scaling["high_freq_factor"] <= self.rope_scaling["low_freq_factor"]:
                raise ValueError(f"model configuration: rope_scaling needs positive {', '.join(keys)} "
                                 f"(high above low), got {self.rope_scaling!r}")
        # tuples, also when read back from JSON lists
        object.__setattr__(self, "linear_biases", tuple(self.linear_biases))
        if self.rope_freq_factors is not None:
            object.__setattr__(self, "rope_freq_factors", tuple(float(f) for f in self.rope_freq_factors))
        unknown = set(self.linear_biases) - set(LINEAR_KINDS)
        if unknown:
            raise ValueError(f"linear_biases {sorted(unknown)} are not among {LINEAR_KINDS}")
        pairs = self.rotary_dims // 2
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != pairs:
            raise ValueError(f"rope_freq_factors has {len(self.rope_freq_factors)} entries, the rotated pairs are "
                             f"{pairs}")
        if self.rope_freq_factors is not None and not all(math.isfinite(f) and f > 0 for f in self.rope_freq_factors):
            raise ValueError(f"rope_freq_factors must be positive numbers, got {self.rope_freq_factors!r}")
        if self.rope_long_freq_factors is not None:
            if not isinstance(self.rope_long_freq_factors, (tuple, list)):
                raise ValueError(f"rope_long_freq_factors must be a list, got {self.rope_long_freq_factors!r}")
            long = tuple(float(f) for f in self.rope_long_freq_factors)
            object.__setattr__(self, "rope_long_freq_factors", long)
            if self.rope_freq_factors is None or len(long) != pairs or not all(
                    math.isfinite(f) and f > 0 for f in long):
                raise ValueError(f"rope_long_freq_factors needs rope_freq_factors beside it and {pairs} "
                                 f"positive numbers, got {self.rope_long_freq_factors!r}")
            if type(self.rope_original_context) is not int or self.rope_original_context < 1:
                raise ValueError(f"rope_original_context must be a positive integer with rope_long_freq_factors, got "
                                 f"{self.rope_original_context!r}")
        if not isinstance(self.nope_layers, (tuple, list)) or any(
                type(i) is not int or not 0 <= i < self.n_layers for i in self.nope_layers):
            raise ValueError(f"model configuration: nope_layers must list layer indices below {self.n_layers}, "
                             f"got {self.nope_layers!r}")
        object.__setattr__(self, "nope_layers", tuple(sorted(set(self.nope_layers))))
        if not isinstance(self.sliding_layers, (tuple, list)) or any(
                type(i) is not int or not 0 <= i < self.n_layers for i in self.sliding_layers):
            raise ValueError(f"model configuration: sliding_layers must list layer indices below {self.n_layers}, "
                             f"got {self.sliding_layers!r}")
        object.__setattr__(self, "sliding_layers", tuple(sorted(set(self.sliding_layers))))
        if type(self.sliding_window) is not int or self.sliding_window < 0 or (
                bool(self.sliding_window) != bool(self.sliding_layers)):
            raise ValueError(f"model configuration: sliding_window must be a positive integer where sliding_layers "
                             f"are listed (0 where none are), got {self.sliding_window!r}")
        for name in ("qk_norm", "post_norms", "pre_norms"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"model configuration: {name} must be true or false, got {getattr(self, name)!r}")
        if self.qk_norm_scope not in QK_NORM_SCOPES or (self.qk_norm_scope != "head" and not self.qk_norm):
            raise ValueError(f"model configuration: qk_norm_scope must be one of {QK_NORM_SCOPES} (other than head "
                             f"only with qk_norm), got {self.qk_norm_scope!r}")
        if not (self.pre_norms or self.post_norms):  # (a block with no norm at all: no family has one)
            raise ValueError("model configuration: pre_norms off needs post_norms (each block norms somewhere)")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model configuration: activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        for name in ("embed_scale", "rope_local_theta"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not math.isfinite(value) or value < 0 or (
                    name == "embed_scale" and value == 0):
                kind = "a positive" if name == "embed_scale" else "a non-negative"
                raise ValueError(f"model configuration: {name} must be {kind} number, got {value!r}")
        for name in ("attn_logit_softcap", "final_logit_softcap"):
            value = getattr(self, name)
            value = 0.0 if value is None else value  # (transformers' "none")
            if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"model configuration: {name} must be a non-negative number (0: none), got {value!r}")
            object.__setattr__(self, name, float(value))

    def window(self, layer: int) -> int:
        """The sliding window of layer `layer`'s attention (sliding_window), or 0: it attends to every earlier key."""
        return self.sliding_window if layer in self.sliding_layers else 0

    def rotates_locally(self, layer: int) -> bool:
        """Whether layer `layer` rotates q and k by the sliding layers' own table (rope_local_theta)."""
        return self.rope_local_theta > 0 and layer in self.sliding_layers and self.rotates(layer)

    @property
    def gemma_switches(self) -> bool:
        """Whether any of Gemma's own switches is on: post-norms, a GELU MLP, scaled embeddings, a local RoPE table
        (Gemma 3's, and Olmo 3's with OLMo 2's post-norms; its sliding layers are any windowed model's: sliding_layers;
        Gemma 2's soft-caps: soft_capped)."""
        return self.post_norms or self.activation != "silu" or self.embed_scale != 1.0 or self.rope_local_theta > 0

    @property
    def soft_capped(self) -> bool:
        """Whether the attention scores or the logits are soft-capped (Gemma 2)."""
        return self.attn_logit_softcap > 0 or self.final_logit_softcap > 0

    def rotates(self, layer: int) -> bool:
        """Whether layer `layer`'s attention applies RoPE to q and k (not a NoPE layer)."""
        return layer not in self.nope_layers

    def layer_norms(self) -> dict[str, int]:
        """Each layer's RMSNorm weights (layers.{i}.<name>) and their sizes: the attention's and the MLP's input norms
        (pre_norms: all but OLMo 2), q's and k's norms (qk_norm: per head, Qwen3 and Gemma 3; over the whole of q and
        of k, OLMo 2), the attention's and the MLP's output norms (post_norms: Gemma, OLMo 2)."""
        norms = {"attention_norm": self.dim, "ffn_norm": self.dim} if self.pre_norms else {}
        if self.qk_norm and self.qk_norm_scope == "all":
            norms |= {"q_norm": self.q_dim, "k_norm": self.kv_dim}
        elif self.qk_norm:
            norms |= {"q_norm": self.head_dim, "k_norm": self.head_dim}
        if self.post_norms:
            norms |= {"post_attention_norm": self.dim, "post_ffn_norm": self.dim}
        return norms

    @property
    def rotary_dims(self) -> int:
        """How many of each head's dimensions RoPE rotates (rope_dims; all where it is 0)."""
        return self.rope_dims or self.head_dim

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def map_shapes(self) -> list[tuple[int, int]]:
        """(N, K) of the linear maps a decode step runs, as the runtime stores them: q|k|v fused, o, gate|up fused,
        down."""
        return [(self.q_dim + 2 * self.kv_dim, self.dim), (self.dim, self.q_dim), (2 * self.ffn_dim, self.dim),
                (self.dim, self.ffn_dim)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """ValueError or TypeError when d is not a valid configuration."""
        if not isinstance(d, dict):
            raise TypeError(f"model configuration must be a JSON object, got {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})
