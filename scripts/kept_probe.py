"""What a sparse map in ONE launch gives a decode step (issue 14): the step's CUDA graph at a sparsity level with the
collected sparse maps (SPQT_SPARSE_KEPT=0: a collection launch, or the norm fused with it, then B4 and its reduction;
the default where the model has no tuned step route, tuning.decode_route) against MODE_KEPT
(SPQT_SPARSE_KEPT=1: each program of the GEMV lists its share's kept inputs itself, B2's grid and finishes, the norm
folded), with the tuned crossovers (on every sparse map, on the norm-fed ones, on the others: =norm, =plain) and with
every thresholded map sparse, the table's choice per map (SPQT_SPARSE_KEPT=table: MODE_KEPT from its own crossover
on), and the dense step; alternating in one process, device time (device machine).

    python3 scripts/kept_probe.py [--model synthetic:llama2-7b] [--levels 0.5 0.25] [--rounds 2] [--reps 30]

The first capture is a warm-up (the seventh session's order effect: a process's first graph replays faster).
"""

import argparse
import os
import statistics

import torch

from spqt.bench_decode import alternating_step_us, calibrate_on_own_activations, probe_arguments, probe_generator_from
from spqt.generate import set_dense_fallback


def main():
    ap = argparse.ArgumentParser()
    probe_arguments(ap, "synthetic:llama2-7b")
    ap.add_argument("--levels", type=float, nargs="+", default=[0.5, 0.25])
    args = ap.parse_args()
    gen, prompt = probe_generator_from(args)
    tables = {level: calibrate_on_own_activations(gen, torch.tensor(prompt, device="cuda"), level)
              for level in args.levels}

    def setup(level: float, kept: str, fallback: bool):
        def apply():
            os.environ["SPQT_SPARSE_KEPT"] = kept  # gpu_linear.kept_setting
            if level > 0:
                gen.set_sparsity(level, table=tables[level])
            else:
                gen.sparsity = 0.0  # generate() turns the thresholds off (set_sparse)
            set_dense_fallback(gen.model, fallback)
        return apply

    for level in args.levels:
        setups = {"collected (=0)": setup(level, "0", True),
                  "kept": setup(level, "1", True),
                  "kept, norm-fed maps": setup(level, "norm", True),
                  "kept, the other maps": setup(level, "plain", True),
                  "kept, every map sparse": setup(level, "1", False),
                  "the table's choice": setup(level, "table", True),
                  "dense": setup(0.0, "0", True)}
        results = alternating_step_us(gen, prompt, setups, args.rounds, args.reps)
        setups["kept"]()
        dense_maps = len(gen.dense_fallbacks())
        base = statistics.median(results["collected (=0)"])
        print(f"{args.model} at {level:.0%} ({dense_maps} maps dense below their crossover), step device time (us), "
              f"median of {args.reps} replays a round:")
        for name, times in results.items():
            median = statistics.median(times)
            print(f"  {name:<24} {', '.join(f'{t:.1f}' for t in times)}  ({base - median:+.1f} us less than collected, "
                  f"{1e6 / median:.1f} steps/s)")
    os.environ.pop("SPQT_SPARSE_KEPT", None)


if __name__ == "__main__":
    main()
