"""Readers for the models we convert: GGUF files and Hugging Face checkpoint folders.

Both give a :class:`SourceModel`: the architecture (:class:`ModelConfig`), float32 tensors under
our canonical names, the tokenizer (serialized ``tokenizers`` JSON plus chat template) and
provenance. Canonical names, weights as (out_features, in_features)::

    tok_embeddings (V, D)   output (V, D) unless tied   norm (D,)
    layers.{i}.attention_norm, layers.{i}.ffn_norm (D,)
    layers.{i}.wq (H*hd, D)  wk, wv (Hkv*hd, D)  wo (D, H*hd)
    layers.{i}.w1 gate (F, D)  w3 up (F, D)  w2 down (D, F)
    family switches (config.py), present only where the family has them:
    layers.{i}.bq (H*hd,)  bk, bv (Hkv*hd,)  bo (D,)  b1, b3 (F,)  b2 (D,)   output biases
    layers.{i}.q_norm, layers.{i}.k_norm (hd,)                               Qwen3, Gemma 3, EXAONE 4.0
                                         (H*hd,), (Hkv*hd,)                 OLMo 2 and 3 (whole q and k)
    layers.{i}.post_attention_norm, layers.{i}.post_ffn_norm (D,)           Gemma 2 and 3, OLMo 2 and 3, GLM-4,
                                                                            EXAONE 4.0
    (OLMo 2 and 3 and EXAONE 4.0 have no attention_norm or ffn_norm: config pre_norms off)
    Phi-3 stores q|k|v ((H + 2*Hkv)*hd, D) and gate|up (2F, D) fused, GLM-4 gate|up: each reader splits them by rows
    into wq, wk, wv and w1, w3, reading only the rows asked for.

Families and where they come from:

    family      Hugging Face model_type   GGUF general.architecture   switches
    Llama 2/3   llama                     llama                       Llama-3 or linear RoPE scaling; tied head (3.2)
    Mistral     mistral, mistral3         llama                       sliding window in every layer (HF)
                (Mistral Small 3.x: its text)
    Ministral   ministral                 llama                       Mistral's, the window in the layers its
    (8B 2410)                                                         layer_types mark (HF)
    Qwen2/2.5   qwen2                     qwen2                       q, k, v biases; use_sliding_window (HF)
    Qwen3       qwen3                     qwen3                       q/k RMSNorm per head; use_sliding_window (HF)
    Phi-3/3.5   phi3                      phi3                        fused q|k|v, gate|up; sliding window (every
                                                                      layer); longrope (128k, 3.5); partial
                                                                      RoPE refused (Phi-4-mini)
    SmolLM3     smollm3                   smollm3                     NoPE layers: q and k of some layers not rotated
    Granite 3   granite                   granite                     four multipliers, folded into the weights as
                                                                      they are read (folding.py); MoE types refused
    Gemma 2     gemma2                    gemma2                      Gemma 3's switches without q/k norms or a local
                                                                      RoPE base (every other layer sliding), plus
                                                                      soft-capped attention scores and logits; norms'
                                                                      1 + w folded, the attention scale into wq
    Gemma 3     gemma3_text, gemma3       gemma3                      four norms a layer, GELU MLP, scaled
                (multimodal: its text)                                embeddings, q/k norms, sliding-window layers
                                                                      with their own RoPE base; norms' 1 + w and the
                                                                      attention scale folded into the norm weights
    OLMo 2      olmo2                     olmo2                       post-norms alone (no norm before the attention
                                                                      or the MLP), q/k norms over the whole of q and
                                                                      of k; OLMo 1 (olmo) and OLMoE refused
    Olmo 3      olmo3                     olmo2 with a window key     OLMo 2's switches, sliding-window layers (every
                                                                      fourth full) rotated by a plain table of their
                                                                      own, the full layers' scaling (YaRN) on theirs
    GLM-4 0414  glm4                      glm4                        four norms a layer (Gemma's, plain weights), q,
                                                                      k, v biases, fused gate|up, partial RoPE in
                                                                      GLM's interleaved pairs (rows permuted as
                                                                      read); chatglm, glm, glm4_moe, glm4v refused
    EXAONE 3.5  exaone                    exaone                      Llama's network under EXAONE's tensor names
    (3.0, Deep)                                                       (transformer.h.{i}.attn.attention.q_proj, ...)
    EXAONE 4.0  exaone4                   exaone4                     post-norms alone (OLMo 2's), q/k norms per head
                                                                      (Qwen3's), sliding-window layers rotated by
                                                                      the model's table, the full layers unrotated
                                                                      (NoPE) where the model has a window
    ERNIE 4.5   ernie4_5                  ernie4_5                    Llama's network, its RoPE pairs (2j, 2j + 1)
    (dense)                                                           over the whole head (rows permuted as read);
                                                                      use_bias: biases on all seven maps;
                                                                      ernie4_5_moe, ernie4_5_vl_moe refused
    Seed-OSS    seed_oss                  seed_oss                    Llama's network, an explicit head_dim, q, k, v
                                                                      biases (attention_bias), o's
                                                                      (attention_out_bias), the MLP's (mlp_bias);
                                                                      the GGUF's pre-MLP norm under
                                                                      post_attention_norm

GGUF detail: for the ``llama`` architecture llama.cpp's converter permutes the rows of attn_q /
attn_k (and their biases) inside each head (its RoPE rotates adjacent pairs); we undo that, as
transformers does, so every source uses the half-split RoPE of model.py. ``qwen2``, ``qwen3`` and ``phi3``
files keep the Hugging Face order (llama.cpp runs them with half-split, "NEOX", RoPE), as ``gemma2``, ``gemma3`` and
``olmo2`` files do. ``glm4`` files keep them too: llama.cpp rotates their adjacent pairs (NORM RoPE), as transformers
rotates GLM-4's (2j, 2j + 1), and the readers of both permute those rows into our pairing (folding.rope_dim_order,
_INTERLEAVED_ROPE); ``ernie4_5`` files as well (NORM RoPE over whole heads, the converter keeping the Hugging Face
rows, as transformers' Ernie4_5 rotates (2j, 2j + 1) of every head); ``seed_oss`` files keep them (NEOX RoPE, as
``qwen2``). Llama 3.1
scaling arrives in a GGUF as the tensor ``rope_freqs`` (per-frequency divisors), not as keys; linear and YaRN
scaling as keys, read as llama.cpp reads them, and kept as divisors too (YaRN's attention factor beside them). Phi-3's
longrope arrives as the tensors ``rope_factors_short`` and ``rope_factors_long`` and the keys rope.scaling.attn_factor
and rope.scaling.original_context_length. A GGUF split by
llama.cpp's gguf-split (PREFIX-00001-of-00003.gguf, ...) is read from its first file, as llama.cpp reads it.

SmolLM3: its NoPE layers come from the HF config's ``no_rope_layers`` (a 1 or 0 a layer, 0: no RoPE; absent, every
``no_rope_layer_interval``-th layer, 4 by default), as transformers reads it. A ``smollm3`` GGUF carries no key for
them: llama.cpp skips RoPE in every fourth layer (3, 7, 11, ...), and so do we. Its q/k rows are permuted as
``llama``'s (llama.cpp's converter treats it as Llama; its RoPE rotates adjacent pairs).

Gemma 3: a config.json's keys left out are Gemma3TextConfig's (_gemma3_config: a multimodal checkpoint's text_config
gives few), its layer_types say which layers slide; a ``gemma3`` GGUF carries the window alone: llama.cpp runs every
sixth layer in full, the others through the window, rotated by base 10,000, and scales the scores by 1 / sqrt(head_dim)
(27B: 1 / sqrt(dim / heads)), whatever the checkpoint's query_pre_attn_scalar; its q/k rows keep the Hugging Face order
and its norms hold 1 + w already (llama.cpp's converter adds the 1).

Gemma 2: a config.json's keys left out are Gemma2Config's (_gemma2_config: soft-caps 50 and 30, a window of 4,096 in
every other layer from the first, query_pre_attn_scalar 256); a ``gemma2`` GGUF runs as llama.cpp runs it: the window
of attention.sliding_window (absent: 4,096) in layers 0, 2, 4, ..., the caps of attn_logit_softcapping and
final_logit_softcapping (absent: 50 and 30; 0 reads as none), RoPE base 10,000 unless rope.freq_base says otherwise,
scores scaled by 1 / sqrt(head_dim) (27B, 46 layers: 1 / sqrt(dim / heads)); its norms hold 1 + w already and its q/k
rows the Hugging Face order. With no q_norm, the attention scale is a factor of wq (and bq: folding.gemma_norms).

Olmo 3: a config.json's keys left out are Olmo3Config's (_olmo3_config: every fourth layer full, the others sliding
through a window of 4,096, base 500,000), its RoPE a block a layer type (from the published configs' rope_theta and
rope_scaling: the scaling the full layers'); the sliding layers rotate by a plain table of their own (rope_local_theta).
An ``olmo2`` GGUF with attention.sliding_window above 0 is Olmo 3 as llama.cpp runs it: every fourth layer full, the
others through the window with plain RoPE of rope.freq_base (no YaRN, attention factor 1), the full layers with the
file's scaling keys, their cos and sin times rope.scaling.attn_factor where the file has one (its converter copies
the config's attention_factor there, which transformers takes in place of YaRN's own 1 + 0.1 ln factor; llama.cpp
multiplies the two, for Olmo-3-7B 1 + 0.1 ln 8 squared), else YaRN's own: the network transformers runs.

EXAONE 4.0: a config.json's keys left out are Exaone4Config's (its layer_types: every fourth layer full unless the
config lists them; the published configs do); where the config has a sliding_window the sliding layers rotate by the
model's table (its llama3 scaling too) and the full layers not at all (transformers' "global NoPE"), where it has
none (the 1.2B) every layer is full and rotated. An ``exaone4`` GGUF runs as transformers runs the config it was
converted from: attention.sliding_window (absent or 0: no window, every layer rotated; absent in a 64-layer file:
4,096, as llama.cpp runs the 32B), its sliding layers from attention.sliding_window_pattern (one flag a layer, as the
converter writes layer_types; absent: every fourth layer full, Exaone4Config's default and llama.cpp's), the full
layers unrotated; q/k rows in the Hugging Face order (llama.cpp rotates NEOX pairs), Llama-3 scaling as rope_freqs.
llama.cpp itself reads no pattern key and runs a window in 64-layer files alone (the 32B's shape: the same network).

EXAONE 3.5 (3.0, Deep): transformers runs ``exaone`` as Llama (ExaoneConfig: the keys num_layers,
layer_norm_epsilon and activation_function read as num_hidden_layers, rms_norm_eps and hidden_act; those left out are
its defaults, RoPE base 500,000 among them) on the checkpoint's own names, which the reader renames as transformers'
conversion mapping does (_HF_EXAONE_NAMES). An ``exaone`` GGUF holds Llama's tensor names with q/k rows in the Hugging
Face order (llama.cpp rotates NEOX pairs), its norm epsilon under layer_norm_rms_epsilon or, as later converters
write it, layer_norm_epsilon.

Granite: its q/k rows are permuted as ``llama``'s too (llama.cpp's converter builds it on its Llama class). A
config.json leaves a multiplier out as GraniteConfig's 1.0 (attention too: scores scaled by 1, not 1 / sqrt(head_dim));
a GGUF key left out or 0 is llama.cpp's "none" (attention: 1 / sqrt(head_dim)).
"""

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from spqt.config import _LIMITS, LINEAR_KINDS, ModelConfig
from spqt.errors import SpqtError
from spqt.folding import HF_KEYS as MULTIPLIER_KEYS
from spqt.folding import fold_factors, folded, gemma_norms, gguf_multipliers, hf_multipliers, partial_rope_rows
from spqt.quant import count_nonfinite

SUPPORTED_GGUF_ARCHS = ("llama", "qwen2", "qwen3", "phi3", "smollm3", "granite", "gemma2", "gemma3", "olmo2", "glm4",
                        "exaone", "exaone4", "ernie4_5", "seed_oss")
SUPPORTED_HF_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "granite", "gemma2", "gemma3_text",
                      "gemma3", "mistral3", "olmo2", "olmo3", "glm4", "exaone", "exaone4", "ernie4_5", "seed_oss",
                      "ministral")
# the multimodal model_types read as their text model (text_config): the text model's model_type
_HF_MULTIMODAL = {"gemma3": "gemma3_text", "mistral3": "mistral"}
# GGUF architectures whose q/k rows llama.cpp's converter interleaves per head (see above).
_GGUF_PERMUTED_QK = ("llama", "smollm3", "granite")
# Families (model_type and GGUF architecture alike) whose RoPE pairs each head's rotated dimensions (2j, 2j + 1) in the
# file's row order (transformers' Glm4 and Ernie4_5 rotate_half of x[0::2] and x[1::2]; llama.cpp's glm4 and ernie4_5:
# NORM RoPE, their converters keeping the Hugging Face rows): the readers permute q's and k's rows into ours
# (folding.partial_rope_rows; ERNIE 4.5 rotates whole heads)
_INTERLEAVED_ROPE = ("glm4", "ernie4_5")
# GGUF and HF families whose partial RoPE (rope.dimension_count, partial_rotary_factor below 1) we run
_PARTIAL_ROPE = ("phi3", "glm4")
# GGUF architectures with NoPE layers: llama.cpp skips RoPE in layer i where (i + 1) % step == 0 (a fixed step, no key)
_GGUF_NOPE_STEP = {"smollm3": 4}
# the storage types (safetensors' and GGUF's names) that hold floats, not values rounded to a quantized grid
FLOAT_TYPES = ("F64", "F32", "F16", "BF16")

