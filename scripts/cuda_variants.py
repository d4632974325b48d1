"""Variants of the CUDA C++ GEMV (zigzag_q4k.cu's -D knobs), B2 dense and B4 at 50 %, each at its
shape's shipped H200 config: which part of the kernel holds the streaming rate (variants that
leave a stage out or change how it loads; PROBE_* variants compute wrong results, they only time).
B4's list is collected once before its timings (the GEMV alone is timed, no reduction).

    python scripts/cuda_variants.py [--shapes 4096x4096,...] [--json out.json]
"""

import argparse
import json

import torch

from spqt import bench
from spqt.kernels import gemv as kg
from spqt.kernels import tuning, zigzag_cuda
from spqt.kernels.collect import collect

SHAPES = "4096x4096,12288x4096,22016x4096,4096x11008,57344x8192,8192x28672"
# "warm-up" first: the first variant timed on a shape measured 5-10 % slow in every run (the same
# kernel timed again right after it was not), so a throwaway run of the base kernel leads
VARIANTS = {
    zigzag_cuda.MODE_DENSE: {"warm-up": (), "base": (), "L2FIRST=2": ("-DL2FIRST=2",), "L2FIRST=8": ("-DL2FIRST=8",),
                             "L2AHEAD=1": ("-DL2AHEAD=1",), "L2AHEAD=2": ("-DL2AHEAD=2",),
                             "L2AHEAD=4": ("-DL2AHEAD=4",), "L2FIRST=8 L2AHEAD=2": ("-DL2FIRST=8", "-DL2AHEAD=2"),
                             "PROBE heads fixed": ("-DPROBE_HEADS=1",)},
    zigzag_cuda.MODE_INDEXED: {"warm-up": (), "base": (), "L2AHEAD=1": ("-DL2AHEAD=1",),
                               "L2AHEAD=2": ("-DL2AHEAD=2",), "L2AHEAD=4": ("-DL2AHEAD=4",)},
}

parser = argparse.ArgumentParser()
parser.add_argument("--shapes", default=SHAPES)
parser.add_argument("--json")
args = parser.parse_args()
copy = bench.copy_bandwidth()
print(f"copy {copy:.0f} GB/s", flush=True)
props = torch.cuda.get_device_properties(0)
rows = []
for spec in args.shapes.split(","):
    n, k = (int(v) for v in spec.split("x"))
    ops = bench.make_operands((n, k), props.L2_cache_size)
    mb = 144 * -(-n // 256) * k / 1e6
    for mode, variants in VARIANTS.items():
        variant = "zigzag_dense" if mode == zigzag_cuda.MODE_DENSE else "zigzag_sparse"
        cfg = tuning.config(variant, n, k)
        if cfg.get("impl") != "cuda":
            cfg = {"split": cfg["split"], "num_warps": 4, "pipe": 0}  # a Triton entry: the CUDA kernel at its split
        split, warps, pipe = cfg["split"], cfg["num_warps"], cfg.get("pipe", 0)
        ws = kg.ZigzagWorkspace(ops.zig[0], split, torch.float16)
        if mode == zigzag_cuda.MODE_INDEXED:
            collect(ops.x, torch.quantile(ops.x.float().abs(), 0.5).reshape(()), ws.idx, ws.count)
        for name, extra in variants.items():
            def calls(_cfg, extra=extra):
                return [(lambda w=w: zigzag_cuda.launch(w.quants, w.head, ops.x, ws.idx, ws.count, ws.partials, k, ws.np,
                                                        split, mode, warps, True, pipe, extra)) for w in ops.zig]
            us, _ = bench._fastest([{}], calls)
            share = 1.0 if mode == zigzag_cuda.MODE_DENSE else 0.5
            rows.append({"shape": spec, "mode": "B2" if mode == zigzag_cuda.MODE_DENSE else "B4 50%", "variant": name,
                         "config": [split, warps, pipe], "us": round(us, 2),
                         "pct_copy_of_bytes_read": round(100 * share * mb * 1e3 / us / copy, 1)})
            print(f"{spec:11s} {rows[-1]['mode']:6s} {name:20s} {us:7.2f} us {rows[-1]['pct_copy_of_bytes_read']:5.1f} % "
                  f"of copy (bytes it reads; split {split}, warps {warps}, pipe {pipe})", flush=True)
    ops = None
    torch.cuda.empty_cache()
if args.json:
    with open(args.json, "w") as f:
        json.dump({"copy_gbs": copy, "commit": bench.git_commit(), "rows": rows}, f, indent=1)
