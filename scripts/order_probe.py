"""Why does a decode graph captured after the first one replay slower? (device machine; prints a table)

    python3 scripts/order_probe.py [--model synthetic:llama2-7b] [--steps first,loop,recapture,...] [--json OUT]

launch_probe.py found the first decode graph of a process 3.5 % faster than every graph captured after
a change of setting, and the first graph itself slow when timed again after them (sixth and seventh
sessions; the GPU's clocks stayed at 1,980 MHz throughout). This times one dense 7B graph (device time
of a replay, median of 20) through a sequence of steps that each change one thing, the first graph kept:

  first         the first capture of the process (always the first step)
  loop          after the runtime's 128-token decode loop (captures the larger KV buckets)
  drop          the runtime's graphs dropped (destroyed), none captured
  capture-keep  a new capture of the same setting, every earlier graph kept alive
  recapture     a new capture of the same setting, the runtime's graphs dropped first
  empty-cache   after gc and torch.cuda.empty_cache()
  big-alloc     after 16 GiB were allocated, touched and freed
  new-weights   the same model's weights copied to new memory, a capture over them (the old freed)
"""

import argparse
import gc
import json
import statistics

import torch

from spqt.bench_decode import replay_device_us, synthetic_model
from spqt.generate import Generator

STEPS = ("first", "loop", "drop", "capture-keep", "recapture", "empty-cache", "big-alloc", "new-weights")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="synthetic:llama2-7b")
    ap.add_argument("--max-len", type=int, default=146)
    ap.add_argument("--steps", default="first,loop,recapture,empty-cache,big-alloc,new-weights")
    ap.add_argument("--json")
    args = ap.parse_args()
    steps = args.steps.split(",")
    if steps[0] != "first" or not set(steps) <= set(STEPS):
        ap.error(f"--steps: first, then any of {', '.join(STEPS[1:])}")
    loaded = synthetic_model(args.model.split(":", 1)[1], "zigzag", args.max_len)
    gen = Generator(loaded, "cuda", max_len=args.max_len)
    prompt = torch.randint(0, loaded.config.vocab_size, (10,), device="cuda").tolist()
    gen.set_sparsity(0.0)
    rows, kept = [], []

    def drop():
        gen.drop_graphs()
        gc.collect()

    def capture():
        gen.generate(prompt, 8, track=False)
        return gen._graph

    def timed(step, graph, which):
        us = statistics.median(replay_device_us(graph, 20, before=lambda: gen._set_io(1, 16)))
        rows.append({"step": step, "graph": which, "device_us": us})
        print(f"{step:12s} {which:6s} {us:8.1f} us/replay", flush=True)

    first = latest = None
    for step in steps:
        if step == "first":
            first = latest = capture()
        elif step == "loop":
            gen.generate(prompt, 128, track=False)
        elif step == "drop":
            drop()
        elif step == "capture-keep":
            kept.append(dict(gen._graphs))  # every earlier graph stays alive
            gen.drop_graphs()
            latest = capture()
        elif step == "recapture":
            drop()
            latest = capture()
        elif step == "empty-cache":
            gc.collect()
            torch.cuda.empty_cache()
        elif step == "big-alloc":
            torch.ones(16 << 30, dtype=torch.uint8, device="cuda").zero_()  # allocated, touched, freed
            torch.cuda.synchronize()
        elif step == "new-weights":
            for p in gen.model.parameters():
                p.data = p.data.clone()
            for m in gen.model.modules():
                w = getattr(getattr(m, "impl", None), "w", None)
                for name in ("quants", "head"):
                    if isinstance(getattr(w, name, None), torch.Tensor):
                        setattr(w, name, getattr(w, name).clone())
            drop()
            first = None
            gc.collect()
            torch.cuda.empty_cache()
            latest = capture()
        if first is not None:
            timed(step, first, "first")
        if latest is not first:
            timed(step, latest, "latest")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "steps": steps, "device": torch.cuda.get_device_name(), "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
