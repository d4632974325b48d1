"""Model families (Llama 3.1 / 3.2, Mistral, Qwen2, Qwen3, Phi-3, SmolLM3, Granite, Gemma 2, Gemma 3, OLMo 2, Olmo 3,
GLM-4, EXAONE 3.5 and 4.0, ERNIE 4.5, Seed-OSS, Ministral), each from HF safetensors and from GGUF.

For every family a tiny random-weight model is built with transformers from a config, saved with
save_pretrained and also written as a GGUF the way llama.cpp's converter lays one out (gguf's
writer; F32 tensors, so both sources hold the same numbers). Checks: our float forward equals
transformers' logits; `spqt quantize` of both sources gives the same blocks and greedy tokens;
`spqt generate` runs; the chat template renders as transformers renders it.
"""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from spqt.checkpoint import QuantizedWeight, load_model, load_spqt
from spqt.cli import main
from spqt.errors import SpqtError
from spqt.generate import Generator, build_model
from spqt.linear import Linear
from spqt.sources import open_source
from spqt.tokenizer import TextTokenizer
from conftest import make_tokenizer, sqnr_db

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
OLMO3_YARN = {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0, "original_max_position_embeddings": 128,
              "beta_fast": 32.0, "beta_slow": 1.0}
TEMPLATES = {  # each family's chat format, shortened
    "llama3": "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
              "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
              "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
    "mistral": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
               "{% elif m['role'] == 'system' %}{{ m['content'] }}\n\n{% else %}{{ m['content'] }}{{ eos_token }}"
               "{% endif %}{% endfor %}",
    "chatml": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "phi3": "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
    "granite": "{% for m in messages %}<|start_of_role|>{{ m['role'] }}<|end_of_role|>{{ m['content'] }}"
               "<|end_of_text|>\n{% endfor %}{% if add_generation_prompt %}<|start_of_role|>assistant<|end_of_role|>"
               "{% endif %}",
    "gemma": "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
             "m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
             "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
    "glm4": "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
    "ernie": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n"
             "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n{% else %}Assistant: {{ m['content'] }}"
             "<|end_of_sentence|>{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}",
}
# family -> (transformers config class, config arguments, GGUF architecture, chat template)
DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
FAMILIES = {
    "llama3.1": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE, max_position_embeddings=512), "llama", "llama3"),
    "llama3.2": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE, max_position_embeddings=512,
                                     tie_word_embeddings=True), "llama", "llama3"),
    "mistral": ("MistralConfig", dict(head_dim=16, sliding_window=96, max_position_embeddings=1024,
                                      rope_parameters={"rope_type": "default", "rope_theta": 1e6}), "llama", "mistral"),
    # Mistral's network, the window in the layers its layer_types mark (the 8B's pattern: one full layer, then three
    # sliding); a llama GGUF, as llama.cpp's converter writes it, carries no window
    "ministral": ("MinistralConfig", dict(num_hidden_layers=4, head_dim=16, sliding_window=96,
                                          layer_types=["full_attention"] + ["sliding_attention"] * 3,
                                          max_position_embeddings=1024,
                                          rope_parameters={"rope_type": "default", "rope_theta": 1e8}),
                  "llama", "mistral"),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, max_position_embeddings=512,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}), "qwen2", "chatml"),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=True, max_position_embeddings=512,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}), "qwen3", "chatml"),
    # fused q|k|v and gate|up; an odd window below the context, as Phi-3-mini-4k's 2,047 of 4,096
    "phi3": ("Phi3Config", dict(sliding_window=95, max_position_embeddings=256, pad_token_id=None,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), "phi3", "phi3"),
    # 4 layers: the last is NoPE, as transformers' default interval and llama.cpp's fixed step (every 4th) agree
    "smollm3": ("SmolLM3Config", dict(num_hidden_layers=4, tie_word_embeddings=True, max_position_embeddings=512,
                                      pad_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 2e6}),
                "smollm3", "chatml"),
    # Granite-3.1-2B's four multipliers (its head_dim is 64: attention 1/64 there, a quarter of 1/sqrt(16) here)
    "granite": ("GraniteConfig", dict(tie_word_embeddings=True, max_position_embeddings=512, pad_token_id=None,
                                      embedding_multiplier=12.0, attention_multiplier=0.015625,
                                      residual_multiplier=0.22, logits_scaling=8.0,
                                      rope_parameters={"rope_type": "default", "rope_theta": 5e6}),
                "granite", "granite"),
    # 6 layers: the last attends to every key, the others through a window of 8 (transformers' default pattern and
    # llama.cpp's fixed one agree), which the tests' 32 to 90 tokens cross; the full layer's RoPE scaled linearly (as
    # Gemma 3 4B+), the sliding layers' plain and of another base; query_pre_attn_scalar head_dim, as 1B to 12B have it
    # and llama.cpp reads a GGUF (test_gemma3_attention_scale_and_multimodal: another one)
    "gemma3": ("Gemma3TextConfig", dict(num_hidden_layers=6, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                        max_position_embeddings=512, pad_token_id=None, rope_parameters={
                                            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
               "gemma3", "gemma"),
    # 4 layers: 0 and 2 slide through a window of 8 (transformers' and llama.cpp's pattern), which the tests' 32 to 90
    # tokens cross; soft-caps that bite: scores of about unit size capped at 2, logits at 1.5 (the released 50 and 30
    # sit far above such a tiny model's values); query_pre_attn_scalar head_dim, as 2B and 9B have it and llama.cpp
    # reads a GGUF (test_gemma2_attention_scale_and_gguf_keys: another one)
    "gemma2": ("Gemma2Config", dict(num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=1.5,
                                    max_position_embeddings=512, pad_token_id=None,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1e4}), "gemma2", "gemma"),
    # no norm before the attention or the MLP, post-norms, q and k each normed over all of its heads (GQA: k_norm 32
    # wide, q_norm 64); an untied head, as the released models have
    "olmo2": ("Olmo2Config", dict(max_position_embeddings=512, pad_token_id=None,
                                  rope_parameters={"rope_type": "default", "rope_theta": 5e5}), "olmo2", "chatml"),
    # four norms a layer (plain weights), q/k/v biases (Glm4Config's attention_bias), fused gate|up, half of each head
    # rotated in GLM's interleaved pairs (16 of 32: an explicit head_dim, q 128 wide on a dim of 64); an untied head
    "glm4": ("Glm4Config", dict(head_dim=32, max_position_embeddings=512, pad_token_id=None,
                                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
             "glm4", "glm4"),
    # OLMo 2's switches in 4 layers: 0 to 2 slide through a window of 8 (the tests' 32 to 90 tokens cross it), 3
    # attends to every key, its RoPE YaRN-scaled (factor 4 from 128 positions: frequency pairs 2 to 7 interpolated, cos
    # and sin times 1 + 0.1 ln 4), the sliding layers' plain at the same base; written as an olmo2 GGUF with a window
    "olmo3": ("Olmo3Config", dict(num_hidden_layers=4, sliding_window=8, max_position_embeddings=512, pad_token_id=None,
                                  rope_parameters={"full_attention": OLMO3_YARN,
                                                   "sliding_attention": {"rope_type": "default", "rope_theta": 5e5}}),
              "olmo2", "chatml"),
    # Llama's network under EXAONE's tensor names (transformers saves them so: transformer.h.{i}.attn.attention.q_proj,
    # ...), llama3 scaling, GQA, an untied head (7.8B, 32B)
    "exaone": ("ExaoneConfig", dict(rope_parameters=LLAMA3_ROPE, max_position_embeddings=512, pad_token_id=None),
               "exaone", "chatml"),
    # OLMo 2's post-norms alone with Qwen3's per-head q/k norms in 4 layers: 0 to 2 slide through a window of 8 (the
    # tests' 32 to 90 tokens cross it) and rotate by the llama3-scaled table, 3 attends to every key unrotated
    # (Exaone4Config's default pattern, every fourth layer full); an untied head, as the 32B has
    "exaone4": ("Exaone4Config", dict(num_hidden_layers=4, head_dim=16, sliding_window=8, max_position_embeddings=512,
                                      pad_token_id=None, rope_parameters=LLAMA3_ROPE), "exaone4", "chatml"),
    # Llama's network rotating (2j, 2j + 1) of each whole head (an explicit head_dim, q 128 wide on a dim of 64);
    # use_bias: a bias on each of the seven maps (the released dense models have none); a tied head, as Ernie4_5Config's
    # default and the 0.3B's
    "ernie4_5": ("Ernie4_5Config", dict(head_dim=32, use_bias=True, max_position_embeddings=512, pad_token_id=None,
                                        rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
                 "ernie4_5", "ernie"),
    # Llama's network with an explicit head_dim (q 128 wide on a dim of 64), q/k/v biases (SeedOssConfig's default) and,
    # beyond the released 36B's, o's (attention_out_bias) and the MLP's (mlp_bias); an untied head, as the 36B has
    "seed_oss": ("SeedOssConfig", dict(head_dim=32, attention_out_bias=True, mlp_bias=True, max_position_embeddings=512,
                                       pad_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 1e7}),
                 "seed_oss", "chatml"),
}
GEMMA_NORMS = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight":
               "post_attention_norm.weight", "pre_feedforward_layernorm.weight": "ffn_norm.weight",
               "post_feedforward_layernorm.weight": "post_ffw_norm.weight"}  # Gemma 2's and 3's names in a GGUF
GRANITE_KEYS = {"embedding_scale": "embedding_multiplier", "attention.scale": "attention_multiplier",
                "residual_scale": "residual_multiplier", "logit_scale": "logits_scaling"}  # GGUF key: HF key
PROMPT_LEN = 90  # past the 64 original positions of the llama3 scaling, inside Mistral's and Phi-3's windows


