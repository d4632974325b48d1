"""What the decode attention costs a step's chain: the step's CUDA graph captured with the one-launch attention
(fused.rope_attention_decode, what ships), with it replaced by one trivial launch (a copy of the query rows: the launch
without the work), and with no launch at all (the o map reads the query rows in place), alternating, in one process
(device machine; issue 14). The two replacements give wrong outputs: timing only.

    python3 scripts/attention_ceiling_probe.py [--model synthetic:llama2-70b] [--rounds 2] [--reps 30]

The first capture is a warm-up (bench_decode.alternating_step_us).
"""

import argparse
import statistics

from spqt.bench_decode import alternating_step_us, probe_arguments, probe_generator
from spqt.kernels import fused


def main():
    ap = argparse.ArgumentParser()
    probe_arguments(ap, "synthetic:llama2-70b")
    args = ap.parse_args()
    gen, prompt = probe_generator(args.model)
    shipped = fused.rope_attention_decode

    def queries(qkv, table, positions, cache_k, cache_v, n_heads, n_kv, length):
        b, hd = qkv.shape[0], cache_k.shape[-1]
        return qkv[..., :n_heads * hd].reshape(b, 1, n_heads, hd)

    variants = {"attention": shipped,
                "one copy launch": lambda qkv, *rest: queries(qkv, *rest).clone(),
                "no launch": queries}

    def setup(name):
        def apply():
            fused.rope_attention_decode = variants[name]
        return apply

    results = alternating_step_us(gen, prompt, {name: setup(name) for name in variants}, args.rounds, args.reps)
    fused.rope_attention_decode = shipped
    median = {name: statistics.median(r) for name, r in results.items()}
    print(f"{args.model} dense, step device time (us): " + "; ".join(
        f"{name} {', '.join(f'{x:.1f}' for x in r)}" for name, r in results.items()))
    base = median["attention"]
    for name in list(variants)[1:]:
        print(f"  {name}: {base - median[name]:.1f} us less than the attention ({100 * (base - median[name]) / base:.1f} %)")


if __name__ == "__main__":
    main()