_GGUF_NAMES = {
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
    "attn_q": "wq",
    "attn_k": "wk",
    "attn_v": "wv",
    "attn_output": "wo",
    "ffn_gate": "w1",
    "ffn_up": "w3",
    "ffn_down": "w2",
}
# Gemma's and OLMo 2's norms of the attention's and the MLP's outputs (Gemma's ffn_norm is the norm before the MLP, as
# everyone's)
_GGUF_POST_NORMS = {"post_attention_norm": "post_attention_norm", "post_ffw_norm": "post_ffn_norm"}
# Seed-OSS's names (llama.cpp's seed_oss): its norm before the MLP (transformers' post_attention_layernorm, Llama's)
# written as post_attention_norm, where the other families have ffn_norm
_GGUF_SEED_OSS_NAMES = {**{key: ours for key, ours in _GGUF_NAMES.items() if key != "ffn_norm"},
                        "post_attention_norm": "ffn_norm"}
# The norm switches of a family (model_type and GGUF architecture alike; an olmo2 GGUF with a window is Olmo 3):
# OLMo 2's and 3's (transformers' Olmo2DecoderLayer, llama.cpp's olmo2) the attention's and the MLP's outputs normed
# before the residual sum, no norm before them, q and k normed each over all of its heads (before RoPE); EXAONE 4.0's
# (Exaone4DecoderLayer, llama.cpp's exaone4) OLMo 2's post-norms alone, its q/k norms per head (Qwen3's: the readers
# find q_norm and k_norm of head_dim); GLM-4 0414's (Glm4DecoderLayer, llama.cpp's glm4) Gemma's four norms a layer,
# with a SiLU-gated MLP
_OLMO2_SWITCHES = {"pre_norms": False, "post_norms": True, "qk_norm_scope": "all"}
_FAMILY_SWITCHES = {"olmo2": _OLMO2_SWITCHES, "olmo3": _OLMO2_SWITCHES, "exaone4": {"pre_norms": False,
                    "post_norms": True}, "glm4": {"post_norms": True}}
# llama.cpp's exaone4 without a sliding_window_pattern key: every fourth layer (i % 4 == 3) full, as Exaone4Config's
# default pattern (4) and llama.cpp's for the 64-layer 32B
_GGUF_EXAONE4_FULL_EVERY = 4
_GGUF_EXAONE4_32B_WINDOW = 4096  # (llama.cpp's window for a 64-layer exaone4 file without attention.sliding_window)
# llama.cpp's gemma3: every sixth layer (i % 6 == 5) attends to every key, the others through the sliding window;
# the sliding layers rotate by a table of base 10,000 (no key for either, unless rope.freq_base_swa is written)
_GGUF_GEMMA3_FULL_EVERY = 6
_GGUF_GEMMA3_LOCAL_THETA = 10000.0
# llama.cpp's gemma2: every other layer (i % 2 == 0) through the sliding window, of 4,096 keys where no key gives it;
# the soft-caps where no key gives them (llama_hparams' defaults)
_GGUF_GEMMA2_SLIDING_EVERY = 2
_GGUF_GEMMA2_WINDOW = 4096
_GGUF_GEMMA2_CAPS = {"attn_logit_softcapping": ("attn_logit_softcap", 50.0),
                     "final_logit_softcapping": ("final_logit_softcap", 30.0)}
# llama.cpp's olmo2 with a sliding window (Olmo 3): every fourth layer (i % 4 == 3) attends to every key, the others
# through the window
_GGUF_OLMO3_FULL_EVERY = 4
_GGUF_EXTRAS = {  # optional per-layer tensors: GGUF name -> ours
    "attn_q.bias": "bq", "attn_k.bias": "bk", "attn_v.bias": "bv", "attn_output.bias": "bo",
    "ffn_gate.bias": "b1", "ffn_up.bias": "b3", "ffn_down.bias": "b2",
    "attn_q_norm.weight": "q_norm", "attn_k_norm.weight": "k_norm",
}
# Phi-3's fused matrices, per source: the file's name (GGUF: blk.{i}.NAME.weight; HF: model.layers.{i}.NAME.weight)
# -> the fused kind whose parts (_fused_parts) it stacks by rows. llama.cpp's converter keeps gate_up_proj whole
# as ffn_up, gate rows first (llama.cpp applies SiLU to the first half).
_GGUF_FUSED = {"attn_qkv": "qkv", "ffn_up": "gate_up"}
_HF_FUSED = {"self_attn.qkv_proj": "qkv", "mlp.gate_up_proj": "gate_up"}
# Which fused linear map (config.LINEAR_KINDS) an output bias belongs to.
_BIAS_KIND = {"bq": "qkv", "bk": "qkv", "bv": "qkv", "bo": "o", "b1": "gate_up", "b3": "gate_up", "b2": "down"}
_HF_NAMES = {
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "wq",
    "self_attn.k_proj": "wk",
    "self_attn.v_proj": "wv",
    "self_attn.o_proj": "wo",
    "mlp.gate_proj": "w1",
    "mlp.up_proj": "w3",
    "mlp.down_proj": "w2",
}
# EXAONE 3.5's names for Llama's tensors (transformers' conversion mapping for exaone, applied in this order to the
# Hugging Face Llama names): Llama name fragment -> the checkpoint's
_HF_EXAONE_NAMES = (("model.embed_tokens.", "transformer.wte."), ("model.layers.", "transformer.h."),
                    ("model.norm.", "transformer.ln_f."), (".self_attn.o_proj.", ".attn.attention.out_proj."),
                    (".self_attn.", ".attn.attention."), (".input_layernorm.", ".ln_1."),
                    (".post_attention_layernorm.", ".ln_2."), (".mlp.gate_proj.", ".mlp.c_fc_0."),
                    (".mlp.up_proj.", ".mlp.c_fc_1."), (".mlp.down_proj.", ".mlp.c_proj."))
# a multimodal checkpoint's text model (Gemma 3, Mistral 3): its tensors' prefix -> its head's name (absent where tied)
_HF_MULTIMODAL_BASES = {"model.language_model.": "lm_head.weight",
                        "language_model.model.": "language_model.lm_head.weight"}
# Gemma 3's four norms a layer (transformers' names): its post_attention_layernorm is the attention's output norm,
# not the MLP's input norm as in Llama
_HF_GEMMA_NORMS = {
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffn_norm",
}  # (OLMo 2 has the two post norms alone, under these names: _layer_norm_names drops the others)
# GLM-4's four (transformers' names): its post_attention_layernorm is the MLP's input norm, as in Llama
_HF_GLM4_NORMS = {
    "input_layernorm": "attention_norm",
    "post_self_attn_layernorm": "post_attention_norm",
    "post_attention_layernorm": "ffn_norm",
    "post_mlp_layernorm": "post_ffn_norm",
}
_HF_EXTRAS = {
    "self_attn.q_proj.bias": "bq", "self_attn.k_proj.bias": "bk", "self_attn.v_proj.bias": "bv",
    "self_attn.o_proj.bias": "bo", "mlp.gate_proj.bias": "b1", "mlp.up_proj.bias": "b3",
    "mlp.down_proj.bias": "b2", "self_attn.q_norm.weight": "q_norm", "self_attn.k_norm.weight": "k_norm",
}


def _switches(extras) -> dict:
    """ModelConfig switches for a layer's optional tensors (our names: bq, ..., q_norm, k_norm)."""
    kinds = {_BIAS_KIND[e] for e in extras if e in _BIAS_KIND}
    return {"linear_biases": tuple(k for k in LINEAR_KINDS if k in kinds), "qk_norm": "q_norm" in extras}


def _layer_norm_names(config: ModelConfig, names: dict) -> dict:
    """A reader's per-layer name table ({file key: our name}) without the norms this configuration has none of (OLMo 2:
    no attention_norm or ffn_norm; config.layer_norms)."""
    norms = config.layer_norms()
    return {key: ours for key, ours in names.items() if not ours.endswith("norm") or ours in norms}


@dataclass
class TokenizerSpec:
    """What is needed to rebuild the tokenizer without the source: serialized and plain data."""

    tokenizer_json: str
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None

    def to_dict(self) -> dict:
        return {"tokenizer_json": self.tokenizer_json, "chat_template": self.chat_template,
                "bos_token": self.bos_token, "eos_token": self.eos_token}


@dataclass
class SourceModel:
    config: ModelConfig
    tokenizer: TokenizerSpec
    provenance: dict
    _loader: object = field(repr=False)
    names: list[str] = field(default_factory=list)
    # the storage types of the layers' weight matrices, as the file names them ("Q4_K", "F16", ...): a GGUF's
    # quantized ones are rounded already (empty for a Hugging Face checkpoint, which holds floats)
    weight_types: tuple[str, ...] = ()
    stored_types: dict = field(default_factory=dict)  # a GGUF's: _stored_types (empty for an HF folder)

    def tensor(self, name: str) -> torch.Tensor:
        """The float32 tensor under a canonical name (read on demand, not cached); SpqtError where it holds NaN or
        infinite values (a damaged checkpoint: they have no quantized form, and they poison every activation)."""
        t = self._loader(name)
        bad = count_nonfinite(t)
        if bad:
            raise SpqtError(f"the checkpoint's tensor {name} holds {bad} NaN or infinite values of {t.numel()}: it "
                            "is damaged")
        return t


def file_sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether path is a file that starts with GGUF's magic (whatever its name)."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def open_source(path: str | os.PathLike) -> SourceModel:
    """A GGUF file or a Hugging Face checkpoint folder -> SourceModel; anything else: SpqtError."""
    p = Path(path)
    if not p.exists():
        raise SpqtError(f"no such file or directory: {p}")
    if p.is_dir():
        return _open_hf(p)
    if is_gguf(p):
        return _open_gguf(p)
    if p.suffix == ".spqt":
        raise SpqtError(f"{p} is already a .spqt model")
    if p.suffix.lower() == ".gguf":  # as checkpoint.load_model says it for generate, perplexity and inspect
        raise SpqtError(f"{p}: not a GGUF file (it does not begin with GGUF's magic bytes)")
    raise SpqtError(f"{p} is neither a GGUF file nor a Hugging Face checkpoint folder")


# ---------------------------------------------------------------- GGUF


def _unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row interleave of attn_q / attn_k. w: (n_heads*hd, D), or a bias (n_heads*hd,)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _plain_gguf_reader():
    import gguf

    class PlainGGUFReader(gguf.GGUFReader):
        """gguf's reader over a plain ndarray view of its memory map. Each slice of an np.memmap
        runs numpy's Python-level memmap hooks: 5.6 s of CPU for the default model's 100,000
        vocabulary strings and merges, against 1.6 s on the plain view of the same mapping
        (same fields and tensors, checked)."""

        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, value):
            self._plain = value.view(np.ndarray)

    return PlainGGUFReader


def _read_gguf(path: Path):
    """gguf's reader of one file (PlainGGUFReader); SpqtError where it cannot read it."""
    try:
        # a damaged offset overflows uint64 inside the reader: our own checks refuse it (_gguf_tensor_table)
        with np.errstate(over="ignore"):
            return _plain_gguf_reader()(str(path))
    except Exception as e:  # the reader raises many kinds on a damaged file
        raise SpqtError(f"{path}: not a readable GGUF file: truncated or damaged ({type(e).__name__}: {e})") from None


def _field(reader, path: Path, key: str, default=None):
    """A GGUF metadata value, default where the key is absent; SpqtError where it cannot be decoded."""
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as e:
        raise SpqtError(f"{path}: corrupt GGUF metadata field {key} ({e})") from None


# llama.cpp's gguf-split names the files of a split model PREFIX-00001-of-00003.gguf, ...; the first holds the
# metadata, each file its share of the tensors and split.no / split.count
_SHARD_NAME = re.compile(r"(.+)-(\d{5})-of-(\d{5})\.gguf")


# Token texts that end a generation wherever a GGUF's vocabulary holds them, as llama.cpp decides (its end-of-generation
# set is found by text beside the eos / eot / eom keys): instruct models end a turn on tokens that converters seldom
# name in a key (Gemma's <end_of_turn>, Phi-3's <|end|>, ChatML's <|im_end|>, Llama 3's <|eot_id|> / <|eom_id|>,
# Granite's <|end_of_text|>, CodeLlama's <EOT>; the texts of the families read here, not every one llama.cpp lists).
END_OF_TURN_TEXTS = frozenset(("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                               "<|end_of_text|>", "<EOT>", "_<EOT>", "<end_of_utterance>",
                               # fill-in-the-middle's pad, repository and file separators (Qwen2.5, Granite)
                               "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<fim_pad>", "<reponame>"))


def _gguf_end_of_turn_ids(reader, path: Path) -> list[int]:
    """The ids of the GGUF vocabulary's tokens whose text is in END_OF_TURN_TEXTS (ascending); [] without a token
    list. Reads each token's bytes in place (a 262,144-token vocabulary in a fraction of a second)."""
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None:
        return []
    wanted = {t.encode() for t in END_OF_TURN_TEXTS}
    longest = max(map(len, wanted))
    try:
        return [i for i, part in enumerate(field.data) if len(field.parts[part]) <= longest
                and bytes(field.parts[part]) in wanted]
    except (IndexError, TypeError) as e:
        raise SpqtError(f"{path}: corrupt GGUF metadata field tokenizer.ggml.tokens ({e})") from None