@pytest.fixture(scope="module")
def base_tokenizer(tmp_path_factory) -> Path:
    """One small byte-level BPE for every family (trained once)."""
    folder = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(folder)
    return folder


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights that make every part count: transformers would start biases at 0 and norms at 1 (Gemma's at 0: its
    norms multiply by 1 + w, so theirs are drawn around 0, each reader's + 1 making them count)."""
    g = torch.Generator().manual_seed(seed)
    shift = 0.0 if model.config.model_type.startswith("gemma") else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(shift + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def _llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The per-head row interleave llama.cpp's converter applies to q / k of `llama` files."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, tok, path: Path, arch: str, template: str, types: dict | None = None) -> Path:
    """The HF model as a GGUF of architecture `arch` in llama.cpp's layout: names, keys, q/k
    interleave for `llama` (and `smollm3`, `granite`), Llama-3 scaling as rope_freqs divisors, tokenizer as metadata;
    `granite`'s multipliers as four keys, no head length (its converter drops head_dim); `phi3`'s
    fused q|k|v as attn_qkv and gate|up as ffn_up (gate rows first), its sliding window as a key, longrope as
    rope_factors_short / _long with the attention factor and original context as keys; `gemma3`'s four norms a
    layer, each norm weight + 1 (its converter's norm_shift), the full layers' RoPE as the keys, the window as a key;
    `gemma2`'s the same (no local RoPE), with its two soft-caps as keys; `olmo2`'s two post-norms a layer (no
    attn_norm or ffn_norm) and its q/k norms over the whole of q and of k, unshifted, q and k unpermuted, and for Olmo 3
    the window and the sliding layers (sliding_window_pattern) as keys, the full layers' YaRN as the rope scaling keys
    (its attention_factor as rope.scaling.attn_factor, where the config gives one); `glm4`'s four norms under Gemma's
    GGUF names (its post_attention_layernorm the ffn_norm), gate|up as ffn_up, q and k unpermuted; partial RoPE as
    rope.dimension_count, the rotated dimensions (Phi-4-mini's 96 of 128, GLM-4's 64); `ernie4_5`'s q and k
    unpermuted (llama.cpp rotates its adjacent pairs), its biases under the names gguf's tensor map gives them;
    `seed_oss`'s q and k unpermuted (NEOX RoPE), its norm before the MLP as post_attention_norm.
    types: per-layer GGUF names (attn_qkv.weight, ...) -> a type gguf can quantize to (others: F32)."""
    import gguf

    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if arch in ("gemma2", "gemma3"):
        sd = {k: v + 1 if k.endswith("norm.weight") else v for k, v in sd.items()}
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)  # (Gemma 3: a block a layer type)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    if arch == "granite":
        for key, hf in GRANITE_KEYS.items():
            w.add_float32(f"granite.{key}", getattr(c, hf))
    else:
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_rope_dimension_count(int(hd * rope.get("partial_rotary_factor", 1.0)))  # (Phi-4-mini: 96 of 128)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in ("<s>", "</s>") else 1 for t in tokens])  # 3: control
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_add_bos_token(arch == "llama")
    w.add_chat_template(template)
    if arch == "phi3":  # (llama.cpp's converter writes 0 where the config has none)
        w.add_sliding_window(c.sliding_window or 0)
    if arch in ("gemma2", "gemma3"):
        w.add_sliding_window(c.sliding_window)
    if c.model_type in ("olmo3", "exaone4"):
        w.add_sliding_window(c.sliding_window)
        w.add_sliding_window_pattern([t == "sliding_attention" for t in c.layer_types])
    if arch == "gemma2":  # (its converter writes both caps)
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    if rope.get("rope_type") == "longrope":
        original = c.rope_parameters["original_max_position_embeddings"]
        w.add_rope_scaling_orig_ctx_len(original)
        scale = c.max_position_embeddings / original
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
        for kind in ("long", "short"):
            w.add_tensor(f"rope_factors_{kind}.weight", np.array(c.rope_parameters[f"{kind}_factor"], np.float32))
    if rope.get("rope_type") == "linear":  # as llama.cpp's converter writes it
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if rope.get("rope_type") == "yarn":  # as llama.cpp's converter writes it
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if "attention_factor" in rope:
            w.add_rope_scaling_attn_factors(rope["attention_factor"])
    if c.rope_parameters.get("rope_type") == "llama3":
        plain = 1.0 / (c.rope_parameters["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        w.add_tensor("rope_freqs.weight", (plain / model.model.rotary_emb.inv_freq.double()).float().numpy())
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
             "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
             "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
             "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
             "self_attn.qkv_proj.weight": "attn_qkv.weight", "mlp.gate_up_proj.weight": "ffn_up.weight",
             "self_attn.o_proj.bias": "attn_output.bias", "mlp.gate_proj.bias": "ffn_gate.bias",
             "mlp.up_proj.bias": "ffn_up.bias", "mlp.down_proj.bias": "ffn_down.bias"}
    if arch in ("gemma2", "gemma3", "olmo2", "exaone4"):  # (OLMo 2, EXAONE 4: the two post-norms alone, Gemma's names)
        names |= GEMMA_NORMS
    if arch == "glm4":  # (as gguf's tensor map names them for glm4)
        names |= {"post_self_attn_layernorm.weight": "post_attention_norm.weight",
                  "post_mlp_layernorm.weight": "post_ffw_norm.weight"}
    if arch == "seed_oss":  # (as gguf's tensor map names it for seed_oss: its ATTN_POST_NORM)
        names |= {"post_attention_layernorm.weight": "post_attention_norm.weight"}
    for i in range(c.num_hidden_layers):
        for hf, ours in names.items():
            t = sd.get(f"model.layers.{i}.{hf}")
            if t is None:
                continue
            if arch in ("llama", "smollm3", "granite") and hf.startswith("self_attn.q_proj"):
                t = _llamacpp_permute(t, c.num_attention_heads)
            elif arch in ("llama", "smollm3", "granite") and hf.startswith("self_attn.k_proj"):
                t = _llamacpp_permute(t, c.num_key_value_heads)
            if ours in (types or {}):
                w.add_tensor(f"blk.{i}.{ours}", gguf.quants.quantize(t, types[ours]), raw_dtype=types[ours])
            else:
                w.add_tensor(f"blk.{i}.{ours}", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, base_tokenizer, tmp_path_factory) -> dict:
    """{name, hf (folder), gguf (file), model (transformers, float32, eval), tok (HF tokenizer)}."""
    return build_family(request.param, FAMILIES[request.param], base_tokenizer,
                        tmp_path_factory.mktemp(request.param.replace(".", "_")))


def build_family(name: str, spec: tuple, base_tokenizer: Path, folder: Path) -> dict:
    """A random transformers model of the spec (FAMILIES' form), saved as an HF folder and written as a GGUF: the
    family fixture's dict."""
    import transformers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    cls, extra, arch, template = spec
    if not hasattr(transformers, cls):  # (the GPU machines' transformers may predate a family: named in the skip)
        pytest.skip(f"transformers {transformers.__version__} has no {cls}, the {name} reference model")
    tok = PreTrainedTokenizerFast.from_pretrained(str(base_tokenizer))
    tok.chat_template = TEMPLATES[template]
    config = getattr(transformers, cls)(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, rms_norm_eps=1e-5, **{**DIMS, **extra})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # fresh weights every run, replayable: SPQT_FAMILY_SEED=<the printed seed>
    seed = int(os.environ.get("SPQT_FAMILY_SEED") or np.random.SeedSequence().entropy % (1 << 31))
    print(f"{name}: weight seed {seed}")
    _randomize(model, seed)
    if getattr(config, "embedding_multiplier", 1.0) != 1.0:  # (Granite's table is trained for its multiplier: the
        with torch.no_grad():                                # input at unit size, so the layers count, not the table)
            model.model.embed_tokens.weight /= config.embedding_multiplier
    if config.model_type in ("gemma2", "gemma3_text"):  # (so is Gemma's for its sqrt(hidden_size))
        with torch.no_grad():
            model.model.embed_tokens.weight /= math.sqrt(config.hidden_size)
    model.eval()
    model.save_pretrained(str(folder / "hf"))
    tok.save_pretrained(str(folder / "hf"))
    gguf_path = write_gguf(model, tok, folder / f"{name}.gguf", arch, TEMPLATES[template])
    return {"name": name, "hf": folder / "hf", "gguf": gguf_path, "model": model, "tok": tok, "folder": folder,
            "seed": seed}


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def _logit_error(loaded, reference, ids: list[int]) -> tuple[float, float]:
    """Our float32 model's logits over `ids` (one prefill) against the transformers model's: (max |diff|, their
    logit range)."""
    model = build_model(loaded, "cpu", torch.float32)
    model.setup_cache(1, len(ids), torch.float32)
    with torch.no_grad():
        ours = model(torch.tensor([ids]), torch.arange(len(ids)))[0]
        theirs = reference(torch.tensor([ids])).logits[0].float()
    return float((ours - theirs).abs().max()), float(theirs.max() - theirs.min())


def test_a_layer_built_alone_equals_the_models_layer(family):
    """generate.build_block (GPTQ's one layer at a time) from that layer's weights alone gives what build_model's layer
    gives, bit for bit: biases (Qwen2), q/k norms (Qwen3), Mistral's head_dim."""
    from spqt.generate import build_block
    from spqt.model import KVCache

    loaded = load_model(family["hf"])
    c = loaded.config
    model = build_model(loaded, "cpu", torch.float32)
    n = 40
    model.setup_cache(2, n, torch.float32)
    x = torch.randn(2, n, c.dim, generator=torch.Generator().manual_seed(family["seed"]))
    positions = torch.arange(n)
    mask = torch.zeros((n, n)).masked_fill_(positions[None, :] > positions[:, None], float("-inf"))
    for i in range(c.n_layers):
        block = build_block(c, i, {k: w for k, w in loaded.weights.items() if k.startswith(f"layers.{i}.")})
        block.attention.cache = KVCache(2, c.n_kv_heads, n, c.head_dim, torch.float32, "cpu")
        with torch.no_grad():
            rope = model.rope_for(i)
            assert torch.equal(block(x, rope, positions, mask), model.layers[i](x, rope, positions, mask))


@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_float_forward_equals_transformers(family, source):
    loaded = load_model(family[source])
    c = loaded.config
    name = family["name"]
    # the family's switches, as read from each source
    assert c.linear_biases == (("qkv",) if name in ("qwen2", "glm4") else ("qkv", "o", "gate_up", "down")
                               if name in ("ernie4_5", "seed_oss") else ())
    assert (c.rope_dims, c.head_dim) == ((16, 32) if name == "glm4" else (0, c.head_dim))
    assert c.qk_norm == (name in ("qwen3", "gemma3", "olmo2", "olmo3", "exaone4"))
    assert (c.pre_norms, c.qk_norm_scope) == ((False, "all") if name in ("olmo2", "olmo3") else (False, "head")
                                              if name == "exaone4" else (True, "head"))
    assert c.tie_embeddings == (name in ("llama3.2", "qwen2", "qwen3", "smollm3", "granite", "gemma2", "gemma3",
                                         "ernie4_5"))
    assert loaded.provenance.get("folded_multipliers") == (
        {"embedding": 12.0, "attention": 0.015625, "residual": float(np.float32(0.22)), "logits": 8.0}  # (as float32)
        if name == "granite" else None)
    assert c.nope_layers == ((3,) if name in ("smollm3", "exaone4") else ())
    assert (c.rope_local_theta, c.post_norms, c.activation, c.embed_scale) == (
        (1e4, True, "gelu_tanh", 8.0) if name == "gemma3" else (0.0, True, "gelu_tanh", 8.0) if name == "gemma2"
        else (0.0, True, "silu", 1.0) if name in ("olmo2", "glm4", "exaone4")
        else (5e5, True, "silu", 1.0) if name == "olmo3"
        else (0.0, False, "silu", 1.0))
    assert (c.attn_logit_softcap, c.final_logit_softcap) == ((2.0, 1.5) if name == "gemma2" else (0.0, 0.0))
    # the layers that slide, as transformers runs them (a llama GGUF, Mistral's, has no window), the context uncapped
    windowed = (name == "phi3" or (name in ("mistral", "ministral") and source == "hf"))
    assert (c.sliding_layers, c.sliding_window) == (
        ((0, 1, 2, 3, 4), 8) if name == "gemma3" else ((0, 2), 8) if name == "gemma2" else ((0, 1, 2), 8)
        if name in ("olmo3", "exaone4") else ((1, 2, 3), 96) if windowed and name == "ministral"
        else ((0, 1), {"phi3": 95, "mistral": 96}[name]) if windowed else ((), 0))
    if name == "gemma3":  # the full layer's linear scaling, from both sources; its context not capped by the window
        assert c.rope_freq_factors == (4.0,) * 8 and c.max_seq_len == 512
    if name == "olmo3":  # the full layer's YaRN, from both sources (pairs 0 and 1 kept, in part); the context uncapped
        assert c.rope_freq_factors == pytest.approx((1.0, 1.6) + (4.0,) * 6, rel=1e-12) and c.max_seq_len == 512
        assert c.rope_attention_factor == pytest.approx(1 + 0.1 * math.log(4), rel=1e-12)
    if name.startswith("llama") or name in ("exaone", "exaone4"):
        assert (c.rope_scaling is not None) == (source == "hf") and (c.rope_freq_factors is not None) == (source == "gguf")
    if name in ("mistral", "ministral", "phi3"):
        assert c.max_seq_len == {"mistral": 1024, "ministral": 1024, "phi3": 256}[name]
    if windowed:  # past the window: transformers' windowed logits
        long_ids = _ids(c.sliding_window + 40, c.vocab_size, seed=family["seed"])
        err, span = _logit_error(loaded, family["model"], long_ids)
        assert err < 2e-5 * span, f"{name} from {source} past its window: max |diff| {err:.3e} vs range {span:.2f}"
    err, span = _logit_error(loaded, family["model"], _ids(PROMPT_LEN, c.vocab_size, seed=family["seed"]))
    print(f"{name} from {source}: max |diff| {err:.2e}, logit range {span:.1f}")
    # float32 both sides, reductions of at most 128 terms: measured up to 2e-7 of the logit range
    assert err < 2e-5 * span, f"{name} from {source} (seed {family['seed']}): max |diff| {err:.3e} vs logit range {span:.2f}"


@pytest.mark.parametrize("extra", [{}, {"no_rope_layer_interval": 2}, {"no_rope_layers": [0, 1, 1, 0, 1, 1, 1, 1, 0]},
                                   {"use_sliding_window": True, "sliding_window": 64}])
def test_smollm3_configs_read_as_transformers_reads_them(extra):
    """A SmolLM3 config.json without rope keys, with an interval, a list longer than the layers, a sliding window:
    the NoPE layers and RoPE theta (transformers' SmolLM3 default where absent) that SmolLM3Config takes from it; a
    sliding window in the layers its layer_types mark (the NoPE layers), the context not capped."""
    from transformers import SmolLM3Config

    from spqt.sources import _hf_config

    cfg = {"model_type": "smollm3", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
           "rms_norm_eps": 1e-6, **extra}
    ours, theirs = _hf_config(cfg, "smollm3", tie=True), SmolLM3Config.from_dict(cfg)
    assert ours.nope_layers == tuple(i for i in range(8) if not theirs.no_rope_layers[i])
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert ours.max_seq_len == theirs.max_position_embeddings  # (not capped by a window)
    assert ours.sliding_layers == tuple(i for i, t in enumerate(theirs.layer_types or []) if t == "sliding_attention")
    assert ours.sliding_window == (64 if ours.sliding_layers else 0)


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64}])
def test_glm4_rope_scalings_rotate_as_transformers(rope):
    """GLM-4 with a RoPE scaling the readers take for every family (GLM-4-32B's model card suggests YaRN for long
    contexts) over its rotated half (16 of 32): our frequencies of the rotated pairs are transformers' Glm4 inverse
    frequencies within float32 rounding (theirs are float32), the passed-through pairs 0, the attention factor the
    same."""
    from transformers import Glm4Config
    from transformers.models.glm4.modeling_glm4 import Glm4RotaryEmbedding

    from spqt.model import rope_frequencies
    from spqt.sources import _class_filled, _hf_config

    cfg = {"model_type": "glm4", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 512,
           "pad_token_id": None, "eos_token_id": 1,
           "rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5, **rope}}
    theirs = Glm4RotaryEmbedding(Glm4Config.from_dict(json.loads(json.dumps(cfg))))
    ours = _hf_config(_class_filled(Glm4Config, cfg), "glm4", tie=False)
    frequencies = rope_frequencies(ours, ours.max_seq_len)
    assert ours.rope_dims == 16 and theirs.inv_freq.shape == (8,)
    torch.testing.assert_close(frequencies[:8].float(), theirs.inv_freq, rtol=2.0**-23, atol=0)
    assert not frequencies[8:].any() and ours.rope_attention_factor == pytest.approx(theirs.attention_scaling, 1e-12)


@pytest.mark.parametrize("model_type", ["llama", "smollm3", "phi3", "granite"])
def test_config_keys_left_out_read_as_transformers_fills_them(model_type):
    """A config.json without rms_norm_eps, max_position_embeddings, tie_word_embeddings, (Phi-3) the top-level
    original context or (Granite) the multipliers: transformers' config class fills them (Llama: 1e-6 and 2,048;
    SmolLM3: a tied head; Phi-3: 4,096, which overrides a longrope block's own; Granite: 1.0 each, the attention scale
    too), and so does the reader."""
    from transformers import AutoConfig

    from spqt.sources import _hf_config

    cfg = {"model_type": model_type, "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    if model_type == "phi3":
        cfg["rope_scaling"] = {"type": "longrope", "original_max_position_embeddings": 64, "short_factor": [1.0] * 8,
                               "long_factor": [2.0] * 8}
    theirs = AutoConfig.for_model(**json.loads(json.dumps(cfg)))  # (it rewrites a rope block in place)
    ours = _hf_config(cfg, model_type, tie=False)
    assert (ours.norm_eps, ours.max_seq_len, ours.tie_embeddings) == (
        theirs.rms_norm_eps, theirs.max_position_embeddings, theirs.tie_word_embeddings)
    if model_type == "phi3":
        assert ours.rope_original_context == theirs.original_max_position_embeddings == 4096
    if model_type == "granite":
        from spqt.folding import Multipliers, hf_multipliers
        from spqt.sources import _with_class_defaults

        assert hf_multipliers(_with_class_defaults(cfg, model_type)) == Multipliers(
            theirs.embedding_multiplier, theirs.attention_multiplier, theirs.residual_multiplier, theirs.logits_scaling)


def test_granite_untied_with_biases_and_a_gguf_without_its_keys(base_tokenizer, tmp_path):
    """Granite with an untied head and every bias (attention_bias, mlp_bias: q's bias takes q's scale, o's and down's
    the residual multiplier, the head 1 / logits_scaling): transformers' logits from HF and from GGUF. A GGUF without
    the four keys reads as llama.cpp reads it: no multiplier, attention 1 / sqrt(head_dim) (transformers' Granite with
    those values), nothing folded."""
    spec = ("GraniteConfig", dict(max_position_embeddings=512, pad_token_id=None, attention_bias=True, mlp_bias=True,
                                  embedding_multiplier=12.0, attention_multiplier=0.015625, residual_multiplier=0.22,
                                  logits_scaling=8.0, rope_parameters={"rope_type": "default", "rope_theta": 5e6}),
            "granite", "granite")
    fam = build_family("granite-untied", spec, base_tokenizer, tmp_path)
    ids = _ids(PROMPT_LEN, fam["tok"].vocab_size, seed=fam["seed"])
    for source in ("hf", "gguf"):
        loaded = load_model(fam[source])
        assert not loaded.config.tie_embeddings and loaded.config.linear_biases == ("qkv", "o", "gate_up", "down")
        err, span = _logit_error(loaded, fam["model"], ids)
        assert err < 2e-5 * span, f"{source} (seed {fam['seed']}): max |diff| {err:.3e} vs logit range {span:.2f}"
    bare = _gguf_with(fam["gguf"], tmp_path / "bare.gguf", {}, drop=tuple(f"granite.{k}" for k in GRANITE_KEYS))
    loaded = load_model(bare)
    assert loaded.provenance["folded_multipliers"] == {"embedding": 1.0, "attention": None, "residual": 1.0,
                                                       "logits": 1.0}
    table = fam["model"].state_dict()["model.embed_tokens.weight"]
    assert torch.equal(loaded.weights["tok_embeddings"], table)
    assert torch.equal(load_model(fam["gguf"]).weights["tok_embeddings"], (table.double() * 12).float())
    import transformers

    plain = dict(embedding_multiplier=1.0, attention_multiplier=0.25, residual_multiplier=1.0, logits_scaling=1.0)
    config = transformers.GraniteConfig(**{**fam["model"].config.to_dict(), **plain})
    reference = transformers.GraniteForCausalLM(config)
    reference.load_state_dict(fam["model"].state_dict())
    err, span = _logit_error(loaded, reference.eval(), ids)
    assert err < 2e-5 * span, f"seed {fam['seed']}: max |diff| {err:.3e} vs logit range {span:.2f}"


@pytest.mark.parametrize("family", ["granite"], indirect=True)
@pytest.mark.parametrize("case, fragment", [
    ("q_norm", "an attention multiplier cannot be folded into q where q is RMS-normed per head"),
    ("negative", "granite.residual_scale must be a positive number, got -0.5"),
    ("text", "granite.logit_scale is not a number ('x')"),
])
def test_unusable_granite_ggufs_are_refused(family, tmp_path, capsys, case, fragment):
    """A granite GGUF with q/k norms (a per-head norm would undo q's folded scale), a negative multiplier, or one
    that is not a number: one error line."""
    tensors = {f"blk.{i}.attn_{x}_norm.weight": np.ones(16, np.float32) for i in range(2) for x in "qk"}
    keys = {"negative": {"granite.residual_scale": -0.5}, "text": {"granite.logit_scale": "x"}}.get(case, {})
    path = _gguf_with(family["gguf"], tmp_path / "m.gguf", keys, tensors if case == "q_norm" else None)
    _expect_error(capsys, ["quantize", str(path), "-o", str(tmp_path / "o.spqt")], fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def _folder_without(source: Path, path: Path, part: str) -> Path:
    """A copy of the HF folder `source` at `path` without the tensors whose names hold `part`."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, path)
    weights = load_file(str(path / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if part not in k}, str(path / "model.safetensors"))
    return path


def _gguf_with(source: Path, path: Path, keys: dict, tensors: dict | None = None, drop: tuple = ()) -> Path:
    """A copy of the GGUF at `path` without the keys `drop`, with these keys (strings, lists, or float32) and extra
    float32 tensors."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    w = gguf.GGUFWriter(str(path), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", *drop, *keys):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            w.add_array(field.name, field.contents())
        else:
            w.add_key_value(field.name, field.contents(), kind)
    for key, value in keys.items():
        add = w.add_array if isinstance(value, list) else w.add_string if isinstance(value, str) else w.add_float32
        add(key, value)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_shape=tuple(int(d) for d in reversed(t.shape)),
                     raw_dtype=t.tensor_type)
    for tname, values in (tensors or {}).items():
        w.add_tensor(tname, values)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_linear_rope_scaling_equals_transformers(base_tokenizer, tmp_path):
    """Linear RoPE scaling (Llama 2 long-context fine-tunes: positions divided by the factor), from HF's rope_scaling
    and from a GGUF as llama.cpp's converter writes it (rope.scaling.type linear, rope.scaling.factor) or as older
    files do (rope.scale_linear alone, the type defaulting to linear as llama.cpp reads it): the logits of
    transformers, past the positions the factor compresses."""
    spec = ("LlamaConfig", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
                                max_position_embeddings=512), "llama", "llama3")
    fam = build_family("llama2-linear", spec, base_tokenizer, tmp_path)

    def rewritten(name: str, keys: dict, tensors: dict | None = None) -> Path:
        """The GGUF without its scaling keys, with these float32 keys and extra float32 tensors."""
        return _gguf_with(fam["gguf"], tmp_path / name, keys, tensors,
                          drop=("llama.rope.scaling.type", "llama.rope.scaling.factor"))

    older = rewritten("older.gguf", {"llama.rope.scale_linear": 4.0})  # the older key alone, no type
    half = 8  # head_dim / 2
    # type none never scales; a zero factor is none (the older key not read then); with rope_freqs: their product
    assert load_model(rewritten("none.gguf", {"llama.rope.scaling.type": "none",
                                              "llama.rope.scaling.factor": 4.0})).config.rope_freq_factors is None
    assert load_model(rewritten("zero.gguf", {"llama.rope.scaling.factor": 0.0,
                                              "llama.rope.scale_linear": 4.0})).config.rope_freq_factors is None
    divisors = np.linspace(1, 3, half).astype(np.float32)
    both = load_model(rewritten("both.gguf", {"llama.rope.scaling.factor": 4.0}, {"rope_freqs.weight": divisors}))
    assert np.allclose(both.config.rope_freq_factors, 4 * divisors)
    ids = _ids(PROMPT_LEN, fam["tok"].vocab_size, seed=fam["seed"])
    for source in (fam["hf"], fam["gguf"], older):
        loaded = load_model(source)
        assert loaded.config.rope_freq_factors == (4.0,) * (loaded.config.head_dim // 2), source
        err, span = _logit_error(loaded, fam["model"], ids)
        assert err < 2e-5 * span, source


def test_yarn_rope_scaling_equals_transformers(base_tokenizer, tmp_path):
    """YaRN RoPE scaling from an HF config (Qwen2.5's long context: its rope_scaling as Qwen's model cards give it)
    through transformers' own computation: the frequencies as divisors, the attention factor on the table's cos and
    sin; the logits of transformers past the original context, and the context extended to the original times the
    factor. A GGUF of it as llama.cpp's converter writes it (rope.scaling.type yarn, factor, original context) reads
    the same; one with DeepSeek's log multiplier or an attention factor is refused."""
    spec = ("Qwen2Config", dict(tie_word_embeddings=True, max_position_embeddings=64, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 64}), "qwen2",
        "chatml")
    fam = build_family("qwen2-yarn", spec, base_tokenizer, tmp_path)
    loaded = load_model(fam["hf"])
    c = loaded.config
    assert c.max_seq_len == 256 and c.rope_attention_factor > 1 and len(set(c.rope_freq_factors)) > 1
    from spqt.cli import _rope_scaling_label

    assert _rope_scaling_label(c).startswith(" (yarn scaling, attention factor 1.139")  # 0.1 ln 4 + 1
    err, span = _logit_error(loaded, fam["model"], _ids(PROMPT_LEN, c.vocab_size, seed=fam["seed"]))  # past the
    assert err < 2e-5 * span  # original 64 positions
    from_gguf = load_model(fam["gguf"])
    g = from_gguf.config
    assert np.allclose(g.rope_freq_factors, c.rope_freq_factors, rtol=1e-12)
    assert (g.rope_attention_factor, g.max_seq_len) == (c.rope_attention_factor, c.max_seq_len)
    err, span = _logit_error(from_gguf, fam["model"], _ids(PROMPT_LEN, c.vocab_size, seed=fam["seed"]))
    assert err < 2e-5 * span
    from spqt.sources import yarn_scaling

    betas = _gguf_with(fam["gguf"], tmp_path / "betas.gguf", {"qwen2.rope.scaling.yarn_beta_fast": 8.0,
                                                               "qwen2.rope.scaling.yarn_beta_slow": 0.2})
    assert load_model(betas).config.rope_freq_factors == yarn_scaling(
        {"factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 8.0, "beta_slow": 0.2}, 1e6, 16, 64)[0]
    assert load_model(betas).config.rope_freq_factors != g.rope_freq_factors
    with pytest.raises(SpqtError, match="GGUF rope scaling type 'longrope' is not supported"):
        load_model(_gguf_with(fam["gguf"], tmp_path / "longrope.gguf", {"qwen2.rope.scaling.type": "longrope"}))
    for key, value in (("yarn_log_multiplier", 0.1), ("attn_factor", 0.9)):
        path = _gguf_with(fam["gguf"], tmp_path / f"{key}.gguf", {f"qwen2.rope.scaling.{key}": value})
        with pytest.raises(SpqtError, match=f"GGUF YaRN with rope.scaling.{key} {value:g} is not supported"):
            load_model(path)
    # as Qwen's model card writes the block (rope_scaling, "type"): the same; a .spqt keeps the factor, as version 4
    cfg_path = fam["hf"] / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=1e6, rope_scaling={"factor": 4.0, "original_max_position_embeddings": 64, "type": "yarn"})
    cfg_path.write_text(json.dumps(cfg))
    assert load_model(fam["hf"]).config == c
    out = tmp_path / "yarn.spqt"
    assert main(["quantize", str(fam["hf"]), "-o", str(out)]) == 0
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        assert json.loads(f.metadata()["spqt"])["format_version"] == 4
    assert load_model(out).config.rope_attention_factor == c.rope_attention_factor


def test_longrope_equals_transformers_on_both_sides_of_the_switch(base_tokenizer, tmp_path):
    """Phi-3's longrope (128k, Phi-3.5) from HF and from a GGUF as llama.cpp's converter writes it: a run of at most
    the original 64 positions rotates by the short factors, a longer run by the long ones (llama.cpp's choice, by the
    run's context), cos and sin times sqrt(1 + ln 4 / ln 64); transformers picks by the forward's length, so a run of
    40 and one of 90 tokens give its logits. Quantized, the file keeps the long factors (format 5)."""
    hd = 16  # 8 frequencies; long factors of a magnitude like Phi-3's (up to ~60)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
            "short_factor": [1.0 + 0.1 * i for i in range(hd // 2)],
            "long_factor": [1.0 + 8.0 * i for i in range(hd // 2)]}
    spec = ("Phi3Config", dict(max_position_embeddings=256, original_max_position_embeddings=64, pad_token_id=None,
                               rope_parameters=rope), "phi3", "phi3")  # (transformers' Phi-3 reads the top level's)
    fam = build_family("phi3-longrope", spec, base_tokenizer, tmp_path)
    ids = _ids(PROMPT_LEN, fam["tok"].vocab_size, seed=fam["seed"])
    with torch.no_grad():  # the switch matters: the first 40 positions of transformers' long run differ
        long_run, short_run = (fam["model"](torch.tensor([ids[:n]])).logits[0] for n in (PROMPT_LEN, 40))
    span = float(short_run.max() - short_run.min())
    assert float((long_run[:40] - short_run).abs().max()) > 0.05 * span
    for source in ("hf", "gguf"):
        loaded = load_model(fam[source])
        c = loaded.config
        assert c.max_seq_len == 256 and c.rope_original_context == 64 and c.rope_long_freq_factors is not None
        assert c.rope_attention_factor == pytest.approx(math.sqrt(1 + math.log(4) / math.log(64)), rel=1e-6)
        for n in (40, PROMPT_LEN):  # _logit_error: a run of n tokens
            err, span = _logit_error(loaded, fam["model"], ids[:n])
            assert err < 2e-5 * span, f"{source}, {n} tokens (seed {fam['seed']}): max |diff| {err:.3e} vs {span:.2f}"
    # a GGUF without the attention factor's key (llama.cpp's converter always writes it): llama.cpp's default, 1
    bare = _gguf_with(fam["gguf"], tmp_path / "bare.gguf", {}, drop=("phi3.rope.scaling.attn_factor",))
    assert load_model(bare).config.rope_attention_factor == 1.0
    # a model built under inference mode (perplexity and calibration build so) rebuilds its table outside it too
    from spqt.model import rope_table

    with torch.inference_mode():
        model = build_model(loaded, "cpu", torch.float32)
    model.setup_cache(1, 40, torch.float32)
    assert torch.equal(model.rope, rope_table(c, c.max_seq_len, context=40))
    from spqt.cli import _rope_scaling_label

    assert _rope_scaling_label(c).startswith(" (longrope scaling, attention factor 1.155")
    out = tmp_path / "longrope.spqt"
    assert main(["quantize", str(fam["hf"]), "-o", str(out), "--device", "cpu"]) == 0
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        assert json.loads(f.metadata()["spqt"])["format_version"] == 5
    assert load_model(out).config == load_model(fam["hf"]).config


@pytest.mark.parametrize("scaling", ["default", "longrope"])
def test_partial_rope_equals_transformers(base_tokenizer, tmp_path, monkeypatch, capsys, scaling):
    """Phi-4-mini's partial RoPE (partial_rotary_factor 0.75: 12 of a head's 16 dimensions rotated, 6 frequencies over
    12, the other 4 passed through), plain and under longrope (factor lists of 6; cos and sin of the rotated part
    times the attention factor), from HF and from a GGUF as llama.cpp's converter writes it (rope.dimension_count
    12): transformers' logits, which the partial rotation changes, from one prefill (40 tokens; longrope: and 90, past
    the original 64) and one token at a time through the KV cache. Quantized, the file is format 8 and reads back the
    same configuration, its logits stay within Q4_K's noise of transformers' (above 15 dB), inspect shows the rotated
    dimensions, and the CPU's native decode gives the torch path's logits within the fp16 rounding of the head."""
    from safetensors import safe_open

    from spqt.kernels import cpu_native

    rope = {"rope_type": scaling, "rope_theta": 10000.0, "partial_rotary_factor": 0.75}
    longrope = {}
    if scaling == "longrope":
        rope |= {"original_max_position_embeddings": 64, "short_factor": [1.0 + 0.1 * i for i in range(6)],
                 "long_factor": [1.0 + 8.0 * i for i in range(6)]}
        longrope = {"original_max_position_embeddings": 64}
    spec = ("Phi3Config", dict(max_position_embeddings=256, pad_token_id=None, rope_parameters=rope, **longrope),
            "phi3", "phi3")
    fam = build_family(f"phi4-{scaling}", spec, base_tokenizer, tmp_path)
    ids = _ids(PROMPT_LEN, fam["tok"].vocab_size, seed=fam["seed"])
    with torch.no_grad():
        theirs = fam["model"](torch.tensor([ids[:40]])).logits[0]
        span = float(theirs.max() - theirs.min())
        whole = _reference(fam["model"], rope_parameters={**rope, "partial_rotary_factor": 1.0,
                                                           **{k: [1.0] * 8 for k in ("short_factor", "long_factor")
                                                              if k in rope}})
        assert float((whole(torch.tensor([ids[:40]])).logits[0] - theirs).abs().max()) > 0.05 * span
    for source in ("hf", "gguf"):
        loaded = load_model(fam[source])
        c = loaded.config
        assert c.rope_dims == 12 and c.rotary_dims == 12 and c.head_dim == 16
        assert (c.rope_long_freq_factors is not None) == (scaling == "longrope")
        for n in (40, PROMPT_LEN) if scaling == "longrope" else (40,):
            err, span_n = _logit_error(loaded, fam["model"], ids[:n])
            assert err < 2e-5 * span_n, f"{source}, {n} tokens (seed {fam['seed']}): max |diff| {err:.3e}"
        stepped = _stepped_logits(Generator(loaded, "cpu", max_len=48), ids[:40], sparse=False)
        err = float((stepped - theirs[1:]).abs().max())
        assert err < 2e-5 * span, f"{source} (seed {fam['seed']}): decode steps max |diff| {err:.3e} vs {span:.2f}"
    out = tmp_path / "partial.spqt"
    assert main(["quantize", str(fam["hf"]), "-o", str(out), "--device", "cpu"]) == 0
    with safe_open(str(out), framework="pt") as f:
        assert json.loads(f.metadata()["spqt"])["format_version"] == 8
    spqt = load_spqt(out)
    assert spqt.config == load_model(fam["hf"]).config
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "RoPE on 12 of 16 head dims" in capsys.readouterr().out
    ref = _stepped_logits(Generator(spqt, "cpu", max_len=48), ids[:40], sparse=False)
    # (its rows stored permuted, read back as they are: Q4_K's noise alone, as test_quantize_both_sources_then_generate)
    assert sqnr_db(theirs[1:], ref) > 15, f"seed {fam['seed']}"
    if cpu_native.available():
        pytest.skip(cpu_native.available())
    got = _stepped_logits(Generator(spqt, "cpu", max_len=48, backend="cpu-native"), ids[:40], sparse=False)
    err = float((got - ref).abs().max())
    assert err <= 2 * 2.0 ** -11 * span, f"seed {fam['seed']}: max |diff| {err:.3e}, logit range {span:.2f}"


@pytest.mark.parametrize("family", ["phi3"], indirect=True)
def test_whole_rope_reads_q_and_k_as_the_file_holds_them(family):
    """A model that rotates whole heads (partial_rotary_factor 1, rope.dimension_count head_dim): no permutation, the
    q|k|v rows read as transformers holds them, from HF and GGUF, and the configuration is the one without rope_dims
    (rope_dims 0), so its .spqt keeps its format."""
    qkv = family["model"].state_dict()["model.layers.0.self_attn.qkv_proj.weight"]
    for source in ("hf", "gguf"):
        loaded = load_model(family[source])
        assert loaded.config.rope_dims == 0 and loaded.config.rotary_dims == loaded.config.head_dim
        assert torch.equal(loaded.weights["layers.0.qkv"].float(), qkv), source


class _Quantized(dict):
    """source ("hf", "gguf") -> the .spqt that `spqt quantize` made of it (q4_k zigzag), made on first use: the `gpu`
    case reads only the HF one, so a GPU machine whose transformers builds no tokenizer for a newer family's GGUF
    (5.17 for smollm3 and granite) still runs it; the GGUF leg runs in every CPU test."""

    def __init__(self, family):
        super().__init__()
        self.family = family

    def __missing__(self, source: str) -> Path:
        path = self.family["folder"] / f"{source}.spqt"
        assert main(["quantize", str(self.family[source]), "-o", str(path), "--device", "cpu"]) == 0
        self[source] = path
        return path


@pytest.fixture(scope="module")
def quantized(family) -> dict:
    return _Quantized(family)


def test_quantize_both_sources_then_generate(family, quantized, capsys):
    out = quantized
    a, b = load_spqt(out["hf"]), load_spqt(out["gguf"])
    # the same numbers from both sources give the same blocks, biases and norms
    for name, w in a.weights.items():
        other = b.weights[name]
        if isinstance(w, QuantizedWeight):
            assert torch.equal(w.blocks, other.blocks), name
        else:
            assert torch.equal(w, other), name
    if family["name"] == "qwen2":
        assert a.weights["layers.1.qkv.bias"].shape == (64 + 2 * 32,)
    if family["name"] == "qwen3":
        assert a.weights["layers.1.q_norm"].shape == (32,)
    if family["name"] == "olmo2":  # (q's and k's whole widths; no norms before the maps)
        assert (a.weights["layers.1.q_norm"].shape, a.weights["layers.1.k_norm"].shape) == ((64,), (32,))
        assert "layers.1.attention_norm" not in a.weights and "layers.1.ffn_norm" not in a.weights
    # greedy decoding: repeatable, the same from both files, close to the float model
    ids = _ids(40, a.config.vocab_size, seed=family["seed"] + 1)
    gen_a, gen_b = Generator(a, "cpu", max_len=64), Generator(b, "cpu", max_len=64)
    first = gen_a.generate(ids, 16).tokens
    seed = f"seed {family['seed']}"
    assert len(first) == 16, seed
    assert gen_a.generate(ids, 16).tokens == first, seed
    assert gen_b.generate(ids, 16).tokens == first, seed
    model = build_model(a, "cpu", torch.float32)
    model.setup_cache(1, len(ids), torch.float32)
    with torch.no_grad():
        quantized = model(torch.tensor([ids]), torch.arange(len(ids)))[0]
        exact = family["model"](torch.tensor([ids])).logits[0].float()
    # Q4_K weights are ~19 dB (test_checkpoint); two layers and a float head keep the logits above 15, and each
    # doubling of the layers adds as much noise again: -3 dB (SmolLM3's 4 layers: 14.2 to 17.4 dB over 20 seeds)
    floor = 15 - 10 * math.log10(a.config.n_layers / 2)
    if a.config.post_norms:  # Gemma's post-norms bring every layer's output, its noise too, to the residual's size:
        floor = 7.5          # 9.3 to 12.2 dB over 12 seeds (6 layers; Q8_0 maps: 34 dB, the switches right);
        #                      Gemma 2's 4 layers, capped: 10.6 to 13.7 dB over 12 seeds
    if not a.config.pre_norms:  # OLMo 2's too, its maps reading the residual stream itself: 13.5 to 16.3 dB over 13
        floor = 11.0 - 10 * math.log10(a.config.n_layers / 2)  # seeds (2 layers); Olmo 3's 4 layers: 11.4 to 12.9 dB
        #                                                        over 16 seeds
    db = sqnr_db(exact, quantized)
    with capsys.disabled():
        print(f"{family['name']}: quantized logits {db:.1f} dB SQNR against transformers' float logits")
    assert db > floor, seed
    capsys.readouterr()
    assert main(["generate", str(out["gguf"]), "-p", "once upon a time", "-n", "6", "--device", "cpu"]) == 0
    assert main(["generate", str(out["hf"]), "-p", "hello", "-n", "4", "--chat", "--device", "cpu"]) == 0
    assert main(["inspect", str(out["hf"])]) == 0
    shown = capsys.readouterr().out
    assert f"architecture {'llama' if family['name'].startswith('llama') else family['name']}" in shown
    capped = "attention scores capped at 2, logits capped at 1.5"
    assert (capped in shown) == (family["name"] == "gemma2"), shown


def test_phi3_fused_quantized_tensors_split_by_rows(base_tokenizer, tmp_path):
    """Block-quantized fused matrices (as a Phi-3 Q8_0 / Q4_0 GGUF holds them): each part read alone is its rows of
    the whole tensor dequantized (a block never spans two rows), in q, k, v and gate, up order."""
    import gguf

    fam = build_family("phi3-q", FAMILIES["phi3"], base_tokenizer, tmp_path)
    q8, q4 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0
    path = write_gguf(fam["model"], fam["tok"], tmp_path / "q.gguf", "phi3", TEMPLATES["phi3"],
                      types={"attn_qkv.weight": q8, "ffn_up.weight": q4})
    source, reader = open_source(path), gguf.GGUFReader(str(path))
    c = source.config
    whole = {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))) for t in reader.tensors}
    for i in range(c.n_layers):
        qkv, up = whole[f"blk.{i}.attn_qkv.weight"], whole[f"blk.{i}.ffn_up.weight"]
        parts = dict(zip(["wq", "wk", "wv"], qkv.split([c.q_dim, c.kv_dim, c.kv_dim])))
        parts |= dict(zip(["w1", "w3"], up.split([c.ffn_dim, c.ffn_dim])))
        for name, expect in parts.items():
            assert torch.equal(source.tensor(f"layers.{i}.{name}"), expect), (i, name)
        assert not torch.equal(parts["w1"], fam["model"].state_dict()[f"model.layers.{i}.mlp.gate_up_proj.weight"][
            :c.ffn_dim])  # (quantized: not the float weights)


def test_inspect_names_a_gguf_files_own_types(base_tokenizer, tmp_path, capsys):
    """inspect of a GGUF listed every map as float32 "as loaded" (the reader dequantizes): it now also names the
    types the file stores them in, from the header, with their bytes and bits per weight."""
    import gguf
    from spqt.cli import main

    fam = build_family("qwen2-q", FAMILIES["qwen2"], base_tokenizer, tmp_path)
    q8, q4 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0
    path = write_gguf(fam["model"], fam["tok"], tmp_path / "q.gguf", "qwen2", TEMPLATES["chatml"],
                      types={"attn_q.weight": q8, "ffn_down.weight": q4})
    stored = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts = stored.setdefault(t.tensor_type.name, [0, 0, 0])
        counts[0], counts[1], counts[2] = counts[0] + 1, counts[1] + int(t.n_elements), counts[2] + int(t.n_bytes)
    layers = fam["model"].config.num_hidden_layers
    assert stored["Q8_0"][0] == stored["Q4_0"][0] == layers and "F32" in stored, stored
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("file types"))
    weights, nbytes = sum(c[1] for c in stored.values()), sum(c[2] for c in stored.values())
    for name, (count, _, _) in stored.items():
        assert f"{name} {count} tensor" in line, line
    most_first = sorted(stored, key=lambda name: -stored[name][2])
    assert sorted(stored, key=line.index) == most_first, line
    assert f"{nbytes / 1e6:.2f} MB for {weights / 1e6:.2f} M weights, {8 * nbytes / weights:.3f} bits" in line, line


@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_chat_template_and_text_as_transformers(family, source):
    from transformers import AutoTokenizer

    loaded = open_source(family[source])  # config and tokenizer; no weights read
    ours = TextTokenizer(loaded.tokenizer, loaded.config)
    # (transformers reads no smollm3, granite, olmo2, glm4, exaone, ernie4_5 or seed_oss GGUF's tokenizer: the one it
    # was written from)
    if source == "hf" or family["name"] in ("smollm3", "granite", "olmo2", "olmo3", "glm4", "exaone", "exaone4",
                                            "ernie4_5", "seed_oss"):
        theirs = AutoTokenizer.from_pretrained(str(family["hf"]))
    else:
        theirs = AutoTokenizer.from_pretrained(str(family["gguf"].parent), gguf_file=family["gguf"].name)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick brown fox?"}]
    expect = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours.chat("the quick brown fox?", system="be brief") == list(expect)
    text = "once upon a time, the lazy dog"
    assert ours.encode(text) == theirs(text)["input_ids"]
    assert loaded.config.add_bos == (source == "gguf" and FAMILIES[family["name"]][2] == "llama")


def test_a_smollm_gguf_tokenizer_splits_digits_apart_as_llama_cpp(tmp_path, monkeypatch):
    """tokenizer.ggml.pre "smollm" (the default model's): llama.cpp makes each digit a piece of its own before GPT-2's
    split; transformers' converter split as GPT-2 alone, so " 1" reached the merges whole (here Ġ1; in the default
    model's vocabulary a run of spaces and line ends before a digit came out otherwise: 8 of WikiText-2's 304,978
    tokens). A "gpt-2" vocabulary keeps GPT-2's split."""
    import gguf
    from tokenizers import Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from spqt.sources import _gguf_tokenizer

    tokens = ["<|endoftext|>", *bytes_to_unicode().values(), "\u01201"]  # (Ġ1: a space, then 1)
    ids = {}
    for pre in ("smollm", "gpt-2"):
        path = tmp_path / f"{pre}.gguf"
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([3] + [1] * (len(tokens) - 1))
        w.add_token_merges(["\u0120 1"])
        w.add_bos_token_id(0)
        w.add_eos_token_id(0)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        ids[pre] = Tokenizer.from_str(_gguf_tokenizer(path, pre).tokenizer_json).encode(" 1", add_special_tokens=False).ids
    assert [tokens[i] for i in ids["smollm"]] == ["\u0120", "1"]
    assert [tokens[i] for i in ids["gpt-2"]] == ["\u01201"]
    # the name is the file's (its reader's, passed in), not what a transformers version's mapping hands over
    from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping

    if hasattr(mapping, "convert_gguf_tokenizer"):
        real = mapping.get_gguf_tokenizer

        def without_pre(path):
            architecture, tokenizer_dict, special = real(path)
            tokenizer_dict.pop("pre_tokenizer_type", None)
            return architecture, tokenizer_dict, special

        monkeypatch.setattr(mapping, "get_gguf_tokenizer", without_pre)
        spec = _gguf_tokenizer(tmp_path / "smollm.gguf", "smollm")
        assert Tokenizer.from_str(spec.tokenizer_json).encode(" 1", add_special_tokens=False).ids == ids["smollm"]


def test_bias_follows_the_sparse_product_and_is_never_thresholded(rng):
    """y = W (x * (|x| > t)) + b, then the epilogue (residual, SwiGLU) on the biased product."""
    n, k = 70, 48
    w = torch.from_numpy(rng.standard_normal((n, k))).float()
    b = torch.from_numpy(rng.standard_normal(n)).float()
    x = torch.from_numpy(rng.standard_normal((1, 1, k))).float()
    r = torch.from_numpy(rng.standard_normal((1, 1, n))).float()
    lin = Linear(w, torch.float32, "cpu", bias=b)
    lin.set_threshold(0.7)
    lin.sparse = True
    kept = x * (x.abs() > 0.7)
    # float32 sums of 48 terms in another order: a few 1e-6 of their size apart (a bias thresholded or added after the
    # epilogue moves a result by O(1))
    close = dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lin(x), kept @ w.T + b, **close)
    torch.testing.assert_close(lin(x, residual=r), r + kept @ w.T + b, **close)
    g, u = (kept @ w.T + b).split(n // 2, dim=-1)
    torch.testing.assert_close(lin(x, swiglu=True), torch.nn.functional.silu(g) * u, **close)
    lin.set_threshold(1e9)  # every input dropped: the bias alone
    assert torch.equal(lin(x), b.view(1, 1, n))


@pytest.mark.parametrize("backend, dtype, device", [
    pytest.param("reference", torch.float32, "cpu", id="reference"),
    pytest.param("cpu-fp16", torch.float32, "cpu", id="cpu-fp16"),
    pytest.param("cpu-fp16", torch.bfloat16, "cpu", id="cpu-fp16-bf16"),
    pytest.param("cpu-native", torch.float32, "cpu", id="cpu-native"),
    pytest.param("triton", torch.float32, "cpu", id="interp"),
    pytest.param("triton", torch.float16, "cuda", id="gpu", marks=pytest.mark.gpu)])
def test_one_tokens_bias_joins_the_maps_epilogue(rng, backend, dtype, device):
    """A decode token's bias alone (no residual, no SwiGLU) is the map's epilogue residual: W x + b in the compute
    dtype on every backend, dense and sparse, the same as a two-token call's torch add within the dtype's rounding,
    the bias buffer never written, and no sums of squares written for a folded norm (the map's output feeds none)."""
    import spqt
    from spqt.functional import NORM_SUMS
    from spqt.kernels import cpu_native

    if backend == "cpu-native" and cpu_native.available():
        pytest.skip(cpu_native.available())
    n, k = 300, 130  # neither a multiple of a block
    w = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32))
    qw = QuantizedWeight(spqt.quantize(w, "q4_k", "zigzag"), "q4_k", "zigzag", (n, k))
    w64 = qw.dequantize().double()
    b = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    lin = Linear(qw, dtype, device, backend, bias=b)
    bias = lin.bias.clone()
    x = torch.from_numpy(rng.standard_normal((1, 1, k)).astype(np.float32)).to(device, dtype)
    eps = {torch.float32: 2.0**-20, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}[dtype]
    if backend == "cpu-fp16":  # W, x and W x rounded to fp16 whatever the compute dtype
        eps = max(eps, 2.0**-9)
    for sparse in (False, True):
        if sparse:
            lin.set_threshold(float(x.float().abs().median()))
            lin.sparse = True
        kept = x * (x.abs() > lin.threshold) if sparse else x
        want = kept.double().cpu() @ w64.T + bias.double().cpu()
        got = lin(x)
        assert got.dtype == dtype and got.shape == (1, 1, n), (got.dtype, got.shape)
        scale = float((kept.abs().double().cpu() @ w64.abs().T).max() + bias.abs().max())  # the sums' magnitude
        torch.testing.assert_close(got.double().cpu(), want, rtol=0, atol=eps * scale, msg=f"sparse={sparse}")
        two = lin(torch.cat([x, x], dim=1))[:, :1]  # a prefill's product, then the bias added in torch
        torch.testing.assert_close(got.double().cpu(), two.double().cpu(), rtol=0, atol=eps * scale)
        # no sums of squares for a folded norm: a biased map's output feeds none (q|k|v)
        assert getattr(got, NORM_SUMS, None) is None
    assert torch.equal(lin.bias, bias)
    if backend == "triton":  # the same map without the bias, handed it as a residual, writes them (o, down)
        plain = Linear(qw, dtype, device, backend)
        assert getattr(plain(x, residual=bias.view(1, 1, n)), NORM_SUMS, None) is not None


