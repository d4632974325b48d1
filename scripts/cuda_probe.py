"""The CUDA C++ GEMV (zigzag_cuda.py) against the Triton kernel's shipped configs, B2 dense and B4
at 50 % (collection included), on a few shapes: best CUDA config per shape from a sweep, us, % of
copy, B4 over B2, in one call (CUDA graphs over weight copies > 4x L2, bench._fastest).

    python scripts/cuda_probe.py [--shapes 4096x4096,...] [--json out.json]
"""

import argparse
import json

import torch

from spqt import bench
from spqt.kernels import gemv as kg
from spqt.kernels import tuning
from spqt.kernels.collect import collect

SHAPES = "4096x4096,12288x4096,22016x4096,4096x11008,28672x8192,57344x8192,8192x28672"

parser = argparse.ArgumentParser()
parser.add_argument("--shapes", default=SHAPES)
parser.add_argument("--json")
args = parser.parse_args()

copy = bench.copy_bandwidth()
print(f"copy {copy:.0f} GB/s", flush=True)
props = torch.cuda.get_device_properties(0)
rows = []
print("shape        MB | triton B2 us %copy  B4 us  B4/B2 | cuda B2 us %copy  B4 us  B4/B2 | B2 x  B4 x | cuda cfgs")
for spec in args.shapes.split(","):
    n, k = (int(v) for v in spec.split("x"))
    ops = bench.make_operands((n, k), props.L2_cache_size)
    x = ops.x
    t = torch.quantile(x.float().abs(), 0.5).reshape(())

    def calls(cfg, variant):
        ws = kg.ZigzagWorkspace(ops.zig[0], cfg["split"], torch.float16)
        if variant == "zigzag_dense":
            return [(lambda w=w: kg.gemv_zigzag(w, x, kg.MODE_DENSE, ws, **tuning.launch_args(cfg))) for w in ops.zig]
        return [(lambda w=w: (collect(x, t, ws.idx, ws.count),
                              kg.gemv_zigzag(w, x, kg.MODE_INDEXED, ws, idx=ws.idx, count=ws.count,
                                             **tuning.launch_args(cfg)))) for w in ops.zig]

    res = {}
    for variant in ("zigzag_dense", "zigzag_sparse"):
        shipped = tuning.triton_config(variant, n, k)  # the table's Triton entry (a CUDA entry's fallback)
        res[variant, "triton"] = bench._fastest([shipped], lambda c: calls(c, variant))
        res[variant, "cuda"] = bench._fastest(tuning.cuda_candidates(variant, n, k), lambda c: calls(c, variant))
    mb = 144 * -(-n // 256) * k / 1e6
    row = {"shape": spec, "mb": mb}
    for impl in ("triton", "cuda"):
        d, s = res["zigzag_dense", impl][0], res["zigzag_sparse", impl][0]
        row[impl] = {"b2_us": round(d, 2), "b4_us": round(s, 2), "b2_pct_copy": round(100 * mb * 1e3 / d / copy, 1),
                     "b2_cfg": res["zigzag_dense", impl][1], "b4_cfg": res["zigzag_sparse", impl][1]}
    rows.append(row)
    tr, cu = row["triton"], row["cuda"]
    print(f"{spec:11s} {mb:5.1f} | {tr['b2_us']:9.2f} {tr['b2_pct_copy']:5.1f} {tr['b4_us']:6.2f} "
          f"{tr['b2_us'] / tr['b4_us']:6.2f} | {cu['b2_us']:10.2f} {cu['b2_pct_copy']:5.1f} {cu['b4_us']:6.2f} "
          f"{cu['b2_us'] / cu['b4_us']:6.2f} | {tr['b2_us'] / cu['b2_us']:4.2f} {tr['b4_us'] / cu['b4_us']:5.2f} | "
          f"{cu['b2_cfg']} / {cu['b4_cfg']}", flush=True)
    ops = None
    torch.cuda.empty_cache()
if args.json:
    with open(args.json, "w") as f:
        json.dump({"copy_gbs": copy, "commit": bench.git_commit(), "rows": rows}, f, indent=1)
