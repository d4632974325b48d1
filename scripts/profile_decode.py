"""Where one decode step's time goes, per kernel (device machine; prints a table, writes JSON).

    python3 scripts/profile_decode.py [--model synthetic:llama2-7b|default] [--sparsity 0.5] [--json OUT]

The step is the CUDA graph the runtime replays. We time replays with CUDA events (the step's
device time, no host work), then record a few replays under torch.profiler and group the
kernels by name: calls per step and device microseconds per step. The difference between the
replay time and the kernels' sum is the gap between kernels (launch latency inside the graph). The
output head's GEMV (quantized heads run on the layers' kernels) is the step's last GEMV: its own kind.
"""

import argparse
import json
import statistics
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from spqt.bench_decode import calibrate_on_own_activations, replay_device_us, synthetic_model
from spqt.generate import Generator


KINDS = (("_rms_norm_collect", "norm + collection"), ("_zigzag_mma", "GEMV"), ("zigzag_q4k_gemv", "GEMV"),
         ("_reduce_kernel", "reduction"),
         ("_collect", "collection"), ("_rms_norm", "norm"), ("_rope_attention", "attention (+RoPE, KV write)"),
         ("_rope_kv", "RoPE + KV write"), ("attention", "attention"), ("fmha", "attention"), ("flash", "attention"),
         ("softmax", "attention"), ("gemv", "head (cuBLAS)"), ("gemm", "head (cuBLAS)"), ("xmma", "head (cuBLAS)"),
         ("cutlass", "head (cuBLAS)"), ("nvjet", "head (cuBLAS)"), ("_row_kernel", "GEMV"))


def kind_of(name: str) -> str:
    """The part of the step a kernel belongs to, by its name (what the issue's table groups by)."""
    low = name.lower()
    return next((kind for key, kind in KINDS if key in low), "other (mask, argmax, embedding, ...)")


def step_kinds(names: list[str]) -> list[str]:
    """The kinds (kind_of) of one step's kernels in launch order, the output head's told apart: the step's last GEMV
    is the head's (after the final norm) and a reduction right after it finishes the head."""
    kinds = [kind_of(n) for n in names]
    if any(k.startswith("head") for k in kinds):  # a head on its own kernels (cuBLAS) is known by name
        return kinds
    last = max((i for i, k in enumerate(kinds) if k == "GEMV"), default=None)
    if last is not None:
        kinds[last] = "head (GEMV)"
        if last + 1 < len(kinds) and kinds[last + 1] == "reduction":
            kinds[last + 1] = "head (reduction)"
    return kinds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="synthetic:llama2-7b")
    ap.add_argument("--sparsity", type=float, default=0.0)
    ap.add_argument("--layout", default="zigzag")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.model.startswith("synthetic:"):
        loaded = synthetic_model(args.model.split(":", 1)[1], args.layout, 64)
    else:
        from spqt.checkpoint import load_spqt
        from spqt.default_model import default_spqt

        loaded = load_spqt(default_spqt(progress=False))
    gen = Generator(loaded, "cuda", max_len=64)
    prompt = torch.randint(0, loaded.config.vocab_size, (10,), device="cuda")
    if args.sparsity > 0:
        table = (calibrate_on_own_activations(gen, prompt, args.sparsity)
                 if args.model.startswith("synthetic:") else None)
        gen.set_sparsity(args.sparsity, table=table)
    gen.generate(prompt.tolist(), 8, track=False)  # captures the graph with the chosen setting
    graph = gen._graph
    step_us = statistics.median(replay_device_us(graph, 30))
    reps = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
    per_name = defaultdict(lambda: [0, 0.0])
    events = sorted((ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda ev: ev.time_range.start)
    for ev in events:
        per_name[ev.name][0] += 1
        per_name[ev.name][1] += ev.device_time
    rows = sorted(((name, n / reps, us / reps) for name, (n, us) in per_name.items()), key=lambda r: -r[2])
    kinds = defaultdict(lambda: [0.0, 0.0])
    per_step = len(events) // reps  # the replays launch the same kernels in the same order
    steps = [events[start:start + per_step] for start in range(0, len(events), per_step)]
    if len(events) != per_step * reps or any([e.name for e in st] != [e.name for e in steps[0]] for st in steps):
        print(f"(the profiler's {len(events)} kernels do not split into {reps} equal replays: kinds by name only, "
              f"the head's GEMV counted as GEMV)")
        steps = [[ev] for ev in events]  # kind_of alone
    for step in steps:
        for ev, kind in zip(step, step_kinds([ev.name for ev in step]) if len(step) > 1 else [kind_of(step[0].name)]):
            kinds[kind][0] += 1 / reps
            kinds[kind][1] += ev.device_time / reps
    kernel_us = sum(r[2] for r in rows)
    launches = sum(r[1] for r in rows)
    print(f"{args.model} {args.layout} sparsity {args.sparsity}: graph replay {step_us:.1f} us/step (median of 30), "
          f"{launches:.0f} kernels, their sum {kernel_us:.1f} us, gaps {step_us - kernel_us:.1f} us")
    print(f"{'kernel':70s} {'calls':>6s} {'us/step':>9s} {'us/call':>8s} {'share':>6s}")
    for name, n, us in rows:
        print(f"{name[:70]:70s} {n:6.0f} {us:9.1f} {us / n:8.2f} {100 * us / step_us:5.1f}%")
    print(f"\n{'kind':28s} {'calls':>6s} {'us/step':>9s}")
    for kind, (n, us) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
        print(f"{kind:28s} {n:6.0f} {us:9.1f}")
    print(f"{'gaps (replay - kernel sum)':28s} {'':6s} {step_us - kernel_us:9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "layout": args.layout, "sparsity": args.sparsity,
                       "device": torch.cuda.get_device_name(), "step_us": step_us, "kernel_sum_us": kernel_us,
                       "kernels": [{"name": n, "calls": c, "us": u} for n, c, u in rows],
                       "kinds": {k: {"calls": c, "us": u} for k, (c, u) in kinds.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