def _stepped_logits(gen: Generator, ids: list[int], sparse: bool) -> torch.Tensor:
    """Teacher-forced decoding: ids[0] prefilled, then one decode step per id (on CUDA a graph
    replay of the single-token kernels). Returns (len(ids) - 1, vocab) float32 logits on the CPU."""
    from spqt.generate import set_sparse

    out = []
    with torch.inference_mode():
        gen.model.setup_cache(1, gen.max_len, gen.dtype)
        set_sparse(gen.model, False)
        gen.model(torch.tensor([ids[:1]], device=gen.device), torch.arange(1, device=gen.device), kv_len=1)
        set_sparse(gen.model, sparse)
        for pos, token in enumerate(ids[1:], start=1):
            # a graph's output buffer is reused, and so are the Triton maps' on the CPU: a copy a step
            out.append(gen.decode_step(token, pos)[0, -1].float().cpu().clone())
        set_sparse(gen.model, False)
    return torch.stack(out)


def test_decode_steps_equal_full_forward(family, quantized):
    """KV cache with the switches (biased k/v, normed q/k): one token at a time == all at once."""
    loaded = load_spqt(quantized["hf"])
    ids = _ids(32, loaded.config.vocab_size, seed=family["seed"] + 3)
    gen = Generator(loaded, "cpu", max_len=64)
    stepped = _stepped_logits(gen, ids, sparse=False)
    with torch.inference_mode():
        gen.model.setup_cache(1, len(ids), torch.float32)
        full = gen.model(torch.tensor([ids]), torch.arange(len(ids)))[0, 1:]
    err = float((full - stepped).abs().max())
    assert err < 2e-5 * float(full.max() - full.min()), f"seed {family['seed']}: max |diff| {err:.3e}"


