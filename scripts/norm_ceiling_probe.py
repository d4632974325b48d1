"""What the RMSNorm launches cost a decode step, and what folding them into the GEMVs takes back: the
step's CUDA graph replayed with a launch per norm (SPQT_NORM_FOLD's off), with the norms folded into the
CUDA B2 of the maps after them (the runtime's default), and with every RMSNorm replaced by the identity
(wrong outputs, the same GEMVs: the ceiling), alternating, in one process (device machine; issue 14).

    python3 scripts/norm_ceiling_probe.py [--model synthetic:llama2-70b] [--rounds 2] [--reps 30]

A process's first captured graph replays ~3 % faster than later ones (seventh session's order
effect), so the first capture is a warm-up and only later captures are compared.
"""

import argparse

from spqt import model as model_module
from spqt.bench_decode import alternating_step_us, print_step_comparison, probe_arguments, probe_generator_from
from spqt.kernels import gpu_linear


def main():
    ap = argparse.ArgumentParser()
    probe_arguments(ap, "synthetic:llama2-70b")
    args = ap.parse_args()
    gen, prompt = probe_generator_from(args)
    norm_forward = model_module.RMSNorm.forward
    fold_on = gpu_linear.norm_fold_on
    variants = {"launched": (True, False), "folded": (True, True), "identity": (False, False)}  # (norms, fold)

    def setup(with_norms: bool, fold: bool):
        def apply():
            model_module.RMSNorm.forward = norm_forward if with_norms else (lambda self, x: x)
            gpu_linear.norm_fold_on = lambda: fold
        return apply

    results = alternating_step_us(gen, prompt, {v: setup(*flags) for v, flags in variants.items()}, args.rounds,
                                  args.reps)
    model_module.RMSNorm.forward, gpu_linear.norm_fold_on = norm_forward, fold_on
    print_step_comparison(f"{args.model} dense", results)

if __name__ == "__main__":
    main()
