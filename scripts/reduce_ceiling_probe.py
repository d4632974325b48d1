"""What the split-K reduction launches cost a decode step: the step's CUDA graph replayed as shipped, with the
reductions of the maps without a residual skipped (q|k|v and gate|up: what folding them into their consumers, the
attention and down's GEMV, could take back at most), and with every layer map's reduction skipped (wrong outputs,
the same GEMVs: the ceiling), alternating, in one process (device machine; issue 14). Timing only: a skipped reduction leaves
its output stale, so the tokens are wrong. The output head's reduction always runs (the twelfth session's run at
29e6ab4 skipped it too: one launch a step besides the layer maps' it names).

    python3 scripts/reduce_ceiling_probe.py [--model synthetic:llama2-7b] [--rounds 2] [--reps 30]

The first capture is a warm-up (the seventh session's order effect: a process's first graph replays faster).
"""

import argparse

from spqt.bench_decode import alternating_step_us, print_step_comparison, probe_arguments, probe_generator_from
from spqt.kernels import gemv as kg


class _SkippingReduce:
    """Stands in for gemv._reduce_kernel: launches it unless skip(its positional, its keyword arguments) holds."""

    def __init__(self, kernel, skip):
        self.kernel, self.skip = kernel, skip

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda *a, **kw: None if self.skip(a, kw) else launch(*a, **kw)


def main():
    ap = argparse.ArgumentParser()
    probe_arguments(ap, "synthetic:llama2-7b")
    args = ap.parse_args()
    gen, prompt = probe_generator_from(args)
    shipped = kg._reduce_kernel
    vocab = gen.loaded.config.vocab_size
    # _reduce_kernel's positional arguments: partials, y, residual, N, ...: the output head's (N = vocab) is kept
    skips = {"shipped": lambda a, kw: False,
             "no q|k|v, gate|up reductions": lambda a, kw: kw["EPILOGUE"] != kg.EPILOGUE_RESIDUAL and a[3] != vocab,
             "no reductions": lambda a, kw: a[3] != vocab}

    def setup(skip):
        def apply():
            kg._reduce_kernel = shipped if skip is skips["shipped"] else _SkippingReduce(shipped, skip)
        return apply

    results = alternating_step_us(gen, prompt, {v: setup(s) for v, s in skips.items()}, args.rounds, args.reps)
    kg._reduce_kernel = shipped
    print_step_comparison(f"{args.model} dense", results)


if __name__ == "__main__":
    main()