@pytest.mark.parametrize("family", ["smollm3"], indirect=True)
def test_native_decode_skips_rope_in_nope_layers(family, quantized, monkeypatch):
    """The CPU's native decode (--gemv native: a decode token's RoPE, KV-cache write and attention in one C call) of
    SmolLM3: the C attention runs in every layer, the NoPE layer's with the identity table (sin 0), and the
    teacher-forced decode-step logits are the torch reference's within the fp16 rounding of the tied head; the .spqt
    is format version 5."""
    from safetensors import safe_open

    from spqt.kernels import cpu_native

    with safe_open(str(quantized["hf"]), framework="pt") as f:
        assert json.loads(f.metadata()["spqt"])["format_version"] == 5
    if cpu_native.available():
        pytest.skip(cpu_native.available())
    loaded = load_spqt(quantized["hf"])
    c = loaded.config
    ids = _ids(10, c.vocab_size, seed=family["seed"] + 4)
    ref = _stepped_logits(Generator(loaded, "cpu", max_len=16), ids, sparse=False)
    rotated, native = [], cpu_native.rope_attention_decode

    def watched(qkv, table, *args):
        rotated.append(bool(table[:, c.head_dim // 2:].any()))
        return native(qkv, table, *args)

    monkeypatch.setattr(cpu_native, "rope_attention_decode", watched)
    got = _stepped_logits(Generator(loaded, "cpu", max_len=16, backend="cpu-native"), ids, sparse=False)
    assert rotated == [c.rotates(i) for i in range(c.n_layers)] * len(ids)  # (the one-token prefill too)
    span = float(ref.max() - ref.min())
    err = float((got - ref).abs().max())
    assert err <= 2 * 2.0 ** -11 * span, f"seed {family['seed']}: max |diff| {err:.3e}, logit range {span:.2f}"


@pytest.mark.parametrize("family", ["smollm3", "gemma3", "gemma2", "olmo2", "olmo3", "glm4", "exaone4", "ernie4_5",
                                    "seed_oss"], indirect=True)
def test_gptq_runs_each_layer_as_the_model_does(family, monkeypatch):
    """GPTQ's one layer at a time (gptq.quantize_layers, which builds its own tables) over SmolLM3 with Q8_0 maps:
    each layer's outputs on the calibration windows are the float model's within Q8_0's error (measured below 1 %
    of their norm; the NoPE layer rotated instead: 10 %)."""
    from spqt import gptq
    from spqt.checkpoint import fused_float_weights, fused_layer_weights
    from spqt.mixes import group_types

    source = open_source(family["hf"])
    c = source.config
    windows = torch.randint(0, c.vocab_size, (2, 48), generator=torch.Generator().manual_seed(family["seed"]))
    outputs, run_layer = {}, gptq._quantize_layer

    def watched(config, i, *args):
        results, states = run_layer(config, i, *args)
        outputs[i] = torch.cat(states)
        return results, states

    monkeypatch.setattr(gptq, "_quantize_layer", watched)
    for _ in gptq.quantize_layers(c, source.tensor("tok_embeddings"), lambda i: fused_layer_weights(source, i),
                                  windows, group_types("q8_0", c.n_layers), "zigzag"):
        pass
    model = build_model(fused_float_weights(source))
    model.setup_cache(2, 48, torch.float32)
    float_outputs = {}
    for i, block in enumerate(model.layers):
        block.register_forward_hook(lambda mod, args, out, i=i: float_outputs.__setitem__(i, out))
    with torch.no_grad():
        model(windows, torch.arange(48))
    for i in range(c.n_layers):
        error = float((outputs[i] - float_outputs[i]).norm() / float_outputs[i].norm())
        assert error < 0.03, f"layer {i} (seed {family['seed']}): relative error {error:.3f}"


def _prefill_and_steps_equal(family, quantized, ids, theirs, span, format_version):
    """The family's HF folder read by us equals transformers' logits `theirs` (40 tokens) within 2e-5 of their range
    `span`, in one prefill and one token at a time through the KV cache; its .spqt has the format version and reads
    back the same configuration. Returns the .spqt's LoadedModel."""
    from safetensors import safe_open

    loaded = load_model(family["hf"])
    err, _ = _logit_error(loaded, family["model"], ids)
    assert err < 2e-5 * span, f"seed {family['seed']}: prefill max |diff| {err:.3e} vs logit range {span:.2f}"
    stepped = _stepped_logits(Generator(loaded, "cpu", max_len=48), ids, sparse=False)
    err = float((stepped - theirs[1:]).abs().max())
    assert err < 2e-5 * span, f"seed {family['seed']}: decode steps max |diff| {err:.3e} vs logit range {span:.2f}"
    with safe_open(str(quantized["hf"]), framework="pt") as f:
        assert json.loads(f.metadata()["spqt"])["format_version"] == format_version
    spqt = load_spqt(quantized["hf"])
    assert spqt.config == loaded.config
    return spqt


def _attention_scale_folds(family, name, holder, base_tokenizer, tmp_path):
    """A Gemma family's model with query_pre_attn_scalar 24 (head_dim 16): its HF folder reads as transformers runs
    it (the scale folded into the `holder` tensor of every layer), its GGUF, which has no such key, as a transformers
    model with query_pre_attn_scalar 16 (llama.cpp's 1 / sqrt(head_dim)), within 2e-5 of the logits' range. Returns
    the family (build_family's), the prompt's ids and the HF folder's LoadedModel."""
    cls, extra, arch, template = family
    fam = build_family(name, (cls, {**extra, "query_pre_attn_scalar": 24}, arch, template), base_tokenizer, tmp_path)
    ids = _ids(PROMPT_LEN, fam["tok"].vocab_size, seed=fam["seed"])
    hf = load_model(fam["hf"])
    err, span = _logit_error(hf, fam["model"], ids)
    assert err < 2e-5 * span, f"seed {fam['seed']}: max |diff| {err:.3e} vs logit range {span:.2f}"
    gguf_model = load_model(fam["gguf"])
    assert not torch.equal(gguf_model.weights[f"layers.0.{holder}"], hf.weights[f"layers.0.{holder}"])
    err, span = _logit_error(gguf_model, _reference(fam["model"], query_pre_attn_scalar=16), ids)
    assert err < 2e-5 * span, f"seed {fam['seed']}: GGUF max |diff| {err:.3e} vs logit range {span:.2f}"
    return fam, ids, hf


def _reference(model, **changes):
    """A transformers model of `model`'s class with its weights and these config values changed (float32, eval)."""
    config = type(model.config)(**{**model.config.to_dict(), **changes})
    reference = type(model)(config)
    reference.load_state_dict(model.state_dict())
    return reference.eval()


@pytest.mark.parametrize("family", ["gemma3"], indirect=True)
def test_gemma3_window_cuts_and_decode_steps_equal_transformers(family, quantized, monkeypatch):
    """Gemma 3's sliding layers past their window of 8: transformers' logits without the window differ (the window
    cuts in these 40 tokens), ours equal its windowed ones, one prefill and one token at a time through the KV cache
    (the decode steps' masks: the last 8 keys in a sliding layer). The CPU's native decode attention (one C call a
    layer, which adds the mask to its scores) runs in every layer, the sliding ones with a mask that cuts, and gives
    the torch path's logits within the fp16 rounding of the tied head. The .spqt is format version 6 and reads back
    the same configuration."""
    from spqt.kernels import cpu_native

    ids = _ids(40, family["tok"].vocab_size, seed=family["seed"] + 5)
    with torch.no_grad():
        theirs = family["model"](torch.tensor([ids])).logits[0]
        unwindowed = _reference(family["model"], sliding_window=512)(torch.tensor([ids])).logits[0]
    span = float(theirs.max() - theirs.min())
    assert float((theirs - unwindowed).abs().max()) > 0.05 * span  # (the window matters here)
    spqt = _prefill_and_steps_equal(family, quantized, ids, theirs, span, format_version=6)
    if cpu_native.available():
        pytest.skip(cpu_native.available())
    c = spqt.config
    ref = _stepped_logits(Generator(spqt, "cpu", max_len=48), ids, sparse=False)
    cuts, native = [], cpu_native.rope_attention_decode

    def watched(qkv, table, positions, cache_k, cache_v, n_heads, n_kv, mask, length, *rest):
        p = int(positions[0])
        cuts.append(bool(torch.isinf(mask[0, : max(0, p - c.sliding_window + 1)]).all()) and p >= c.sliding_window)
        return native(qkv, table, positions, cache_k, cache_v, n_heads, n_kv, mask, length, *rest)

    monkeypatch.setattr(cpu_native, "rope_attention_decode", watched)
    got = _stepped_logits(Generator(spqt, "cpu", max_len=48, backend="cpu-native"), ids, sparse=False)
    assert len(cuts) == c.n_layers * len(ids)  # (the one-token prefill too)
    assert cuts == [p >= c.sliding_window and bool(c.window(i)) for p in range(len(ids)) for i in range(c.n_layers)]
    span = float(ref.max() - ref.min())
    err = float((got - ref).abs().max())
    assert err <= 2 * 2.0 ** -11 * span, f"seed {family['seed']}: max |diff| {err:.3e}, logit range {span:.2f}"


def test_gemma3_attention_scale_and_multimodal(base_tokenizer, tmp_path):
    """query_pre_attn_scalar 24 with head_dim 16 (folded into q_norm: transformers' logits from HF); its GGUF, which
    carries no such key, reads as llama.cpp reads it: scores scaled by 1 / sqrt(head_dim), a transformers model with
    query_pre_attn_scalar 16 (the 27B's 62 layers: by 1 / sqrt(dim / heads)). The multimodal checkpoint
    (Gemma3ForConditionalGeneration as transformers saves it: text_config, language_model.model.* names; and as
    model.language_model.*) reads as its text model."""
    import transformers
    from safetensors.torch import load_file, save_file

    from spqt.sources import _gguf_gemma3

    fam, ids, hf = _attention_scale_folds(FAMILIES["gemma3"], "gemma3-scale", "q_norm", base_tokenizer, tmp_path)
    keys = {"gemma3.attention.sliding_window": 1024}
    big = _gguf_gemma3(lambda key, default=None: keys.get(key, default), lambda key, default=None: keys.get(
        f"gemma3.{key}", default), Path("m.gguf"), 62, 5376, 32, 128)
    assert big["query_scale"] == math.sqrt(128 / 168) and big["sliding_layers"] == tuple(
        i for i in range(62) if i % 6 != 5) and big["embed_scale"] == math.sqrt(5376)
    # the multimodal checkpoint: a tiny vision tower beside the same text model
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=fam["model"].config.to_dict(), vision_config=vision.to_dict(),
                                       mm_tokens_per_image=4)
    mm = transformers.Gemma3ForConditionalGeneration(config).eval()
    mm.model.language_model.load_state_dict(fam["model"].model.state_dict())
    mm.save_pretrained(str(tmp_path / "mm"))
    fam["tok"].save_pretrained(str(tmp_path / "mm"))
    with torch.no_grad():
        theirs = mm(input_ids=torch.tensor([ids])).logits[0]
    for layout in ("saved", "renamed"):
        if layout == "renamed":  # (the names transformers 5 loads it under)
            tensors = load_file(str(tmp_path / "mm" / "model.safetensors"))
            save_file({k.replace("language_model.model.", "model.language_model."): v for k, v in tensors.items()},
                      str(tmp_path / "mm" / "model.safetensors"))
        loaded = load_model(tmp_path / "mm")
        assert loaded.config == hf.config, layout
        err, span = _logit_error(loaded, fam["model"], ids)
        assert err < 2e-5 * span, f"{layout} (seed {fam['seed']}): max |diff| {err:.3e} vs logit range {span:.2f}"
        ours = build_model(loaded, "cpu", torch.float32)
        ours.setup_cache(1, len(ids), torch.float32)
        with torch.no_grad():
            err = float((ours(torch.tensor([ids]), torch.arange(len(ids)))[0] - theirs).abs().max())
        assert err < 2e-5 * span, f"{layout}: against the multimodal model's text logits: {err:.3e}"


def test_mistral3_multimodal_reads_as_its_text_model(base_tokenizer, tmp_path):
    """A Mistral Small 3.x checkpoint (Mistral3ForConditionalGeneration: text_config, a Pixtral vision tower and
    projector beside the text model, which are not read) reads as its text model, a Mistral, under either name set
    (language_model.model.* and language_model.lm_head.weight as the published checkpoints hold it,
    model.language_model.* and lm_head.weight as transformers 5 loads it): the Mistral's config, and logits within
    float32 rounding of the multimodal model's on text alone."""
    import transformers
    from safetensors.torch import load_file, save_file

    fam = build_family("mistral", FAMILIES["mistral"], base_tokenizer, tmp_path / "text")
    ids = _ids(PROMPT_LEN, fam["model"].config.vocab_size, fam["seed"])
    vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, head_dim=16, image_size=28, patch_size=14)
    config = transformers.Mistral3Config(text_config=fam["model"].config.to_dict(), vision_config=vision.to_dict(),
                                         tie_word_embeddings=False)  # (the published models hold their own head)
    mm = transformers.Mistral3ForConditionalGeneration(config).eval()
    mm.model.language_model.load_state_dict(fam["model"].model.state_dict())
    mm.lm_head.load_state_dict(fam["model"].lm_head.state_dict())
    mm.save_pretrained(str(tmp_path / "mm"))
    fam["tok"].save_pretrained(str(tmp_path / "mm"))
    assert json.loads((tmp_path / "mm" / "config.json").read_text())["model_type"] == "mistral3"
    with torch.no_grad():
        theirs = mm(input_ids=torch.tensor([ids])).logits[0]
    text = load_model(fam["hf"])
    tensors = load_file(str(tmp_path / "mm" / "model.safetensors"))
    names = {"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head."}  # published: 5's

    def renamed(prefixes: dict) -> dict:
        return {next((new + k[len(old):] for old, new in prefixes.items() if k.startswith(old)), k): v
                for k, v in tensors.items()}

    published = renamed({new: old for old, new in names.items()})  # (whichever way transformers saved them)
    tensors = published
    later = renamed(names)
    assert "language_model.lm_head.weight" in published and "lm_head.weight" in later
    assert any(k.startswith("vision_tower.") for k in later)
    assert any(k.startswith("model.language_model.") for k in later)
    for layout, named in (("published", published), ("transformers 5", later)):
        save_file(named, str(tmp_path / "mm" / "model.safetensors"))
        loaded = load_model(tmp_path / "mm")
        assert loaded.config == text.config, layout
        ours = build_model(loaded, "cpu", torch.float32)
        ours.setup_cache(1, len(ids), torch.float32)
        with torch.no_grad():
            got = ours(torch.tensor([ids]), torch.arange(len(ids)))[0]
        span = float(theirs.max() - theirs.min())
        err = float((got - theirs).abs().max())
        assert err < 2e-5 * span, f"{layout} (seed {fam['seed']}): max |diff| {err:.3e} vs logit range {span:.2f}"
    # the published configs leave bos and eos out of text_config (they equal MistralConfig's): its defaults, as
    # transformers reads them
    cfg = json.loads((tmp_path / "mm" / "config.json").read_text())
    for d in (cfg, cfg["text_config"]):
        d.pop("bos_token_id", None), d.pop("eos_token_id", None)
    (tmp_path / "mm" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "mm" / "generation_config.json").unlink(missing_ok=True)
    defaults = transformers.MistralConfig()
    loaded = load_model(tmp_path / "mm")
    assert (loaded.config.bos_id, loaded.config.eos_ids) == (defaults.bos_token_id, (defaults.eos_token_id,))


@pytest.mark.parametrize("extra", [
    {}, {"sliding_window_pattern": 3}, {"layer_types": ["full_attention", "sliding_attention"] * 4},
    {"rope_scaling": {"rope_type": "linear", "factor": 8.0}, "rope_theta": 1e6, "rope_local_base_freq": 1e4},
    {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 5e5},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 2e4}}}])
