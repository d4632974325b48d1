"""End-to-end decode benchmark on a CUDA GPU: the default model, a .spqt file (or a Hugging Face Hub name's,
`hf:ORG/REPO[:TAG]`, downloaded once: spqt.hub), or a synthetic Llama (random weights, `synthetic:llama2-7b` ...)
built directly on the GPU.

Synthetic models: one random matrix per distinct shape is quantized on the GPU and copied into
every layer (each layer owns its buffer, so a token streams all weight bytes, as a real model
does); thresholds are calibrated on the model's own activations (the prompt's dense prefill) to
hit each sparsity. Per configuration we time every decode step (CUDA-graph replay, synchronised)
and report the median ms/token, tokens/s, weight bytes read per token, achieved GB/s, and the
floor (bytes / copy bandwidth measured in the same run).
"""

import datetime
import json
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

import spqt
from spqt import hub
from spqt.checkpoint import LoadedModel, QuantizedWeight, kind_types, load_model
from spqt.config import ModelConfig
from spqt.errors import SpqtError
from spqt.generate import DENSE_STEP_FORCED, DTYPE_NAMES, KEPT_ROUTE_NAMES, Generator, compute_dtype, sparse_linears
from spqt.kernels import tuning
from spqt.kernels.gpu_layout import GpuQ4K, repack
from spqt.mixes import check_quant_type, head_type
from spqt.sources import TokenizerSpec, yarn_scaling

# Olmo-3-1025-7B's full layers' YaRN (its config.json's rope_scaling: factor 8 from 8,192 positions, beta 32 and 1,
# attention factor 1 + 0.1 ln 8; base 500,000, head dim 128): the per-frequency divisors and the factor of cos and sin
_OLMO3_7B_YARN = yarn_scaling({"factor": 8.0, "original_max_position_embeddings": 8192, "beta_fast": 32.0,
                               "beta_slow": 1.0, "attention_factor": 1.2079441541679836}, 500000.0, 128, 65536)

