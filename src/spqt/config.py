"""The Llama-family architecture as data: everything model.py needs to build the network.

A family (Llama 2/3/3.1/3.2, SmolLM, Mistral, Qwen2/2.5, Qwen3) is these numbers plus a few
switches: output biases on some linear maps (Qwen2's q, k, v), a per-head RMSNorm of q and k
(Qwen3), Llama-3 RoPE scaling given as parameters (HF) or as per-frequency factors (GGUF).
"""

from dataclasses import asdict, dataclass, field

# The per-layer linear maps, q|k|v and gate|up stacked (model.py builds them under these names).
LINEAR_KINDS = ("qkv", "o", "gate_up", "down")


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
    # Which family the source declared (llama, mistral, qwen2, qwen3): shown to people; the
    # network itself follows the switches below, never this name.
    family: str = "llama"
    # The same Llama-3 scaling as llama.cpp stores it (GGUF tensor rope_freqs): (head_dim/2,)
    # divisors of the inverse frequencies; None for none. Exclusive with rope_scaling.
    rope_freq_factors: tuple[float, ...] | None = None
    # Linear maps that add an output bias after W x (never thresholded): a subset of
    # LINEAR_KINDS; Qwen2 has ("qkv",).
    linear_biases: tuple[str, ...] = ()
    # RMSNorm over each head of q and of k, before RoPE (Qwen3), weights (head_dim,) each.
    qk_norm: bool = False

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        # tuples, also when read back from JSON lists
        object.__setattr__(self, "eos_ids", tuple(self.eos_ids))
        object.__setattr__(self, "linear_biases", tuple(self.linear_biases))
        if self.rope_freq_factors is not None:
            object.__setattr__(self, "rope_freq_factors", tuple(float(f) for f in self.rope_freq_factors))
        unknown = set(self.linear_biases) - set(LINEAR_KINDS)
        if unknown:
            raise ValueError(f"linear_biases {sorted(unknown)} are not among {LINEAR_KINDS}")
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
            raise ValueError(f"rope_freq_factors has {len(self.rope_freq_factors)} entries, head_dim/2 is {self.head_dim // 2}")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})
