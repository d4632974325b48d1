"""The next map's prefetch in a whole decode step (issue 14): each CUDA GEMV's programs, once their chunks are done,
ask L2 for the first columns of the next map's shares (zigzag_q4k.cu's NEXT_PF, SPQT_NEXT_PREFETCH=columns[:where]), so
DRAM streams the next map while this one's last programs, its reduction and the attention run. The step's CUDA
graph captured with each value, alternating, in one process (device machine).

    python3 scripts/next_prefetch_probe.py --columns 0 64 64:2 64:3 64:4 [--model synthetic:llama2-7b] [--sparsity 0]

The first capture is a warm-up (bench_decode.alternating_step_us); the first value is the baseline.
"""

import argparse
import os

from spqt.bench_decode import alternating_step_us, print_step_comparison, probe_arguments, probe_generator_from
from spqt.kernels.gpu_linear import NEXT_PREFETCH_ENV


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--columns", nargs="+", required=True,
                    help="SPQT_NEXT_PREFETCH values, columns[:where] (0: none; the first is the baseline)")
    probe_arguments(ap, "synthetic:llama2-7b")
    ap.add_argument("--sparsity", type=float, default=0.0)
    args = ap.parse_args()
    gen, prompt = probe_generator_from(args, args.sparsity)

    def setup(value: str):
        return lambda: os.environ.__setitem__(NEXT_PREFETCH_ENV, value)

    results = alternating_step_us(gen, prompt, {f"{NEXT_PREFETCH_ENV}={c}": setup(c) for c in args.columns},
                                  args.rounds, args.reps)
    print_step_comparison(f"{args.model} sparsity {args.sparsity}, the next map's first columns prefetched", results)


if __name__ == "__main__":
    main()
