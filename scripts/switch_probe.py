"""What one of the runtime's on/off switches (a module function returning a bool, read once from the environment,
e.g. spqt.kernels.gpu_linear:norm_fold_on) is worth to a decode step: the step's CUDA graph captured with the switch off
and on, alternating, in one process (device machine; issue 14).

    python3 scripts/switch_probe.py --switch spqt.kernels.gpu_linear:norm_fold_on [--model synthetic:llama2-7b]
        [--sparsity 0] [--rounds 2] [--reps 30]

The first capture is a warm-up (bench_decode.alternating_step_us).
"""

import argparse
import importlib

from spqt.bench_decode import alternating_attribute_us, print_step_comparison, probe_arguments, probe_generator_from


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--switch", required=True, help="module:function")
    probe_arguments(ap, "synthetic:llama2-7b")
    ap.add_argument("--sparsity", type=float, default=0.0)
    args = ap.parse_args()
    module_name, name = args.switch.split(":")
    module = importlib.import_module(module_name)
    gen, prompt = probe_generator_from(args, args.sparsity)
    values = {"off": lambda: False, "on": lambda: True}
    results = alternating_attribute_us(gen, prompt, module, name, values, args.rounds, args.reps)
    print_step_comparison(f"{args.model} sparsity {args.sparsity}, {args.switch}", results)


if __name__ == "__main__":
    main()