def test_gemma3_configs_read_as_transformers_reads_them(extra):
    """A gemma3_text config.json with its defaults left out (as the published text_configs do), an older
    sliding_window_pattern, explicit layer_types, the older rope keys (4B+: linear scaling of the full layers) and
    transformers 5's rope_parameters a layer type: the sliding layers, window, bases, scaling and scale that
    Gemma3TextConfig takes from it."""
    from transformers import Gemma3TextConfig

    from spqt.sources import _gemma3_config, _gemma_query_scale, _hf_config

    cfg = {"model_type": "gemma3_text", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 8, "head_dim": 16, **extra}
    theirs = Gemma3TextConfig.from_dict(json.loads(json.dumps(cfg)))
    full = _gemma3_config(cfg)
    ours = _hf_config(full, "gemma3_text", tie=True)
    sliding = tuple(i for i, t in enumerate(theirs.layer_types) if t == "sliding_attention")
    assert (ours.sliding_layers, ours.sliding_window) == (sliding, theirs.sliding_window)
    rope = theirs.rope_parameters
    assert ours.rope_theta == rope["full_attention"]["rope_theta"]
    assert ours.rope_local_theta == rope["sliding_attention"]["rope_theta"]
    factor = rope["full_attention"].get("factor", 1.0)
    assert ours.rope_freq_factors == (None if factor == 1.0 else (factor,) * 8)
    assert (ours.n_heads, ours.n_kv_heads, ours.norm_eps, ours.max_seq_len) == (
        theirs.num_attention_heads, theirs.num_key_value_heads, theirs.rms_norm_eps, theirs.max_position_embeddings)
    assert _gemma_query_scale(full) == math.sqrt(16 / theirs.query_pre_attn_scalar)
    assert ours.family == "gemma3" and ours.embed_scale == 8.0


@pytest.mark.parametrize("family", ["gemma3"], indirect=True)
def test_gemma3_gguf_with_soft_capping_is_refused(family, tmp_path, capsys):
    """A gemma3 GGUF that says final logit soft-capping (Gemma 2's; llama.cpp's converter writes the key where a
    config has it): one error line."""
    path = _gguf_with(family["gguf"], tmp_path / "m.gguf", {"gemma3.final_logit_softcapping": 30.0})
    _expect_error(capsys, ["quantize", str(path), "-o", str(tmp_path / "o.spqt")],
                  "gemma3 with final logit soft-capping is not supported")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


@pytest.mark.parametrize("family", ["gemma3", "gemma2", "olmo2", "olmo3", "glm4", "exaone4", "ernie4_5", "seed_oss"],
                         indirect=True)
def test_calibration_runs_each_block_as_the_forward_does(family, quantized):
    """Calibration's block passes (calibrate._dense_block_inputs: the inputs the forward gave each layer, then each
    block run alone on its own mask) over Gemma 3's, Gemma 2's, OLMo 2's and Olmo 3's 40-token windows: block i's output
    is block i + 1's input, bit for bit (the sliding layers' windows cut: run under the causal mask alone, a sliding
    layer's output differs; Gemma 2's capped attention takes calibration's bool masks as the forward's additive
    ones)."""
    from spqt.calibrate import _dense_block_inputs

    model = Generator(load_spqt(quantized["hf"]), "cpu", max_len=48).model
    windows = torch.tensor([_ids(40, model.config.vocab_size, seed=family["seed"] + s) for s in (6, 7)])
    with torch.inference_mode():
        inputs, positions, masks = _dense_block_inputs(model, windows, "cpu")
        for i in range(model.config.n_layers - 1):
            out = model.layers[i](inputs[i], model.rope_for(i), positions, masks[i])
            assert torch.equal(out, inputs[i + 1]), i
        if model.config.sliding_layers:  # (OLMo 2 has no window: its blocks without input norms are the point)
            unwindowed = model.layers[0](inputs[0], model.rope_for(0), positions, masks[-1])
            assert not torch.allclose(unwindowed, inputs[1])


@pytest.mark.parametrize("family", ["gemma2"], indirect=True)
def test_gemma2_caps_window_and_decode_steps_equal_transformers(family, quantized, monkeypatch):
    """Gemma 2 past its window of 8 with soft-caps that bite: transformers' logits without the attention cap, without
    the logits' cap or without the window each differ (each matters in these 40 tokens); ours equal its capped,
    windowed ones from one prefill and one token at a time through the KV cache (the torch path: its explicit capped
    scores). The CPU's native decode attention (one C call a layer, the cap passed in) runs in every layer and gives
    the torch path's logits within the fp16 rounding of the tied head. The .spqt is format version 7 and reads back the
    same configuration."""
    from spqt.kernels import cpu_native

    ids = _ids(40, family["tok"].vocab_size, seed=family["seed"] + 5)
    with torch.no_grad():
        theirs = family["model"](torch.tensor([ids])).logits[0]
        span = float(theirs.max() - theirs.min())
        for change in ({"attn_logit_softcapping": None}, {"final_logit_softcapping": None}, {"sliding_window": 512}):
            other = _reference(family["model"], **change)(torch.tensor([ids])).logits[0]
            assert float((theirs - other).abs().max()) > 0.05 * span, f"{change} does not matter here"
    spqt = _prefill_and_steps_equal(family, quantized, ids, theirs, span, format_version=7)
    if cpu_native.available():
        pytest.skip(cpu_native.available())
    ref = _stepped_logits(Generator(spqt, "cpu", max_len=48), ids, sparse=False)
    caps, native = [], cpu_native.rope_attention_decode

    def watched(*args):
        caps.append(args[9])
        return native(*args)

    monkeypatch.setattr(cpu_native, "rope_attention_decode", watched)
    got = _stepped_logits(Generator(spqt, "cpu", max_len=48, backend="cpu-native"), ids, sparse=False)
    assert caps == [2.0] * (spqt.config.n_layers * len(ids))  # (the one-token prefill too)
    err = float((got - ref).abs().max())
    assert err <= 2 * 2.0 ** -11 * span, f"seed {family['seed']}: max |diff| {err:.3e}, logit range {span:.2f}"


def test_gemma2_attention_scale_and_gguf_keys(base_tokenizer, tmp_path, capsys):
    """query_pre_attn_scalar 24 with head_dim 16 (folded into wq, Gemma 2 having no q_norm: transformers' logits from
    HF); its GGUF reads as llama.cpp reads it: scores scaled by 1 / sqrt(head_dim), a transformers model with
    query_pre_attn_scalar 16 (the 27B's 46 layers: by 1 / sqrt(dim / heads)). A GGUF without the window or cap keys
    takes llama.cpp's 4,096, 50 and 30; caps of 0 are none; a cap that is not a number is refused in one line."""
    from spqt.sources import _gguf_gemma2

    fam, ids, hf = _attention_scale_folds(FAMILIES["gemma2"], "gemma2-scale", "qkv", base_tokenizer, tmp_path)
    keys = {}
    big = _gguf_gemma2(lambda key, default=None: keys.get(key, default), lambda key, default=None: keys.get(
        f"gemma2.{key}", default), Path("m.gguf"), 46, 4608, 32, 128)
    assert big["query_scale"] == math.sqrt(128 / 144) and big["sliding_layers"] == tuple(range(0, 46, 2))
    assert (big["sliding_window"], big["attn_logit_softcap"], big["final_logit_softcap"]) == (4096, 50.0, 30.0)
    drop = tuple(f"gemma2.{k}" for k in ("attn_logit_softcapping", "final_logit_softcapping",
                                         "attention.sliding_window"))
    bare = load_model(_gguf_with(fam["gguf"], tmp_path / "bare.gguf", {}, drop=drop)).config
    assert (bare.sliding_window, bare.sliding_layers, bare.attn_logit_softcap, bare.final_logit_softcap) == (
        4096, (0, 2), 50.0, 30.0)
    zero = {"gemma2.attn_logit_softcapping": 0.0, "gemma2.final_logit_softcapping": 0.0}
    none = load_model(_gguf_with(fam["gguf"], tmp_path / "zero.gguf", zero)).config
    assert not none.soft_capped and none.sliding_window == 8
    path = _gguf_with(fam["gguf"], tmp_path / "text.gguf", {"gemma2.final_logit_softcapping": "x"})
    capsys.readouterr()  # (the build's progress bars)
    _expect_error(capsys, ["quantize", str(path), "-o", str(tmp_path / "o.spqt")],
                  "GGUF gemma2.final_logit_softcapping is not a number ('x')")


@pytest.mark.parametrize("extra", [
    {},  # (as transformers 4.x wrote the published config.json: rope_theta, no layer_types)
    {"rope_theta": 1e4, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "sliding_window": 4096},
    {"attn_logit_softcapping": None, "final_logit_softcapping": None},
    {"layer_types": ["full_attention", "sliding_attention"] * 4, "sliding_window": 16},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "query_pre_attn_scalar": 24}])
@pytest.mark.parametrize("v4", [False, True])
def test_gemma2_configs_read_as_transformers_reads_them(extra, v4, monkeypatch):
    """A gemma2 config.json with its defaults left out, the released models' keys, caps of null, explicit layer_types
    and transformers 5's rope_parameters: the sliding layers, window, caps, RoPE base and attention scale that
    Gemma2Config takes from it; also where the config class is transformers 4.x's (v4: a dict without rope_parameters,
    and without layer_types unless the config gives them, which the reader fills as 4.x runs the model: every other
    layer sliding from the first)."""
    import transformers

    from spqt.sources import _gemma2_config, _gemma_query_scale, _hf_config

    cfg = {"model_type": "gemma2", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 8, "head_dim": 16, **extra}
    theirs = transformers.Gemma2Config.from_dict(json.loads(json.dumps(cfg)))
    if v4:
        class Gemma2ConfigV4(transformers.Gemma2Config):
            def to_dict(self):  # (4.x's keys: rope_theta and rope_scaling at the top level, layer_types as given)
                d = super().to_dict()
                rope = d.pop("rope_parameters")
                if "layer_types" not in cfg:
                    d.pop("layer_types")
                return {**d, "rope_theta": rope["rope_theta"], "rope_scaling": None}

        monkeypatch.setattr(transformers, "Gemma2Config", Gemma2ConfigV4)
    full = _gemma2_config(cfg)
    ours = _hf_config(full, "gemma2", tie=True)
    sliding = tuple(i for i, t in enumerate(theirs.layer_types) if t == "sliding_attention")
    assert (ours.sliding_layers, ours.sliding_window) == (sliding, theirs.sliding_window)
    assert (ours.attn_logit_softcap, ours.final_logit_softcap) == (
        theirs.attn_logit_softcapping or 0.0, theirs.final_logit_softcapping or 0.0)
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"] and ours.rope_freq_factors is None
    assert (ours.n_heads, ours.n_kv_heads, ours.norm_eps, ours.max_seq_len, ours.tie_embeddings) == (
        theirs.num_attention_heads, theirs.num_key_value_heads, theirs.rms_norm_eps, theirs.max_position_embeddings,
        theirs.tie_word_embeddings)
    assert _gemma_query_scale(full) == math.sqrt(16 / theirs.query_pre_attn_scalar)
    assert (ours.family, ours.embed_scale, ours.post_norms, ours.qk_norm, ours.rope_local_theta) == (
        "gemma2", 8.0, True, False, 0.0)