def model_name(path: str | os.PathLike) -> str:
    """The name a model file goes by: its stem, a split GGUF's without the file's place (m-00001-of-00003.gguf: m)."""
    p = Path(path)
    named = _SHARD_NAME.fullmatch(p.name)
    return named.group(1) if named else p.stem


def _int_field(reader, path: Path, key: str, default: int | None = None) -> int:
    """An integer GGUF metadata value, default where the key is absent; SpqtError where it is not an integer, or is
    absent without a default."""
    value = _field(reader, path, key, default)
    if value is None:
        raise SpqtError(f"{path}: GGUF lacks the metadata key {key}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SpqtError(f"{path}: GGUF metadata key {key} is not an integer ({value!r})") from None


def _gguf_split(path: Path, reader, tensors: dict) -> tuple[dict, list[Path]]:
    """A GGUF's tensors (name -> ReaderTensor; `tensors`, the first file's, given) and its files: where it is split,
    every file's tensors and every file's path, the first's included. SpqtError where `path` is not the first file,
    a file is missing or is not this split's, or the tensors do not add up to split.tensors.count."""
    count, no = _int_field(reader, path, "split.count", 0), _int_field(reader, path, "split.no", 0)
    if count <= 1:
        return tensors, [path]
    named = _SHARD_NAME.fullmatch(path.name)
    if no != 0 or named is None or named.group(2) != "00001" or int(named.group(3)) != count:
        raise SpqtError(f"{path}: file {no + 1} of a GGUF split into {count} files; pass the first, named "
                        f"PREFIX-00001-of-{count:05d}.gguf")
    total = _int_field(reader, path, "split.tensors.count", 0)
    shards = [path.with_name(f"{named.group(1)}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    tensors = dict(tensors)
    for i, shard in enumerate(shards[1:], start=1):
        if not shard.is_file():
            raise SpqtError(f"{path}: a GGUF split into {count} files, but {shard.name} is missing")
        other = _read_gguf(shard)
        place = tuple(_int_field(other, shard, key, -1) for key in ("split.no", "split.count", "split.tensors.count"))
        if place != (i, count, total):
            raise SpqtError(f"{shard}: not file {i + 1} of {count} of {path.name}'s split (split.no, split.count, "
                            f"split.tensors.count: {place})")
        table = _gguf_tensor_table(other, shard)
        twice = sorted(tensors.keys() & table.keys())
        if twice:
            raise SpqtError(f"{shard}: tensor {twice[0]} is also in another file of the split")
        tensors.update(table)
    if total != len(tensors):
        raise SpqtError(f"{path}: the split's files hold {len(tensors)} tensors, its metadata says {total}")
    return tensors, shards


def _open_gguf(path: Path) -> SourceModel:
    import gguf

    reader = _read_gguf(path)

    def field_value(key, default=None):
        return _field(reader, path, key, default)

    # (before the architecture: a split's later files carry none)
    tensors, shards = _gguf_split(path, reader, _gguf_tensor_table(reader, path))
    arch = field_value("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise SpqtError(f"{path}: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_GGUF_ARCHS)}")
    if _int_field(reader, path, f"{arch}.expert_count", 0) > 0:
        raise SpqtError(f"{path}: mixture-of-experts models ({arch} with {field_value(f'{arch}.expert_count')} experts) "
                        f"are not supported")
    if "token_embd.weight" not in tensors:
        raise SpqtError(f"{path}: GGUF has no token_embd.weight")

    def size(key: str, default: int | None = None) -> int:
        return _int_field(reader, path, f"{arch}.{key}", default)

    n_layers = size("block_count")
    n_heads = size("attention.head_count")
    n_kv = size("attention.head_count_kv", n_heads)
    dim = size("embedding_length")
    head_dim = size("attention.key_length", dim // max(n_heads, 1))
    vocab = int(tensors["token_embd.weight"].shape[-1])
    # llama.cpp's reading: the type defaults to linear, and a linear type scales positions by 1 / factor (the factor
    # under rope.scaling.factor, or the older rope.scale_linear; absent, 0 or 1: none); type none never scales
    scaling_type = field_value(f"{arch}.rope.scaling.type") or "linear"
    if scaling_type not in ("none", "linear", "yarn"):
        raise SpqtError(f"{path}: GGUF rope scaling type {scaling_type!r} is not supported (linear and yarn are)")
    linear_factor = field_value(f"{arch}.rope.scaling.factor")
    if linear_factor is None:  # (the older key only where the newer is absent, as llama.cpp)
        linear_factor = field_value(f"{arch}.rope.scale_linear", 0.0)
    try:
        linear_factor = float(linear_factor) if scaling_type != "none" else 0.0
    except (TypeError, ValueError):
        raise SpqtError(f"{path}: GGUF rope scaling factor is not a number ({linear_factor!r})") from None
    if not (math.isfinite(linear_factor) and linear_factor >= 0):
        raise SpqtError(f"{path}: GGUF rope scaling factor {linear_factor} is not a positive number")
    context = size("context_length", 4096)
    # Phi-4-mini: llama.cpp rotates the first rope.dimension_count dimensions of each head (NEOX pairs (j, j + n/2),
    # frequencies over n, the rest passed through): transformers' partial RoPE, which the loader permutes into ours;
    # GLM-4 the same dimensions in NORM pairs (2j, 2j + 1)
    rope_dims = _int_field(reader, path, f"{arch}.rope.dimension_count", head_dim)
    if rope_dims != head_dim and (arch not in _PARTIAL_ROPE or not 2 <= rope_dims < head_dim or rope_dims % 2):
        raise SpqtError(f"{path}: partial RoPE ({rope_dims} of {head_dim} head dimensions) is not supported (for "
                        f"{' and '.join(_PARTIAL_ROPE)} an even number of them is)")
    pairs = rope_dims // 2
    yarn_divisors, attention_factor = None, 1.0
    if scaling_type == "yarn" and linear_factor not in (0.0, 1.0):
        yarn_divisors, attention_factor, context = _gguf_yarn(field_value, arch, path, linear_factor, rope_dims,
                                                              context)
        linear_factor = 0.0  # (its factor is YaRN's, not a linear one)
    if arch == "olmo2":  # llama.cpp's converters copy Olmo 3's YaRN attention_factor to rope.scaling.attn_factor
        # (the first) or rope.scaling.yarn_attn_factor (later ones): transformers' factor of cos and sin, in place of
        # YaRN's own (llama.cpp multiplies attn_factor by YaRN's own: for Olmo-3-7B, 1 + 0.1 ln 8 squared)
        given = {key: _gguf_float(field_value, path, f"olmo2.rope.scaling.{key}", 1.0)
                 for key in ("attn_factor", "yarn_attn_factor")
                 if field_value(f"olmo2.rope.scaling.{key}") is not None}
        if len(set(given.values())) > 1:
            raise SpqtError(f"{path}: GGUF olmo2.rope.scaling.attn_factor {given['attn_factor']:g} and "
                            f"yarn_attn_factor {given['yarn_attn_factor']:g} disagree")
        factor = next(iter(given.values()), attention_factor)
        if yarn_divisors is None and factor != 1.0:
            raise SpqtError(f"{path}: GGUF olmo2.rope.scaling.{next(iter(given))} {factor:g} without YaRN scaling is "
                            f"not supported (an attention factor is YaRN's)")
        attention_factor = factor
    # Llama 3.1/3.2: llama.cpp's converter stores Llama-3 scaling as divisors of each frequency
    rope_freq_factors = None
    if "rope_freqs.weight" in tensors:
        if arch == "olmo2":
            raise SpqtError(f"{path}: an olmo2 GGUF with rope_freqs.weight is not supported (llama.cpp's olmo2 "
                            f"rotates by no frequency factors)")
        rope_freq_factors = _gguf_factors(path, tensors, "rope_freqs.weight", pairs)
    if linear_factor not in (0.0, 1.0):  # dividing every frequency by the factor: the positions divided by it
        rope_freq_factors = tuple(f * linear_factor for f in rope_freq_factors or (1.0,) * pairs)
    if yarn_divisors is not None:  # (on top of rope_freqs' divisors, as llama.cpp's RoPE applies both)
        rope_freq_factors = tuple(f * d for f, d in zip(rope_freq_factors or (1.0,) * pairs, yarn_divisors))
    # Phi-3 128k / Phi-3.5: llama.cpp's converter writes longrope as two tensors and two keys (no scaling type key)
    long_factors, original = None, 0
    if "rope_factors_long.weight" in tensors or "rope_factors_short.weight" in tensors:
        if arch != "phi3" or rope_freq_factors is not None:
            raise SpqtError(f"{path}: GGUF rope scaling 'longrope' (tensors rope_factors_long, rope_factors_short) is "
                            f"supported for phi3 alone, without other scaling")
        rope_freq_factors, long_factors = (_gguf_factors(path, tensors, f"rope_factors_{k}.weight", pairs)
                                           for k in ("short", "long"))
        original = size("rope.scaling.original_context_length", context)
        if original < 2:
            raise SpqtError(f"{path}: GGUF rope.scaling.original_context_length {original} is not above 1")
        attention_factor = field_value(f"{arch}.rope.scaling.attn_factor", 1.0)  # (llama.cpp's default: its
        # converter always writes the key, sqrt(1 + ln(context / original) / ln original))
        try:
            attention_factor = float(attention_factor)
        except (TypeError, ValueError):
            raise SpqtError(f"{path}: GGUF rope.scaling.attn_factor is not a number ({attention_factor!r})") from None
    # phi3: every layer through the window, as transformers runs it (llama.cpp runs phi3 with full attention)
    window = size("attention.sliding_window", 0) if arch == "phi3" else 0
    phi3_window = {"sliding_window": window, "sliding_layers": tuple(range(n_layers))} if 0 < window < context and (
        1 <= n_layers <= _LIMITS["n_layers"]) else {}
    gemma = ({} if arch not in ("gemma2", "gemma3") else
             (_gguf_gemma3 if arch == "gemma3" else _gguf_gemma2)(field_value, size, path, n_layers, dim, n_heads,
                                                                   head_dim))
    # llama.cpp's converter writes Olmo 3 (sliding-window layers, YaRN on the full ones) as olmo2 with a window key
    # llama.cpp's converter writes GLM-4.1V's text model (M-RoPE over sections, its q/k rows permuted for NEOX) and
    # GLM-OCR's (a NextN prediction layer after the others) as glm4 too
    if arch == "glm4" and field_value("glm4.rope.dimension_sections") is not None:
        raise SpqtError(f"{path}: a glm4 GGUF with M-RoPE sections (GLM-4.1V's text model) is not supported "
                        f"(GLM-4 0414 is)")
    # and EXAONE 4.5's text model as exaone4, its NextN layers after the others (they would read as layers)
    if arch in _GGUF_NEXTN_MODELS and _int_field(reader, path, f"{arch}.nextn_predict_layers", 0) > 0:
        article, model, supported = _GGUF_NEXTN_MODELS[arch]
        raise SpqtError(f"{path}: {article} {arch} GGUF with NextN prediction layers ({model}) is not supported "
                        f"({supported} is)")
    olmo3 = _gguf_olmo3(field_value, size, path, n_layers) if arch == "olmo2" else {}
    # the layers that rotate and slide: SmolLM3's fixed NoPE step, EXAONE 4.0's keys
    layer_kinds = (_gguf_exaone4(field_value, size, path, n_layers) if arch == "exaone4" else
                   {"nope_layers": _every(_GGUF_NOPE_STEP.get(arch), n_layers)})
    # optional per-layer tensors: the family's own (qwen2 q/k/v biases, qwen3, gemma3, olmo2, exaone4 q/k norms) must be
    # there; others (biases a llama file may carry) are taken when layer 0 has them
    required = {"qwen2": {"attn_q.bias", "attn_k.bias", "attn_v.bias"},
                "qwen3": {"attn_q_norm.weight", "attn_k_norm.weight"},
                "gemma3": {"attn_q_norm.weight", "attn_k_norm.weight"},
                "olmo2": {"attn_q_norm.weight", "attn_k_norm.weight"},
                "exaone4": {"attn_q_norm.weight", "attn_k_norm.weight"}}.get(arch, set())
    layer_extras = {g: ours for g, ours in _GGUF_EXTRAS.items() if g in required or f"blk.0.{g}" in tensors}
    eos_ids = []
    try:
        for key in ("eos_token_id", "eot_token_id", "eom_token_id"):  # llama.cpp stops on each (Llama 3: <|eot_id|>)
            v = field_value(f"tokenizer.ggml.{key}")
            if v is not None and int(v) not in eos_ids:
                eos_ids.append(int(v))
        # and on the end-of-turn tokens it finds by text (Gemma 3's <end_of_turn>, Phi-3's <|end|>: no key names them)
        eos_ids += [i for i in _gguf_end_of_turn_ids(reader, path) if i not in eos_ids and i < vocab]
        bos = field_value("tokenizer.ggml.bos_token_id")
        bos = None if bos is None else int(bos)
    except (TypeError, ValueError) as e:
        raise SpqtError(f"{path}: GGUF token ids are not integers ({e})") from None
    try:
        config = ModelConfig(
            vocab_size=vocab,
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            ffn_dim=size("feed_forward_length"),
            head_dim=head_dim,
            norm_eps=_gguf_norm_eps(field_value, arch),
            rope_theta=float(field_value(f"{arch}.rope.freq_base", 10000.0)),
            max_seq_len=context,
            tie_embeddings="output.weight" not in tensors,
            bos_id=bos,
            eos_ids=tuple(eos_ids),
            add_bos=bool(field_value("tokenizer.ggml.add_bos_token", False)),
            family="olmo3" if olmo3 else arch,
            rope_freq_factors=rope_freq_factors,
            rope_attention_factor=attention_factor,
            rope_long_freq_factors=long_factors,
            rope_original_context=original,
            rope_dims=rope_dims,
            **layer_kinds,
            **_switches(layer_extras.values()),
            **{k: v for k, v in gemma.items() if k != "query_scale"},
            **phi3_window,
            **olmo3,
            **_FAMILY_SWITCHES.get(arch, {}),
        )
    except (TypeError, ValueError) as e:
        raise SpqtError(f"{path}: inconsistent GGUF metadata ({e})") from None
    names = ["tok_embeddings", "norm"] + ([] if config.tie_embeddings else ["output"])
    gguf_name = {"tok_embeddings": "token_embd.weight", "norm": "output_norm.weight", "output": "output.weight"}
    rows = {}  # our name -> (first row, end row, rows of the fused tensor) for the parts of a fused tensor
    plain_names = _GGUF_SEED_OSS_NAMES if arch == "seed_oss" else _GGUF_NAMES
    layer_names = _layer_norm_names(config, {**plain_names, **(_GGUF_POST_NORMS if config.post_norms else {})})
    fused = _GGUF_FUSED if arch == "phi3" else {"ffn_up": "gate_up"} if arch == "glm4" else {}
    _add_layer_names(config, layer_names, fused, layer_extras, lambda i, key: f"blk.{i}.{key}", names, gguf_name, rows)
    missing = list(dict.fromkeys(gguf_name[n] for n in names if gguf_name[n] not in tensors))
    if missing:
        raise SpqtError(f"{path}: GGUF lacks tensors {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    _check_shapes(path, config, {n: tuple(int(d) for d in reversed(tensors[gguf_name[n]].shape)) for n in names},
                  {n: gguf_name[n] for n in names}, rows)
    for n in names:
        kind = tensors[gguf_name[n]].tensor_type.name
        if kind in ("I8", "I16", "I32", "I64"):  # weights are floating point or block-quantized (IQ4_XS ... too)
            raise SpqtError(f"{path}: tensor {gguf_name[n]} has integer type {kind}")
    permuted = arch in _GGUF_PERMUTED_QK

    def load(name: str) -> torch.Tensor:
        t = tensors[gguf_name[name]]
        shape = tuple(int(s) for s in reversed(t.shape))
        data = t.data
        if name in rows:  # a part of a fused matrix: its rows alone (a row's blocks never cross rows)
            start, end, _ = rows[name]
            data, shape = data[start:end], (end - start, *shape[1:])
        try:
            values = gguf.quants.dequantize(data, t.tensor_type)
        except NotImplementedError:
            raise SpqtError(f"{path}: tensor type {t.tensor_type.name} of {t.name} is not supported by the gguf package") from None
        w = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))
        if permuted and name.endswith((".wq", ".bq")):
            w = _unpermute_rope_rows(w, n_heads)
        elif permuted and name.endswith((".wk", ".bk")):
            w = _unpermute_rope_rows(w, n_kv)
        return w

    factors = {}
    if arch == "granite":
        try:
            multipliers = gguf_multipliers(field_value, arch)
        except ValueError as e:
            raise SpqtError(f"{path}: GGUF metadata key {e}") from None
        try:
            factors = fold_factors(multipliers, config)
        except ValueError as e:
            raise SpqtError(f"{path}: {e}") from None
    # (Phi-4-mini, GLM-4, ERNIE 4.5: q's and k's rows in our pairing)
    loader = partial_rope_rows(folded(load, factors), config, interleaved=arch in _INTERLEAVED_ROPE)
    if gemma:  # (its norms hold 1 + w already: llama.cpp's converter adds the 1)
        loader = gemma_norms(loader, shift=0.0, query_scale=gemma["query_scale"], q_normed=config.qk_norm)
    tokenizer = _gguf_tokenizer(path, field_value("tokenizer.ggml.pre"))
    provenance = {"source": path.name, "source_format": "gguf", "source_sha256": file_sha256(shards),
                  "source_file_type": field_value("general.file_type")}
    if arch == "granite":
        provenance["folded_multipliers"] = multipliers.record()
    if len(shards) > 1:
        provenance["source_files"] = len(shards)
    weight_types = tuple(sorted({tensors[gguf_name[n]].tensor_type.name for n in names
                                 if n.startswith("layers.") and n.rsplit(".", 1)[1] in _GGUF_NAMES.values()
                                 and len(tensors[gguf_name[n]].shape) == 2}))
    return SourceModel(config=config, tokenizer=tokenizer, provenance=provenance, _loader=loader,
                       names=names, weight_types=weight_types, stored_types=_stored_types(tensors))


def _gguf_gemma3(field_value, size, path: Path, n_layers: int, dim: int, n_heads: int, head_dim: int) -> dict:
    """A gemma3 GGUF's switches (ModelConfig fields) as llama.cpp runs the architecture, and query_scale, the factor
    folded into q_norm: llama.cpp scales the scores by 1 / sqrt(dim / heads) for the 27B model (62 layers; its
    query_pre_attn_scalar) and by 1 / sqrt(head_dim) otherwise (no key). Sliding layers: all but every sixth, with
    the window of attention.sliding_window (absent or 0: none, as the converter writes a model without them)."""
    if field_value("gemma3.final_logit_softcapping") not in (None, 0.0):
        raise SpqtError(f"{path}: gemma3 with final logit soft-capping is not supported")
    window = size("attention.sliding_window", 0)
    local = field_value("gemma3.rope.freq_base_swa", _GGUF_GEMMA3_LOCAL_THETA)
    try:
        local = float(local)
    except (TypeError, ValueError):
        raise SpqtError(f"{path}: GGUF gemma3.rope.freq_base_swa is not a number ({local!r})") from None
    full = _GGUF_GEMMA3_FULL_EVERY
    sliding = (i for i in range(n_layers) if i % full != full - 1)
    return {**_gguf_gemma(n_layers, dim, n_heads, head_dim, 62, sliding, window),
            "rope_local_theta": local if window > 0 else 0.0}


def _gguf_gemma(n_layers: int, dim: int, n_heads: int, head_dim: int, big_layers: int, sliding, window: int) -> dict:
    """What llama.cpp's gemma2 and gemma3 share: post-norms, the GELU (tanh) MLP, embeddings times sqrt(dim), the
    layers `sliding` (a generator of them: none for a layer count ModelConfig refuses anyway) through `window` (0: no
    sliding layer), and query_scale, the factor of q: scores scaled by 1 / sqrt(dim / heads) for the model of
    `big_layers` layers (the 27B), by 1 / sqrt(head_dim) otherwise."""
    scalar = dim / max(n_heads, 1) if n_layers == big_layers else head_dim
    usable = window > 0 and 1 <= n_layers <= _LIMITS["n_layers"]
    return {"post_norms": True, "activation": "gelu_tanh", "embed_scale": math.sqrt(max(dim, 1)),
            "sliding_window": window if window > 0 else 0, "sliding_layers": tuple(sliding) if usable else (),
            "query_scale": math.sqrt(head_dim / scalar) if scalar > 0 else 1.0}


def _gguf_gemma2(field_value, size, path: Path, n_layers: int, dim: int, n_heads: int, head_dim: int) -> dict:
    """A gemma2 GGUF's switches (ModelConfig fields) as llama.cpp runs the architecture, and query_scale, the factor
    folded into wq (_gguf_gemma3's: 1 / sqrt(dim / heads) for the 27B's 46 layers, 1 / sqrt(head_dim) otherwise).
    Sliding layers: every other one from the first, with the window of attention.sliding_window (absent: 4,096; 0:
    none). Soft-caps: the two keys' (absent: llama.cpp's 50 and 30; 0: none, where llama.cpp would divide by it)."""
    caps = {}
    for key, (ours, default) in _GGUF_GEMMA2_CAPS.items():
        value = field_value(f"gemma2.{key}", default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):  # (a string or a flag is no cap)
            raise SpqtError(f"{path}: GGUF gemma2.{key} is not a number ({value!r})")
        caps[ours] = float(value)
    window = size("attention.sliding_window", _GGUF_GEMMA2_WINDOW)
    sliding = range(0, n_layers, _GGUF_GEMMA2_SLIDING_EVERY)
    return {**_gguf_gemma(n_layers, dim, n_heads, head_dim, 46, sliding, window), **caps}


# Architectures whose GGUFs llama.cpp's converter also writes for a model with NextN prediction layers after the
# others: (article, that model, the one supported)
_GGUF_NEXTN_MODELS = {"glm4": ("a", "GLM-OCR", "GLM-4 0414"), "exaone4": ("an", "EXAONE 4.5's text model", "EXAONE 4.0")}


def _gguf_one_rope_base(field_value, path: Path, arch: str, why: str) -> float:
    """An arch whose sliding layers rotate by the model's own table: its rope.freq_base (10,000 when absent); SpqtError
    where rope.freq_base_swa gives them another base (why: what runs them by the one table)."""
    theta = _gguf_float(field_value, path, f"{arch}.rope.freq_base", 10000.0)
    local = _gguf_float(field_value, path, f"{arch}.rope.freq_base_swa", theta)
    if local != theta:
        raise SpqtError(f"{path}: GGUF {arch}.rope.freq_base_swa {local:g} other than rope.freq_base {theta:g} is not "
                        f"supported ({why})")
    return theta


def _gguf_olmo3(field_value, size, path: Path, n_layers: int) -> dict:
    """An olmo2 GGUF's sliding layers (ModelConfig fields) as llama.cpp runs them: none without attention.sliding_window
    (or with 0: OLMo 2), else Olmo 3's: all but every fourth layer through the window, rotated by plain RoPE of the
    file's base (rope_local_theta: llama.cpp passes them no scaling, YaRN or attention factor), the full layers by the
    file's scaling. SpqtError where attention.sliding_window_pattern or rope.freq_base_swa says otherwise (llama.cpp's
    olmo2 runs the fixed pattern and rotates every layer by rope.freq_base)."""
    window = size("attention.sliding_window", 0)
    if window <= 0:
        return {}
    every = _GGUF_OLMO3_FULL_EVERY
    usable = 1 <= n_layers <= _LIMITS["n_layers"]
    sliding = tuple(i for i in range(n_layers) if i % every != every - 1) if usable else ()
    pattern = field_value("olmo2.attention.sliding_window_pattern")
    if pattern is not None and pattern != every and pattern != [i in sliding for i in range(n_layers if usable else 0)]:
        raise SpqtError(f"{path}: GGUF olmo2.attention.sliding_window_pattern other than every {every}th layer in "
                        f"full is not supported (llama.cpp's olmo2 runs that one)")
    theta = _gguf_one_rope_base(field_value, path, "olmo2", "llama.cpp's olmo2 rotates every layer by rope.freq_base")
    return {"sliding_window": window, "sliding_layers": sliding, "rope_local_theta": theta}


def _gguf_norm_eps(field_value, arch: str) -> float:
    """The RMSNorms' epsilon: attention.layer_norm_rms_epsilon, else (exaone: llama.cpp's later converters write
    EXAONE 3.5's layer_norm_epsilon under its own name) attention.layer_norm_epsilon, else 1e-5."""
    eps = field_value(f"{arch}.attention.layer_norm_rms_epsilon")
    if eps is None and arch == "exaone":
        eps = field_value("exaone.attention.layer_norm_epsilon")
    return float(1e-5 if eps is None else eps)


def _gguf_exaone4(field_value, size, path: Path, n_layers: int) -> dict:
    """An exaone4 GGUF's sliding layers and NoPE layers (ModelConfig fields), as transformers runs the config it was
    converted from: without attention.sliding_window (or with 0) none of either, every layer full and rotated (the
    1.2B), except a 64-layer file without the key, which llama.cpp runs as the 32B (a window of 4,096); with a window,
    the layers attention.sliding_window_pattern flags (absent: all but every fourth) slide through it and rotate, the
    others attend to every key unrotated. (llama.cpp reads no pattern key and windows 64-layer files alone.)
    SpqtError where the pattern is not one flag a layer, where rope.freq_base_swa differs from rope.freq_base
    (transformers rotates every layer by the one table)."""
    _gguf_one_rope_base(field_value, path, "exaone4", "EXAONE 4.0 rotates its sliding layers by the model's table")
    window = size("attention.sliding_window", _GGUF_EXAONE4_32B_WINDOW if n_layers == 64 else 0)
    if window <= 0 or not 1 <= n_layers <= _LIMITS["n_layers"]:  # (a layer count ModelConfig refuses anyway)
        return {"nope_layers": ()}
    pattern = field_value("exaone4.attention.sliding_window_pattern")
    every = _GGUF_EXAONE4_FULL_EVERY
    if pattern is None:
        pattern = [i % every != every - 1 for i in range(n_layers)]
    if not (isinstance(pattern, list) and len(pattern) == n_layers and all(type(f) is bool for f in pattern)):
        raise SpqtError(f"{path}: GGUF exaone4.attention.sliding_window_pattern must flag each of the {n_layers} "
                        f"layers (true: sliding), got {pattern!r}")
    sliding = tuple(i for i, flag in enumerate(pattern) if flag)
    return {"sliding_window": window if sliding else 0, "sliding_layers": sliding,
            "nope_layers": tuple(i for i, flag in enumerate(pattern) if not flag)}


def _gguf_float(field_value, path: Path, key: str, default: float) -> float:
    """A GGUF metadata value that must be a finite number, default where the key is absent; SpqtError otherwise."""
    value = field_value(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpqtError(f"{path}: GGUF {key} is not a finite number ({value!r})")
    return float(value)


def _gguf_yarn(field_value, arch: str, path: Path, factor: float, rot_dims: int,
               context: int) -> tuple[tuple[float, ...], float, int]:
    """A GGUF's YaRN RoPE scaling (rope.scaling.type yarn, as llama.cpp's converter writes Qwen2.5's long context):
    (the per-frequency divisors, the attention factor of cos and sin, the context), read as llama.cpp reads the keys
    (the ramp between rope.scaling.original_context_length's corrections at yarn_beta_fast and yarn_beta_slow, default
    32 and 1, bounds rounded outwards; the attention factor 1 + 0.1 ln factor) and computed as the HF path computes an
    HF rope_scaling block (yarn_scaling: the same numbers). The context: the file's, at least the original times the
    factor.
    The settings llama.cpp keeps for other models (an attention factor, DeepSeek's log multiplier, a partial ramp)
    are refused; olmo2's attention factor (rope.scaling.attn_factor: Olmo 3's config attention_factor) its reader
    takes in place of YaRN's, as transformers does."""
    def number(key: str, default: float) -> float:
        value = field_value(f"{arch}.rope.scaling.{key}", default)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise SpqtError(f"{path}: GGUF rope.scaling.{key} is not a number ({value!r})") from None
        if not math.isfinite(value):
            raise SpqtError(f"{path}: GGUF rope.scaling.{key} is {value}")
        return value

    plain = (("attn_factor", (1.0,)), ("yarn_attn_factor", (1.0,))) if arch != "olmo2" else ()
    for key, usual in (*plain, ("yarn_log_multiplier", (0.0,)),
                       ("yarn_ext_factor", (-1.0, 1.0))):  # (-1: llama.cpp's "unset", 1 for YaRN)
        value = number(key, usual[0])
        if value not in usual:
            raise SpqtError(f"{path}: GGUF YaRN with rope.scaling.{key} {value:g} is not supported (plain YaRN, "
                            f"as Qwen2.5's, is)")
    original = int(number("original_context_length", context))
    rope = {"factor": factor, "original_max_position_embeddings": original,
            "beta_fast": number("yarn_beta_fast", 32.0), "beta_slow": number("yarn_beta_slow", 1.0)}
    try:
        theta = float(field_value(f"{arch}.rope.freq_base", 10000.0))
        divisors, attention = yarn_scaling(rope, theta, rot_dims, context)
        extended = int(original * factor)
    except (ValueError, OverflowError) as e:
        raise SpqtError(f"{path}: unusable YaRN scaling ({e})") from None
    return divisors, attention, max(context, extended)


def _gguf_factors(path: Path, tensors: dict, name: str, n: int) -> tuple[float, ...]:
    """The n positive numbers of a small GGUF tensor (rope_freqs' divisors, longrope's factors); SpqtError where it
    holds other values."""
    import gguf

    t = tensors.get(name)
    if t is None:
        raise SpqtError(f"{path}: GGUF lacks the tensor {name} (longrope needs rope_factors_short and _long)")
    try:
        values = tuple(float(v) for v in np.asarray(gguf.quants.dequantize(t.data, t.tensor_type)).ravel())
    except NotImplementedError:
        raise SpqtError(f"{path}: tensor type {t.tensor_type.name} of {name} is not supported by the gguf "
                        f"package") from None
    if len(values) != n or not all(math.isfinite(v) and v > 0 for v in values):
        raise SpqtError(f"{path}: {name} holds {len(values)} values, expected {n} positive ones")
    return values


def _stored_types(tensors: dict) -> dict[str, tuple[int, int, int]]:
    """A GGUF's tensors (name -> ReaderTensor, every file of a split one) by the type they are stored in: type name
    (gguf's, e.g. Q4_1, F32) -> (tensors, weights, bytes), the most bytes first. From the header alone."""
    by_type: dict[str, list[int]] = {}
    for t in tensors.values():
        counts = by_type.setdefault(t.tensor_type.name, [0, 0, 0])
        counts[0] += 1
        counts[1] += int(t.n_elements)
        counts[2] += int(t.n_bytes)
    return {name: tuple(c) for name, c in sorted(by_type.items(), key=lambda item: -item[1][2])}


def _gguf_tensor_table(reader, path: Path) -> dict:
    """name -> ReaderTensor, after checking what a damaged file could declare: aligned data inside
    the file, no two tensors over the same bytes."""
    file_size = path.stat().st_size
    tensors, spans = {}, []
    for t in reader.tensors:
        start, n_bytes = int(t.data_offset), int(t.n_bytes)
        # offsets are relative to the data section and aligned (llama.cpp refuses others too)
        if start < reader.data_offset or (start - reader.data_offset) % reader.alignment:
            raise SpqtError(f"{path}: damaged GGUF file (tensor {t.name} at byte {start}, outside the data "
                            f"section or not aligned to {reader.alignment})")
        if n_bytes <= 0 or start + n_bytes > file_size or t.data.nbytes != n_bytes:
            raise SpqtError(f"{path}: truncated or damaged GGUF file (tensor {t.name}: {n_bytes} bytes at byte "
                            f"{start}, the file has {file_size})")
        tensors[t.name] = t
        spans.append((start, start + n_bytes, t.name))
    spans.sort()
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise SpqtError(f"{path}: damaged GGUF file (tensors {name} and {other} overlap)")
    return tensors


def _expected_shapes(c: ModelConfig) -> dict:
    """Canonical source name -> (out_features, in_features) or (D,), from the configuration."""
    shapes = {"tok_embeddings": (c.vocab_size, c.dim), "output": (c.vocab_size, c.dim), "norm": (c.dim,)}
    for i in range(c.n_layers):
        shapes |= {f"layers.{i}.{name}": (size,) for name, size in c.layer_norms().items()}
        shapes |= {f"layers.{i}.wq": (c.q_dim, c.dim), f"layers.{i}.wk": (c.kv_dim, c.dim),
                   f"layers.{i}.wv": (c.kv_dim, c.dim), f"layers.{i}.wo": (c.dim, c.q_dim),
                   f"layers.{i}.w1": (c.ffn_dim, c.dim), f"layers.{i}.w3": (c.ffn_dim, c.dim),
                   f"layers.{i}.w2": (c.dim, c.ffn_dim)}
    return shapes


def _fused_parts(config: ModelConfig, kind: str) -> tuple[tuple[str, int], ...]:
    """The (our name, rows) a fused matrix of `kind` ("qkv" or "gate_up") stacks, first rows first."""
    if kind == "qkv":
        return ("wq", config.q_dim), ("wk", config.kv_dim), ("wv", config.kv_dim)
    return ("w1", config.ffn_dim), ("w3", config.ffn_dim)


def _fused_names(config: ModelConfig, kinds) -> set[str]:
    """Our per-layer names (wq, ...) that the fused matrices of these kinds hold."""
    return {ours for kind in kinds for ours, _ in _fused_parts(config, kind)}


def _add_fused_parts(config: ModelConfig, kind: str, layer: int, file_name: str, file_names: dict,
                     rows: dict) -> list[str]:
    """Layer `layer`'s parts of the fused tensor `file_name` (of `kind`): each one's file name and (first row, end
    row, rows of the whole) entered in file_names and rows; returns their names (layers.{i}.wq, ...)."""
    parts = _fused_parts(config, kind)
    total, start, names = sum(n for _, n in parts), 0, []
    for ours, n in parts:
        name = f"layers.{layer}.{ours}"
        file_names[name], rows[name] = file_name, (start, start + n, total)
        names.append(name)
        start += n
    return names


def _add_layer_names(config: ModelConfig, plain: dict, fused: dict, extras: dict, source: Callable[[int, str], str],
                     names: list, file_names: dict, rows: dict) -> None:
    """Every layer's tensors, each reader's own tables of file names: plain {file key: our name} (a file name
    source(i, key + ".weight")), fused {file key: kind} (their parts: _add_fused_parts; a plain name they hold is
    skipped), extras {file key: our name} (source(i, key): biases, q/k norms). Appends our names (layers.{i}.x) to
    `names` and enters each one's file name in file_names, a fused part's rows in rows."""
    split = _fused_names(config, fused.values())
    for i in range(config.n_layers):
        for key, ours in plain.items():
            if ours not in split:
                names.append(f"layers.{i}.{ours}")
                file_names[f"layers.{i}.{ours}"] = source(i, f"{key}.weight")
        for key, kind in fused.items():
            names += _add_fused_parts(config, kind, i, source(i, f"{key}.weight"), file_names, rows)
        for key, ours in extras.items():
            names.append(f"layers.{i}.{ours}")
            file_names[f"layers.{i}.{ours}"] = source(i, key)


def _check_shapes(path: Path, config: ModelConfig, declared: dict, file_names: dict, rows: dict | None = None) -> None:
    """Every declared tensor shape must be the one the configuration implies (before any read). rows: the parts of
    fused tensors (_add_fused_parts); their declared shape is the whole's."""
    expected = _expected_shapes(config)
    for name, shape in declared.items():
        if rows and name in rows:
            start, end, total = rows[name]
            if shape != (total, expected[name][1]):
                raise SpqtError(f"{path}: tensor {file_names[name]} has shape {shape}, the configuration implies "
                                f"{(total, expected[name][1])}")
            shape = (end - start, shape[1])
        if name in expected and shape != expected[name]:
            raise SpqtError(f"{path}: tensor {file_names[name]} has shape {shape}, the configuration implies "
                            f"{expected[name]}")


# tokenizer.ggml.pre names that llama.cpp splits with each digit a piece of its own, then GPT-2's split of the rest (the
# Hugging Face tokenizers they came from: a Digits(individual_digits) pre-tokenizer before the ByteLevel one).
# transformers' converter (5.x) knows no split for these and splits as GPT-2 alone, which tokenizes a run of spaces and
# line ends before a digit otherwise: the default model's WikiText-2 test text came out 304,986 tokens, llama.cpp's
# 304,978, the first difference at token 66,557 (" \n\n\n 1": Ġ ĊĊĊ Ġ 1, llama.cpp's ĠĊĊ ĊĠ 1).
_GGUF_DIGIT_SPLITS = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")


def _digits_apart(tok, pre: str | None) -> None:
    """tok's pre-tokenizer as llama.cpp splits a _GGUF_DIGIT_SPLITS vocabulary, where transformers left it GPT-2's
    alone (a ByteLevel pre-tokenizer that splits by its regex); any other, left as it is."""
    from tokenizers import pre_tokenizers

    backend = tok.backend_tokenizer
    split = backend.pre_tokenizer
    if pre in _GGUF_DIGIT_SPLITS and isinstance(split, pre_tokenizers.ByteLevel) and split.use_regex:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=split.add_prefix_space, use_regex=True)])


