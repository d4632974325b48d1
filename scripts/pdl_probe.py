"""When a kernel lets the next one launch: after its griddepcontrol.wait (the runtime's default, PDL_LATE) or at its
start (SPQT_PDL_EARLY=1, PDL_EARLY): the decode step's CUDA graph captured with each, alternating, in one process,
device time of lone replays (device machine; issue 14). With PDL_LATE a GEMV launches only once the reduction
before it has waited for the GEMV before that, so its launch and its first chunk's loads follow that GEMV's end;
with PDL_EARLY they overlap its tail. Then 8 greedy tokens under each: the same tokens (the same bits) expected.

    python3 scripts/pdl_probe.py [--model synthetic:llama2-70b] [--rounds 2] [--reps 30]

The first capture is a warm-up (bench_decode.alternating_step_us).
"""

import argparse
import os
import statistics

import torch

from spqt.bench_decode import alternating_step_us, synthetic_model
from spqt.generate import Generator
from spqt.kernels import zigzag_mma


def use(early: bool) -> None:
    os.environ["SPQT_PDL_EARLY"] = "1" if early else "0"
    zigzag_mma.pdl_early.cache_clear()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="synthetic:llama2-70b")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    loaded = synthetic_model(args.model.split(":", 1)[1], "zigzag", 64)
    gen = Generator(loaded, "cuda", max_len=64)
    prompt = torch.randint(0, loaded.config.vocab_size, (10,), device="cuda").tolist()
    setups = {"late": lambda: use(False), "early": lambda: use(True)}
    results = alternating_step_us(gen, prompt, setups, args.rounds, args.reps)
    median = {name: statistics.median(r) for name, r in results.items()}
    print(f"{args.model} dense, step device time (us): " + "; ".join(
        f"{name} {', '.join(f'{x:.1f}' for x in r)}" for name, r in results.items()))
    print(f"  early: {median['late'] - median['early']:.1f} us less than late "
          f"({100 * (median['late'] - median['early']) / median['late']:.1f} %)")
    tokens = {}
    for name, setup in setups.items():
        setup()
        gen.drop_graphs()
        tokens[name] = gen.generate(prompt, 8, track=False).tokens
    print(f"  greedy tokens equal: {tokens['late'] == tokens['early']} ({tokens['early']})")


if __name__ == "__main__":
    main()
