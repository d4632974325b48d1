"""The CPU's decode step of the default model: its rate against the context, and what sparsity levels cost or save.

    PYTHONPATH=src python scripts/cpu_decode_probe.py contexts [--contexts 10,300,1100,2100,4050]
    PYTHONPATH=src python scripts/cpu_decode_probe.py levels [--rounds 6]
    PYTHONPATH=src python scripts/cpu_decode_probe.py maps [--rounds 7]
    PYTHONPATH=src python scripts/cpu_decode_probe.py prefill [--contexts 512,1100,4050] [--model M.spqt]

contexts: greedy decode (Generator.generate, 33 tokens, native maps) after a prompt of each length; the decode rate it
reports. levels: decode steps (Generator.decode_step, 40 a round, median) of one Generator per setting (dense, every
map at 25 / 40 / 50 / 65 %, greedy thresholds at 25 / 50 / 65 %), the settings in turn each round so they share the
machine's state; dense_fallback off, so each level runs sparse as asked (what the CPU's crossover is measured from).
maps: the 120 layer maps of one token alone, dense against the sparse product at each level (x random, the
threshold its level's quantile), 5 passes a round: the maps' weights stream from memory as in a step. prefill: the
prefill of a prompt of each length (Generator.generate, one new token; the faster of two).
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from spqt.checkpoint import load_spqt
from spqt.default_model import default_spqt
from spqt.generate import Generator, set_sparse, sparse_linears

CONTEXTS = "10,300,1100,2100,4050"
SETTINGS = [("dense", 0.0, "unified"), ("every map 25 %", 0.25, "unified"), ("every map 40 %", 0.4, "unified"),
            ("every map 50 %", 0.5, "unified"), ("every map 65 %", 0.65, "unified"), ("greedy 25 %", 0.25, "greedy"),
            ("greedy 50 %", 0.5, "greedy"), ("greedy 65 %", 0.65, "greedy")]


def contexts(loaded, lengths: list[int]) -> None:
    gen = Generator(loaded, "cpu", max_len=max(lengths) + 40, backend="cpu-native")
    for n in lengths:
        result = gen.generate(list(range(100, 100 + n)), 33, track=False)
        print(f"context {n:5d}: decode {result.decode_tokens_per_s:6.1f} tokens/s", flush=True)


def prefill(loaded, lengths: list[int]) -> None:
    gen = Generator(loaded, "cpu", max_len=max(lengths) + 8, backend="cpu-native")
    for n in lengths:
        seconds = min(gen.generate(list(range(100, 100 + n)), 1, track=False).prefill_seconds for _ in range(2))
        print(f"prompt {n}: prefill {seconds:.2f} s ({n / seconds:.0f} tokens/s)", flush=True)


def levels(loaded, rounds: int) -> None:
    gens = {name: Generator(loaded, "cpu", max_len=64, backend="cpu-native", sparsity=s, mode=m,
                            dense_fallback=False) for name, s, m in SETTINGS}
    times = {name: [] for name in gens}
    with torch.inference_mode():
        for gen in gens.values():
            gen.model(torch.tensor([[1, 2, 3, 4, 5]]), torch.arange(5), kv_len=5)
        for _ in range(rounds):
            for (name, s, _), gen in zip(SETTINGS, gens.values()):
                set_sparse(gen.model, s > 0, track=False)
                steps = []
                for i in range(40):
                    t0 = time.perf_counter()
                    gen.decode_step(7, 10 + i)
                    steps.append(time.perf_counter() - t0)
                times[name].append(1e3 * statistics.median(steps))
    dense = statistics.median(times["dense"])
    for name, ms in times.items():
        step = statistics.median(ms)
        print(f"{name:15s} step {step:5.2f} ms ({100 * (step / dense - 1):+5.1f} % against dense), rounds "
              f"{[round(x, 2) for x in ms]}")


def maps(loaded, rounds: int) -> None:
    gen = Generator(loaded, "cpu", max_len=64, backend="cpu-native")
    lins = [lin for _, _, lin in sparse_linears(gen.model)]
    rng = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 1, lin.in_features, generator=rng) for lin in lins]
    levels_ = (0.0, 0.25, 0.5, 0.65)
    cut = {lv: [float(x.abs().quantile(lv)) for x in xs] for lv in levels_ if lv}

    def run(level: float) -> None:
        for i, (lin, x) in enumerate(zip(lins, xs)):
            if level:
                lin.impl.sparse_counted(x, cut[level][i], None, None, False)
            else:
                lin.impl.dense(x)

    times = {lv: [] for lv in levels_}
    for _ in range(rounds):
        for lv in levels_:
            run(lv)
            t0 = time.perf_counter()
            for _ in range(5):
                run(lv)
            times[lv].append(1e3 * (time.perf_counter() - t0) / 5)
    mb = sum(lin.impl.blocks.numel() for lin in lins) / 1e6
    for lv, ms in times.items():
        print(f"{len(lins)} maps ({mb:.0f} MB) at {100 * lv:2.0f} %: {statistics.median(ms):.2f} ms, rounds "
              f"{[round(x, 2) for x in ms]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("contexts", "levels", "maps", "prefill"))
    ap.add_argument("--contexts", default=CONTEXTS, help="prompt lengths (prefill: default 512,1100,4050)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--model", type=Path, default=None, help="a .spqt (default: the default model, zigzag Q4_K)")
    args = ap.parse_args()
    loaded = load_spqt(args.model or default_spqt(progress=False))
    print(f"torch threads {torch.get_num_threads()}")
    if args.what in ("contexts", "prefill"):
        default = "512,1100,4050" if args.what == "prefill" and args.contexts == CONTEXTS else args.contexts
        (contexts if args.what == "contexts" else prefill)(loaded, [int(n) for n in default.split(",")])
    elif args.what == "levels":
        levels(loaded, args.rounds)
    else:
        maps(loaded, args.rounds)


if __name__ == "__main__":
    main()
