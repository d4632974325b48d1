"""How much of a decode step's GEMV time is per-launch cost that overlapping the maps would take back: every layer
map of a synthetic model (dense B2 with the tuned configs, each map finished without an epilogue: no residual,
SwiGLU or folded norm; no attention or head) captured in one CUDA graph on one stream in the step's order, against
the same maps issued on four streams (q|k|v, o, gate|up and down each on its own, no dependencies between them, so
consecutive maps run side by side), against a copy that reads (and writes) as many bytes as the maps' blocks hold
(device machine; issue 14). One stream is what a chain of launches costs; four streams bound what a
kernel that streams the next map's weights while the last one finishes (a persistent kernel) could reach.

    python3 scripts/overlap_probe.py [--model synthetic:llama2-7b] [--reps 30]

The maps' inputs are fixed random vectors: the outputs are not used. Device time of the replays, median; a graph
captured and replayed first is not counted (a process's first capture replays ~3 % faster: bench_decode).
"""

import argparse
import statistics

import torch

from spqt.bench_decode import probe_generator, replay_device_us
from spqt.generate import sparse_linears


def captured(calls: list, streams: list[torch.cuda.Stream]) -> torch.cuda.CUDAGraph:
    """A CUDA graph of calls[i] issued on streams[i % len(streams)], forked from and joined to the capture stream
    (a warm-up run first: compiles, allocates)."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        main = torch.cuda.current_stream()
        fork = torch.cuda.Event()
        fork.record(main)
        for s in streams:
            s.wait_event(fork)
        for i, call in enumerate(calls):
            with torch.cuda.stream(streams[i % len(streams)]):
                call()
        for s in streams:
            done = torch.cuda.Event()
            done.record(s)
            main.wait_event(done)
    return graph


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="synthetic:llama2-7b")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    gen, _ = probe_generator(args.model)
    maps = [lin for _, _, lin in sparse_linears(gen.model)]  # layer order: q|k|v, o, gate|up, down
    inputs = {k: torch.randn(k, device="cuda", dtype=torch.float16) for k in {lin.in_features for lin in maps}}
    calls = [(lambda lin=lin: lin.impl.dense(inputs[lin.in_features])) for lin in maps]
    weight_bytes = sum(lin.impl.w.nbytes for lin in maps)  # the blocks' bytes (no head-group padding)
    src = torch.empty(weight_bytes // 4, dtype=torch.float16, device="cuda")  # reads half, writes half of the bytes
    dst = torch.empty_like(src)
    captured(calls, [torch.cuda.Stream()]).replay()  # the process's first capture: not compared
    torch.cuda.synchronize()
    graphs = {"one stream": captured(calls, [torch.cuda.Stream()]),
              "four streams": captured(calls, [torch.cuda.Stream() for _ in range(4)]),
              "copy (as many bytes)": captured([lambda: dst.copy_(src)], [torch.cuda.Stream()])}
    times = {name: [] for name in graphs}
    for _ in range(2):  # alternating rounds
        for name, graph in graphs.items():
            times[name].append(statistics.median(replay_device_us(graph, args.reps)))
    print(f"{args.model}: {len(maps)} maps, {weight_bytes / 1e9:.2f} GB of weights, device time (us), median of "
          f"{args.reps} replays a round:")
    for name, t in times.items():
        print(f"  {name:<20} {', '.join(f'{x:.1f}' for x in t)}")
    one, four = statistics.median(times["one stream"]), statistics.median(times["four streams"])
    print(f"  four streams take {one - four:.1f} us ({100 * (one - four) / one:.1f} %) less than one; "
          f"{(one - four) / len(maps):.2f} us a map")


if __name__ == "__main__":
    main()
