"""What the RMSNorm launches cost a decode step: the step's CUDA graph replayed with the norms, then
with every RMSNorm replaced by the identity (wrong outputs, the same GEMVs), alternating, in one
process (device machine; issue 14: the ceiling of folding the norms into their neighbours).

    python3 scripts/norm_ceiling_probe.py [--model synthetic:llama2-70b] [--rounds 2] [--reps 30]

A process's first captured graph replays ~3 % faster than later ones (seventh session's order
effect), so the first capture is a warm-up and only later captures are compared.
"""

import argparse
import statistics

import torch

from spqt import model as model_module
from spqt.bench_decode import replay_device_us, synthetic_model
from spqt.generate import Generator


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="synthetic:llama2-70b")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    loaded = synthetic_model(args.model.split(":", 1)[1], "zigzag", 64)
    gen = Generator(loaded, "cuda", max_len=64)
    prompt = torch.randint(0, loaded.config.vocab_size, (10,), device="cuda").tolist()
    norm_forward = model_module.RMSNorm.forward

    def step_us(with_norms: bool) -> float:
        model_module.RMSNorm.forward = norm_forward if with_norms else (lambda self, x: x)
        gen.drop_graphs()
        gen.generate(prompt, 8, track=False)  # captures a graph with this setting
        return statistics.median(replay_device_us(gen._graph, args.reps))

    step_us(True)  # the first capture: a warm-up (it replays faster than any later one)
    results = {True: [], False: []}
    for _ in range(args.rounds):
        for with_norms in (True, False):
            results[with_norms].append(step_us(with_norms))
    model_module.RMSNorm.forward = norm_forward
    a, b = statistics.median(results[True]), statistics.median(results[False])
    print(f"{args.model} dense: step with norms {', '.join(f'{x:.1f}' for x in results[True])} us, "
          f"norms as identity {', '.join(f'{x:.1f}' for x in results[False])} us: the norms cost {a - b:.1f} us "
          f"({100 * (a - b) / a:.1f} %)")


if __name__ == "__main__":
    main()
