"""How many programs the decode attention should give a head's key blocks: the step's CUDA graph captured with
fused.ATTN_PROGRAMS_PER_SM at each of --per-sm (heads x programs at most that many a SM), alternating, in one
process (device machine; issue 14). --prompt-tokens / --max-len set the span the timed steps attend; the graph's
key bucket (Generator._kv_bucket) sets the blocks the launch is sized for.

    python3 scripts/attention_programs_probe.py [--model synthetic:llama2-70b] [--prompt-tokens 300 --max-len 512]
        [--per-sm 1,2,4] [--rounds 2] [--reps 30]

The first capture is a warm-up (bench_decode.alternating_step_us).
"""

import argparse

from spqt.bench_decode import alternating_attribute_us, print_step_comparison, probe_arguments, probe_generator_from
from spqt.kernels import fused


def main():
    ap = argparse.ArgumentParser()
    probe_arguments(ap, "synthetic:llama2-70b")
    ap.add_argument("--per-sm", default="1,2,4", help="ATTN_PROGRAMS_PER_SM values, comma-separated")
    args = ap.parse_args()
    gen, prompt = probe_generator_from(args)
    values = {f"{v} a SM": int(v) for v in args.per_sm.split(",")}
    results = alternating_attribute_us(gen, prompt, fused, "ATTN_PROGRAMS_PER_SM", values, args.rounds, args.reps)
    print_step_comparison(f"{args.model} dense, {args.prompt_tokens} prompt tokens", results)


if __name__ == "__main__":
    main()
