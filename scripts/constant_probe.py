"""What a module constant of the runtime (e.g. spqt.kernels.fused:ATTN_LONG_FROM) is worth to a decode step: the
step's CUDA graph captured with the constant at each of --values, alternating, in one process (device machine;
issue 14). --prompt-tokens / --max-len set the span the timed steps attend.

    python3 scripts/constant_probe.py --constant spqt.kernels.fused:ATTN_LONG_FROM --values 2048,1024
        [--model synthetic:llama3-8b] [--prompt-tokens 1500 --max-len 3000] [--sparsity 0] [--rounds 2] [--reps 30]

The first capture is a warm-up (bench_decode.alternating_step_us).
"""

import argparse
import importlib

from spqt.bench_decode import alternating_attribute_us, print_step_comparison, probe_arguments, probe_generator_from


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--constant", required=True, help="module:NAME (an int)")
    ap.add_argument("--values", required=True, help="comma-separated ints, the first the baseline")
    probe_arguments(ap, "synthetic:llama3-8b")
    ap.add_argument("--sparsity", type=float, default=0.0)
    args = ap.parse_args()
    module_name, name = args.constant.split(":")
    module = importlib.import_module(module_name)
    gen, prompt = probe_generator_from(args, args.sparsity)
    values = {f"{name}={v}": int(v) for v in args.values.split(",")}
    results = alternating_attribute_us(gen, prompt, module, name, values, args.rounds, args.reps)
    print_step_comparison(f"{args.model} sparsity {args.sparsity}, {args.prompt_tokens} prompt tokens", results)


if __name__ == "__main__":
    main()
