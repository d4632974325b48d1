"""Is a decode step bound by the host's graph launch? (device machine; prints a table, writes JSON)

    python3 scripts/launch_probe.py [--model synthetic:llama2-7b] [--sparsity 0,0.5] [--pause S] [--again-first] [--json OUT]

For the runtime's CUDA graph of one decode step (as scripts/profile_decode.py captures it): the
device time of one replay (CUDA events around a replay, after a sync), the host time of the
replay call itself (N calls back to back, timed before the sync that waits for them), and the
wall time per replay of those N (host and device overlapped). If the host time per call is at
or above the device time, the step is launch-bound: fewer graph nodes, not fewer bytes, would
speed it up.
"""

import argparse
import json
import statistics
import time

import torch

from spqt.bench_decode import calibrate_on_own_activations, replay_device_us, synthetic_model
from spqt.generate import Generator


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="synthetic:llama2-7b")
    ap.add_argument("--sparsity", default="0,0.5")
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--max-len", type=int, default=64, help="the cache (spqt bench decode: 10 + 128 + 8 = 146)")
    ap.add_argument("--new-tokens", type=int, default=40, help="the decode loop's tokens after a 10-token prompt")
    ap.add_argument("--pause", type=float, default=0.0, help="seconds the GPU idles before each level's timing")
    ap.add_argument("--again-first", action="store_true",
                    help="at the end, time the first level's graph again (kept alive): a later capture's cost vs the "
                         "GPU's state after load")
    ap.add_argument("--json")
    args = ap.parse_args()
    loaded = synthetic_model(args.model.split(":", 1)[1], "zigzag", args.max_len)
    gen = Generator(loaded, "cuda", max_len=args.max_len)
    prompt = torch.randint(0, loaded.config.vocab_size, (10,), device="cuda")
    rows = []
    for s in (float(v) for v in args.sparsity.split(",")):
        # as spqt bench decode: thresholds from the prompt's own activations, TEAL (0: dense)
        table = calibrate_on_own_activations(gen, prompt, s) if s > 0 else None
        gen.set_sparsity(s, table=table, criterion="teal")
        gen.generate(prompt.tolist(), 8, track=False)  # captures the graph with this setting
        graph = gen._graph
        if not rows:
            first = (s, graph)  # a reference keeps the graph (and its memory pool) alive past the re-capture
        time.sleep(args.pause)
        # each replay feeds itself (token and position + 1 on the device): start every run at
        # position 16, so that the replays stay inside the 64-token cache the graph was made for
        dev = replay_device_us(graph, 20, before=lambda: gen._set_io(1, 16))
        host, wall = [], []
        for _ in range(5):
            gen._set_io(1, 16)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.replays):
                graph.replay()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            host.append((t1 - t0) / args.replays * 1e6)
            wall.append((t2 - t0) / args.replays * 1e6)
        # the runtime's own decode loop (spqt bench decode's step time), over the same positions
        res = gen.generate(prompt.tolist(), args.new_tokens, track=False)
        loop_us = 1e6 * statistics.median(res.step_seconds[2:])
        last_us = 1e6 * statistics.median(res.step_seconds[-32:])  # the last 32 positions
        row = {"sparsity": s, "device_us": statistics.median(dev), "host_call_us": statistics.median(host),
               "wall_per_replay_us": statistics.median(wall), "decode_loop_us": loop_us, "decode_last32_us": last_us,
               "dense_maps": len(gen.dense_fallbacks()) if s else 0}
        rows.append(row)
        print(f"{args.model} s={s:.2f}: device {row['device_us']:8.1f} us/replay, host {row['host_call_us']:8.1f} us/call, "
              f"{args.replays} back to back {row['wall_per_replay_us']:8.1f} us/replay, decode loop "
              f"{row['decode_loop_us']:8.1f} us/step (last 32: {row['decode_last32_us']:.1f}) ({row['dense_maps']} maps dense)",
              flush=True)
    if args.again_first:
        time.sleep(args.pause)
        dev = statistics.median(replay_device_us(first[1], 20, before=lambda: gen._set_io(1, 16)))
        rows.append({"sparsity": first[0], "device_us": dev, "again_first": True})
        print(f"{args.model} s={first[0]:.2f}: device {dev:8.1f} us/replay (the first graph again, after the others)",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
