"""Map finishes in the chain of a decode step: the step's CUDA graph captured with the shipped table and with
variants of it (some dense entries overridden: another split, a cluster finish), alternating, in one process
(device machine; issue 14). The tuner times a map alone, where a reduction launch costs ~1-2 us; in a step the
reductions of q|k|v and gate|up cost the 70B ~4 us each (scripts/reduce_ceiling_probe.py), so a finish is judged
here, in the step.

    python3 scripts/finish_probe.py --model synthetic:llama2-70b \
        --variants '{"qkv c16": {"10240x8192": {"split": 16, "cluster": true}}}' [--sparsity 0.5] [--rounds 2]

The first capture is a warm-up (bench_decode.alternating_step_us).
"""

import argparse
import copy
import json
import statistics

from spqt.bench_decode import alternating_step_us, probe_arguments, probe_generator_from
from spqt.kernels import tuning
from table_probe import configure


def main():
    ap = argparse.ArgumentParser()
    probe_arguments(ap, "synthetic:llama2-70b")
    ap.add_argument("--variants", required=True, help="JSON: name -> {shape: dense entry keys overridden}")
    ap.add_argument("--sparsity", type=float, default=0.0, help="the step's level (thresholds from its own activations)")
    args = ap.parse_args()
    shipped = tuning._load_table(tuning.device_key())
    tables = {"shipped": shipped}
    for name, overrides in json.loads(args.variants).items():
        entries = copy.deepcopy(shipped)
        for shape, keys in overrides.items():
            entries["zigzag_dense"][shape] = {**entries["zigzag_dense"][shape], **keys}
        tables[name] = entries
    gen, prompt = probe_generator_from(args, args.sparsity)
    setups = {name: (lambda e=entries: configure(gen, e)) for name, entries in tables.items()}
    results = alternating_step_us(gen, prompt, setups, args.rounds, args.reps)
    median = {name: statistics.median(r) for name, r in results.items()}
    base = median["shipped"]
    print(f"{args.model} at sparsity {args.sparsity:g}, step device time (us), median of {args.reps} replays a round:")
    for name, r in results.items():
        print(f"  {name:<24} {', '.join(f'{x:.1f}' for x in r)}  ({base - median[name]:+.1f} us less than shipped)")


if __name__ == "__main__":
    main()
