"""The split-K reduction's tile in the decode step: the step's CUDA graph captured with gemv.reduce_block as shipped
(about 4096 partial sums a program) and with smaller / larger tiles (more / fewer reduction programs), the workspaces
rebuilt for each, alternating, in one process (device machine; issue 14). In a 70B step the reductions cost ~666 us
(scripts/reduce_ceiling_probe.py), far more than their kernels alone: is it their programs' latency?

    PYTHONPATH=src:scripts python3 scripts/reduce_block_probe.py [--model synthetic:llama2-70b] [--sums 1024,4096,16384]

The first capture is a warm-up (bench_decode.alternating_step_us).
"""

import argparse
import statistics

from spqt.bench_decode import alternating_step_us, probe_arguments, probe_generator_from
from spqt.kernels import gemv as kg
from spqt.kernels import tuning
from table_probe import configure


def main():
    ap = argparse.ArgumentParser()
    probe_arguments(ap, "synthetic:llama2-70b")
    ap.add_argument("--sums", default="4096,1024,2048,16384", help="partial sums a reduction program adds (first: shipped)")
    args = ap.parse_args()
    shipped = kg.reduce_block
    entries = tuning._load_table(tuning.device_key())
    gen, prompt = probe_generator_from(args)

    def setup(sums: int):
        def apply():
            kg.reduce_block = lambda split: shipped(split, sums)
            configure(gen, entries)  # workspaces (the sums of squares' length) for this tile
        return apply

    sizes = [int(s) for s in args.sums.split(",")]
    results = alternating_step_us(gen, prompt, {s: setup(s) for s in sizes}, args.rounds, args.reps)
    kg.reduce_block = shipped
    base = statistics.median(results[sizes[0]])
    print(f"{args.model} dense, step device time (us) by partial sums a reduction program adds:")
    for s, r in results.items():
        print(f"  {s:>6}: {', '.join(f'{x:.1f}' for x in r)}  ({base - statistics.median(r):+.1f} us less than {sizes[0]})")


if __name__ == "__main__":
    main()