def _gguf_tokenizer(path: Path, pre: str | None) -> TokenizerSpec:
    """The tokenizer a GGUF's metadata describes, built by transformers' GGUF converter (with the split of the
    file's tokenizer.ggml.pre, `pre`, where the converter lacks it: _GGUF_DIGIT_SPLITS).

    transformers >= 5 exposes the converter itself, which reads only the tokenizer keys (1.2 s for
    the default model); AutoTokenizer(gguf_file=...) also parses every field with gguf's reader to
    build a model config first (about 7 s more on the 2-core machine). Both give the same
    tokenizer JSON (checked on the default model)."""
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:  # transformers 4.x has only the AutoTokenizer route
        get_gguf_tokenizer = None
    try:
        if get_gguf_tokenizer is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            from transformers import PreTrainedTokenizerFast

            architecture, tokenizer_dict, special = get_gguf_tokenizer(str(path))
            backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
            tok = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=special.get("chat_template"),
                                          **{k: special.get(k) for k in ("bos_token", "eos_token", "unk_token",
                                                                         "pad_token")})
    except Exception as e:
        import transformers

        raise SpqtError(f"{path}: cannot build the tokenizer from its GGUF metadata ({type(e).__name__}: {e}; "
                        f"transformers {transformers.__version__}: a newer one may know this file's tokenizer, or "
                        f"quantize the model's Hugging Face folder)") from None
    _digits_apart(tok, pre)
    return _spec_from_hf_tokenizer(tok)


