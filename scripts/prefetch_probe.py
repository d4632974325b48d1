"""What asking L2 for the o projection's weights during the decode attention takes off a step: the step's CUDA
graph captured with the prefetch (the runtime's default) and without (SPQT_L2_PREFETCH=0's path), alternating, in
one process (device machine; issue 14).

    python3 scripts/prefetch_probe.py [--model synthetic:llama2-7b] [--rounds 2] [--reps 30]

The first capture is a warm-up (bench_decode.alternating_step_us).
"""

import argparse
import statistics

import torch

from spqt import functional
from spqt.bench_decode import alternating_step_us, synthetic_model
from spqt.generate import Generator


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="synthetic:llama2-7b")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    loaded = synthetic_model(args.model.split(":", 1)[1], "zigzag", 64)
    gen = Generator(loaded, "cuda", max_len=64)
    prompt = torch.randint(0, loaded.config.vocab_size, (10,), device="cuda").tolist()
    shipped = functional.l2_prefetch_on

    def setup(on: bool):
        def apply():
            functional.l2_prefetch_on = lambda: on
        return apply

    results = alternating_step_us(gen, prompt, {"no prefetch": setup(False), "prefetch": setup(True)}, args.rounds,
                                  args.reps)
    functional.l2_prefetch_on = shipped
    median = {v: statistics.median(r) for v, r in results.items()}
    print(f"{args.model} dense, step device time (us): " + "; ".join(
        f"{v} {', '.join(f'{x:.1f}' for x in r)}" for v, r in results.items()))
    less = median["no prefetch"] - median["prefetch"]
    print(f"  prefetch: {less:.1f} us less than without ({100 * less / median['no prefetch']:.1f} %)")


if __name__ == "__main__":
    main()
