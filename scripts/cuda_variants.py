"""Variants of the CUDA C++ B2 kernel (zigzag_q4k.cu's -D knobs) timed on a few shapes at one config
each: which part of the kernel holds the streaming rate (time variants that leave a stage out or
change how it loads; PROBE_* variants compute wrong results, they only time).

    python scripts/cuda_variants.py [--json out.json]
"""

import argparse
import json

import torch

from spqt import bench
from spqt.kernels import gemv as kg
from spqt.kernels import zigzag_cuda

# shape -> (split, warps, pipe) that won the sweep of scripts/cuda_probe.py (benchmarks/results/session4)
SHAPES = {"57344x8192": (16, 4, 0), "8192x28672": (15, 4, 0), "4096x11008": (54, 2, 1), "12288x4096": (12, 4, 0)}
# "warm-up" first: the first variant timed on a shape measured 5-10 % slow in every run (the same
# kernel timed again right after it was not), so a throwaway run of the base kernel leads
VARIANTS = {"warm-up": (), "base (q nc)": (), "q cg": ("-DQLOAD=1",), "q no-L1": ("-DQLOAD=2",),
            "h cg": ("-DHLOAD=1",), "q+h no-L1": ("-DQLOAD=2", "-DHLOAD=2"),
            "PROBE heads fixed": ("-DPROBE_HEADS=1",)}

parser = argparse.ArgumentParser()
parser.add_argument("--json")
args = parser.parse_args()
copy = bench.copy_bandwidth()
print(f"copy {copy:.0f} GB/s", flush=True)
props = torch.cuda.get_device_properties(0)
rows = []
for spec, (split, warps, pipe) in SHAPES.items():
    n, k = (int(v) for v in spec.split("x"))
    ops = bench.make_operands((n, k), props.L2_cache_size)
    mb = 144 * -(-n // 256) * k / 1e6
    ws = kg.ZigzagWorkspace(ops.zig[0], split, torch.float16)
    for name, extra in VARIANTS.items():
        def calls(_cfg, extra=extra):
            return [(lambda w=w: zigzag_cuda.launch(w.quants, w.head, ops.x, ws.idx, ws.count, ws.partials, k, ws.np,
                                                    split, zigzag_cuda.MODE_DENSE, warps, True, pipe, extra))
                    for w in ops.zig]
        us, _ = bench._fastest([{}], calls)
        rows.append({"shape": spec, "variant": name, "us": round(us, 2), "pct_copy": round(100 * mb * 1e3 / us / copy, 1)})
        print(f"{spec:11s} {name:18s} {us:7.2f} us {rows[-1]['pct_copy']:5.1f} % of copy (GEMV alone, no reduction)",
              flush=True)
    ops = None
    torch.cuda.empty_cache()
if args.json:
    with open(args.json, "w") as f:
        json.dump({"copy_gbs": copy, "commit": bench.git_commit(), "rows": rows}, f, indent=1)
