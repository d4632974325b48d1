"""The CUDA GEMV's -D knobs (zigzag_q4k.cu) in a whole decode step: the step's CUDA graph captured with each value
of SPQT_CUDA_DEFINES (added to every launch of the CUDA GEMV), alternating, in one process (device machine; issue 14).
E.g. RELEASE_LATE=1: each program releases the next kernel's launch once it has stored its sums, not after its wait.

    python3 scripts/defines_probe.py --defines "" "-DRELEASE_LATE=1" [--model synthetic:llama2-7b] [--sparsity 0]

The first capture is a warm-up (bench_decode.alternating_step_us); the first value is the baseline.
"""

import argparse
import os
import statistics

from spqt.bench_decode import alternating_step_us, probe_arguments, probe_generator_from
from spqt.kernels import zigzag_cuda


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--defines", nargs="+", required=True, help="SPQT_CUDA_DEFINES values (first: the baseline)")
    probe_arguments(ap, "synthetic:llama2-7b")
    ap.add_argument("--sparsity", type=float, default=0.0)
    args = ap.parse_args()
    gen, prompt = probe_generator_from(args, args.sparsity)

    def setup(defines: str):
        def apply():
            os.environ["SPQT_CUDA_DEFINES"] = defines
            zigzag_cuda.env_defines.cache_clear()  # read again: the next launches compile with these
        return apply

    results = alternating_step_us(gen, prompt, {d: setup(d) for d in args.defines}, args.rounds, args.reps)
    base = statistics.median(results[args.defines[0]])
    print(f"{args.model} sparsity {args.sparsity}, step device time (us) by SPQT_CUDA_DEFINES:")
    for d, r in results.items():
        print(f"  {d or '(none)':<28} {', '.join(f'{x:.1f}' for x in r)}  ({base - statistics.median(r):+.1f} us less "
              f"than {args.defines[0] or '(none)'})")


if __name__ == "__main__":
    main()