def _spec_from_hf_tokenizer(tok) -> TokenizerSpec:
    if not getattr(tok, "is_fast", False):
        raise SpqtError("only fast (tokenizers-backed) tokenizers are supported")
    return TokenizerSpec(tokenizer_json=tok.backend_tokenizer.to_str(), chat_template=tok.chat_template,
                         bos_token=tok.bos_token, eos_token=tok.eos_token)


# ---------------------------------------------------------------- Hugging Face


_TORCH_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _weight_files(folder: Path, index_name: str, pattern: str) -> list[Path]:
    """An HF folder's weight files of one kind: those its index (model.safetensors.index.json,
    pytorch_model.bin.index.json) maps, else every file of the pattern. The index keeps other files of the kind out
    of the read and the provenance hash (Mistral's repositories hold a consolidated.safetensors of the same weights
    under other names beside the shards)."""
    index = folder / index_name
    if not index.exists():
        return sorted(folder.glob(pattern))
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise SpqtError(f"{index}: not a weight index ({type(e).__name__}: {e})") from None
    files = [folder / str(name) for name in names]
    if not any(f.is_file() for f in files):  # an empty index, or (an older repository) the other kind downloaded
        return sorted(folder.glob(pattern))
    outside = [str(n) for n, f in zip(names, files) if not f.resolve().is_relative_to(folder.resolve())]
    if outside:
        raise SpqtError(f"{index}: names {', '.join(outside[:3])}, outside the folder")
    missing = [str(n) for n, f in zip(names, files) if not f.is_file()]
    if missing:
        raise SpqtError(f"{index}: lists {', '.join(missing[:3])}, which the folder lacks")
    return files


