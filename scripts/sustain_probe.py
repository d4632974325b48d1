"""Why `spqt bench gemv`'s B2 of Q2_K-Q6_K read 5-16 % over `spqt tune`'s time of the same config on the large
shapes before its warm-up (docs/RESULTS.md, fifty-first and fifty-second sessions) while Q4_K's and Q8_0's agreed: B2
of each type at its shipped config, one CUDA graph of at least 16 launches over weight copies larger than L2 (as both
time it), replayed REPLAYS times in a row after a second idle, each replay timed with CUDA events as bench.time_graph
times it; the GPU's SM clock, power and throttle reasons sampled by nvidia-smi meanwhile (taken over the replays
alone). Prints the medians of replay windows (the tuner's: replays 2-11; the bench's: 5-34; later ones), then
time_graph as the tuner (replays 10, warm-up 2) and as the bench (its defaults, which bench.shape_timer calls after
its warm-up) call it, back to back. The other types in the CUDA GEMV's layouts: where it runs (not SPQT_GEMV=triton).

    python scripts/sustain_probe.py [--types q4_k,q5_k,q6_k,q8_0] [--shape 28672x8192] [--replays 400]
"""

import argparse
import datetime
import json
import statistics
import subprocess
import tempfile
import time

import torch

from spqt import bench
from spqt.kernels import gemv as kg
from spqt.kernels import tuning

WINDOWS = ((0, 2), (2, 12), (5, 35), (35, 100), (100, 200), (200, 400))


def b2_sequence(fmt: str, n: int, k: int, l2_bytes: int) -> list:
    """B2 launches over rotated weight copies (one per copy, at least 16), at the config `spqt bench gemv` runs."""
    if fmt == "q4_k":
        ops = bench.make_operands((n, k), l2_bytes)
        cfg = tuning.config("zigzag_dense", n, k)
        pool, x = ops.zig, ops.x
    else:
        pool, x = bench.make_type_operands((n, k), fmt, l2_bytes)
        cfg = tuning.cuda_type_config("dense", fmt, n, k)
    ws = kg.ZigzagWorkspace(pool[0], cfg["split"], torch.float16)
    args = tuning.launch_args(cfg)
    print(f"{fmt} {n}x{k}: {cfg}", flush=True)
    return [(lambda w=pool[i % len(pool)]: kg.gemv_zigzag(w, x, kg.MODE_DENSE, ws, **args))
            for i in range(max(16, len(pool)))]


def replay_series(seq: list, replays: int) -> tuple[list[float], float, float]:
    """us a launch of each of `replays` consecutive replays of seq's graph (timed as time_graph times them; captured
    on the current stream after three eager launches, and no warm-up replays: the first ones are what it looks at),
    and the wall times (s) the replays began and ended."""
    for f in seq[:3]:
        f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in seq:
            f()
    torch.cuda.synchronize()
    time.sleep(1.0)  # idle: the clocks and power as after building a shape's operands
    began = time.time()
    out = [sec * 1e6 for sec in bench.replay_seconds(graph, replays, len(seq))]
    return out, began, time.time()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--types", default="q4_k,q5_k,q6_k,q8_0")
    parser.add_argument("--shape", default="28672x8192")
    parser.add_argument("--replays", type=int, default=400)
    parser.add_argument("--json")
    args = parser.parse_args()
    n, k = map(int, args.shape.split("x"))
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    report = {"shape": args.shape, "types": {}}
    with tempfile.NamedTemporaryFile("r", suffix=".csv") as samples:
        def supported(field: str) -> bool:
            return subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv"],
                                  capture_output=True).returncode == 0

        # the power now, not the 1 s average, where the driver has it; the throttle reasons by either name (renamed)
        power = "power.draw.instant" if supported("power.draw.instant") else "power.draw"
        reasons = next((f for f in ("clocks_event_reasons.active", "clocks_throttle_reasons.active") if supported(f)),
                       None)
        sampler = subprocess.Popen(
            ["nvidia-smi", f"--query-gpu=timestamp,clocks.sm,clocks.mem,{power}" + (f",{reasons}" if reasons else ""),
             "--format=csv,noheader,nounits", "-lms", "20", "-f", samples.name])
        try:
            for fmt in args.types.split(","):
                seq = b2_sequence(fmt, n, k, l2)
                series, t0, t1 = replay_series(seq, args.replays)
                windows = {f"{a}-{b}": statistics.median(series[a:b]) for a, b in WINDOWS if b <= len(series)}
                tuner = bench.time_graph(seq, replays=10, warmup=2) * 1e6
                bench_like = bench.time_graph(seq) * 1e6
                tuner_after = bench.time_graph(seq, replays=10, warmup=2) * 1e6
                print(f"{fmt}: replay windows (us a launch) " + ", ".join(f"{w} {v:.2f}" for w, v in windows.items()),
                      flush=True)
                print(f"{fmt}: time_graph as the tuner {tuner:.2f}, as the bench {bench_like:.2f}, as the tuner "
                      f"again {tuner_after:.2f} us", flush=True)
                report["types"][fmt] = {"series_us": [round(v, 3) for v in series], "windows_us": windows,
                                        "tuner_us": tuner, "bench_us": bench_like, "tuner_after_us": tuner_after,
                                        "wall": [t0, t1]}
                del seq
                torch.cuda.empty_cache()
        finally:
            sampler.terminate()
            sampler.wait()
        lines = open(samples.name).read().splitlines()
    report["smi"] = lines
    rows = []  # (epoch s, SM MHz, power W, throttle reasons)
    for line in lines:
        f = [v.strip() for v in line.split(",")]
        try:
            when = datetime.datetime.strptime(f[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            clock = float(f[1])
        except (ValueError, IndexError):
            continue
        try:
            power_w = float(f[3])
        except (ValueError, IndexError):  # "[N/A]" on a driver that names the field but does not fill it
            power_w = float("nan")
        rows.append((when, clock, power_w, f[4] if reasons and len(f) > 4 else "n/a"))
    print(f"nvidia-smi: {len(rows)} samples ({power})")
    for fmt, r in report["types"].items():
        during = [row for row in rows if r["wall"][0] <= row[0] <= r["wall"][1]]
        if not during:
            print(f"{fmt} during its replays: no samples (replays shorter than the 20 ms sampling)")
        else:
            clocks, watts = [v[1] for v in during], [v[2] for v in during]
            print(f"{fmt} during its replays: {len(during)} samples, SM clock MHz first / median / min "
                  f"{clocks[0]:.0f} / {statistics.median(clocks):.0f} / {min(clocks):.0f}, power W median / max "
                  f"{statistics.median(watts):.0f} / {max(watts):.0f}, throttle reasons "
                  f"{sorted({v[3] for v in during})}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main()
