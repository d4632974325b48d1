"""Where `spqt bench decode`'s step time exceeds the probes' graph replay (issue 14: 70B +0.19 ms, 7B +0.07 ms):
the attended span or the back-to-back replays. In one process (device machine), dense: the pipelined greedy
decode's step time (the host's intervals between tokens, as the benchmark reports them) and the device time of
the same step's graph replayed alone, with the steps at positions around 16 and around 128.

    python3 scripts/span_probe.py [--model synthetic:llama2-70b] [--steps 16]
"""

import argparse
import statistics

import torch

from spqt.bench_decode import replay_device_us, synthetic_model
from spqt.generate import Generator


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="synthetic:llama2-70b")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    loaded = synthetic_model(args.model.split(":", 1)[1], "zigzag", 512)
    gen = Generator(loaded, "cuda", max_len=512)
    vocab = loaded.config.vocab_size
    g = torch.Generator().manual_seed(1)
    gen.generate(torch.randint(0, vocab, (10,), generator=g).tolist(), 8, track=False)  # warm-up capture
    for start in (8, 56, 120, 240):
        prompt = torch.randint(0, vocab, (start,), generator=g).tolist()
        res = gen.generate(prompt, args.steps + 2, track=False)
        wall = 1e6 * statistics.median(res.step_seconds[2:])
        replay = statistics.median(replay_device_us(gen._graph, args.reps))
        print(f"{args.model} steps at positions {start + 2}-{start + args.steps}: pipelined decode {wall:8.1f} us/step, "
              f"its last graph replayed alone {replay:8.1f} us (bucket {gen._kv_bucket(start + args.steps)})")


if __name__ == "__main__":
    main()