def _bin_files(folder: Path) -> list[Path]:
    """An HF folder's PyTorch weight files: those its pytorch_model.bin.index.json maps, else pytorch_model*.bin."""
    return _weight_files(folder, "pytorch_model.bin.index.json", "pytorch_model*.bin")


def _torch_shards(paths: list[Path]) -> dict[Path, dict]:
    """PyTorch .bin checkpoint files (older Hugging Face repositories) -> {path: {name: tensor}}, memory-mapped where
    the file's format allows (the zip format since torch 1.6), read with weights_only (tensors and containers only:
    no code of the file runs); SpqtError where a file is not such a checkpoint."""
    import warnings

    shards = {}
    for path in paths:
        try:
            with warnings.catch_warnings():  # (the unpickler's notes on a file's pickle protocol: not the user's)
                warnings.simplefilter("ignore")
                try:
                    state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:  # the legacy (pre-zip) format cannot be memory-mapped: read it whole
                    if "mmap" not in str(e):
                        raise
                    state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many kinds on a damaged or hostile file
            raise SpqtError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
        if not isinstance(state, dict):
            raise SpqtError(f"{path}: not a checkpoint of named tensors (a state dict)")
        shards[path] = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return shards


def _open_hf(folder: Path) -> SourceModel:
    from safetensors import safe_open

    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise SpqtError(f"{folder}: not a Hugging Face checkpoint (no config.json)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpqtError(f"{cfg_path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise SpqtError(f"{cfg_path}: not a JSON object")
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_HF_TYPES:
        raise SpqtError(f"{folder}: unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_HF_TYPES)}")
    # Gemma3ForConditionalGeneration, Mistral3ForConditionalGeneration: the text model's config inside (the vision
    # tower and projector are not read)
    multimodal = model_type in _HF_MULTIMODAL
    if multimodal:
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise SpqtError(f"{cfg_path}: a {model_type} (multimodal) config without a text_config object")
        text_type = _HF_MULTIMODAL[model_type]
        if text.get("model_type", text_type) != text_type:  # (Ministral 3's is ministral3: another attention)
            raise SpqtError(f"{folder}: a {model_type} checkpoint whose text model is {text.get('model_type')!r} is "
                            f"not supported ({text_type} is)")
        top_eos = {"eos_token_id": cfg["eos_token_id"]} if cfg.get("eos_token_id") is not None else {}
        # a text_config leaves out what equals its class's defaults (Mistral Small 3's bos 1 and eos 2), as
        # transformers writes it: those from the class, where neither config holds them
        cfg = _with_class_defaults({**top_eos, **text}, text_type, ("bos_token_id", "eos_token_id"))
        cfg, model_type = {**cfg, "model_type": text_type}, text_type
    if model_type in ("gemma2", "gemma3_text"):  # (transformers' Gemma 2 and 3 read hidden_activation alone)
        if cfg.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise SpqtError(f"{folder}: activation {cfg.get('hidden_activation')!r} is not supported "
                            f"(gelu_pytorch_tanh is, for {model_type.removesuffix('_text')})")
    else:  # (EXAONE 3.5 names it activation_function, which transformers reads for exaone alone)
        act = cfg.get("hidden_act", cfg.get("activation_function") if model_type == "exaone" else None) or "silu"
        if act != "silu":
            raise SpqtError(f"{folder}: activation {act!r} is not supported (silu is)")
    files = _weight_files(folder, "model.safetensors.index.json", "*.safetensors")
    pickled = {} if files else _torch_shards(_bin_files(folder))  # older checkpoints
    files = files or list(pickled)
    if not files:
        raise SpqtError(f"{folder}: no .safetensors or pytorch_model*.bin files")
    where, declared = {}, {}
    for f in files:
        if f in pickled:
            for k, t in pickled[f].items():
                where[k] = f
                declared[k] = (tuple(t.shape), _TORCH_DTYPES.get(t.dtype, str(t.dtype).replace("torch.", "")))
            continue
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    where[k] = f
                    piece = st.get_slice(k)
                    declared[k] = (tuple(piece.get_shape()), piece.get_dtype())
        except Exception as e:  # the safetensors library raises its own error kinds
            raise SpqtError(f"{f}: not a readable safetensors file ({e})") from None
    # where the text model's tensors are: model.*, or (a multimodal checkpoint) model.language_model.* as transformers
    # 5 saves it, language_model.model.* as the published checkpoints hold it
    base, head = "model.", "lm_head.weight"
    if multimodal:
        base = next((b for b in _HF_MULTIMODAL_BASES if f"{b}embed_tokens.weight" in where), None)
        if base is None:
            raise SpqtError(f"{folder}: a multimodal checkpoint without its text model's embed_tokens under "
                            f"{' or '.join(_HF_MULTIMODAL_BASES)}")
        head = _HF_MULTIMODAL_BASES[base]
    query_scale = None
    try:
        if model_type in ("gemma2", "gemma3_text"):
            cfg = _gemma2_config(cfg) if model_type == "gemma2" else _gemma3_config(cfg)
            query_scale = _gemma_query_scale(cfg)
        elif model_type == "olmo3":
            cfg = _olmo3_config(cfg)
        elif model_type in _HF_CONFIG_CLASSES:
            cfg = _class_filled(_config_class(*_HF_CONFIG_CLASSES[model_type], model_type), cfg)
        config = _hf_config(cfg, model_type, tie=head not in where)
        multipliers = hf_multipliers(_with_class_defaults(cfg, model_type)) if model_type == "granite" else None
        factors = {} if multipliers is None else fold_factors(multipliers, config)
    except SpqtError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
        raise SpqtError(f"{cfg_path}: unusable config ({type(e).__name__}: {e})") from None
    gen_path = folder / "generation_config.json"  # instruct models list their end-of-turn ids here
    if gen_path.exists():
        try:
            gen_eos = json.loads(gen_path.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise SpqtError(f"{gen_path}: invalid JSON ({e})") from None
        gen_eos = gen_eos if isinstance(gen_eos, list) else ([] if gen_eos is None else [gen_eos])
        eos_ids = tuple(dict.fromkeys([*config.eos_ids, *(int(e) for e in gen_eos)]))
        config = ModelConfig(**{**config.to_dict(), "eos_ids": eos_ids})
    extras = _hf_extras(cfg, model_type)
    hf_name = {"tok_embeddings": f"{base}embed_tokens.weight", "norm": f"{base}norm.weight", "output": head}
    names = ["tok_embeddings", "norm"] + ([] if config.tie_embeddings else ["output"])
    layer_names = _HF_NAMES
    if config.post_norms:  # (Gemma's and GLM-4's four norms in place of the two; OLMo 2's two post-norms alone)
        norms = _HF_GLM4_NORMS if model_type == "glm4" else _HF_GEMMA_NORMS
        layer_names = {**{h: ours for h, ours in _HF_NAMES.items() if not h.endswith("layernorm")}, **norms}
    layer_names = _layer_norm_names(config, layer_names)
    rows = {}  # as in _open_gguf
    fused = _HF_FUSED if model_type == "phi3" else {"mlp.gate_up_proj": "gate_up"} if model_type == "glm4" else {}
    _add_layer_names(config, layer_names, fused,
                     {h: ours for h, ours in _HF_EXTRAS.items() if ours in extras},
                     lambda i, key: f"{base}layers.{i}.{key}", names, hf_name, rows)
    if model_type == "exaone" and any(key.startswith("transformer.") for key in where):
        # EXAONE's names (a re-export that holds Llama's under model_type exaone reads as Llama's, as transformers
        # reads it)
        hf_name = {ours: _exaone_name(key) for ours, key in hf_name.items()}
    missing = list(dict.fromkeys(hf_name[n] for n in names if hf_name[n] not in where))
    if missing:
        raise SpqtError(f"{folder}: checkpoint lacks tensors {', '.join(missing[:4])}")
    for k in (hf_name[n] for n in names):  # (the tensors read: a buffer such as int64 position_ids may sit beside)
        if declared[k][1] not in FLOAT_TYPES:
            raise SpqtError(f"{where[k]}: tensor {k} has dtype {declared[k][1]}; weights must be floating point")
    _check_shapes(folder, config, {n: declared[hf_name[n]][0] for n in names}, hf_name, rows)

    def load(name: str) -> torch.Tensor:
        key = hf_name[name]
        start, end, _ = rows.get(name, (None, None, None))  # a part of a fused matrix: its rows alone
        if where[key] in pickled:
            return pickled[where[key]][key][start:end].to(torch.float32, copy=True)  # (a copy: not cached)
        try:
            with safe_open(str(where[key]), framework="pt") as st:
                return (st.get_tensor(key) if name not in rows else st.get_slice(key)[start:end]).to(torch.float32)
        except Exception as e:
            raise SpqtError(f"{where[key]}: cannot read tensor {key} ({e})") from None

    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise SpqtError(f"{folder}: cannot load its tokenizer ({type(e).__name__}: {e})") from None
    # (transformers 5 builds a Qwen2 tokenizer without its files: one special token, no vocabulary)
    if not tok("The quick brown fox.", add_special_tokens=False)["input_ids"]:
        raise SpqtError(f"{folder}: its tokenizer encodes no text (no vocabulary: are its tokenizer files missing? "
                        f"tokenizer.json, or vocab.json and merges.txt)")
    tokenizer = _spec_from_hf_tokenizer(tok)
    # add_bos: whether the tokenizer's post-processor prepends BOS to plain text.
    ids = tok("a", add_special_tokens=True)["input_ids"]
    config = ModelConfig(**{**config.to_dict(), "add_bos": bool(ids) and ids[0] == config.bos_id})
    provenance = {"source": folder.name, "source_format": "hf", "source_sha256": file_sha256(files + [cfg_path])}
    if multipliers is not None:
        provenance["folded_multipliers"] = multipliers.record()
    # (Phi-4-mini, GLM-4, ERNIE 4.5: q's and k's rows in our pairing)
    loader = partial_rope_rows(folded(load, factors), config, interleaved=model_type in _INTERLEAVED_ROPE)
    if query_scale is not None:  # Gemma: each norm's 1 + w, the attention scale in q_norm (Gemma 3) or wq (Gemma 2)
        loader = gemma_norms(loader, shift=1.0, query_scale=query_scale, q_normed=config.qk_norm)
    return SourceModel(config=config, tokenizer=tokenizer, provenance=provenance, _loader=loader, names=names)


# the config.json keys whose absence transformers fills from its config class, per model_type (Llama: rms_norm_eps
# 1e-6, context 2,048; SmolLM3: a tied head; Phi-3: the original context 4,096, which overrides the rope block's;
# Granite: each multiplier 1.0)
_CLASS_DEFAULTS = ("rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "original_max_position_embeddings",
                   *MULTIPLIER_KEYS.values())


def _with_class_defaults(cfg: dict, model_type: str, keys: tuple = _CLASS_DEFAULTS) -> dict:
    """config.json's keys, with transformers' config-class defaults of `keys` where it leaves them out."""
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(model_type)
    return {**{k: getattr(defaults, k) for k in keys if k not in cfg and hasattr(defaults, k)}, **cfg}


def _hf_config(cfg: dict, model_type: str, tie: bool) -> ModelConfig:
    """ModelConfig from a config.json of a supported model_type (tie: no lm_head tensor), the keys it leaves out as
    transformers' config class has them."""
    cfg = _with_class_defaults(cfg, model_type)
    # transformers 5 writes rope_parameters (theta inside); older files rope_scaling + rope_theta; Gemma 3 and Olmo 3
    # one block a layer type (_gemma3_config, _olmo3_config fill them): the full layers' here, the sliding layers' in
    # the family's own switches (own)
    own, rope = {}, cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    nope = _hf_nope_layers(cfg) if model_type == "smollm3" else ()  # (the layers that rotate neither q nor k)
    if model_type == "gemma3_text":
        rope, own = _gemma3_switches(cfg)
    elif model_type == "olmo3":
        rope, own = _layer_type_rope(cfg)
    elif model_type == "gemma2":
        own = _gemma2_switches(cfg)
    elif model_type == "exaone4":
        own, nope = _exaone4_layers(cfg)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if model_type == "phi3" and kind in ("su", "yarn"):  # transformers' Phi-3 reads both as longrope
        kind = "longrope"
    if kind not in ("llama3", "linear", "yarn", "default") and not (kind == "longrope" and model_type == "phi3"):
        raise ValueError(f"rope scaling {kind!r} is not supported (llama3, linear, yarn and, for phi3, longrope are)")
    scaling = None if kind != "llama3" else {
        k: float(rope[k]) for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    # Phi-4-mini rotates 3/4 of each head (top level in its config.json; transformers 5 moves it into rope_parameters)
    rot = _hf_rotary_dims(rope, cfg, model_type, head_dim)
    factor = float(rope["factor"]) if kind == "linear" else 1.0  # positions / factor: each frequency divided by it
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"linear rope scaling factor {factor} is not a positive number")
    divisors = (factor,) * (rot // 2) if factor != 1.0 else None
    attention_factor, context = 1.0, cfg.get("max_position_embeddings", 4096)
    theta = rope.get("rope_theta", cfg.get("rope_theta", 2e6 if model_type == "smollm3" else 10000.0))
    if kind == "yarn":
        divisors, attention_factor = yarn_scaling(rope, float(theta), rot, context)
        # the context it extends to (as vLLM derives it): the original context times the factor
        context = max(context, int((rope.get("original_max_position_embeddings") or context) * float(rope["factor"])))
    long_divisors, original = None, 0
    if kind == "longrope":
        divisors, long_divisors, attention_factor, original = _longrope(rope, cfg, rot, context)
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    n_heads = cfg["num_attention_heads"]
    # the layers transformers runs through a sliding window run it too (model.layer_masks), at the model's whole
    # context (Mistral 7B v0.1: 4,096 of 32,768; Phi-3-mini-4k: 2,047 of 4,096); Gemma's and Olmo 3's: their switches
    window = {} if own else _hf_sliding(cfg, model_type, context)
    return ModelConfig(
        vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        ffn_dim=cfg["intermediate_size"], head_dim=head_dim,
        norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=theta,
        rope_scaling=scaling, rope_freq_factors=divisors, rope_attention_factor=attention_factor,
        rope_long_freq_factors=long_divisors, rope_original_context=original, rope_dims=rot,
        max_seq_len=context,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)) or tie,
        bos_id=cfg.get("bos_token_id"), eos_ids=eos_ids, add_bos=False,
        family="gemma3" if model_type == "gemma3_text" else model_type,  # (the GGUF's name, text or multimodal)
        nope_layers=nope,
        **_switches(_hf_extras(cfg, model_type)),
        **own,
        **window,
        **_FAMILY_SWITCHES.get(model_type, {}),
    )


def _exaone_name(key: str) -> str:
    """A Hugging Face Llama tensor name as an EXAONE 3.5 checkpoint holds it (transformer.h.{i}.attn.attention.q_proj,
    ...; lm_head's is Llama's)."""
    for llama, exaone in _HF_EXAONE_NAMES:
        key = key.replace(llama, exaone)
    return key


def _hf_rotary_dims(rope: dict, cfg: dict, model_type: str, head_dim: int) -> int:
    """How many of each head's dimensions RoPE rotates: int(head_dim * partial_rotary_factor), as transformers' Phi-3
    and GLM-4 take it (the rope block's key, else the top level's; Phi-4-mini: 96 of 128; GLM-4: 64 of 128); head_dim
    for a factor of 1. ValueError for a factor outside (0, 1], an odd count (transformers' rotate_half cannot split
    it) or partial RoPE in another family (their transformers models rotate whole heads)."""
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    partial = 1.0 if partial is None else partial
    if type(partial) not in (int, float) or not 0 < partial <= 1:
        raise ValueError(f"partial_rotary_factor must be a number in (0, 1], got {partial!r}")
    if partial == 1:
        return head_dim
    if model_type not in _PARTIAL_ROPE:
        raise ValueError(f"partial RoPE (partial_rotary_factor {partial:g}) is supported for "
                         f"{' and '.join(_PARTIAL_ROPE)} alone")
    rot = int(head_dim * partial)
    if rot < 2 or rot % 2:
        raise ValueError(f"partial RoPE of {rot} of {head_dim} head dimensions (partial_rotary_factor {partial:g}) is "
                         f"not supported: the rotated dimensions must be an even number")
    return rot


def _one_line(e: Exception) -> str:
    """An exception as "Kind: text" on one line (transformers' and huggingface_hub's validation errors run over
    several)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _hf_sliding(cfg: dict, model_type: str, context: int) -> dict:
    """The sliding_window / sliding_layers of a config.json as transformers runs them: Mistral's and Phi-3's
    sliding_window in every layer; Ministral's in the layers its layer_types mark (MinistralConfig: every layer where
    none are listed); Qwen2's, Qwen3's and SmolLM3's with use_sliding_window only, in the layers its config class marks
    (layer_types: from max_window_layers, SmolLM3's NoPE layers); Llama and Granite none. {} where no window can cut
    (none, or at least the context). ValueError where the keys are unusable."""
    if model_type not in ("mistral", "phi3", "ministral", "qwen2", "qwen3", "smollm3"):
        return {}
    if model_type not in ("mistral", "phi3", "ministral") and not cfg.get("use_sliding_window"):
        return {}  # (transformers drops their window then)
    from transformers import AutoConfig

    def config_class(**keys):
        try:
            return AutoConfig.for_model(model_type, **keys)
        except Exception as e:  # (huggingface_hub's strict validation is no ValueError; its text may run over lines)
            raise ValueError(f"transformers' {model_type} config refuses it ({_one_line(e)})") from None

    # the window keys as the config class reads them: a key left out is its default (Mistral's and, with
    # use_sliding_window, Qwen's 4,096; Phi-3's none), Qwen's and SmolLM3's layer_types from max_window_layers
    keys = ("use_sliding_window", "max_window_layers", "no_rope_layers", "no_rope_layer_interval")
    if "sliding_window" in cfg:
        window = cfg["sliding_window"]
        if window is None:
            return {}
        if type(window) is not int or window < 1:
            raise ValueError(f"sliding_window must be a positive integer, got {window!r}")
    n = cfg["num_hidden_layers"]
    if type(n) is not int or not 1 <= n <= _LIMITS["n_layers"]:
        return {}  # (ModelConfig refuses the count)
    read = config_class(num_hidden_layers=n, **{k: cfg[k] for k in (*keys, "sliding_window") if k in cfg})
    window = getattr(read, "sliding_window", None)
    if window is None:
        return {}
    if model_type in ("mistral", "phi3"):
        layers = tuple(range(n))
    else:
        types = cfg.get("layer_types") or getattr(read, "layer_types", None)
        if not isinstance(types, list) or len(types) != n or any(t not in ("sliding_attention", "full_attention")
                                                                 for t in types):
            raise ValueError(f"layer_types must give sliding_attention or full_attention for each of the {n} layers, "
                             f"got {types!r}")
        layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if not layers or window >= context:
        return {}
    return {"sliding_window": window, "sliding_layers": layers}


def _gemma3_config(cfg: dict) -> dict:
    """A gemma3_text config.json's keys, those it leaves out as transformers' Gemma3TextConfig fills them (a
    published multimodal checkpoint's text_config gives few: its head count, head_dim, query_pre_attn_scalar, ...
    are the class's defaults), layer_types from an older sliding_window_pattern and rope_parameters per layer type
    from rope_theta, rope_scaling and rope_local_base_freq, as transformers derives them. ValueError where it refuses
    the keys, or they ask for what we do not run: Gemma 2's soft-capping, EmbeddingGemma's bidirectional attention."""
    from transformers import Gemma3TextConfig

    full = _gemma3_v4_keys(_class_filled(Gemma3TextConfig, cfg))
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if full.get(key) is not None:
            raise ValueError(f"{key} {full[key]!r} is not supported (Gemma 2's soft-capping)")
    if full.get("use_bidirectional_attention"):
        raise ValueError("bidirectional attention (use_bidirectional_attention: EmbeddingGemma) is not supported")
    return full


# The families whose config.json keys left out read as their transformers config class fills them: the class and the
# transformers version that brought it (None: not known here). Glm4Config: head_dim 128, q/k/v biases,
# partial_rotary_factor 0.5; ExaoneConfig: its names of the keys, RoPE base 500,000, 8 kv heads; Exaone4Config: every
# fourth layer full where no layer_types are listed; Ernie4_5Config: head_dim 128, a tied head, RoPE base 500,000;
# SeedOssConfig: head_dim 128, q/k/v biases, no o or MLP biases
_HF_CONFIG_CLASSES = {"glm4": ("Glm4Config", "4.51.3"), "exaone": ("ExaoneConfig", None),
                      "exaone4": ("Exaone4Config", "4.54"), "ernie4_5": ("Ernie4_5Config", "4.54"),
                      "seed_oss": ("SeedOssConfig", "4.56")}


def _config_class(name: str, since: str | None, model_type: str):
    """transformers' config class of that name; ValueError naming the version that brought it (since; None: not
    known here) where this one lacks it (the pin admits transformers 4.51)."""
    import transformers

    try:
        return getattr(transformers, name)
    except AttributeError:
        later = f"{since} or later" if since else "a later transformers"
        raise ValueError(f"transformers {transformers.__version__} has no {name} ({later} reads "
                         f"{model_type})") from None


def _class_filled(config_class, cfg: dict) -> dict:
    """A config.json's keys (model_type aside) through a transformers config class: the dict it holds, the keys left
    out filled with its defaults. ValueError naming the class where it refuses them."""
    try:
        return config_class.from_dict({k: v for k, v in cfg.items() if k != "model_type"}).to_dict()
    except Exception as e:  # (its validation raises several kinds, some over several lines)
        raise ValueError(f"transformers' {config_class.__name__} refuses it ({_one_line(e)})") from None


def _gemma3_v4_keys(cfg: dict) -> dict:
    """A Gemma3TextConfig dict as transformers 5 gives it, from a transformers 4.x one (the pin admits 4.51):
    layer_types from sliding_window_pattern (4.51-4.53 have none: every p-th layer full, as 4.x runs them) and rope_parameters
    per layer type from rope_theta and rope_scaling (the full layers) and rope_local_base_freq (the sliding ones,
    unscaled), which 4.x keeps apart. A transformers 5 dict comes back as it is."""
    cfg = dict(cfg)
    n = cfg.get("num_hidden_layers")
    if cfg.get("layer_types") is None and type(n) is int and 1 <= n <= _LIMITS["n_layers"]:
        every = cfg.get("sliding_window_pattern", 6)
        if type(every) is not int or every < 1:
            raise ValueError(f"sliding_window_pattern must be a positive integer, got {every!r}")
        cfg["layer_types"] = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)]
    blocks = cfg.get("rope_parameters")
    if not (isinstance(blocks, dict) and "full_attention" in blocks):
        scaling = cfg.get("rope_scaling") or {}
        if not isinstance(scaling, dict):
            raise ValueError(f"rope_scaling must be an object, got {scaling!r}")
        cfg["rope_parameters"] = {
            "full_attention": {"rope_type": scaling.get("rope_type", scaling.get("type", "default")), **scaling,
                               "rope_theta": cfg.get("rope_theta", 1000000.0)},
            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.get("rope_local_base_freq", 10000.0)}}
    return cfg


# Olmo3Config's RoPE base where a config gives none (its default_theta): the one transformers 5 gives the sliding
# layers of a config whose rope_theta is the older, top-level key, whatever that says
_OLMO3_THETA = 500000.0


def _olmo3_config(cfg: dict) -> dict:
    """An olmo3 config.json's keys, those it leaves out as transformers' Olmo3Config fills them (every fourth layer
    full, the others sliding through a window of 4,096), and rope_parameters a block per layer type: as the config
    holds them (transformers 5), or from rope_theta and rope_scaling (the published configs, transformers 4.57: the
    scaling the full layers', both layer types at rope_theta). ValueError where transformers refuses the keys, or
    where transformers 4.x and 5 would run them differently: a top-level rope_theta other than 500,000 and no base of
    the sliding layers' own (5 rotates them by 500,000), rope_parameters not given a layer type (5 reads none of it),
    YaRN's truncate off (5 truncates all the same)."""
    full = _class_filled(_config_class("Olmo3Config", "4.57", "olmo3"), cfg)
    blocks, scaling, top = cfg.get("rope_parameters") or {}, cfg.get("rope_scaling") or {}, cfg.get("rope_theta")
    types = ("full_attention", "sliding_attention")
    if not (isinstance(blocks, dict) and set(blocks) <= set(types) and all(
            isinstance(b, dict) for b in blocks.values()) and isinstance(scaling, dict)):
        raise ValueError(f"rope_parameters must hold a block a layer type ({', '.join(types)}) and rope_scaling "
                         f"one block, got the keys {sorted(blocks) if isinstance(blocks, dict) else blocks!r}")
    rope = {kind: dict(blocks.get(kind) or {}) for kind in types}
    rope["full_attention"].update(scaling)  # (the older key's block: the full layers', as both versions read it)
    for block in rope.values():
        block["rope_type"] = block.get("rope_type", block.get("type", "default"))
    rope["full_attention"].setdefault("rope_theta", _OLMO3_THETA if top is None else top)
    if "rope_theta" not in rope["sliding_attention"] and top not in (None, _OLMO3_THETA):
        raise ValueError(f"rope_theta {top!r} without a rope_theta of the sliding layers' own: transformers 4.x "
                         f"rotates them by it, 5 by {_OLMO3_THETA:g} (give rope_parameters a block per layer type)")
    rope["sliding_attention"].setdefault("rope_theta", _OLMO3_THETA)
    if not rope["full_attention"].get("truncate", True):
        raise ValueError("yarn rope scaling with truncate false is not supported for olmo3 (transformers 5 "
                         "truncates all the same, 4.x does not)")
    return {**full, "rope_parameters": rope}


def _gemma_query_scale(cfg: dict) -> float:
    """Gemma's attention scale, query_pre_attn_scalar^-1/2 in place of head_dim^-1/2, as the factor of q (of Gemma 3's
    q_norm weight, of Gemma 2's wq and bq: folding.gemma_norms): sqrt(head_dim / query_pre_attn_scalar). ValueError
    where the scalar is not a positive number."""
    scalar, head_dim = cfg.get("query_pre_attn_scalar"), cfg.get("head_dim")
    if type(scalar) not in (int, float) or not math.isfinite(scalar) or scalar <= 0 or type(head_dim) is not int:
        raise ValueError(f"query_pre_attn_scalar must be a positive number (and head_dim an integer), got {scalar!r}")
    return math.sqrt(head_dim / scalar)


def _gemma3_switches(cfg: dict) -> tuple[dict, dict]:
    """A filled gemma3_text config's (_gemma3_config) full layers' rope block and ModelConfig switches: post-norms,
    GELU (tanh) MLP, embeddings times sqrt(hidden_size), the sliding layers with their window and their own RoPE base
    (_layer_type_rope). ValueError on anything else."""
    full, sliding = _layer_type_rope(cfg)
    return full, {**_gemma_common(cfg), **sliding}


def _layer_type_rope(cfg: dict) -> tuple[dict, dict]:
    """A filled config's RoPE a layer type (rope_parameters' full_attention and sliding_attention blocks): the full
    layers' block, read as every family's one, and the ModelConfig fields of the sliding layers (layer_types), their
    window and their own RoPE base, plain (the sliding block's rope_theta, default 10,000). ValueError where the
    sliding block asks for scaling, or the layer types, the window or the base are unusable."""
    blocks = cfg.get("rope_parameters") or {}
    full, local = blocks.get("full_attention") or {}, blocks.get("sliding_attention") or {}
    sliding = _sliding_layer_types(cfg)
    local_theta = 0.0
    if sliding["sliding_layers"]:
        if local.get("rope_type", "default") != "default":
            raise ValueError(f"rope scaling {local.get('rope_type')!r} of the sliding layers is not supported "
                             f"(none is)")
        local_theta = local.get("rope_theta", 10000.0)
        if type(local_theta) not in (int, float) or not math.isfinite(local_theta) or local_theta <= 1:
            raise ValueError(f"the sliding layers' rope_theta must be a number above 1, got {local_theta!r}")
    return full, {**sliding, "rope_local_theta": float(local_theta)}


def _sliding_layer_types(cfg: dict) -> dict:
    """A filled config's sliding layers (its layer_types) and their window (0 where none slides): ModelConfig's
    sliding_layers and sliding_window. ValueError where the layer types or the window are unusable."""
    n = cfg["num_hidden_layers"]
    types = cfg.get("layer_types")
    if not isinstance(types, list) or len(types) != n or any(t not in ("sliding_attention", "full_attention")
                                                             for t in types):
        raise ValueError(f"layer_types must give sliding_attention or full_attention for each of the {n} layers, "
                         f"got {types!r}")
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    window = cfg.get("sliding_window") if sliding else 0
    if type(window) is not int or window < 0 or (sliding and window < 1):
        raise ValueError(f"sliding_window must be a positive integer, got {window!r}")
    return {"sliding_layers": sliding, "sliding_window": window}


def _exaone4_layers(cfg: dict) -> tuple[dict, tuple[int, ...]]:
    """A filled exaone4 config's (Exaone4Config) sliding layers and their window (ModelConfig fields), and its NoPE
    layers, as transformers' Exaone4Attention runs them: with a sliding_window, the sliding layers (layer_types)
    windowed and rotated, the full layers unrotated; without one (null: the 1.2B), every layer full and rotated.
    ValueError where the layer types are unusable, or name sliding layers without a window (no window to cut)."""
    if cfg.get("sliding_window") is None:
        if "sliding_attention" in (cfg.get("layer_types") or []):
            raise ValueError("sliding_attention layers without a sliding_window are not supported for exaone4")
        return {}, ()
    sliding = _sliding_layer_types(cfg)
    return sliding, tuple(i for i in range(cfg["num_hidden_layers"]) if i not in sliding["sliding_layers"])


def _gemma2_config(cfg: dict) -> dict:
    """A gemma2 config.json's keys, those it leaves out as transformers' Gemma2Config fills them (soft-caps 50 and 30,
    a window of 4,096, query_pre_attn_scalar 256, a tied head), and layer_types where a transformers 4.x class gives
    none (every other layer sliding from the first, as 4.x runs them). ValueError where transformers refuses the keys,
    or they ask for bidirectional attention."""
    from transformers import Gemma2Config

    full = _class_filled(Gemma2Config, cfg)
    n = full.get("num_hidden_layers")
    if full.get("layer_types") is None and type(n) is int and 1 <= n <= _LIMITS["n_layers"]:
        full["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    if full.get("use_bidirectional_attention"):
        raise ValueError("bidirectional attention (use_bidirectional_attention) is not supported")
    return full


def _gemma2_switches(cfg: dict) -> dict:
    """A filled gemma2 config's (_gemma2_config) ModelConfig switches: post-norms, GELU (tanh) MLP, embeddings times
    sqrt(hidden_size), the sliding layers (layer_types) and their window, both soft-caps (null: none). Its RoPE is the
    model's one table (rope_parameters, read as every family's). ValueError on anything unusable."""
    return {**_gemma_common(cfg), **_sliding_layer_types(cfg), "attn_logit_softcap": cfg.get("attn_logit_softcapping"),
            "final_logit_softcap": cfg.get("final_logit_softcapping")}


def _gemma_common(cfg: dict) -> dict:
    """The ModelConfig switches Gemma 2 and 3 share, of a filled config: post-norms, the GELU (tanh) MLP, embeddings
    times sqrt(hidden_size)."""
    return {"post_norms": True, "activation": "gelu_tanh", "embed_scale": cfg["hidden_size"] ** 0.5}


def _every(step: int | None, n_layers: int) -> tuple[int, ...]:
    """The layers i < n_layers with (i + 1) % step == 0 (every step-th: SmolLM3's NoPE layers); none for None, or
    for a layer count ModelConfig refuses anyway (a damaged file's 2^32 layers: no such tuple made first)."""
    if step is None or type(n_layers) is not int or not 1 <= n_layers <= _LIMITS["n_layers"]:
        return ()
    return tuple(range(step - 1, n_layers, step))


def _hf_nope_layers(cfg: dict) -> tuple[int, ...]:
    """SmolLM3's NoPE layers, as transformers reads them: no_rope_layers (a 1 or 0 a layer, at least one a layer: 0
    means no RoPE), else every no_rope_layer_interval-th layer (default 4). ValueError on anything else."""
    n = cfg["num_hidden_layers"]
    flags = cfg.get("no_rope_layers")
    if flags is None:
        step = cfg.get("no_rope_layer_interval", 4)
        if type(step) is not int or step < 1:
            raise ValueError(f"no_rope_layer_interval must be a positive integer, got {step!r}")
        return _every(step, n)
    if not isinstance(flags, list) or len(flags) < n or any(type(f) not in (int, bool) or f not in (0, 1)
                                                            for f in flags):
        raise ValueError(f"no_rope_layers must list a 1 (RoPE) or 0 (none) for each of the {n} layers, got {flags!r}")
    return tuple(i for i in range(n) if not flags[i])


def yarn_scaling(rope: dict, theta: float, rot_dims: int, context: int) -> tuple[tuple[float, ...], float]:
    """YaRN RoPE scaling (Peng et al. 2023; Qwen2.5's long context) from an HF rope_scaling block, as transformers
    computes it with the explicit factor (transformers before its PR 40320, August 2025, replaced the factor by the
    context ratio when original_max_position_embeddings was given: 1 for Qwen's block; the pin admits those): the
    per-frequency divisors of the plain inverse frequencies, and the attention factor of cos and sin; rot_dims: the
    rotated dimensions of a head (all, or partial RoPE's). ValueError on unusable parameters."""
    factor = float(rope["factor"])
    original = float(rope.get("original_max_position_embeddings") or context)
    fast, slow = float(rope.get("beta_fast") or 32), float(rope.get("beta_slow") or 1)
    if not all(math.isfinite(v) and v > 0 for v in (factor, original, fast, slow)) or factor < 1 or theta <= 1:
        raise ValueError(f"yarn rope scaling needs a factor of at least 1, positive original_max_position_"
                         f"embeddings, beta_fast and beta_slow and a rope theta above 1, got {rope!r}")

    def mscale(scale: float, m: float = 1.0) -> float:  # YaRN's attention temperature, sqrt(1 / t)
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.get("attention_factor")
    if attention is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention = mscale(factor, float(m)) / mscale(factor, float(m_all)) if m and m_all else mscale(factor)
    attention = float(attention)
    if not (math.isfinite(attention) and attention > 0):
        raise ValueError(f"yarn attention_factor {attention} is not a positive number")
    # the dimension pairs whose wavelength fits the original context `rotations` times bound the ramp between
    # interpolated (divided by the factor) and kept frequencies
    pairs = rot_dims // 2

    def pair(rotations: float) -> float:
        return rot_dims * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair(fast), pair(slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot_dims - 1)
    span = (high - low) or 0.001
    kept = [1.0 - min(max((i - low) / span, 0.0), 1.0) for i in range(pairs)]  # 1: the frequency kept as is
    # inverse frequency (1 - kept) / factor + kept, over the plain one: the divisor is its inverse
    return tuple(1.0 / ((1.0 - k) / factor + k) for k in kept), attention


def _longrope_attention(factor: float, original: int) -> float:
    """longrope's attention factor (the scale of cos and sin) for a context `factor` times the original one."""
    return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))


def _longrope(rope: dict, cfg: dict, rot_dims: int, context: int) -> tuple[tuple, tuple, float, int]:
    """Phi-3's longrope (LongRoPE, Ding et al. 2024) from an HF rope block, as transformers reads it: the short and the
    long per-frequency divisors, the attention factor (given, else from the factor, itself given or the context over
    the original context) and the original context (past it a run takes the long divisors); rot_dims: the rotated
    dimensions of a head (Phi-4-mini: 96 of 128, its factor lists of 48). ValueError on unusable parameters."""
    # transformers' Phi-3 takes the top level's value over the block's (Phi3Config's default: 4096)
    original = cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or 4096
    factors = [rope.get("short_factor"), rope.get("long_factor")]
    if not all(isinstance(f, list) and len(f) == rot_dims // 2 and all(
            type(v) in (int, float) and math.isfinite(v) and v > 0 for v in f) for f in factors):
        raise ValueError(f"longrope rope scaling needs short_factor and long_factor lists of {rot_dims // 2} positive "
                         f"numbers")
    if type(original) is not int or original < 2:
        raise ValueError(f"longrope original_max_position_embeddings {original!r} is not an integer above 1")
    factor = rope.get("factor")
    factor = float(context / original if factor is None else factor)
    attention = rope.get("attention_factor")
    attention = float(_longrope_attention(factor, original) if attention is None else attention)
    if not (math.isfinite(attention) and attention > 0):
        raise ValueError(f"longrope attention_factor {attention} is not a positive number")
    return tuple(map(float, factors[0])), tuple(map(float, factors[1])), attention, original


def _hf_extras(cfg: dict, model_type: str) -> list[str]:
    """The optional per-layer tensors (our names) a checkpoint of this config has, as transformers builds it: Qwen2
    always has q/k/v biases, Qwen3, Gemma 3, OLMo 2, Olmo 3 and EXAONE 4.0 q/k norms; attention_bias / mlp_bias add
    more (Phi-3, Ministral, EXAONE 4.0: never; OLMo 2 and 3: attention_bias alone; GLM-4: attention_bias q, k and v
    biases, none of o's or the MLP's); ERNIE 4.5's use_bias gives all seven maps one; Seed-OSS's attention_bias q, k
    and v one, attention_out_bias o, mlp_bias the MLP's three."""
    if model_type in ("phi3", "ministral"):  # (MinistralAttention and MinistralMLP build no bias, whatever the keys)
        return []
    if model_type == "seed_oss":
        return ((["bq", "bk", "bv"] if cfg.get("attention_bias") else []) + (["bo"] if cfg.get("attention_out_bias")
                else []) + (["b1", "b3", "b2"] if cfg.get("mlp_bias") else []))
    if model_type == "ernie4_5":
        return ["bq", "bk", "bv", "bo", "b1", "b3", "b2"] if cfg.get("use_bias") else []
    if model_type == "glm4":
        return ["bq", "bk", "bv"] if cfg.get("attention_bias") else []
    if model_type == "exaone4":  # (no bias key: Exaone4Attention's maps have none)
        return ["q_norm", "k_norm"]
    extras = {"qwen2": ["bq", "bk", "bv"], "qwen3": ["q_norm", "k_norm"], "gemma3_text": ["q_norm", "k_norm"],
              "olmo2": ["q_norm", "k_norm"], "olmo3": ["q_norm", "k_norm"]}.get(model_type, [])
    if cfg.get("attention_bias"):
        extras += ["bq", "bk", "bv", "bo"]
    if cfg.get("mlp_bias"):
        extras += ["b1", "b3", "b2"]
    return list(dict.fromkeys(extras))
