"""Why does a decode graph captured after the first one replay slower? (device machine; prints a table)

    python3 scripts/order_probe.py [--model synthetic:llama2-7b] [--json OUT]

launch_probe.py found the first decode graph of a process 3.5 % faster than every graph captured after
a change of setting, and the first graph itself slow when timed again after them (sixth and seventh
sessions; the GPU's clocks stayed at 1,980 MHz throughout). This times one dense 7B graph (device time
of a replay, median of 20) through a sequence of steps that each change one thing, the graph kept:

  first        the first capture of the process
  loop         after the runtime's 128-token decode loop (captures the larger KV buckets)
  recapture    a new capture of the same setting (the runtime's graphs dropped first); then the first again
  empty-cache  after gc and torch.cuda.empty_cache()
  big-alloc    after 16 GiB were allocated, touched and freed
  new-weights  the same model's weights copied to new memory, a capture over them (the old freed)
"""

import argparse
import gc
import json
import statistics

import torch

from spqt.bench_decode import replay_device_us, synthetic_model
from spqt.generate import Generator


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="synthetic:llama2-7b")
    ap.add_argument("--max-len", type=int, default=146)
    ap.add_argument("--json")
    args = ap.parse_args()
    loaded = synthetic_model(args.model.split(":", 1)[1], "zigzag", args.max_len)
    gen = Generator(loaded, "cuda", max_len=args.max_len)
    prompt = torch.randint(0, loaded.config.vocab_size, (10,), device="cuda").tolist()
    gen.set_sparsity(0.0)
    rows = []

    def capture():
        gen._graph_key = None  # the runtime's graphs dropped: the next step captures anew
        gen.generate(prompt, 8, track=False)
        return gen._graph

    def timed(step, graph, which):
        us = statistics.median(replay_device_us(graph, 20, before=lambda: gen._set_io(1, 16)))
        rows.append({"step": step, "graph": which, "device_us": us})
        print(f"{step:12s} {which:6s} {us:8.1f} us/replay", flush=True)

    first = capture()
    timed("first", first, "first")
    gen.generate(prompt, 128, track=False)
    timed("loop", first, "first")
    second = capture()
    timed("recapture", second, "new")
    timed("recapture", first, "first")
    gc.collect()
    torch.cuda.empty_cache()
    timed("empty-cache", second, "new")
    timed("empty-cache", first, "first")
    big = torch.ones(16 << 30, dtype=torch.uint8, device="cuda")
    del big
    torch.cuda.synchronize()
    timed("big-alloc", second, "new")
    for p in gen.model.parameters():
        p.data = p.data.clone()
    for m in gen.model.modules():
        w = getattr(getattr(m, "impl", None), "w", None)
        for name in ("quants", "head"):
            if isinstance(getattr(w, name, None), torch.Tensor):
                setattr(w, name, getattr(w, name).clone())
    first = second = None
    gc.collect()
    torch.cuda.empty_cache()
    timed("new-weights", capture(), "new")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
