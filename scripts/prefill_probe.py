"""Time to the first token: the dense prefill of a prompt on CUDA, per prompt length, and where it goes.

    python3 scripts/prefill_probe.py [--models default,synthetic:llama2-7b[:TYPE]] [--tokens 8,17,64,257,512,1025,2048]
        [--json OUT]

For each model and prompt length: the prefill as `Generator.generate` times it (the prompt's forward pass and the
first token's sampling, synchronised; median of --reps after two warm-ups), then one prefill under torch.profiler,
its kernels grouped by kind with the device time each takes, and the host's share (wall time the GPU was idle).
"""

import argparse
import json
import statistics
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from spqt.bench_decode import synthetic_model
from spqt.generate import Generator

KINDS = (("gemm_q4k", "Q4_K GEMM"), ("dequant", "dequantize"), ("gemm", "GEMM"),
         ("nvjet", "GEMM"), ("cutlass", "GEMM"), ("xmma", "GEMM"),
         ("sm90", "GEMM"), ("flash", "attention"), ("fmha", "attention"), ("attention", "attention"),
         ("softmax", "attention"), ("rope", "RoPE / KV"), ("norm", "norm"))


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for key, kind in KINDS if key in low), "other")


def load(model: str, max_len: int):
    if model == "default":
        from spqt.checkpoint import load_spqt
        from spqt.default_model import default_spqt

        return load_spqt(default_spqt(progress=False))
    parts = model.split(":")  # synthetic:NAME[:TYPE], e.g. synthetic:llama2-7b:q6_k
    if parts[0] != "synthetic" or not 2 <= len(parts) <= 3:
        raise SystemExit(f"--models: default or synthetic:NAME[:TYPE], not {model!r}")
    return synthetic_model(parts[1], "zigzag", max_len, parts[2] if len(parts) == 3 else "q4_k")


def prefill_row(gen: Generator, tokens: int, reps: int) -> dict:
    prompt = torch.randint(0, gen.loaded.config.vocab_size, (tokens,)).tolist()
    for _ in range(2):
        gen.generate(prompt, 1, track=False)
    wall = [gen.generate(prompt, 1, track=False).prefill_seconds for _ in range(reps)]
    on_gpu = gen.device == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        gen.generate(prompt, 1, track=False)
    per_kind, launches = defaultdict(float), 0
    for e in prof.events():
        if on_gpu and e.device_type == torch.autograd.DeviceType.CUDA:
            per_kind[kind_of(e.name)] += e.device_time / 1e3  # ms
            launches += 1
    ms = 1e3 * statistics.median(wall)
    busy = sum(per_kind.values())
    return {"tokens": tokens, "prefill_ms": ms, "tokens_per_s": tokens / ms * 1e3, "kernels": launches,
            "device_ms": busy, "kinds_ms": dict(per_kind)}


def host_profile(gen: Generator, tokens: int, top: int) -> None:
    """The host's functions over one prefill (warm), by own time: what keeps the GPU waiting."""
    import cProfile
    import pstats

    prompt = torch.randint(0, gen.loaded.config.vocab_size, (tokens,)).tolist()
    for _ in range(2):
        gen.generate(prompt, 1, track=False)
    prof = cProfile.Profile()
    prof.enable()
    gen.generate(prompt, 1, track=False)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(top)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="default,synthetic:llama2-7b")
    ap.add_argument("--tokens", default="8,17,64,257,512,1025,2048")  # powers of two and one past
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json")
    ap.add_argument("--cprofile", type=int, default=0, help="also print the host's top N functions of one prefill")
    args = ap.parse_args()
    lengths = [int(t) for t in args.tokens.split(",")]
    rows = []
    for model in args.models.split(","):
        loaded = load(model, max(lengths) + 8)
        max_len = min(max(lengths) + 8, loaded.config.max_seq_len)
        gen = Generator(loaded, args.device, max_len=max_len)
        if args.cprofile:
            host_profile(gen, lengths[0], args.cprofile)
        for tokens in lengths:
            if tokens + 1 > max_len:
                continue
            row = dict(prefill_row(gen, tokens, args.reps), model=model, dtype=str(gen.dtype))
            rows.append(row)
            kinds = ", ".join(f"{k} {v:.2f}" for k, v in sorted(row["kinds_ms"].items(), key=lambda kv: -kv[1]))
            print(f"{model:24s} {tokens:5d} tokens: {row['prefill_ms']:8.2f} ms ({row['tokens_per_s']:9.0f} tokens/s), "
                  f"{row['kernels']} kernels, device {row['device_ms']:.2f} ms ({kinds})", flush=True)
        del gen, loaded
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