SYNTHETIC = {
    "llama2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008),
    "llama3-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                      rope_theta=500000.0),
    "llama2-13b": dict(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824),
    "llama2-70b": dict(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672),
    # other families' geometries (their maps' shapes and counts; no q / k norms or tied embeddings)
    "llama3.2-1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                        rope_theta=500000.0),
    "llama3.2-3b": dict(vocab_size=128256, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192,
                        rope_theta=500000.0),
    # (Qwen2.5's q|k|v bias too, small random values: a decode step adds it in the map's epilogue)
    "qwen2.5-7b": dict(vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, ffn_dim=18944,
                       rope_theta=1000000.0, family="qwen2", linear_biases=("qkv",)),
    # Gemma 3 1B's switches too (q / k norms and post-norms of ones, GELU MLP, scaled embeddings, five of each six
    # layers sliding over 512 keys with their own RoPE table): the generic path's cost (bf16, the runtime's default)
    "gemma3-1b": dict(vocab_size=262144, dim=1152, n_layers=26, n_heads=4, n_kv_heads=1, head_dim=256, ffn_dim=6912,
                      rope_theta=1000000.0, family="gemma3", qk_norm=True, post_norms=True, activation="gelu_tanh",
                      embed_scale=1152**0.5, sliding_window=512, rope_local_theta=10000.0,
                      sliding_layers=tuple(i for i in range(26) if i % 6 != 5)),
    # Gemma 2 2B's: Gemma 3's switches less the q / k norms and local RoPE table, every other layer sliding over 4,096
    # keys, the attention's and the logits' soft-caps
    "gemma2-2b": dict(vocab_size=256000, dim=2304, n_layers=26, n_heads=8, n_kv_heads=4, head_dim=256, ffn_dim=9216,
                      family="gemma2", post_norms=True, activation="gelu_tanh", embed_scale=2304**0.5,
                      sliding_window=4096, sliding_layers=tuple(range(0, 26, 2)), attn_logit_softcap=50.0,
                      final_logit_softcap=30.0),
    # Qwen3 8B's q / k norms (of ones) and Phi-3-mini's head dim of 96 and 2,047-key window in every layer: the fused
    # decode attention's folded norms and masked lanes
    "qwen3-8b": dict(vocab_size=151936, dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=12288,
                     rope_theta=1000000.0, family="qwen3", qk_norm=True),
    # OLMo-2-1124-7B's: no norms before the maps (q|k|v and gate|up read the residual stream), post-norms and q / k
    # norms over the whole of q and of k (of ones), run by the fused decode attention as it loads q and k; untied head
    "olmo2-7b": dict(vocab_size=100352, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                     rope_theta=500000.0, norm_eps=1e-6, family="olmo2", qk_norm=True, qk_norm_scope="all",
                     pre_norms=False, post_norms=True),
    # GLM-4-9B-0414's (transformers' Glm4Config defaults, its 9B: the published config.json not read here): four norms
    # a layer (of ones), q|k|v bias, 64 of each head's 128 dimensions rotated, 2 kv heads; untied head
    "glm4-9b": dict(vocab_size=151552, dim=4096, n_layers=40, n_heads=32, n_kv_heads=2, head_dim=128, ffn_dim=13696,
                    norm_eps=1.5625e-07, family="glm4", linear_biases=("qkv",), post_norms=True, rope_dims=64),
    # Olmo-3-1025-7B's (its config.json): OLMo 2 7B's switches and shapes, a vocabulary of 100,278, three layers of
    # each four sliding over 4,096 keys with a plain table of their own, the fourth YaRN-scaled: the fused decode
    # attention's whole-q / k norms in a window
    "olmo3-7b": dict(vocab_size=100278, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                     rope_theta=500000.0, norm_eps=1e-6, family="olmo3", qk_norm=True, qk_norm_scope="all",
                     pre_norms=False, post_norms=True, sliding_window=4096,
                     sliding_layers=tuple(i for i in range(32) if i % 4 != 3), rope_local_theta=500000.0,
                     rope_freq_factors=_OLMO3_7B_YARN[0], rope_attention_factor=_OLMO3_7B_YARN[1]),
    # EXAONE-4.0-32B's (its config.json as TensorRT-LLM's EXAONE 4 test copies it): no norms before the maps, post-norms
    # and per-head q / k norms (of ones), three layers of each four sliding over 4,096 keys, the fourth unrotated (NoPE),
    # llama3 scaling (factor 16 from 8,192 positions, base 1,000,000); 8 kv heads of 128, untied head
    "exaone4-32b": dict(vocab_size=102400, dim=5120, n_layers=64, n_heads=40, n_kv_heads=8, head_dim=128,
                        ffn_dim=27392, rope_theta=1000000.0, family="exaone4", qk_norm=True, pre_norms=False,
                        post_norms=True, sliding_window=4096, sliding_layers=tuple(i for i in range(64) if i % 4 != 3),
                        nope_layers=tuple(range(3, 64, 4)),
                        rope_scaling={"factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}),
    # ERNIE-4.5-0.3B's (its config.json): 18 layers, 16 heads of 128 on a dim of 1,024 (q twice as wide as the
    # stream), 2 kv heads, base 500,000, no biases (use_bias false); its RoPE pairs need no switch (the readers permute
    # q's and k's rows as read); the head untied here, its tied one stored as the others' heads are
    "ernie4.5-0.3b": dict(vocab_size=103424, dim=1024, n_layers=18, n_heads=16, n_kv_heads=2, head_dim=128,
                          ffn_dim=3072, rope_theta=500000.0, norm_eps=1e-5, family="ernie4_5"),
    # Seed-OSS-36B's (its model card: 64 layers, 80 heads of 128 on a dim of 5,120, q twice as wide as the stream, 8 kv
    # heads, base 1e7; SeedOssConfig's defaults, the released config's: vocabulary 155,136, ffn 27,648, eps 1e-6,
    # q|k|v biases, none on o or the MLP); untied head
    "seed-oss-36b": dict(vocab_size=155136, dim=5120, n_layers=64, n_heads=80, n_kv_heads=8, head_dim=128,
                         ffn_dim=27648, rope_theta=1e7, norm_eps=1e-6, family="seed_oss", linear_biases=("qkv",)),
    "phi3-mini": dict(vocab_size=32064, dim=3072, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=8192,
                      family="phi3", sliding_window=2047, sliding_layers=tuple(range(32))),
    "tiny": dict(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=768),  # the gpu tests
}


def synthetic_model(name: str, layout: str, max_seq_len: int = 512, fmt: str = "q4_k",
                    head: str = "auto") -> LoadedModel:
    """fmt q4_k: each layer's maps in the Q4_K kernel layout (GpuQ4K); another type (zigzag only): each layer
    holds the same QuantizedWeight (blocks on the GPU) and its Linear repacks it into a buffer of its own, in
    the layout the runtime's dispatch picks for the type. head: the output head's type as spqt quantize stores it
    (mixes.head_type: "auto" Q6_K, Q8_0 in a Q8_0 model; "fp16")."""
    if name not in SYNTHETIC:
        raise SpqtError(f"unknown synthetic model {name!r}; choose one of {', '.join(SYNTHETIC)}")
    cfg = ModelConfig(**SYNTHETIC[name], max_seq_len=max_seq_len)
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = {"qkv": (cfg.q_dim + 2 * cfg.kv_dim, cfg.dim), "o": (cfg.dim, cfg.q_dim),
              "gate_up": (2 * cfg.ffn_dim, cfg.dim), "down": (cfg.dim, cfg.ffn_dim)}
    prototypes = {}
    for kind, shape in shapes.items():
        w = torch.randn(*shape, device="cuda", generator=g) * shape[1] ** -0.5
        qw = QuantizedWeight(spqt.quantize(w, fmt, layout), fmt, layout, shape)
        prototypes[kind] = repack(qw, "cuda") if fmt == "q4_k" else qw
        del w
    output = torch.randn(cfg.vocab_size, cfg.dim, device="cuda", generator=g) * cfg.dim**-0.5
    head_fmt = head_type(fmt, head)
    weights = {"tok_embeddings": torch.randn(cfg.vocab_size, cfg.dim, device="cuda", generator=g).half(),
               "output": QuantizedWeight(spqt.quantize(output, head_fmt, layout), head_fmt, layout, tuple(output.shape))
               if head_fmt else output.half(),
               "norm": torch.ones(cfg.dim, device="cuda")}
    del output
    for i in range(cfg.n_layers):
        for name, size in cfg.layer_norms().items():
            weights[f"layers.{i}.{name}"] = torch.ones(size, device="cuda")
        for kind, p in prototypes.items():
            weights[f"layers.{i}.{kind}"] = GpuQ4K(p.quants.clone(), p.head.clone(), layout, p.shape) if fmt == "q4_k" else p
        for kind in cfg.linear_biases:
            weights[f"layers.{i}.{kind}.bias"] = 0.1 * torch.randn(shapes[kind][0], device="cuda", generator=g)
    tok = TokenizerSpec(tokenizer_json="{}")
    return LoadedModel(config=cfg, tokenizer=tok, weights=weights, parts={}, provenance={"synthetic": name})


def head_bytes(loaded: LoadedModel) -> int:
    """Bytes a decode step reads of the output head: its quantized blocks where the GPU has kernels for its type and
    layout, else the fp16 matrix the runtime multiplies by (a float head, the tied embedding, or a dequantized copy)."""
    from spqt.kernels.dispatch import has_kernels

    w = loaded.head()
    if hasattr(w, "fmt") and has_kernels(w.fmt, w.layout):
        return w.nbytes
    return loaded.config.vocab_size * loaded.config.dim * 2


def calibrate_on_own_activations(gen: Generator, prompt: torch.Tensor, sparsity: float) -> torch.Tensor:
    """(layers, 4) thresholds: the s-quantile of each input's |x| over the prompt's dense prefill."""
    from spqt.sparsity import INPUT_KINDS

    table = torch.zeros(gen.loaded.config.n_layers, 4)
    hooks = []
    for layer, kind, lin in sparse_linears(gen.model):
        def hook(mod, args, layer=layer, kind=kind):
            table[layer, INPUT_KINDS.index(kind)] = torch.quantile(args[0].float().abs().flatten(), sparsity).item()
        hooks.append(lin.input_tap.register_forward_pre_hook(hook))
    with torch.inference_mode():
        gen.model(prompt[None], torch.arange(prompt.numel(), device="cuda"), kv_len=prompt.numel())
    for h in hooks:
        h.remove()
    return table


def replay_device_us(graph, reps: int, before=None) -> list[float]:
    """Device microseconds of `reps` replays of a CUDA graph, each alone between two CUDA events
    (the GPU idle before it); before(), if given, runs ahead of each (a decode step's graph
    advances its own position: the caller may reset it)."""
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return times


def alternating_step_us(gen: Generator, prompt: list[int], setups: dict, rounds: int, reps: int) -> dict:
    """The decode step's graph device time under each setup (name -> a function that configures gen), the graph
    captured anew for each (a short greedy decode of prompt), the setups alternating for `rounds` rounds in this
    process: {name: [median us of `reps` replays, a round each]}. A process's first captured graph replays ~3 %
    faster than later ones (docs/RESULTS.md, the seventh session's order effect), so a capture of the first setup
    before the rounds is a warm-up and is not counted."""
    def step_us(name: str) -> float:
        setups[name]()
        gen.drop_graphs()
        gen.generate(prompt, 8, track=False)  # captures a graph with this setup
        return statistics.median(replay_device_us(gen._graph, reps))

    step_us(next(iter(setups)))
    results = {name: [] for name in setups}
    for _ in range(rounds):
        for name in setups:
            results[name].append(step_us(name))
    return results


def alternating_attribute_us(gen: Generator, prompt: list[int], owner, name: str, values: dict, rounds: int,
                             reps: int) -> dict:
    """alternating_step_us with each setup setting the attribute `name` of owner (a module) to a value ({setup name:
    value}), the shipped value restored after: the probes that time a module constant or switch."""
    shipped = getattr(owner, name)
    setups = {label: (lambda v=value: setattr(owner, name, v)) for label, value in values.items()}
    try:
        return alternating_step_us(gen, prompt, setups, rounds, reps)
    finally:
        setattr(owner, name, shipped)


def probe_arguments(parser, model: str) -> None:
    """The decode probes' common options (scripts/*_probe.py): --model (default `model`), --rounds, --reps,
    --prompt-tokens and --max-len (the span the timed steps attend: the prompt's length on)."""
    parser.add_argument("--model", default=model)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--prompt-tokens", type=int, default=10)
    parser.add_argument("--max-len", type=int, default=64)


def probe_generator(model: str, sparsity: float = 0.0, prompt_tokens: int = 10,
                    max_len: int = 64) -> tuple[Generator, list[int]]:
    """The decode probes' setting (scripts/*_probe.py): "synthetic:NAME"'s zigzag Q4_K model on CUDA behind a
    Generator of max_len positions (at a sparsity above 0: thresholds from its own activations on the prompt), and a
    random prompt of prompt_tokens (the captured steps attend to about that many keys)."""
    if prompt_tokens + 16 > max_len:
        raise SpqtError(f"a probe's prompt of {prompt_tokens} tokens needs --max-len {prompt_tokens + 16} or more")
    loaded = synthetic_model(model.split(":", 1)[1], "zigzag", max_len)
    prompt = torch.randint(0, loaded.config.vocab_size, (prompt_tokens,), device="cuda")
    gen = Generator(loaded, "cuda", max_len=max_len)
    if sparsity > 0:
        gen.set_sparsity(sparsity, table=calibrate_on_own_activations(gen, prompt, sparsity))
    return gen, prompt.tolist()


def probe_generator_from(args, sparsity: float = 0.0) -> tuple[Generator, list[int]]:
    """probe_generator with the options probe_arguments added (--model, --prompt-tokens, --max-len)."""
    return probe_generator(args.model, sparsity, args.prompt_tokens, args.max_len)


def print_step_comparison(title: str, results: dict, base_label: str | None = None) -> dict:
    """The decode probes' report of alternating_step_us' {setup: [us a round]}: every setup's rounds, then how much
    less each later setup took than the first (named base_label, default its own name). Returns the medians."""
    median = {name: statistics.median(r) for name, r in results.items()}
    print(f"{title}, step device time (us): " + "; ".join(
        f"{name} {', '.join(f'{x:.1f}' for x in r)}" for name, r in results.items()))
    first = next(iter(results))
    base = median[first]
    for name in list(results)[1:]:
        print(f"  {name}: {base - median[name]:.1f} us less than {base_label or first} "
              f"({100 * (base - median[name]) / base:.1f} %)")
    return median


# SPQT_* variables that are not route switches: the caches, the commit, the API key, the tuned tables' folder
# (SPQT_TUNED: a row records the table it ran on, "table")
NOT_ROUTES = ("SPQT_CACHE", "SPQT_COMMIT", "SPQT_API_KEY", "SPQT_TUNED")


def route_switches() -> dict:
    """The SPQT_* environment variables of this process that change how a decode step runs (SPQT_SPARSE_KEPT,
    SPQT_CHAIN, SPQT_GEMV, ...: each row records them, so a log says what it timed)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("SPQT_") and k not in NOT_ROUTES}


def decode_run(gen: Generator, prompt: list[int], new_tokens: int) -> dict:
    """Greedy decode; per-step wall time of graph replays (each synchronised). Then the same decode
    again with the dropped inputs counted (the counting kernels kept out of the timed run): the
    sparsity the thresholds achieved on this text, per input kind and "all" (the fraction of the
    thresholded weights skipped), {} when dense."""
    res = gen.generate(prompt, new_tokens, track=False)
    steps = res.step_seconds[2:]  # the first steps include graph capture
    achieved = gen.generate(prompt, new_tokens, track=True).sparsity if gen.sparsity > 0 else {}
    return {"ms_per_token": 1e3 * statistics.median(steps), "p10_ms": 1e3 * sorted(steps)[len(steps) // 10],
            "p90_ms": 1e3 * sorted(steps)[9 * len(steps) // 10], "tokens": len(res.tokens),
            "achieved": achieved}


def _levels(args, layout: str) -> list[float]:
    """The sparsity levels a layout is timed at: args.sparsity for zigzag, dense only for row (no sparse kernel)."""
    return list(args.sparsity) if layout == "zigzag" else [0.0]


def file_rows_type(kind: str, layout: str, path) -> str | None:
    """The type a model file's rows carry in spqt bench decode: its kind's types ("q4_k", "q6_k+q4_k" for a mix), or
    None where the file is in the other layout (skipped). SpqtError where the GPU kernels do not run it: a float model
    (a GGUF or HF folder: quantize it first) or a type other than Q4_K in the row layout (dequantize + cuBLAS)."""
    if kind == "float":
        raise SpqtError(f"spqt bench decode times quantized models; {path} holds float weights (spqt quantize it first)")
    types, file_layout = kind_types(kind)
    if types != "q4_k" and file_layout != "zigzag":
        raise SpqtError(f"spqt bench decode times the GPU kernels, which run q4_k in the row layout and every type in "
                        f"the zigzag layout; {path} is {kind}")
    return types if file_layout == layout else None


def _rows_in_process(args, model_arg: str, runs, copy_gbps: float, log) -> list[dict]:
    """The rows of every (type, layout) in runs at each of its _levels, timed one after another in this process."""
    rows = []
    after_capture = getattr(args, "after_capture", False)
    if after_capture:
        throwaway_capture()
    for fmt, layout in runs:
        if model_arg.startswith("synthetic:"):
            loaded = synthetic_model(model_arg.split(":", 1)[1], layout, args.prompt_tokens + args.new_tokens + 8, fmt,
                                     getattr(args, "head", "auto"))
        else:
            from spqt.default_model import default_spqt

            path = default_spqt() if model_arg == "default" else model_arg
            loaded = load_model(path)
            fmt = file_rows_type(loaded.kind, layout, path)
            if fmt is None:
                log(f"skipping layout {layout}: {path} is {loaded.kind}")
                continue
        gen = Generator(loaded, "cuda", dtype=compute_dtype(getattr(args, "dtype", "auto")),
                        max_len=args.prompt_tokens + args.new_tokens + 8)
        dtype = DTYPE_NAMES[gen.dtype]
        g = torch.Generator(device="cuda").manual_seed(1)
        prompt = torch.randint(0, loaded.config.vocab_size, (args.prompt_tokens,), device="cuda", generator=g)
        head = head_bytes(loaded)
        for s in _levels(args, layout):
            if s == 0:
                gen.set_sparsity(0.0)
            elif model_arg.startswith("synthetic:"):
                gen.set_sparsity(s, table=calibrate_on_own_activations(gen, prompt, s), criterion="teal")
            else:
                gen.set_sparsity(s, getattr(args, "mode", None) or "unified")
            torch.cuda.synchronize()
            r = decode_run(gen, prompt.tolist(), args.new_tokens)
            dense_maps = set(gen.dense_fallbacks()) if s > 0 else set()
            needed = head + sum(lin.impl.w.nbytes * (1 - s if s > 0 and f"layers.{i}.{kind}" not in dense_maps else 1)
                                for i, kind, lin in sparse_linears(gen.model))  # bytes a token must read
            sec = r["ms_per_token"] / 1e3
            row = {"model": model_arg, "type": fmt, "head": getattr(loaded.head(), "fmt", "fp16"), "dtype": dtype,
                   "layout": layout,
                   "variant": f"{layout}-{'sparse' if s else 'dense'}",
                   "sparsity": s, "process": os.getpid(), **r, "tokens_per_s": 1 / sec, "weight_bytes": needed,
                   "gbps": needed / sec / 1e9, "floor_ms": 1e3 * needed / (copy_gbps * 1e9),
                   "gpu_mem_gb": torch.cuda.max_memory_allocated() / 1e9, "dense_fallback_maps": len(dense_maps),
                   "step": "chain" if gen.chain_runs() else "launched", "switches": route_switches(),
                   "model_key": tuning.model_key(loaded.config, fmt), "after_capture": after_capture,
                   "table": tuning.table_source()}
            row["kept_route"] = gen.tuned_route_runs()  # None: off, or SPQT_SPARSE_KEPT overrides it
            row["dense_step"] = gen.dense_step_reason()  # why every map runs dense (the level's route, =dense)
            row["frac_of_floor"] = row["floor_ms"] / row["ms_per_token"]
            rows.append(row)
            log(f"{model_arg:20s} {fmt} head {row['head']:4s} {dtype} {row['variant']:14s} {row['step']:8s} s={s:4.2f} "
                f"{r['ms_per_token']:8.3f} ms/token "
                f"{row['tokens_per_s']:8.1f} tok/s {needed / 1e9:7.2f} GB {row['gbps']:6.0f} GB/s "
                f"floor {row['floor_ms']:.3f} ms ({100 * row['frac_of_floor']:.0f} % of floor speed)"
                + (f", {len(dense_maps)} maps dense ("
                   + ("SPQT_SPARSE_KEPT=dense)" if row["dense_step"] == DENSE_STEP_FORCED
                      else "the step route: no sparse step was faster)" if row["dense_step"]
                      else "below their crossover)")
                   if dense_maps else "")
                + (f", achieved {100 * r['achieved']['all']:.1f} %" if r["achieved"] else "")
                + (f", MODE_KEPT on {KEPT_ROUTE_NAMES[row['kept_route']]} (tuned route)" if row["kept_route"] else "")
                + "".join(f", {k}={v}" for k, v in row["switches"].items())
                + (", after a throwaway capture" if after_capture else ""))
        del gen, loaded
        torch.cuda.empty_cache()
    return rows


def child_arguments(args, model_arg: str, fmt: str, layout: str, sparsity: float, json_out: str) -> list[str]:
    """The interpreter's arguments for one row's `spqt bench decode --one-process` run (the row's JSON to json_out)."""
    return ["-m", "spqt.cli", "bench", "decode", "--one-process", "--model", model_arg,
            *(["--types", fmt] if model_arg.startswith("synthetic:") else []), "--layouts", layout,
            "--sparsity", str(sparsity), "--prompt-tokens", str(args.prompt_tokens), "--new-tokens",
            str(args.new_tokens), "--head", getattr(args, "head", "auto"), "--dtype", getattr(args, "dtype", "auto"),
            *(["--after-capture"] if getattr(args, "after_capture", False) else []), "--json", json_out]


def throwaway_capture() -> None:
    """One CUDA graph of a single add captured and dropped. A process that has made a second capture replays every
    graph slower (1-2 % on an H100's 7B step: docs/RESULTS.md, forty-seventh session): a server from its start (its
    engine captures the prefill graphs), a chat or a long generation once a second graph is captured;
    `spqt bench decode --after-capture` times that state."""
    scratch = torch.zeros(1, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        scratch.add_(1)
    torch.cuda.synchronize()


def _row_in_child(args, model_arg: str, fmt: str, layout: str, sparsity: float, log, env: dict | None = None) -> dict:
    """One (type, layout, level) timed by `spqt bench decode --one-process` in a fresh process (env: variables set
    for it; fmt: a synthetic model's type, a file brings its own): its report (rows, copy_gbps); its stdout lines
    passed to log as they come, its stderr kept for the error line."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        cmd = [sys.executable, *child_arguments(args, model_arg, fmt, layout, sparsity, out)]
        with open(os.path.join(tmp, "stderr"), "w+") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
            try:
                for line in proc.stdout:
                    if line.strip():
                        log(line.rstrip("\n"))
                code = proc.wait()
            finally:  # interrupted: the child goes with the parent
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if code != 0:
                err.seek(0)
                lines = [ln.strip() for ln in err.read().splitlines() if ln.strip()]
                errors = [ln for ln in lines if ln.startswith("spqt: error:")] or lines or ["no output"]
                raise SpqtError(f"spqt bench decode ({fmt}, {layout} layout, sparsity {sparsity}): "
                                f"{errors[-1].removeprefix('spqt: error: ')}")
        with open(out) as f:
            return json.load(f)


def run_decode_benchmark(args, json_path=None, log=print) -> dict:
    """spqt bench decode: every (type, layout, level) row in a process of its own (`spqt bench decode` with one
    type, layout and level, its JSON read back), unless args.one_process. A row's time depends on what its process
    ran before it: the 7B at 50 % ran 2.4 % faster after a dense row than in a fresh process on the H200
    (docs/RESULTS.md, issue 14, seventh session), and every graph of a process replays 1-2 % slower (an H100's 7B)
    once the process has made a second stream capture of anything (forty-seventh session). A fresh process per row
    is what a user's single `spqt generate` at that setting gets; args.after_capture (a throwaway capture first)
    what a server gets (it captures its prefill graphs at start). A hub name's file is downloaded once, here, before
    any row: every row's process loads that file, and the rows carry the name as their model."""
    from spqt.bench import copy_bandwidth, git_commit

    model_arg = args.model or "default"  # the rows' model, as given
    layouts = [v.strip() for v in args.layouts.split(",")]
    types = [v.strip() for v in (getattr(args, "types", None) or "q4_k").split(",")]
    if types != ["q4_k"] and not model_arg.startswith("synthetic:"):
        raise SpqtError("spqt bench decode --types is for synthetic models; a model file brings its own types")
    head = getattr(args, "head", "auto")
    if head != "auto" and not model_arg.startswith("synthetic:"):
        raise SpqtError("spqt bench decode --head: a model file brings its own head; --head is for synthetic models")
    for fmt in types:
        check_quant_type(fmt)
        head_type(fmt, head)  # before any child process starts
    runs = [(f, lay) for f in types for lay in layouts if f == "q4_k" or lay == "zigzag"]
    if not runs:
        raise SpqtError("spqt bench decode: types other than q4_k run in the zigzag layout only (--layouts zigzag)")
    source = model_arg  # what the rows load: a hub name's file, else the argument itself
    if hub.is_hub_name(model_arg):
        source = str(hub.resolve(model_arg))
        if json_path and os.path.realpath(json_path) == os.path.realpath(source):
            raise SpqtError(f"the output --json {json_path} is also the model: write it to another path")
    one_process = getattr(args, "one_process", False)
    after_capture = getattr(args, "after_capture", False)
    if one_process:
        copy_gbps = copy_bandwidth()
        log(f"{torch.cuda.get_device_name()}: copy {copy_gbps:.0f} GB/s (read+write)")
        rows = _rows_in_process(args, source, runs, copy_gbps, log)
    else:
        rows, copies = [], []
        for fmt, layout in runs:
            for s in _levels(args, layout):
                child = _row_in_child(args, source, fmt, layout, s, log)
                copies.append(child["copy_gbps"])
                rows += [dict(r, copy_gbps=child["copy_gbps"]) for r in child["rows"]]
        copy_gbps = statistics.median(copies) if copies else copy_bandwidth()
    rows = [dict(r, model=model_arg) for r in rows]  # (a hub model's rows: its name, not its path in the cache)
    for line in compare_with_dense(rows):
        log(line)
    report = {"benchmark": "decode", "device": torch.cuda.get_device_name(), "copy_gbps": copy_gbps,
              "commit": git_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "method": "greedy decode, CUDA graph per step, median of per-step synchronised wall times; "
                        "floor = bytes needed / copy GB/s (bytes read + written, as the GEMV benchmark); "
                        + ("rows one after another in one process" if one_process
                           else "each row in a process of its own (its copy GB/s in the row)")
                        + ("; a throwaway CUDA graph captured before timing (--after-capture)"
                           if after_capture else ""),
              "after_capture": after_capture,
              "rows": rows}
    if json_path:
        from pathlib import Path

        from spqt.checkpoint import atomic_write

        atomic_write(Path(json_path), lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
    return report


def compare_with_dense(rows: list[dict]) -> list[str]:
    """Each sparse row's speed over the dense row of its model, type and layout ("over_dense", set in the rows) and
    a line per (model, type, layout) with a dense row: the ratios, and the levels slower than dense by more than
    ROUTE_MARGIN (runs differ by ~0.5 %), which issue 14 allows none of."""
    lines = []
    dense = {(r["model"], r["type"], r["layout"]): r["tokens_per_s"] for r in rows if r["sparsity"] == 0}
    for key, base in dense.items():
        sparse = [r for r in rows if (r["model"], r["type"], r["layout"]) == key and r["sparsity"] > 0]
        for r in sparse:
            r["over_dense"] = r["tokens_per_s"] / base
        if sparse:
            slower = [f"{r['sparsity']:g}" for r in sparse if r["over_dense"] < 1 - ROUTE_MARGIN]
            lines.append(f"{key[0]} {key[1]} {key[2]}: over dense " + ", ".join(
                f"{r['sparsity']:g} {r['over_dense']:.2f}x" for r in sparse)
                + f"; slower than dense by over {100 * ROUTE_MARGIN:.0f} %: {', '.join(slower) or 'none'}")
    return lines


ROUTE_MARGIN = 0.01  # a route other than "off" must decode this much faster to be chosen (runs differ by ~0.5 %),
# and a sparse route this much faster than the dense step, else the level runs dense


def choose_route(tokens_per_s: dict) -> str:
    """The step route from {route: tokens/s}: the fastest of tuning.KEPT_ROUTES ("off" among them), "off" unless it
    beats "off" by ROUTE_MARGIN; then "dense" (where it was timed) unless that route beats the dense step by
    ROUTE_MARGIN: no level may decode slower than dense (issue 14)."""
    sparse = {r: v for r, v in tokens_per_s.items() if r in tuning.KEPT_ROUTES}
    best = max(sparse, key=sparse.get)
    route = best if sparse[best] >= sparse["off"] * (1 + ROUTE_MARGIN) else "off"
    dense = tokens_per_s.get(tuning.STEP_DENSE)
    return tuning.STEP_DENSE if dense is not None and sparse[route] < dense * (1 + ROUTE_MARGIN) else route


def tune_routes(args, models: list[tuple[str, str]], levels: list[float], rounds: int = 2, log=print) -> dict:
    """spqt tune --routes: for each (model, weight types) (synthetic:NAME with one type, or a zigzag .spqt with its
    kind's types, "q4_k" or a mix's "q5_k+q4_k+q3_k") and level, greedy decode timed as `spqt bench decode` times it,
    a process per route with SPQT_SPARSE_KEPT forcing it (tuning.KEPT_ROUTES: off, the norm-fed maps, every sparse
    map), and a process per round with every map dense (SPQT_SPARSE_KEPT=dense, at the first level: the same step at
    every level), in turn for `rounds` rounds; the fastest by the median of its rounds (choose_route). Returns
    {model_key: entry} (tuning.STEP_ROUTES' format) to merge into the table."""
    found = {}
    for model, fmt in models:
        runs = {level: {route: [] for route in tuning.STEP_ROUTE_NAMES} for level in levels}
        key = None
        timed = [(levels[0], tuning.STEP_DENSE)] + [(lv, r) for lv in levels for r in tuning.KEPT_ROUTES]  # a round
        for _ in range(rounds):
            for level, route in timed:
                rows = _row_in_child(args, model, fmt, "zigzag", level, log,  # (the chain runs no route)
                                     env={"SPQT_SPARSE_KEPT": route, "SPQT_CHAIN": "0"})["rows"]
                if not rows or rows[0]["type"] != fmt:  # the child skipped it (the row layout), or other types
                    raise SpqtError(f"spqt tune --routes: {model} is not a zigzag {fmt} model (MODE_KEPT runs on "
                                    f"zigzag maps)")
                for lv in (levels if route == tuning.STEP_DENSE else [level]):
                    runs[lv][route].append(rows[0]["tokens_per_s"])
                key = rows[0]["model_key"]
        for level in levels:
            rates = {route: statistics.median(v) for route, v in runs[level].items()}
            route = choose_route(rates)
            log(f"{model} {fmt} at {level:.2f}: " + ", ".join(f"{r} {v:.1f}" for r, v in rates.items())
                + f" tokens/s (median of {rounds}) -> {route}")
            entry = found.setdefault(key, {"model": model, "levels": {}})
            entry["levels"][tuning.level_key(level)] = {"route": route, "rounds": rounds,
                                                        "tokens_per_s": {r: round(v, 1) for r, v in rates.items()}}
    return found


L2FIRST_DEPTHS = (1, 2, 3)  # chunks a warp of the CUDA B2 prefetches into L2 before its PDL wait (0: none)
L2FIRST_MARGIN = 0.005  # a depth must shorten the step's replay by this fraction of it (medians of three rounds of
# one config differed by up to ~0.4 % on the 70B, eighteenth session)


def choose_l2first(step_us: dict, reference: int = 0) -> int:
    """The depth to keep from {depth: step us} (the reference, depth 0, among them): the reference unless one shortens
    the step by L2FIRST_MARGIN of its; then the shallowest within that margin of the fastest (a deeper one asks for
    more for nothing)."""
    base, best = step_us[reference], min(step_us.values())
    if best > base * (1 - L2FIRST_MARGIN):
        return reference
    return min(d for d, us in step_us.items() if d != reference and us <= best + base * L2FIRST_MARGIN)


def l2first_depths(cfg: dict, k: int) -> list[int]:
    """The L2FIRST_DEPTHS that differ for a CUDA dense config of K columns: at most the chunks a warp's share holds
    after the one it loads into registers (none where it holds one: nothing to ask for)."""
    from spqt.kernels import zigzag_cuda

    chunks = zigzag_cuda.share(k, cfg["split"], cfg["num_warps"]) // (16 * cfg["num_warps"])
    return [d for d in L2FIRST_DEPTHS if d <= chunks - 1]


@dataclass(frozen=True)
class StepChoice:
    """One entry setting that whole decode steps judge per dense map shape (spqt tune --l2first, --pairs): its name
    in the logs and results, the settings a config may take (options(cfg, k), the reference first: L2FIRST depth 0,
    PAIRS the entry's own setting; fewer than two: nothing to judge), a config with one applied (apply(cfg, option)),
    the choice from {option: step us} and the reference (choose), and why a shape with no options is not judged
    (skipped)."""

    name: str
    options: Callable
    apply: Callable
    choose: Callable
    skipped: str


def _judge_in_steps(model: str, found: dict, rounds: int, reps: int, log, choice: StepChoice) -> None:
    """Judge choice for one model: its CUDA dense shapes not in `found` judged into it, in the order the step runs
    them (tune_l2first's rules)."""
    gen, prompt = probe_generator(model)
    own = tuning.table_entries("zigzag_dense")
    maps = {}
    for _, _, lin in sparse_linears(gen.model):
        cfg = getattr(lin.impl, "cfg_dense", None)
        if cfg is None or cfg.get("impl") != "cuda":
            continue
        shape = f"{lin.impl.n}x{lin.impl.k}"
        # a CUDA entry, not a Triton one that a bf16 map runs on the CUDA GEMV (gpu_linear.bf16_on_cuda): an L2
        # prefetch or tile pairs written into a Triton entry would break its fp16 runs
        if own.get(shape, cfg).get("impl") == "cuda":
            maps.setdefault(shape, []).append(lin.impl)
    tuned = {id(m): m.cfg_dense for ms in maps.values() for m in ms}
    # what every map runs while another shape is judged: the option judged before (this run), else the table's
    current = {id(m): choice.apply(tuned[id(m)], found[shape][choice.name]) if shape in found else tuned[id(m)]
               for shape, ms in maps.items() for m in ms}

    def setup(shape: str, option):
        def configure():
            for ms in maps.values():
                for m in ms:
                    m.cfg_dense = current[id(m)]
            for m in maps[shape]:
                m.cfg_dense = choice.apply(current[id(m)], option)
        return configure

    try:
        for shape, ms in maps.items():
            if shape in found:
                continue
            options = choice.options(ms[0].cfg_dense, ms[0].k)
            if shape not in own or len(options) < 2:
                log(f"{model} {shape}: not judged ("
                    + ("no entry of its own: it borrows a neighbour's; spqt tune --shapes it first)" if shape not in own
                       else choice.skipped + ")"))
                continue
            results = alternating_step_us(gen, prompt, {o: setup(shape, o) for o in options}, rounds, reps)
            step = {o: statistics.median(r) for o, r in results.items()}
            chosen = choice.choose(step, options[0])
            log(f"{model} {shape}: " + ", ".join(f"{choice.name} {int(o)} {us:.1f}" for o, us in step.items())
                + f" us a step (median of {rounds} rounds) -> {int(chosen)}")
            found[shape] = {choice.name: chosen, "step_us": {str(int(o)): round(us, 1) for o, us in step.items()},
                            "model": model}
            for m in ms:
                current[id(m)] = choice.apply(current[id(m)], chosen)
    finally:
        for ms in maps.values():
            for m in ms:
                m.cfg_dense = tuned[id(m)]


def _tune_in_steps(models: list[str], rounds: int, reps: int, log, choice: StepChoice) -> dict:
    found = {}
    for model in models:
        _judge_in_steps(model, found, rounds, reps, log, choice)
        torch.cuda.empty_cache()  # the model's weights, freed with _judge_in_steps' frame
    return found


L2FIRST = StepChoice("l2first", lambda cfg, k: [0] + l2first_depths(cfg, k), tuning.with_prefetch, choose_l2first,
                     "a warp's share is one chunk")


def tune_l2first(models: list[str], rounds: int = 3, reps: int = 30, log=print) -> dict:
    """spqt tune --l2first: for each dense map shape with a CUDA entry of its own in this GPU's table, of each
    synthetic model (synthetic:NAME) in turn, the L2 prefetch depth ("l2first", the entry key tuning.launch_args
    passes as L2FIRST) judged in the decode step: the step's graph with that shape's maps at each depth against none,
    alternating in one process (alternating_step_us, `rounds` rounds of the median of `reps` replays), chosen by
    choose_l2first. A map alone cannot judge it: what the prefetch takes is DRAM time the kernel before it leaves
    idle (the attention before the o map) or needs (a GEMV's tail before its reduction). Shapes are judged one at a
    time in the order a step runs them, each in the first model that has it; meanwhile the shapes judged before run
    their new depth, the others the table's. Returns {shape: {"l2first": depth, "step_us": {depth: median us},
    "model": model}}."""
    return _tune_in_steps(models, rounds, reps, log, L2FIRST)


PAIRS_MARGIN = 0.005  # tile pairs must shorten the step's replay by this fraction of it (as L2FIRST_MARGIN)


def choose_pairs(step_us: dict, reference: bool) -> bool:
    """Tile pairs on or off from {False: step us, True: step us}: the entry's own setting (reference) unless the other
    shortens the step by PAIRS_MARGIN of it (with off as the reference, the 70B's 10240x8192 lost its pairs although
    they ran 0.5 % faster in the step: RESULTS, twenty-third session)."""
    other = not reference
    return other if step_us[other] < step_us[reference] * (1 - PAIRS_MARGIN) else reference


def pairs_options(cfg: dict, k: int) -> list[bool]:
    """[the entry's setting, the other] where the CUDA dense config's accumulator count has Q4_K tile pairs (8 or 2),
    else []."""
    from spqt.kernels import zigzag_cuda

    on = bool(cfg.get("pairs"))
    return [on, not on] if zigzag_cuda.pairs_run(4, cfg.get("acc", 16)) else []


PAIRS = StepChoice("pairs", pairs_options, tuning.with_pairs, choose_pairs, "its accumulator count has no tile pairs")


def tune_pairs(models: list[str], rounds: int = 3, reps: int = 30, log=print) -> dict:
    """spqt tune --pairs: for each dense map shape with a CUDA entry of its own at 8 or 2 accumulators, of each
    synthetic model in turn, Q4_K's tile pairs on or off judged in the decode step, as tune_l2first judges depths: the
    map alone (spqt tune) can choose pairs that lose in the step, where its neighbours' ramps, tails and finishes
    overlap it (twenty-second session: the 7B's maps re-tuned alone lost, their pairs alone won 3.5-3.9 % of the dense
    step). MODE_KEPT runs an entry without its pairs, so the dense step judges them. Returns {shape: {"pairs": bool,
    "step_us": {"0": off us, "1": on us}, "model": model}}."""
    return _tune_in_steps(models, rounds, reps, log, PAIRS)