@pytest.mark.gpu
def test_cuda_path_runs_biases_and_qk_norms(family, quantized):
    """The Triton path with a family's switches (a decode token's bias in the GEMV's epilogue, q/k norms and soft-caps
    in the fused decode attention, windows cut by it, Gemma's gate and post-norms in their fused kernels):
    teacher-forced decode-step logits (single-token GEMVs, CUDA graphs) within 1 % of the logit range of the CPU
    reference, dense and with every input thresholded. Thresholded, an activation within rounding of the threshold may
    land on the other side of it on one device and move every later logit by a few % of the range (seed 841574637,
    gemma2, H100: a median position error of 1.45 % of the range, 4.3e-2 of 2.96; the CPU reference itself moves by a
    1.5 % median, 9.5 % at worst, with its thresholds 0.001 % higher). So both devices run five tables, 0.2 and 0.2
    times 1 +- 0.1 % and 1 +- 0.01 %, and the table where they agree best is held to 1 % at every position: where no
    activation lies within rounding of a table the two decide alike, while a switch left out moves every position at
    every table."""
    loaded = load_spqt(quantized["hf"])
    ids = _ids(32, loaded.config.vocab_size, seed=family["seed"] + 2)
    table = torch.full((loaded.config.n_layers, 4), 0.2)
    logits = {}
    nudges = (1.0, 1.001, 0.999, 1.0001, 0.9999)
    for device in ("cpu", "cuda"):
        gen = Generator(loaded, device, dtype=torch.float32, max_len=64, dense_fallback=False)
        assert device == "cpu" or type(gen.model.layers[0].attention.qkv.impl).__name__ == "TritonLinear"
        for nudge in nudges:  # (thresholds set in place: the captured graphs read them)
            gen.set_sparsity(0.5, table=table * nudge)
            for sparse in (False, True) if nudge == 1.0 else (True,):
                logits[device, nudge, sparse] = _stepped_logits(gen, ids, sparse)
    span = float(logits["cpu", 1.0, False].max() - logits["cpu", 1.0, False].min())
    err = float((logits["cpu", 1.0, False] - logits["cuda", 1.0, False]).abs().max())
    assert err < 0.01 * span, f"dense (seed {family['seed']}): max |diff| {err:.3e} vs range {span:.2f}"
    errors = {f: float((logits["cpu", f, True] - logits["cuda", f, True]).abs().max()) for f in nudges}
    assert min(errors.values()) < 0.01 * span, (f"sparse (seed {family['seed']}): max |diff| at each table "
                                                f"{[f'{e:.3e}' for e in errors.values()]} vs range {span:.2f}")
    for sparsity in (0.0, 0.5):
        graph = Generator(loaded, "cuda", max_len=64, dense_fallback=False)
        eager = Generator(loaded, "cuda", max_len=64, dense_fallback=False)
        eager.use_graph = False
        for g in (graph, eager):
            g.set_sparsity(sparsity, table=table if sparsity else None)
        a = graph.generate(ids[:8], 24, track=False).tokens
        assert a == eager.generate(ids[:8], 24, track=False).tokens, f"sparsity {sparsity}"


def _expect_error(capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spqt: error:") and fragment in err[0], err


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe", "mixtral", "qwen2_vl", "mllama", "granitemoe",
                                        "granitemoeshared", "granitemoehybrid", "gemma", "gemma3n", "gemma3n_text",
                                        "olmo", "olmoe", "chatglm", "glm", "glm4_moe", "glm4v", "exaone_moe",
                                        "exaone4_5", "ernie4_5_moe", "ernie4_5_vl_moe"])
def test_unsupported_hf_families_are_refused(tmp_path, capsys, model_type):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    _expect_error(capsys, ["quantize", str(folder), "-o", str(tmp_path / "o.spqt")], f"unsupported architecture '{model_type}'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


OLMO3 = {"model_type": "olmo3", "eos_token_id": 2}
EXAONE4 = {"model_type": "exaone4", "eos_token_id": 2}


@pytest.mark.parametrize("change, fragment", [
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e6, "factor": 4.0}}, "rope scaling 'longrope'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope scaling 'dynamic'"),
    ({"rope_scaling": {"type": "linear", "factor": -2.0}}, "factor -2.0 is not a positive number"),
    ({"rope_scaling": {"type": "yarn", "factor": 0.5}}, "yarn rope scaling needs a factor of at least 1"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": "x"}}, "unusable config"),
    ({"hidden_act": "gelu"}, "activation 'gelu'"),
    ({"num_attention_heads": None}, "unusable config"),
    # Phi-3's longrope ("su" and "yarn": transformers' older names of it for Phi-3) with unusable factors; Phi-4-mini
    ({"model_type": "phi3", "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8,
                                             "long_factor": [2.0] * 7}}, "short_factor and long_factor lists of 8"),
    ({"model_type": "phi3", "rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [-2.0] * 8}},
     "short_factor and long_factor lists of 8 positive"),
    ({"model_type": "phi3", "rope_scaling": {"type": "yarn", "factor": 4.0}}, "short_factor and long_factor lists"),
    # partial RoPE (Phi-4-mini's runs): an odd count of rotated dimensions (7 of 16), a factor outside (0, 1],
    # another family's (transformers rotates their whole heads)
    ({"model_type": "phi3", "partial_rotary_factor": 0.45}, "partial RoPE of 7 of 16 head dimensions"),
    ({"model_type": "phi3", "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                "partial_rotary_factor": 1.5}}, "partial_rotary_factor must be a "),
    ({"model_type": "qwen2", "partial_rotary_factor": 0.5}, "(partial_rotary_factor 0.5) is supported for phi3"),
    ({"model_type": "phi3", "sliding_window": math.inf}, "sliding_window must be a positive integer, got inf"),
    ({"model_type": "mistral", "sliding_window": 0}, "sliding_window must be a positive integer, got 0"),
    ({"model_type": "qwen2", "use_sliding_window": True, "max_window_layers": None},
     "config refuses it"),  # (huggingface_hub's strict validation: no ValueError, over two lines)
    ({"model_type": "smollm3", "no_rope_layers": [1]}, "no_rope_layers must list a 1 (RoPE) or 0 (none)"),
    ({"model_type": "smollm3", "no_rope_layers": [1, 2]}, "no_rope_layers must list a 1 (RoPE) or 0 (none)"),
    ({"model_type": "smollm3", "no_rope_layer_interval": 0}, "no_rope_layer_interval must be a positive integer"),
    ({"model_type": "granite", "residual_multiplier": 0}, "residual_multiplier must be a positive number, got 0"),
    ({"model_type": "granite", "logits_scaling": None}, "logits_scaling must be a positive number, got None"),
    ({"model_type": "granite", "embedding_multiplier": 1e39}, "embedding_multiplier 1e+39 lies outside float32's"),
    ({"model_type": "granite", "embedding_multiplier": 1e-30, "logits_scaling": 1e-20},
     "scale weights by factors float32 cannot hold"),
    # Gemma 3 with what it does not run: Gemma 2's soft-capping, EmbeddingGemma's bidirectional attention, another
    # activation, scaled RoPE in its sliding layers; a multimodal config without its text model's
    ({"model_type": "gemma3_text", "final_logit_softcapping": 30.0}, "final_logit_softcapping 30.0 is not supported"),
    ({"model_type": "gemma3_text", "attn_logit_softcapping": 50.0}, "attn_logit_softcapping 50.0 is not supported"),
    ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, "bidirectional attention"),
    ({"model_type": "gemma3_text", "hidden_activation": "gelu"}, "activation 'gelu' is not supported"),
    ({"model_type": "gemma3_text", "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}},
     "rope scaling 'linear' of the sliding layers is not supported"),
    ({"model_type": "gemma3_text", "query_pre_attn_scalar": -1}, "query_pre_attn_scalar must be a positive number"),
    ({"model_type": "gemma3_text", "layer_types": ["full_attention", "chunked_attention"]}, "unusable config"),
    ({"model_type": "gemma3_text", "query_pre_attn_scalar": "x"}, "Gemma3TextConfig refuses it"),  # (over lines)
    ({"model_type": "gemma3"}, "a gemma3 (multimodal) config without a text_config object"),
    # Mistral 3 whose text model is not a Mistral (Ministral 3: its own attention scaling)
    ({"model_type": "mistral3", "text_config": {"model_type": "ministral3"}},
     "a mistral3 checkpoint whose text model is 'ministral3' is not supported (mistral is)"),
    # Gemma 2 with what it does not run, or unusable values
    ({"model_type": "gemma2", "use_bidirectional_attention": True}, "bidirectional attention"),
    ({"model_type": "gemma2", "hidden_activation": "gelu"}, "activation 'gelu' is not supported (gelu_pytorch_tanh "
                                                              "is, for gemma2)"),
    ({"model_type": "gemma2", "attn_logit_softcapping": -50.0}, "attn_logit_softcap must be a non-negative number"),
    ({"model_type": "gemma2", "final_logit_softcapping": "x"}, "Gemma2Config refuses it"),
    ({"model_type": "gemma2", "query_pre_attn_scalar": 0}, "query_pre_attn_scalar must be a positive number"),
    ({"model_type": "gemma2", "sliding_window": None}, "sliding_window must be a positive integer, got None"),
    # GLM-4 rotating an odd count (Glm4Config's head_dim is 128 where the file gives none: 0.45 of it, 57)
    ({"model_type": "glm4", "partial_rotary_factor": 0.45, "pad_token_id": None, "eos_token_id": 1},
     "partial RoPE of 57 of 128 head dimensions"),
    # Olmo 3 where transformers 4.x and 5 read it differently (a top-level base other than 500,000 alone, YaRN's
    # truncate off), a rope_parameters block not given a layer type (transformers 5 reads none of it), scaled sliding
    # layers, a scaling we do not run (an eos inside the vocabulary: transformers would warn of Olmo3Config's 50,279)
    ({**OLMO3, "rope_theta": 1e6}, "rope_theta 1000000.0 without a rope_theta of the sliding layers'"),
    ({**OLMO3, "max_position_embeddings": 256, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "truncate": False}},
     "yarn rope scaling with truncate false is not supported for olmo3"),
    ({**OLMO3, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
     "rope_parameters must hold a block a layer type (full_attention, sliding_attention)"),
    ({**OLMO3, "rope_parameters": {"full_attention": {"rope_type": "default"},
                                   "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     "rope scaling 'linear' of the sliding layers is not supported"),
    ({**OLMO3, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope scaling 'dynamic' is not"),
    # EXAONE 4.0 where transformers' Exaone4Config derives no layer_types (a pattern string or no window, and no
    # list), sliding layers without a window, a scaling we do not run
    ({**EXAONE4, "sliding_window_pattern": "LLLG"}, "Exaone4Config refuses it"),
    ({**EXAONE4, "sliding_window": None}, "Exaone4Config refuses it"),
    ({**EXAONE4, "sliding_window": None, "layer_types": ["sliding_attention", "full_attention"]},
     "sliding_attention layers without a sliding_window are not supported for exaone4"),
    ({**EXAONE4, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope scaling 'dynamic' is not"),
    # EXAONE 3.5 with another activation under its own key name
    ({"model_type": "exaone", "activation_function": "gelu", "eos_token_id": 2}, "activation 'gelu' is not supported"),
])
def test_unusable_hf_configs_are_refused(tmp_path, capsys, change, fragment):
    from safetensors.torch import save_file

    folder = tmp_path / "m"
    folder.mkdir()
    cfg = {"model_type": "qwen2", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, **change}
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({"model.embed_tokens.weight": torch.zeros(320, 64)}, str(folder / "model.safetensors"))
    _expect_error(capsys, ["quantize", str(folder), "-o", str(tmp_path / "o.spqt")], fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("arch", ["llama", "qwen3moe", "gemma", "gemma3n", "granitemoe", "granitehybrid", "olmo",
                                  "olmoe", "chatglm", "glm4moe", "exaone-moe", "ernie4_5-moe"])
def test_unsupported_gguf_families_are_refused(tmp_path, capsys, arch):
    """A Mixtral-style GGUF says `llama` and declares experts; other archs are refused by name."""
    import gguf

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_expert_count(8)
    w.add_tensor("token_embd.weight", np.zeros((50, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    fragment = "mixture-of-experts" if arch == "llama" else f"unsupported architecture '{arch}'"
    _expect_error(capsys, ["quantize", str(path), "-o", str(tmp_path / "o.spqt")], fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_phi3_fused_matrix_of_the_wrong_shape_is_refused(tmp_path, capsys):
    """A qkv_proj whose k and v hold one head each where num_key_value_heads says two: the error names the fused
    tensor and the shape the configuration implies, before any weight is read."""
    from safetensors.torch import save_file

    folder = tmp_path / "m"
    folder.mkdir()
    cfg = {"model_type": "phi3", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}
    (folder / "config.json").write_text(json.dumps(cfg))
    layer = {"input_layernorm.weight": (64,), "post_attention_layernorm.weight": (64,),
             "self_attn.qkv_proj.weight": (64 + 2 * 16, 64), "self_attn.o_proj.weight": (64, 64),
             "mlp.gate_up_proj.weight": (256, 64), "mlp.down_proj.weight": (64, 128)}
    shapes = {"model.embed_tokens.weight": (320, 64), "model.norm.weight": (64,), "lm_head.weight": (320, 64)}
    shapes |= {f"model.layers.0.{k}": v for k, v in layer.items()}
    save_file({k: torch.zeros(v) for k, v in shapes.items()}, str(folder / "model.safetensors"))
    _expect_error(capsys, ["quantize", str(folder), "-o", str(tmp_path / "o.spqt")],
                  "tensor model.layers.0.self_attn.qkv_proj.weight has shape (96, 64), the configuration implies "
                  "(128, 64)")


@pytest.mark.parametrize("case", ["longrope", "odd", "partial-llama", "partial-longrope"])
def test_unusable_phi3_ggufs_are_refused(tmp_path, capsys, case):
    """longrope's factor tensors (as llama.cpp's converter writes Phi-3 128k / Phi-3.5) with a factor missing; partial
    RoPE (rope.dimension_count below the head dimension) of an odd count, in another family, or with longrope's
    factors for the whole head (Phi-4-mini's are for the rotated dimensions: 48 of 64)."""
    import gguf

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama" if case == "partial-llama" else "phi3")
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_head_count(4)
    w.add_rope_dimension_count({"longrope": 8, "odd": 7}.get(case, 6))
    w.add_tensor("token_embd.weight", np.zeros((50, 32), dtype=np.float32))
    if case in ("longrope", "partial-longrope"):
        w.add_tensor("rope_factors_long.weight", np.full(3 if case == "longrope" else 4, 2.0, dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.ones(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    fragment = {"longrope": "rope_factors_long.weight holds 3 values, expected 4 positive ones",
                "odd": "partial RoPE (7 of 8 head dimensions) is not supported (for phi3 and glm4 an even number",
                "partial-llama": "partial RoPE (6 of 8 head dimensions) is not supported",
                "partial-longrope": "rope_factors_short.weight holds 4 values, expected 3 positive ones"}[case]
    _expect_error(capsys, ["quantize", str(path), "-o", str(tmp_path / "o.spqt")], fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_format_1_files_still_load(tiny_spqt, tmp_path):
    """A .spqt written before the family switches (format 1, no such config keys) reads as a plain
    Llama-family model."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tiny_spqt), framework="pt") as st:
        meta = json.loads(st.metadata()["spqt"])
        tensors = {k: st.get_tensor(k) for k in st.keys()}
    meta["format_version"] = 1
    for key in ("family", "rope_freq_factors", "linear_biases", "qk_norm", "nope_layers", "pre_norms", "qk_norm_scope"):
        del meta["config"][key]
    old = tmp_path / "old.spqt"
    save_file(tensors, str(old), metadata={"spqt": json.dumps(meta)})
    a, b = load_spqt(tiny_spqt), load_spqt(old)
    assert b.config == a.config and b.config.linear_biases == () and not b.config.qk_norm and not b.config.nope_layers
    assert (b.config.pre_norms, b.config.qk_norm_scope) == (True, "head")  # (keys OLMo 2 added later)
    assert Generator(b, "cpu", max_len=32).generate([3, 5, 7], 8).tokens == Generator(a, "cpu", max_len=32).generate([3, 5, 7], 8).tokens


@pytest.mark.parametrize("family", ["olmo2", "olmo3", "glm4", "exaone4", "ernie4_5", "seed_oss"], indirect=True)
def test_new_family_decode_steps_on_every_cpu_path(family, quantized):
    """OLMo 2 (no norm before the maps, q and k each normed over all of its heads), Olmo 3 (the same, three layers of
    four through a window of 8 with plain RoPE, the fourth YaRN-scaled), GLM-4 (four norms a layer, q|k|v biases,
    partial RoPE in interleaved pairs), EXAONE 4.0 (OLMo 2's norms with per-head q/k norms, three layers of four
    through a window of 8, the fourth unrotated), ERNIE 4.5 (Llama's norms, biases on all seven maps, whole heads
    rotated in interleaved pairs) and Seed-OSS (biases on all seven maps, half-split RoPE) one token at a time: its HF
    folder equals transformers' logits in one prefill and through the KV cache (40 tokens: the windows cut); its .spqt
    is format 9 (GLM-4: 8, ERNIE 4.5: 2, Seed-OSS: 3, its untied head quantized; an older spqt that reads 9 runs
    Olmo 3's and EXAONE 4.0's switches too: none is new) and reads back the same configuration. The .spqt's
    teacher-forced decode-step logits on the CPU's native maps (C GEMV and C decode attention on the q|k|v the torch
    norms gave, masked by the window) equal the torch reference's within the fp16 rounding of the native path; the fp16
    GEMV's (W, x, W x in fp16) within a few fp16 roundings; OLMo 2's and GLM-4's Triton maps' (the interpreter: OLMo 2's
    maps without a norm read x) the reference's within float32 rounding, a prefill and a sparse step."""
    from spqt.generate import set_sparse
    from spqt.kernels import cpu_native

    ids = _ids(40, family["tok"].vocab_size, seed=family["seed"] + 5)
    with torch.no_grad():
        theirs = family["model"](torch.tensor([ids])).logits[0]
    span = float(theirs.max() - theirs.min())
    spqt = _prefill_and_steps_equal(family, quantized, ids, theirs, span,
                                    format_version={"olmo2": 9, "olmo3": 9, "glm4": 8, "exaone4": 9,
                                                    "ernie4_5": 2, "seed_oss": 3}[family["name"]])
    short = ids[:12]
    ref = _stepped_logits(Generator(spqt, "cpu", max_len=16), short, sparse=False)
    span = float(ref.max() - ref.min())
    if not cpu_native.available():  # (available() says why not, or nothing)
        got = _stepped_logits(Generator(spqt, "cpu", max_len=16, backend="cpu-native"), short, sparse=False)
        err = float((got - ref).abs().max())
        assert err <= 2 * 2.0 ** -11 * span, f"native, seed {family['seed']}: max |diff| {err:.3e} of {span:.2f}"
    got = _stepped_logits(Generator(spqt, "cpu", max_len=16, backend="cpu-fp16"), short, sparse=False)
    err = float((got - ref).abs().max())  # measured 5e-4 of the range (seed 0)
    assert err <= 8 * 2.0 ** -11 * span, f"fp16 GEMV, seed {family['seed']}: max |diff| {err:.3e} of {span:.2f}"
    if family["name"] in ("olmo3", "exaone4", "ernie4_5", "seed_oss"):  # (their Triton maps are OLMo 2's or
        return  # GLM-4's: windows, tables, per-head norms and o / MLP biases are torch's, shared with the reference's
        # run: 9 s saved)
    # the interpreter takes 3 s a step: a 2-token prefill (dense), then one step with every input thresholded at 0.2
    # (the one-token sparse kernels of q|k|v and gate|up without a norm)
    logits = {}
    for backend in ("reference", "triton"):
        gen = Generator(spqt, "cpu", dtype=torch.float32, max_len=4, backend=backend, dense_fallback=False)
        gen.set_sparsity(0.5, table=torch.full((spqt.config.n_layers, 4), 0.2))
        model, steps = gen.model, []
        with torch.inference_mode():
            model.setup_cache(1, 4, torch.float32)
            for pos, sparse in ((None, False), (2, True)):
                set_sparse(model, sparse)
                tokens, positions = ([short[:2]], torch.arange(2)) if pos is None else ([[short[pos]]], torch.tensor([pos]))
                # (clone: the Triton maps reuse their output buffers)
                steps.append(model(torch.tensor(tokens), positions, kv_len=int(positions[-1]) + 1)[0].clone())
        logits[backend] = torch.cat(steps)
    err = (logits["triton"] - logits["reference"]).abs().amax(-1)
    assert float(err.max()) < 2e-5 * span, f"interpreter, seed {family['seed']}: max |diff| per position {err}"


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["olmo2", "olmo3"], indirect=True)
def test_olmo_decode_attention_stays_fused_on_cuda(family, quantized, monkeypatch):
    """A CUDA decode token's attention in OLMo 2 and Olmo 3 (its sliding layers' too: a window with the whole-q/k norms)
    is the fused kernels' (functional.decode_attention_fused), handed the q/k norms over all of q and all of k to run as
    they load (no norm launches before it)."""
    from spqt.kernels import fused

    calls, real = [], fused.rope_attention_decode

    def watched(*args):
        calls.append(args[9])  # (functional.attention passes qk_norm tenth)
        return real(*args)

    monkeypatch.setattr(fused, "rope_attention_decode", watched)
    gen = Generator(load_spqt(quantized["hf"]), "cuda", max_len=64)
    gen.use_graph = False  # (a graph would call it while capturing alone)
    gen.generate(_ids(8, gen.loaded.config.vocab_size, seed=family["seed"]), 4, track=False)
    c = gen.loaded.config
    sizes = [None if norms is None else (norms[0].numel(), norms[1].numel()) for norms in calls]
    assert calls and all(size == (c.q_dim, c.kv_dim) for size in sizes), sizes


@pytest.mark.parametrize("family, case", [("olmo2", "no k_norm"), ("olmo3", "pattern"), ("olmo3", "swa base"),
                                          ("olmo3", "rope_freqs"), ("olmo3", "factor without yarn"),
                                          ("olmo3", "factors disagree")],
                         indirect=["family"])
def test_unusable_olmo_checkpoints_are_refused(family, tmp_path, capsys, case):
    """An olmo2 folder whose layers lack their k_norm (OLMo 2 has one, over all of k); an olmo2 GGUF with a window
    (Olmo 3) whose sliding_window_pattern is not llama.cpp's (every fourth layer full), whose sliding layers have a RoPE
    base of their own (rope.freq_base_swa), with rope_freqs divisors (llama.cpp's olmo2 runs neither) or with an
    attention factor but no YaRN, or with two attention factors that disagree: one error line."""
    path = tmp_path / "m"
    if case == "no k_norm":
        _folder_without(family["hf"], path, "k_norm")
    else:
        keys = {"pattern": {"olmo2.attention.sliding_window_pattern": [True, False] * 2},
                "swa base": {"olmo2.rope.freq_base_swa": 1e4},
                "factor without yarn": {"olmo2.rope.scaling.type": "none", "olmo2.rope.scaling.attn_factor": 1.2},
                "factors disagree": {"olmo2.rope.scaling.attn_factor": 1.2,
                                     "olmo2.rope.scaling.yarn_attn_factor": 1.3},
                }.get(case, {})
        _gguf_with(family["gguf"], path, keys, {"rope_freqs.weight": np.ones(8, np.float32)} if case == "rope_freqs"
                   else None)
    fragment = {"no k_norm": "checkpoint lacks tensors model.layers.0.self_attn.k_norm.weight",
                "pattern": "GGUF olmo2.attention.sliding_window_pattern other than every 4th layer in full is not "
                           "supported",
                "swa base": "GGUF olmo2.rope.freq_base_swa 10000 other than rope.freq_base 500000 is not supported",
                "rope_freqs": "an olmo2 GGUF with rope_freqs.weight is not supported",
                "factor without yarn": "GGUF olmo2.rope.scaling.attn_factor 1.2 without YaRN scaling is not supported",
                "factors disagree": "GGUF olmo2.rope.scaling.attn_factor 1.2 and yarn_attn_factor 1.3 disagree",
                }[case]
    _expect_error(capsys, ["quantize", str(path), "-o", str(tmp_path / "o.spqt")], fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_config_class_transformers_lacks_names_the_version_that_reads_it():
    """A family whose config class this transformers lacks (the pin admits 4.51; Glm4Config came in 4.51.3, Olmo3Config
    in 4.57): a ValueError, which the HF reader turns into one error line, naming the version that reads it."""
    import transformers

    from spqt.sources import _config_class

    assert _config_class("Glm4Config", "4.51.3", "glm4") is transformers.Glm4Config
    with pytest.raises(ValueError, match=r"transformers \S+ has no NoSuchConfig \(9\.9 or later reads nosuch\)"):
        _config_class("NoSuchConfig", "9.9", "nosuch")


@pytest.mark.parametrize("family", ["glm4"], indirect=True)
@pytest.mark.parametrize("case", ["mrope sections", "nextn layers"])
def test_unusable_glm4_ggufs_are_refused(family, tmp_path, capsys, case):
    """A glm4 GGUF as llama.cpp's converter writes GLM-4.1V's text model (rope.dimension_sections: M-RoPE, q/k rows
    permuted for NEOX) or GLM-OCR's (nextn_predict_layers: a prediction layer after the others): one error line."""
    keys = {"mrope sections": {"glm4.rope.dimension_sections": [4, 2, 2, 0]},
            "nextn layers": {"glm4.nextn_predict_layers": 1.0}}[case]
    path = _gguf_with(family["gguf"], tmp_path / "m", keys)
    fragment = {"mrope sections": "a glm4 GGUF with M-RoPE sections (GLM-4.1V's text model) is not supported",
                "nextn layers": "a glm4 GGUF with NextN prediction layers (GLM-OCR) is not supported"}[case]
    _expect_error(capsys, ["quantize", str(path), "-o", str(tmp_path / "o.spqt")], fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("family", ["exaone4"], indirect=True)
@pytest.mark.parametrize("case", ["pattern", "swa base", "nextn layers", "no k_norm"])
def test_unusable_exaone4_checkpoints_are_refused(family, tmp_path, capsys, case):
    """An exaone4 GGUF whose sliding_window_pattern does not flag each layer, whose sliding layers have a RoPE base of
    their own (rope.freq_base_swa: EXAONE 4.0 rotates them by the model's table), or with NextN prediction layers after
    the others (EXAONE 4.5's text model, as llama.cpp's converter writes it); an exaone4 folder whose layers lack their
    k_norm: one error line."""
    path = tmp_path / "m"
    if case == "no k_norm":
        _folder_without(family["hf"], path, "k_norm")
    else:
        keys = {"pattern": {"exaone4.attention.sliding_window_pattern": [True, False]},
                "swa base": {"exaone4.rope.freq_base_swa": 1e4},
                "nextn layers": {"exaone4.nextn_predict_layers": 1.0}}[case]
        _gguf_with(family["gguf"], path, keys)
    fragment = {"pattern": "GGUF exaone4.attention.sliding_window_pattern must flag each of the 4 layers",
                "swa base": "GGUF exaone4.rope.freq_base_swa 10000 other than rope.freq_base",
                "nextn layers": "an exaone4 GGUF with NextN prediction layers (EXAONE 4.5's text model) is not",
                "no k_norm": "checkpoint lacks tensors model.layers.0.self_attn.k_norm.weight"}[case]
    _expect_error(capsys, ["quantize", str(path), "-o", str(tmp_path / "o.spqt")], fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("family", ["exaone4"], indirect=True)
def test_exaone4_gguf_without_a_window_or_a_pattern(family, tmp_path):
    """An exaone4 GGUF without sliding_window_pattern reads every fourth layer full (Exaone4Config's default,
    llama.cpp's for the 32B), its window cut and the full layer unrotated: transformers' logits; without a window (the
    converter writes none for the 1.2B, whose sliding_window is null) every layer is full and rotated, as transformers
    runs such a config: its logits, which differ from the windowed model's."""
    import transformers

    ids = _ids(40, family["tok"].vocab_size, seed=family["seed"] + 7)
    no_pattern = load_model(_gguf_with(family["gguf"], tmp_path / "p.gguf", {}, drop=(
        "exaone4.attention.sliding_window_pattern",)))
    assert (no_pattern.config.sliding_layers, no_pattern.config.nope_layers) == ((0, 1, 2), (3,))
    err, span = _logit_error(no_pattern, family["model"], ids)
    assert err < 2e-5 * span, f"seed {family['seed']}: max |diff| {err:.3e} of {span:.2f}"
    config = transformers.Exaone4Config.from_dict({**family["model"].config.to_dict(), "sliding_window": None,
                                                   "layer_types": ["full_attention"] * 4})
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    plain.load_state_dict(family["model"].state_dict())
    drop = ("exaone4.attention.sliding_window", "exaone4.attention.sliding_window_pattern")
    unwindowed = load_model(_gguf_with(family["gguf"], tmp_path / "w.gguf", {}, drop=drop))
    assert (unwindowed.config.sliding_layers, unwindowed.config.nope_layers) == ((), ())
    err, span = _logit_error(unwindowed, plain, ids)
    assert err < 2e-5 * span, f"seed {family['seed']}: max |diff| {err:.3e} of {span:.2f}"
    assert _logit_error(unwindowed, family["model"], ids)[0] > 1e-2 * span  # (the switches matter)
    # a pattern of its own: the layers it flags slide and rotate, as transformers runs those layer_types
    flags = [False, True, True, False]
    config = transformers.Exaone4Config.from_dict({**family["model"].config.to_dict(), "layer_types": [
        "sliding_attention" if flag else "full_attention" for flag in flags]})
    other = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    other.load_state_dict(family["model"].state_dict())
    patterned = load_model(_gguf_with(family["gguf"], tmp_path / "f.gguf",
                                      {"exaone4.attention.sliding_window_pattern": flags}))
    assert (patterned.config.sliding_layers, patterned.config.nope_layers) == ((1, 2), (0, 3))
    err, span = _logit_error(patterned, other, ids)
    assert err < 2e-5 * span, f"seed {family['seed']}: max |diff| {err:.3e} of {span:.2f}"


def test_exaone4_gguf_of_64_layers_without_a_window_key_is_the_32b():
    """A 64-layer exaone4 GGUF without attention.sliding_window runs as llama.cpp runs it, the 32B: a window of 4,096,
    every fourth layer full and unrotated; another layer count without the key has no window (the 1.2B)."""
    from pathlib import Path

    from spqt.sources import _gguf_exaone4

    absent = (lambda key, default=None: default), (lambda key, default: default)
    layers = _gguf_exaone4(*absent, Path("m.gguf"), 64)
    assert layers["sliding_window"] == 4096 and layers["nope_layers"] == tuple(range(3, 64, 4))
    assert layers["sliding_layers"] == tuple(i for i in range(64) if i % 4 != 3)
    assert _gguf_exaone4(*absent, Path("m.gguf"), 30) == {"nope_layers": ()}


@pytest.mark.parametrize("extra", [{}, {"sliding_window_pattern": 2}, {"sliding_window": 64, "layer_types": [
    "sliding_attention", "full_attention", "full_attention", "sliding_attention", "sliding_attention"],
    "sliding_window_pattern": "LFFLL"}, {"sliding_window": None, "sliding_window_pattern": None, "tie_word_embeddings":
    True, "layer_types": ["full_attention"] * 5}, {"rope_scaling": {**LLAMA3_ROPE, "rope_type": "llama3"},
                                                   "rope_theta": 1e6}])
def test_exaone4_configs_read_as_transformers_reads_them(extra):
    """An exaone4 config.json with its defaults left out, another pattern, a layer_types list with a pattern string
    (as the published 32B's), none of a window (as the 1.2B's: every layer full and rotated, a tied head), llama3
    scaling given as the published configs give it: the sliding layers, their window and the unrotated layers
    transformers' Exaone4Attention runs (is_sliding; RoPE where the config has no window or the layer slides), the RoPE
    base and scaling of Exaone4Config."""
    from transformers import Exaone4Config

    from spqt.sources import _class_filled, _hf_config

    cfg = {"model_type": "exaone4", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 5, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
           "eos_token_id": 2, **extra}
    theirs = Exaone4Config.from_dict(json.loads(json.dumps(cfg)))
    ours = _hf_config(_class_filled(Exaone4Config, cfg), "exaone4", tie=False)
    sliding = tuple(i for i, t in enumerate(theirs.layer_types) if t == "sliding_attention")
    rotated = tuple(i for i in range(5) if theirs.sliding_window is None or i in sliding)
    assert (ours.sliding_layers, ours.sliding_window) == (sliding, theirs.sliding_window if sliding else 0)
    assert ours.nope_layers == tuple(i for i in range(5) if i not in rotated)
    assert (ours.rope_theta, ours.tie_embeddings) == (theirs.rope_parameters["rope_theta"], theirs.tie_word_embeddings)
    assert ours.rope_scaling == ({k: float(v) for k, v in LLAMA3_ROPE.items() if k not in ("rope_type", "rope_theta")}
                                 if "rope_scaling" in extra else None)
    assert (ours.pre_norms, ours.post_norms, ours.qk_norm, ours.qk_norm_scope) == (False, True, True, "head")


def test_exaone_configs_read_as_transformers_reads_them():
    """An EXAONE 3.5 config.json under its own key names (num_layers, layer_norm_epsilon, activation_function, as the
    published configs have them) and with its defaults left out (a RoPE base of 500,000, 8 kv heads): what
    ExaoneConfig reads."""
    import transformers

    if not hasattr(transformers, "ExaoneConfig"):  # (as build_family: 5.20.2, the last for Python 3.10, has none)
        pytest.skip(f"transformers {transformers.__version__} has no ExaoneConfig")
    from transformers import ExaoneConfig

    from spqt.sources import _class_filled, _hf_config

    cfg = {"model_type": "exaone", "vocab_size": 320, "hidden_size": 128, "intermediate_size": 128, "num_layers": 3,
           "num_attention_heads": 8, "layer_norm_epsilon": 1e-6, "activation_function": "silu", "eos_token_id": 2}
    theirs = ExaoneConfig.from_dict(dict(cfg))
    ours = _hf_config(_class_filled(ExaoneConfig, cfg), "exaone", tie=False)
    assert (ours.n_layers, ours.norm_eps, ours.n_kv_heads, ours.rope_theta, ours.max_seq_len) == (
        theirs.num_hidden_layers, theirs.rms_norm_eps, theirs.num_key_value_heads, theirs.rope_parameters["rope_theta"],
        theirs.max_position_embeddings) == (3, 1e-6, 8, 500000.0, 4096)


@pytest.mark.parametrize("use_bias", [None, True])
def test_ernie4_5_configs_read_as_transformers_reads_them(use_bias):
    """ERNIE-4.5-0.3B's config.json (its published keys: rope_theta at the top level, use_bias false) with head_dim and
    tie_word_embeddings left out (and use_bias and rope_theta too): what Ernie4_5Config reads (head_dim 128, not
    hidden_size / heads; a tied head; base 500,000), no biases; use_bias true: a bias on each of the seven maps, as
    Ernie4_5Attention and Ernie4_5MLP build them."""
    from transformers import Ernie4_5Config

    from spqt.sources import _class_filled, _hf_config

    cfg = {"model_type": "ernie4_5", "vocab_size": 103424, "hidden_size": 1024, "intermediate_size": 3072,
           "num_hidden_layers": 18, "num_attention_heads": 16, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 131072, "rope_theta": 500000, "use_bias": bool(use_bias), "bos_token_id": 1,
           "eos_token_id": 2, "hidden_act": "silu"}
    if use_bias is None:  # (the keys left out read as the class's defaults: no biases, base 500,000)
        del cfg["use_bias"], cfg["rope_theta"]
    theirs = Ernie4_5Config.from_dict(dict(cfg))
    ours = _hf_config(_class_filled(Ernie4_5Config, cfg), "ernie4_5", tie=True)
    assert (ours.head_dim, ours.tie_embeddings, ours.rope_theta, ours.n_kv_heads, ours.rope_dims) == (
        theirs.head_dim, theirs.tie_word_embeddings, theirs.rope_parameters["rope_theta"], 2, 0) == (
        128, True, 500000, 2, 0)
    assert ours.linear_biases == (("qkv", "o", "gate_up", "down") if use_bias else ())
    assert (ours.family, ours.post_norms, ours.qk_norm) == ("ernie4_5", False, False)


@pytest.mark.parametrize("biases", [{}, {"attention_bias": False, "attention_out_bias": True, "mlp_bias": True}])
def test_seed_oss_configs_read_as_transformers_reads_them(biases):
    """Seed-OSS-36B's shapes (dim 5,120, 80 heads of 128, 8 kv heads, base 1e7) with head_dim and the bias keys left
    out: what SeedOssConfig reads (head_dim 128, not hidden_size / heads = 64; q, k and v biases alone); each bias key
    given alone: attention_bias q|k|v's, attention_out_bias o's, mlp_bias gate|up's and down's, as SeedOssAttention
    and SeedOssMLP build them."""
    from transformers import SeedOssConfig

    from spqt.sources import _class_filled, _hf_config

    cfg = {"model_type": "seed_oss", "vocab_size": 155136, "hidden_size": 5120, "intermediate_size": 27648,
           "num_hidden_layers": 64, "num_attention_heads": 80, "num_key_value_heads": 8, "rms_norm_eps": 1e-6,
           "max_position_embeddings": 524288, "rope_theta": 1e7, "bos_token_id": 0, "eos_token_id": 2,
           "tie_word_embeddings": False, **biases}
    theirs = SeedOssConfig.from_dict(dict(cfg))
    ours = _hf_config(_class_filled(SeedOssConfig, cfg), "seed_oss", tie=False)
    assert (ours.head_dim, ours.rope_theta, ours.n_kv_heads, ours.rope_dims, ours.tie_embeddings) == (
        theirs.head_dim, theirs.rope_parameters["rope_theta"], 8, 0, False) == (128, 1e7, 8, 0, False)
    assert ours.linear_biases == (("o", "gate_up", "down") if biases else ("qkv",))
    assert (ours.family, ours.post_norms, ours.qk_norm, ours.sliding_layers) == ("seed_oss", False, False, ())


@pytest.mark.parametrize("family", ["exaone"], indirect=True)
def test_exaone_folder_under_llama_names_reads_as_llama(family, tmp_path):
    """An exaone folder whose safetensors hold Llama's names (a re-export; transformers' renaming touches only EXAONE's)
    reads them: transformers' logits."""
    import shutil

    from safetensors.torch import load_file, save_file

    from spqt.sources import _HF_EXAONE_NAMES

    folder = tmp_path / "m"
    shutil.copytree(family["hf"], folder)
    weights = load_file(str(folder / "model.safetensors"))
    renamed = {}
    for key, tensor in weights.items():
        for llama, exaone in _HF_EXAONE_NAMES:  # (out_proj before the rest of attn.attention)
            key = key.replace(exaone, llama)
        renamed[key] = tensor
    assert not any(key.startswith("transformer.") for key in renamed)
    save_file(renamed, str(folder / "model.safetensors"))
    ids = _ids(24, family["tok"].vocab_size, seed=family["seed"] + 9)
    err, span = _logit_error(load_model(folder), family["model"], ids)
    assert err < 2e-5 * span, f"seed {family['seed']}: max |diff| {err:.3e} of {span:.2f}"


@pytest.mark.parametrize("family", ["exaone"], indirect=True)
def test_exaone_gguf_with_its_layer_norm_epsilon_key(family, tmp_path):
    """An exaone GGUF whose epsilon is under attention.layer_norm_epsilon (llama.cpp's later converters write EXAONE
    3.5's key so) reads it."""
    path = _gguf_with(family["gguf"], tmp_path / "e.gguf", {"exaone.attention.layer_norm_epsilon": 1e-3},
                      drop=("exaone.attention.layer_norm_rms_epsilon",))
    assert open_source(path).config.norm_eps == pytest.approx(1e-3)


@pytest.mark.parametrize("family", ["olmo3"], indirect=True)
def test_olmo3_rope_per_layer_type_and_its_gguf_keys(family, tmp_path):
    """Olmo 3's switches each matter in 40 tokens: transformers' logits without the window, with YaRN in the sliding
    layers too, or with plain RoPE in the full layer too, each differ from its own, which ours equal from HF and from
    the GGUF (test_float_forward_equals_transformers). An attention_factor of the config's own (1.2) is the full layer's
    factor of cos and sin from HF, and from a GGUF (rope.scaling.attn_factor or yarn_attn_factor, where llama.cpp's
    converters copy it), in place of YaRN's own 1 + 0.1 ln 4, as transformers runs it (llama.cpp multiplies
    attn_factor by YaRN's own); without YaRN such a factor is refused. An olmo2 GGUF with a window of 0 is OLMo 2 to
    llama.cpp: every layer full, YaRN-scaled."""
    import shutil

    ids = _ids(40, family["tok"].vocab_size, seed=family["seed"] + 8)
    plain = {"rope_type": "default", "rope_theta": 5e5}
    with torch.no_grad():
        theirs = family["model"](torch.tensor([ids])).logits[0]
        span = float(theirs.max() - theirs.min())
        for change in ({"sliding_window": 512}, {"rope_parameters": {"full_attention": OLMO3_YARN,
                                                                     "sliding_attention": OLMO3_YARN}},
                       {"rope_parameters": {"full_attention": plain, "sliding_attention": plain}}):
            other = _reference(family["model"], **change)(torch.tensor([ids])).logits[0]
            # (well above the 2e-5 of the range the equalities below allow; 200 seeds' smallest: 0.046)
            assert float((theirs - other).abs().max()) > 1e-3 * span, f"{change} does not matter here"
    folder = tmp_path / "hf"
    shutil.copytree(family["hf"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"]["full_attention"]["attention_factor"] = 1.2
    (folder / "config.json").write_text(json.dumps(cfg))
    ggufs = [_gguf_with(family["gguf"], tmp_path / f"{key}.gguf", {f"olmo2.rope.scaling.{key}": 1.2})
             for key in ("attn_factor", "yarn_attn_factor")]
    reference = _reference(family["model"], rope_parameters={"full_attention": {**OLMO3_YARN, "attention_factor": 1.2},
                                                              "sliding_attention": plain})
    for source in (folder, *ggufs):
        loaded = load_model(source)
        assert loaded.config.rope_attention_factor == pytest.approx(1.2, rel=1e-6), source
        err, span = _logit_error(loaded, reference, ids)
        assert err < 2e-5 * span, f"{source.name} (seed {family['seed']}): max |diff| {err:.3e} vs range {span:.2f}"
    no_window = _gguf_with(family["gguf"], tmp_path / "no-window.gguf", {"olmo2.attention.sliding_window": 0.0})
    loaded = load_model(no_window)
    c = loaded.config
    assert (c.family, c.sliding_layers, c.rope_local_theta) == ("olmo2", (), 0.0)
    err, span = _logit_error(loaded, _reference(family["model"], layer_types=["full_attention"] * 4), ids)
    assert err < 2e-5 * span, f"window 0 (seed {family['seed']}): max |diff| {err:.3e} vs range {span:.2f}"


@pytest.mark.parametrize("extra", [
    {},  # (Olmo3Config's defaults: every fourth layer full, a window of 4,096, base 500,000, no scaling)
    {"rope_theta": 500000, "max_position_embeddings": 65536, "rms_norm_eps": 1e-6, "rope_scaling": {
        "attention_factor": 1.2079441541679836, "beta_fast": 32.0, "beta_slow": 1.0, "factor": 8.0,
        "original_max_position_embeddings": 8192, "rope_type": "yarn"}},  # (Olmo-3-7B's, as published)
    {"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
                                            "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    {"layer_types": ["full_attention", "sliding_attention"] * 4, "sliding_window": 16,
     "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0}}}])
def test_olmo3_configs_read_as_transformers_reads_them(extra):
    """An olmo3 config.json with its defaults left out, Olmo-3-7B's published keys (rope_theta and rope_scaling, YaRN
    with an attention factor), transformers 5's rope_parameters a layer type (another base in each), explicit
    layer_types: the sliding layers and window Olmo3Config takes from it, and the frequencies and the factor of cos and
    sin of each layer type's table that transformers' Olmo3RotaryEmbedding computes (float32) from it, ours in
    float64."""
    from transformers import Olmo3Config
    from transformers.models.olmo3.modeling_olmo3 import Olmo3RotaryEmbedding

    from spqt.model import rope_frequencies
    from spqt.sources import _hf_config, _olmo3_config

    cfg = {"model_type": "olmo3", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "eos_token_id": 2, **extra}
    theirs = Olmo3Config.from_dict(json.loads(json.dumps(cfg)))
    ours = _hf_config(_olmo3_config(cfg), "olmo3", tie=False)
    sliding = tuple(i for i, t in enumerate(theirs.layer_types) if t == "sliding_attention")
    assert (ours.sliding_layers, ours.sliding_window) == (sliding, theirs.sliding_window)
    assert (ours.family, ours.pre_norms, ours.qk_norm_scope, ours.max_seq_len, ours.norm_eps) == (
        "olmo3", False, "all", theirs.max_position_embeddings, theirs.rms_norm_eps)
    tables = Olmo3RotaryEmbedding(theirs)
    for kind, local in (("full_attention", False), ("sliding_attention", True)):
        inv = getattr(tables, f"{kind}_inv_freq").double()
        torch.testing.assert_close(rope_frequencies(ours, local=local), inv, rtol=1e-6, atol=0, msg=kind)
        scale = getattr(tables, f"{kind}_attention_scaling")
        assert (1.0 if local else ours.rope_attention_factor) == pytest.approx(scale, rel=1e-12), kind


@pytest.mark.parametrize("family", ["gemma3", "gemma2", "qwen3", "glm4", "olmo2"], indirect=True)
def test_gemma_runs_in_bf16_where_no_dtype_is_asked(family, quantized, monkeypatch):
    """A run that asks for no dtype (--dtype auto, serve) computes in float32 on the CPU and, on CUDA, in float16, but
    in bfloat16 for Gemma 2 and 3 and GLM-4 (their activations outgrow float16's range) and for the families released
    in bfloat16 whose float16 range is not measured (OLMo 2 and 3, EXAONE 4.0, ERNIE 4.5, Seed-OSS); an asked dtype is
    kept."""
    from spqt.cli import _dtype
    from spqt.generate import BF16_FAMILIES, default_dtype

    assert set(BF16_FAMILIES) == {"gemma2", "gemma3", "glm4", "olmo2", "olmo3", "exaone4", "ernie4_5", "seed_oss"}
    config = load_spqt(quantized["hf"]).config
    bf16 = family["name"] in ("gemma2", "gemma3", "glm4", "olmo2")
    assert default_dtype(config, "cpu") == torch.float32
    assert default_dtype(config, "cuda") == (torch.bfloat16 if bf16 else torch.float16)
    assert _dtype("auto", "cuda") is None and _dtype("fp16", "cuda") == torch.float16
    assert Generator(load_spqt(quantized["hf"]), "cpu", max_len=8).dtype == torch.float32


@pytest.mark.parametrize("family", ["gemma3"], indirect=True)
def test_a_gguf_stops_on_end_of_turn_tokens_found_by_text(family, tmp_path, capsys):
    """A GGUF's generation ends on its eos / eot / eom ids and, as llama.cpp decides, on every token whose text ends a
    turn (Gemma's <end_of_turn>, Phi-3's <|end|>, ...: converters seldom name them in a key): those ids join the
    config's eos_ids after the keys' ones."""
    import gguf

    fields = gguf.GGUFReader(str(family["gguf"])).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert not {"<end_of_turn>", "<|end|>", "<|im_end|>"} & set(tokens)
    before = load_model(family["gguf"]).config.eos_ids
    # two tokens no merge makes or uses take the texts (the vocabulary still builds its BPE)
    pairs = [m.split(" ") for m in fields["tokenizer.ggml.merges"].contents()]
    used = {piece for a, b in pairs for piece in (a, b, a + b)}
    free = [i for i, t in enumerate(tokens) if len(t) > 1 and t not in used and i not in before]
    renamed = list(tokens)
    renamed[free[0]] = "<end_of_turn>"
    path = _gguf_with(family["gguf"], tmp_path / "turns.gguf", {"tokenizer.ggml.tokens": renamed})
    after = load_model(path).config.eos_ids
    assert after == (*before, free[0]), (before, after, free)
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 0
    ends = [line for line in capsys.readouterr().out.splitlines() if line.startswith("end tokens")]
    assert ends and f"{free[0]} <end_of_turn>" in ends[0], ends
    # the texts matched exactly, in a vocabulary of any size (near misses are no stop)
    from spqt.sources import _gguf_end_of_turn_ids

    vocab = [f"t{i}" for i in range(300)]
    for i, text in {7: "<|end|>", 40: "<|im_end|>", 41: "<end_of_turn", 42: "<|END|>", 299: "<|eot_id|>",
                    100: "<|endoftext|>x"}.items():
        vocab[i] = text
    w = gguf.GGUFWriter(str(tmp_path / "vocab.gguf"), "llama")
    w.add_token_list(vocab)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    reader = gguf.GGUFReader(str(tmp_path / "vocab.gguf"))
    assert _gguf_end_of_turn_ids(reader, tmp_path / "vocab.gguf") == [7, 40, 299]


@pytest.mark.parametrize("pattern_only", [False, True])
def test_gemma3_config_of_transformers_4_reads_as_of_5(pattern_only):
    """transformers 4.x's Gemma3TextConfig dict (the pin admits 4.51) keeps the full layers' rope_theta and
    rope_scaling and the sliding layers' rope_local_base_freq apart, and 4.51-4.53 give no layer_types: read through
    _gemma3_v4_keys, it yields the switches and rope block that transformers 5's dict of the same model yields (a 4B:
    linear scaling 8 of the full layers, its local base)."""
    from spqt.sources import _gemma3_config, _gemma3_switches, _gemma3_v4_keys

    cfg = {"model_type": "gemma3_text", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 8, "head_dim": 16, "sliding_window": 16, "sliding_window_pattern": 3,
           "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "rope_theta": 1e6, "rope_local_base_freq": 2e4}
    v5 = _gemma3_config(cfg)
    assert "full_attention" in v5["rope_parameters"]
    v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "layer_types" if pattern_only else "")}
    v4.update(rope_scaling={"rope_type": "linear", "factor": 8.0}, rope_theta=1e6, rope_local_base_freq=2e4,
              sliding_window_pattern=3)
    full4, switches4 = _gemma3_switches(_gemma3_v4_keys(v4))
    full5, switches5 = _gemma3_switches(v5)
    assert switches4 == switches5 and switches4["rope_local_theta"] == 2e4
    assert switches4["sliding_layers"] == (0, 1, 3, 4, 6, 7)
    assert (full4["rope_type"], full4["factor"], full4["rope_theta"]) == ("linear", 8.0, 1e6)
    assert (full5["rope_type"], full5["factor"], full5["rope_theta"]) == ("linear", 8.0, 1e6)
    with pytest.raises(ValueError, match="sliding_window_pattern"):
        _gemma3_v4_keys({**v4, "layer_types": None, "sliding_window_pattern": 0})


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "smollm3"])
def test_use_sliding_window_runs_as_transformers(base_tokenizer, tmp_path, model_type):
    """Qwen2, Qwen3 and SmolLM3 with use_sliding_window: the window (8) in the layers their config class marks
    (layer_types: from max_window_layers; SmolLM3's NoPE layers), the context not capped; transformers' logits 40
    tokens past the window, from one prefill and from decode steps through the KV cache (the CPU's torch path)."""
    cls = {"qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "smollm3": "SmolLM3Config"}[model_type]
    extra = dict(use_sliding_window=True, sliding_window=8, max_window_layers=1, max_position_embeddings=256,
                 num_hidden_layers=4, head_dim=16, pad_token_id=None)
    fam = build_family(f"{model_type}-window", (cls, extra, model_type, "chatml"), base_tokenizer, tmp_path)
    loaded = load_model(fam["hf"])
    theirs = fam["model"].config
    marked = tuple(i for i, t in enumerate(theirs.layer_types) if t == "sliding_attention")
    assert marked and loaded.config.sliding_layers == marked and loaded.config.sliding_window == 8
    assert loaded.config.max_seq_len == 256
    ids = _ids(48, loaded.config.vocab_size, seed=fam["seed"])
    err, span = _logit_error(loaded, fam["model"], ids)
    assert err < 2e-5 * span, f"{model_type} (seed {fam['seed']}): max |diff| {err:.3e} vs range {span:.2f}"
    gen = Generator(loaded, "cpu", dtype=torch.float32, max_len=64, backend="reference")
    stepped = _stepped_logits(gen, ids, sparse=False)
    with torch.no_grad():
        reference = fam["model"](torch.tensor([ids])).logits[0, 1:].float()
    assert float((stepped - reference).abs().max()) < 2e-5 * span


@pytest.mark.parametrize("context", [131072, 32768])
def test_ministral_layer_types_read_as_transformers_reads_them(context):
    """Ministral 8B's shapes (36 layers, 32 heads of 128, 8 kv heads) with its ragged pattern as layer_types (every
    fourth layer full from the first, the others through 32,768 keys): the sliding layers MinistralConfig marks; at a
    context of 32,768 (the window's own) no window can cut, none; an attention_bias key reads as no bias, as
    transformers' Ministral builds none."""
    from transformers import MinistralConfig

    from spqt.sources import _hf_config

    types = ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(36)]
    cfg = {"model_type": "ministral", "vocab_size": 131072, "hidden_size": 4096, "intermediate_size": 12288,
           "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
           "max_position_embeddings": context, "rope_theta": 1e8, "sliding_window": 32768, "layer_types": types,
           "attention_bias": True}  # (a key MinistralAttention ignores: no biases)
    theirs = MinistralConfig.from_dict(dict(cfg))
    ours = _hf_config(cfg, "ministral", tie=False)
    marked = tuple(i for i, t in enumerate(theirs.layer_types) if t == "sliding_attention")
    assert ours.sliding_layers == (marked if context > 32768 else ()) and len(marked) == 27
    assert ours.sliding_window == (32768 if context > 32768 else 0) and ours.max_seq_len == context
    assert (ours.family, ours.head_dim, ours.rope_theta, ours.linear_biases) == ("ministral", 128, 1e8, ())


@pytest.mark.parametrize("change, window", [
    ({"model_type": "mistral"}, 4096),  # (MistralConfig's default where the key is left out)
    ({"model_type": "mistral", "sliding_window": None}, 0),
    ({"model_type": "ministral"}, 4096),  # (MinistralConfig's: every layer sliding where layer_types are left out)
    ({"model_type": "ministral", "sliding_window": None}, 0),
    ({"model_type": "qwen2", "use_sliding_window": False, "sliding_window": 0}, 0),  # (transformers drops it)
    ({"model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 1}, 4096),
    ({"model_type": "phi3"}, 0)])
def test_sliding_window_keys_left_out_or_off(change, window):
    """A config.json's window as transformers reads it: a key left out is the config class's, use_sliding_window off
    drops Qwen's window whatever it says."""
    from spqt.sources import _hf_config

    cfg = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 8192, **change}
    config = _hf_config(cfg, cfg["model_type"], tie=False)
    assert config.sliding_window == window and bool(config.sliding_layers) == bool(window)
    assert config.max_seq_len == 8192
